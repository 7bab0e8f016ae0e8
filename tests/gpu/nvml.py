"""NVML readings for the GPU check, fastest source first: pynvml if installed, else NVML through
ctypes (``libnvidia-ml.so.1``, which ships with the driver), else ``nvidia-smi`` (slow: ~50 ms a
call, so reclaim times measured through it are coarse; the summary says which source was used).
"""

from __future__ import annotations

import ctypes
import subprocess
from typing import Dict, List, Optional, Tuple

import gpulib

NVML_VALUE_NOT_AVAILABLE = 0xFFFFFFFFFFFFFFFF
NVML_ERROR_INSUFFICIENT_SIZE = 7


class _Memory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


class _ProcessV2(ctypes.Structure):
    """``nvmlProcessInfo_t`` as the ``_v2``/``_v3`` process queries fill it."""

    _fields_ = [
        ("pid", ctypes.c_uint),
        ("usedGpuMemory", ctypes.c_ulonglong),
        ("gpuInstanceId", ctypes.c_uint),
        ("computeInstanceId", ctypes.c_uint),
    ]


class _ProcessV1(ctypes.Structure):
    _fields_ = [("pid", ctypes.c_uint), ("usedGpuMemory", ctypes.c_ulonglong)]


def smi(args: List[str], timeout: float = 10.0) -> str:
    """Runs nvidia-smi with ``args``; its stdout (raises on failure)."""
    return subprocess.run(
        ["nvidia-smi", *args], check=True, capture_output=True, text=True, timeout=timeout
    ).stdout


def smi_compute_apps(index: int = 0) -> Tuple[str, Dict[int, Optional[int]]]:
    """The exact query the issue names, raw CSV and parsed."""
    text = smi(["--query-compute-apps=pid,used_memory", "--format=csv", "-i", str(index)])
    return text, gpulib.parse_compute_apps(text)


class Nvml:
    """Device and per-process memory of GPU ``index``."""

    def __init__(self, index: int = 0) -> None:
        self.index = index
        self.backend = "nvidia-smi"
        self.process_backend = "nvidia-smi"
        self.notes: List[str] = []
        self._pynvml = None
        self._lib = None
        self._handle = None
        self._proc_fn = None
        self._proc_struct = _ProcessV2
        try:
            import pynvml  # type: ignore[import-not-found]

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._pynvml = pynvml
            self.backend = self.process_backend = "pynvml"
            return
        except Exception as error:  # not installed, or no driver
            self.notes.append(f"pynvml unavailable: {error!r}")
        try:
            lib = ctypes.CDLL("libnvidia-ml.so.1")
            if lib.nvmlInit_v2() != 0:
                raise RuntimeError("nvmlInit_v2 failed")
            handle = ctypes.c_void_p()
            if lib.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(index), ctypes.byref(handle)) != 0:
                raise RuntimeError(f"nvmlDeviceGetHandleByIndex_v2({index}) failed")
            self._lib, self._handle = lib, handle
            self.backend = "nvml-ctypes"
            for name, struct in (
                ("nvmlDeviceGetComputeRunningProcesses_v3", _ProcessV2),
                ("nvmlDeviceGetComputeRunningProcesses_v2", _ProcessV2),
                ("nvmlDeviceGetComputeRunningProcesses", _ProcessV1),
            ):
                fn = getattr(lib, name, None)
                if fn is not None:
                    self._proc_fn, self._proc_struct = fn, struct
                    self.process_backend = f"nvml-ctypes ({name})"
                    break
        except Exception as error:
            self.notes.append(f"NVML through ctypes unavailable: {error!r}")
            self._lib = None

    def device(self) -> Tuple[Optional[int], Optional[int]]:
        """(used, total) bytes of the device."""
        try:
            if self._pynvml is not None:
                info = self._pynvml.nvmlDeviceGetMemoryInfo(self._handle)
                return int(info.used), int(info.total)
            if self._lib is not None:
                memory = _Memory()
                if self._lib.nvmlDeviceGetMemoryInfo(self._handle, ctypes.byref(memory)) == 0:
                    return int(memory.used), int(memory.total)
            text = smi(["--query-gpu=memory.used,memory.total", "--format=csv,noheader,nounits", "-i", str(self.index)])
            used, total = (gpulib.parse_size(part) for part in text.strip().split(","))
            return used, total
        except Exception:
            return None, None

    def processes(self) -> Dict[int, Optional[int]]:
        """{pid: bytes} of the compute processes on the device (pids as NVML sees them)."""
        if self.process_backend != "nvidia-smi":
            try:
                return self._fast_processes()
            except Exception as error:
                self.notes.append(f"{self.process_backend} process query failed, using nvidia-smi: {error!r}")
                self.process_backend = "nvidia-smi"
        try:
            return smi_compute_apps(self.index)[1]
        except Exception as error:  # a transient nvidia-smi failure: no reading this time
            if len(self.notes) < 50:
                self.notes.append(f"nvidia-smi --query-compute-apps failed: {error!r}")
            return {}

    def _fast_processes(self) -> Dict[int, Optional[int]]:
        if self._pynvml is not None:
            return {
                int(p.pid): (None if p.usedGpuMemory is None else int(p.usedGpuMemory))
                for p in self._pynvml.nvmlDeviceGetComputeRunningProcesses(self._handle)
            }
        if self._lib is None or self._proc_fn is None:
            raise RuntimeError("no NVML process query")
        capacity = 64
        while True:
            count = ctypes.c_uint(capacity)
            array = (self._proc_struct * capacity)()
            rc = self._proc_fn(self._handle, ctypes.byref(count), array)
            if rc == NVML_ERROR_INSUFFICIENT_SIZE and capacity < 4096:
                capacity *= 4
                continue
            if rc != 0:
                raise RuntimeError(f"process query failed: NVML error {rc}")
            out: Dict[int, Optional[int]] = {}
            for i in range(count.value):
                used = int(array[i].usedGpuMemory)
                out[int(array[i].pid)] = None if used == NVML_VALUE_NOT_AVAILABLE else used
            return out

    def validate_processes(self) -> None:
        """Cross-checks the fast process query against nvidia-smi once processes exist; on a
        mismatch (a struct layout this driver does not use) falls back to nvidia-smi."""
        if self.process_backend == "nvidia-smi":
            return
        try:
            fast = self._fast_processes()
            _, slow = smi_compute_apps(self.index)
        except Exception as error:
            self.notes.append(f"could not cross-check process readings ({error!r}); using nvidia-smi")
            self.process_backend = "nvidia-smi"
            return
        agree = set(fast) == set(slow) and all(
            fast[pid] is None or slow[pid] is None or gpulib.within_percent(fast[pid], slow[pid], 2.0, 2 * gpulib.MIB)
            for pid in slow
        )
        if agree:
            self.notes.append(f"{self.process_backend} agrees with nvidia-smi: {slow}")
        else:
            self.notes.append(f"{self.process_backend} disagreed with nvidia-smi ({fast} vs {slow}); using nvidia-smi")
            self.process_backend = "nvidia-smi"
