"""The wheel installs one top-level name, ``m2mpay``, and runs from there.

The repository keeps its folders ``protocol/``, ``agents/`` and ``broker/``; setuptools maps them to
``m2mpay.protocol``, ``m2mpay.agents`` and ``m2mpay.broker``. Nothing called ``protocol``,
``agents`` or ``broker`` may land on a user's path, where it would shadow or be shadowed by a
same-named package.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # Built by pip through pyproject's build backend, as a user would, but with the setuptools of the
    # test environment (the test extra) instead of an isolated build's: no network needed.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(ROOT)], check=True, capture_output=True, cwd=out)
    (built,) = out.glob("m2mpay-*.whl")
    return built


def test_the_wheel_holds_only_m2mpay(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {"m2mpay", next(t for t in tops if t.endswith(".dist-info"))}
    for package in ("protocol", "agents", "broker"):
        assert f"m2mpay/{package}/__init__.py" in names
    assert "m2mpay/protocol/py.typed" in names
    assert "m2mpay/agents/bank/service.py" in names and "m2mpay/protocol/messages/__init__.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "m2mpay = m2mpay.agents.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_the_installed_wheel_imports_and_runs(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                    str(wheel)], check=True, capture_output=True)
    assert sorted(p.name for p in target.iterdir() if not p.name.endswith(".dist-info")) in (
        ["m2mpay"], ["bin", "m2mpay"])
    # The dependencies come from this environment; the package itself only from the install
    # (PYTHONPATH is searched before the editable checkout's finder).
    env = {**os.environ, "PYTHONPATH": str(target)}
    probe = ("import m2mpay.protocol, m2mpay.agents.cli, m2mpay.broker.pki, importlib.util as u; "
             "print(m2mpay.protocol.__file__); "
             "print([n for n in ('protocol', 'agents', 'broker') if u.find_spec(n) is not None])")
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path, capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert out[0].startswith(str(target)), out
    assert out[1] == "[]"
    version = subprocess.run([sys.executable, "-m", "m2mpay", "--version"], env=env, cwd=tmp_path,
                             capture_output=True, text=True, check=True)
    assert version.stdout.strip() == "m2mpay 0.1.0"
