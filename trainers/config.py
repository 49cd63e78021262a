"""One set of keys for a trainer's config file (TOML or YAML) and its command-line flags.

A trainer's config is a dataclass; every field becomes ``--field-name`` (help from the field's
``metadata["help"]``) and a key of the same name in a file given with ``--config``. Flags given on
the command line win over the file, the file over the defaults.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import typing
from pathlib import Path
from typing import Annotated, Any

import tomllib
import typer


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    if path.suffix == ".toml":
        return tomllib.loads(path.read_text())
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"{path}: reading YAML needs PyYAML (pip install pyyaml); or use TOML") from None
        return yaml.safe_load(path.read_text()) or {}
    if path.suffix == ".json":
        return json.loads(path.read_text())
    raise ValueError(f"{path}: config files are .toml, .yaml/.yml or .json")


def build_config(cls, file_values: dict[str, Any], overrides: dict[str, Any]):
    """``cls`` from defaults < ``file_values`` < ``overrides``; unknown keys are an error naming them."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k.replace("-", "_"): v for k, v in file_values.items()}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(unknown)}; accepted: {', '.join(sorted(names))}")
    values.update(overrides)
    return cls(**values)


def _option_type(tp) -> Any:
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        return list[typing.get_args(tp)[0]] | None
    if origin is typing.Union or (origin is not None and type(None) in typing.get_args(tp)):
        inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
        return inner | None
    return tp | None


def command_from_config(cls, run, doc: str):
    """A typer command whose options are ``cls``'s fields (plus ``--config FILE``); calls ``run(config)``."""
    hints = typing.get_type_hints(cls)
    params = [inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        Path | None, typer.Option("--config", help="A TOML/YAML file with the same keys as these flags.")])]
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_ = f.metadata.get("help", "")
        show = f" [default: {default!r}]" if default not in ("", [], None) else ""
        tp = _option_type(hints[f.name])
        decls = [f"{flag}/--no-{flag[2:]}"] if hints[f.name] is bool else [flag]
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation=Annotated[tp, typer.Option(*decls, help=help_ + show, show_default=False)]))

    def command(**kwargs):
        file = kwargs.pop("config")
        overrides = {k: v for k, v in kwargs.items() if v is not None and not (isinstance(v, list) and not v)}
        return run(file, overrides)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__doc__ = doc
    return command


def run_command(command, argv: list[str] | None = None) -> None:
    """Run one trainer's command as a program (``python -m studio.trainers.NAME``, ``accelerate launch -m``)."""
    import sys

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(command)
    app(argv if argv is not None else sys.argv[1:])
