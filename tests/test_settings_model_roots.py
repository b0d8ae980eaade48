"""A filesystem root, the home folder and the folders above it are never model roots,
whichever source (file, environment, flag) the value comes from (issue 11)."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath, PureWindowsPath

import pytest

from luna_daemon.settings import Settings, SettingsError, too_broad_model_root


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A home folder of our own (Path.home() reads HOME), two levels below tmp_path."""
    h = tmp_path / "users" / "me"
    h.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(h))
    return h


def _load(tmp_path: Path, source: str, roots: list[str]) -> Settings:
    env = {"LUNA_HOME": str(tmp_path / "luna")}
    if source == "file":
        cfg = tmp_path / "luna" / "config" / "config.toml"
        cfg.parent.mkdir(parents=True, exist_ok=True)
        cfg.write_text(f"model_roots = {json.dumps(roots)}\n", encoding="utf-8")
        return Settings.load(env=env)
    if source == "env":
        return Settings.load(env={**env, "LUNA_MODEL_ROOTS": json.dumps(roots)})
    return Settings.load(env=env, overrides={"model_roots": roots})


@pytest.mark.parametrize("source", ["file", "env", "flag"])
def test_root_home_and_its_parents_are_refused(tmp_path, home, source):
    (tmp_path / "to_root").symlink_to("/")
    bad = {
        "/": "filesystem root",
        str(tmp_path / "to_root"): "filesystem root",  # a symlink is judged by its target
        str(home): "home folder",
        "~": "home folder",
        str(home / "models" / ".."): "home folder",
        str(tmp_path / "users"): "contains your home folder",
        str(tmp_path): "contains your home folder",
    }
    for value, why in bad.items():
        with pytest.raises(SettingsError) as exc:
            _load(tmp_path, source, [str(tmp_path / "fine"), value])
        assert exc.value.key == "model_roots", value
        assert why in str(exc.value) and "model folder" in str(exc.value), (value, str(exc.value))
    # Folders of models below the home folder (or anywhere else) are fine.
    ok = [str(home / "ComfyUI" / "models"), "~/models", str(tmp_path / "elsewhere")]
    assert _load(tmp_path, source, ok).model_roots == ok


def test_windows_drive_roots_and_profile_folders():
    me = PureWindowsPath("C:/Users/me")
    assert "filesystem root" in too_broad_model_root(PureWindowsPath("C:/"), me)
    assert "filesystem root" in too_broad_model_root(PureWindowsPath("D:/"), me)
    assert "filesystem root" in too_broad_model_root(PureWindowsPath("//server/share/"), me)
    assert "home folder" in too_broad_model_root(PureWindowsPath("c:/users/ME"), me)  # case-insensitive
    assert "contains your home folder" in too_broad_model_root(PureWindowsPath("C:/Users"), me)
    assert too_broad_model_root(PureWindowsPath("C:/Users/me/ComfyUI/models"), me) is None
    assert too_broad_model_root(PureWindowsPath("D:/models"), me) is None
    assert too_broad_model_root(PurePosixPath("/srv/models"), None) is None
    assert "filesystem root" in too_broad_model_root(PurePosixPath("/"), None)
