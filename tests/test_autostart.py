"""Start at Login: entries written and removed in a temp home; the checkbox is the disk."""

from __future__ import annotations

import plistlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tray_helpers import (
    finish_tray_app,
    free_port,
    luna_env,
    start_tray_app,
    stop_process,
    wait_until,
)

from luna_daemon.tray import autostart


def desktop_exec_argv(text: str) -> list[str]:
    """argv from a .desktop Exec= line, per the Desktop Entry spec (independent of the writer):
    string escapes first (\\\\ -> \\), then %% -> %, then shell-like double-quote rules."""
    line = next(l for l in text.splitlines() if l.startswith("Exec="))[5:]
    unescaped = []
    i = 0
    while i < len(line):
        if line[i] == "\\" and i + 1 < len(line):
            unescaped.append({"s": " ", "n": "\n", "t": "\t", "r": "\r", "\\": "\\"}.get(line[i + 1], "\\" + line[i + 1]))
            i += 2
        else:
            unescaped.append(line[i])
            i += 1
    text = "".join(unescaped)
    # Exec quoting: args in double quotes; inside, \ escapes " ` $ and \ only.
    argv: list[str] = []
    cur, in_arg, quoted, j = [], False, False, 0
    while j < len(text):
        c = text[j]
        if quoted:
            if c == "\\" and j + 1 < len(text) and text[j + 1] in '"`$\\':
                cur.append(text[j + 1])
                j += 1
            elif c == '"':
                quoted = False
            else:
                cur.append(c)
        elif c == '"':
            quoted = in_arg = True
        elif c == " ":
            if in_arg:
                argv.append("".join(cur))
            cur, in_arg = [], False
        else:
            cur.append(c)
            in_arg = True
        j += 1
    assert not quoted, "unterminated quote in Exec"
    if in_arg:
        argv.append("".join(cur))
    return [a.replace("%%", "%") for a in argv]


def test_xdg_entry_written_enabled_and_removed(tmp_path):
    env = {"HOME": str(tmp_path / "home")}
    path = autostart.entry_path("linux", env)
    assert path == tmp_path / "home" / ".config" / "autostart" / "luna-daemon.desktop"
    assert not autostart.is_enabled("linux", env)
    assert autostart.enable("linux", env) == path
    assert path.is_file() and autostart.is_enabled("linux", env)
    text = path.read_text()
    assert "[Desktop Entry]" in text and "Type=Application" in text and "Terminal=false" in text
    assert desktop_exec_argv(text) == [sys.executable, "-m", "luna_daemon", "tray"]
    assert f"Path={autostart.source_root()}" in text
    assert autostart.disable("linux", env) is True
    assert not path.exists() and not autostart.is_enabled("linux", env)
    assert autostart.disable("linux", env) is False  # idempotent


