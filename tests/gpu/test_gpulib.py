"""The GPU check's pure logic (gpulib.py): parsing, process matching, the checks' arithmetic and
the JSON summary. Runs anywhere: ``python -m pytest tests/gpu``."""

from __future__ import annotations

import json
import math
import os
import struct

import gpulib as g

MIB, GIB = g.MIB, g.GIB

COMPUTE_APPS = """pid, used_gpu_memory [MiB]
4242, 4608 MiB
77, 512 MiB
99, [N/A]
"""

METRICS = """# HELP modelpool_gpu_up 1 when a GPU reading is available.
# TYPE modelpool_gpu_up gauge
modelpool_gpu_up 1
modelpool_vram_used_bytes{gpu="0",uuid="GPU-abc"} 5.5e+09
modelpool_model_loaded{model="a"} 1
modelpool_model_loaded{model="b"} 0
modelpool_unloads_total{model="b",reason="pressure"} 2
modelpool_unloads_total{model="c",reason="pressure"} 1
modelpool_unloads_total{model="c",reason="released"} 4
modelpool_process_vram_bytes{pid="4242",session="s-1"} 4831838208
odd_label{msg="a \\"quoted\\", comma"} 3
malformed line here
"""


def test_parse_compute_apps_with_units_header_and_na():
    """Catches unit slips (MiB vs bytes) and crashing on the [N/A] nvidia-smi prints in VMs."""
    assert g.parse_compute_apps(COMPUTE_APPS) == {4242: 4608 * MIB, 77: 512 * MIB, 99: None}
    assert g.parse_compute_apps("4242, 100\n") == {4242: 100 * MIB}  # nounits
    assert g.parse_compute_apps("No running processes found\n") == {}


def test_parse_gpu_query():
    rows = g.parse_gpu_query("0, NVIDIA H100 80GB HBM3, GPU-1234, 81559, 1024, 580.159.04\n")
    assert rows == [
        {
            "index": 0,
            "name": "NVIDIA H100 80GB HBM3",
            "uuid": "GPU-1234",
            "total_bytes": 81559 * MIB,
            "used_bytes": 1024 * MIB,
            "driver": "580.159.04",
        }
    ]


def test_parse_size():
    assert g.parse_size("1 GiB") == GIB
    assert g.parse_size("1.5 MiB") == 3 * MIB // 2
    assert g.parse_size("12") == 12 * MIB
    assert g.parse_size("[Not Supported]") is None
    assert g.parse_size("3 parsecs") is None


def test_parse_prometheus_and_sum_by_labels():
    samples = g.parse_prometheus(METRICS)
    assert g.metric(samples, "modelpool_gpu_up") == 1.0
    assert g.metric(samples, "modelpool_vram_used_bytes", gpu="0") == 5.5e9
    assert g.metric(samples, "modelpool_unloads_total", reason="pressure") == 3.0
    assert g.metric(samples, "modelpool_unloads_total", model="c") == 5.0
    assert g.metric(samples, "modelpool_missing") is None
    odd = [s for s in samples if s.name == "odd_label"][0]
    assert odd.label("msg") == 'a "quoted", comma'
    digest = g.metrics_digest(samples)
    assert digest["modelpool_model_loaded{model=a}"] == 1.0
    assert "modelpool_process_vram_bytes{pid=4242,session=s-1}" in digest
    assert "odd_label{msg=a \"quoted\", comma}" not in digest


def test_pid_resolution_same_namespace_nspid_and_appearance():
    """In a container NVML names host pids: NSpid maps them when /proc shows them, else the
    pid that appeared at CUDA init does; never a pid already attributed to another process."""
    assert g.resolve_nvml_pid(10, [10, 11]) == (10, "same pid")
    assert g.resolve_nvml_pid(10, [5000, 11], nspids=[5000, 10]) == (5000, "NSpid")
    appeared = g.attribute_new_pid(before=[11], after=[11, 6000, 7000], known=[7000])
    assert appeared == 6000
    assert g.resolve_nvml_pid(10, [11, 6000, 7000], appeared=appeared) == (6000, "appeared at CUDA init")
    pid, why = g.resolve_nvml_pid(10, [11])
    assert pid is None and "not among" in why
    assert g.attribute_new_pid([1], [1, 2, 3]) is None  # ambiguous
    assert g.parse_nspids("Name:\tpython\nNSpid:\t812345\t17\n") == [812345, 17]
    assert g.parse_nspids("Name:\tx\n") == []


