#!/usr/bin/env python3
"""Writes a reproducible OCI image archive without a Docker daemon or a registry.

Used by scripts/build-images.sh. An image is two layers:

1. the base: the files of pinned Debian packages (.deb, unpacked with dpkg-deb, not
   installed: no maintainer scripts run), plus /etc/passwd and /etc/group with root and
   nonroot (65532), /etc/nsswitch.conf, /etc/ssl/certs/ca-certificates.crt built from the
   ca-certificates package, /tmp and /home/nonroot. The same files as a distroless
   "cc" base, from the same Debian release.
2. the image's own files (--file DEST=SRC), e.g. /usr/local/bin/modelpool-sidecar.

The output is a tar of an OCI image layout (oci-layout, index.json, blobs/sha256/...), as
`docker save`/`skopeo copy oci-archive:` produce and `ctr images import`, `podman load` and
`skopeo` read. The index names the image both ways: `org.opencontainers.image.ref.name` (the
tag) and `io.containerd.image.name` (the full reference).

Reproducible: entries are sorted, owned by 0:0 (or as given), every mtime is the fixed
SOURCE_DATE_EPOCH, gzip headers carry no name or time, and the config has a fixed `created`.
Two runs on the same inputs give the same bytes, so the same digest.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field

EPOCH = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
CREATED = "1970-01-01T00:00:00Z" if EPOCH == 0 else None

PASSWD = "root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n"
GROUP = "root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n"
NSSWITCH = "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\nnetworks: files\nprotocols: files\nservices: files\n"


class ImageError(Exception):
    pass


@dataclass
class Entry:
    info: tarfile.TarInfo
    data: bytes | None = None


@dataclass
class Layer:
    entries: dict[str, Entry] = field(default_factory=dict)

    def add(self, src: tarfile.TarInfo, data: bytes | None) -> None:
        name = src.name
        while name.startswith("./"):
            name = name[2:]
        name = name.rstrip("/")
        if not name or name == ".":
            return
        info = tarfile.TarInfo(name)
        info.type = src.type
        info.mode = src.mode
        info.uid = src.uid
        info.gid = src.gid
        info.uname = ""
        info.gname = ""
        info.mtime = EPOCH
        if src.issym():
            info.linkname = src.linkname
        elif src.islnk():
            link = src.linkname
            while link.startswith("./"):
                link = link[2:]
            info.linkname = link
        if src.isreg():
            info.size = len(data or b"")
        self.entries[name] = Entry(info, data if src.isreg() else None)

    def add_dir(self, name: str, mode: int = 0o755, uid: int = 0) -> None:
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if sub in self.entries and i < len(parts):
                continue
            info = tarfile.TarInfo(sub)
            info.type = tarfile.DIRTYPE
            info.mode = mode if i == len(parts) else 0o755
            info.uid = info.gid = uid if i == len(parts) else 0
            self.add(info, None)

    def add_file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        name = name.strip("/")
        if "/" in name:
            parent = name.rsplit("/", 1)[0]
            if parent not in self.entries:
                self.add_dir(parent)
        info = tarfile.TarInfo(name)
        info.type = tarfile.REGTYPE
        info.mode = mode
        self.add(info, data)

    def add_deb(self, deb: str) -> None:
        try:
            fsys = subprocess.run(
                ["dpkg-deb", "--fsys-tarfile", deb], check=True, capture_output=True
            ).stdout
        except (OSError, subprocess.CalledProcessError) as e:
            raise ImageError(f"unpacking {deb} with dpkg-deb failed: {e}") from e
        with tarfile.open(fileobj=io.BytesIO(fsys)) as tar:
            for member in tar:
                # Documentation is not needed at run time (distroless keeps only copyright).
                path = member.name.lstrip("./")
                if path.startswith(("usr/share/doc/", "usr/share/man/", "usr/share/info/",
                                    "usr/share/lintian/")) and not path.endswith("/copyright"):
                    continue
                data = tar.extractfile(member).read() if member.isreg() else None
                self.add(member, data)

    def tar_gz(self) -> tuple[bytes, str]:
        """(the gzip'd tar, the diff_id of the plain tar)."""
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name in sorted(self.entries):
                entry = self.entries[name]
                tar.addfile(entry.info, io.BytesIO(entry.data) if entry.data is not None else None)
        plain = raw.getvalue()
        out = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0, compresslevel=9) as gz:
            gz.write(plain)
        return out.getvalue(), "sha256:" + hashlib.sha256(plain).hexdigest()


def ca_bundle(deb_layer: Layer) -> bytes:
    certs = [
        e.data
        for name, e in sorted(deb_layer.entries.items())
        if name.startswith("usr/share/ca-certificates/") and name.endswith(".crt") and e.data
    ]
    return b"".join(c if c.endswith(b"\n") else c + b"\n" for c in certs)


def base_layer(debs: list[str]) -> Layer:
    layer = Layer()
    for deb in debs:
        layer.add_deb(deb)
    layer.add_file("etc/passwd", PASSWD.encode())
    layer.add_file("etc/group", GROUP.encode())
    layer.add_file("etc/nsswitch.conf", NSSWITCH.encode())
    bundle = ca_bundle(layer)
    if bundle:
        layer.add_file("etc/ssl/certs/ca-certificates.crt", bundle)
    layer.add_dir("tmp", mode=0o1777)
    layer.add_dir("home/nonroot", mode=0o700, uid=65532)
    layer.add_dir("usr/local/bin")
    return layer


