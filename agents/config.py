"""The one strict reader of m2mpay's configuration files (TOML) and credential files (JSON).

Every file is described by a frozen dataclass: its fields are the keys, a field whose type is
itself such a dataclass is a table. :func:`build` refuses what the schema does not name (an
unknown table or key, a key the project removed), a value of the wrong type (``true`` for a
number, ``"5"`` for a number, a float for a whole number) and a value out of range; the error
names the file, the table and the key::

    m2mpay: vendor: /etc/m2mpay/vendor.toml: [pricing] price: must be at least 1 (got 0)

A field's metadata tunes its check:

- ``unlimited``: the value may be written as ``"unlimited"`` (read as ``None``);
- ``names``: each name of a list, or each key of a table, must be one a certificate can carry;
- ``choices``: the strings allowed;
- ``min`` / ``max``: the range of a number (numbers are never negative unless ``min`` says so).

Relative paths in a file are relative to the file's directory. A dataclass may list keys that
once existed in ``REMOVED`` (key to the sentence said when one is still written).
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from m2mpay.protocol.messages import is_name

if TYPE_CHECKING:  # the type checker's protocol of "a dataclass", no module at run time
    from _typeshed import DataclassInstance

__all__ = ["ConfigError", "NAME_RULE", "UNLIMITED", "build", "read_json", "read_toml", "validate"]

T = TypeVar("T", bound="DataclassInstance")
UNLIMITED = "unlimited"
"""What a file writes to lift a limit marked ``unlimited`` (read as ``None``)."""
NAME_RULE = "1-32 characters of a-z 0-9 - _ ."


class ConfigError(ValueError):
    """A configuration that cannot be used, with where it is: file, table and key.

    Raised without a place by a schema's own checks (``__post_init__``); :func:`build` adds the
    file and the table before it reaches the user.
    """

    def __init__(self, why: str, *, key: str | None = None, table: str | None = None,
                 file: Path | str | None = None, hint: str | None = None) -> None:
        self.why, self.key, self.table, self.file, self.hint = why, key, table, file, hint
        super().__init__(why)

    def located(self, file: Path | str | None = None, table: str | None = None) -> ConfigError:
        """The same error placed in ``table`` (an outer table) of ``file``."""
        inner = self.table
        where = f"{table}.{inner}" if table and inner else table or inner
        return ConfigError(self.why, key=self.key, table=where, file=self.file or file, hint=self.hint)

    def __str__(self) -> str:
        parts = [str(self.file)] if self.file else []
        place = " ".join(p for p in (f"[{self.table}]" if self.table else "", self.key or "") if p)
        if place:
            parts.append(place)
        parts.append(self.why + (f" ({self.hint})" if self.hint else ""))
        return ": ".join(parts)


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except IsADirectoryError:
        raise ConfigError(f"a directory, where {what} was expected", file=path, hint="name the file itself") from None
    except FileNotFoundError:
        raise ConfigError("no such file", file=path) from None
    except UnicodeDecodeError:
        raise ConfigError("not UTF-8 text", file=path) from None
    except OSError as exc:
        raise ConfigError(exc.strerror or type(exc).__name__, file=path) from exc


def read_toml(path: Path, what: str = "a TOML file") -> dict[str, Any]:
    """The parsed TOML of ``path``; every failure is a :class:`ConfigError` naming the file."""
    try:
        return tomllib.loads(_read(path, what))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", file=path) from exc


def read_json(path: Path, what: str = "a JSON file") -> dict[str, Any]:
    """The JSON object of ``path`` (credentials); every failure is a :class:`ConfigError` naming the file."""
    try:
        data = json.loads(_read(path, what))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}", file=path) from exc
    if not isinstance(data, dict):
        raise ConfigError("must hold a JSON object", file=path)
    return data


def _shown(value: Any) -> str:
    """A value as the file wrote it (``true``, not Python's ``True``)."""
    return str(value).lower() if isinstance(value, bool) else repr(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(spec: dataclasses.Field[Any], value: Any, whole: bool) -> int | float:
    if not _is_int(value) and (whole or not isinstance(value, float)):
        also = f' or "{UNLIMITED}"' if spec.metadata.get("unlimited") else ""
        what = "whole number" if whole else "number"
        raise ConfigError(f"must be a {what}{also} (got {_shown(value)})", key=spec.name)
    low, high = spec.metadata.get("min", 0), spec.metadata.get("max")
    if value < low:
        raise ConfigError(f"must be at least {low} (got {value})", key=spec.name)
    if high is not None and value > high:
        raise ConfigError(f"must be at most {high} (got {value})", key=spec.name)
    return value if whole else float(value)


def _names(spec: dataclasses.Field[Any], names: list[str] | dict[str, Any]) -> None:
    if spec.metadata.get("names"):
        for name in names:
            if not is_name(name):
                raise ConfigError(f"{name!r} can never match a certificate name ({NAME_RULE})", key=spec.name)


def _value(spec: dataclasses.Field[Any], kind: Any, value: Any, base: Path | None) -> Any:
    """One key's value, checked against (and converted to) the type of its field."""
    if spec.metadata.get("unlimited") and value == UNLIMITED:
        return None
    args = typing.get_args(kind)
    if isinstance(kind, types.UnionType):  # X | None: None means "not written"
        kind = next(a for a in args if a is not type(None))
        args = typing.get_args(kind)
    origin = typing.get_origin(kind)
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"must be true or false (got {_shown(value)})", key=spec.name)
        return value
    if kind in (int, float):
        return _number(spec, value, kind is int)
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"must be a string (got {_shown(value)})", key=spec.name)
        choices = spec.metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"must be one of {', '.join(choices)} (got {_shown(value)})", key=spec.name)
        return value
    if kind is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"must be a path (got {_shown(value)})", key=spec.name)
        return base / value if base is not None else Path(value)
    if origin is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError("must be a list of strings", key=spec.name)
        _names(spec, value)
        return tuple(value)
    if origin is dict:
        if not isinstance(value, dict) or not all(_is_int(v) and v >= 0 for v in value.values()):
            raise ConfigError("must be a table of names to whole numbers", key=spec.name)
        _names(spec, value)
        return dict(value)
    raise TypeError(f"no rule for a field of type {kind!r}")  # a schema's mistake, found by its tests


