"""A stand-in for the parts of torch the GPU check's app and tenant use (see ../README.md)."""

from __future__ import annotations

import os
import threading

import fakegpu

__version__ = "0.0+fake"


class version:  # noqa: N801 - mirrors torch.version
    cuda = "fake"


uint8 = "uint8"
float32 = "float32"


class device:  # noqa: N801
    def __init__(self, kind: str, index: int = 0) -> None:
        self.type, self.index = kind, index


class OutOfMemoryError(RuntimeError):
    pass


class _State:
    lock = threading.RLock()
    initialized = False
    allocated = 0
    reserved = 0
    fraction = 1.0


def _publish() -> None:
    fakegpu.set_usage(os.getpid(), fakegpu.CONTEXT + _State.reserved)


def _alloc(nbytes: int) -> None:
    with _State.lock:
        if _State.allocated + nbytes > _State.reserved:
            grow = _State.allocated + nbytes - _State.reserved
            if _State.reserved + grow > _State.fraction * fakegpu.TOTAL:  # as torch's caching allocator
                raise OutOfMemoryError(f"CUDA out of memory. Tried to allocate {nbytes} bytes (per-process fraction {_State.fraction:.3f})")
            others = fakegpu.used() - fakegpu.CONTEXT - _State.reserved
            if others + fakegpu.CONTEXT + _State.reserved + grow > fakegpu.TOTAL:
                _State.reserved = _State.allocated  # torch frees its cache and retries
                grow = nbytes
                if others + fakegpu.CONTEXT + _State.reserved + grow > fakegpu.TOTAL:
                    _publish()
                    raise OutOfMemoryError(f"CUDA out of memory. Tried to allocate {nbytes} bytes")
            _State.reserved += grow
        _State.allocated += nbytes
        _publish()


def _free(nbytes: int) -> None:
    with _State.lock:
        _State.allocated -= nbytes


class _Scalar:
    def __init__(self, value: int) -> None:
        self.value = value

    def item(self) -> int:
        return self.value


class Tensor:
    def __init__(self, nbytes: int, value: int = 0, owner: bool = True) -> None:
        self.nbytes, self.value, self.owner = nbytes, value, False
        if owner:
            _alloc(nbytes)
            self.owner = True

    def __del__(self) -> None:
        if self.owner:
            _free(self.nbytes)

    def fill_(self, value: int) -> "Tensor":
        self.value = value
        return self

    def __getitem__(self, item: slice) -> "Tensor":
        start, stop, _ = item.indices(self.nbytes)
        return Tensor(max(0, stop - start), self.value, owner=False)

    def sum(self) -> _Scalar:
        return _Scalar(self.nbytes * self.value)


def empty(nbytes: int, dtype: str = uint8, device: object = None) -> Tensor:
    return Tensor(int(nbytes))


def ones(nbytes: int, dtype: str = uint8, device: object = None) -> Tensor:
    return Tensor(int(nbytes), 1)


def zeros(nbytes: int, dtype: str = uint8, device: object = None) -> Tensor:
    return Tensor(int(nbytes), 0)


class cuda:  # noqa: N801 - torch.cuda
    OutOfMemoryError = OutOfMemoryError

    @staticmethod
    def init() -> None:
        with _State.lock:
            _State.initialized = True
            _publish()

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def is_initialized() -> bool:
        return _State.initialized

    @staticmethod
    def mem_get_info(device: object = None) -> tuple:
        return fakegpu.TOTAL - fakegpu.used(), fakegpu.TOTAL

    @staticmethod
    def memory_allocated(device: object = None) -> int:
        return _State.allocated

    @staticmethod
    def memory_reserved(device: object = None) -> int:
        return _State.reserved

    @staticmethod
    def synchronize(device: object = None) -> None:
        pass

    @staticmethod
    def empty_cache() -> None:
        with _State.lock:
            _State.reserved = _State.allocated
            _publish()

    @staticmethod
    def ipc_collect() -> None:
        pass

    @staticmethod
    def get_device_name(device: object = None) -> str:
        return "Fake H100"

    @staticmethod
    def current_device() -> int:
        return 0

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def get_device_properties(device: object = None) -> object:
        class Properties:
            name = "Fake H100"
            total_memory = fakegpu.TOTAL

        return Properties()

    @staticmethod
    def set_per_process_memory_fraction(fraction: float, device: object = None) -> None:
        _State.fraction = float(fraction)

    @staticmethod
    def get_per_process_memory_fraction(device: object = None) -> float:
        return _State.fraction