def test_sidecar_process_vram_from_state_or_metrics():
    state = {"sessions": [{"session": "s-1", "pid": 10, "vram_bytes": 5 * GIB, "source": "nvml"}]}
    assert g.sidecar_process_vram(state, [], 10) == (5 * GIB, "/v1/state sessions[pid=10].vram_bytes (nvml)")
    nested = {"processes": [{"pid": 10, "measured": {"vram": 7}}]}
    assert g.sidecar_process_vram(nested, [], 10) == (7, "/v1/state processes[pid=10].measured.vram")
    as_map = {"sessions": {"s-9": {"pid": 10, "readings": {"source": "torch", "process_vram_bytes": 9}}}}
    assert g.sidecar_process_vram(as_map, [], 10) == (9, "/v1/state sessions[pid=10].readings.process_vram_bytes (app-reported, torch)")
    # the sidecar's own figure wins over the app's relayed reading
    both = {"sessions": [{"pid": 10, "readings": {"process_vram_bytes": 9}, "vram_bytes": 11}]}
    assert g.sidecar_process_vram(both, [], 10)[0] == 11
    samples = g.parse_prometheus(METRICS)
    assert g.sidecar_process_vram({"sessions": []}, samples, 4242) == (4831838208, "/metrics modelpool_process_vram_bytes{pid=4242}")
    missing, why = g.sidecar_process_vram({"sessions": [{"pid": 11, "vram_bytes": 1}]}, samples, 10)
    assert missing is None and "pid 10" in why
    assert g.sidecar_process_vram(None, [], 10)[0] is None
    # a boolean is not a size
    assert g.sidecar_process_vram({"sessions": [{"pid": 10, "vram_bytes": True}]}, [], 10)[0] is None


def test_state_models():
    state = {"models": [{"model": "a", "state": "loaded"}, {"model": "a", "state": "unloading"}, {"x": 1}]}
    assert g.state_models(state) == {"a": {"model": "a", "state": "loaded"}}
    assert g.state_models(None) == {}


def test_two_percent_rule():
    """The issue's 2 %: of the larger value; nvidia-smi's whole-MiB rounding is tolerated."""
    assert g.within_percent(100 * GIB, 98 * GIB)
    assert not g.within_percent(100 * GIB, 97.9 * GIB)
    assert g.within_percent(4608 * MIB, 4608 * MIB + 512 * 1024)  # sub-MiB rounding
    assert not g.within_percent(0, 4 * MIB)
    assert g.within_percent(0, 0)
    assert g.percent_diff(100, 98) == 2.0
    assert g.percent_diff(0, 0) is None


def test_agreement_check_messages():
    ok = g.check_agreement(4600 * MIB, 4608 * MIB, "/v1/state")
    assert ok.ok and ok.line().startswith("PASS process_vram_agrees: sidecar 4600 MiB")
    bad = g.check_agreement(4000 * MIB, 4608 * MIB, "/v1/state")
    assert not bad.ok and "13.19 % > 2.0 %" in bad.detail
    absent = g.check_agreement(None, 4608 * MIB, "nothing found")
    assert not absent.ok and "nothing found" in absent.detail
    assert not g.check_agreement(1, None, "x").ok


def test_reclaim_time_from_samples():
    samples = [(9.0, 5 * GIB), (10.0, 5 * GIB), (10.004, 5 * GIB), (10.006, 560 * MIB), (10.2, 512 * MIB)]
    limit = 512 * MIB + g.baseline_tolerance(4 * GIB)
    assert math.isclose(g.reclaim_ms(samples, 10.0, limit), 6.0, abs_tol=1e-6)
    assert math.isclose(g.reclaim_ms(samples, 10.1, limit), 100.0, abs_tol=1e-6)
    assert g.reclaim_ms(samples, 10.0, 100 * MIB) is None
    assert g.reclaim_ms([(9.0, 1)], 10.0, 5) is None  # only samples before the release
    assert math.isclose(g.reclaim_ms([(10.0, None), (10.001, 1)], 10.0, 5), 1.0, abs_tol=1e-6)
    assert g.reclaim_ms([(10.0, 1)], 10.2, 5) is None  # already back, but sampled before
    assert g.baseline_tolerance(4 * GIB) == 64 * MIB
    assert g.baseline_tolerance(40 * GIB) == 40 * GIB // 100