def test_xdg_config_home_is_honoured_and_relative_ignored(tmp_path):
    env = {"HOME": str(tmp_path / "home"), "XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    assert autostart.entry_path("linux", env) == tmp_path / "cfg" / "autostart" / "luna-daemon.desktop"
    # the XDG spec says relative paths are invalid and must be ignored
    env["XDG_CONFIG_HOME"] = "relative/cfg"
    assert autostart.entry_path("linux", env) == tmp_path / "home" / ".config" / "autostart" / "luna-daemon.desktop"


def test_desktop_switches_off_are_respected(tmp_path):
    env = {"HOME": str(tmp_path)}
    path = autostart.enable("linux", env)
    for switch in ("Hidden=true", "X-GNOME-Autostart-enabled=false"):
        path.write_text(path.read_text().replace("X-GNOME-Autostart-enabled=true", switch))
        assert not autostart.is_enabled("linux", env), switch
        autostart.enable("linux", env)  # ticking the box again rewrites an enabled entry
        assert autostart.is_enabled("linux", env)


def test_exec_quoting_survives_spaces_and_specials(tmp_path):
    env = {"HOME": str(tmp_path)}
    argv = ["/opt/my apps/py$thon \"3\"/bin/python", "-m", "luna_daemon", "tray", "--config", "C:\\x 100%.toml"]
    path = autostart.enable("linux", env, command=argv)
    assert desktop_exec_argv(path.read_text()) == argv


def test_exec_line_really_starts_the_tray(tmp_path):
    """The command in the .desktop file launches a working host (headless here: no display)."""
    env = {"HOME": str(tmp_path / "home")}
    path = autostart.enable("linux", env)
    argv = desktop_exec_argv(path.read_text())
    port, lock_port = free_port(), free_port()
    proc_env = luna_env(tmp_path / "luna", port=port, lock_port=lock_port, monitor_port=free_port())
    log = tmp_path / "autostarted.log"
    with open(log, "wb") as out:
        p = subprocess.Popen(argv, cwd=str(autostart.source_root()), env=proc_env, stdout=out, stderr=subprocess.STDOUT)
    try:
        from luna_daemon.client import DaemonUnavailable, wait_for_daemon

        try:
            wait_for_daemon("127.0.0.1", port, 60, proc=p, token="")
        except DaemonUnavailable as exc:
            pytest.fail(f"the autostarted tray's daemon did not answer ping: {exc}\n{log.read_text()}")
    finally:
        assert stop_process(p) == 0, log.read_text()


def test_macos_launch_agent(tmp_path):
    env = {"HOME": str(tmp_path)}
    path = autostart.enable("darwin", env)
    assert path == tmp_path / "Library" / "LaunchAgents" / "io.github.luna-daemon.tray.plist"
    data = plistlib.loads(path.read_bytes())
    assert data["ProgramArguments"] == [sys.executable, "-m", "luna_daemon", "tray"]
    assert data["RunAtLoad"] is True and data["Label"] == autostart.LAUNCH_AGENT_LABEL
    assert autostart.is_enabled("darwin", env)
    data["Disabled"] = True
    path.write_bytes(plistlib.dumps(data))
    assert not autostart.is_enabled("darwin", env)
    assert autostart.disable("darwin", env) and not path.exists()


def test_windows_startup_shortcut_location_and_command(tmp_path):
    env = {"APPDATA": str(tmp_path / "Roaming")}
    path = autostart.entry_path("win32", env)
    assert path == tmp_path / "Roaming" / "Microsoft" / "Windows" / "Start Menu" / "Programs" / "Startup" / "Luna Daemon.lnk"
    argv = autostart.launcher_command("win32", config="cfg.toml")
    assert Path(argv[0]).name == "pythonw.exe" or Path(argv[0]) == Path(sys.executable)
    assert argv[1:4] == ["-m", "luna_daemon", "tray"] and argv[4] == "--config" and argv[5].endswith("cfg.toml")
    script = autostart.shortcut_script(path, [r"C:\Users\O'Brien\venv\Scripts\pythonw.exe", "-m", "luna_daemon", "tray"],
                                       Path(r"C:\src\luna daemon"))
    assert "WScript.Shell" in script and "$s.Save()" in script
    assert r"'C:\Users\O''Brien\venv\Scripts\pythonw.exe'" in script  # PowerShell single-quote escaping
    assert "$s.Arguments = '-m luna_daemon tray'" in script
    # the checkbox follows the file, whoever wrote it
    assert not autostart.is_enabled("win32", env)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"L\x00\x00\x00")
    assert autostart.is_enabled("win32", env)
    assert autostart.disable("win32", env) and not autostart.is_enabled("win32", env)


@pytest.mark.skipif(shutil.which("powershell.exe") is not None, reason="a real PowerShell would write the shortcut")
def test_windows_enable_without_powershell_fails_cleanly(tmp_path):
    env = {"APPDATA": str(tmp_path)}
    with pytest.raises(autostart.AutostartError, match="PowerShell"):
        autostart.enable("win32", env)
    assert not autostart.is_enabled("win32", env)


def test_tray_checkbox_is_what_is_on_disk(tmp_path, monkeypatch):
    """Files created or deleted behind the tray's back show up when the menu opens."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("APPDATA", str(tmp_path / "appdata"))
    autostart.enable()  # already enabled before the tray starts
    app, host, thread, result = start_tray_app(tmp_path, autostart_daemon=False)
    try:
        assert app.view.item("autostart").checked is True
        autostart.disable()  # e.g. the user removed it in the desktop's settings
        app.icon._menu_opened()  # what every backend's menu-open hook calls
        wait_until(lambda: app.view.item("autostart").checked is False, 10, "the checkbox to clear")
        app.icon.activate("Start at Login")
        wait_until(lambda: autostart.is_enabled(), 10, "the entry to be written")
        # The file is written before the view is recomputed: wait for the checkbox too.
        wait_until(lambda: app.view.item("autostart").checked is True, 10, "the checkbox to be set")
    finally:
        finish_tray_app(app, host, thread)
        autostart.disable()
    assert result.get("code") == 0
