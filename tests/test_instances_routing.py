"""Multi-daemon routing (issue 14, docs/protocol.md "Instances"): hello's instance map, the
``wrong_instance`` error, and DaemonClient routing by role -- two real in-process daemons
(a CLIP-only primary and a VAE-only instance, as in the original Luna layout) on free
ports from one config.toml with two [[instances]] tables, real sockets, tiny real models."""

from __future__ import annotations

import hashlib
import socket
import threading

import pytest
import torch
from test_models_lora_residency import _kohya_lora

from luna_daemon import instances, protocol, transport
from luna_daemon.client import DaemonClient, DaemonError, DaemonUnavailable
from luna_daemon.daemon import Daemon
from luna_daemon.netutil import free_port
from luna_daemon.settings import Settings


def _hellos(daemon: Daemon) -> int:
    """How many (client) hello requests ``daemon`` answered."""
    return sum(daemon.service.stats.snapshot()["by_op"].get("hello", {}).values())


def _raw_call(address, op: str, args=None, token=None):
    """One request on a fresh socket, without any client logic: (id, ok, payload)."""
    with socket.create_connection(address, timeout=10) as sock:
        buffers, _ = protocol.request(1, op, args, token)
        sock.sendall(b"".join(bytes(b) for b in buffers))
        frame = transport.Channel(sock).read_frame(protocol.Limits(), idle_timeout=10, frame_timeout=10)
        return protocol.parse_response(frame)


@pytest.fixture
def pair_settings(tmp_path, model_dir):
    """Settings from a config.toml with a CLIP-only primary and a VAE-only instance."""
    clip_port, vae_port = free_port(), free_port()
    while vae_port == clip_port:
        vae_port = free_port()
    config = tmp_path / "pair.toml"
    config.write_text(
        f'engine = "standalone"\nmonitor_port = 0\nlock_port = 0\nmodel_roots = ["{model_dir.as_posix()}"]\n\n'
        f'[[instances]]\nname = "clip"\nservice = "clip"\nport = {clip_port}\n\n'
        f'[[instances]]\nname = "vae"\nservice = "vae"\nport = {vae_port}\n'
    )
    return Settings.load(config, env={"LUNA_HOME": str(tmp_path / "home")})


@pytest.fixture
def pair(pair_settings):
    """{"clip": Daemon (primary), "vae": Daemon}, started; stopped afterwards."""
    started: dict[str, Daemon] = {}
    try:
        for spec in instances.instance_specs(pair_settings):
            d = Daemon(spec.settings, name=spec.name)
            d.start()
            started[spec.name] = d
        yield started
    finally:
        for d in started.values():
            d.stop(10)


@pytest.fixture
def routed(pair):
    c = DaemonClient(*pair["clip"].address, token=pair["clip"].token, timeout=60)
    yield c
    c.close()


def test_hello_names_the_instance_and_the_map(pair):
    answer = _raw_call(pair["vae"].address, "hello")[2]
    assert answer["instance"] == "vae" and answer["service"] == "vae"
    assert [(e["name"], e["service"], e["port"], e["primary"]) for e in answer["instances"]] == [
        ("clip", "clip", pair["clip"].address[1], True), ("vae", "vae", pair["vae"].address[1], False)]
    # A host's live map (with states) replaces the static one.
    live = [{**e, "state": "running"} for e in answer["instances"]]
    pair["vae"].instances_provider = lambda: live
    assert _raw_call(pair["vae"].address, "hello")[2]["instances"] == live
    # A failing provider (a host bug) never makes hello fail: the configured map instead.
    pair["vae"].instances_provider = lambda: 1 / 0
    _id, ok, again = _raw_call(pair["vae"].address, "hello")
    assert ok and again["instances"] == answer["instances"]