def test_baseline_check():
    good = g.check_baseline(512 * MIB, 530 * MIB, 4 * GIB, 0, 3.5)
    assert good.ok and "vram_reclaim_ms=3.5" in good.detail
    cached = g.check_baseline(512 * MIB, 512 * MIB, 4 * GIB, 2 * MIB, 3.5)
    assert not cached.ok and "cache not emptied" in cached.detail
    held = g.check_baseline(512 * MIB, 4608 * MIB, 4 * GIB, 0, None)
    assert not held.ok and "4096 MiB above baseline" in held.detail and "never showed" in held.detail
    assert not g.check_baseline(None, 1, 4 * GIB, 0, 1.0).ok


def test_pressure_sizes_need_an_eviction():
    """The second allocation must not fit without an eviction and must fit after one."""
    total, used, model = 80 * GIB, 13 * GIB, 4 * GIB
    first, second = g.pressure_sizes(total, used, 70.0, 3.0, model)
    assert first % (2 * MIB) == 0 and second % (2 * MIB) == 0
    after_first = used + first
    assert after_first * 100 / total > 70.0  # above the threshold
    free = total - after_first
    assert second > free  # does not fit as things are
    assert second <= free + model  # fits once one idle model is gone
    assert (after_first - model) * 100 / total < 70.0  # one eviction ends the pressure
    assert g.pressure_sizes(total, 79 * GIB, 70.0, 3.0, model)[0] == 0


def test_pressure_and_lease_checks():
    good = g.check_pressure(["b"], ["b", "c"], True, "allocated", {"b/pressure": 1.0})
    assert good.ok
    assert not g.check_pressure([], ["b", "c"], True, "allocated", {}).ok
    assert not g.check_pressure(["b"], ["b", "c"], False, "gave up", {}).ok
    assert g.check_leased(["a"], ["b"], {"a": True}, {"a": True}).ok
    assert not g.check_leased(["a"], ["a", "b"], {"a": True}, {"a": True}).ok
    assert not g.check_leased(["a"], [], {"a": True}, {"a": False}).ok
    assert not g.check_leased([], [], {}, {}).ok


def test_candle_host_check():
    ctx = 500 * MIB
    assert g.check_candle_host(1026 * MIB, ctx + 1026 * MIB, ctx, ctx).ok
    leak = g.check_candle_host(1026 * MIB, ctx + 1026 * MIB, ctx + 1026 * MIB, ctx)
    assert not leak.ok and "still held" in leak.detail
    wrong = g.check_candle_host(1026 * MIB, ctx + 2048 * MIB, ctx, ctx)
    assert not wrong.ok and "NVML saw 2048 MiB added" in wrong.detail
    assert not g.check_candle_host(None, 1, 1, 1).ok


def test_summary_lists_every_check_and_fails_on_missing_ones():
    """A check that never ran must read as failed, never as passed by omission."""
    checks = [g.Check("process_vram_agrees", True, "fine", {"x": float("nan")})]
    summary = g.build_summary(checks, bench={"h2d_gb_per_s": 9.1, "raw_h2d_gb_per_s": 51.0}, reclaim_samples_ms=[3.0, 1.0, 2.0])
    names = [check["name"] for check in summary["checks"]]
    assert names[: len(g.CHECK_NAMES)] == list(g.CHECK_NAMES)
    assert summary["ok"] is False and summary["exit_code"] == g.EXIT_CHECK_FAILED
    assert summary["passed"] == ["process_vram_agrees"]
    assert summary["vram_reclaim_ms"] == 2.0 and summary["vram_reclaim_ms_samples"] == [3.0, 1.0, 2.0]
    assert summary["h2d_gb_per_s"] == 9.1 and summary["raw_h2d_gb_per_s"] == 51.0
    text = g.dumps(summary)
    assert json.loads(text)["checks"][0]["values"]["x"] is None  # NaN -> null, strict JSON
    all_ok = g.build_summary([g.Check(name, True, "ok") for name in g.CHECK_NAMES], extra={"notes": ["n"]})
    assert all_ok["ok"] and all_ok["exit_code"] == 0 and all_ok["notes"] == ["n"]
    setup = g.build_summary([], setup_error="no sidecar binary")
    assert setup["exit_code"] == g.EXIT_SETUP
    assert all(c["detail"] == "not run: no sidecar binary" for c in setup["checks"])


