"""ModelPool's Python SDK: the seed's memory manager API, backed by the ModelPool sidecar.

::

    from modelpool import get_memory_manager

    memory_manager = get_memory_manager(aggressive_cleanup=True)
    memory_manager.register_model_loader("upscale", load_upscaler)
    with memory_manager.load_model("upscale") as model:
        result = model.process(data)
    # unloaded here, and the memory is back

With a sidecar (``$MODELPOOL_SOCKET``, default ``/var/run/modelpool/sidecar.sock``) the pod's
pool decides what may load and when to unload; without one the same policy runs in-process
(``$MODELPOOL_POOL`` optionally gives it a pool file). Logs go to the ``modelpool`` logger.
"""

from .errors import (
    AcquireRefusedError,
    ModelPoolError,
    ModelUnloadedError,
    SidecarError,
    SidecarUnavailableError,
    UnknownModelError,
)
from .manager import LoadedModels, MemoryManager, ModelKey, get_memory_manager, reset_memory_manager
from .memory import format_stats, memory_stats, rss_bytes
from .pool import Pool, PoolFileError, PoolModel, load_pool_file
from .proxy import ModelProxy, unwrap

__version__ = "0.1.0"

__all__ = [
    "AcquireRefusedError",
    "LoadedModels",
    "MemoryManager",
    "ModelKey",
    "ModelPoolError",
    "ModelProxy",
    "ModelUnloadedError",
    "Pool",
    "PoolFileError",
    "PoolModel",
    "SidecarError",
    "SidecarUnavailableError",
    "UnknownModelError",
    "format_stats",
    "get_memory_manager",
    "load_pool_file",
    "memory_stats",
    "reset_memory_manager",
    "rss_bytes",
    "unwrap",
]
