"""``MemoryManager``: the seed's API, backed by the sidecar when there is one, in-process when not.

::

    with mm.load_model("upscale") as model:     acquire ─► (load, measured) ─► lease ─► proxy
        model.process(frames)
    # block ends (normally or by an exception): proxy let go ─► release ─► unload if the
    # policy says so (Aggressive: now; Cache: on idle TTL, pressure, eviction, cleanup)

From asyncio, ``async with mm.load_model_async("upscale") as model:`` does the same without
blocking the event loop: the acquire (which may wait for room), the loader and the unload run in
the manager's worker threads.

The manager keeps the only reference the SDK holds to each model (``_Entry.model``); unloading
drops it, runs the app's ``unloader`` if any, ``gc.collect()``, ``torch.cuda.empty_cache()`` +
``ipc_collect()`` when torch is on CUDA, and glibc's ``malloc_trim(0)``.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import logging
import os
import threading
import time
import traceback
import weakref
from collections.abc import Mapping
from types import TracebackType
from typing import (
    Any,
    Callable,
    Dict,
    Generic,
    Iterator,
    List,
    Literal,
    Optional,
    Tuple,
    Type,
    TypeVar,
    Union,
    cast,
    overload,
)

from . import memory
from ._http import DEFAULT_SOCKET, SidecarHTTP
from .errors import SidecarError, SidecarUnavailableError, UnknownModelError
from .local import Grant, LocalCoordinator
from .pool import Pool, load_pool_file
from .proxy import ModelProxy
from .sidecar import SidecarCoordinator

log = logging.getLogger("modelpool")

Loader = Callable[[], Any]
Unloader = Callable[[Any], None]

M = TypeVar("M")
"""The type a model's loader returns."""


class ModelKey(str, Generic[M]):
    """A model's name, as :meth:`MemoryManager.register_model_loader` returns it: a plain ``str``
    that also carries the loader's return type, so that ``with mm.load_model(key) as model``
    gives ``model`` that type for type checkers. Plain names keep working (typed ``Any``)."""

    __slots__ = ()

_LOCAL_ANNOUNCED = False
_OFF = ("", "none", "off", "local", "0", "false", "no")


class _Entry:
    """One model this process holds (or is loading / unloading)."""

    __slots__ = (
        "name",
        "model",
        "state",
        "leases",
        "ram_bytes",
        "vram_bytes",
        "load_seconds",
        "loaded_at",
        "last_used",
        "proxies",
        "instance",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.model: Any = None
        self.state = "loading"  # loading -> loaded -> unloading -> (gone)
        self.leases = 0
        self.ram_bytes: Optional[int] = None
        self.vram_bytes: Optional[int] = None
        self.load_seconds: Optional[float] = None
        self.loaded_at = 0.0
        self.last_used = time.monotonic()
        self.proxies: "List[weakref.ReferenceType[ModelProxy]]" = []
        # The sidecar's generation of this instance (acquire answer, or `adopted` at session
        # open): commands and `/v1/unloaded` name it, so a stale command never frees a later load.
        self.instance: Optional[int] = None


class LoadedModels(Mapping):  # type: ignore[type-arg]
    """A read-only live view of the models this process holds: ``name -> model``.

    Like the seed's ``loaded_models`` dict. Do not keep the values: a reference kept outside a
    ``load_model`` block keeps the weights in memory after the unload.
    """

    def __init__(self, manager: "MemoryManager") -> None:
        self._manager = manager

    def _snapshot(self) -> Dict[str, Any]:
        with self._manager._cond:
            return {n: e.model for n, e in self._manager._entries.items() if e.state == "loaded"}

    def __getitem__(self, name: str) -> Any:
        return self._snapshot()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._snapshot()))

    def __len__(self) -> int:
        return len(self._snapshot())

    def __repr__(self) -> str:
        return f"LoadedModels({sorted(self._snapshot())})"


