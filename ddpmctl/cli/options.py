"""Typer options generated from the config dataclasses, so every field is a flag with its comment as help.

Each option is declared in kebab-case (``--batch-size``); :data:`UNDERSCORE_ALIASES` makes the
commands accept the original script's underscore spelling (``--batch_size``) too. Values arrive as
text and are parsed with the field's declared type.

Help texts are escaped: Typer renders them as rich markup, where the ``[wandb]`` of
``pip install 'ddpmctl[wandb]'`` would be taken for a style tag and vanish.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import typer
import typer.core
from rich.markup import escape

from ..config import FieldSpec, field_specs, parse_value, spec_by_name
from ..errors import ConfigError

CONFIG_PARAM = "config"

# Model options a run takes from its data (class folders, --augment): its config.yaml records them, but they are no flags.
DERIVED = ("class_names", "augment_dim")

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


def plain_help(text: str) -> str:
    """``text`` shown as written in ``--help``: Typer reads help as rich markup, where ``[wandb]`` is a tag."""
    return escape(text) if typer.core.DEFAULT_MARKUP_MODE == "rich" else text  # TYPER_USE_RICH=0: plain text


def _help(spec: FieldSpec) -> str:
    default = spec.default
    if isinstance(default, tuple):
        default = ",".join(map(str, default))
    if spec.type is bool:  # the flag pair --x / --no-x: name the one in force by default
        flag = spec.name.replace("_", "-")
        return plain_help(f"{spec.help} (default: --{flag if default else 'no-' + flag})")
    return plain_help(f"{spec.help} (default: {default if default is not None else 'none'})")


def value_parser(spec: FieldSpec) -> Callable[[str], str]:
    """Check a command-line value against the field's type while Typer parses the command line.

    A bad value (``--batch-size abc``) is then a usage error (exit 2, Typer's message naming the option)
    like any other option's. The text itself is passed on: the config parses it again, as it does the same
    value from a YAML file, where a bad one is a user error (exit 1).
    """

    def parse(raw: str) -> str:
        try:
            parse_value(spec.type, raw, spec.name)
        except ConfigError as exc:  # "batch_size must be ...": Typer's message names the option already
            raise typer.BadParameter(str(exc).removeprefix(f"{spec.name} ")) from None
        return raw

    return parse


def _schema_option(name: str, help_text: str) -> Any:
    """An option of ``sample``/``evaluate`` taking one of the choices its config field declares."""
    spec = spec_by_name()[name]
    return typer.Option(f"--{name}", help=plain_help(help_text), metavar=_metavar(spec), parser=value_parser(spec))


# Options of `sample` and `evaluate` whose values the config schema knows: checked as the command line is parsed.
SamplerOpt = Annotated[str, _schema_option("sampler", "ddpm (all timesteps), ddim, dpmpp2m or heun")]
MaybeSamplerOpt = Annotated[Optional[str], _schema_option(
    "sampler", "ddpm (all timesteps), ddim, dpmpp2m or heun [default: what measured best for the model's objective: "
               "heun, 18 steps, for edm; dpmpp2m, 20 steps, for ddpm]")]
DeviceOpt = Annotated[str, _schema_option("device", "auto, cuda, mps or cpu")]
PrecisionOpt = Annotated[str, _schema_option("precision", "auto, fp32, bf16 or fp16")]
# doctor's: unset means "what the --config file says, else the default".
MaybeDeviceOpt = Annotated[Optional[str], _schema_option("device", "auto, cuda, mps or cpu")]
MaybePrecisionOpt = Annotated[Optional[str], _schema_option("precision", "auto, fp32, bf16 or fp16")]


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
        if spec.name in DERIVED:
            continue
        kebab = spec.name.replace("_", "-")
        panel = f"{spec.section.capitalize()} options" if panel_by_section else None
        if spec.type is bool:
            decls = [f"--{kebab}/--no-{kebab}"]
            annotation = Annotated[Optional[bool], typer.Option(
                *decls, help=_help(spec), show_default=False, rich_help_panel=panel)]
        else:
            decls = [f"--{kebab}"]
            annotation = Annotated[Optional[str], typer.Option(
                *decls, help=_help(spec), metavar=_metavar(spec), parser=value_parser(spec), show_default=False,
                rich_help_panel=panel)]
        params.append(inspect.Parameter(spec.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation=annotation))
    return params


def with_config_options(fn: Callable[..., Any], extra: tuple[inspect.Parameter, ...] = ()) -> Callable[..., Any]:
    """Wrap ``fn(config_file, overrides, **extra)`` into a Typer command taking every config field as a flag,
    plus the options of ``extra`` (passed to ``fn`` by name)."""

    def command(**kwargs: Any) -> Any:
        config_file = kwargs.pop(CONFIG_PARAM, None)
        flags = {p.name: kwargs.pop(p.name, p.default) for p in extra}
        return fn(config_file, {k: v for k, v in kwargs.items() if v is not None}, **flags)

    params = [*config_parameters(), *extra]
    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__name__ = fn.__name__
    command.__doc__ = fn.__doc__
    return command
