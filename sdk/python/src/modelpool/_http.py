"""JSON over HTTP/1.1 to the sidecar, on its Unix socket (or loopback TCP), stdlib only.

One short-lived connection per request: connecting to a Unix socket costs microseconds, and it
keeps the long-poll thread, the heartbeat thread and the app's threads fully independent.
"""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any, Dict, Optional, Tuple
from urllib.parse import urlsplit

from .errors import SidecarError, SidecarUnavailableError

DEFAULT_SOCKET = "/var/run/modelpool/sidecar.sock"


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class SidecarHTTP:
    """A client for one sidecar address: a socket path, or ``http://127.0.0.1:PORT``."""

    def __init__(self, address: str, token: Optional[str] = None, timeout: float = 30.0) -> None:
        self.address = address
        self.token = token
        self.timeout = timeout
        self._tcp: Optional[Tuple[str, int]] = None
        if address.startswith(("http://", "https://")):
            parts = urlsplit(address)
            if parts.scheme != "http" or not parts.hostname:
                raise ValueError(f"unsupported sidecar address {address!r} (use a socket path or http://HOST:PORT)")
            self._tcp = (parts.hostname, parts.port or 80)

    def __repr__(self) -> str:
        return f"SidecarHTTP({self.address!r})"

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        if self._tcp is not None:
            return http.client.HTTPConnection(self._tcp[0], self._tcp[1], timeout=timeout)
        return _UnixHTTPConnection(self.address, timeout)

    def request(
        self,
        method: str,
        path: str,
        body: Optional[Dict[str, Any]] = None,
        timeout: Optional[float] = None,
    ) -> Tuple[int, Any]:
        """Sends one request; returns ``(status, decoded JSON or None)`` for 2xx and 409 answers.

        Raises :class:`SidecarUnavailableError` when the sidecar cannot be reached or the
        connection breaks, and :class:`SidecarError` for other error answers.
        """
        conn = self._connection(self.timeout if timeout is None else timeout)
        headers = {"Accept": "application/json", "Connection": "close"}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            conn.request(method, path, body=payload, headers=headers)
            response = conn.getresponse()
            raw = response.read()
            status = response.status
        except (OSError, http.client.HTTPException) as error:
            raise SidecarUnavailableError(
                f"sidecar at {self.address} unreachable ({method} {path}): {error}"
            ) from error
        finally:
            conn.close()
        data: Any = None
        if raw:
            try:
                data = json.loads(raw)
            except ValueError:
                data = {"error": "bad_response", "message": raw[:200].decode("utf-8", "replace")}
        if 200 <= status < 300 or status == 409:
            return status, data
        code = "error"
        message = ""
        if isinstance(data, dict):
            code = str(data.get("error", code))
            message = str(data.get("message", ""))
        raise SidecarError(status, code, message or f"HTTP {status}", data if isinstance(data, dict) else None)

    def reachable(self, timeout: float = 2.0) -> bool:
        """True when the sidecar answers ``GET /v1/state``."""
        try:
            self.request("GET", "/v1/state", timeout=timeout)
            return True
        except (SidecarUnavailableError, SidecarError):
            return False