def test_median():
    assert g.median([]) is None
    assert g.median([3.0, 1.0]) == 2.0
    assert g.median([5.0, float("nan"), 1.0, 3.0]) == 3.0


def test_safetensors_writer(tmp_path):
    """The files the GPU check writes must be valid safetensors: 8-byte little-endian header
    length, JSON header, data 8-byte aligned, offsets contiguous."""
    path = tmp_path / "m.safetensors"
    tensors = [("w", "BF16", [4, 3]), ("b", "F32", [5]), ("ids", "I64", [2])]
    data = g.write_safetensors(str(path), tensors, fill=b"\x01\x02\x03")
    assert data == 24 + 20 + 16
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    assert (8 + length) % 8 == 0
    header = json.loads(raw[8 : 8 + length])
    assert header["w"] == {"dtype": "BF16", "shape": [4, 3], "data_offsets": [0, 24]}
    assert header["ids"]["data_offsets"] == [44, 60]
    assert len(raw) == 8 + length + data
    assert raw[8 + length : 8 + length + 4] == b"\x01\x02\x03\x01"
    assert g.read_safetensors_header(str(path)) == header
    sparse = tmp_path / "s.safetensors"
    assert g.write_safetensors(str(sparse), [("x", "U8", [1 << 20])]) == 1 << 20
    assert os.path.getsize(sparse) == 8 + struct.unpack("<Q", sparse.read_bytes()[:8])[0] + (1 << 20)
    try:
        from safetensors import safe_open  # type: ignore[import-not-found]
    except ImportError:
        return
    # numpy has no bfloat16: read the other tensors through the real reader.
    with safe_open(str(path), framework="np") as f:
        assert sorted(f.keys()) == ["b", "ids", "w"]
        assert f.get_tensor("b").shape == (5,)
        assert f.get_tensor("ids").shape == (2,)


# --- the checks added for the H200 run -----------------------------------------------------------


def test_tail_latency_labels_small_samples_as_maxima():
    assert g.tail_latency([]) == (None, "no samples")
    assert g.tail_latency([3.0, 1.0, 2.0]) == (3.0, "max of 3")
    values = list(range(1, 201))
    value, label = g.tail_latency(values)
    assert label == "p99 of 200" and value == 198.0


def test_check_returned_needs_99_percent_of_every_release():
    model = 4 * g.GIB
    good = {"model": "a", "held_bytes": 5 * g.GIB, "after_bytes": 1 * g.GIB}
    short = {"model": "b", "held_bytes": 5 * g.GIB, "after_bytes": 1 * g.GIB + 64 * g.MIB}
    assert g.check_returned([good], model).ok
    check = g.check_returned([good, short], model)
    assert not check.ok and "b: 0.9844" in check.detail
    assert not g.check_returned([], model).ok
    assert not g.check_returned([{"model": "c", "held_bytes": None, "after_bytes": 1}], model).ok


def test_check_fraction_wants_an_oom_past_the_cap_while_the_device_had_room():
    cap = 25 * g.GIB
    over = {"bytes": 27 * g.GIB, "ok": False, "oom": True}
    under = {"bytes": 2 * g.GIB, "ok": True}
    assert g.check_fraction(cap, over, under, 130 * g.GIB).ok
    assert not g.check_fraction(cap, dict(over, ok=True, oom=False), under, 130 * g.GIB).ok
    assert not g.check_fraction(cap, dict(over, oom=False, error="CUDA error: launch failure"), under, 130 * g.GIB).ok
    assert not g.check_fraction(cap, over, dict(under, ok=False), 130 * g.GIB).ok
    # a full device would refuse anyway: no proof of the cap
    assert not g.check_fraction(cap, over, under, 20 * g.GIB).ok
    assert not g.check_fraction(None, over, under, 130 * g.GIB).ok