class _LoadModel(Generic[M]):
    """The context manager ``load_model`` returns (a class, not a generator, so that no frame
    of the SDK keeps a reference to the model after the block)."""

    def __init__(self, manager: "MemoryManager", name: str) -> None:
        self._manager = manager
        self._name = name
        self._grant: Optional[Grant] = None
        self._proxy: Optional[ModelProxy] = None

    def __enter__(self) -> M:
        self._grant, self._proxy = self._manager._enter(self._name)
        # the proxy forwards to the model (and detaches at the end of the block)
        return cast(M, self._proxy)

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> Literal[False]:
        grant, proxy = self._grant, self._proxy
        self._grant = self._proxy = None
        if grant is None or proxy is None:
            return False
        self._manager._exit(self._name, grant, proxy, exc, tb)
        return False


class _AsyncLoadModel(Generic[M]):
    """The async context manager ``load_model_async`` returns. The acquire (which may wait for
    room), the loader and the release/unload run in the manager's worker threads, so the event
    loop keeps running other tasks meanwhile. A task cancelled while it waits for room gives
    the lease back as soon as the acquire it started is answered."""

    def __init__(self, manager: "MemoryManager", name: str) -> None:
        self._manager = manager
        self._name = name
        self._grant: Optional[Grant] = None
        self._proxy: Optional[ModelProxy] = None

    async def __aenter__(self) -> M:
        manager, name = self._manager, self._name
        # A concurrent future, so that a lease granted after this task was cancelled is given
        # back from the worker thread, even once the event loop has closed.
        work = manager._executor().submit(manager._enter, name)
        try:
            grant, proxy = await asyncio.shield(asyncio.wrap_future(work))
        except asyncio.CancelledError:

            def give_back(done: "concurrent.futures.Future[Tuple[Grant, ModelProxy]]") -> None:
                if done.cancelled() or done.exception() is not None:
                    return
                grant, proxy = done.result()
                log.info("Giving back %s: the task that asked for it was cancelled", name)
                manager._exit(name, grant, proxy, None, None)

            if work.done():
                try:
                    manager._executor().submit(give_back, work)
                except RuntimeError:  # the manager is closing: do it here
                    give_back(work)
            else:
                work.add_done_callback(give_back)
            raise
        self._grant, self._proxy = grant, proxy
        return cast(M, proxy)

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> Literal[False]:
        grant, proxy = self._grant, self._proxy
        self._grant = self._proxy = None
        if grant is None or proxy is None:
            return False
        # shielded: a cancellation during the release must not leave the lease behind
        work = self._manager._executor().submit(self._manager._exit, self._name, grant, proxy, exc, tb)
        await asyncio.shield(asyncio.wrap_future(work))
        return False


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _default_require(sidecar: Union[str, bool, None]) -> Tuple[bool, str]:
    """Whether a missing sidecar is an error when ``require_sidecar`` is not given, and why.

    ``$MODELPOOL_REQUIRE_SIDECAR`` decides when set (``1``/``true`` or ``0``/``false``).
    Otherwise a ``$MODELPOOL_SOCKET`` naming a socket (the webhook injects it into every
    governed pod) requires one: a governed app must never run without the pod's ceilings.
    """
    flag = os.environ.get("MODELPOOL_REQUIRE_SIDECAR", "").strip().lower()
    if flag in ("1", "true", "yes", "on"):
        return True, "MODELPOOL_REQUIRE_SIDECAR=1"
    if flag in ("0", "false", "no", "off"):
        return False, "MODELPOOL_REQUIRE_SIDECAR=0"
    socket = os.environ.get("MODELPOOL_SOCKET")
    if sidecar is None and socket is not None and socket.strip().lower() not in _OFF:
        return True, "$MODELPOOL_SOCKET is set, as the webhook sets it in a governed pod; MODELPOOL_REQUIRE_SIDECAR=0 allows local mode"
    return False, "MODELPOOL_REQUIRE_SIDECAR=1"


