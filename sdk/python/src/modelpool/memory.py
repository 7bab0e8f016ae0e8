"""Measuring memory from inside the app, and giving freed memory back.

Stdlib only. RAM comes from ``/proc`` and cgroup v2; VRAM from PyTorch when the app has already
imported it and initialised CUDA (the SDK never imports torch, nor creates a CUDA context, on its
own), else from pynvml when it is installed, else it reads as zero with ``gpu: False``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os
import sys
import threading
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

_log = logging.getLogger("modelpool")

GIB = 1024**3
MIB = 1024**2

_PROC_STATUS = "/proc/self/status"


def _status_kib(field: str, path: str = _PROC_STATUS) -> Optional[int]:
    try:
        with open(path, "rb") as handle:
            for line in handle:
                if line.startswith(field.encode() + b":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def rss_bytes(pid: Optional[int] = None) -> int:
    """Resident set size (``VmRSS``) of this process (or ``pid``), in bytes; 0 if unknown."""
    path = _PROC_STATUS if pid is None else f"/proc/{pid}/status"
    kib = _status_kib("VmRSS", path)
    if kib is None:
        try:  # not Linux: the peak is the best the stdlib offers
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return int(peak if sys.platform == "darwin" else peak * 1024)
        except (ImportError, OSError):
            return 0
    return kib * 1024


def peak_rss_bytes() -> int:
    """Peak resident set size (``VmHWM``) since start or the last :func:`reset_peak_rss`."""
    kib = _status_kib("VmHWM")
    return 0 if kib is None else kib * 1024


def reset_peak_rss() -> bool:
    """Resets ``VmHWM`` to the current RSS (Linux ``/proc/self/clear_refs``); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _read_int(path: str) -> Optional[int]:
    try:
        with open(path) as handle:
            text = handle.read().strip()
    except OSError:
        return None
    if not text or text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _meminfo() -> Dict[str, int]:
    values: Dict[str, int] = {}
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts:
                    values[key] = int(parts[0]) * 1024
    except (OSError, ValueError):
        pass
    return values


def ram_reading() -> Tuple[int, int, str]:
    """``(used, total, source)`` for host memory, as the seed reported it.

    Inside a memory-limited cgroup (a container with a limit) it is the cgroup's working set
    (``memory.current`` less inactive file cache) over its limit; otherwise the machine's
    ``MemTotal - MemAvailable`` over ``MemTotal``.
    """
    info = _meminfo()
    total = info.get("MemTotal", 0)
    limit = _read_int("/sys/fs/cgroup/memory.max")
    if limit is not None and 0 < limit < total:
        current = _read_int("/sys/fs/cgroup/memory.current") or 0
        inactive = 0
        try:
            with open("/sys/fs/cgroup/memory.stat") as handle:
                for line in handle:
                    if line.startswith("inactive_file "):
                        inactive = int(line.split()[1])
                        break
        except (OSError, ValueError):
            pass
        return max(0, current - inactive), limit, "cgroup"
    if total:
        available = info.get("MemAvailable", info.get("MemFree", 0))
        return max(0, total - available), total, "proc"
    return 0, 0, "none"


@dataclass
class VramReading:
    """What the app can see of GPU memory."""

    gpu: bool
    source: str  # "torch", "nvml" or "none"
    allocated: int = 0  # this process (torch allocator, or NVML's per-process figure)
    reserved: int = 0  # torch's cached + allocated
    device_used: int = 0
    device_total: int = 0
    process: Optional[int] = None  # NVML's per-process usage, includes the CUDA context


def torch_cuda() -> Any:
    """The ``torch`` module if the app imported it and CUDA is initialised here, else None.

    Never imports torch and never creates a CUDA context.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return torch
    except Exception:  # pragma: no cover - a broken CUDA install
        return None
    return None


_nvml_lock = threading.Lock()
_nvml_state: Dict[str, Any] = {}


def _nvml() -> Any:
    """pynvml, initialised once, or None."""
    with _nvml_lock:
        if "module" in _nvml_state:
            return _nvml_state["module"]
        module = None
        try:
            import pynvml  # type: ignore[import-not-found]

            pynvml.nvmlInit()
            module = pynvml
        except Exception:
            module = None
        _nvml_state["module"] = module
        return module


def _nvml_reading(device_index: int = 0) -> Optional[VramReading]:
    nvml = _nvml()
    if nvml is None:
        return None
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(device_index)
        info = nvml.nvmlDeviceGetMemoryInfo(handle)
        process = None
        pid = os.getpid()
        for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == pid and proc.usedGpuMemory is not None:
                process = int(proc.usedGpuMemory)
        return VramReading(
            gpu=True,
            source="nvml",
            allocated=process or 0,
            device_used=int(info.used),
            device_total=int(info.total),
            process=process,
        )
    except Exception:
        return None


def vram_reading(device_index: int = 0) -> VramReading:
    """GPU memory as this process sees it (see the module doc for the sources)."""
    torch = torch_cuda()
    if torch is not None:
        try:
            free, total = torch.cuda.mem_get_info(device_index)
            reading = VramReading(
                gpu=True,
                source="torch",
                allocated=int(torch.cuda.memory_allocated(device_index)),
                reserved=int(torch.cuda.memory_reserved(device_index)),
                device_used=int(total - free),
                device_total=int(total),
            )
            nvml = _nvml_reading(device_index)
            if nvml is not None:
                reading.process = nvml.process
            return reading
        except Exception:
            pass
    nvml = _nvml_reading(device_index)
    if nvml is not None:
        return nvml
    return VramReading(gpu=False, source="none")


def heartbeat_readings() -> Optional[Dict[str, Any]]:
    """The app-side readings a heartbeat carries (``None`` when the app sees no GPU)."""
    reading = vram_reading()
    if not reading.gpu:
        return None
    out: Dict[str, Any] = {
        "source": reading.source,
        "device_vram_used_bytes": reading.device_used,
        "device_vram_total_bytes": reading.device_total,
    }
    if reading.process is not None:
        out["process_vram_bytes"] = reading.process
    elif reading.source == "torch":
        out["process_vram_bytes"] = reading.reserved
    return out


def memory_stats() -> Dict[str, Any]:
    """The seed's ``get_memory_stats`` keys, measured in this process, plus a few more."""
    ram_used, ram_total, ram_source = ram_reading()
    vram = vram_reading()
    vram_used = vram.allocated if vram.source == "torch" else (vram.process or vram.device_used)
    return {
        "ram_used_gb": ram_used / GIB,
        "ram_total_gb": ram_total / GIB,
        "ram_percent": (100.0 * ram_used / ram_total) if ram_total else 0.0,
        "vram_allocated_gb": vram_used / GIB,
        "vram_total_gb": vram.device_total / GIB,
        "vram_percent": (100.0 * vram_used / vram.device_total) if vram.device_total else 0.0,
        "vram_reserved_gb": vram.reserved / GIB,
        "vram_device_used_gb": vram.device_used / GIB,
        "process_rss_gb": rss_bytes() / GIB,
        "gpu": vram.gpu,
        "sources": {"ram": ram_source, "vram": vram.source},
    }