def test_check_exit_and_session_listed():
    ok = {"nvml_ms": 40.0, "sidecar_ms": 900.0, "device_freed_fraction": 0.999}
    assert g.check_exit([ok, ok]).ok
    assert not g.check_exit([]).ok
    assert not g.check_exit([dict(ok, sidecar_ms=None)]).ok
    assert not g.check_exit([dict(ok, device_freed_fraction=0.5)]).ok
    assert "max of 2" in g.check_exit([ok, ok]).detail
    assert g.session_listed(None, 5)
    assert g.session_listed({"sessions": [{"pid": 5}]}, 5)
    assert g.session_listed({"sessions": [], "models": [{"pid": 5}]}, 5)
    assert not g.session_listed({"sessions": [{"pid": 6}], "models": []}, 5)


def test_check_h2d_ratio():
    assert g.check_h2d({"h2d_gb_per_s": 45.0, "raw_h2d_gb_per_s": 54.8}).ok
    assert not g.check_h2d({"h2d_gb_per_s": 8.0, "raw_h2d_gb_per_s": 54.8}).ok
    assert not g.check_h2d({}).ok


# --- the real-vLLM phase ------------------------------------------------------------------------


def test_a_skipped_check_is_never_a_pass_nor_a_failure_of_the_run():
    """Catches a machine without vLLM reported as PASS, or failing the whole GPU check."""
    skipped = g.skip(g.VLLM_CHECK, "vllm is not importable by python3: No module named 'vllm'")
    assert not skipped.ok and skipped.skipped
    assert skipped.line() == "SKIP vllm_sleep_reclaims: skipped: vllm is not importable by python3: No module named 'vllm'"
    passing = [g.Check(name, True, "fine") for name in g.CHECK_NAMES]
    summary = g.build_summary(passing + [skipped])
    assert summary["ok"] is True and summary["exit_code"] == g.EXIT_OK
    assert summary["skipped_checks"] == [g.VLLM_CHECK]
    assert g.VLLM_CHECK not in summary["passed"] and g.VLLM_CHECK not in summary["failed"]
    listed = next(c for c in summary["checks"] if c["name"] == g.VLLM_CHECK)
    assert listed["ok"] is False and listed["skipped"] is True
    # A real failure still fails the run beside a skip.
    failing = g.build_summary(passing + [skipped, g.Check(g.VLLM_CHECK + "_x", False, "bad")])
    assert failing["exit_code"] == g.EXIT_CHECK_FAILED and failing["failed"] == [g.VLLM_CHECK + "_x"]


def test_vllm_import_problem_names_the_interpreter_and_the_error():
    assert g.vllm_import_problem(0, "0.11.0\n", "", "python3") is None
    trace = "Traceback (most recent call last):\n  File \"<string>\", line 1\nModuleNotFoundError: No module named 'vllm'\n"
    assert g.vllm_import_problem(1, "", trace, "/usr/bin/python3") == (
        "vllm is not importable by /usr/bin/python3: ModuleNotFoundError: No module named 'vllm'"
    )
    assert g.vllm_import_problem(139, "", "", "py") == "vllm is not importable by py: exit 139"


def test_the_vllm_server_runs_with_sleep_mode_on_the_given_port():
    argv = g.vllm_server_argv("python3", "/tmp/m", 8123, "tiny", 0.25)
    assert argv[:3] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    text = " ".join(argv)
    for part in ("--model /tmp/m", "--port 8123", "--enable-sleep-mode", "--load-format dummy", "--gpu-memory-utilization 0.25", "--served-model-name tiny"):
        assert part in text, part


def test_the_vllm_pool_is_one_model_at_the_level_without_servers():
    text = g.vllm_pool_yaml("tiny", "http://127.0.0.1:8123", "/tmp/work/tiny-vllm", 1, 300 * MIB)
    assert "driver: {kind: Vllm, url: 'http://127.0.0.1:8123', sleepLevel: 1, processMatch: '/tmp/work/tiny-vllm'}" in text
    assert "servers" not in text
    assert "- {name: tiny, vram: 300Mi}" in text
    assert "mode: Aggressive" in text


