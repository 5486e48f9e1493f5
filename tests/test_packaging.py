"""The package installs under the one import name `chunkbus`, as a wheel and editable,
and the setup finds a Python >= 3.12 or says how to get one."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

from conftest import REPO

IMPORT_ALL = (
    "import chunkbus.bus, chunkbus.nodes, chunkbus.launch;"
    "print(chunkbus.bus.__file__); print(chunkbus.nodes.__file__); print(chunkbus.launch.__file__)"
)


def test_editable_install_maps_chunkbus_to_the_source_folders():
    result = subprocess.run([sys.executable, "-c", IMPORT_ALL], capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        str(REPO / "bus" / "__init__.py"),
        str(REPO / "nodes" / "__init__.py"),
        str(REPO / "launch" / "__init__.py"),
    ]


def test_wheel_installs_chunkbus_and_no_other_top_level_name(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("bus", "nodes", "launch"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "setup.cfg", "README.md"):
        shutil.copy(REPO / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist"), str(source)],
        check=True,
        timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("chunkbus-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert top_level == {"chunkbus", wheel.name.split("-py3")[0] + ".dist-info"}
    assert "chunkbus/bus/codec.py" in names and "chunkbus/launch/__init__.py" in names

    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        timeout=300,
    )
    # -S skips site-packages (and with it the editable install's path hook); the
    # dependencies come from the virtual environment's folder, chunkbus from the wheel.
    env = {**os.environ, "PYTHONPATH": f"{target}{os.pathsep}{sysconfig.get_paths()['purelib']}"}
    result = subprocess.run(
        [sys.executable, "-S", "-c", IMPORT_ALL], capture_output=True, text=True, env=env, cwd="/"
    )
    assert result.returncode == 0, result.stderr
    assert all(line.startswith(str(target / "chunkbus")) for line in result.stdout.split())
    result = subprocess.run(
        [sys.executable, "-S", "-m", "chunkbus.nodes.cli", "--version"],
        capture_output=True, text=True, env=env, cwd="/",
    )
    assert result.stdout.startswith("chunkbus, version"), result.stderr


def find_python(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["sh", str(REPO / "scripts" / "find_python.sh")], capture_output=True, text=True, env=env
    )


def test_find_python_accepts_a_new_enough_interpreter():
    result = find_python({"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/"), "PYTHON": sys.executable})
    assert result.returncode == 0 and result.stdout.strip() == sys.executable


def test_find_python_explains_when_there_is_none(tmp_path):
    old = tmp_path / "python3"
    old.write_text("#!/bin/sh\nexit 1\n")  # a python3 that is not >= 3.12
    old.chmod(0o755)
    result = find_python({"PATH": f"{tmp_path}:/usr/bin:/bin", "HOME": str(tmp_path)})
    if result.returncode == 0:  # this machine has a system Python >= 3.12 in /usr/bin
        assert result.stdout.startswith("/usr/bin/")
        return
    assert "chunkbus needs Python >= 3.12" in result.stderr
    assert "pyenv install 3.12" in result.stderr
    result = find_python({"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHON": str(old)})
    assert result.returncode == 1
    assert f"PYTHON={old} is not a working Python >= 3.12" in result.stderr
