"""The exceptions the SDK raises. Every one derives from :class:`ModelPoolError`."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional


class ModelPoolError(Exception):
    """Base class of every error the SDK raises."""


class UnknownModelError(ModelPoolError, ValueError):
    """A model name that has no registered loader, or that the pool does not list."""


class AcquireRefusedError(ModelPoolError, RuntimeError):
    """The sidecar (or the in-process policy) refused to let a model load.

    ``reason`` is one of ``exceeds_ceiling``, ``timeout``, ``unknown_model``, ``unsized``, ``load_failed``,
    ``shutting_down``; the byte figures are those that made the decision, when known.
    """

    def __init__(
        self,
        model: str,
        reason: str,
        message: str,
        need_bytes: Optional[Mapping[str, Any]] = None,
        ceiling_bytes: Optional[Mapping[str, Any]] = None,
        held_bytes: Optional[Mapping[str, Any]] = None,
    ) -> None:
        super().__init__(message)
        self.model = model
        self.reason = reason
        self.message = message
        self.need_bytes: Dict[str, Any] = dict(need_bytes or {})
        self.ceiling_bytes: Dict[str, Any] = dict(ceiling_bytes or {})
        self.held_bytes: Dict[str, Any] = dict(held_bytes or {})


class ModelUnloadedError(ModelPoolError, RuntimeError):
    """A model proxy was used after its ``with load_model(...)`` block ended."""


class SidecarError(ModelPoolError):
    """The sidecar answered with an error body (``{"error": code, "message": ...}``)."""

    def __init__(self, status: int, code: str, message: str, body: Optional[Mapping[str, Any]] = None):
        super().__init__(f"sidecar answered {status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.body: Dict[str, Any] = dict(body or {})


class SidecarUnavailableError(ModelPoolError, ConnectionError):
    """The sidecar could not be reached (socket missing, refused, reset, timed out)."""