def test_llama_weights_bytes_by_hand():
    config = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 10}
    # embed + head 2*10*8; per layer: q,o 2*64, k,v 2*8*4, mlp 3*8*16, norms 16; final norm 8.
    params = 160 + 2 * (128 + 64 + 384 + 16) + 8
    assert g.llama_weights_bytes(config) == params * 2
    assert g.llama_weights_bytes(dict(config, tie_word_embeddings=True)) == (params - 80) * 2
    # The phase's model: big enough that a level-1 sleep shows in host RAM.
    assert 200 * MIB < g.llama_weights_bytes(g.TINY_LLAMA) < 300 * MIB


def test_tiny_vocab_covers_the_config():
    vocab = g.tiny_vocab(g.TINY_LLAMA["vocab_size"])
    assert len(vocab) == g.TINY_LLAMA["vocab_size"]
    assert sorted(vocab.values()) == list(range(len(vocab)))
    assert vocab["<s>"] == g.TINY_LLAMA["bos_token_id"] and vocab["</s>"] == g.TINY_LLAMA["eos_token_id"]


def _vllm_run(level, **changes):
    run = {
        "level": level,
        "slept": True,
        "woke": True,
        "awake_bytes": 40 * GIB,
        "asleep_bytes": 2 * GIB,
        "woken_bytes": 40 * GIB,
        "rss_awake_bytes": 3 * GIB,
        "rss_asleep_bytes": 3 * GIB + 240 * MIB,
        "sidecar_asleep_ram_bytes": 230 * MIB,
    }
    run.update(changes)
    return run


def test_check_vllm_sleep_passes_on_real_figures_and_names_each_shortfall():
    weights = 230 * MIB
    ok = g.check_vllm_sleep([_vllm_run(1), _vllm_run(2, rss_asleep_bytes=None, sidecar_asleep_ram_bytes=None)], GIB, weights)
    assert ok.ok, ok.detail
    assert "level 1: 39936 MiB awake, 38912 MiB freed asleep, 39936 MiB back awake" in ok.detail
    cases = [
        (_vllm_run(2, slept=False), "level 2: the server was not asleep after the sidecar's release"),
        (_vllm_run(2, woke=False), "level 2: the server was not awake after the sidecar's acquire"),
        (_vllm_run(2, asleep_bytes=30 * GIB), "level 2: asleep freed 10240 MiB of 39936 MiB (< half)"),
        (_vllm_run(2, woken_bytes=20 * GIB), "level 2: woken holds 19456 MiB of 39936 MiB (< 90 %)"),
        (_vllm_run(1, sidecar_asleep_ram_bytes=None), "level 1: the sidecar did not count the model asleep in RAM"),
        (_vllm_run(1, rss_asleep_bytes=3 * GIB), "level 1: the server's RSS grew by 0 MiB asleep, less than half the weights (230 MiB)"),
        (_vllm_run(2, awake_bytes=GIB + 100 * MIB), "level 2: the awake server holds only 100 MiB"),
        (_vllm_run(2, asleep_bytes=None), "level 2: a device reading is missing"),
    ]
    for run, message in cases:
        check = g.check_vllm_sleep([run], GIB, weights)
        assert not check.ok and message in check.detail, (message, check.detail)
    assert not g.check_vllm_sleep([], GIB, weights).ok
    assert not g.check_vllm_sleep([_vllm_run(1)], None, weights).ok


def test_parse_ppid_and_descendants():
    assert g.parse_ppid("4242 (python3 (x) y) S 17 4242 4242 0 -1") == 17
    parents = {1: 0, 10: 1, 11: 10, 12: 10, 13: 11, 20: 1}
    assert g.descendants(10, parents) == [11, 12, 13]
    assert g.descendants(13, parents) == []


def test_the_tokenizer_json_is_what_the_tokenizers_library_reads():
    """The vllm phase writes tokenizer.json itself; where the library is installed (it comes
    with vLLM), it must read it and tokenize with it."""
    vocab = g.tiny_vocab(16)
    spec = g.word_level_tokenizer(vocab)
    assert [t["content"] for t in spec["added_tokens"]] == ["<unk>", "<s>", "</s>"]
    assert spec["model"] == {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return
    tokenizer = Tokenizer.from_str(json.dumps(spec))
    assert tokenizer.encode("t3 t4 nope").ids == [3, 4, 0]