class MemoryManager:
    """The seed's memory manager. Get the process-wide one with :func:`get_memory_manager`.

    ``aggressive_cleanup``: ``True`` unloads each model as soon as its last ``with`` block ends,
    ``False`` keeps models cached, ``None`` (default) follows the pool's ``policy.mode``
    (Aggressive without a pool, like the seed). With a sidecar its commands always win: an
    Aggressive pool unloads at release even with ``False``.

    ``sidecar``: a socket path (or ``http://127.0.0.1:PORT``), ``False`` for local mode, or
    ``None`` for ``$MODELPOOL_SOCKET`` / ``/var/run/modelpool/sidecar.sock``.
    ``pool``: local mode's pool (a :class:`Pool` or a file), default ``$MODELPOOL_POOL``.
    ``require_sidecar``: ``True`` makes a missing sidecar an error
    (:class:`SidecarUnavailableError`, after ``$MODELPOOL_CONNECT_TIMEOUT`` seconds, default 10)
    instead of local mode; default ``$MODELPOOL_REQUIRE_SIDECAR`` (``1`` / ``true``). Use it in a
    cluster, where running without the pod's ceilings would starve the pod's neighbours.
    """

    def __init__(
        self,
        aggressive_cleanup: Optional[bool] = None,
        *,
        sidecar: Union[str, bool, None] = None,
        pool: Union[Pool, str, None] = None,
        app: Optional[str] = None,
        clear_error_frames: bool = True,
        require_sidecar: Optional[bool] = None,
    ) -> None:
        self.aggressive_cleanup = aggressive_cleanup
        self.clear_error_frames = clear_error_frames
        self._cond = threading.Condition(threading.RLock())
        self._loaders: Dict[str, Tuple[Loader, Optional[Unloader]]] = {}
        self._entries: Dict[str, _Entry] = {}
        self._learned: Dict[str, Dict[str, int]] = {}
        self._grants: Dict[int, Grant] = {}  # the leases of the `with` blocks now running
        self._closed = False
        self._pool_executor: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._executor_lock = threading.Lock()
        self._require_source = "require_sidecar=True"
        if require_sidecar is None:
            require_sidecar, self._require_source = _default_require(sidecar)
        self._coordinator: Union[LocalCoordinator, SidecarCoordinator] = self._connect(
            sidecar, pool, app, require_sidecar
        )
        self._coordinator.start()
        weak = weakref.ref(self)
        atexit.register(_close_weak, weak)
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=lambda: _after_fork_weak(weak))

    # --- choosing the backend --------------------------------------------------------------

    def _connect(
        self,
        sidecar: Union[str, bool, None],
        pool: Union[Pool, str, None],
        app: Optional[str],
        require: bool,
    ) -> Union[LocalCoordinator, SidecarCoordinator]:
        global _LOCAL_ANNOUNCED
        app = app or os.environ.get("MODELPOOL_APP") or _program_name()
        explicit = False
        address: Optional[str] = None
        source = "the default socket"
        if isinstance(sidecar, str):
            address, explicit, source = sidecar, True, "sidecar="
        elif sidecar is None:
            env = os.environ.get("MODELPOOL_SOCKET")
            if env is not None:
                address, explicit, source = env, True, "$MODELPOOL_SOCKET"
            else:
                address = DEFAULT_SOCKET
        looked = sidecar is not False and address is not None and address.strip().lower() not in _OFF
        required_by = self._require_source
        if require and not looked:
            raise SidecarUnavailableError(
                f"a ModelPool sidecar is required ({required_by}) but local mode was asked for "
                f"({'sidecar=False' if sidecar is False else f'{source} is {address!r}'})"
            )
        why = "local mode requested"
        if looked:
            assert address is not None
            http = SidecarHTTP(address, token=os.environ.get("MODELPOOL_API_TOKEN") or None)
            wait = float(os.environ.get("MODELPOOL_CONNECT_TIMEOUT", "10" if explicit or require else "0"))
            deadline = time.monotonic() + wait
            is_tcp = address.startswith("http")
            last_error: Optional[BaseException] = None
            while True:
                if is_tcp or os.path.exists(address):
                    try:
                        http.request("GET", "/v1/state", timeout=2.0)
                        return SidecarCoordinator(self, http, app)
                    except (SidecarUnavailableError, SidecarError) as error:
                        last_error = error.__cause__ or error
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.2)
            if not is_tcp and not os.path.exists(address):
                detail = "no such socket file"
            elif isinstance(last_error, PermissionError):
                detail = (
                    "permission denied on the socket: it is mode 0660 with the pod's shared group "
                    "(65532, which the webhook adds to the pod's supplementalGroups); run this "
                    "process with that group"
                )
            else:
                detail = f"it did not answer GET /v1/state within {wait:g} s"
            why = f"no ModelPool sidecar answers at {address} ({source}; {detail})"
            if require:
                raise SidecarUnavailableError(
                    f"{why[0].upper() + why[1:]}, and one is required ({required_by}): check that the "
                    "sidecar runs (in a cluster: the pod is labelled modelpool.io/pool and shows a "
                    "modelpool-sidecar container), and that MODELPOOL_SOCKET is its --socket path"
                )
        local_pool: Optional[Pool]
        if isinstance(pool, Pool) or pool is None:
            local_pool = pool
        else:
            local_pool = load_pool_file(pool)
        if local_pool is None and os.environ.get("MODELPOOL_POOL"):
            local_pool = load_pool_file(os.environ["MODELPOOL_POOL"])
        if not _LOCAL_ANNOUNCED:
            _LOCAL_ANNOUNCED = True
            where = f"pool {local_pool.name} ({local_pool.mode})" if local_pool else "no pool: every registered loader is allowed"
            if looked:
                # loud: an app that expected a sidecar now runs without the pod's shared ceilings
                log.warning(
                    "%s: managing memory in-process (local mode, %s); nothing limits this process "
                    "against the others sharing the GPU. Set MODELPOOL_REQUIRE_SIDECAR=1 to fail instead.",
                    why[0].upper() + why[1:],
                    where,
                )
            else:
                log.info("%s: managing memory in-process (local mode, %s)", why[0].upper() + why[1:], where)
        return LocalCoordinator(self, local_pool)

    # --- what the app sees -------------------------------------------------------------------

    @property
    def mode(self) -> str:
        """``"sidecar"`` or ``"local"``."""
        return self._coordinator.kind

    @property
    def pool(self) -> Optional[Pool]:
        """The pool in force (from the sidecar's session, or local mode's pool file)."""
        return self._coordinator.pool

    @property
    def session(self) -> Optional[str]:
        """The sidecar session id, when there is one."""
        return getattr(self._coordinator, "session", None)

    @property
    def loaded_models(self) -> LoadedModels:
        """The models this process holds now (``list(mm.loaded_models.keys())``, as in the seed)."""
        return LoadedModels(self)

    def _aggressive(self) -> bool:
        if self.aggressive_cleanup is not None:
            return self.aggressive_cleanup
        return self._coordinator.default_aggressive()

    def connect(self) -> None:
        """Opens the sidecar session now (it opens on the first ``load_model`` otherwise), so
        that its threads are running before the app measures its idle footprint. Register the
        loaders first: the session announces them. No-op in local mode."""
        if isinstance(self._coordinator, SidecarCoordinator):
            self._coordinator.ensure_session()

    def register_model_loader(
        self, name: str, loader: Callable[[], M], unloader: Optional[Callable[[M], None]] = None
    ) -> ModelKey[M]:
        """Registers how to load ``name`` (``loader()`` returns the model) and, optionally, how to
        release it (``unloader(model)``, before the SDK drops its reference).

        Returns ``name`` as a :class:`ModelKey` (a ``str``): ``with mm.load_model(key) as model``
        then types ``model`` as what ``loader`` returns."""
        if not callable(loader):
            raise TypeError(f"loader for {name!r} is not callable")
        with self._cond:
            replaced = name in self._loaders
            self._loaders[name] = (loader, unloader)
        try:
            self._coordinator.model_registered(name)
        except Exception:
            with self._cond:
                self._loaders.pop(name, None)
            raise
        log.debug("%s model loader: %s", "Replaced" if replaced else "Registered", name)
        return ModelKey(name)

    @overload
    def load_model(self, name: ModelKey[M]) -> _LoadModel[M]: ...

    @overload
    def load_model(self, name: str) -> _LoadModel[Any]: ...

    def load_model(self, name: str) -> _LoadModel[Any]:
        """``with mm.load_model(name) as model:`` loads ``name`` if needed and holds it for the
        block. ``model`` is a proxy that forwards to the model and lets go of it at the end."""
        self._check_registered(name)
        return _LoadModel(self, str(name))

    @overload
    def load_model_async(self, name: ModelKey[M]) -> _AsyncLoadModel[M]: ...

    @overload
    def load_model_async(self, name: str) -> _AsyncLoadModel[Any]: ...

    def load_model_async(self, name: str) -> _AsyncLoadModel[Any]:
        """``async with mm.load_model_async(name) as model:``, the asyncio form of
        :meth:`load_model`: waiting for room, loading and unloading never block the event loop
        (they run in the manager's worker threads, ``$MODELPOOL_ASYNC_THREADS``, default 32;
        the loader is called in one of them)."""
        self._check_registered(name)
        return _AsyncLoadModel(self, str(name))

    def _check_registered(self, name: str) -> None:
        if name not in self._loaders:
            raise UnknownModelError(
                f"no loader registered for model {name!r} (registered: {', '.join(sorted(self._loaders)) or 'none'})"
            )

    def _executor(self) -> concurrent.futures.ThreadPoolExecutor:
        """The worker threads of the async API (created on first use)."""
        with self._executor_lock:
            if self._pool_executor is None:
                try:
                    threads = max(1, int(os.environ.get("MODELPOOL_ASYNC_THREADS", "32")))
                except ValueError:
                    threads = 32
                self._pool_executor = concurrent.futures.ThreadPoolExecutor(
                    max_workers=threads, thread_name_prefix="modelpool-async"
                )
            return self._pool_executor

    @contextlib.contextmanager
    def temporary_operation(self, name: str) -> Iterator[None]:
        """Logs memory before and after a job and cleans up after it, even when it fails."""
        log.info("Starting operation: %s", name)
        self._log_memory(f"before {name}")
        try:
            yield
        finally:
            log.info("Cleaning up after: %s", name)
            if self._aggressive():
                self._unload_idle(include_pinned=False, reason="cleanup")
            memory.release_memory()
            self._log_memory(f"after {name}")

    def unload_model(self, name: str) -> bool:
        """Unloads ``name`` now. A model inside a live ``with`` block is not unloaded (False)."""
        return self._unload(name, reason="app")

    def unload_all_models(self) -> None:
        """Unloads every model no ``with`` block is using."""
        self._unload_idle(include_pinned=True, reason="app")

    def force_cleanup(self) -> None:
        """The seed's emergency cleanup: unload everything not in use, empty the CUDA cache
        (3 times), collect garbage, ``ipc_collect``, ``malloc_trim``; with a sidecar, also ask it
        for a forced cleanup of the pod."""
        log.info("Force cleanup: unloading all models")
        self._unload_idle(include_pinned=True, reason="cleanup")
        self._coordinator.cleanup(force=True)
        memory.release_memory(cuda_passes=3)
        self._log_memory("after cleanup")

    def get_memory_stats(self) -> Dict[str, Any]:
        """The seed's keys (``ram_used_gb``, ``ram_total_gb``, ``ram_percent``, ``vram_allocated_gb``,
        ``vram_total_gb``, ``vram_percent``) and more. With a sidecar the seed's keys are the
        sidecar's (it sees the whole pod and the GPU); ``sidecar`` holds its full state."""
        stats = memory.memory_stats()
        if self.mode == "sidecar":
            try:
                state = self._coordinator.state()
            except Exception as error:
                log.debug("sidecar state unavailable: %s", error)
                state = None
            if state:
                for key in ("ram_used_gb", "ram_total_gb", "ram_percent", "vram_allocated_gb", "vram_total_gb", "vram_percent"):
                    if isinstance(state.get(key), (int, float)):
                        stats[key] = float(state[key])
                stats["sidecar"] = state
        stats["loaded_models"] = list(self.loaded_models)
        return stats

    def check_memory_available(self, required_vram_gb: float = 0.0, required_ram_gb: float = 0.0) -> bool:
        """True when ``required_vram_gb`` (and ``required_ram_gb``) could be had now, counting
        what unloading idle models would free."""
        vram = int(required_vram_gb * memory.GIB)
        ram = int(required_ram_gb * memory.GIB)
        try:
            ok, message, _ = self._coordinator.check(vram, ram)
        except Exception as error:
            log.warning("sidecar check failed (%s): checking in-process", error)
            ok, message, _ = LocalCoordinator(self, self.pool).check(vram, ram)
        if not ok:
            log.warning(
                "Not enough memory for %.1f GB VRAM%s: %s",
                required_vram_gb,
                f" + {required_ram_gb:.1f} GB RAM" if required_ram_gb else "",
                message,
            )
        return ok

    def auto_cleanup_if_needed(self, threshold_percent: float = 80.0) -> bool:
        """Unloads idle models and flushes caches when RAM or VRAM use is above the threshold.
        Returns True when it cleaned up."""
        stats = memory.memory_stats()
        over = stats["ram_percent"] > threshold_percent or (stats["gpu"] and stats["vram_percent"] > threshold_percent)
        if not over:
            return False
        log.warning(
            "Memory above %.1f%% (RAM %.1f%%, VRAM %.1f%%): cleaning up",
            threshold_percent,
            stats["ram_percent"],
            stats["vram_percent"],
        )
        self._unload_idle(include_pinned=False, reason="pressure")
        memory.release_memory()
        return True

    def close(self) -> None:
        """Ends the sidecar session (its leases end at once) and stops the background threads.
        Models stay loaded; call :meth:`unload_all_models` first to free them."""
        if self._closed:
            return
        self._closed = True
        self._coordinator.close()
        executor, self._pool_executor = self._pool_executor, None
        if executor is not None:
            executor.shutdown(wait=False)

    # --- internals: load, release, unload ------------------------------------------------------

    def _log_memory(self, when: str) -> None:
        if log.isEnabledFor(logging.INFO):
            log.info("Memory %s: %s", when, memory.format_stats(memory.memory_stats()))

    def _holds(self) -> List[Dict[str, Any]]:
        with self._cond:
            return [
                # `leases`: how many `with` blocks use it now (not in the v1 contract yet; the
                # sidecar ignores unknown fields) so a restarted sidecar could keep it leased
                {"model": n, "vram_bytes": e.vram_bytes or 0, "ram_bytes": e.ram_bytes or 0, "leases": e.leases}
                for n, e in self._entries.items()
                if e.state == "loaded"
            ]

    def _enter(self, name: str) -> Tuple[Grant, ModelProxy]:
        loader, unloader = self._loaders[name]
        with self._cond:
            while name in self._entries and self._entries[name].state == "unloading":
                self._cond.wait(1.0)  # finish (and report) the unload before asking again
            cached = name in self._entries and self._entries[name].state == "loaded"
        if not cached:
            self._log_memory(f"before {name}")
        grant = self._coordinator.acquire(name)
        must_load = False
        with self._cond:
            while True:
                entry = self._entries.get(name)
                if entry is None:
                    entry = _Entry(name)
                    self._entries[name] = entry
                    must_load = True
                    break
                if entry.state == "loaded":
                    break
                self._cond.wait(1.0)  # another thread is loading or unloading it
            entry.leases += 1
            entry.last_used = time.monotonic()
        if must_load:
            try:
                self._load(entry, loader)
            except BaseException as error:
                with self._cond:
                    entry.leases -= 1
                    self._entries.pop(name, None)
                    self._cond.notify_all()
                try:
                    self._coordinator.loaded(grant, False, error=f"{type(error).__name__}: {error}")
                except Exception as report_error:
                    log.debug("could not report the failed load of %s: %s", name, report_error)
                if self.clear_error_frames and error.__traceback__ is not None:
                    traceback.clear_frames(error.__traceback__.tb_next or error.__traceback__)
                memory.release_memory()
                log.error("Failed to load model %s: %s", name, error)
                raise
            grant = self._report_loaded(grant, entry)
        elif grant.decision == "load":
            # the sidecar did not know we hold it (a new session): report what we measured
            grant = self._report_loaded(grant, entry)
        else:
            log.info("Using loaded model: %s", name)
        with self._cond:
            self._grants[id(grant)] = grant
            if grant.instance is not None:
                entry.instance = grant.instance
            proxy = ModelProxy(name, entry.model)
            entry.proxies = [r for r in entry.proxies if r() is not None]
            entry.proxies.append(weakref.ref(proxy))
        return grant, proxy

    def _active_grants(self) -> List[Grant]:
        with self._cond:
            return list(self._grants.values())

    def _measured(self, name: str) -> Dict[str, Any]:
        with self._cond:
            entry = self._entries.get(name)
            if entry is None:
                return {}
            return {"load_seconds": entry.load_seconds, "ram_bytes": entry.ram_bytes, "vram_bytes": entry.vram_bytes}

    def _report_loaded(self, grant: Grant, entry: _Entry) -> Grant:
        try:
            return self._coordinator.loaded(
                grant,
                True,
                load_seconds=entry.load_seconds,
                ram_bytes=entry.ram_bytes,
                vram_bytes=entry.vram_bytes,
            )
        except Exception as error:
            log.warning("could not report %s as loaded: %s", entry.name, error)
            return grant

    def _load(self, entry: _Entry, loader: Loader) -> None:
        log.info("Loading model: %s", entry.name)
        torch = memory.torch_cuda()
        vram_before = torch.cuda.memory_allocated() if torch is not None else None
        rss_before = memory.rss_bytes()
        started = time.monotonic()
        entry.model = loader()
        entry.load_seconds = time.monotonic() - started
        entry.ram_bytes = max(0, memory.rss_bytes() - rss_before)
        torch = memory.torch_cuda()
        if torch is not None:
            entry.vram_bytes = max(0, int(torch.cuda.memory_allocated()) - int(vram_before or 0))
        entry.loaded_at = time.monotonic()
        learned = self._learned.setdefault(entry.name, {})
        learned["ram"] = max(learned.get("ram", 0), entry.ram_bytes)
        if entry.vram_bytes is not None:
            learned["vram"] = max(learned.get("vram", 0), entry.vram_bytes)
        with self._cond:
            entry.state = "loaded"
            self._cond.notify_all()
        log.info(
            "Model loaded: %s (%.2f s, RAM +%s%s)",
            entry.name,
            entry.load_seconds,
            memory.format_bytes(entry.ram_bytes),
            f", VRAM +{memory.format_bytes(entry.vram_bytes)}" if entry.vram_bytes is not None else "",
        )
        self._log_memory(f"after {entry.name}")

    def _exit(
        self, name: str, grant: Grant, proxy: ModelProxy, exc: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        aggressive = self._aggressive()
        proxy._modelpool_detach(
            f"model {name!r} was unloaded when its `with load_model({name!r})` block ended; "
            "load it again in a new block"
            if aggressive
            else f"model {name!r} was released when its `with load_model({name!r})` block ended "
            "(it may still be cached); use it inside a new block"
        )
        if exc is not None and tb is not None and self.clear_error_frames:
            # The frames the exception went through inside the block (model code) hold the model
            # (`self`, tensors): clear their locals so the unload below can free the memory even
            # while the app handles the exception. The block's own frame is still running and is
            # left alone.
            traceback.clear_frames(tb)
        with self._cond:
            self._grants.pop(id(grant), None)
            entry = self._entries.get(name)
            if entry is not None:
                entry.leases = max(0, entry.leases - 1)
                entry.last_used = time.monotonic()
            self._cond.notify_all()
        unload = self._coordinator.release(grant, aggressive)
        if self.aggressive_cleanup is True and not self._pinned(name):
            unload = True  # the app asked for aggressive cleanup, whatever the pool's mode
        if exc is not None:
            log.error("Error while using model %s: %s: %s", name, type(exc).__name__, exc)
        if unload:
            self._unload(name, reason="released")

    def _unload(self, name: str, reason: str, command: Optional[Any] = None) -> bool:
        with self._cond:
            while True:
                entry = self._entries.get(name)
                if entry is None:
                    break
                if entry.leases > 0:
                    log.warning("Not unloading model %s: %d `with` block(s) still use it", name, entry.leases)
                    return False
                if entry.state == "loaded":
                    break
                self._cond.wait(1.0)  # loading or unloading in another thread
            if entry is None:
                # a stale command (its instance is gone already): nothing to free or answer
                return False
            entry.state = "unloading"
            instance = entry.instance
            model = entry.model
            entry.model = None
            for ref in entry.proxies:
                proxy = ref()
                if proxy is not None and proxy._modelpool_attached():
                    proxy._modelpool_detach(f"model {name!r} was unloaded ({reason})")
            entry.proxies.clear()
            unloader = self._loaders.get(name, (None, None))[1]
        log.info("Unloading model: %s%s", name, "" if reason in ("released", "app") else f" ({reason})")
        rss_before = memory.rss_bytes()
        try:
            witness = weakref.ref(model)
        except TypeError:
            witness = None
        if unloader is not None:
            try:
                unloader(model)
            except Exception as error:
                log.error("Unloader of model %s failed: %s", name, error)
        del model
        memory.release_memory()
        freed = rss_before - memory.rss_bytes()
        log.info("Model unloaded: %s (RAM -%s)", name, memory.format_bytes(max(0, freed)))
        if witness is not None and witness() is not None:
            log.warning(
                "Model %s is still referenced somewhere after its unload (a variable, a cache, a "
                "closure): its memory cannot be freed until that reference goes",
                name,
            )
        # Tell the sidecar before the entry goes: until then a new acquire of this model in this
        # process waits, so a late /v1/unloaded can never be taken for the next load's.
        try:
            self._coordinator.unloaded(name, command, instance)
        finally:
            with self._cond:
                self._entries.pop(name, None)
                self._cond.notify_all()
        self._log_memory("after cleanup")
        return True

    def _unload_commanded(self, name: str, reason: str, command: Any, instance: Optional[int] = None) -> bool:
        """An ``unload`` command from the sidecar's stream for one instance (``instance``: its
        generation); False when it cannot be done now. A command for an instance this process no
        longer holds (a later load of the model, or none) is stale: ignored, the sidecar drops it."""
        with self._cond:
            entry = self._entries.get(name)
            if entry is None or (instance is not None and entry.instance not in (None, instance)):
                log.debug("stale sidecar command to unload %s (generation %s): ignored", name, instance)
                return True
            if entry.leases > 0 or entry.state == "loading":
                log.debug("sidecar asked to unload %s (%s) while it is in use: not now", name, reason)
                return False
        self._unload(name, reason=reason or "sidecar", command=command)
        return True

    def _unload_idle(self, include_pinned: bool, reason: str) -> None:
        pool = self.pool
        with self._cond:
            names = [
                n
                for n, e in self._entries.items()
                if e.leases == 0
                and (include_pinned or not (pool and pool.models.get(n) and pool.models[n].pinned))
            ]
            busy = [n for n, e in self._entries.items() if e.leases > 0]
        for name in names:
            self._unload(name, reason=reason)
        if busy:
            log.warning("Models still in use, not unloaded: %s", ", ".join(busy))

    def _pinned(self, name: str) -> bool:
        pool = self.pool
        spec = pool.models.get(name) if pool else None
        return bool(spec and spec.pinned)

    def _after_fork(self) -> None:
        self._cond = threading.Condition(threading.RLock())
        self._executor_lock = threading.Lock()
        self._pool_executor = None  # its threads did not survive the fork
        self._coordinator.after_fork()


def _program_name() -> str:
    import sys

    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else "python"
    return os.path.basename(argv0) or "python"


def _close_weak(ref: "weakref.ReferenceType[MemoryManager]") -> None:
    manager = ref()
    if manager is not None:
        try:
            manager.close()
        except Exception:
            pass


def _after_fork_weak(ref: "weakref.ReferenceType[MemoryManager]") -> None:
    manager = ref()
    if manager is not None:
        manager._after_fork()


_global: Optional[MemoryManager] = None
_global_lock = threading.Lock()


def get_memory_manager(aggressive_cleanup: Optional[bool] = None, **kwargs: Any) -> MemoryManager:
    """The process-wide manager (created on the first call, like the seed's).

    A later call with ``aggressive_cleanup`` set changes the mode of the existing manager.
    ``kwargs`` (``sidecar``, ``pool``, ``app``) apply when it is created.
    """
    global _global
    with _global_lock:
        if _global is None:
            _global = MemoryManager(aggressive_cleanup, **kwargs)
        elif aggressive_cleanup is not None:
            _global.aggressive_cleanup = aggressive_cleanup
        return _global


def reset_memory_manager() -> None:
    """Closes and forgets the process-wide manager (tests, or re-reading the environment)."""
    global _global
    with _global_lock:
        manager, _global = _global, None
    if manager is not None:
        manager.close()