def test_routed_results_equal_a_single_full_daemon(pair, routed, daemon, model_dir):
    """VAE ops land on the VAE instance, CLIP and LoRA ops on the CLIP instance, through
    one client given only the primary's address; results equal a full daemon's exactly."""
    full = DaemonClient(*daemon.address, token=daemon.token, timeout=60)
    lora_path, _ = _kohya_lora(model_dir / "routing_lora.safetensors", 7)
    lora = lora_path.read_bytes()
    torch.manual_seed(0)
    pixels = torch.rand(1, 32, 48, 3)
    big_latent = torch.rand(1, 4, 80, 80)  # 100 KB in, 5.9 MB out: both go in shared memory
    try:
        out = {}
        for name, c in (("routed", routed), ("full", full)):
            vae = c.vae_load(str(model_dir / "vae_folder"))["model"]
            latent = c.vae_encode(vae, pixels)
            image = c.vae_decode(vae, latent)
            big = c.vae_decode(vae, big_latent)
            clip = c.clip_load([str(model_dir / "clip_l")], "sd1")["model"]
            tokens = c.clip_tokenize(clip, "a photo of a cat")
            sha = c.lora_ensure(str(lora_path))
            assert c.lora_has(sha) and sha == hashlib.sha256(lora).hexdigest()
            cond = c.clip_encode(clip, tokens=tokens, loras=[{"lora": sha, "strength": 0.7}])
            out[name] = (latent, image, big, tokens, cond["cond"], cond["pooled_output"])
    finally:
        full.close()
    for a, b in zip(out["routed"], out["full"]):
        if isinstance(a, torch.Tensor):
            assert a.shape == b.shape and (a - b).abs().max().item() == 0
        else:
            assert a == b
    # The routed client's connection to the VAE instance carried the big tensors in shared memory.
    (to_vae,) = routed._router.targets.values()
    assert to_vae.port == pair["vae"].address[1] and any(conn.segment is not None for conn in to_vae._pool)
    # Where the work ran: each instance holds only the models of its role.
    assert [e.kind for e in pair["vae"].registry.entries()] == ["vae"]
    assert [e.kind for e in pair["clip"].registry.entries()] == ["clip"]
    assert pair["clip"].lora_cache.has(sha) and not pair["vae"].lora_cache.has(sha)


def test_op_sent_to_the_wrong_instance_names_the_one_that_serves_it(pair, model_dir):
    vae_host, vae_port = pair["vae"].address
    clip_port = pair["clip"].address[1]
    _id, ok, (code, message) = _raw_call((vae_host, vae_port), "clip_load",
                                         {"paths": [str(model_dir / "clip_l")]}, pair["vae"].token)
    assert not ok and code == "wrong_instance"
    assert "'clip_load' is not served by instance 'vae' (service vae)" in message
    assert f"instance 'clip' at 127.0.0.1:{clip_port} serves it" in message
    _id, ok, (code, message) = _raw_call(pair["clip"].address, "vae_decode", {"model": "x"}, pair["clip"].token)
    assert code == "wrong_instance" and f"instance 'vae' at 127.0.0.1:{vae_port}" in message
    # Through a client pinned to the VAE instance: the same typed error (after one refetch).
    with DaemonClient(*pair["clip"].address, token=pair["clip"].token, instance="vae") as pinned, \
            pytest.raises(DaemonError) as ei:
        pinned.clip_load([str(model_dir / "clip_l")])
    assert ei.value.code == "wrong_instance" and "instance 'clip'" in ei.value.message
    # Without a token the answer is unauthorized, as for any op: the map is not a way in.
    assert _raw_call((vae_host, vae_port), "clip_load", {"paths": ["x"]})[2][0] == "unauthorized"
    assert pair["vae"].state == "running" and pair["clip"].state == "running"


def test_a_lone_vae_daemon_says_no_instance_serves_clip(make_settings, model_dir):
    d = Daemon(make_settings(service="vae"))
    d.start()
    try:
        with DaemonClient(*d.address, token=d.token, timeout=30) as c:
            with pytest.raises(DaemonError) as ei:
                c.clip_load([str(model_dir / "clip_l")])
            assert c.ping()["pong"]
    finally:
        d.stop(10)
    assert ei.value.code == "wrong_instance"
    assert "not served by instance 'main' (service vae), and no configured instance serves it" in ei.value.message
    assert 'service = "clip"' in ei.value.message


def test_for_instance_pinning_and_unknown_names(pair, routed):
    assert routed.call("status")["service"] == "clip"  # ops without a role: the primary
    with routed.for_instance("vae") as vae:
        assert vae.call("status")["service"] == "vae" and vae.ping()["pong"]
    with DaemonClient(*pair["clip"].address, token=pair["clip"].token, instance="vae") as pinned:
        assert pinned.status()["service"] == "vae"
    assert [e["name"] for e in routed.instance_map()] == ["clip", "vae"]
    with pytest.raises(DaemonError) as ei:
        routed.for_instance("gpu2")
    assert ei.value.code == "bad_args" and "no instance named 'gpu2'" in ei.value.message
    assert "configured: clip, vae" in ei.value.message
    with DaemonClient(*pair["clip"].address, token=pair["clip"].token, instance="gpu2") as bad, \
            pytest.raises(DaemonError) as ei:
        bad.ping()
    assert ei.value.code == "bad_args" and "configured: clip, vae" in ei.value.message


