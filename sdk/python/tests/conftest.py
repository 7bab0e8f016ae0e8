"""Fixtures: the real sidecar process, and app processes driven line by line.

The sidecar is ``target/debug/modelpool-sidecar`` (built here with ``cargo build -p
modelpool-sidecar`` once per run), or ``$MODELPOOL_SIDECAR_BIN``. When it cannot be had, the
sidecar tests are skipped with the reason, unless ``MODELPOOL_REQUIRE_SIDECAR=1`` (then they fail).
Everything polls with generous deadlines: the machine is small and busy.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest

HERE = Path(__file__).resolve().parent
SDK = HERE.parent
REPO = SDK.parent.parent
APPS = HERE / "apps"
MIB = 1024 * 1024

sys.path.insert(0, str(SDK / "src"))
from modelpool._http import SidecarHTTP  # noqa: E402
from modelpool.errors import SidecarError, SidecarUnavailableError  # noqa: E402


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Polls ``predicate`` until it returns something truthy; fails with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except (SidecarUnavailableError, SidecarError, OSError) as error:
            last = error
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


# --- the sidecar binary -----------------------------------------------------------------------

_BIN: Dict[str, Any] = {}


# The test command sets MODELPOOL_REQUIRE_SIDECAR=1 to mean "fail, do not skip, when the sidecar
# binary cannot be had". The SDK reads the same variable (fail closed without a sidecar), so it is
# taken out of this process's environment, and so out of the apps' it starts: each test that
# wants the SDK to fail closed sets it itself.
_REQUIRE_BINARY = os.environ.pop("MODELPOOL_REQUIRE_SIDECAR", "") in ("1", "true", "yes")


def _require() -> bool:
    return _REQUIRE_BINARY


def _unavailable(reason: str) -> None:
    if _require():
        pytest.fail(f"sidecar required (MODELPOOL_REQUIRE_SIDECAR=1) but {reason}")
    pytest.skip(f"no sidecar binary: {reason}")


def sidecar_command() -> List[str]:
    if "cmd" in _BIN:
        return _BIN["cmd"]
    if "error" in _BIN:
        _unavailable(_BIN["error"])
    override = os.environ.get("MODELPOOL_SIDECAR_BIN")
    if override:
        cmd = [sys.executable, override] if override.endswith(".py") else [override]
        if not Path(override).exists():
            _BIN["error"] = f"MODELPOOL_SIDECAR_BIN={override} does not exist"
            _unavailable(_BIN["error"])
        _BIN["cmd"] = cmd
        return cmd
    binary = REPO / "target" / "debug" / "modelpool-sidecar"
    if os.environ.get("MODELPOOL_SKIP_CARGO_BUILD", "") not in ("1", "true"):
        cargo = shutil.which("cargo")
        if cargo is None:
            if not binary.exists():
                _BIN["error"] = "cargo is not installed and target/debug/modelpool-sidecar is missing"
                _unavailable(_BIN["error"])
        else:
            try:
                build = subprocess.run(
                    [cargo, "build", "-p", "modelpool-sidecar"],
                    cwd=REPO,
                    capture_output=True,
                    text=True,
                    timeout=float(os.environ.get("MODELPOOL_CARGO_TIMEOUT", "2400")),
                )
            except subprocess.TimeoutExpired:
                _BIN["error"] = "cargo build -p modelpool-sidecar timed out"
                _unavailable(_BIN["error"])
            if build.returncode != 0:
                _BIN["error"] = "cargo build -p modelpool-sidecar failed:\n" + build.stderr[-3000:]
                _unavailable(_BIN["error"])
    if not binary.exists():
        _BIN["error"] = f"{binary} was not built (does the crate have the binary yet?)"
        _unavailable(_BIN["error"])
    _BIN["cmd"] = [str(binary)]
    return _BIN["cmd"]


def pool_yaml(
    models: List[Dict[str, Any]],
    *,
    name: str = "test",
    mode: str = "Aggressive",
    ram: Optional[str] = None,
    vram: Optional[str] = None,
    acquire_timeout: str = "60s",
    idle_ttl: str = "5m",
) -> str:
    """A ModelPool manifest for a test."""
    limits = [f"    {k}: {v}" for k, v in (("vram", vram), ("ram", ram)) if v]
    out = [
        "apiVersion: modelpool.io/v1alpha1",
        "kind: ModelPool",
        "metadata:",
        f"  name: {name}",
        "spec:",
        "  limits:" + ("" if limits else " {}"),
        *limits,
        "  policy:",
        f"    mode: {mode}",
        f"    idleTTL: {idle_ttl}",
        f"    acquireTimeout: {acquire_timeout}",
        "    pressure:",
        "      ramPercent: 100",
        "      vramPercent: 100",
        "  models:",
    ]
    for model in models:
        fields = ", ".join(f"{k}: {json.dumps(v) if isinstance(v, bool) else v}" for k, v in model.items())
        out.append(f"    - {{{fields}}}")
    return "\n".join(out) + "\n"


class Sidecar:
    """One real sidecar process on a temporary socket."""

    def __init__(self, pool_text: str, workdir: Path) -> None:
        self.workdir = workdir
        self.pool_path = workdir / "pool.yaml"
        self.pool_path.write_text(pool_text)
        self.socket = str(workdir / "sidecar.sock")
        self.http = SidecarHTTP(self.socket, timeout=30.0)
        self.proc: Optional[subprocess.Popen] = None
        self.logs: List[Path] = []

    def start(self) -> "Sidecar":
        log_path = self.workdir / f"sidecar-{len(self.logs)}.log"
        self.logs.append(log_path)
        log_file = open(log_path, "wb")
        cmd = sidecar_command() + [
            "--pool",
            str(self.pool_path),
            "--socket",
            self.socket,
            "--metrics-listen",
            "127.0.0.1:0",
        ]
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "info")
        self.proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        log_file.close()

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"sidecar exited with {self.proc.returncode}:\n{self.log_text()}")
            return os.path.exists(self.socket) and self.http.reachable(timeout=5.0)

        wait_for(ready, 90, f"the sidecar to answer on {self.socket}")
        return self

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-6000:] for p in self.logs if p.exists())

    def kill(self) -> None:
        """SIGKILL: a crash, no goodbye to the apps."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def state(self) -> Dict[str, Any]:
        _, data = self.http.request("GET", "/v1/state")
        return data

    def models(self) -> List[Dict[str, Any]]:
        return list(self.state().get("models") or [])


