"""Install like a package: what the wheel and sdist carry, the metadata (one version, the
Comfy Registry's pyproject fields), and `luna-daemon service` (systemd user unit /
LaunchAgent) written into a temp home and read back with independent parsers.

The full user path (fresh venv, `pip install <wheel>`, `luna-daemon demo`) is
scripts/package-check.sh, which .ci/run runs after the suite.
"""

from __future__ import annotations

import configparser
import email.parser
import json
import os
import plistlib
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from PIL import Image

import luna_daemon
from luna_daemon import system_service
from luna_daemon.tray import autostart

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PROJECT = PYPROJECT["project"]

# Not part of a checkout a user builds from (or rebuilt by the build itself).
_SKIP = shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.pyc", "build", "dist", "*.egg-info",
                               ".pytest_cache", ".hypothesis", "test-artifacts")


# ----------------------------------------------------------------------------- wheel / sdist
@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """sdist and wheel built by `python -m build` from a copy of this checkout (so the
    build writes nothing into it), with a test-artifacts/ file in the copy that must stay
    out. Built from the sdist, as `python -m build` does: the sdist must be complete.
    No isolation: the venv's setuptools (the test extra's environment) builds it offline;
    scripts/package-check.sh does the isolated build on CI."""
    tmp = tmp_path_factory.mktemp("pkg")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=_SKIP, symlinks=True)
    (src / "test-artifacts").mkdir()
    (src / "test-artifacts" / "screenshot.png").write_bytes(b"not shipped")
    res = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp / "dist"), str(src)],
                         capture_output=True, text=True, timeout=240, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("*.whl")
    (sdist,) = (tmp / "dist").glob("*.tar.gz")
    return {"wheel": wheel, "sdist": sdist, "log": res.stdout + res.stderr}


def _package_files() -> set[str]:
    """Every file of the luna_daemon package in this checkout, as wheel names."""
    out = set()
    for p in (ROOT / "luna_daemon").rglob("*"):
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc":
            out.add(p.relative_to(ROOT).as_posix())
    return out


def test_wheel_carries_the_whole_package_and_nothing_else(built):
    with zipfile.ZipFile(built["wheel"]) as zf:
        names = set(zf.namelist())
    code = {n for n in names if not n.startswith(f"luna_daemon-{PROJECT['version']}.dist-info/")}
    expected = _package_files()
    assert expected - code == set(), "missing from the wheel"
    assert code - expected == set(), "in the wheel but not in the package"
    static = {n for n in code if n.startswith("luna_daemon/web/static/")}
    assert {"luna_daemon/web/static/index.html", "luna_daemon/web/static/app.js",
            "luna_daemon/web/static/favicon.svg"} <= static
    for n in names:
        assert not n.startswith(("tests/", "test-artifacts/", "benchmarks/", "docs/")), n
        assert n != "__init__.py", "the ComfyUI entry file belongs to a clone, not the wheel"
        assert "__pycache__" not in n and not n.endswith(".pyc"), n
    # The deprecations our pyproject once had (license table, license classifiers): they
    # end the build in later setuptools. Not every deprecation line: a new setuptools may
    # warn about its own internals, which no edit here could fix.
    log = built["log"].lower()
    for stale in ("project.license` as a toml table", "license classifiers are deprecated"):
        assert stale not in log, built["log"][-2000:]


def test_wheel_metadata(built):
    with zipfile.ZipFile(built["wheel"]) as zf:
        info = f"luna_daemon-{PROJECT['version']}.dist-info/"
        meta = email.parser.Parser().parsestr(zf.read(info + "METADATA").decode())
        entry_points = configparser.ConfigParser()
        entry_points.read_string(zf.read(info + "entry_points.txt").decode())
        assert (info + "licenses/LICENSE") in zf.namelist()
    assert meta["Name"] == "luna-daemon" and meta["Version"] == PROJECT["version"] == luna_daemon.__version__
    assert meta["License-Expression"] == "MIT" and meta["License-File"] == "LICENSE"
    assert meta["Description-Content-Type"] == "text/markdown"
    assert meta.get_payload().startswith("# Luna Daemon")
    assert "Repository, https://github.com/luna-daemon/luna-daemon" in meta.get_all("Project-URL")
    assert sorted(meta.get_all("Requires-Dist")) != []
    wanted = {Requirement(r).name for r in PROJECT["dependencies"]}
    shipped = {Requirement(r).name for r in meta.get_all("Requires-Dist") if "extra ==" not in r}
    assert shipped == wanted
    assert entry_points["console_scripts"]["luna-daemon"] == "luna_daemon.cli:main"
    assert entry_points["gui_scripts"]["luna-daemon-tray"] == "luna_daemon.cli:tray_entry"


