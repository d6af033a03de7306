"""Typer options generated from the config dataclasses, so every field is a flag with its comment as help.

Each option is declared in kebab-case (``--batch-size``); :data:`UNDERSCORE_ALIASES` makes the
commands accept the original script's underscore spelling (``--batch_size``) too. Values arrive as
text and are parsed with the field's declared type.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import typer

from ..config import FieldSpec, field_specs

CONFIG_PARAM = "config"

# Click normalises option names with this before matching, so --batch_size finds --batch-size.
UNDERSCORE_ALIASES = {"token_normalize_func": lambda token: token.replace("_", "-")}


def _metavar(spec: FieldSpec) -> str:
    tp = spec.type
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, __import__("types").UnionType) and args:
        tp = args[0]
    if typing.get_origin(tp) is Literal:
        return "[" + "|".join(typing.get_args(tp)) + "]"
    if typing.get_origin(tp) is tuple:
        return "N,N,..."
    return {int: "INTEGER", float: "FLOAT", str: "TEXT"}.get(tp, "TEXT")


def _help(spec: FieldSpec) -> str:
    default = spec.default
    if isinstance(default, tuple):
        default = ",".join(map(str, default))
    if spec.type is bool:
        return spec.help
    return f"{spec.help} (default: {default if default is not None else 'none'})"


def config_parameters(panel_by_section: bool = True) -> list[inspect.Parameter]:
    """One keyword-only parameter per config field, plus ``--config FILE``."""
    params = [
        inspect.Parameter(
            CONFIG_PARAM, inspect.Parameter.KEYWORD_ONLY, default=None,
            annotation=Annotated[Optional[Path], typer.Option(
                "--config", help="YAML file of options (flags given here override it)", metavar="FILE",
            )],
        )
    ]
    for spec in field_specs():
        kebab = spec.name.replace("_", "-")
        panel = f"{spec.section.capitalize()} options" if panel_by_section else None
        if spec.type is bool:
            decls = [f"--{kebab}/--no-{kebab}"]
            annotation = Annotated[Optional[bool], typer.Option(
                *decls, help=_help(spec), show_default=False, rich_help_panel=panel)]
        else:
            decls = [f"--{kebab}"]
            annotation = Annotated[Optional[str], typer.Option(
                *decls, help=_help(spec), metavar=_metavar(spec), show_default=False, rich_help_panel=panel)]
        params.append(inspect.Parameter(spec.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation=annotation))
    return params


def with_config_options(fn: Callable[[Path | None, dict[str, Any]], Any]) -> Callable[..., Any]:
    """Wrap ``fn(config_file, overrides)`` into a Typer command taking every config field as a flag."""

    def command(**kwargs: Any) -> Any:
        config_file = kwargs.pop(CONFIG_PARAM, None)
        return fn(config_file, {k: v for k, v in kwargs.items() if v is not None})

    params = config_parameters()
    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__name__ = fn.__name__
    command.__doc__ = fn.__doc__
    return command
