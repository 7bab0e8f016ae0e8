"""The object ``with load_model(name) as model`` binds: the model while the block runs, nothing after.

The seed's own example leaves the name ``model`` bound after the ``with``. If it were the model
itself, that name alone would keep the weights alive after the "unload". The proxy forwards
attribute access, calls, item access, iteration and the usual operators to the model, and drops
its reference when the block ends; using it afterwards raises :class:`ModelUnloadedError`.

``isinstance(model, torch.nn.Module)`` works (``__class__`` reports the model's class). Code that
needs the real object (a C extension, ``torch.compile``) takes ``modelpool.unwrap(model)``, and
must not keep that reference past the block.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Optional

from .errors import ModelUnloadedError

_UNSET = object()


class ModelProxy:
    """Forwards to a loaded model until :meth:`_modelpool_detach` is called."""

    __slots__ = ("_modelpool_target", "_modelpool_name", "_modelpool_why", "__weakref__")

    def __init__(self, name: str, target: Any) -> None:
        object.__setattr__(self, "_modelpool_target", target)
        object.__setattr__(self, "_modelpool_name", name)
        object.__setattr__(self, "_modelpool_why", None)

    # --- the SDK's side --------------------------------------------------------------------

    def _modelpool_detach(self, why: str) -> None:
        object.__setattr__(self, "_modelpool_target", _UNSET)
        object.__setattr__(self, "_modelpool_why", why)

    def _modelpool_attached(self) -> bool:
        return object.__getattribute__(self, "_modelpool_target") is not _UNSET

    def _modelpool_get(self) -> Any:
        target = object.__getattribute__(self, "_modelpool_target")
        if target is _UNSET:
            raise ModelUnloadedError(object.__getattribute__(self, "_modelpool_why"))
        return target

    # --- forwarding -----------------------------------------------------------------------

    @property  # type: ignore[misc]
    def __class__(self) -> type:  # noqa: D105 - isinstance() support
        target = object.__getattribute__(self, "_modelpool_target")
        return ModelProxy if target is _UNSET else type(target)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._modelpool_get(), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._modelpool_get(), name, value)

    def __delattr__(self, name: str) -> None:
        delattr(self._modelpool_get(), name)

    def __dir__(self) -> Any:
        target = object.__getattribute__(self, "_modelpool_target")
        return dir(type(self)) if target is _UNSET else dir(target)

    def __repr__(self) -> str:
        name = object.__getattribute__(self, "_modelpool_name")
        target = object.__getattribute__(self, "_modelpool_target")
        if target is _UNSET:
            return f"<modelpool proxy for {name!r}: unloaded>"
        return f"<modelpool proxy for {name!r}: {target!r}>"

    def __str__(self) -> str:
        return str(self._modelpool_get())

    def __bool__(self) -> bool:
        return bool(self._modelpool_get())

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._modelpool_get()(*args, **kwargs)

    def __len__(self) -> int:
        return len(self._modelpool_get())

    def __iter__(self) -> Any:
        return iter(self._modelpool_get())

    def __contains__(self, item: Any) -> bool:
        return item in self._modelpool_get()

    def __getitem__(self, key: Any) -> Any:
        return self._modelpool_get()[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        self._modelpool_get()[key] = value

    def __delitem__(self, key: Any) -> None:
        del self._modelpool_get()[key]

    def __enter__(self) -> Any:
        return self._modelpool_get().__enter__()

    def __exit__(self, *exc: Any) -> Any:
        return self._modelpool_get().__exit__(*exc)

    def __eq__(self, other: Any) -> bool:
        return bool(self._modelpool_get() == unwrap(other))

    def __ne__(self, other: Any) -> bool:
        return bool(self._modelpool_get() != unwrap(other))

    __hash__ = None  # type: ignore[assignment]


def _binary(op: Callable[[Any, Any], Any]) -> Any:
    def forward(self: ModelProxy, other: Any) -> Any:
        return op(self._modelpool_get(), unwrap(other))

    def reflected(self: ModelProxy, other: Any) -> Any:
        return op(unwrap(other), self._modelpool_get())

    return forward, reflected


for _name, _op in (
    ("add", operator.add),
    ("sub", operator.sub),
    ("mul", operator.mul),
    ("matmul", operator.matmul),
    ("truediv", operator.truediv),
    ("floordiv", operator.floordiv),
    ("mod", operator.mod),
    ("pow", operator.pow),
    ("and", operator.and_),
    ("or", operator.or_),
    ("xor", operator.xor),
    ("lshift", operator.lshift),
    ("rshift", operator.rshift),
):
    _forward, _reflected = _binary(_op)
    setattr(ModelProxy, f"__{_name}__", _forward)
    setattr(ModelProxy, f"__r{_name}__", _reflected)

for _name, _op in (("lt", operator.lt), ("le", operator.le), ("gt", operator.gt), ("ge", operator.ge)):
    setattr(ModelProxy, f"__{_name}__", _binary(_op)[0])

def _unary(op: Callable[[Any], Any]) -> Callable[[ModelProxy], Any]:
    def forward(self: ModelProxy) -> Any:
        return op(self._modelpool_get())

    return forward


for _uname, _uop in (("neg", operator.neg), ("pos", operator.pos), ("abs", operator.abs), ("invert", operator.invert)):
    setattr(ModelProxy, f"__{_uname}__", _unary(_uop))


def unwrap(value: Any) -> Any:
    """The real model behind a proxy (anything else is returned as it is).

    Raises :class:`ModelUnloadedError` for a proxy whose block has ended.
    """
    if type(value) is ModelProxy:
        return value._modelpool_get()
    return value


def proxy_name(value: Any) -> Optional[str]:
    """The model name of a proxy, or None."""
    if type(value) is ModelProxy:
        return str(object.__getattribute__(value, "_modelpool_name"))
    return None
