"""Shared CLI pieces: consoles and the one place user errors become ``Error: ...`` and exit code 1."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import DdpmctlError, TrainingStopped

console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print one ``Error:`` line on stderr and return the Exit to raise."""
    err_console.print(f"[bold red]Error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def handle_errors(fn: F) -> F:
    """Turn library user errors into one line on stderr and exit 1 (bugs keep their traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except TrainingStopped as exc:
            raise fail(str(exc), exc.exit_code) from None
        except DdpmctlError as exc:
            raise fail(str(exc)) from None

    return wrapper  # type: ignore[return-value]
