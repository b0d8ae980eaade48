"""Models layer through the real daemon: LoRA cache, residency, budgets, devices, dtypes."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import save_file

from luna_daemon.client import DaemonClient, DaemonError
from luna_daemon.daemon import Daemon

LAYERS = 2
MODULES = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")


def _reference_clip(folder: Path):
    from transformers import CLIPTextModel

    from luna_daemon.models.engines.standalone import StandaloneEngine  # noqa: F401  (same env)

    return CLIPTextModel.from_pretrained(str(folder), local_files_only=True).eval()


def _kohya_lora(path: Path, seed: int, *, prefix: str = "lora_te_", rank: int = 4, hidden: int = 32, alpha: float | None = 2.0,
                fmt: str = "kohya") -> tuple[Path, dict]:
    """A LoRA file for the tiny CLIP-L; returns (path, {module: (up, down, alpha)})."""
    g = torch.Generator().manual_seed(seed)
    sd, truth = {}, {}
    for layer in range(LAYERS):
        for mod in MODULES:
            out_dim, in_dim = (hidden * 2, hidden) if mod == "mlp_fc1" else (hidden, hidden * 2) if mod == "mlp_fc2" else (hidden, hidden)
            up = torch.randn(out_dim, rank, generator=g) * 0.5
            down = torch.randn(rank, in_dim, generator=g) * 0.5
            name = f"text_model_encoder_layers_{layer}_{mod}"
            dotted = f"text_model.encoder.layers.{layer}.{mod.replace('self_attn_', 'self_attn.').replace('mlp_', 'mlp.')}"
            if fmt == "kohya":
                sd[f"{prefix}{name}.lora_up.weight"] = up
                sd[f"{prefix}{name}.lora_down.weight"] = down
                if alpha is not None:
                    sd[f"{prefix}{name}.alpha"] = torch.tensor(alpha)
            else:  # diffusers / PEFT
                sd[f"text_encoder.{dotted}.lora_B.weight"] = up
                sd[f"text_encoder.{dotted}.lora_A.weight"] = down
                if alpha is not None:
                    sd[f"text_encoder.{dotted}.alpha"] = torch.tensor(alpha)
            truth[dotted + ".weight"] = (up, down, alpha)
    sd["lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"] = torch.zeros(4, 4)  # ignored (UNet)
    sd["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"] = torch.zeros(4, 4)
    save_file(sd, str(path))
    return path, truth


def _expected(folder: Path, truth_stack: list[tuple[dict, float]], text_ids: torch.Tensor) -> torch.Tensor:
    ref = _reference_clip(folder)
    with torch.no_grad():
        params = dict(ref.named_parameters())
        for truth, strength in truth_stack:
            for key, (up, down, alpha) in truth.items():
                name = key if key in params else key.removeprefix("text_model.")
                name = name if name in params else "text_model." + key
                scale = 1.0 if alpha is None else alpha / down.shape[0]
                params[name] += strength * scale * (up @ down)
        return ref(text_ids).last_hidden_state


def _ids(tokens: dict) -> torch.Tensor:
    return torch.tensor([[t[0] for t in tokens["l"][0]]])


@pytest.fixture
def lora_files(model_dir, tmp_path_factory):
    d = model_dir / "loras"
    d.mkdir(exist_ok=True)
    return {
        "a": _kohya_lora(d / "a.safetensors", 1),
        "b": _kohya_lora(d / "b.safetensors", 2, alpha=None),
        "c_peft": _kohya_lora(d / "c.safetensors", 3, fmt="peft"),
        "a_peft": _kohya_lora(d / "a_peft.safetensors", 1, fmt="peft"),
    }


def test_lora_put_load_and_encode_match_merged_weights(client, model_dir, lora_files):
    clip = client.clip_load([str(model_dir / "clip_l")])["model"]
    tokens = client.clip_tokenize(clip, "a photo of a cat")
    path_a, truth_a = lora_files["a"]
    data = path_a.read_bytes()
    sha_a = hashlib.sha256(data).hexdigest()
    assert client.lora_has(sha_a) is False
    put = client.lora_put(data, sha_a, "a.safetensors")
    assert put["sha256"] == sha_a and put["modules"] == LAYERS * len(MODULES)  # UNet keys ignored
    assert client.lora_has(sha_a) is True
    loaded = client.lora_load(str(lora_files["b"][0]))
    sha_b = loaded["sha256"]
    assert sha_b == hashlib.sha256(lora_files["b"][0].read_bytes()).hexdigest()

    base = client.clip_encode(clip, tokens=tokens)["cond"]
    zero = client.clip_encode(clip, tokens=tokens, loras=[{"lora": sha_a, "strength": 0.0}])["cond"]
    assert torch.equal(zero, base)
    one = client.clip_encode(clip, tokens=tokens, loras=[{"lora": sha_a, "strength": 0.8}])["cond"]
    assert not torch.allclose(one, base, atol=1e-3)
    assert torch.allclose(one, _expected(model_dir / "clip_l", [(truth_a, 0.8)], _ids(tokens)), atol=1e-5)
    stack = client.clip_encode(clip, tokens=tokens, loras=[{"lora": sha_a, "strength": 0.5}, {"lora": sha_b, "strength": -0.3}])["cond"]
    assert torch.allclose(stack, _expected(model_dir / "clip_l", [(truth_a, 0.5), (lora_files["b"][1], -0.3)], _ids(tokens)), atol=1e-5)
    # The same weights in diffusers/PEFT naming give the same result.
    sha_ap = client.lora_put(lora_files["a_peft"][0].read_bytes())["sha256"]
    assert sha_ap != sha_a  # different file content, different identity
    peft = client.clip_encode(clip, tokens=tokens, loras=[{"lora": sha_ap, "strength": 0.8}])["cond"]
    assert torch.equal(peft, one)
    # Unknown LoRA, bad hash, garbage upload: typed errors, nothing lost.
    for bad, code in (({"lora": "0" * 64, "strength": 1.0}, "not_found"), ({"lora": "nope", "strength": 1.0}, "bad_args")):
        with pytest.raises(DaemonError) as ei:
            client.clip_encode(clip, tokens=tokens, loras=[bad])
        assert ei.value.code == code
    with pytest.raises(DaemonError) as ei:
        client.lora_put(b"definitely not safetensors")
    assert ei.value.code == "bad_args"
    with pytest.raises(DaemonError) as ei:
        client.lora_put(data, "f" * 64)
    assert ei.value.code == "bad_args" and "hashes to" in ei.value.message
    assert client.lora_has(sha_a) and client.lora_has(sha_b)
    # lora_ensure: hash locally, upload only what the daemon lacks.
    assert client.lora_ensure(str(path_a)) == sha_a
    sha_c = client.lora_ensure(str(lora_files["c_peft"][0]))
    assert client.lora_has(sha_c) and sha_c == hashlib.sha256(lora_files["c_peft"][0].read_bytes()).hexdigest()


def test_concurrent_different_stacks_never_see_each_other(daemon, model_dir, lora_files):
    host, port = daemon.address
    setup = DaemonClient(host, port, token=daemon.token)
    clip = setup.clip_load([str(model_dir / "clip_l")])["model"]
    shas = [setup.lora_load(str(lora_files[k][0]))["sha256"] for k in ("a", "b", "c_peft")]
    stacks = [[], [{"lora": shas[0], "strength": 1.0}], [{"lora": shas[1], "strength": 0.7}],
              [{"lora": shas[0], "strength": 0.4}, {"lora": shas[2], "strength": 1.1}], [{"lora": shas[2], "strength": -0.5}]]
    texts = ["a cat", "a dog on a hill", "portrait of a woman", "a red car", "the sea at night"]
    solo = {}
    for i, st in enumerate(stacks):
        for t in texts:
            solo[(i, t)] = setup.clip_encode(clip, text=t, loras=st)["cond"]
    errors: list[str] = []
    barrier = threading.Barrier(len(stacks))

    def worker(i: int) -> None:
        c = DaemonClient(host, port, token=daemon.token)
        barrier.wait()
        for rep in range(4):
            for t in texts:
                got = c.clip_encode(clip, text=t, loras=stacks[i])["cond"]
                if not torch.equal(got, solo[(i, t)]):
                    errors.append(f"stack {i} text {t!r} rep {rep}")
        c.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(stacks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors, errors
    setup.close()


def test_lora_budget_lru_and_oversized_refused_without_eviction(make_settings, model_dir, lora_files):
    from safetensors.torch import load_file

    from luna_daemon.models.lora import parse_lora

    one = parse_lora(load_file(str(lora_files["a"][0])), "0" * 64).nbytes
    # Room for two of these LoRAs, not three.
    d = Daemon(make_settings(lora_cache_bytes=int(one * 2.5)))
    d.start()
    try:
        c = DaemonClient(*d.address, token=d.token)
        sha_a = c.lora_load(str(lora_files["a"][0]))["sha256"]
        sha_b = c.lora_load(str(lora_files["b"][0]))["sha256"]
        # A LoRA bigger than the whole budget: refused, and A and B are still cached.
        big, _ = _kohya_lora(model_dir / "loras" / "big.safetensors", 9, rank=64)
        with pytest.raises(DaemonError) as ei:
            c.lora_put(big.read_bytes())
        assert ei.value.code == "too_large" and "lora_cache_bytes" in ei.value.message
        assert c.lora_has(sha_a) and c.lora_has(sha_b)
        # LRU: touch A, add C -> B (least recently used) goes.
        clip = c.clip_load([str(model_dir / "clip_l")])["model"]
        c.clip_encode(clip, text="x", loras=[{"lora": sha_a, "strength": 1.0}])
        res = c.lora_load(str(lora_files["c_peft"][0]))
        assert res["evicted"] and c.lora_has(sha_a) and not c.lora_has(sha_b) and c.lora_has(res["sha256"])
        st = c.status()["lora_cache"]
        assert st["bytes"] <= st["budget"] and st["evictions"] == 1 and st["hits"] >= 1
        c.close()
    finally:
        d.stop(10)


def test_lora_load_path_rules(client, tmp_path):
    outside = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(1)}, str(outside))
    with pytest.raises(DaemonError) as ei:
        client.lora_load(str(outside))
    assert ei.value.code == "forbidden_path"


# ----------------------------------------------------------------------------- residency
def test_ps_fields_and_keep_alive_expiry(client, model_dir):
    m = client.vae_load(str(model_dir / "vae_folder"), keep_alive="1s")["model"]
    entry = client.ps()[0]
    for field in ("id", "kind", "paths", "device", "dtype", "bytes", "last_use" if "last_use" in entry else "last_used", "expires_at", "users"):
        assert field in entry
    assert entry["kind"] == "vae" and entry["device"] == "cpu" and entry["dtype"] == "fp32" and entry["expires_at"] is not None
    deadline = time.time() + 8
    while client.ps() and time.time() < deadline:
        time.sleep(0.1)
    assert client.ps() == [], "keep_alive=1s model was not unloaded"
    with pytest.raises(DaemonError):
        client.vae_decode(m, torch.zeros(1, 4, 4, 4))


def test_devices_and_dtypes(client, model_dir):
    with pytest.raises(DaemonError) as ei:
        client.vae_load(str(model_dir / "vae_folder"), device="cuda:1")
    assert ei.value.code == "bad_args" and "cpu" in ei.value.message and "cuda:1" in ei.value.message
    with pytest.raises(DaemonError) as ei:
        client.vae_load(str(model_dir / "vae_folder"), dtype="fp8")
    assert ei.value.code == "bad_args"
    m32 = client.vae_load(str(model_dir / "vae_folder"))["model"]
    mbf = client.vae_load(str(model_dir / "vae_folder"), dtype="bf16")
    assert mbf["model"] != m32 and mbf["dtype"] == "bf16"
    img = client.vae_decode(mbf["model"], torch.randn(1, 4, 8, 8))
    assert img.dtype == torch.float32 and img.shape == (1, 64, 64, 3)  # outputs stay float32
    assert client.hello()["devices"][0] == "cpu"


def test_memory_budget_evicts_idle_lru_only(make_settings, model_dir):
    vae_bytes = sum(p.stat().st_size for p in (model_dir / "vae_folder").rglob("*.safetensors"))
    d = Daemon(make_settings(max_model_bytes={"cpu": int(vae_bytes * 1.5)}))
    d.start()
    try:
        c = DaemonClient(*d.address, token=d.token)
        a = c.vae_load(str(model_dir / "vae_folder"))["model"]
        b = c.vae_load(str(model_dir / "vae_file" / "tiny_vae.safetensors"))["model"]  # evicts A (idle)
        assert [m["id"] for m in c.ps()] == [b]
        # B busy with a long decode: loading A again must not evict B -> oom, B still there.
        done = threading.Event()

        def busy() -> None:
            with DaemonClient(*d.address, token=d.token) as c2:
                c2.vae_decode(b, torch.zeros(1, 4, 96, 96))
            done.set()

        t = threading.Thread(target=busy)
        t.start()
        deadline = time.time() + 10
        while not any(m["users"] for m in c.ps()) and time.time() < deadline:
            time.sleep(0.01)
        with pytest.raises(DaemonError) as ei:
            c.vae_load(str(model_dir / "vae_folder"))
        assert ei.value.code == "oom" and "in use" in ei.value.message
        t.join(120)
        assert done.is_set() and [m["id"] for m in c.ps()] == [b]
        assert c.vae_load(str(model_dir / "vae_folder"))["model"] == a  # idle now: B evicted
        c.close()
    finally:
        d.stop(10)


def test_lora_patched_weights_count_against_the_budget(make_settings, model_dir, lora_files):
    vae_path, clip_path = str(model_dir / "vae_folder"), str(model_dir / "clip_l")

    def use(c: DaemonClient) -> tuple[str, str, str]:
        vae = c.vae_load(vae_path)["model"]
        clip = c.clip_load([clip_path])["model"]
        sha = c.lora_load(str(lora_files["a"][0]))["sha256"]
        c.clip_encode(clip, text="a cat", loras=[{"lora": sha, "strength": 0.8}])  # builds the patched copies
        return vae, clip, sha

    # Measure: weights of both models and the patched copies one LoRA stack costs.
    d = Daemon(make_settings())
    d.start()
    try:
        with DaemonClient(*d.address, token=d.token) as c:
            vae, clip, _ = use(c)
            sizes = {m["id"]: m for m in c.ps()}
            weights = sizes[vae]["bytes"] + sizes[clip]["bytes"]
            cache = sizes[clip]["cache_bytes"]
            assert cache > 0 and sizes[vae]["cache_bytes"] == 0
            assert c.status()["devices"]["cpu"]["models_bytes"] == weights + cache
    finally:
        d.stop(10)

    # A budget both models' weights fit in, but not with the patched copies: the encode
    # that grows the cache evicts the idle VAE, as a load would.
    budget = weights + cache // 2
    d = Daemon(make_settings(max_model_bytes={"cpu": budget}))
    d.start()
    try:
        with DaemonClient(*d.address, token=d.token) as c:
            vae, clip, _ = use(c)
            deadline = time.time() + 10
            while len(c.ps()) > 1 and time.time() < deadline:
                time.sleep(0.02)
            (left,) = c.ps()
            assert left["id"] == clip and left["cache_bytes"] == cache
            assert c.status()["devices"]["cpu"]["models_bytes"] <= budget
    finally:
        d.stop(10)


def _wait_for_models(c: DaemonClient, n: int, timeout: float = 30) -> None:
    """Preload runs in the background: wait (bounded) until ``n`` models are loaded."""
    deadline = time.time() + timeout
    while len(c.ps()) < n and time.time() < deadline:
        time.sleep(0.1)


def test_preload_and_warm_start(make_settings, model_dir):
    vae = str(model_dir / "vae_folder")
    clip = str(model_dir / "clip_l")
    d = Daemon(make_settings(preload=[f"vae:{vae}", f"clip:sd1:{clip}"], warm_start=True))
    d.start()
    try:
        c = DaemonClient(*d.address, token=d.token)
        _wait_for_models(c, 2)
        assert sorted(m["kind"] for m in c.ps()) == ["clip", "vae"]
        c.vae_load(str(model_dir / "vae_file" / "tiny_vae.safetensors"), dtype="bf16")
        c.close()
    finally:
        d.stop(10)
    # Next start restores the previous run's models (including the extra bf16 one).
    d2 = Daemon(make_settings(warm_start=True))
    d2.start()
    try:
        c = DaemonClient(*d2.address, token=d2.token)
        _wait_for_models(c, 3)
        models = c.ps()
        assert len(models) == 3 and {m["dtype"] for m in models} == {"fp32", "bf16"}
        c.close()
    finally:
        d2.stop(10)


@pytest.mark.slow
def test_unload_really_returns_memory(tmp_path):
    """A ~300 MB model in a separate daemon process: RSS falls back after unload."""
    from luna_daemon.bench import daemon_process, warm_up
    from luna_daemon.models import tiny

    path = tiny.make_big_vae(tmp_path, target_bytes=320 * 1024 * 1024)
    small = tiny.make_tiny_vae(tmp_path / "small", layout="file")
    with daemon_process([str(tmp_path)]) as (port, token, proc):
        p = psutil.Process(proc.pid)
        with DaemonClient("127.0.0.1", port, token=token, timeout=300) as c:
            warm_up(c, small)
            before = p.memory_info().rss
            info = c.vae_load(str(path))
            assert info["bytes"] > 280e6  # "a few hundred MB"
            c.vae_decode(info["model"], torch.zeros(1, 4, 16, 16))
            loaded = p.memory_info().rss
            assert loaded - before > 0.5 * info["bytes"]  # the model really is resident
            c.unload(info["model"])
            after = p.memory_info().rss
    # "near its earlier level": within 15% of the model's size.
    assert after - before < 0.15 * info["bytes"], (before, loaded, after)


# ----------------------------------------------------------------------------- out of memory
class _OomVae:
    """A VAE whose untiled decode runs out of memory (as a big image does on a GPU).

    A test double of the *engine* layer only: the retry/answer logic under test is the
    service's, running over the real registry, executor and events.
    """

    kind = "vae"
    dtype = torch.float32

    def __init__(self, mode: str):
        self.mode = mode
        self.calls: list[str] = []

    def nbytes(self) -> int:
        return 1

    def info(self) -> dict:
        return {}

    def release(self) -> None:
        pass

    def decode(self, latent, tiled=None):
        self.calls.append("tiled" if tiled is not None else "plain")
        if self.mode == "boom":
            raise RuntimeError("weights are corrupt")
        if tiled is None or self.mode == "always":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return torch.zeros(1, 8, 8, 3)


def test_vae_oom_retries_tiled_then_answers_oom(make_settings, model_dir):
    import concurrent.futures as cf

    from luna_daemon.events import EventBus
    from luna_daemon.models.engines.base import Engine
    from luna_daemon.models.registry import Registry
    from luna_daemon.protocol import LunaError, Request
    from luna_daemon.service import Service

    class OomEngine(Engine):
        name = "oom-test"

        def __init__(self) -> None:
            self.mode = "once"
            self.last: _OomVae | None = None

        def load_vae(self, paths, device, dtype):
            self.last = _OomVae(self.mode)
            return self.last

        def load_clip(self, *a, **k):
            raise NotImplementedError

    class Ctx:
        client = "test"

        def wait(self, fut: cf.Future):
            return fut.result(30)

    settings = make_settings()
    events = EventBus()
    seen: list = []
    events.subscribe(lambda e: seen.append(e) if e.type == "warning" else None)
    engine = OomEngine()
    registry = Registry(settings, engine, events)
    svc = Service(settings, registry, events, "tok")

    def call(op, **args):
        return svc.handle(Request(1, op, args, "tok"), Ctx())

    try:
        for mode, expect in (("once", "ok"), ("always", "oom"), ("boom", "model_error")):
            engine.mode = mode
            mid = call("vae_load", path=str(model_dir / "vae_folder"), dtype={"once": "fp32", "always": "bf16", "boom": "fp16"}[mode])["model"]
            try:
                out = call("vae_decode", model=mid, latent=torch.zeros(1, 4, 1, 1))
                got = "ok"
                assert out["image"].shape == (1, 8, 8, 3)
            except LunaError as exc:
                got = exc.code
                assert exc.message  # never empty
            assert got == expect, (mode, got)
            assert engine.last.calls == {"once": ["plain", "tiled"], "always": ["plain", "tiled"], "boom": ["plain"]}[mode]
        assert any("retrying tiled" in e.data["message"] for e in seen)
        # Still serving after all of that.
        assert call("ping")["pong"] is True and len(call("ps")["models"]) == 3
    finally:
        registry.close(5)


def test_model_file_rewritten_in_place_while_loaded(tmp_path):
    """`cp new.safetensors loaded.safetensors` truncates and rewrites the loaded file. The
    daemon keeps serving the weights it loaded (it owns them; a weight left as a view of
    the file mapping would change, or crash the daemon with SIGBUS)."""
    from luna_daemon.bench import daemon_process
    from luna_daemon.models import tiny

    path = tiny.make_tiny_vae(tmp_path / "a", layout="file", seed=1)
    other = tiny.make_tiny_vae(tmp_path / "b", layout="file", seed=2)
    assert path.stat().st_size == other.stat().st_size and path.read_bytes() != other.read_bytes()
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with daemon_process([str(tmp_path)]) as (port, token, proc):
        with DaemonClient("127.0.0.1", port, token=token) as c:
            model = c.vae_load(str(path))["model"]
            before = c.vae_decode(model, latent).clone()
            with open(path, "r+b") as f:  # what cp does: same inode, truncated, rewritten
                f.truncate(0)
                f.write(other.read_bytes())
            after = c.vae_decode(model, latent)
            assert torch.equal(after, before)
            assert proc.poll() is None
            # Loading the path again sees the new file (size/mtime are part of the model id).
            assert c.vae_load(str(path))["model"] != model


def test_warm_start_restores_an_uploaded_state_dict(make_settings, model_dir):
    """A checkpoint-tunnel VAE (``vae_load_sd``: stored in the daemon's upload store, an
    internal root no client path resolves to) is restored by the next warm start too; it
    failed with ``forbidden_path`` once the upload store stopped being a model root."""
    import hashlib

    import torch

    blob = (model_dir / "vae_file" / "tiny_vae.safetensors").read_bytes()
    sha = hashlib.sha256(blob).hexdigest()
    d = Daemon(make_settings(warm_start=True))
    d.start()
    try:
        with DaemonClient(*d.address, token=d.token) as c:
            c.call("vae_load_sd", {"sha256": sha, "data": torch.frombuffer(bytearray(blob), dtype=torch.uint8)})
            assert [m["kind"] for m in c.ps()] == ["vae"]
    finally:
        d.stop(10)
    d2 = Daemon(make_settings(warm_start=True))
    d2.start()
    try:
        with DaemonClient(*d2.address, token=d2.token) as c:
            _wait_for_models(c, 1)
            models = c.ps()
            assert len(models) == 1 and models[0]["kind"] == "vae", models
    finally:
        d2.stop(10)