@pytest.fixture
def workdir() -> Iterator[Path]:
    # short path: a Unix socket path must fit in 108 bytes
    path = Path(tempfile.mkdtemp(prefix="mp-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def start_sidecar(workdir: Path, request: pytest.FixtureRequest) -> Iterator[Callable[[str], Sidecar]]:
    started: List[Sidecar] = []

    def start(pool_text: str) -> Sidecar:
        sidecar = Sidecar(pool_text, workdir)
        started.append(sidecar)
        return sidecar.start()

    yield start
    for sidecar in started:
        sidecar.stop()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for sidecar in started:
            sys.stderr.write(f"--- sidecar log ({sidecar.socket}) ---\n{sidecar.log_text()}\n")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Any:
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


# --- app processes ----------------------------------------------------------------------------


class App:
    """A worker process (``apps/worker.py``) using the SDK; requests go in as JSON lines."""

    def __init__(self, env: Dict[str, str], workdir: Path, label: str) -> None:
        self.label = label
        self.stderr_path = workdir / f"app-{label}.log"
        full_env = dict(os.environ)
        full_env.update(env)
        full_env["PYTHONPATH"] = os.pathsep.join([str(SDK / "src"), full_env.get("PYTHONPATH", "")])
        full_env["PYTHONUNBUFFERED"] = "1"
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(APPS / "worker.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env=full_env,
        )
        self.lines: "queue.Queue[Optional[str]]" = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.hello = self.receive(timeout=120)
        assert self.hello.get("ready"), self.hello
        self.pid = self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def send(self, op: str, **fields: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.proc.stdin.flush()

    def receive(self, timeout: float = 120) -> Dict[str, Any]:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"app {self.label}: no answer within {timeout:.0f} s\n{self.log()}") from None
        if line is None:
            raise AssertionError(f"app {self.label} exited ({self.proc.wait()}):\n{self.log()}")
        return json.loads(line)

    def pending(self, timeout: float) -> Optional[Dict[str, Any]]:
        """The next answer if one comes within ``timeout``, else None."""
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            return None
        if line is None:
            raise AssertionError(f"app {self.label} exited:\n{self.log()}")
        return json.loads(line)

    def call(self, op: str, timeout: float = 120, **fields: Any) -> Dict[str, Any]:
        self.send(op, **fields)
        result = self.receive(timeout)
        return result

    def ok(self, op: str, timeout: float = 120, **fields: Any) -> Dict[str, Any]:
        result = self.call(op, timeout, **fields)
        assert result.get("ok"), f"app {self.label}: {op} {fields} failed: {result}\n{self.log()}"
        return result

    def log(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("quit")
                self.proc.wait(20)
            except (OSError, subprocess.TimeoutExpired, ValueError):
                self.proc.kill()
                self.proc.wait(10)
        self._stderr.close()


@pytest.fixture
def start_app(workdir: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., App]]:
    apps: List[App] = []

    def start(label: str = "app", socket: Optional[str] = None, **env: str) -> App:
        environment = {"MODELPOOL_SOCKET": socket or "none"}
        environment.update(env)
        app = App(environment, workdir, f"{label}-{len(apps)}")
        apps.append(app)
        return app

    yield start
    rep = getattr(request.node, "rep_call", None)
    for app in apps:
        app.close()
        if rep is not None and rep.failed:
            sys.stderr.write(f"--- app {app.label} log ---\n{app.log()}\n")


def run_script(path: Path, env: Dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.update(env)
    full_env["PYTHONPATH"] = os.pathsep.join([str(SDK / "src"), full_env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, str(path)], env=full_env, capture_output=True, text=True, timeout=timeout)
