"""The weights estimator (`modelpool-weights estimate`) on files written by the formats' own
packages (gguf 0.19, safetensors 0.8), against what a real loader holds (loader.py: RssAnon
of a process that read every tensor into memory). Issue 20: within 2 %.

Run by scripts/test.sh with the SDK's venv (sdk/python/requirements-dev.txt pins gguf).
MODELPOOL_WEIGHTS_BIN names the binary (default: the workspace's debug build).
"""

import json
import os
import resource
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gguf
from gguf import GGMLQuantizationType as Q
from gguf.constants import GGML_QUANT_SIZES
from safetensors.numpy import save_file

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
TOLERANCE = 0.02


def weights_bin() -> str:
    explicit = os.environ.get("MODELPOOL_WEIGHTS_BIN")
    if explicit:
        return explicit
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    path = target / "debug" / "modelpool-weights"
    if not path.exists():
        raise RuntimeError(f"{path} missing: run `cargo build -p modelpool-weights` first")
    return str(path)


def estimate(path: Path, *args: str) -> dict:
    run = subprocess.run([weights_bin(), "estimate", str(path), *args], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def refused(path: Path, *args: str) -> str:
    run = subprocess.run([weights_bin(), "estimate", str(path), *args], capture_output=True, text=True)
    assert run.returncode == 2, (run.returncode, run.stdout, run.stderr)
    return run.stderr


def load(fmt: str, *files: Path) -> dict:
    run = subprocess.run(
        [sys.executable, str(HERE / "loader.py"), fmt, *map(str, files)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    result["rss_delta"] = result["rss_anon_after"] - result["rss_anon_before"]
    return result


def within(estimate_bytes: int, measured: int) -> float:
    error = estimate_bytes / measured - 1
    assert abs(error) <= TOLERANCE, f"estimate {estimate_bytes} vs measured {measured}: {error:+.2%}"
    return error


def quantized(shape_ne: tuple[int, ...], qtype: Q, rng) -> np.ndarray:
    """Random bytes of a quantized tensor whose ggml shape (ne0 first) is `shape_ne`."""
    block, size = GGML_QUANT_SIZES[qtype]
    ne0, *rest = shape_ne
    assert ne0 % block == 0
    byte_shape = (*reversed(rest), ne0 // block * size)
    return rng.integers(0, 256, size=byte_shape, dtype=np.uint8)


LLAMA = dict(layers=4, hidden=1024, heads=8, heads_kv=2, ff=2816, vocab=8192, context=2048)


def write_llama(path: Path, layers, hidden, heads, heads_kv, ff, vocab, context, seed=1):
    """A llama-architecture GGUF with the tensor types real quantized models mix."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(context)
    w.add_block_count(layers)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(heads_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"tok{i}".encode() for i in range(vocab)])
    w.add_token_scores([0.0] * vocab)
    w.add_token_types([1] * vocab)
    kv_dim = hidden // heads * heads_kv
    w.add_tensor("token_embd.weight", quantized((hidden, vocab), Q.Q8_0, rng), raw_dtype=Q.Q8_0)
    for i in range(layers):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(hidden, dtype=np.float32))
        w.add_tensor(p + "attn_q.weight", quantized((hidden, hidden), Q.Q4_K, rng), raw_dtype=Q.Q4_K)
        w.add_tensor(p + "attn_k.weight", quantized((hidden, kv_dim), Q.Q4_0, rng), raw_dtype=Q.Q4_0)
        w.add_tensor(p + "attn_v.weight", quantized((hidden, kv_dim), Q.Q6_K, rng), raw_dtype=Q.Q6_K)
        w.add_tensor(p + "attn_output.weight", rng.standard_normal((hidden, hidden)).astype(np.float16))
        w.add_tensor(p + "ffn_norm.weight", np.ones(hidden, dtype=np.float32))
        w.add_tensor(p + "ffn_gate.weight", quantized((hidden, ff), Q.Q8_0, rng), raw_dtype=Q.Q8_0)
        w.add_tensor(p + "ffn_up.weight", quantized((hidden, ff), Q.IQ4_XS, rng), raw_dtype=Q.IQ4_XS)
        w.add_tensor(p + "ffn_down.weight", quantized((ff, hidden), Q.Q5_K, rng), raw_dtype=Q.Q5_K)
    w.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    w.add_tensor("output.weight", rng.standard_normal((vocab, hidden)).astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def kv_cache_bytes(layers, hidden, heads, heads_kv, context, **_):
    """llama.cpp's f16 KV cache: n_ctx x n_layer x (n_embd_k_gqa + n_embd_v_gqa) x 2 bytes."""
    n_embd_gqa = hidden // heads * heads_kv
    return context * layers * (2 * n_embd_gqa) * 2


@pytest.fixture(scope="module")
def llama_gguf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "llama.gguf"
    write_llama(path, **LLAMA)
    return path


def test_gguf_estimate_is_what_a_loader_holds(llama_gguf):
    est = estimate(llama_gguf)
    loaded = load("gguf", llama_gguf)
    assert est["format"] == "gguf"
    assert est["tensors"] == loaded["tensors"] == 2 + 9 * LLAMA["layers"] + 1
    assert est["weights_bytes"] == loaded["held_bytes"]
    error = within(est["weights_bytes"], loaded["rss_delta"])
    print(f"GGUF estimate/measured {est['weights_bytes']}/{loaded['rss_delta']} ({error:+.3%})")
    # The KV cache by llama.cpp's formula, for the model's context and for a configured one.
    assert est["kv_cache"] == {"context": 2048, "bytes": kv_cache_bytes(**LLAMA)}
    assert est["total_bytes"] == est["weights_bytes"] + est["kv_cache"]["bytes"]
    small = estimate(llama_gguf, "--context", "512")
    assert small["kv_cache"] == {"context": 512, "bytes": kv_cache_bytes(**{**LLAMA, "context": 512})}


def test_gguf_version_2_reads_like_3(llama_gguf, tmp_path):
    data = bytearray(llama_gguf.read_bytes())
    assert data[:4] == b"GGUF" and struct.unpack_from("<I", data, 4)[0] == 3
    struct.pack_into("<I", data, 4, 2)
    v2 = tmp_path / "v2.gguf"
    v2.write_bytes(data)
    assert estimate(v2)["weights_bytes"] == estimate(llama_gguf)["weights_bytes"]


def test_every_ggml_type_has_gguf_py_block_size(tmp_path):
    """The type table against gguf-py's GGML_QUANT_SIZES: one tensor of each type."""
    rng = np.random.default_rng(2)
    path = tmp_path / "types.gguf"
    w = gguf.GGUFWriter(str(path), "none")
    for qtype, (block, _) in GGML_QUANT_SIZES.items():
        w.add_tensor(f"t.{qtype.name}", quantized((block * 3, 2), qtype, rng), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    reader = gguf.GGUFReader(str(path))
    est = estimate(path)
    assert est["tensors"] == len(GGML_QUANT_SIZES) == len(reader.tensors)
    assert est["weights_bytes"] == sum(int(t.n_bytes) for t in reader.tensors)
    assert est["kv_cache"] is None


def write_shards(directory: Path, shards: int = 3, seed: int = 3) -> int:
    """A sharded checkpoint as transformers' save_pretrained lays it out. Returns its bytes."""
    rng = np.random.default_rng(seed)
    weight_map, total = {}, 0
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {
            f"model.layers.{s}.self_attn.q_proj.weight": rng.standard_normal((1024, 1024)).astype(np.float32),
            f"model.layers.{s}.mlp.up_proj.weight": rng.standard_normal((2816, 1024)).astype(np.float16),
            f"model.layers.{s}.mlp.codes": rng.integers(-128, 127, (1000, 999), dtype=np.int8),
            f"model.layers.{s}.input_layernorm.weight": np.ones(1024, dtype=np.float32),
            f"model.layers.{s}.position_ids": np.arange(4096, dtype=np.int64),
        }
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        for key, array in tensors.items():
            weight_map[key] = name
            total += array.nbytes
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def test_sharded_safetensors_estimate_is_what_a_loader_holds(tmp_path):
    total = write_shards(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    est = estimate(tmp_path)
    loaded = load("safetensors", *sorted(tmp_path.glob("*.safetensors")))
    assert (est["format"], est["files"], est["tensors"]) == ("sharded_safetensors", 3, 15)
    assert est["weights_bytes"] == loaded["held_bytes"] == total
    error = within(est["weights_bytes"], loaded["rss_delta"])
    print(f"sharded safetensors estimate/measured {est['weights_bytes']}/{loaded['rss_delta']} ({error:+.3%})")
    assert est["kv_cache"] is None


def test_single_safetensors_file_estimate_is_what_a_loader_holds(tmp_path):
    rng = np.random.default_rng(4)
    path = tmp_path / "model.safetensors"
    save_file(
        {
            "w": rng.standard_normal((4096, 2048)).astype(np.float32),
            "h": rng.standard_normal((2048, 2048)).astype(np.float16),
            "empty": np.zeros((0, 3), dtype=np.float32),
        },
        str(path),
    )
    est = estimate(path)
    loaded = load("safetensors", path)
    assert est["weights_bytes"] == loaded["held_bytes"]
    error = within(est["weights_bytes"], loaded["rss_delta"])
    print(f"safetensors estimate/measured {est['weights_bytes']}/{loaded['rss_delta']} ({error:+.3%})")


def small_gguf(path: Path) -> bytes:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_block_count(1)
    w.add_embedding_length(64)
    w.add_head_count(4)
    w.add_tensor("blk.0.attn_q.weight", np.zeros((64, 64), dtype=np.float16))
    w.add_tensor("blk.0.attn_k.weight", np.zeros((64, 64), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def tensor_info_at(data: bytes, name: str) -> int:
    """The byte just after a tensor's name in its tensor info (n_dims follows)."""
    needle = struct.pack("<Q", len(name)) + name.encode()
    at = data.rindex(needle)
    return at + len(needle)


@pytest.mark.parametrize(
    "corrupt, expected",
    [
        (lambda d, at: struct.pack_into("<I", d, at + 4 + 16, 99), 'tensor "blk.0.attn_k.weight" type is 99'),
        (lambda d, at: struct.pack_into("<I", d, at, 9), 'tensor "blk.0.attn_k.weight" n_dims is 9, expected 1..=4'),
        (lambda d, at: struct.pack_into("<Q", d, at + 4, 2**62), 'tensor "blk.0.attn_k.weight" dims'),
        (lambda d, at: struct.pack_into("<Q", d, at + 4 + 16 + 4, 2**40), 'tensor "blk.0.attn_k.weight" offset + size is 1099511627776 + 8192'),
        (lambda d, at: struct.pack_into("<Q", d, 8, 2**50), "tensor count is 1125899906842624"),
        (lambda d, at: struct.pack_into("<Q", d, 16, 2**50), "metadata count is 1125899906842624"),
        (lambda d, at: struct.pack_into("<I", d, 4, 1), "version is 1, expected 2 or 3"),
        (lambda d, at: struct.pack_into("<Q", d, 24, 2**40), "metadata entry 0 key length is 1099511627776"),
    ],
    ids=["type", "n_dims", "dims", "offset", "tensor-count", "metadata-count", "version", "key-length"],
)
def test_malformed_gguf_is_refused_with_the_field_named(tmp_path, corrupt, expected):
    good = tmp_path / "good.gguf"
    data = bytearray(small_gguf(good))
    assert estimate(good)["tensors"] == 2
    corrupt(data, tensor_info_at(data, "blk.0.attn_k.weight"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data)
    error = refused(bad)
    assert expected in error, error
    assert str(bad) in error


def test_a_cut_gguf_names_where_it_ends(tmp_path):
    data = small_gguf(tmp_path / "good.gguf")
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[: len(data) - 100])
    error = refused(bad)
    assert "offset + size" in error and "to end inside the file" in error, error


def max_rss_of(*cmd: str) -> int:
    """The peak RSS (bytes) of one command, run by a fresh Python so no other child counts."""
    probe = (
        "import resource, subprocess, sys;"
        "r = subprocess.run(sys.argv[1:], capture_output=True);"
        "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True, check=True)
    code, kib = out.stdout.split()
    return int(code), int(kib) * 1024


def test_a_big_header_is_read_in_little_memory(tmp_path):
    """Issue 15: a 100 MiB header took 1.4-2.1 GB. Under the 64 MiB cap a header streams in
    memory that does not grow with it; above the cap it is refused without being read."""
    path = tmp_path / "many.safetensors"
    n = 160_000
    entries = ",".join(
        f'"model.layers.{i}.self_attn.q_proj.weight.with.a.long.name.{"x" * 40}":'
        f'{{"dtype":"F32","shape":[1],"data_offsets":[{4 * i},{4 * i + 4}]}}'
        for i in range(n)
    )
    header = ("{" + entries + "}").encode()
    assert len(header) > 24 << 20
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        f.truncate(8 + len(header) + 4 * n)
    code, peak = max_rss_of(weights_bin(), "estimate", str(path), "--budget-ms", "600000")
    assert code == 0
    print(f"peak RSS {peak >> 20} MiB for a {len(header) >> 20} MiB header")
    assert peak < 16 << 20, f"peak RSS {peak >> 20} MiB for a {len(header) >> 20} MiB header"
    big = tmp_path / "big.safetensors"
    with open(big, "wb") as f:
        f.write(struct.pack("<Q", 100 << 20))
        f.write(b"{")
        f.truncate(8 + (100 << 20))
    assert "header length is 104857600, expected at most the 67108864 bytes header cap" in refused(big)
