"""The SDK's side of the sidecar API (``docs/sidecar-api.md``): one session per app process.

::

    app threads ── acquire / loaded / release / unloaded ──► sidecar (Unix socket, /v1)
    heartbeat thread ── POST /v1/sessions/{s}/heartbeat every heartbeat_ms/2, app-side GPU readings
    commands thread ── GET /v1/sessions/{s}/commands?wait_ms=25000 (long poll) ──► unload here,
                        answer POST /v1/unloaded {command}

The session is opened on first need (the first ``load_model``), so that it announces every loader
the app registered at start-up. When the sidecar forgets the session (``unknown_session``: it
restarted) or cannot be reached, the threads keep trying; the next session re-announces what this
process holds (``holds``), and a lease lost with the old session is re-acquired or treated as
released. Both threads are daemons: they never keep the app alive.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple, TypeVar
from urllib.parse import quote

from . import memory
from ._http import SidecarHTTP
from ._wait import WaitReporter
from .errors import AcquireRefusedError, SidecarError, SidecarUnavailableError, UnknownModelError
from .local import Grant
from .pool import Pool

if TYPE_CHECKING:  # pragma: no cover
    from .manager import MemoryManager

log = logging.getLogger("modelpool")

T = TypeVar("T")

LOST = ("unknown_session", "unknown_lease")


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def describe_room(name: str, state: Dict[str, Any], pool: Optional[Pool]) -> str:
    """``needs ram 200 MiB; ceiling ram 300 MiB, 200 MiB held by a (ram 200 MiB, 1 lease,
    app worker pid 42); 1 acquire(s) waiting``: what a waiting acquire is behind."""
    parts = []
    spec = pool.models.get(name) if pool else None
    if spec is not None:
        need = [
            f"{r} {memory.format_bytes(b)}" for r, b in (("vram", spec.vram_bytes), ("ram", spec.ram_bytes)) if b
        ]
        if need:
            parts.append("needs " + ", ".join(need))
    ceiling = state.get("ceiling_bytes") or {}
    held = state.get("held_bytes") or {}
    limits = [
        f"{r} {memory.format_bytes(ceiling[r])} ({memory.format_bytes(held.get(r) or 0)} held)"
        for r in ("vram", "ram")
        if isinstance(ceiling.get(r), int)
    ]
    if limits:
        parts.append("ceiling " + ", ".join(limits))
    holders = []
    for model in state.get("models") or []:
        if not isinstance(model, dict) or model.get("model") == name and not model.get("leases"):
            continue
        sizes = ", ".join(
            f"{r} {memory.format_bytes(model[f'{r}_bytes'])}"
            for r in ("vram", "ram")
            if isinstance(model.get(f"{r}_bytes"), int) and model[f"{r}_bytes"] > 0
        )
        leases = int(model.get("leases") or 0)
        who = f"app {model['app']} pid {model.get('pid')}" if model.get("app") else f"pid {model.get('pid')}"
        detail = ", ".join(
            x
            for x in (
                sizes,
                f"{leases} lease{'s' if leases != 1 else ''}" if leases else str(model.get("state") or "idle"),
                who,
            )
            if x
        )
        holders.append(f"{model.get('model')} ({detail})")
    parts.append("held by " + ("; ".join(holders) if holders else "nothing"))
    queue = state.get("queue")
    if isinstance(queue, int) and queue > 0:
        parts.append(f"{queue} acquire(s) waiting")
    return "; ".join(parts)


class SidecarCoordinator:
    """Acquires and releases through the sidecar; follows its command stream."""

    kind = "sidecar"

    def __init__(self, manager: "MemoryManager", http: SidecarHTTP, app: str) -> None:
        self.manager = manager
        self.http = http
        self.app = app
        self.pool: Optional[Pool] = None
        self.session: Optional[str] = None
        self.sessions_opened = 0
        self.heartbeat_s = 2.0
        self.announced: List[str] = []
        # how long app calls keep retrying while the sidecar is unreachable (restarting)
        self.reconnect_timeout = _env_float("MODELPOOL_RECONNECT_TIMEOUT", 60.0)
        self.acquire_http_timeout = _env_float("MODELPOOL_ACQUIRE_HTTP_TIMEOUT", 900.0)
        self.poll_wait_ms = int(_env_float("MODELPOOL_POLL_WAIT_MS", 25000))
        self._open_lock = threading.Lock()
        self._session_ready = threading.Event()
        self._closed = threading.Event()
        self._threads: List[threading.Thread] = []
        self._lost_logged = False
        self._verify_needed = False
        self._vram_cap_done = False

    # --- session ---------------------------------------------------------------------------

    def ensure_session(self) -> str:
        """The current session, opening one (with ``holds``) when there is none."""
        session = self.session
        if session is not None:
            return session
        with self._open_lock:
            if self.session is not None:
                return self.session
            holds = self.manager._holds()
            models = sorted(self.manager._loaders)
            body = {"pid": os.getpid(), "app": self.app, "models": models, "holds": holds}
            try:
                _, data = self.http.request("POST", "/v1/sessions", body)
            except SidecarError as error:
                if error.code == "unknown_model":
                    raise UnknownModelError(error.message or str(error)) from error
                raise
            if not isinstance(data, dict) or not data.get("session"):
                raise SidecarError(500, "bad_response", f"no session in {data!r}")
            session = str(data["session"])
            self.session = session
            self.heartbeat_s = max(0.05, float(data.get("heartbeat_ms", 2000)) / 1000.0)
            if isinstance(data.get("pool"), dict):
                self.pool = Pool.from_session(data["pool"])
            self.announced = models
            self.sessions_opened += 1
            pool_desc = f"pool {self.pool.name} ({self.pool.mode})" if self.pool else "pool ?"
            if self.sessions_opened == 1:
                log.info("Connected to ModelPool sidecar at %s: session %s, %s", self.http.address, self.session, pool_desc)
            else:
                held = ", ".join(h["model"] for h in holds) or "nothing"
                log.warning(
                    "Reconnected to ModelPool sidecar at %s: new session %s, re-announced holds: %s",
                    self.http.address,
                    self.session,
                    held,
                )
            adopted = {
                str(a.get("model")): a.get("generation")
                for a in data.get("adopted") or []
                if isinstance(a, dict) and isinstance(a.get("generation"), int)
            }
            with self.manager._cond:
                # generations of an earlier session mean nothing to this one
                for name, entry in self.manager._entries.items():
                    entry.instance = adopted.get(name)
            for refused in data.get("refused_holds") or []:
                if isinstance(refused, dict):
                    log.warning(
                        "sidecar refused held model %s: %s", refused.get("model"), refused.get("message", "")
                    )
            self._lost_logged = False
            self._verify_needed = False
            session = self.session
            reopened = self.sessions_opened > 1
            self._session_ready.set()
            self._start_threads()
        if reopened:
            self._reacquire(session)
        return session

    def _reacquire(self, session: str) -> None:
        """After a reconnect: leases for the ``with`` blocks still running, so the new sidecar
        counts them as in use (it would otherwise see idle holds, and may unload them)."""
        generation = self.sessions_opened
        for grant in self.manager._active_grants():
            if grant.generation >= generation:
                continue  # already from this session (ids alone may repeat across restarts)
            try:
                _, data = self.http.request(
                    "POST", "/v1/acquire", {"session": session, "model": grant.model, "wait": False}
                )
                data = data if isinstance(data, dict) else {}
                decision = data.get("decision")
                if decision in ("use", "load") and data.get("lease"):
                    if decision == "load":
                        measured = self.manager._measured(grant.model)
                        body = {"session": session, "lease": data["lease"], "ok": True}
                        body.update({k: v for k, v in measured.items() if v is not None})
                        self.http.request("POST", "/v1/loaded", body)
                    grant.session, grant.lease, grant.generation = session, str(data["lease"]), generation
                    if isinstance(data.get("generation"), int):
                        grant.instance = data["generation"]
                        with self.manager._cond:
                            entry = self.manager._entries.get(grant.model)
                            if entry is not None:
                                entry.instance = grant.instance
                    log.info("Renewed the lease of %s in session %s", grant.model, session)
                else:
                    log.warning("could not renew the lease of %s after reconnecting: %s", grant.model, data)
                    grant.session = grant.lease = None
                    grant.generation = generation
            except (SidecarError, SidecarUnavailableError) as error:
                log.warning("could not renew the lease of %s after reconnecting: %s", grant.model, error)
                grant.session = grant.lease = None
                grant.generation = generation

    def _verify(self, session: str) -> None:
        """After an outage: is ``session`` still ours? A restarted sidecar may have given the
        same id to another process; its ``/v1/state`` lists sessions with their pid."""
        self._verify_needed = False
        try:
            _, state = self.http.request("GET", "/v1/state", timeout=10.0)
        except (SidecarError, SidecarUnavailableError):
            self._verify_needed = True
            return
        sessions = state.get("sessions") if isinstance(state, dict) else None
        if not isinstance(sessions, list):
            return  # this sidecar does not list sessions: rely on unknown_session
        for entry in sessions:
            if isinstance(entry, dict) and entry.get("session") == session:
                if entry.get("pid") == os.getpid():
                    return
                break
        log.warning("ModelPool sidecar restarted and session %s is not ours any more: opening a new one", session)
        self._invalidate(session, quiet=True)

    def _invalidate(self, session: Optional[str], quiet: bool = False) -> None:
        with self._open_lock:
            if session is None or self.session == session:
                if self.session is not None and not quiet:
                    log.warning(
                        "ModelPool sidecar no longer knows session %s (it restarted?): opening a new one",
                        self.session,
                    )
                self.session = None
                self._session_ready.clear()

    def _start_threads(self) -> None:
        if self._threads:
            return
        for target, name in ((self._heartbeat_loop, "modelpool-heartbeat"), (self._command_loop, "modelpool-commands")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def _retrying(self, what: str, call: Callable[[str], T], timeout: Optional[float] = None) -> T:
        """Runs ``call(session)``, reopening the session when it is lost and retrying while
        the sidecar is unreachable, up to ``timeout`` (``reconnect_timeout``)."""
        deadline = time.monotonic() + (self.reconnect_timeout if timeout is None else timeout)
        delay = 0.1
        while True:
            try:
                session = self.ensure_session()
                return call(session)
            except SidecarError as error:
                if error.code == "unknown_session":
                    self._invalidate(self.session)
                    if time.monotonic() < deadline:
                        continue
                raise
            except SidecarUnavailableError as error:
                self._verify_needed = True
                if time.monotonic() >= deadline:
                    raise SidecarUnavailableError(f"{what}: {error}") from error
                if not self._lost_logged:
                    self._lost_logged = True
                    log.warning("ModelPool sidecar unreachable (%s): retrying for up to %.0f s", error, self.reconnect_timeout)
                time.sleep(delay)
                delay = min(1.0, delay * 2)

    # --- the coordinator interface ---------------------------------------------------------

    def start(self) -> None:
        return None

    def model_registered(self, name: str) -> None:
        if self.session is None:
            return  # announced when the session opens
        if self.pool is not None and self.pool.models and name not in self.pool.models:
            raise UnknownModelError(
                f"model {name!r} is not in pool {self.pool.name!r}, which lists "
                f"{', '.join(sorted(self.pool.models))}"
            )
        if name not in self.announced:
            with self.manager._cond:
                idle = not self.manager._entries
            if idle:  # nothing held: announce the new list with a fresh session
                old = self.session
                self._invalidate(old, quiet=True)
                self._delete_session(old)
            else:
                log.warning(
                    "model %r registered after the sidecar session opened while models are held; "
                    "it is announced with the next session",
                    name,
                )

    def default_aggressive(self) -> bool:
        return self.pool is None or self.pool.mode == "Aggressive"

    def acquire(self, name: str) -> Grant:
        self._apply_vram_cap()

        def call(session: str) -> Grant:
            body = {"session": session, "model": name, "wait": True}
            status, data = self.http.request("POST", "/v1/acquire", body, timeout=self.acquire_http_timeout)
            data = data if isinstance(data, dict) else {}
            if status == 409 or data.get("decision") == "refuse":
                reason = str(data.get("reason", "refused"))
                message = str(data.get("message", f"model {name!r} refused"))
                if reason == "unknown_model":
                    raise UnknownModelError(message)
                raise AcquireRefusedError(
                    name, reason, message, data.get("need_bytes"), data.get("ceiling_bytes"), data.get("held_bytes")
                )
            decision = str(data.get("decision", ""))
            if decision not in ("use", "load"):
                raise SidecarError(status, "bad_response", f"unexpected acquire answer {data!r}")
            instance = data.get("generation")
            return Grant(
                name,
                decision,
                str(data.get("lease")) if data.get("lease") else None,
                session,
                self.sessions_opened,
                instance if isinstance(instance, int) else None,
            )

        with WaitReporter(name, lambda: self._describe_room(name)):
            try:
                return self._retrying(f"acquire {name}", call)
            except SidecarError as error:
                if error.code == "unknown_model":
                    raise UnknownModelError(error.message or str(error)) from error
                if error.code == "shutting_down":
                    raise AcquireRefusedError(name, "shutting_down", error.message) from error
                raise

    def _describe_room(self, name: str) -> str:
        """What an acquire of ``name`` waits behind, from the sidecar's ``/v1/state``."""
        _, state = self.http.request("GET", "/v1/state", timeout=5.0)
        return describe_room(name, state if isinstance(state, dict) else {}, self.pool)

    def loaded(self, grant: Grant, ok: bool, **measured: Any) -> Grant:
        """Reports a load; returns the grant to release later (a new one if the session changed)."""
        body: Dict[str, Any] = {"session": grant.session, "lease": grant.lease, "ok": ok}
        for key in ("load_seconds", "vram_bytes", "ram_bytes", "error"):
            if measured.get(key) is not None:
                body[key] = measured[key]
        try:
            self.http.request("POST", "/v1/loaded", body)
            return grant
        except SidecarError as error:
            if error.code not in LOST:
                raise
            self._invalidate(grant.session)
        except SidecarUnavailableError:
            pass
        if not ok:
            return grant
        # The session died while we loaded. Acquire again in the new session ("load" answered
        # with what we already measured, or "use" if the new session got it in `holds`).
        try:
            fresh = self.acquire(grant.model)
            if fresh.decision == "load":
                body.update(session=fresh.session, lease=fresh.lease)
                self.http.request("POST", "/v1/loaded", body)
            return fresh
        except Exception as error:  # the model is loaded here; keep going, the next session re-announces it
            log.warning("could not report %s as loaded to the sidecar: %s", grant.model, error)
            return Grant(grant.model, grant.decision, None, None)

    def release(self, grant: Grant, aggressive: bool) -> bool:
        local_default = self.pool is None or self.pool.mode == "Aggressive"
        if grant.lease is None or grant.session is None:
            return local_default
        try:
            _, data = self.http.request("POST", "/v1/release", {"session": grant.session, "lease": grant.lease})
            return bool(isinstance(data, dict) and data.get("unload"))
        except SidecarError as error:
            if error.code not in LOST:
                log.warning("release of %s failed: %s", grant.model, error)
            elif error.code == "unknown_session":
                self._invalidate(grant.session)
        except SidecarUnavailableError as error:
            log.warning("release of %s: %s", grant.model, error)
        return local_default

    def unloaded(self, name: str, command: Optional[Any] = None, instance: Optional[int] = None) -> None:
        """Tells the sidecar an instance is gone (``command``: ``(session, id, generation)`` it
        answers; ``instance``: the generation this process held)."""
        session = self.session
        if session is None:
            return  # the next session's holds will not list it
        if command is not None and command[0] == session and instance is None:
            instance = command[2]
        if instance is None:
            log.debug("unloaded %s: its instance is unknown to this session; the sidecar sees it by memory", name)
            return
        body: Dict[str, Any] = {"session": session, "model": name, "generation": instance}
        if command is not None and command[0] == session:
            body["command"] = command[1]
        try:
            self.http.request("POST", "/v1/unloaded", body)
        except SidecarError as error:
            if error.code == "unknown_session":
                self._invalidate(session)
            else:
                log.debug("unloaded %s: sidecar answered %s", name, error)
        except SidecarUnavailableError as error:
            log.debug("unloaded %s: %s", name, error)

    def cleanup(self, force: bool) -> None:
        try:
            self.http.request("POST", "/v1/cleanup", {"force": force})
        except (SidecarError, SidecarUnavailableError) as error:
            log.warning("sidecar cleanup failed: %s", error)

    def check(self, vram_bytes: int, ram_bytes: int) -> Tuple[bool, str, Dict[str, Any]]:
        _, data = self.http.request("GET", f"/v1/check?vram_bytes={int(vram_bytes)}&ram_bytes={int(ram_bytes)}")
        data = data if isinstance(data, dict) else {}
        return bool(data.get("available")), str(data.get("message", "")), data

    def state(self) -> Optional[Dict[str, Any]]:
        _, data = self.http.request("GET", "/v1/state")
        return data if isinstance(data, dict) else None

    def close(self) -> None:
        self._closed.set()
        self._session_ready.set()
        session, self.session = self.session, None
        self._delete_session(session)

    def after_fork(self) -> None:
        self.session = None
        self._threads = []
        self._open_lock = threading.Lock()
        self._session_ready = threading.Event()
        self._closed = threading.Event()

    def _delete_session(self, session: Optional[str]) -> None:
        if session is None:
            return
        try:
            self.http.request("DELETE", f"/v1/sessions/{quote(session)}", timeout=5.0)
        except (SidecarError, SidecarUnavailableError):
            pass

    # --- PyTorch: a hard cap from the pool's VRAM ceiling -------------------------------------

    def _apply_vram_cap(self) -> None:
        if self._vram_cap_done:
            return
        self._vram_cap_done = memory.apply_vram_cap(self.pool)

    # --- background threads ----------------------------------------------------------------

    def _heartbeat_loop(self) -> None:
        while not self._closed.is_set():
            session = self.session
            if session is None:
                try:
                    self.ensure_session()
                except SidecarUnavailableError:
                    self._closed.wait(0.25)
                except Exception as error:
                    log.warning("could not open a sidecar session: %s", error)
                    self._closed.wait(2.0)
                continue
            if self._verify_needed:
                self._verify(session)
                if self.session != session:
                    continue
            body: Dict[str, Any] = {}
            try:
                readings = memory.heartbeat_readings()
                if readings:
                    body["readings"] = readings
            except Exception:  # pragma: no cover
                pass
            try:
                self.http.request("POST", f"/v1/sessions/{quote(session)}/heartbeat", body, timeout=10.0)
            except SidecarError as error:
                if error.code == "unknown_session":
                    self._invalidate(session)
                    continue
                log.debug("heartbeat: %s", error)
            except SidecarUnavailableError as error:
                self._verify_needed = True
                if not self._lost_logged:
                    self._lost_logged = True
                    log.warning("ModelPool sidecar unreachable (%s): reconnecting", error)
                self._closed.wait(0.25)
                # a restarted sidecar answers unknown_session, which reopens the session
                continue
            self._closed.wait(max(0.05, min(5.0, self.heartbeat_s / 2)))

    def _command_loop(self) -> None:
        while not self._closed.is_set():
            session = self.session
            if session is None:
                self._session_ready.wait(0.5)
                continue
            try:
                _, data = self.http.request(
                    "GET",
                    f"/v1/sessions/{quote(session)}/commands?wait_ms={self.poll_wait_ms}",
                    timeout=self.poll_wait_ms / 1000.0 + 15.0,
                )
            except SidecarError as error:
                if error.code == "unknown_session":
                    self._invalidate(session)
                else:
                    log.debug("commands: %s", error)
                    self._closed.wait(1.0)
                continue
            except SidecarUnavailableError:
                self._verify_needed = True
                self._closed.wait(0.25)
                continue
            commands = data.get("commands", []) if isinstance(data, dict) else []
            done = 0
            for command in commands:
                try:
                    done += bool(self._handle(session, command))
                except Exception:  # never let the thread die
                    log.exception("modelpool: failed to handle sidecar command %r", command)
            if commands and not done:
                # only commands for models in use: they come again on every poll, do not spin
                self._closed.wait(0.5)

    def _handle(self, session: str, command: Dict[str, Any]) -> bool:
        kind = command.get("kind")
        model = command.get("model")
        if kind != "unload" or not model:
            log.debug("ignoring sidecar command %r", command)
            return False
        instance = command.get("generation")
        instance = instance if isinstance(instance, int) else None
        return self.manager._unload_commanded(
            str(model), str(command.get("reason", "")), (session, command.get("id"), instance), instance
        )
