#!/usr/bin/env python3
"""The GPU check's orchestrator, started by ``tests/gpu/run.sh`` once it has found a GPU.

Phases (each bounded in time; the whole run stays under ``--budget`` seconds):

1. ``bench``: ``modelpool-candle-host --bench-h2d`` on a 1 GiB safetensors file: the load path's
   host-to-device GB/s next to a raw pinned copy of the same bytes.
2. ``candle-host``: the reference host serves the Http driver's API on the GPU; a load must add
   what it reports to its process's NVML figure and an unload must take it away again.
3. ``aggressive``: the sidecar on ``pool-aggressive.yaml`` and the torch app (``gpu_app.py``, SDK
   seed API); with a model held, the sidecar's per-process VRAM must agree with
   ``nvidia-smi --query-compute-apps`` within 2 %; after each release the app's VRAM must return
   to its baseline (torch cache emptied), timed from the release to NVML showing it
   (``vram_reclaim_ms``).
4. ``pressure``: the sidecar on ``pool-cache.yaml``; the app holds a lease on ``a`` and leaves
   ``b`` and ``c`` idle in the cache; another tenant (``tenant.py``) pushes device use above the
   pool's pressure threshold and then needs more than is free: the sidecar must evict idle
   models so that the tenant's allocation succeeds, and must not evict ``a``.

5. ``vllm`` (optional): when ``python -c 'import vllm'`` works, a tiny vLLM server (random
   weights, ``--enable-sleep-mode``, ``VLLM_SERVER_DEV_MODE=1``) behind the sidecar's ``Vllm``
   driver, once per sleep level: a release through the sidecar puts it to sleep and an acquire
   wakes it, and the device's VRAM must show it (check ``vllm_sleep_reclaims``); at level 1 the
   sidecar must count the model asleep in RAM and the server's RSS must grow by the weights. No
   vLLM: the check is SKIP with the reason, never PASS. It has its own time
   (``--vllm-budget``).

Throughout, a sampler writes NVML readings and the sidecar's metrics to ``timeline.jsonl``, and at
each step NVML, ``nvidia-smi --query-compute-apps`` and the sidecar's ``/metrics`` and
``/v1/state`` are recorded side by side in ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import gpulib as g
from nvml import Nvml, smi, smi_compute_apps

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent

#: Must equal ``spec.policy.pressure.vramPercent`` in pool-cache.yaml (a test checks it).
PRESSURE_PERCENT = 70.0
#: How far above the threshold the tenant's first allocation takes the device.
PRESSURE_MARGIN_PERCENT = 3.0
#: Size of each of the app's models (pool files declare 4Gi).
MODEL_MIB = 4096
MODELS = ("a", "b", "c")
#: pool-aggressive.yaml's limits.vram + baseline.vram: the SDK's per-process cap (a test checks it).
VRAM_CAP_BYTES = (24 + 1) << 30
#: Extra hold/release cycles of one model for the reclaim-time tail (budget permitting).
RECLAIM_CYCLES = int(os.environ.get("GPU_CHECK_RECLAIM_CYCLES", "30"))
#: Apps killed while holding a model, for the exit-time reclaim.
EXIT_REPEATS = int(os.environ.get("GPU_CHECK_EXIT_REPEATS", "3"))
#: The reference host's model: 8 BF16 tensors, 1 GiB in all (``GPU_CHECK_BENCH_MIB`` changes
#: the total, e.g. for the dry run with fakes).
_BENCH_MIB = max(8, int(os.environ.get("GPU_CHECK_BENCH_MIB", "1024")))
BENCH_TENSORS = [(f"layers.{i}.weight", "BF16", [_BENCH_MIB * 8, 8192]) for i in range(8)]

T0 = time.monotonic()


def log(message: str) -> None:
    print(f"[gpu {time.monotonic() - T0:6.1f}s] {message}", flush=True)


class OutOfTime(Exception):
    pass


class StepFailed(Exception):
    pass


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def need(self, seconds: float, what: str) -> None:
        if self.left() < seconds:
            raise OutOfTime(f"{what} needs about {seconds:.0f} s, {max(0.0, self.left()):.0f} s of the budget left")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http(method: str, url: str, timeout: float = 5.0) -> Tuple[int, str]:
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")


def _proc_table() -> Dict[int, int]:
    """pid -> parent pid of every process in /proc."""
    table: Dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                table[int(entry.name)] = g.parse_ppid((entry / "stat").read_text())
            except (OSError, ValueError):
                continue
    return table


def nspids(pid: int) -> List[int]:
    try:
        return g.parse_nspids(Path(f"/proc/{pid}/status").read_text())
    except OSError:
        return []


# --- child processes ----------------------------------------------------------------------------


class Child:
    """A started process; its stderr (and non-JSON stdout) goes to ``{out}/{name}.log``; with
    ``events`` each JSON stdout line is an event."""

    all: List["Child"] = []

    def __init__(self, name: str, argv: Sequence[str], out: Path, env: Optional[Dict[str, str]] = None, events: bool = False) -> None:
        self.name = name
        self.log_path = out / f"{name}.log"
        self._log = open(self.log_path, "a", buffering=1)
        self._log.write(f"$ {' '.join(map(str, argv))}\n")
        self.events: List[Dict[str, Any]] = []
        self._cond = threading.Condition()
        self._reader_done = False
        self.proc = subprocess.Popen(
            [str(arg) for arg in argv],
            stdin=subprocess.PIPE if events else subprocess.DEVNULL,
            stdout=subprocess.PIPE if events else self._log,
            stderr=self._log,
            env=env,
            text=True,
            bufsize=1,
        )
        Child.all.append(self)
        if events:
            threading.Thread(target=self._read, daemon=True).start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                self._log.write(f"[stdout] {line}")
                continue
            if not isinstance(event, dict):
                continue
            self._log.write(f"[event] {line}")
            with self._cond:
                self.events.append(event)
                self._cond.notify_all()
        self.proc.wait()
        with self._cond:
            self._reader_done = True
            self._cond.notify_all()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 15) -> str:
        try:
            return "".join(self.log_path.read_text(errors="replace").splitlines(True)[-lines:])
        except OSError:
            return ""

    def wait_event(self, match: Callable[[Dict[str, Any]], bool], timeout: float, what: str, since: int = 0) -> Dict[str, Any]:
        """The first event after index ``since`` that ``match``es; an ``error`` event, the
        process ending or ``timeout`` raise :class:`StepFailed`."""
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                for event in self.events[since:]:
                    if event.get("event") == "error":
                        raise StepFailed(f"{self.name} failed during {what}: {event.get('message')}\n{event.get('trace', '')}")
                    if match(event):
                        return event
                left = end - time.monotonic()
                if left <= 0 or self._reader_done:
                    break
                self._cond.wait(min(left, 0.5))
        state = f"exited with {self.proc.poll()}" if self._reader_done else f"no answer in {timeout:.0f} s"
        raise StepFailed(f"{self.name}: {what}: {state}; log tail:\n{self.tail()}")

    def command(self, timeout: float, **command: Any) -> Dict[str, Any]:
        """Sends a command to an event-speaking child and waits for its answer (the next event
        about the same model that is not a load/free notification)."""
        since = len(self.events)
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        answers = {"hold": "held", "release": "released", "use": "used", "stats": "stats", "alloc": "alloc"}
        want = answers.get(command.get("cmd", ""), "")
        return self.wait_event(
            lambda e: e.get("event") == want and (command.get("model") is None or e.get("model") == command.get("model")),
            timeout,
            f"{command}",
            since,
        )

    def events_of(self, kind: str, since: int = 0) -> List[Dict[str, Any]]:
        with self._cond:
            return [e for e in self.events[since:] if e.get("event") == kind]

    def stop(self, grace: float = 5.0) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "exit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.stdin.close()
            except (BrokenPipeError, OSError, ValueError):
                pass
        else:
            if self.alive():
                self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=3)
        self._log.write(f"[exit] {self.proc.returncode}\n")


class Sidecar(Child):
    def __init__(self, binary: str, pool: Path, out: Path, work: Path, label: str, heartbeat_ms: int = 500) -> None:
        self.api_port = free_port()
        self.metrics_port = free_port()
        self.socket = work / f"sidecar-{label}.sock"
        argv = [
            binary,
            "--pool", pool,
            "--socket", self.socket,
            "--listen", f"127.0.0.1:{self.api_port}",
            "--metrics-listen", f"127.0.0.1:{self.metrics_port}",
            "--tick-ms", "100",
            "--heartbeat-ms", str(heartbeat_ms),
            "--shutdown-grace-ms", "2000",
        ]  # fmt: skip
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "info"), NO_COLOR="1")
        super().__init__(f"sidecar-{label}", argv, out, env=env)

    def wait_ready(self, timeout: float = 20.0) -> None:
        end = time.monotonic() + timeout
        last = ""
        while time.monotonic() < end:
            if not self.alive():
                raise StepFailed(f"{self.name} exited with {self.proc.returncode}; log tail:\n{self.tail()}")
            try:
                status, body = http("GET", f"http://127.0.0.1:{self.metrics_port}/readyz", 1.0)
                if status == 200 and self.socket.exists():
                    return
                last = f"/readyz {status} {body.strip()[:200]}"
            except OSError as error:
                last = repr(error)
            time.sleep(0.1)
        raise StepFailed(f"{self.name} not ready in {timeout:.0f} s ({last}); log tail:\n{self.tail()}")

    def state(self) -> Optional[Dict[str, Any]]:
        try:
            status, body = http("GET", f"http://127.0.0.1:{self.api_port}/v1/state", 3.0)
            return json.loads(body) if status == 200 else {"_status": status, "_body": body[:500]}
        except (OSError, ValueError) as error:
            return {"_error": repr(error)}

    def metrics_text(self) -> str:
        try:
            return http("GET", f"http://127.0.0.1:{self.metrics_port}/metrics", 3.0)[1]
        except OSError:
            return ""

    def post(self, path: str, body: Dict[str, Any], timeout: float = 130.0) -> Tuple[int, Dict[str, Any]]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.api_port}{path}", method="POST", data=json.dumps(body).encode(), headers={"content-type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status, text = response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            status, text = error.code, error.read().decode(errors="replace")
        try:
            return status, json.loads(text or "{}")
        except ValueError:
            return status, {"_body": text[:500]}


# --- the run ------------------------------------------------------------------------------------


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="modelpool-gpu-"))
        self.models_dir = self.work / "models"
        self.models_dir.mkdir()
        self.deadline = Deadline(args.budget)
        self.nvml = Nvml(args.device)
        self.checks: List[g.Check] = []
        self.side_by_side: List[Dict[str, Any]] = []
        self.reclaim_ms: List[float] = []
        self.releases: List[Dict[str, Any]] = []
        self.exits: List[Dict[str, Any]] = []
        self.notes: List[str] = []
        self.phases: Dict[str, Dict[str, Any]] = {}
        self.bench: Dict[str, Any] = {}
        self.device: Dict[str, Any] = {}
        self.pid_roles: Dict[int, str] = {}
        self.known_nvml_pids: set = set()
        self.sidecar: Optional[Sidecar] = None
        self.phase = "setup"
        self._timeline = open(self.out / "timeline.jsonl", "w", buffering=1)
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)

    # --- readings ---

    def _sample(self) -> None:
        interval = 0.25 if self.nvml.process_backend != "nvidia-smi" else 0.5
        while not self._stop.wait(interval):
            row: Dict[str, Any] = {"t": time.monotonic(), "phase": self.phase}
            used, total = self.nvml.device()
            row["device_used_bytes"], row["device_total_bytes"] = used, total
            try:
                row["processes"] = {str(pid): value for pid, value in self.nvml.processes().items()}
            except Exception as error:  # nvidia-smi hiccup
                row["processes_error"] = repr(error)
            sidecar = self.sidecar
            if sidecar is not None and sidecar.alive():
                row["sidecar"] = g.metrics_digest(g.parse_prometheus(sidecar.metrics_text()))
            self._timeline.write(json.dumps(row) + "\n")

    def resolve_pid(self, local_pid: int, before: set, role: str, timeout: float = 10.0) -> Optional[int]:
        end = time.monotonic() + timeout
        why = ""
        while time.monotonic() < end:
            processes = self.nvml.processes()
            appeared = g.attribute_new_pid(before, processes, self.known_nvml_pids)
            pid, how = g.resolve_nvml_pid(local_pid, processes, nspids(local_pid), appeared)
            if pid is not None:
                self.known_nvml_pids.add(pid)
                self.pid_roles[pid] = role
                self.notes.append(f"{role}: local pid {local_pid} is NVML pid {pid} ({how})")
                return pid
            why = how
            time.sleep(0.2)
        self.notes.append(f"{role}: local pid {local_pid} not found in NVML's processes: {why}")
        return None

    def process_bytes(self, nvml_pid: Optional[int]) -> Optional[int]:
        if nvml_pid is None:
            return None
        return self.nvml.processes().get(nvml_pid)

    def stable_process_bytes(self, nvml_pid: Optional[int], tries: int = 10) -> Optional[int]:
        """The process's NVML bytes once two readings 100 ms apart agree."""
        last = self.process_bytes(nvml_pid)
        for _ in range(tries):
            time.sleep(0.1)
            now = self.process_bytes(nvml_pid)
            if now == last:
                return now
            last = now
        return last

    def snapshot(self, label: str, app_pids: Sequence[int] = ()) -> Dict[str, Any]:
        """NVML, nvidia-smi and the sidecar side by side, now."""
        entry: Dict[str, Any] = {"label": label, "phase": self.phase, "t": time.monotonic()}
        used, total = self.nvml.device()
        entry["nvml"] = {
            "backend": self.nvml.process_backend,
            "device_used_bytes": used,
            "device_total_bytes": total,
            "processes": {str(pid): value for pid, value in self.nvml.processes().items()},
        }
        try:
            csv, apps = smi_compute_apps(self.args.device)
            entry["nvidia_smi_compute_apps"] = {"csv": csv, "bytes_by_pid": {str(k): v for k, v in apps.items()}}
        except Exception as error:
            entry["nvidia_smi_compute_apps"] = {"error": repr(error)}
        entry["roles"] = {str(pid): role for pid, role in self.pid_roles.items()}
        if self.sidecar is not None:
            text = self.sidecar.metrics_text()
            (self.out / f"metrics-{label}.txt").write_text(text)
            samples = g.parse_prometheus(text)
            state = self.sidecar.state()
            entry["sidecar_metrics"] = g.metrics_digest(samples)
            entry["sidecar_state"] = state
            entry["sidecar_process_vram"] = {
                str(pid): dict(zip(("bytes", "where"), g.sidecar_process_vram(state, samples, pid))) for pid in app_pids
            }
        self.side_by_side.append(entry)
        smi_part = entry.get("nvidia_smi_compute_apps", {}).get("bytes_by_pid", {})
        log(
            f"snapshot {label}: NVML device {((used or 0) / g.GIB):.2f}/{((total or 0) / g.GIB):.2f} GiB; "
            f"nvidia-smi {{{', '.join(f'{self.pid_roles.get(int(p), p)}: {(v or 0) / g.MIB:.0f} MiB' for p, v in smi_part.items())}}}; "
            f"sidecar {entry.get('sidecar_process_vram', {})}"
        )
        return entry

    # --- phases ---

    def phase_device(self) -> None:
        text = smi(["--query-gpu=index,name,uuid,memory.total,memory.used,driver_version", "--format=csv,noheader,nounits"])
        gpus = g.parse_gpu_query(text)
        self.device = next((gpu for gpu in gpus if gpu["index"] == self.args.device), gpus[0] if gpus else {})
        self.device["nvml_backend"] = self.nvml.backend
        self.device["nvml_process_backend"] = self.nvml.process_backend
        self.device["python"] = sys.version.split()[0]
        log(f"device: {self.device}")

    def phase_bench(self) -> None:
        self.phase = "bench"
        self.deadline.need(40, "the H2D benchmark")
        file = self.models_dir / "bench.safetensors"
        started = time.monotonic()
        data_bytes = g.write_safetensors(str(file), BENCH_TENSORS, fill=bytes(range(1, 252)))
        log(f"wrote {file} ({data_bytes / g.GIB:.2f} GiB of tensors) in {time.monotonic() - started:.1f} s")
        result = subprocess.run(
            [self.args.candle_host, "--bench-h2d", str(file), "--bench-repeats", "3"],
            capture_output=True, text=True, timeout=min(120.0, self.deadline.left()),
        )  # fmt: skip
        (self.out / "candle-host-bench.log").write_text(result.stderr)
        lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
        if not lines:
            raise StepFailed(f"--bench-h2d exited {result.returncode} without JSON: {result.stderr[-800:]}")
        self.bench = json.loads(lines[-1])
        self.bench["exit_code"] = result.returncode
        self.checks.append(g.check_h2d(self.bench))
        log(
            f"bench: load path {self.bench.get('h2d_gb_per_s')} GB/s (first {self.bench.get('h2d_first_gb_per_s')}), "
            f"raw pinned {self.bench.get('raw_h2d_gb_per_s')} GB/s, verified {self.bench.get('verified')}"
        )

    def phase_candle_host(self) -> None:
        self.phase = "candle-host"
        self.deadline.need(30, "the reference host phase")
        if not (self.models_dir / "bench.safetensors").exists():
            g.write_safetensors(str(self.models_dir / "bench.safetensors"), BENCH_TENSORS, fill=bytes(range(1, 252)))
        port = free_port()
        before = set(self.nvml.processes())
        host = Child("candle-host", [self.args.candle_host, "--models-dir", self.models_dir, "--listen", f"127.0.0.1:{port}"], self.out)
        base = f"http://127.0.0.1:{port}"
        values: Dict[str, Any] = {}
        try:
            health: Dict[str, Any] = {}
            end = time.monotonic() + 30
            while time.monotonic() < end:
                if not host.alive():
                    raise StepFailed(f"candle-host exited {host.proc.returncode}: {host.tail()}")
                try:
                    status, body = http("GET", f"{base}/health", 1.0)
                    if status == 200:
                        health = json.loads(body)
                        break
                except OSError:
                    pass
                time.sleep(0.1)
            values["health"] = health
            if not health.get("gpu", {}).get("up"):
                raise StepFailed(f"candle-host found no GPU: {health.get('gpu')}")
            nvml_pid = self.resolve_pid(host.pid, before, "candle-host")
            self.nvml.validate_processes()
            process_before = self.stable_process_bytes(nvml_pid)
            status, body = http("POST", f"{base}/models/bench/load", 60.0)
            loaded = json.loads(body)
            values["load"] = loaded
            if status != 200:
                raise StepFailed(f"load answered {status}: {body[:500]}")
            process_loaded = self.stable_process_bytes(nvml_pid)
            self.snapshot("candle-host-loaded")
            status, body = http("POST", f"{base}/models/bench/unload", 30.0)
            values["unload"] = json.loads(body)
            process_after = self.stable_process_bytes(nvml_pid)
            self.snapshot("candle-host-unloaded")
            check = g.check_candle_host(loaded.get("vram_bytes"), process_loaded, process_after, process_before)
            if self.bench.get("verified") is False:
                check.ok = False
                check.detail += "; the benchmark read back bytes that differ from the file"
            check.values.update(values)
            self.checks.append(check)
        finally:
            host.stop()

    def start_app(self, sidecar: Sidecar, label: str) -> Tuple[Child, Optional[int], Dict[str, Any]]:
        env = dict(os.environ)
        env["MODELPOOL_SOCKET"] = str(sidecar.socket)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = os.pathsep.join([str(HERE)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        before = set(self.nvml.processes())
        models = ",".join(f"{name}:{MODEL_MIB}" for name in MODELS)
        app = Child(f"app-{label}", [sys.executable, HERE / "gpu_app.py", "--models", models, "--device", str(self.args.device)], self.out, env=env, events=True)
        ready = app.wait_event(lambda e: e.get("event") == "ready", min(120.0, self.deadline.left()), "start (import torch, CUDA init, SDK)")
        log(f"app-{label} ready: pid {app.pid}, torch {ready.get('torch')}, sdk {ready.get('sdk_file')}")
        self.device.setdefault("torch", f"{ready.get('torch')} (CUDA {ready.get('cuda')})")
        self.device.setdefault("sdk", ready.get("sdk_file"))
        if ready.get("sdk_mode") == "local":
            raise StepFailed(
                f"the SDK did not connect to the sidecar at {sidecar.socket} and runs in local mode "
                f"(see {app.log_path.name})"
            )
        nvml_pid = self.resolve_pid(app.pid, before, f"app-{label}")
        return app, nvml_pid, ready

    def session_seen(self, sidecar: Sidecar, pid: int) -> str:
        state = sidecar.state() or {}
        sessions = state.get("sessions")
        if isinstance(sessions, list) and any(isinstance(s, dict) and s.get("pid") == pid for s in sessions):
            return "yes (in /v1/state sessions)"
        count = g.metric(g.parse_prometheus(sidecar.metrics_text()), "modelpool_sessions")
        return f"modelpool_sessions={count}"

    def reclaim(self, app: Child, nvml_pid: Optional[int], model: str, baseline: Optional[int]) -> Tuple[Optional[float], Optional[int], Optional[int]]:
        """Releases ``model`` and times NVML until the app's process is back at its baseline;
        records the bytes freed for ``unload_returns_99_percent``."""
        held = self.stable_process_bytes(nvml_pid)
        limit = None if baseline is None else baseline + g.baseline_tolerance(MODEL_MIB << 20)
        samples: List[Tuple[float, Optional[int]]] = []
        stop = threading.Event()

        def poll() -> None:
            pause = 0.001 if self.nvml.process_backend != "nvidia-smi" else 0.0
            while not stop.is_set():
                samples.append((time.monotonic(), self.process_bytes(nvml_pid)))
                if pause:
                    time.sleep(pause)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        try:
            released = app.command(30.0, cmd="release", model=model)
            t_release = float(released["t_release"])
            end = time.monotonic() + 15.0
            while limit is not None and time.monotonic() < end and g.first_at_or_below(samples, t_release, limit) is None:
                time.sleep(0.01)
        finally:
            stop.set()
            poller.join(timeout=5)
        took = None if limit is None else g.reclaim_ms(samples, t_release, limit)
        stats = app.command(10.0, cmd="stats")
        after = self.stable_process_bytes(nvml_pid)
        self.releases.append({"model": model, "held_bytes": held, "after_bytes": after, "baseline_bytes": baseline, "reclaim_ms": took})
        log(f"release {model}: back to baseline after {took} ms; process {after} B vs baseline {baseline} B; torch reserved {stats.get('reserved_bytes')}")
        return took, after, stats.get("reserved_bytes")

    def phase_aggressive(self) -> None:
        self.phase = "aggressive"
        self.deadline.need(60, "the aggressive phase")
        sidecar = self.sidecar = Sidecar(self.args.sidecar, HERE / "pool-aggressive.yaml", self.out, self.work, "aggressive")
        app: Optional[Child] = None
        try:
            sidecar.wait_ready()
            app, nvml_pid, ready = self.start_app(sidecar, "aggressive")
            baseline = self.stable_process_bytes(nvml_pid)
            self.phases["aggressive"] = {"app_pid": app.pid, "nvml_pid": nvml_pid, "baseline_bytes": baseline, "ready": ready}
            log(f"app baseline {baseline} B (NVML pid {nvml_pid}); sidecar session: {self.session_seen(sidecar, app.pid)}")

            app.command(60.0, cmd="hold", model="a")
            time.sleep(1.0)  # a few sidecar ticks: it measures the process
            self.snapshot("aggressive-holding-a", [app.pid])
            agreement: Optional[g.Check] = None
            for _ in range(12):
                first = smi_compute_apps(self.args.device)[1].get(nvml_pid) if nvml_pid else None
                state = sidecar.state()
                samples = g.parse_prometheus(sidecar.metrics_text())
                second = smi_compute_apps(self.args.device)[1].get(nvml_pid) if nvml_pid else None
                sidecar_bytes, where = g.sidecar_process_vram(state, samples, app.pid)
                agreement = g.check_agreement(sidecar_bytes, second, where)
                agreement.values["nvml_pid"] = nvml_pid
                agreement.values["app_pid"] = app.pid
                if agreement.ok and first == second:
                    break
                time.sleep(0.25)
            assert agreement is not None
            self.checks.append(agreement)
            log(agreement.line())

            baseline_checks = []
            for model in ("a", "b"):
                if model != "a":
                    app.command(60.0, cmd="hold", model=model)
                    time.sleep(0.3)
                took, after, reserved = self.reclaim(app, nvml_pid, model, baseline)
                if took is not None:
                    self.reclaim_ms.append(took)
                baseline_checks.append(g.check_baseline(baseline, after, MODEL_MIB << 20, reserved, took))
                self.snapshot(f"aggressive-released-{model}", [app.pid])
            worst = next((check for check in baseline_checks if not check.ok), baseline_checks[-1])
            per_release = [dict(check.values) for check in baseline_checks]
            worst.values["per_release"] = per_release
            self.checks.append(worst)
            log(worst.line())

            # More hold/release cycles for the reclaim-time tail, while the budget allows (the
            # pressure and exit phases need about 110 s after this one).
            for _ in range(RECLAIM_CYCLES):
                if self.deadline.left() < 110:
                    self.notes.append(f"reclaim cycles cut at {len(self.reclaim_ms)} samples to keep the budget")
                    break
                app.command(60.0, cmd="hold", model="c")
                took, _, _ = self.reclaim(app, nvml_pid, "c", baseline)
                if took is not None:
                    self.reclaim_ms.append(took)
            worst.values["reclaim_samples_ms"] = list(self.reclaim_ms)
            returned = g.check_returned(self.releases, MODEL_MIB << 20)
            self.checks.append(returned)
            log(returned.line())

            # The SDK's torch.cuda.set_per_process_memory_fraction (ceiling + baseline): real torch
            # must refuse one allocation past it although the device has room, and allow one below.
            cap = ready.get("vram_cap_bytes") or VRAM_CAP_BYTES
            over = app.command(60.0, cmd="alloc", bytes=cap + (2 << 30))
            under = app.command(60.0, cmd="alloc", bytes=2 << 30)
            fraction = g.check_fraction(cap, over, under, over.get("device_free_before"))
            fraction.values["fraction_reported_by_torch"] = over.get("fraction")
            self.checks.append(fraction)
            log(fraction.line())
            samples = g.parse_prometheus(sidecar.metrics_text())
            self.phases["aggressive"]["sidecar_reclaim_seconds"] = {
                "sum": g.metric(samples, "modelpool_reclaim_duration_seconds_sum"),
                "count": g.metric(samples, "modelpool_reclaim_duration_seconds_count"),
            }
        finally:
            if app is not None:
                app.stop()
            sidecar.stop()
            self.sidecar = None

    def phase_exit(self) -> None:
        """Apps killed with SIGKILL while holding a model: the time until NVML no longer lists
        their memory (the driver frees a dead process's allocations) and until the sidecar drops
        the session and its ledger entry."""
        self.phase = "exit"
        self.deadline.need(25, "the exit phase")
        sidecar = self.sidecar = Sidecar(self.args.sidecar, HERE / "pool-aggressive.yaml", self.out, self.work, "exit")
        try:
            sidecar.wait_ready()
            for index in range(EXIT_REPEATS):
                if index and self.deadline.left() < 20:
                    self.notes.append(f"exit phase cut at {index} kills to keep the budget")
                    break
                app, nvml_pid, _ = self.start_app(sidecar, f"exit-{index}")
                try:
                    app.command(60.0, cmd="hold", model="a")
                    time.sleep(0.5)
                    held = self.stable_process_bytes(nvml_pid)
                    device_before, _ = self.nvml.device()
                    killed_at = time.monotonic()
                    app.proc.kill()
                    nvml_ms = sidecar_ms = None
                    end = killed_at + 15.0
                    while time.monotonic() < end and (nvml_ms is None or sidecar_ms is None):
                        now = time.monotonic()
                        if nvml_ms is None and not self.process_bytes(nvml_pid):
                            nvml_ms = (now - killed_at) * 1000.0
                        if sidecar_ms is None and not g.session_listed(sidecar.state(), app.pid):
                            sidecar_ms = (now - killed_at) * 1000.0
                        time.sleep(0.002)
                    app.proc.wait(timeout=5)
                    time.sleep(0.2)
                    device_after, _ = self.nvml.device()
                    freed = None
                    if held and device_before is not None and device_after is not None:
                        freed = (device_before - device_after) / held
                    entry = {"held_bytes": held, "device_before": device_before, "device_after": device_after,
                             "device_freed_fraction": freed, "nvml_ms": nvml_ms, "sidecar_ms": sidecar_ms}  # fmt: skip
                    self.exits.append(entry)
                    log(f"kill #{index}: NVML freed after {nvml_ms} ms, sidecar dropped the session after {sidecar_ms} ms, device got back {freed}")
                finally:
                    if app.alive():
                        app.proc.kill()
            self.snapshot("exit-after-kills")
            check = g.check_exit(self.exits)
            self.checks.append(check)
            log(check.line())
        finally:
            sidecar.stop()
            self.sidecar = None

    def phase_pressure(self) -> None:
        self.phase = "pressure"
        self.deadline.need(70, "the pressure phase")
        sidecar = self.sidecar = Sidecar(self.args.sidecar, HERE / "pool-cache.yaml", self.out, self.work, "cache")
        app: Optional[Child] = None
        tenant: Optional[Child] = None
        info: Dict[str, Any] = {}
        self.phases["pressure"] = info
        try:
            sidecar.wait_ready()
            app, nvml_pid, _ = self.start_app(sidecar, "cache")
            app.command(60.0, cmd="hold", model="a")
            for model in ("b", "c"):
                app.command(60.0, cmd="hold", model=model)
                app.command(30.0, cmd="release", model=model)
            time.sleep(1.0)
            stats = app.command(10.0, cmd="stats")
            models = g.state_models(sidecar.state())
            idle = [m for m in ("b", "c") if m in stats.get("alive", [])]
            info["before"] = {"app_alive": stats.get("alive"), "sidecar_models": models}
            log(f"pressure setup: app holds {stats.get('alive')}, leased ['a'], idle {idle}; sidecar sees {sorted(models)}")
            self.snapshot("pressure-idle-cached", [app.pid])
            if idle != ["b", "c"]:
                self.notes.append(f"Cache mode did not keep b and c loaded after release (alive: {stats.get('alive')})")

            used, total = self.nvml.device()
            if used is None or total is None:
                raise StepFailed("no NVML device reading")
            if used * 100.0 / total >= PRESSURE_PERCENT:
                raise StepFailed(f"the device is already {used * 100.0 / total:.1f} % used before the tenant starts")
            first, second = g.pressure_sizes(total, used, PRESSURE_PERCENT, PRESSURE_MARGIN_PERCENT, MODEL_MIB << 20)
            # The tenant's own CUDA context (~0.5 GiB) also counts: keep the first step below
            # what is free, the second a bit beyond.
            info.update({"device_used_before": used, "device_total": total, "tenant_first_bytes": first, "tenant_second_bytes": second})
            freed_mark = len(app.events)
            unloads_before = self._unloads(sidecar)
            before = set(self.nvml.processes())
            tenant = Child(
                "tenant",
                [sys.executable, HERE / "tenant.py", "--first", str(first), "--second", str(second), "--timeout", "45", "--device", str(self.args.device)],
                self.out,
                events=True,
            )
            tenant.wait_event(lambda e: e.get("event") == "ready", 90.0, "start")
            self.resolve_pid(tenant.pid, before, "tenant", timeout=5.0)
            pressure = tenant.wait_event(lambda e: e.get("event") == "pressure", 30.0, "first allocation")
            log(f"tenant took the device to {pressure.get('used_percent', 0):.1f} % (threshold {PRESSURE_PERCENT} %)")
            self.snapshot("pressure-tenant-first", [app.pid])
            done = tenant.wait_event(lambda e: e.get("event") in ("allocated", "gave_up"), 60.0, "second allocation")
            tenant_ok = done.get("event") == "allocated"
            tenant_detail = (
                f"allocated {second / g.GIB:.2f} GiB after {done.get('waited_ms', 0):.0f} ms"
                if tenant_ok
                else f"gave up after {done.get('waited_ms', 0):.0f} ms: {done.get('error')}"
            )
            time.sleep(0.5)
            self.snapshot("pressure-tenant-second", [app.pid])
            freed = [e.get("model") for e in app.events_of("freed", freed_mark)]
            stats = app.command(10.0, cmd="stats")
            used_a = app.command(10.0, cmd="use", model="a")
            models = g.state_models(sidecar.state())
            unloads_after = self._unloads(sidecar)
            reasons = {key: unloads_after.get(key, 0.0) - unloads_before.get(key, 0.0) for key in unloads_after}
            evicted = sorted(set(freed) | {m for m in ("b", "c") if m in idle and m not in stats.get("alive", [])})
            # The sidecar's view of "a" when its state lists models; the app's view always.
            a_loaded_sidecar = True
            if models:
                a_loaded_sidecar = "a" in models and models["a"].get("state") in (None, "loaded", "loading")
            info.update({"tenant": done, "freed_in_app": freed, "app_alive_after": stats.get("alive"), "sidecar_models_after": models, "unloads_by_reason": reasons})
            self.checks.append(g.check_pressure(evicted, idle, tenant_ok, tenant_detail, reasons))
            self.checks.append(
                g.check_leased(
                    ["a"],
                    evicted,
                    {"a": "a" in stats.get("alive", []) and bool(a_loaded_sidecar)},
                    {"a": bool(used_a.get("ok"))},
                )
            )
            for check in self.checks[-2:]:
                log(check.line())
        finally:
            if tenant is not None:
                tenant.stop()
            if app is not None:
                app.stop()
            sidecar.stop()
            self.sidecar = None

    def _unloads(self, sidecar: Sidecar) -> Dict[str, float]:
        samples = g.parse_prometheus(sidecar.metrics_text())
        out: Dict[str, float] = {}
        for sample in samples:
            if sample.name == "modelpool_unloads_total":
                key = f"{sample.label('model')}/{sample.label('reason')}"
                out[key] = out.get(key, 0.0) + sample.value
        return out

    # --- the real vLLM (optional) ---

    def phase_vllm(self) -> None:
        probe = subprocess.run([sys.executable, "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True, timeout=180)
        problem = g.vllm_import_problem(probe.returncode, probe.stdout, probe.stderr, sys.executable)
        if problem:
            self.checks.append(g.skip(g.VLLM_CHECK, problem))
            log(self.checks[-1].line())
            return
        deadline = Deadline(self.args.vllm_budget)
        self.phase = "vllm"
        info: Dict[str, Any] = {"vllm_version": probe.stdout.strip()}
        self.phases.setdefault("vllm", {}).update(info)
        model_dir = self.work / "tiny-vllm"
        model_dir.mkdir()
        (model_dir / "config.json").write_text(json.dumps(g.TINY_LLAMA))
        vocab = g.tiny_vocab(g.TINY_LLAMA["vocab_size"])
        (model_dir / "tokenizer.json").write_text(json.dumps(g.word_level_tokenizer(vocab)))
        (model_dir / "tokenizer_config.json").write_text(
            json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "model_max_length": 512})
        )
        base, _total = self.nvml.device()
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = dict(os.environ, VLLM_SERVER_DEV_MODE="1", VLLM_NO_USAGE_STATS="1", HF_HUB_OFFLINE="1")
        server = Child("vllm", g.vllm_server_argv(sys.executable, str(model_dir), port, "tiny", 0.25), self.out, env=env)
        runs: List[Dict[str, Any]] = []
        sidecar: Optional[Sidecar] = None
        try:
            while True:
                if not server.alive():
                    raise StepFailed(f"the vLLM server exited with {server.proc.returncode}; log tail:\n{server.tail(30)}")
                deadline.need(10, "the vLLM server to start")
                try:
                    if http("GET", f"{url}/health", 2.0)[0] == 200:
                        break
                except OSError:
                    pass
                time.sleep(1.0)
            log(f"vLLM {info['vllm_version']} serving on {url}")

            def sleeping() -> Optional[bool]:
                try:
                    status, body = http("GET", f"{url}/is_sleeping", 5.0)
                    return bool(json.loads(body).get("is_sleeping")) if status == 200 else None
                except (OSError, ValueError):
                    return None

            def settle(what: str, ok: Callable[[], bool], seconds: float = 60.0) -> bool:
                end = time.monotonic() + min(seconds, max(1.0, deadline.left()))
                while time.monotonic() < end:
                    if ok():
                        return True
                    time.sleep(0.25)
                log(f"vllm: {what}: not seen in time")
                return False

            def device_used() -> Optional[int]:
                time.sleep(1.0)  # the server's frees and allocations land
                return self.nvml.device()[0]

            for level in (1, 2):
                deadline.need(20, f"the level-{level} run")
                pool = self.work / f"pool-vllm-l{level}.yaml"
                pool.write_text(g.vllm_pool_yaml("tiny", url, str(model_dir), level, g.llama_weights_bytes(g.TINY_LLAMA)))
                sidecar = Sidecar(self.args.sidecar, pool, self.out, self.work, f"vllm-l{level}", heartbeat_ms=600_000)
                self.sidecar = sidecar
                sidecar.wait_ready()
                status, opened = sidecar.post("/v1/sessions", {"pid": os.getpid(), "app": "gpu-check"})
                if status != 201:
                    raise StepFailed(f"opening a session: {status} {opened}")
                session = opened["session"]
                run: Dict[str, Any] = {"level": level}

                def cycle(key: str) -> bool:
                    status, answer = sidecar.post("/v1/acquire", {"session": session, "model": "tiny"})
                    if status != 200:
                        # Recorded, not raised: the readings of the other steps still come back.
                        run[f"{key}_acquire_error"] = {"status": status, "answer": answer}
                        run[key] = device_used()
                        log(f"vllm level {level}: acquire refused: {status} {answer}")
                        return False
                    woke = settle("awake after the acquire", lambda: sleeping() is False)
                    run[key] = device_used()
                    state = sidecar.state() or {}
                    run[f"rss_{'awake' if key == 'awake_bytes' else 'woken'}_bytes"] = (state.get("server") or {}).get("rss_bytes")
                    status, answer = sidecar.post("/v1/release", {"session": session, "lease": answer.get("lease")})
                    if status != 200:
                        raise StepFailed(f"level {level}: release: {status} {answer}")
                    return woke

                run["woke"] = cycle("awake_bytes")
                run["slept"] = settle("asleep after the release", lambda: sleeping() is True)
                settle(
                    "the sidecar's ledger after the sleep",
                    lambda: not g.state_models(sidecar.state()) and (level != 1 or bool(((sidecar.state() or {}).get("server") or {}).get("asleep_ram_bytes"))),
                    15.0,
                )
                run["asleep_bytes"] = device_used()
                time.sleep(1.0)  # one more poll of the server's tree
                state = sidecar.state() or {}
                server_state = state.get("server") or {}
                run["rss_asleep_bytes"] = server_state.get("rss_bytes")
                run["sidecar_asleep_ram_bytes"] = (server_state.get("asleep_ram_bytes") or {}).get("tiny")
                run["sidecar_reclaims"] = server_state.get("reclaims")
                run["sidecar_models_asleep"] = {m: v.get("state") for m, v in g.state_models(state).items()}
                run["sidecar_held_bytes"] = state.get("held_bytes")
                self.snapshot(f"vllm-l{level}-asleep", [server.pid])
                run["woke"] = cycle("woken_bytes") and run["woke"]
                settle("asleep again after the release", lambda: sleeping() is True)
                runs.append(run)
                log(f"vllm level {level}: {run}")
                sidecar.stop()
                sidecar = None
                self.sidecar = None
        finally:
            if sidecar is not None:
                sidecar.stop()
                self.sidecar = None
            descendants = g.descendants(server.pid, _proc_table())
            server.stop(grace=15.0)
            for pid in descendants:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            self.phases["vllm"]["runs"] = runs
        self.checks.append(g.check_vllm_sleep(runs, base, g.llama_weights_bytes(g.TINY_LLAMA)))
        log(self.checks[-1].line())

    # --- driver ---

    def run(self) -> int:
        setup_error = None
        self._sampler.start()
        phases = [
            ("device", self.phase_device, ()),
            ("bench", self.phase_bench, ("h2d_load_path_vs_raw",)),
            ("candle-host", self.phase_candle_host, ("candle_host_frees_vram",)),
            ("aggressive", self.phase_aggressive, ("process_vram_agrees", "unload_returns_to_baseline", "unload_returns_99_percent", "torch_fraction_refuses")),
            ("pressure", self.phase_pressure, ("pressure_evicts_idle", "leased_model_kept")),
            ("exit", self.phase_exit, ("exit_reclaims_vram",)),
            ("vllm", self.phase_vllm, (g.VLLM_CHECK,)),
        ]
        for name, phase, owns in phases:
            started = time.monotonic()
            try:
                log(f"--- phase {name}")
                phase()
            except (StepFailed, OutOfTime, subprocess.TimeoutExpired, OSError, ValueError, KeyError) as error:
                message = f"phase {name}: {error}"
                log(message)
                self.notes.append(message)
                have = {check.name for check in self.checks}
                for check_name in owns:
                    if check_name not in have:
                        self.checks.append(g.not_run(check_name, str(error).splitlines()[0] if str(error) else repr(error)))
            except Exception as error:  # a bug here: keep going, report it
                message = f"phase {name} crashed: {error!r}\n{traceback.format_exc()}"
                log(message)
                self.notes.append(message)
            self.phases.setdefault(name, {})["seconds"] = time.monotonic() - started
        self._stop.set()
        summary = g.build_summary(
            self.checks,
            device=self.device,
            bench=self.bench,
            reclaim_samples_ms=self.reclaim_ms,
            side_by_side=self.side_by_side,
            setup_error=setup_error,
            seconds=time.monotonic() - T0,
            extra={"phases": self.phases, "releases": self.releases, "exits": self.exits, "notes": self.notes + self.nvml.notes, "nvml_backend": self.nvml.backend,
                   "nvml_process_backend": self.nvml.process_backend},
        )  # fmt: skip
        (self.out / "summary.json").write_text(g.dumps(summary))
        print()
        for check in summary["checks"]:
            status = "SKIP" if check.get("skipped") else "PASS" if check["ok"] else "FAIL"
            print(f"{status} {check['name']}: {check['detail']}")
        print(f"vram_reclaim_ms p99={summary['vram_reclaim_ms_p99']} ({summary['vram_reclaim_ms_p99_label']})")
        print(f"vram_reclaim_ms={summary['vram_reclaim_ms']} h2d_gb_per_s={summary['h2d_gb_per_s']} raw_h2d_gb_per_s={summary['raw_h2d_gb_per_s']}")
        print(f"summary: {self.out / 'summary.json'} ({'ok' if summary['ok'] else 'FAILED'}, {summary['seconds']:.0f} s)")
        return int(summary["exit_code"])

    def cleanup(self) -> None:
        self._stop.set()
        for child in reversed(Child.all):
            if child.alive():
                try:
                    child.stop(grace=2.0)
                except Exception:
                    child.proc.kill()
        shutil.rmtree(self.work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--sidecar", required=True)
    parser.add_argument("--candle-host", required=True)
    parser.add_argument("--device", type=int, default=0)
    parser.add_argument("--budget", type=float, default=270.0, help="seconds for all phases but vllm")
    parser.add_argument("--vllm-budget", type=float, default=240.0, help="seconds for the vllm phase (when vLLM is installed)")
    args = parser.parse_args()

    def on_term(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    run = Run(args)
    try:
        return run.run()
    finally:
        run.cleanup()


if __name__ == "__main__":
    sys.exit(main())