def test_sdist_builds_the_same_package(built):
    with tarfile.open(built["sdist"]) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    assert {"pyproject.toml", "README.md", "LICENSE", "luna_daemon/web/static/index.html"} <= names
    assert not any(n.startswith("test-artifacts/") for n in names)


def test_version_is_written_in_one_place(tmp_path):
    """__version__ comes from pyproject.toml: a tree whose pyproject says 9.8.7 reports
    9.8.7 (a literal in __init__.py would not)."""
    (tmp_path / "luna_daemon").mkdir()
    shutil.copy(ROOT / "luna_daemon" / "__init__.py", tmp_path / "luna_daemon" / "__init__.py")
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "luna-daemon"\nversion = "9.8.7"\n')
    res = subprocess.run([sys.executable, "-c", "import luna_daemon; print(luna_daemon.__version__, luna_daemon.__file__)"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
    version, where = res.stdout.split()
    assert Path(where).parent == tmp_path / "luna_daemon" and version == "9.8.7", res.stderr
    assert luna_daemon.__version__ == PROJECT["version"]
    assert "__version__ = \"" not in (ROOT / "luna_daemon" / "__init__.py").read_text()


# ----------------------------------------------------------------------------- Comfy Registry
# docs.comfy.org/registry/specifications: name rules, X.Y.Z version, license forms,
# Repository URL, PublisherId; Icon square and at most 400x400 px.
_REGISTRY_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9]*(?:[-_.][A-Za-z0-9]+)*$")


def test_comfy_registry_metadata_is_complete():
    name = PROJECT["name"]
    assert len(name) < 100 and _REGISTRY_NAME.match(name) and "comfyui" not in name.lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", PROJECT["version"])
    assert PROJECT.get("description")
    lic = PROJECT["license"]
    if isinstance(lic, dict):
        assert ("file" in lic and (ROOT / lic["file"]).is_file()) or lic.get("text")
    else:
        assert lic == "MIT" and all((ROOT / f).is_file() for f in PROJECT["license-files"])
    repo = urlparse(PROJECT["urls"]["Repository"])
    assert repo.scheme == "https" and repo.netloc == "github.com" and len(repo.path.strip("/").split("/")) == 2
    comfy = PYPROJECT["tool"]["comfy"]
    assert _REGISTRY_NAME.match(comfy["PublisherId"])
    assert comfy["DisplayName"].strip()
    assert isinstance(comfy["includes"], list) and all((ROOT / d).is_dir() for d in comfy["includes"])
    if "requires-comfyui" in comfy:
        SpecifierSet(comfy["requires-comfyui"])
    # .comfyignore keeps the fake ComfyUI package (tests/) out of the published archive.
    assert "tests/" in (ROOT / ".comfyignore").read_text().split()


def test_comfy_registry_icon_is_a_square_file_of_this_repo():
    icon = urlparse(PYPROJECT["tool"]["comfy"]["Icon"])
    repo = urlparse(PROJECT["urls"]["Repository"]).path.strip("/")
    assert icon.scheme == "https" and icon.netloc == "raw.githubusercontent.com"
    prefix = f"/{repo}/main/"
    assert icon.path.startswith(prefix), "the icon must be served from this repository's main branch"
    path = ROOT / icon.path[len(prefix):]
    assert path.is_file(), f"{path} (the Icon URL's file) is not in the repository"
    with Image.open(path) as im:
        assert im.width == im.height <= 400


def test_requirements_parse_and_admit_the_cpu_torch():
    reqs = [Requirement(r) for r in PROJECT["dependencies"]]
    torch = next(r for r in reqs if r.name == "torch")
    # scripts/test.sh and package-check.sh install torch==2.13.0 first; the range must keep it.
    assert torch.specifier.contains("2.13.0")
    for extra in PROJECT["optional-dependencies"].values():
        [Requirement(r) for r in extra]
    SpecifierSet(PROJECT["requires-python"])


# ----------------------------------------------------------------------------- service: systemd
def _unquote_systemd(value: str, *, variables: bool = True) -> list[str]:
    """Words of an ExecStart (``variables``) or Environment value as systemd reads them
    (systemd.syntax / systemd.service, independent of the writer): shell-like double
    quotes, then ``%%`` is a ``%`` and any other ``%x`` a specifier systemd would expand
    (``%h``: the home folder), and in ExecStart ``$$`` is a ``$`` and ``$NAME`` a variable.
    An unescaped specifier or variable fails the test."""
    words = []
    for w in shlex.split(value):
        out, i = [], 0
        while i < len(w):
            c = w[i]
            if c == "%" or (c == "$" and variables):
                assert w[i + 1:i + 2] == c, f"unescaped {w[i:i + 2]!r} in {value!r}: systemd would expand it"
                i += 1
            out.append(c)
            i += 1
        words.append("".join(out))
    return words


def _read_unit(path: Path) -> configparser.RawConfigParser:
    unit = configparser.RawConfigParser(strict=True, interpolation=None)
    unit.optionxform = str  # systemd keys are case-sensitive
    unit.read_string(path.read_text(encoding="utf-8"))
    return unit


@pytest.fixture
def home(tmp_path) -> dict[str, str]:
    """A temp home, its own XDG config dir, LUNA_HOME with a space, a systemd specifier
    and a ``$`` in it, and a PATH on which no service manager exists."""
    (tmp_path / "home").mkdir()
    (tmp_path / "bin").mkdir()
    return {"HOME": str(tmp_path / "home"), "XDG_CONFIG_HOME": str(tmp_path / "xdg"),
            "LUNA_HOME": str(tmp_path / "luna home %h $USER 100%"), "PATH": str(tmp_path / "bin")}


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_systemd_user_unit_runs_serve_with_the_environment(home, tmp_path):
    res = system_service.install("linux", home, config="cfg/$HOME %h.toml")
    path = Path(home["XDG_CONFIG_HOME"]) / "systemd" / "user" / "luna-daemon.service"
    assert res.path == path and res.action == "installed" and path.is_file()
    unit = _read_unit(path)
    assert _unquote_systemd(unit["Service"]["ExecStart"]) == [
        sys.executable, "-m", "luna_daemon", "serve", "--config", str(Path("cfg/$HOME %h.toml").resolve())]
    assert unit["Service"]["Restart"] == "on-failure"
    env = dict(w.split("=", 1) for w in _unquote_systemd(unit["Service"]["Environment"], variables=False))
    assert env == {"LUNA_HOME": str(tmp_path / "luna home %h $USER 100%"), "PYTHONUNBUFFERED": "1"}
    assert unit["Install"]["WantedBy"] == "default.target"
    assert any("systemctl --user enable --now luna-daemon" in line for line in res.lines)
    assert path.read_text().startswith("# " + system_service.MARKER)
    if shutil.which("systemd-analyze"):  # systemd's own parser: no warnings, command exists
        check = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True,
                               timeout=60, check=False)
        assert check.returncode == 0 and "luna-daemon.service" not in check.stderr, check.stderr


