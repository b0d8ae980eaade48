"""Shared fixtures: isolated LUNA_HOME, tiny real models, running daemons on free ports."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from luna_daemon.settings import Settings  # noqa: E402


from luna_daemon.netutil import free_port  # noqa: E402,F401  (tests import it from here)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """Tiny random-weight models with real architectures, built once per session."""
    from luna_daemon.models import tiny

    root = tmp_path_factory.mktemp("models")
    tiny.make_tiny_vae(root / "vae_folder", layout="folder", seed=1)
    tiny.make_tiny_vae(root / "vae_file", layout="file", seed=2)
    tiny.make_tiny_clip(root / "clip_l", kind="l", layout="folder", seed=3)
    tiny.make_tiny_clip(root / "clip_g", kind="g", layout="folder", seed=4)
    return root


def serve_env(home, model_dir, **extra) -> dict[str, str]:
    """The environment of a ``luna-daemon`` subprocess isolated under ``home``: free daemon /
    dashboard / lock ports, ``model_dir`` as the only model root, the standalone engine, no
    model hub. ``extra`` adds or replaces variables."""
    import json

    env = dict(os.environ, LUNA_HOME=str(home), LUNA_PORT=str(free_port()), LUNA_MONITOR_PORT=str(free_port()),
               LUNA_LOCK_PORT=str(free_port()), LUNA_MODEL_ROOTS=json.dumps([str(model_dir)]), LUNA_ENGINE="standalone",
               HF_HUB_OFFLINE="1")
    env.update(extra)
    return env


@pytest.fixture
def make_settings(tmp_path, model_dir):
    """Settings isolated under tmp_path (LUNA_HOME) with free ports and model_roots set."""

    def make(**overrides) -> Settings:
        env = {"LUNA_HOME": str(tmp_path / "home")}
        base = {"port": 0, "monitor_port": 0, "lock_port": 0, "model_roots": [str(model_dir)], "engine": "standalone"}
        base.update(overrides)
        return Settings.load(env=env, overrides=base)

    return make


@pytest.fixture
def daemon(make_settings):
    from luna_daemon.daemon import Daemon

    d = Daemon(make_settings())
    d.start()
    yield d
    d.stop(10)


@pytest.fixture
def client(daemon):
    from luna_daemon.client import DaemonClient

    c = DaemonClient(*daemon.address, token=daemon.token, timeout=60)
    yield c
    c.close()
