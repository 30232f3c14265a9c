"""Where each setting of a command comes from, the same way for every command.

A setting is taken from the first of:

1. the command line (``--broker``);
2. the environment, ``M2MPAY_<NAME>`` (``M2MPAY_BROKER``; an empty variable counts as unset);
3. the role's file: ``user.toml``, ``vendor.toml`` or ``bank.toml``, itself the first of
   ``--config`` (where the command has it), ``M2MPAY_<ROLE>_CONFIG``,
   ``$XDG_CONFIG_HOME/m2mpay/<file>`` (``~/.config/m2mpay/<file>`` when the variable is unset or
   empty) and ``/etc/m2mpay/<file>``; only that one file is read, never a merge of several;
4. the built-in default, if the setting has one.

The policy of ``user pay`` is a whole file found the same way (``--policy``, ``M2MPAY_POLICY``,
``policy.toml`` in those directories) and otherwise the built-in conservative policy.

Every file is read with the strict loader (:mod:`m2mpay.agents.config`): a file in force that
does not load stops the command, naming the file, table and key. :class:`Discovery` records
where each value came from; ``m2mpay config show`` prints it.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ConfigError, read_toml, validate

__all__ = ["FILES", "SETTINGS", "BankFile", "Discovery", "Resolved", "Setting", "add_config_command",
           "apply_settings", "file_option", "from_environment", "option"]

FILES = {"user": ("user.toml", "M2MPAY_USER_CONFIG"), "vendor": ("vendor.toml", "M2MPAY_VENDOR_CONFIG"),
         "bank": ("bank.toml", "M2MPAY_BANK_CONFIG"), "policy": ("policy.toml", "M2MPAY_POLICY")}
"""Each role's file and the variable that names it."""
SYSTEM_DIR = Path("/etc/m2mpay")


@dataclass(frozen=True, slots=True)
class Setting:
    """One setting: the key in its role's file, its variable, its type and its default."""

    role: str
    key: str
    env: str
    kind: type[Any]
    default: Any = None

    @property
    def name(self) -> str:
        """How ``config show`` names it: ``role.key``."""
        return f"{self.role}.{self.key}"


SETTINGS = (
    Setting("user", "wallet", "M2MPAY_WALLET", Path),
    Setting("user", "credentials", "M2MPAY_CREDENTIALS", Path),
    Setting("user", "broker", "M2MPAY_BROKER", str),
    Setting("user", "tls", "M2MPAY_TLS", Path),
    Setting("vendor", "credentials", "M2MPAY_VENDOR_CREDENTIALS", Path),
    Setting("vendor", "broker", "M2MPAY_BROKER", str),
    Setting("vendor", "tls", "M2MPAY_TLS", Path),
    Setting("vendor", "coap_host", "M2MPAY_COAP_HOST", str, "::1"),
    Setting("vendor", "coap_port", "M2MPAY_COAP_PORT", int, 5683),
    Setting("vendor", "data", "M2MPAY_VENDOR_DATA", Path, Path("var/vendor")),
    Setting("bank", "data", "M2MPAY_BANK_DATA", Path),
    Setting("bank", "broker", "M2MPAY_BROKER", str),
    Setting("bank", "tls", "M2MPAY_TLS", Path),
    Setting("bank", "workers", "M2MPAY_BANK_WORKERS", int, 1),
    Setting("bank", "metrics_port", "M2MPAY_METRICS_PORT", int),
)
_BY_NAME = {s.name: s for s in SETTINGS}


@dataclass(frozen=True, slots=True)
class BankFile:
    """``bank.toml``: the bank's settings (the bank's keys and database live in its data directory)."""

    data: Path | None = None
    broker: str | None = None
    tls: Path | None = None
    workers: int | None = field(default=None, metadata={"min": 1})
    metrics_port: int | None = field(default=None, metadata={"min": 1, "max": 65535})


@dataclass(frozen=True, slots=True)
class Resolved:
    """A setting's value (``None``: unset) and where it came from."""

    name: str
    value: Any
    source: str


def _schema(role: str) -> type[Any]:
    if role == "user":
        from .user.run import RunConfig  # the wallet's modules: only when a user.toml is read

        return RunConfig
    if role == "vendor":
        from .vendor.config import VendorFile

        return VendorFile
    return BankFile