def cached_base(debs: list[str], cache: str | None) -> tuple[bytes, str]:
    """The base layer (gzip'd, diff_id), from `cache` when the same inputs built it before."""
    key = hashlib.sha256()
    with open(__file__, "rb") as f:
        key.update(f.read())
    key.update(str(EPOCH).encode())
    for deb in debs:
        with open(deb, "rb") as f:
            key.update(hashlib.sha256(f.read()).digest())
    path = os.path.join(cache, key.hexdigest()[:32]) if cache else None
    if path and os.path.isfile(path + ".tar.gz") and os.path.isfile(path + ".diff_id"):
        with open(path + ".tar.gz", "rb") as f, open(path + ".diff_id") as d:
            return f.read(), d.read().strip()
    gz, diff_id = base_layer(debs).tar_gz()
    if path:
        os.makedirs(cache, exist_ok=True)
        with open(path + ".tar.gz.tmp", "wb") as f:
            f.write(gz)
        with open(path + ".diff_id", "w") as d:
            d.write(diff_id)
        os.replace(path + ".tar.gz.tmp", path + ".tar.gz")
    return gz, diff_id


def blob(blobs: dict[str, bytes], data: bytes, media_type: str, **extra) -> dict:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blobs[digest] = data
    return {"mediaType": media_type, "digest": digest, "size": len(data), **extra}


def dumps(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="the OCI archive to write (.tar)")
    ap.add_argument("--ref", required=True, help="the image reference, e.g. ghcr.io/x/y:0.1.0")
    ap.add_argument("--deb", action="append", default=[], help="a .deb of the base layer")
    ap.add_argument("--file", action="append", default=[], help="DEST=SRC[:MODE] in the top layer")
    ap.add_argument("--link", action="append", default=[], help="DEST=TARGET symlink in the top layer")
    ap.add_argument("--entrypoint", action="append", default=[])
    ap.add_argument("--cmd", action="append", default=[])
    ap.add_argument("--env", action="append", default=[])
    ap.add_argument("--label", action="append", default=[], help="KEY=VALUE")
    ap.add_argument("--user", default="65532:65532")
    ap.add_argument("--arch", default="amd64")
    ap.add_argument("--layer-cache", help="a folder to keep the compressed base layer in, by its inputs")
    args = ap.parse_args()

    if ":" not in args.ref.rsplit("/", 1)[-1]:
        raise ImageError(f"--ref {args.ref!r}: expected a reference with a tag (name:tag)")
    tag = args.ref.rsplit(":", 1)[1]

    top = Layer()
    for spec in args.file:
        dest, _, src = spec.partition("=")
        mode = 0o755
        if ":" in src:
            src, _, m = src.rpartition(":")
            mode = int(m, 8)
        try:
            with open(src, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ImageError(f"--file {spec!r}: cannot read {src}: {e}") from e
        top.add_file(dest, data, mode)
    for spec in args.link:
        dest, _, target = spec.partition("=")
        dest = dest.strip("/")
        if "/" in dest:
            top.add_dir(dest.rsplit("/", 1)[0])
        info = tarfile.TarInfo(dest)
        info.type = tarfile.SYMTYPE
        info.linkname = target
        info.mode = 0o777
        top.add(info, None)

    blobs: dict[str, bytes] = {}
    layers, diff_ids = [], []
    for layer in ("base", top):
        if layer == "base":
            gz, diff_id = cached_base(args.deb, args.layer_cache)
        else:
            gz, diff_id = layer.tar_gz()
        layers.append(blob(blobs, gz, "application/vnd.oci.image.layer.v1.tar+gzip"))
        diff_ids.append(diff_id)

    labels = dict(kv.split("=", 1) for kv in args.label)
    env = ["PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin", *args.env]
    config = {
        "architecture": args.arch,
        "os": "linux",
        "created": CREATED or __import__("datetime").datetime.fromtimestamp(
            EPOCH, __import__("datetime").timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "config": {
            "User": args.user,
            "Env": env,
            "Entrypoint": args.entrypoint or None,
            "Cmd": args.cmd or None,
            "WorkingDir": "/",
            "Labels": labels,
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [
            {"created_by": "images/oci_image.py: base from " + ", ".join(sorted(os.path.basename(d) for d in args.deb))},
            {"created_by": "images/oci_image.py: " + ", ".join(f.split("=", 1)[0] for f in args.file + args.link)},
        ],
    }
    config["config"] = {k: v for k, v in config["config"].items() if v is not None}
    config_desc = blob(blobs, dumps(config), "application/vnd.oci.image.config.v1+json")
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config_desc,
        "layers": layers,
        "annotations": labels,
    }
    manifest_desc = blob(
        blobs,
        dumps(manifest),
        "application/vnd.oci.image.manifest.v1+json",
        platform={"architecture": args.arch, "os": "linux"},
        annotations={"org.opencontainers.image.ref.name": tag, "io.containerd.image.name": args.ref},
    )
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [manifest_desc]}

    files = {"oci-layout": dumps({"imageLayoutVersion": "1.0.0"}), "index.json": dumps(index)}
    for digest, data in blobs.items():
        files["blobs/sha256/" + digest.split(":", 1)[1]] = data
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for d in ("blobs", "blobs/sha256"):
            info = tarfile.TarInfo(d)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, EPOCH
            tar.addfile(info)
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(files[name]), 0o644, EPOCH
            tar.addfile(info, io.BytesIO(files[name]))
    os.replace(tmp, args.out)
    size = sum(l["size"] for l in layers)
    print(f"{args.ref} {manifest_desc['digest']} {size} {args.out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ImageError as e:
        print(f"oci_image.py: {e}", file=sys.stderr)
        sys.exit(1)