def test_install_is_idempotent_and_uninstall_removes_exactly_its_file(home, tmp_path):
    before = _files(tmp_path)
    first = system_service.install("linux", home)
    data = first.path.read_bytes()
    again = system_service.install("linux", home)
    assert again.action == "unchanged" and first.path.read_bytes() == data
    moved = system_service.install("linux", {**home, "LUNA_HOME": str(tmp_path / "elsewhere")})
    assert moved.action == "updated" and b"elsewhere" in first.path.read_bytes()
    assert system_service.status("linux", home).installed
    gone = system_service.uninstall("linux", home)
    assert gone.action == "removed" and not first.path.exists()
    assert _files(tmp_path) == before
    assert system_service.uninstall("linux", home).action == "absent"
    assert not system_service.status("linux", home).installed


def test_a_unit_it_did_not_write_is_never_overwritten_or_removed(home):
    path = system_service.entry_path("linux", home)
    path.parent.mkdir(parents=True)
    path.write_text("[Service]\nExecStart=/usr/bin/someone-elses-daemon\n")
    with pytest.raises(system_service.ServiceError, match="not written by luna-daemon"):
        system_service.install("linux", home)
    with pytest.raises(system_service.ServiceError, match="not written by luna-daemon"):
        system_service.uninstall("linux", home)
    assert path.read_text() == "[Service]\nExecStart=/usr/bin/someone-elses-daemon\n"
    st = system_service.status("linux", home)
    assert st.foreign and not st.installed