def validate(cls: type[Any], data: Any, *, base: Path | None = None) -> dict[str, Any]:
    """The checked values of the keys ``data`` writes for the schema ``cls`` (tables built).

    Keys left out are not in the result: :func:`build` fills in defaults and refuses what is missing.
    """
    if not isinstance(data, dict):
        raise ConfigError("must be a table")
    specs = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    removed: Mapping[str, str] = getattr(cls, "REMOVED", {})
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key in removed:
            raise ConfigError("no longer a setting", key=key, hint=removed[key])
        if key not in specs:
            known = ", ".join(sorted(specs))
            raise ConfigError(f"unknown {'table' if isinstance(value, dict) else 'key'}", key=key,
                              hint=f"known here: {known}")
        kind = hints[key]
        if dataclasses.is_dataclass(kind) and isinstance(kind, type):
            values[key] = build(kind, value, base=base, table=key)
        else:
            values[key] = _value(specs[key], kind, value, base)
    return values


def build(cls: type[T], data: Any, *, file: Path | None = None, base: Path | None = None,
          table: str | None = None, given: Mapping[str, Any] | None = None) -> T:
    """An instance of the schema ``cls`` from parsed TOML, every error placed in ``file`` and ``table``.

    ``given`` holds values already checked elsewhere (the environment's) that win over the file's.
    """
    try:
        values = validate(cls, data, base=base)
        values.update(given or {})
        for spec in dataclasses.fields(cls):
            missing = spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING
            if missing and spec.name not in values:
                raise ConfigError("missing", key=spec.name, hint="this key must be written")
        return cls(**values)
    except ConfigError as exc:
        raise exc.located(file, table) from None
