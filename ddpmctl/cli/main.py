"""The ``ddpmctl`` Typer application: one module per command, registered here."""

from __future__ import annotations

import sys
import warnings
from typing import Annotated, Optional

STARTING = "interrupted before the command started; nothing was done"

try:  # the command modules import torch and more (seconds on a cold start): Ctrl-C meanwhile is no crash
    import typer

    from .. import __version__
    from ..errors import DdpmctlWarning
    from .checkpoints import app as checkpoints_app
    from .doctor import doctor_cmd
    from .evaluate import evaluate_cmd
    from .import_cmd import import_cmd
    from .options import UNDERSCORE_ALIASES
    from .prepare import prepare_cmd
    from .sample import sample_cmd
    from .train import resume_cmd, train_cmd
except KeyboardInterrupt:
    sys.stderr.write(f"{STARTING}\n")
    raise SystemExit(130) from None

app = typer.Typer(
    name="ddpmctl",
    help="Train Denoising Diffusion Probabilistic Models on your own images, and sample from them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ddpmctl {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="show the version and exit")] = None,
) -> None:
    """Train Denoising Diffusion Probabilistic Models on your own images, and sample from them."""


app.command("train", help="Train a new run (defaults < --config FILE < options).",
            context_settings=UNDERSCORE_ALIASES)(train_cmd)
app.command("resume", help="Continue a run from its latest checkpoint; its config.yaml holds the rest.",
            context_settings=UNDERSCORE_ALIASES)(resume_cmd)
app.command("sample")(sample_cmd)
app.command("evaluate")(evaluate_cmd)
app.command("prepare")(prepare_cmd)
app.command("import")(import_cmd)
app.add_typer(checkpoints_app, name="checkpoints")
app.command("doctor", context_settings=UNDERSCORE_ALIASES)(doctor_cmd)


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    """ddpmctl's own warnings as one ``warning: ...`` line (also in forked loader workers); others as Python shows them."""
    if issubclass(category, DdpmctlWarning):
        (file or sys.stderr).write(f"warning: {message}\n")
    else:
        _python_show_warning(message, category, filename, lineno, file, line)


_python_show_warning = warnings.showwarning


def main() -> None:
    warnings.showwarning = show_warning
    try:
        app()
    except KeyboardInterrupt:  # while Typer builds the command line, before any command runs
        sys.stderr.write(f"{STARTING}\n")
        raise SystemExit(130) from None
