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


def plural(n: int, word: str, words: str | None = None) -> str:
    """``word`` in the number that goes with ``n``: f"{n} {plural(n, 'image')}" says 1 image, 2 images."""
    return word if n == 1 else words or f"{word}s"


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print one ``Error:`` line on stderr and return the Exit to raise."""
    err_console.print(f"[bold red]Error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def interrupted(message: str = "interrupted") -> typer.Exit:
    """Print why the command stopped on Ctrl-C (one line on stderr) and return the Exit to raise: 130, as for SIGINT."""
    err_console.print(escape(message), highlight=False, soft_wrap=True)
    return typer.Exit(130)


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
        except KeyboardInterrupt:  # a command that has nothing of its own to say (Typer would exit 130 silently)
            raise interrupted() from None

    return wrapper  # type: ignore[return-value]