class Discovery:
    """Resolves settings against one environment; each role's file is read at most once."""

    def __init__(self, environ: Mapping[str, str], system_dir: Path = SYSTEM_DIR) -> None:
        self.environ = environ
        home = environ.get("XDG_CONFIG_HOME") or str(Path(environ.get("HOME") or Path.home()) / ".config")
        self.search = (Path(home) / "m2mpay", system_dir)
        self._files: dict[str, Resolved] = {}
        self._values: dict[str, dict[str, Any]] = {}

    def _env(self, name: str) -> str | None:
        return self.environ.get(name) or None

    def file(self, role: str, given: Path | None = None, flag: str = "--config") -> Resolved:
        """The file in force for ``role`` (``value`` ``None``: none)."""
        if role not in self._files:
            name, env = FILES[role]
            if given is not None:
                found = Resolved(name, given, flag)
            elif (named := self._env(env)) is not None:
                found = Resolved(name, Path(named), f"env {env}")
            else:
                found = next((Resolved(name, d / name, "found") for d in self.search if (d / name).exists()),
                             Resolved(name, None, "unset"))
            self._files[role] = found
        return self._files[role]

    def _file_values(self, role: str) -> dict[str, Any]:
        if role not in self._values:
            path = self.file(role).value
            values: dict[str, Any] = {}
            if path is not None:
                data = read_toml(path, f"a {FILES[role][0]}")
                try:
                    values = validate(_schema(role), data, base=path.parent)
                except ConfigError as exc:
                    raise exc.located(path) from None
            self._values[role] = values
        return self._values[role]

    def setting(self, name: str, given: Any = None, flag: str | None = None) -> Resolved:
        """The value of setting ``name`` (``role.key``): ``given`` (the command line's) first."""
        s = _BY_NAME[name]
        if given is not None:
            return Resolved(name, given, flag or "command line")
        raw = self._env(s.env)
        if raw is not None:
            return Resolved(name, _parse(s, raw), f"env {s.env}")
        value = self._file_values(s.role).get(s.key)
        if value is not None:
            return Resolved(name, value, f"file {self.file(s.role).value}")
        return Resolved(name, s.default, "default" if s.default is not None else "unset")

    def everything(self) -> list[Resolved]:
        """Every file and setting, as ``config show`` lists them."""
        files = [Resolved(f"{role}.file", r.value, r.source) for role in FILES for r in [self.file(role)]]
        policy = self.file("policy").value
        if policy is not None:  # read as `user pay` reads it, so that a bad one shows here too
            from .policy.config import PolicyConfig

            PolicyConfig.load(policy)
        return files + [self.setting(s.name) for s in SETTINGS]


def _parse(s: Setting, raw: str) -> Any:
    if s.kind is int:
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"must be a whole number (got {raw!r})", key=s.env) from None
    return s.kind(raw)


def from_environment(role: str, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The settings of ``role`` the environment gives (they win over the role's file)."""
    environ = os.environ if environ is None else environ
    return {s.key: _parse(s, environ[s.env]) for s in SETTINGS if s.role == role and environ.get(s.env)}


# --- the command line ------------------------------------------------------------------------
_SPEC = "discovered_settings"
"""The namespace attribute listing a command's discovered options: (dest, name, flag, required)."""


def _register(parser: argparse.ArgumentParser, entry: tuple[str, str, str, bool]) -> None:
    parser.set_defaults(**{_SPEC: [*(parser.get_default(_SPEC) or []), entry]})


def option(parser: argparse.ArgumentParser, flag: str, name: str, help_text: str, *, required: bool = False) -> None:
    """Add ``flag`` for setting ``name`` (``role.key``); its default is discovered when the command runs."""
    s = _BY_NAME[name]
    default = f"; default {s.default}" if s.default is not None else ""
    action = parser.add_argument(flag, type=s.kind, default=None,
                                 help=f"{help_text} (or {s.env}, or {s.key} in {FILES[s.role][0]}{default})")
    _register(parser, (action.dest, name, flag, required))


def file_option(parser: argparse.ArgumentParser, flag: str, role: str, help_text: str, *,
                required: bool = False) -> None:
    """Add ``flag`` naming the role's file; without it the file is discovered (``FILES``)."""
    name, env = FILES[role]
    action = parser.add_argument(flag, type=Path, default=None,
                                 help=f"{help_text} (or {env}, or {name} in $XDG_CONFIG_HOME/m2mpay or /etc/m2mpay)")
    _register(parser, (action.dest, f"{role}.file", flag, required))


def apply_settings(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> None:
    """Fill in every discovered option the command line left out; refuse a required one nobody gives."""
    entries: list[tuple[str, str, str, bool]] = getattr(args, _SPEC, None) or []
    if not entries:
        return
    found = Discovery(os.environ if environ is None else environ)
    files = [e for e in entries if e[1].endswith(".file")]
    for dest, name, flag, required in files + [e for e in entries if e not in files]:
        role = name.split(".")[0]
        if name.endswith(".file"):
            resolved = found.file(role, getattr(args, dest), flag)
            places = " or ".join(str(d) for d in found.search)
            hint = f"give {flag}, set {FILES[role][1]}, or put {FILES[role][0]} in {places}"
        else:
            resolved = found.setting(name, getattr(args, dest), flag)
            s = _BY_NAME[name]
            hint = f"give {flag}, set {s.env}, or write {s.key} in {FILES[role][0]}"
        if resolved.value is None and required:
            raise ConfigError("missing", key=flag, hint=hint)
        setattr(args, dest, resolved.value)


# --- m2mpay config show ----------------------------------------------------------------------
def add_config_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``config show [--json]``."""
    config = commands.add_parser("config", help="the settings in force and where each came from")
    actions = config.add_subparsers(dest="action", required=True)
    show = actions.add_parser("show", help="every file and setting: its value and its source")
    show.add_argument("--json", action="store_true", help="as JSON: a list of {setting, value, source}")
    show.set_defaults(handler=_show)


def _shown(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else value


def _show(args: argparse.Namespace) -> int:
    import json

    rows = Discovery(os.environ).everything()
    if args.json:
        print(json.dumps([{"setting": r.name, "value": _shown(r.value), "source": r.source} for r in rows], indent=2))
        return 0
    width = max((len(str(_shown(r.value))) for r in rows if r.value is not None), default=1)
    for r in rows:
        print(f"{r.name:<20} {'-' if r.value is None else str(_shown(r.value)):<{width}}  {r.source}")
    return 0
