"""Run a systemd unit's commands as systemd 252 would, without systemd, against an installed root.

The deployment tests install into a temporary directory (``install.sh --root``) and this module
plays the service manager of Debian 12 / Raspberry Pi OS bookworm for the m2mpay units:

- ``DynamicUser=`` state: ``/var/lib/private`` must be a 0700 root:root directory (systemd's
  ``mkdir_safe`` refuses any other mode); ``StateDirectory=`` is made below it with
  ``StateDirectoryMode=`` and owned by the service's uid, re-owned recursively *only* when its top
  level has another owner (``path_chown_recursive``); ``/var/lib/NAME`` is a symlink to it; inside
  the service ``/var/lib/private`` is an empty 0755 tmpfs holding just that directory.
- ``LoadCredential=``: read as root and copied to a directory only the uid can read (a directory
  source gives one credential per file, named ``ID_FILE``).
- ``Environment=``, ``EnvironmentFile=`` (``-`` optional), ``%S``/``%t``/``%%``, ``${VAR}``, ``$VAR``
  (split into words), ``$$``.
- ``ProtectSystem=strict`` as far as the installed root goes: all of it read-only but the state
  directory; ``UMask=``; ``WorkingDirectory=``; the uid with no groups and no new privileges.

The unit's absolute paths of the deployed system (``/etc/m2mpay``, ``/opt/m2mpay``, ``/var/lib``, …)
are mapped into the root. Not reproduced: seccomp, capabilities, ``PrivateTmp=`` and the other
namespaces (``systemd-analyze verify`` and ``security`` check those lines). Needs root, util-linux
(``unshare``, ``setpriv``) and mount namespaces; touches no cgroup.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Host", "Refused", "Service", "Unit"]

_DEPLOYED = re.compile(r"(?<![\w./-])(/etc/m2mpay|/opt/m2mpay|/var/lib|/var/log/mosquitto|/etc/mosquitto|/run)(?=/|\b)")
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class Refused(RuntimeError):
    """systemd would refuse to start the unit (the message is systemd's)."""


@dataclass(frozen=True)
class Host:
    """An installed root: where the deployed system's paths live in this test."""

    root: Path

    def path(self, deployed: str) -> Path:
        """``/etc/m2mpay/x`` → ``ROOT/etc/m2mpay/x``."""
        return self.root / deployed.lstrip("/")

    def map(self, text: str) -> str:
        """Every deployed path in ``text`` moved into the root."""
        return _DEPLOYED.sub(lambda m: str(self.root) + m.group(1), text)


@dataclass(frozen=True)
class Unit:
    """The ``[Service]`` section of a unit file: every value of each key, in order."""

    name: str
    service: dict[str, list[str]]

    @classmethod
    def load(cls, path: Path) -> Unit:
        section, values = "", dict[str, list[str]]()
        lines = path.read_text().replace("\\\n", " ").splitlines()
        for line in (raw.strip() for raw in lines):
            if not line or line[0] in "#;":
                continue
            if line.startswith("["):
                section = line
            elif section == "[Service]":
                key, _, value = line.partition("=")
                values.setdefault(key.strip(), []).append(value.strip())
        return cls(path.name, values)

    def all(self, key: str) -> list[str]:
        return self.service.get(key, [])

    def one(self, key: str, default: str | None = None) -> str | None:
        found = self.all(key)
        return found[-1] if found else default


def _expand(word: str, env: dict[str, str]) -> list[str]:
    """systemd's ``$VAR`` (a word of its own: split) and ``${VAR}`` (in place), ``$$`` a dollar."""
    word = word.replace("$$", "\0")
    whole = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
    if whole:
        return env.get(whole.group(1), "").split()
    word = re.sub(r"\$\{([^}]*)\}", lambda m: env.get(m.group(1), ""), word)  # an invalid name is empty too
    return [word.replace("\0", "$")]


def _environment_file(path: Path) -> dict[str, str]:
    found: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;" or "=" not in line:
            continue
        key, _, value = line.partition("=")
        found[key.strip()] = " ".join(shlex.split(value)) if value.strip() else ""
    return found


_NAMESPACE = r"""
set -e
root=$1 hold=$2 state=$3 private=$4 rel=$5 uid=$6 workdir=$7 mask=$8
shift 8
mount --bind "$state" "$hold"
mount --bind "$root" "$root"
mount -o remount,bind,ro "$root"
mount -t tmpfs -o mode=0755 m2mpay-private "$private"
mkdir -p "$private/$rel"
mount --bind "$hold" "$private/$rel"
cd "$workdir"
umask "$mask"
exec setpriv --reuid="$uid" --regid="$uid" --clear-groups --no-new-privs -- "$@"
"""


@dataclass
class Service:
    """One unit of the installed root, run as ``uid`` the way systemd runs a ``DynamicUser=`` service."""

    host: Host
    unit: Unit
    uid: int
    scratch: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="m2mpay-service-")))

    @property
    def hold(self) -> Path:
        """Where the state directory is held while ``/var/lib/private`` is covered."""
        (self.scratch / "hold").mkdir(exist_ok=True)
        return self.scratch / "hold"

    @property
    def log(self) -> Path:
        """``ExecStart=``'s stdout and stderr."""
        return self.scratch / "log"

    @property
    def relative(self) -> str:
        found = self.unit.one("StateDirectory")
        assert found, f"{self.unit.name} has no StateDirectory="
        return found

    @property
    def state(self) -> Path:
        """The state directory on the host (below ``/var/lib/private``)."""
        return self.host.path("/var/lib/private") / self.relative

    @property
    def credentials(self) -> Path:
        return self.host.path(f"/run/credentials/{self.unit.name}")

    def prepare(self) -> None:
        """What systemd does before the first command: state directory, credentials."""
        private = self.host.path("/var/lib/private")
        if private.exists() or private.is_symlink():
            st = private.lstat()
            if not stat.S_ISDIR(st.st_mode) or stat.S_IMODE(st.st_mode) != 0o700 or (st.st_uid, st.st_gid) != (0, 0):
                raise Refused(f'Directory "{private}" already exists, but has mode {stat.S_IMODE(st.st_mode):04o} '
                              "that is too permissive (0700 was requested), refusing.")
        else:
            private.mkdir(0o700, parents=True)
            private.chmod(0o700)
        mode = int(self.unit.one("StateDirectoryMode", "0755") or "0755", 8)
        for parent in reversed(self.state.relative_to(private).parents[:-1]):
            (private / parent).mkdir(0o755, exist_ok=True)
        self.state.mkdir(mode, exist_ok=True)
        self.state.chmod(mode)
        top = self.state.stat()
        if (top.st_uid, top.st_gid) != (self.uid, self.uid):  # systemd trusts a top level that is already right
            for path in [self.state, *self.state.rglob("*")]:
                os.lchown(path, self.uid, self.uid)
        link = self.host.path(f"/var/lib/{self.relative}")
        link.parent.mkdir(0o755, parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(os.path.relpath(self.state, link.parent))
        shutil.rmtree(self.credentials, ignore_errors=True)
        self.credentials.mkdir(0o700, parents=True)
        for spec in self.unit.all("LoadCredential"):
            ident, _, source = spec.partition(":")
            origin = Path(self.host.map(source))
            if not origin.exists():
                raise Refused(f"{self.unit.name}: Failed to set up credentials: {source} does not exist")
            files = [(ident, origin)] if origin.is_file() else [
                (f"{ident}_{item.name}", item) for item in sorted(origin.iterdir())
                if item.is_file() and not item.is_symlink()]
            for name, item in files:
                target = self.credentials / name
                shutil.copyfile(item, target)
                os.chown(target, self.uid, self.uid)
                target.chmod(0o400)
        os.chown(self.credentials, self.uid, self.uid)
        self.credentials.chmod(0o500)

    def environment(self) -> dict[str, str]:
        env = {"PATH": _PATH, "LANG": "C.UTF-8", "HOME": "/",
               "STATE_DIRECTORY": str(self.host.path(f"/var/lib/{self.relative}")),
               "CREDENTIALS_DIRECTORY": str(self.credentials)}
        for line in self.unit.all("Environment"):
            for assignment in shlex.split(line):
                key, _, value = assignment.partition("=")
                env[key] = value
        for spec in self.unit.all("EnvironmentFile"):
            optional = spec.startswith("-")
            path = Path(self.host.map(spec.removeprefix("-")))
            if path.exists():
                env.update(_environment_file(path))
            elif not optional:
                raise Refused(f"{self.unit.name}: Failed to load environment files: {spec}")
        return env

    def command(self, line: str) -> list[str]:
        """One ``Exec*=`` line as the argv systemd would run (paths mapped into the root)."""
        line = line.replace("%%", "\0").replace("%S", "/var/lib").replace("%t", "/run").replace("\0", "%")
        env = self.environment()
        return [self.host.map(word) for part in shlex.split(line) for word in _expand(part, env)]

    def _wrapped(self, argv: list[str]) -> list[str]:
        workdir = self.unit.one("WorkingDirectory", "/") or "/"
        workdir = self.host.map(workdir.replace("%S", "/var/lib"))
        mask = self.unit.one("UMask", "0022") or "0022"
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", _NAMESPACE, "sh",
                str(self.host.root), str(self.hold), str(self.state), str(self.host.path("/var/lib/private")),
                self.relative, str(self.uid), workdir, mask, *argv]

    def run(self, argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the service's sandbox to completion."""
        return subprocess.run(self._wrapped(argv), env=self.environment(), capture_output=True, text=True,
                              timeout=timeout)

    def start_pre(self) -> None:
        """Every ``ExecStartPre=``; each must succeed, as systemd requires."""
        for line in self.unit.all("ExecStartPre"):
            result = self.run(self.command(line))
            assert result.returncode == 0, f"{self.unit.name}: ExecStartPre={line} failed: {result.stderr}"

    @contextmanager
    def running(self) -> Iterator[subprocess.Popen[str]]:
        """Prepare, run the ``ExecStartPre=`` lines, start ``ExecStart=``; SIGTERM it afterwards."""
        self.prepare()
        self.start_pre()
        line = self.unit.one("ExecStart")
        assert line, f"{self.unit.name} has no ExecStart="
        with self.log.open("w") as log:
            process = subprocess.Popen(self._wrapped(self.command(line)), env=self.environment(), text=True,
                                       stdout=log, stderr=subprocess.STDOUT)
        try:
            yield process
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(10)

    def close(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)