def test_an_enabled_unit_is_not_removed_behind_systemds_back(home):
    res = system_service.install("linux", home)
    link = res.path.parent / "default.target.wants" / "luna-daemon.service"
    link.parent.mkdir()
    link.symlink_to(res.path)  # what `systemctl --user enable` leaves
    assert system_service.status("linux", home).enabled is True
    with pytest.raises(system_service.ServiceError, match="systemctl --user disable --now luna-daemon"):
        system_service.uninstall("linux", home)
    assert res.path.is_file()


def _fake_systemctl(home: dict[str, str], tmp_path: Path, rc: int = 0) -> Path:
    """A `systemctl` on PATH that records its arguments (the service manager is not what
    is tested; the commands given to it are)."""
    log = tmp_path / "systemctl.log"
    tool = Path(home["PATH"]) / "systemctl"
    tool.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\nexit {rc}\n')
    tool.chmod(0o755)
    return log


def test_enable_runs_systemctl_only_when_asked(home, tmp_path):
    log = _fake_systemctl(home, tmp_path)
    system_service.install("linux", home)
    assert not log.exists()
    res = system_service.install("linux", home, enable=True)
    assert log.read_text().splitlines() == ["--user daemon-reload", "--user enable --now luna-daemon"]
    assert "ran: systemctl --user enable --now luna-daemon" in res.lines
    system_service.uninstall("linux", home, disable=True)
    assert log.read_text().splitlines()[-1] == "--user disable --now luna-daemon"
    assert not res.path.exists()


def test_enable_without_systemctl_or_when_it_fails_says_what_to_run(home, tmp_path):
    with pytest.raises(system_service.ServiceError, match=r"systemctl not found.*enable --now luna-daemon"):
        system_service.install("linux", home, enable=True)
    assert system_service.entry_path("linux", home).is_file()  # written; only the start is left
    _fake_systemctl(home, tmp_path, rc=1)
    with pytest.raises(system_service.ServiceError, match="failed"):
        system_service.install("linux", home, enable=True)


# ----------------------------------------------------------------------------- service: macOS, Windows
def test_launch_agent_plist(home, tmp_path):
    tray = autostart.enable("darwin", home)  # the tray's own agent must survive ours
    res = system_service.install("darwin", home)
    assert res.path == Path(home["HOME"]) / "Library" / "LaunchAgents" / "io.github.luna-daemon.serve.plist"
    with res.path.open("rb") as fh:
        agent = plistlib.load(fh)
    assert agent["Label"] == "io.github.luna-daemon.serve" != autostart.LAUNCH_AGENT_LABEL
    assert agent["ProgramArguments"] == [sys.executable, "-m", "luna_daemon", "serve"]
    assert agent["EnvironmentVariables"]["LUNA_HOME"] == str(tmp_path / "luna home %h $USER 100%")
    assert agent["RunAtLoad"] is True and agent["KeepAlive"] == {"SuccessfulExit": False}
    assert any(line.startswith("to load it now") and "launchctl bootstrap gui/" in line for line in res.lines)
    assert system_service.install("darwin", home).action == "unchanged"
    assert system_service.uninstall("darwin", home).action == "removed"
    assert not res.path.exists() and tray.is_file()


def test_windows_points_at_the_trays_start_at_login(home):
    env = {**home, "APPDATA": str(Path(home["HOME"]) / "AppData")}
    with pytest.raises(system_service.ServiceError, match="Start at Login") as exc:
        system_service.install("win32", env)
    assert str(autostart.entry_path("win32", env).parent) in str(exc.value)  # where the tray's shortcut goes
    assert not system_service.status("win32", env).installed


# ----------------------------------------------------------------------------- the command
def _cli(home: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **home, "PATH": home["PATH"]}
    return subprocess.run([sys.executable, "-m", "luna_daemon", "service", *args], env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def test_service_command_end_to_end(home):
    res = _cli(home, "install")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "systemctl --user enable --now luna-daemon" in res.stdout
    st = _cli(home, "status", "--json")
    assert st.returncode == 0 and json.loads(st.stdout)["installed"] is True
    enable = _cli(home, "install", "--enable")  # no systemctl on this PATH
    assert enable.returncode == 1 and "systemctl not found" in enable.stdout
    assert _cli(home, "uninstall").returncode == 0
    assert not system_service.entry_path("linux", home).exists()
    code = ("import sys; from luna_daemon.cli import main; "
            "main(['service', 'status']); assert 'torch' not in sys.modules, 'torch imported'")
    light = subprocess.run([sys.executable, "-c", code], env={**os.environ, **home}, capture_output=True, text=True,
                           timeout=60, check=False)
    assert light.returncode == 0, light.stderr
