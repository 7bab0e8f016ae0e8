"""A small stand-in for ``modelpool-sidecar``, written from ``docs/sidecar-api.md``.

NOT used by default: the tests run against the real Rust binary. This exists so the SDK could be
developed while the sidecar was being written, and to tell an SDK bug from a sidecar bug: point
``MODELPOOL_SIDECAR_BIN`` at this file (it takes the same ``--pool --socket --metrics-listen``
flags) and run the same tests. It implements sessions, heartbeats, acquire (wait / refuse with
ceilings and eviction of idle models), loaded, release, unloaded, the command long-poll, cleanup,
state and check. It does not measure anything: the ledger is what the app reports.
"""

from __future__ import annotations

import argparse
import http.server
import itertools
import json
import os
import signal
import socketserver
import sys
import threading
import time
from typing import Any, Dict, Tuple
from urllib.parse import parse_qs, urlsplit

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from modelpool.pool import load_pool_file  # noqa: E402

GIB = 1024**3


class State:
    def __init__(self, pool_path: str) -> None:
        self.pool = load_pool_file(pool_path)
        self.cond = threading.Condition()
        self.sessions: Dict[str, Dict[str, Any]] = {}
        self.holdings: Dict[Tuple[str, str], Dict[str, Any]] = {}
        self.leases: Dict[str, Tuple[str, str]] = {}
        self.learned: Dict[str, Dict[str, int]] = {}
        self.ids = itertools.count(1)
        self.heartbeat_ms = 1000

    def size(self, model: str) -> Dict[str, int]:
        if self.pool.size_unknown(model, model in self.learned):
            return self.pool.unsized_need()  # unsizedModels: Alone, until a load is measured
        spec = self.pool.models[model]
        learned = self.learned.get(model, {})
        return {
            "vram": max(spec.vram_bytes or 0, learned.get("vram", 0)),
            "ram": max(spec.ram_bytes or 0, learned.get("ram", 0)),
        }

    def held(self) -> Dict[str, int]:
        out = {"vram": 0, "ram": 0}
        for (_, model), _h in self.holdings.items():
            for k, v in self.size(model).items():
                out[k] += v
        return out

    def fits(self, need: Dict[str, int], held: Dict[str, int]) -> bool:
        limits = self.pool.limits
        return all(limits[r] is None or held[r] + need[r] <= limits[r] for r in ("vram", "ram"))

    def command(self, session: str, model: str, reason: str) -> None:
        sess = self.sessions.get(session)
        if sess is None:
            return
        holding = self.holdings.get((session, model))
        generation = holding["generation"] if holding is not None else 0
        for cmd in sess["pending"].values():
            if cmd["model"] == model and cmd["generation"] == generation:
                return
        cid = next(self.ids)
        sess["pending"][cid] = {
            "id": cid, "kind": "unload", "model": model, "generation": generation, "reason": reason
        }
        self.cond.notify_all()

    def drop_session(self, session: str) -> None:
        self.sessions.pop(session, None)
        for key in [k for k in self.holdings if k[0] == session]:
            del self.holdings[key]
        for lease in [key for key, v in self.leases.items() if v[0] == session]:
            del self.leases[lease]
        self.cond.notify_all()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: State

    def log_message(self, *args: Any) -> None:
        pass

    def address_string(self) -> str:
        return "uds"

    def reply(self, status: int, body: Any = None) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def error(self, status: int, code: str, message: str, **extra: Any) -> None:
        self.reply(status, {"error": code, "message": message, **extra})

    def body(self) -> Dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(length) or b"{}")

    def do_GET(self) -> None:
        self.route("GET")

    def do_POST(self) -> None:
        self.route("POST")

    def do_DELETE(self) -> None:
        self.route("DELETE")

    def route(self, method: str) -> None:
        url = urlsplit(self.path)
        parts = [p for p in url.path.split("/") if p]
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        st = self.state
        body = self.body() if method == "POST" else {}
        if parts[:2] == ["v1", "sessions"] and len(parts) == 2 and method == "POST":
            unknown = [m for m in body.get("models", []) if m not in st.pool.models]
            if unknown:
                return self.error(400, "unknown_model", f"not in pool: {', '.join(unknown)}")
            with st.cond:
                sid = f"s-{os.getpid()}-{next(st.ids)}"
                st.sessions[sid] = {"pid": body["pid"], "hb": time.monotonic(), "pending": {}}
                for hold in body.get("holds", []):
                    st.holdings[(sid, hold["model"])] = {"state": "loaded", "leases": set()}
                    st.learned[hold["model"]] = {"ram": hold.get("ram_bytes") or 0, "vram": hold.get("vram_bytes") or 0}
            pool = st.pool
            return self.reply(201, {
                "session": sid,
                "heartbeat_ms": st.heartbeat_ms,
                "pool": {
                    "name": pool.name,
                    "mode": pool.mode,
                    "limits": {"vram_bytes": pool.limit_vram_bytes, "ram_bytes": pool.limit_ram_bytes},
                    "models": [
                        {"name": m.name, "vram_bytes": m.vram_bytes, "ram_bytes": m.ram_bytes, "pinned": m.pinned}
                        for m in pool.models.values()
                    ],
                },
            })
        if parts[:2] == ["v1", "sessions"] and len(parts) >= 3:
            sid = parts[2]
            with st.cond:
                if sid not in st.sessions:
                    return self.error(404, "unknown_session", f"no session {sid}")
                if method == "DELETE":
                    st.drop_session(sid)
                    return self.reply(204)
                if parts[3:] == ["heartbeat"]:
                    st.sessions[sid]["hb"] = time.monotonic()
                    return self.reply(200, {})
                if parts[3:] == ["commands"]:
                    deadline = time.monotonic() + min(30000, int(query.get("wait_ms", 25000))) / 1000
                    while sid in st.sessions and not st.sessions[sid]["pending"] and time.monotonic() < deadline:
                        st.cond.wait(deadline - time.monotonic())
                    if sid not in st.sessions:
                        return self.error(404, "unknown_session", f"no session {sid}")
                    return self.reply(200, {"commands": list(st.sessions[sid]["pending"].values())})
            return self.error(404, "not_found", self.path)
        if parts == ["v1", "acquire"]:
            return self.acquire(body)
        if parts == ["v1", "loaded"]:
            with st.cond:
                lease = st.leases.get(body["lease"])
                if body["session"] not in st.sessions:
                    return self.error(404, "unknown_session", "no session")
                if lease is None:
                    return self.error(404, "unknown_lease", "no lease")
                holding = st.holdings.get(lease)
                if not body.get("ok", True):
                    st.holdings.pop(lease, None)
                    st.leases.pop(body["lease"], None)
                elif holding is not None:
                    holding["state"] = "loaded"
                    st.learned[lease[1]] = {"ram": body.get("ram_bytes") or 0, "vram": body.get("vram_bytes") or 0}
                st.cond.notify_all()
            return self.reply(200, {})
        if parts == ["v1", "release"]:
            with st.cond:
                if body["session"] not in st.sessions:
                    return self.error(404, "unknown_session", "no session")
                lease = st.leases.pop(body["lease"], None)
                if lease is None:
                    return self.error(404, "unknown_lease", "no lease")
                holding = st.holdings.get(lease)
                unload = False
                if holding is not None:
                    holding["leases"].discard(body["lease"])
                    holding["idle_since"] = time.monotonic()
                    if not holding["leases"] and st.pool.mode == "Aggressive" and not st.pool.models[lease[1]].pinned:
                        unload = True
                        st.command(lease[0], lease[1], "released")
                st.cond.notify_all()
            return self.reply(200, {"unload": unload})
        if parts == ["v1", "unloaded"]:
            with st.cond:
                sess = st.sessions.get(body["session"])
                if sess is None:
                    return self.error(404, "unknown_session", "no session")
                key = (body["session"], body["model"])
                holding = st.holdings.get(key)
                if holding is None or holding["generation"] != body.get("generation"):
                    return self.error(409, "stale_instance", f"no generation {body.get('generation')} of {key}")
                st.holdings.pop(key, None)
                for cid in [
                    c for c, cmd in sess["pending"].items()
                    if cmd["model"] == body["model"] and cmd["generation"] == holding["generation"]
                ]:
                    del sess["pending"][cid]
                st.cond.notify_all()
            return self.reply(200, {})
        if parts == ["v1", "cleanup"]:
            with st.cond:
                out, skipped = [], []
                for (sid, model), holding in list(st.holdings.items()):
                    if holding["leases"]:
                        skipped.append(model)
                    elif holding["state"] == "loaded" and (body.get("force") or not st.pool.models[model].pinned):
                        st.command(sid, model, "cleanup")
                        out.append({"session": sid, "model": model})
            return self.reply(200, {"unloading": out, "skipped_leased": skipped})
        if parts == ["v1", "state"]:
            with st.cond:
                held = st.held()
                models = [
                    {"model": m, "session": s, "pid": st.sessions.get(s, {}).get("pid"), "state": h["state"],
                     "leases": len(h["leases"]), "ram_bytes": st.size(m)["ram"], "vram_bytes": st.size(m)["vram"],
                     "measured": st.learned.get(m, {}), "pinned": st.pool.models[m].pinned}
                    for (s, m), h in st.holdings.items()
                ]
            return self.reply(200, {
                "ram_used_gb": held["ram"] / GIB, "ram_total_gb": (st.pool.limit_ram_bytes or 0) / GIB,
                "ram_percent": 0.0, "vram_allocated_gb": held["vram"] / GIB,
                "vram_total_gb": (st.pool.limit_vram_bytes or 0) / GIB, "vram_percent": 0.0,
                "gpu": {"up": False, "reason": "contract stand-in"}, "sources": {}, "pool": st.pool.name,
                "held_bytes": held, "ceiling_bytes": st.pool.limits, "lost_bytes": {"vram": 0, "ram": 0},
                "queue": 0, "models": models,
            })
        if parts == ["v1", "check"]:
            with st.cond:
                held = st.held()
                need = {"vram": int(query.get("vram_bytes", 0)), "ram": int(query.get("ram_bytes", 0))}
                ok = st.fits(need, held)
            return self.reply(200, {"available": ok, "free": {}, "reclaimable": {}, "message": "ok" if ok else "no room"})
        return self.error(404, "not_found", self.path)

    def acquire(self, body: Dict[str, Any]) -> None:
        st = self.state
        sid, model = body["session"], body["model"]
        if model not in st.pool.models:
            return self.error(409, "refused", f"unknown model {model}", decision="refuse", reason="unknown_model")
        deadline = time.monotonic() + st.pool.acquire_timeout_s
        with st.cond:
            if st.pool.unsized_models == "Refuse" and st.pool.size_unknown(model, model in st.learned):
                return self.error(409, "refused", st.pool.unsized_refusal(model), decision="refuse",
                                  reason="unsized", need_bytes={"vram": 0, "ram": 0},
                                  ceiling_bytes=st.pool.limits, held_bytes=st.held())
            need = st.size(model)
            for r in ("vram", "ram"):
                limit = st.pool.limits[r]
                if limit is not None and need[r] > limit:
                    return self.error(409, "refused", f"model {model!r} needs {need[r]} of {r}, ceiling {limit}",
                                      decision="refuse", reason="exceeds_ceiling", need_bytes=need,
                                      ceiling_bytes=st.pool.limits, held_bytes=st.held())
            while True:
                if sid not in st.sessions:
                    return self.error(404, "unknown_session", "no session")
                lease = f"l-{next(st.ids)}"
                holding = st.holdings.get((sid, model))
                if holding is not None and holding["state"] == "loaded":
                    holding["leases"].add(lease)
                    st.leases[lease] = (sid, model)
                    return self.reply(
                        200, {"decision": "use", "lease": lease, "model": model, "generation": holding["generation"]}
                    )
                if holding is None and st.fits(need, st.held()):
                    generation = next(st.ids)
                    st.holdings[(sid, model)] = {"state": "loading", "leases": {lease}, "generation": generation}
                    st.leases[lease] = (sid, model)
                    return self.reply(
                        200, {"decision": "load", "lease": lease, "model": model, "generation": generation}
                    )
                for (s, m), h in st.holdings.items():
                    if not h["leases"] and h["state"] == "loaded" and not st.pool.models[m].pinned:
                        st.command(s, m, "evicted")
                if not body.get("wait", True):
                    return self.reply(200, {"decision": "wait", "message": "no room yet"})
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return self.error(409, "refused", f"no room for {model!r}", decision="refuse", reason="timeout",
                                      need_bytes=need, ceiling_bytes=st.pool.limits, held_bytes=st.held())
                st.cond.wait(min(remaining, 0.5))


class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def reaper(state: State) -> None:
    while True:
        time.sleep(0.2)
        with state.cond:
            now = time.monotonic()
            for sid, sess in list(state.sessions.items()):
                dead = now - sess["hb"] > 2 * state.heartbeat_ms / 1000
                try:
                    os.kill(sess["pid"], 0)
                except OSError:
                    dead = True
                if dead:
                    state.drop_session(sid)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pool", required=True)
    parser.add_argument("--socket", required=True)
    parser.add_argument("--metrics-listen", default=None)
    args = parser.parse_args()
    Handler.state = State(args.pool)
    if os.path.exists(args.socket):
        os.unlink(args.socket)
    server = Server(args.socket, Handler)
    threading.Thread(target=reaper, args=(Handler.state,), daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: (os.unlink(args.socket), os._exit(0)))
    print(f"contract sidecar listening on {args.socket}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
