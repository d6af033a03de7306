"""A clean stop on Ctrl-C / SIGTERM: the first signal asks the loop to save a checkpoint and stop."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any


class StopFlag:
    """Set by the first Ctrl-C / SIGTERM; a second Ctrl-C restores the default and stops at once."""

    def __init__(self) -> None:
        self.requested = False
        self.reason = ""

    def request(self, reason: str) -> None:
        self.requested = True
        self.reason = reason


@contextlib.contextmanager
def interrupt_handlers(flag: StopFlag) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    first_at: list[float] = []

    def on_signal(signum: int, _frame: Any) -> None:
        now = time.monotonic()
        # Under torchrun a terminal Ctrl-C reaches each worker twice (from the terminal and forwarded by the
        # launcher): a second SIGINT within 2 s of the first is that echo, not the user insisting.
        if flag.requested and signum == signal.SIGINT and first_at and now - first_at[0] > 2.0:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        if not flag.requested:
            first_at.append(now)
        flag.request("Ctrl-C" if signum == signal.SIGINT else "SIGTERM")

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, on_signal)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