def test_map_fetched_once_lazily_and_shared_by_threads(pair, routed, model_dir):
    primary = pair["clip"]
    for _ in range(5):
        routed.ping()
        routed.status()
    assert _hellos(primary) == 0  # no op with a role yet: no map fetched
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def work() -> None:
        try:
            barrier.wait(10)
            routed.vae_load(str(model_dir / "vae_folder"))
            routed.clip_load([str(model_dir / "clip_l")])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and not any(t.is_alive() for t in threads)
    assert _hellos(primary) == 1 and _hellos(pair["vae"]) == 0


def test_unreachable_instance_refetches_the_map_and_retries_once(pair, pair_settings, routed, model_dir):
    primary, old = pair["clip"], pair["vae"]
    live = [{**e, "state": "running"} for e in routed.instance_map()]
    primary.instances_provider = lambda: live
    vae = routed.vae_load(str(model_dir / "vae_folder"))["model"]
    assert _hellos(primary) == 1
    # The VAE instance dies and comes back on another port (a restarted child on port 0):
    # the next VAE op finds its old address dead, asks the primary once, and succeeds.
    old.stop(10)
    spec = instances.instance_spec(pair_settings, "vae")
    spec.settings.port = free_port()
    pair["vae"] = new = Daemon(spec.settings, name="vae")
    new.start()
    live[1] = {**live[1], "port": new.address[1]}
    old_target = routed._router.targets[(old.address[0], old.address[1])]
    info = routed.vae_load(str(model_dir / "vae_folder"))
    assert info["model"] == vae and _hellos(primary) == 2
    assert [e.kind for e in new.registry.entries()] == ["vae"]
    # The client of the dead address is closed and dropped, not kept with its sockets.
    assert list(routed._router.targets) == [(new.address[0], new.address[1])]
    assert old_target._closed and not old_target._pool
    # Gone for good: one more fetch, one retry, then the typed "unreachable".
    new.stop(10)
    with pytest.raises(DaemonUnavailable) as ei:
        routed.vae_load(str(model_dir / "vae_folder"))
    assert f":{new.address[1]}" in str(ei.value) and _hellos(primary) == 3
    assert routed.ping()["pong"]  # the primary keeps serving its own ops


def test_daemon_without_instances_gets_everything_with_no_extra_round_trip(daemon, model_dir):
    """An older daemon (hello without an instance map): every op goes to it, the map is
    asked for once per client, and later calls cost nothing extra."""
    daemon.instances_provider = list  # an empty map, as an older daemon's hello
    with DaemonClient(*daemon.address, token=daemon.token, timeout=60) as c:
        c.ping()
        assert _hellos(daemon) == 0
        vae = c.vae_load(str(model_dir / "vae_folder"))["model"]
        clip = c.clip_load([str(model_dir / "clip_l")])["model"]
        c.vae_decode(vae, torch.zeros(1, 4, 4, 4))
        c.clip_encode(clip, text="a cat")
        assert c.instance_map() == [] and _hellos(daemon) == 1
        assert c._routed is None  # routing is off: ping pays nothing for it
        with pytest.raises(DaemonError) as ei:
            c.for_instance("vae")
        assert ei.value.code == "bad_args" and "has no instances" in ei.value.message
    assert {e.kind for e in daemon.registry.entries()} == {"vae", "clip"}


def test_register_roots_reaches_every_instance(pair, routed, tmp_path):
    """A ComfyUI's model folders must be readable where its VAE loads as well as where
    its CLIP loads: register_roots goes to every instance, the primary's answer back."""
    folder = tmp_path / "comfy" / "models" / "vae"
    folder.mkdir(parents=True)
    answer = routed.call("register_roots", {"folders": {"vae": [str(folder)]}, "client": {"pid": 1}})
    assert [a["path"] for a in answer["added"]] == [str(folder)]
    for d in pair.values():
        assert str(folder) in [r["path"] for r in d.registry.root_sources()], d.name
    # One instance down: the others still get it, the caller gets the primary's answer.
    pair["vae"].stop(10)
    other = tmp_path / "comfy" / "models" / "loras"
    other.mkdir()
    answer = routed.call("register_roots", {"folders": {"loras": [str(other)]}})
    assert [a["path"] for a in answer["added"]] == [str(other)]