def format_stats(stats: Dict[str, Any]) -> str:
    """``RAM 2.3/20.0GB (11.5%) | VRAM 12.1/24.0GB (50.4%)``, the seed's log format.

    Without a GPU the VRAM part says so (``VRAM no GPU``) instead of a misleading 0.0/0.0GB.
    """
    ram = f"RAM {stats['ram_used_gb']:.1f}/{stats['ram_total_gb']:.1f}GB ({stats['ram_percent']:.1f}%)"
    if not stats.get("vram_total_gb"):
        return f"{ram} | VRAM no GPU"
    return (
        f"{ram} | VRAM {stats['vram_allocated_gb']:.1f}/{stats['vram_total_gb']:.1f}GB"
        f" ({stats['vram_percent']:.1f}%)"
    )


def format_bytes(value: Optional[float]) -> str:
    """``1.5 GiB``, ``200.0 MiB``, ``512 B``."""
    if value is None:
        return "?"
    sign = "-" if value < 0 else ""
    value = abs(value)
    for unit, size in (("GiB", GIB), ("MiB", MIB), ("KiB", 1024)):
        if value >= size:
            return f"{sign}{value / size:.1f} {unit}"
    return f"{sign}{int(value)} B"


_libc: Dict[str, Any] = {}


def malloc_trim() -> bool:
    """glibc's ``malloc_trim(0)``: hands free heap pages back to the system. False elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    if "lib" not in _libc:
        lib = None
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            lib.malloc_trim.argtypes = [ctypes.c_size_t]
            lib.malloc_trim.restype = ctypes.c_int
        except (OSError, AttributeError):
            lib = None  # musl and others have no malloc_trim
        _libc["lib"] = lib
    lib = _libc["lib"]
    if lib is None:
        return False
    try:
        lib.malloc_trim(0)
        return True
    except Exception:  # pragma: no cover
        return False


def release_memory(cuda_passes: int = 1) -> None:
    """Collects garbage and gives freed memory back: the CUDA caching allocator's blocks
    (``empty_cache``, ``ipc_collect``) when the app uses torch on CUDA, and the C heap's free
    pages (``malloc_trim``)."""
    gc.collect()
    torch = torch_cuda()
    if torch is not None:
        for _ in range(max(1, cuda_passes)):
            try:
                torch.cuda.empty_cache()
            except Exception:
                break
        try:
            torch.cuda.ipc_collect()
        except Exception:
            pass
    malloc_trim()


def apply_vram_cap(pool: Any) -> bool:
    """``torch.cuda.set_per_process_memory_fraction`` from the pool's VRAM ceiling (+ baseline).

    Only when the app has imported torch and CUDA is available (the SDK never imports torch
    itself); ``MODELPOOL_VRAM_CAP=0`` turns it off. Returns True when nothing is left to do.
    """
    if os.environ.get("MODELPOOL_VRAM_CAP", "1") in ("0", "false", "off", "no"):
        return True
    if pool is None or not pool.limit_vram_bytes:
        return pool is not None
    torch = sys.modules.get("torch")
    if torch is None:
        return False  # maybe later, once the app imports torch
    try:
        if not torch.cuda.is_available():
            return True
        device = torch.cuda.current_device()
        total = int(torch.cuda.get_device_properties(device).total_memory)
        cap = pool.limit_vram_bytes + (pool.baseline_vram_bytes or 0)
        fraction = max(0.01, min(1.0, cap / total))
        torch.cuda.set_per_process_memory_fraction(fraction, device)
        _log.info(
            "VRAM cap for this process: %s of %s (torch.cuda.set_per_process_memory_fraction(%.3f))",
            format_bytes(min(cap, total)),
            format_bytes(total),
            fraction,
        )
    except Exception as error:
        _log.warning("could not set the PyTorch VRAM cap: %s", error)
    return True
