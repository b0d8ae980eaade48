"""The split between client.py (call path) and client_routing.py (which instance an op
goes to): what the split promises beyond the routing behaviour itself, which
tests/test_instances_routing.py covers. Real daemons, real sockets, a real subprocess."""

from __future__ import annotations

import gc
import subprocess
import sys
import warnings
import weakref

import pytest
from test_instances_routing import pair, pair_settings  # noqa: F401  (fixtures)

from luna_daemon.client import DaemonClient, DaemonUnavailable


def test_client_routing_imports_neither_the_client_nor_torch():
    """The client imports client_routing, so client_routing importing the client back
    would be a cycle; neither may pull torch into the light CLI commands."""
    code = ("import sys, luna_daemon.client_routing\n"
            "print(sorted(m for m in ('luna_daemon.client', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def _routed_client(pair, model_dir) -> tuple[DaemonClient, DaemonClient]:  # noqa: F811
    """A client with pooled connections to the primary and (through its one target) to
    the VAE instance: (client, target)."""
    c = DaemonClient(*pair["clip"].address, token=pair["clip"].token, timeout=60)
    assert c.status()["service"] == "clip"
    c.vae_load(str(model_dir / "vae_folder"))
    (target,) = c._router.targets.values()
    assert target.port == pair["vae"].address[1] and target._pool and c._pool
    return c, target


def test_a_dropped_client_is_freed_without_the_cycle_collector(pair, model_dir):  # noqa: F811
    """The Router keeps no reference to its client: a client dropped unclosed is freed,
    and its pooled sockets closed, as soon as the last reference goes (as before the
    split), not whenever the cycle collector runs."""
    c, target = _routed_client(pair, model_dir)
    socks = [weakref.ref(conn.sock) for conn in c._pool]
    ref = weakref.ref(c)
    gc.disable()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)  # unclosed on purpose
            del c
        assert ref() is None
        assert not [s for s in socks if s() is not None]  # freed: the OS socket is closed
    finally:
        gc.enable()
    target.close()  # dropped with its owner's router, but this test still holds it


def test_close_closes_the_routed_targets_and_refuses_new_ones(pair, model_dir):  # noqa: F811
    c, target = _routed_client(pair, model_dir)
    c.close()
    assert not c._pool and not target._pool and not c._router.targets
    with pytest.raises(DaemonUnavailable, match="client is closed"):
        target.ping()
    with pytest.raises(DaemonUnavailable, match="client is closed"):
        c.vae_load(str(model_dir / "vae_folder"))  # the map is cached: this reaches _target
