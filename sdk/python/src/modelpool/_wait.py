"""Logs an acquire that waits for room: once when it starts waiting, then every few seconds.

::

    with WaitReporter("upscale", describe):     # describe() -> "held by t2v (12.0 GiB, 1 lease) ..."
        blocking_acquire()                      # answered at once: nothing is logged

The first line comes after ``MODELPOOL_WAIT_LOG_AFTER`` seconds (default 1) without an answer and
says what the acquire waits for and behind whom; then one line every ``MODELPOOL_WAIT_LOG_INTERVAL``
seconds (default 5) with the time waited so far. When the acquire is answered after a logged wait,
one line says how long it waited. ``describe`` runs in the reporter's thread and must not raise
(what it raises is logged at debug and replaced by "?").
"""

from __future__ import annotations

import logging
import os
import threading
import time
from types import TracebackType
from typing import Callable, Optional, Type

log = logging.getLogger("modelpool")


def _env_seconds(name: str, default: float) -> float:
    try:
        return max(0.0, float(os.environ.get(name, default)))
    except ValueError:
        return default


class WaitReporter:
    """A context manager around a blocking acquire; see the module doc."""

    def __init__(self, model: str, describe: Callable[[], str]) -> None:
        self.model = model
        self.describe = describe
        self.first_after = _env_seconds("MODELPOOL_WAIT_LOG_AFTER", 1.0)
        self.interval = max(0.1, _env_seconds("MODELPOOL_WAIT_LOG_INTERVAL", 5.0))
        self.logged = 0
        self._done = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._started = 0.0

    def _behind(self) -> str:
        try:
            return self.describe()
        except Exception as error:  # the report must never break the acquire
            log.debug("could not describe what %s waits behind: %s", self.model, error)
            return "?"

    def _run(self) -> None:
        if self._done.wait(self.first_after):
            return
        self.logged += 1
        log.info("Waiting for room to load %s: %s", self.model, self._behind())
        while not self._done.wait(self.interval):
            self.logged += 1
            log.info(
                "Still waiting for room to load %s after %.0f s: %s",
                self.model,
                time.monotonic() - self._started,
                self._behind(),
            )

    def __enter__(self) -> "WaitReporter":
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=f"modelpool-wait-{self.model}", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        if self.logged:
            waited = time.monotonic() - self._started
            if exc is None:
                log.info("Room for %s after waiting %.1f s", self.model, waited)
            else:
                log.warning("Gave up waiting for room for %s after %.1f s: %s", self.model, waited, exc)
