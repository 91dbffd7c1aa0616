"""Options: each backend and each quantizer owns one frozen dataclass of them; this is how they are declared, parsed
from the strings a user gives (CLI flags, MLproject parameters, sweep specs) and written back as MLflow params."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Type

from ptq.errors import PtqError


def option(default: Any, help: str, user: bool = True, quantizes: bool = False) -> Any:
    """An option: its default and the help the CLI shows; `user=False`: set by ptq, logged for the record;
    `quantizes=True`: a backend's setting of its own INT8 quantization, which a quantizer other than `ort` replaces."""
    return field(default=default, metadata={"help": help, "user": user, "quantizes": quantizes})


@dataclass(frozen=True)
class NoOptions:
    """A backend or quantizer without options of its own."""

    def validate(self) -> None:
        """Nothing to check."""


def user_options(options: Type[Any]) -> list[dataclasses.Field]:  # type: ignore[type-arg]
    """The options of an Options dataclass that users set (CLI flags, MLproject parameters)."""
    return [f for f in dataclasses.fields(options) if f.metadata.get("user", True)]


def parse_value(name: str, text: str, default: Any) -> Any:
    """A CLI/MLproject string as the type of the option's default (true/false, numbers, comma lists, paths)."""
    try:
        if isinstance(default, bool):
            value = text.strip().lower()
            if value not in ("true", "false", "yes", "no", "1", "0", "on", "off"):
                raise ValueError
            return value in ("true", "yes", "1", "on")
        if isinstance(default, int):
            return int(float(text))
        if isinstance(default, float):
            return float(text)
        if isinstance(default, tuple):
            return tuple(v.strip() for v in text.split(",") if v.strip())
        if default is None:
            return Path(text) if text else None
        return text
    except ValueError:
        kind = "true or false" if isinstance(default, bool) else "a whole number" if isinstance(default, int) else "a number"
        raise PtqError(f"{name}={text!r} is not {kind}: give a value like {format_value(default)!r}") from None


def format_value(value: Any) -> str:
    """An option value spelled as the CLI and MLflow params take it."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return "" if value is None else str(value)


def option_params(options: Any) -> dict[str, str]:
    """Every option (user-set or ptq-set) as MLflow params; unset ones (no path, no nodes) left out."""
    values = {f.name: format_value(getattr(options, f.name)) for f in dataclasses.fields(options)}
    return {k: v for k, v in values.items() if v != ""}


def parse_options(options: Type[Any], given: dict[str, str]) -> Any:
    """An Options instance from user strings (unset ones keep their defaults), validated; names must be its own."""
    mine = {f.name: f for f in user_options(options)}
    opts = options(**{k: parse_value(k, v, mine[k].default) for k, v in given.items()})
    opts.validate()
    return opts
