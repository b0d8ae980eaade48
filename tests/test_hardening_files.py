"""Hostile and odd files never freeze, bloat or confuse the daemon (issue 11, file items).

FIFOs, sockets, symlink loops, links out of the model roots, 5,000-character names,
folders where files belong, sparse giant files and invalid uploads: every one answers a
typed code quickly, reads nothing it should not, keeps nothing it should not, and the
daemon keeps serving. Real files, real FIFOs, a real daemon process for the freeze.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tray_helpers import luna_env, spawn

from luna_daemon import fsutil
from luna_daemon.client import DaemonClient, DaemonError, wait_for_daemon
from luna_daemon.daemon import Daemon
from luna_daemon.models.engines.standalone import StandaloneEngine
from luna_daemon.models.lora import LoraCache
from luna_daemon.models.registry import Registry
from luna_daemon.models.residency import restore_previous
from luna_daemon.netutil import free_port
from luna_daemon.protocol import LunaError
from luna_daemon.settings import Settings, SettingsError, read_token

needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
BOUND_S = 10.0  # "answers within": a hang is what is tested, never speed

# Opens, for writing, every FIFO under a folder that has existed for UNJAM_S: a reader stuck
# in open() (the bug) is released, so a regression fails the bounded waits instead of
# hanging the test run. Killed at teardown.
UNJAM_S = 40.0  # well past every bound below, so a freeze fails them first
_UNJAMMER = r"""
import os, stat, sys, time
top, delay = sys.argv[1], float(sys.argv[2])
seen = {}
while True:
    now = time.monotonic()
    for folder, _dirs, files in os.walk(top):
        for name in files:
            p = os.path.join(folder, name)
            try:
                if not stat.S_ISFIFO(os.lstat(p).st_mode):
                    continue
            except OSError:
                continue
            if now - seen.setdefault(p, now) >= delay:
                try:
                    os.close(os.open(p, os.O_WRONLY | os.O_NONBLOCK))  # ENXIO while nobody reads
                except OSError:
                    pass
    time.sleep(0.5)
"""


@pytest.fixture
def root(tmp_path) -> Path:
    folder = tmp_path / "models"
    folder.mkdir()
    return folder.resolve()


@pytest.fixture
def outside(tmp_path) -> Path:
    folder = tmp_path / "outside"
    folder.mkdir()
    return folder.resolve()


@pytest.fixture
def mkfifo(tmp_path):
    """``mkfifo(path)``; an unjammer process guards the test against hanging forever."""
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    guard = subprocess.Popen([sys.executable, "-c", _UNJAMMER, str(tmp_path), str(UNJAM_S)])

    def make(path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            path.unlink()
        os.mkfifo(path)
        return path

    yield make
    guard.kill()
    guard.wait(10)


def within(fn, *args, seconds: float = BOUND_S, **kwargs):
    """Run ``fn`` on a thread; it must finish within ``seconds``. Returns its result or
    re-raises its exception."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            box["error"] = exc

    t0 = time.monotonic()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds + UNJAM_S + 10)
    elapsed = time.monotonic() - t0
    assert not t.is_alive() and elapsed < seconds, f"{getattr(fn, '__name__', fn)} blocked for {elapsed:.1f}s"
    if "error" in box:
        raise box["error"]
    return box.get("value")


def code_of(fn, *args, **kwargs) -> tuple[str, str]:
    """(code, message) of the typed error ``fn`` raises within the bound."""
    try:
        within(fn, *args, **kwargs)
    except (LunaError, DaemonError) as exc:
        return exc.code, getattr(exc, "message", str(exc))
    raise AssertionError(f"{getattr(fn, '__name__', fn)} succeeded; a typed error was expected")


@pytest.fixture
def registry(make_settings, root):
    reg = Registry(make_settings(model_roots=[str(root)]), StandaloneEngine())
    yield reg
    reg.close(10)


@pytest.fixture
def served(make_settings, root):
    """An in-process daemon over ``root`` and a client (real sockets)."""
    d = Daemon(make_settings(model_roots=[str(root)], lora_cache_bytes=16 * 1024 * 1024))
    d.start()
    c = DaemonClient(*d.address, token=d.token, timeout=30)
    yield d, c
    c.close()
    d.stop(10)


def _rchar() -> int | None:
    """Bytes this process has read through read() so far (Linux), else None."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _sparse_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> Path:
    """A valid safetensors header for F32/F16 ``tensors`` (name -> (dtype, shape)) over a
    sparse data section: huge on paper, nothing on disk, nothing in memory."""
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        n = (4 if dtype == "F32" else 2)
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
    os.truncate(path, 8 + len(raw) + offset)
    return path


def _lora_te(rank: int = 4, width: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    return {f"{base}.lora_up.weight": torch.randn(width, rank, generator=g),
            f"{base}.lora_down.weight": torch.randn(rank, width, generator=g),
            f"{base}.alpha": torch.tensor(float(rank)),
            "lora_unet_x.lora_up.weight": torch.randn(8, rank, generator=g),
            "lora_unet_x.lora_down.weight": torch.randn(rank, 8, generator=g)}


# ----------------------------------------------------------------------------- 1. FIFO freeze
@needs_fifo
def test_fifo_loads_never_freeze_a_served_daemon(tmp_path, root, mkfifo):
    """The tester's reproduction: ``vae_load`` of a FIFO stopped the whole process (ping and
    SIGTERM included); ``lora_load`` of one blocked its connection forever."""
    vae, lora, clip = (mkfifo(root / n) for n in ("vae.safetensors", "lora.safetensors", "clip.safetensors"))
    home = tmp_path / "luna"
    port = free_port()
    env = luna_env(home, port=port, lock_port=free_port(), model_roots=str(root))
    proc = spawn([sys.executable, "-m", "luna_daemon", "serve", "--no-monitor"], env, tmp_path / "serve.out")
    try:
        wait_for_daemon("127.0.0.1", port, 90, proc=proc)
        token = read_token(Settings.load(env={"LUNA_HOME": str(home)}))
        results: dict = {}

        def load_fifo_vae():
            with DaemonClient("127.0.0.1", port, token=token, timeout=BOUND_S + UNJAM_S + 10) as c:
                try:
                    c.vae_load(str(vae))
                except DaemonError as exc:
                    results["vae"] = exc.code

        loader = threading.Thread(target=load_fifo_vae)
        loader.start()
        # While that load is attempted (the first one imports the engine's libraries for
        # seconds before it opens the file: ping for as long as it runs), others are answered.
        pings = 0
        while loader.is_alive() or pings < 3:
            with DaemonClient("127.0.0.1", port, token=token, timeout=5, connect_timeout=5) as c:
                assert within(c.ping, seconds=5)["pong"] is True
            pings += 1
            time.sleep(0.2)
        loader.join(BOUND_S + UNJAM_S + 15)
        assert results.get("vae") == "bad_args"
        with DaemonClient("127.0.0.1", port, token=token, timeout=BOUND_S + UNJAM_S + 10) as c:
            code, msg = code_of(c.lora_load, str(lora))
            assert code == "bad_args" and "FIFO" in msg
            assert code_of(c.clip_load, [str(clip)])[0] == "bad_args"
            assert c.ping()["pong"] is True and c.ps() == []
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)  # SIGTERM still stops it
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, (tmp_path / "serve.out").read_text(errors="replace")[-3000:]


@needs_fifo
def test_fifo_anywhere_in_a_model_is_refused_without_blocking(registry, root, model_dir, mkfifo):
    # A single-file VAE whose sidecar JSON is a FIFO.
    shutil.copy(model_dir / "vae_file" / "tiny_vae.safetensors", root / "v.safetensors")
    mkfifo(root / "v.json")
    # A diffusers VAE folder whose config.json / weights are FIFOs.
    shutil.copytree(model_dir / "vae_folder", root / "vae_cfg")
    mkfifo(root / "vae_cfg" / "config.json")
    shutil.copytree(model_dir / "vae_folder", root / "vae_w")
    mkfifo(root / "vae_w" / "diffusion_pytorch_model.safetensors")
    # A CLIP folder whose tokenizer files are FIFOs (one transformers needs, one it may open).
    shutil.copytree(model_dir / "clip_l", root / "clip_m")
    mkfifo(root / "clip_m" / "merges.txt")
    shutil.copytree(model_dir / "clip_l", root / "clip_s")
    mkfifo(root / "clip_s" / "special_tokens_map.json")
    cases = [("vae", "v.safetensors"), ("vae", "vae_cfg"), ("vae", "vae_w"), ("clip", "clip_m"), ("clip", "clip_s")]
    for kind, name in cases:
        code, msg = code_of(registry.load, kind, [name])
        assert code == "bad_args" and "FIFO" in msg, (name, code, msg)
    assert registry.entries() == []
    # The same models without the FIFOs load: the checks refuse only what they should.
    (root / "v.json").unlink()
    assert within(registry.load, "vae", ["v.safetensors"]).kind == "vae"


# ----------------------------------------------------------------------------- 5. sizes
@pytest.mark.skipif(_rchar() is None, reason="needs /proc/self/io to count bytes read")
def test_lora_over_the_cache_budget_is_refused_before_reading(make_settings, root):
    base = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    rows = 8 * 1024 * 1024  # 2 x 128 MiB of F32 on paper
    path = _sparse_safetensors(root / "huge.safetensors", {f"{base}.lora_up.weight": ("F32", [rows, 4]),
                                                          f"{base}.lora_down.weight": ("F32", [4, rows])})
    cache = LoraCache(make_settings(model_roots=[str(root)], lora_cache_bytes=16 * 1024 * 1024))
    before = _rchar()
    code, msg = code_of(cache.load_path, path)
    read = _rchar() - before
    assert code == "too_large" and "lora_cache_bytes" in msg
    assert read < 4 * 1024 * 1024, f"{read} bytes read to refuse a LoRA by its header"
    assert cache.stats()["entries"] == 0


def test_lora_load_path_reads_text_encoder_tensors_and_hashes_the_file(make_settings, root):
    path = root / "style.safetensors"
    save_file(_lora_te(), str(path))
    cache = LoraCache(make_settings(model_roots=[str(root)]))
    first = within(cache.load_path, path)
    assert first["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and first["cached"] is False
    assert first["modules"] == 1 and first["bytes"] == 2 * 32 * 4 * 4  # UNet pair not kept
    assert within(cache.put, path.read_bytes())["cached"] is True  # same id by content
    [(up, down, alpha)] = cache.get(first["sha256"]).modules.values()
    base = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert torch.equal(up, _lora_te()[f"{base}.lora_up.weight"]) and torch.equal(down, _lora_te()[f"{base}.lora_down.weight"])
    assert alpha == 4.0


@pytest.mark.skipif(_rchar() is None, reason="needs /proc/self/io to count bytes read")
def test_model_over_the_memory_budget_is_refused_before_reading(make_settings, root):
    _sparse_safetensors(root / "big.safetensors", {"encoder.conv_in.weight": ("F32", [64 * 1024 * 1024])})
    reg = Registry(make_settings(model_roots=[str(root)], max_model_bytes={"cpu": 32 * 1024 * 1024}), StandaloneEngine())
    try:
        before = _rchar()
        code, msg = code_of(reg.load, "vae", ["big.safetensors"])
        assert code == "oom" and "max_model_bytes" in msg
        assert _rchar() - before < 4 * 1024 * 1024
    finally:
        reg.close(10)


def test_oversized_sidecar_is_too_large(registry, root, model_dir):
    shutil.copy(model_dir / "vae_file" / "tiny_vae.safetensors", root / "v.safetensors")
    with open(root / "v.json", "wb") as fh:
        fh.write(b"{}")
    os.truncate(root / "v.json", fsutil.SMALL_FILE_CAP + 1)  # sparse
    code, msg = code_of(registry.load, "vae", ["v.safetensors"])
    assert code == "too_large" and "16 MiB" in msg


# ----------------------------------------------------------------------------- 6. uploads
def _upload(c: DaemonClient, kind: str, blob: bytes, *, send: bool = True):
    sha = hashlib.sha256(blob).hexdigest()
    args = {"sha256": sha, **({"data": torch.frombuffer(bytearray(blob), dtype=torch.uint8)} if send else {})}
    return sha, (lambda: c.call(f"{kind}_load_sd", args))


def _uploads_dir(d: Daemon) -> Path:
    return Path(d.settings.state_dir) / "uploads"


def test_invalid_uploads_answer_bad_args_and_leave_nothing(served, model_dir):
    d, c = served
    good = (model_dir / "vae_file" / "tiny_vae.safetensors").read_bytes()
    pickle_like = b"\x80\x04\x95\x0b\x00\x00\x00\x00\x00\x00\x00}\x94\x8c\x01a\x94K\x01s."  # a pickled dict
    overlap = bytearray(save({"a": torch.zeros(4), "b": torch.zeros(4)}))
    header_len = struct.unpack("<Q", overlap[:8])[0]
    header = json.loads(overlap[8:8 + header_len])
    header["b"]["data_offsets"] = [0, 16]  # b overlaps a
    raw = json.dumps(header, separators=(",", ":")).encode().ljust(header_len)
    assert len(raw) == header_len
    overlap[8:8 + header_len] = raw
    for kind in ("vae", "clip"):
        for blob in (pickle_like, good[:-100], bytes(overlap), b"", b"\xff" * 8 + b"{}"):
            if not blob:
                continue
            sha, call = _upload(c, kind, blob)
            code, msg = code_of(call)
            assert code == "bad_args" and "safetensors" in msg, (kind, blob[:16], code, msg)
            left = sorted(p.name for p in _uploads_dir(d).iterdir()) if _uploads_dir(d).exists() else []
            assert not [n for n in left if sha in n], left
    assert c.ps() == []


def test_a_stored_upload_that_is_invalid_is_removed(served, model_dir):
    d, c = served
    blob = b"not safetensors at all, a leftover of an older daemon"
    sha = hashlib.sha256(blob).hexdigest()
    folder = _uploads_dir(d)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"vae-{sha}.safetensors").write_bytes(blob)
    (folder / f"vae-{sha}.json").write_text(json.dumps({"files": [f"vae-{sha}.safetensors"], "clip_type": None}))
    _, call = _upload(c, "vae", blob, send=False)
    assert code_of(call)[0] == "not_found"  # asks for the bytes again ...
    assert not any(sha in p.name for p in folder.iterdir())  # ... and kept nothing invalid


def test_uploads_folder_is_not_a_root_for_client_paths(served, root, outside, model_dir):
    d, c = served
    blob = (model_dir / "vae_file" / "tiny_vae.safetensors").read_bytes()
    sha, call = _upload(c, "vae", blob)
    model = within(call)["model"]
    _, again = _upload(c, "vae", blob, send=False)
    assert within(again)["model"] == model  # the hash alone finds the stored upload
    shutil.copy(model_dir / "vae_file" / "tiny_vae.safetensors", outside / "x.safetensors")
    (root / "escape.safetensors").symlink_to(outside / "x.safetensors")
    code, msg = code_of(c.vae_load, "escape.safetensors")
    assert code == "forbidden_path" and str(_uploads_dir(d)) not in msg, msg
    stored = _uploads_dir(d) / f"vae-{sha}.safetensors"
    assert stored.is_file()
    assert code_of(c.vae_load, str(stored))[0] == "forbidden_path"
    assert code_of(c.lora_load, str(stored))[0] == "forbidden_path"
    code, msg = code_of(c.vae_load, stored.name)
    assert code == "not_found" and str(root) in msg and str(_uploads_dir(d)) not in msg


# ----------------------------------------------------------------------------- 7. odd paths
def test_odd_paths_answer_typed_codes_and_the_daemon_keeps_serving(served, root, outside, model_dir, tmp_path):
    _d, c = served
    (root / "loop.safetensors").symlink_to(root / "loop.safetensors")
    (root / "a.safetensors").symlink_to(root / "b.safetensors")
    (root / "b.safetensors").symlink_to(root / "a.safetensors")
    (root / "dangling.safetensors").symlink_to(root / "gone.safetensors")
    (root / "out.safetensors").symlink_to(outside / "x.safetensors")
    (root / "dir.safetensors").mkdir()
    shutil.copy(model_dir / "vae_file" / "tiny_vae.safetensors", root / "file.safetensors")
    long_name = "x" * 5000 + ".safetensors"
    sock_path = root / "s.safetensors"
    server = socket.socket(socket.AF_UNIX) if hasattr(socket, "AF_UNIX") else None
    if server is not None and len(str(sock_path)) < 100:
        server.bind(str(sock_path))
    # path -> code for lora_load, and for vae_load / clip_load (a folder is a valid model
    # path -- diffusers layout -- so an empty one is a model_error saying what it lacks).
    expected = {
        "loop.safetensors": ("bad_args",) * 2, "a.safetensors": ("bad_args",) * 2, long_name: ("bad_args",) * 2,
        str(root / long_name): ("bad_args",) * 2, "dangling.safetensors": ("not_found",) * 2,
        "out.safetensors": ("forbidden_path",) * 2, "file.safetensors/x.safetensors": ("not_found",) * 2,
        "../outside/x.safetensors": ("forbidden_path",) * 2, "dir.safetensors": ("bad_args", "model_error"),
    }
    if sock_path.exists():
        expected["s.safetensors"] = ("bad_args",) * 2
    try:
        for path, (lora_code, model_code) in expected.items():
            for op, call in (("lora_load", lambda p=path: c.lora_load(p)), ("vae_load", lambda p=path: c.vae_load(p)),
                             ("clip_load", lambda p=path: c.clip_load([p]))):
                got = code_of(call)
                assert got[0] == (lora_code if op == "lora_load" else model_code), (op, path[:40], got)
        assert c.ping()["pong"] is True and c.ps() == []
    finally:
        if server is not None:
            server.close()


def test_symlinks_in_a_model_must_stay_inside_the_roots(registry, root, outside, model_dir):
    # A VAE's sidecar JSON that links out of the roots is never read.
    shutil.copy(model_dir / "vae_file" / "tiny_vae.safetensors", root / "v.safetensors")
    (outside / "v.json").write_text(json.dumps({"norm_num_groups": 32}))
    (root / "v.json").symlink_to(outside / "v.json")
    code, msg = code_of(registry.load, "vae", ["v.safetensors"])
    assert code == "forbidden_path" and "v.json" in msg
    # A folder whose weights link out of the roots.
    shutil.copytree(model_dir / "vae_folder", root / "vf")
    shutil.move(root / "vf" / "diffusion_pytorch_model.safetensors", outside / "w.safetensors")
    (root / "vf" / "diffusion_pytorch_model.safetensors").symlink_to(outside / "w.safetensors")
    assert code_of(registry.load, "vae", ["vf"])[0] == "forbidden_path"
    # A CLIP folder whose tokenizer file links out of the roots.
    shutil.copytree(model_dir / "clip_l", root / "cl")
    shutil.move(root / "cl" / "vocab.json", outside / "vocab.json")
    (root / "cl" / "vocab.json").symlink_to(outside / "vocab.json")
    assert code_of(registry.load, "clip", ["cl"])[0] == "forbidden_path"
    # Links that stay inside the roots (a Hugging Face cache: snapshot files -> blobs) load.
    blobs, snap = root / "hub" / "blobs", root / "hub" / "snapshots" / "abc"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in (model_dir / "vae_folder").iterdir():
        shutil.copy(f, blobs / f.name)
        (snap / f.name).symlink_to(Path("../../blobs") / f.name)
    assert within(registry.load, "vae", [str(snap)]).kind == "vae"


def test_truncated_or_bogus_model_files_are_model_errors(registry, root, model_dir):
    src = (model_dir / "vae_file" / "tiny_vae.safetensors").read_bytes()
    (root / "cut.safetensors").write_bytes(src[: len(src) // 2])
    (root / "huge_header.safetensors").write_bytes(struct.pack("<Q", 2**60) + b"{}")
    (root / "empty.safetensors").write_bytes(b"")
    for name in ("cut.safetensors", "huge_header.safetensors", "empty.safetensors"):
        assert code_of(registry.load, "vae", [name])[0] == "model_error", name
    assert code_of(registry.load, "clip", ["cut.safetensors"])[0] == "model_error"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_is_forbidden_path(registry, root, model_dir):
    shutil.copy(model_dir / "vae_file" / "tiny_vae.safetensors", root / "locked.safetensors")
    os.chmod(root / "locked.safetensors", 0)
    try:
        code, msg = code_of(registry.load, "vae", ["locked.safetensors"])
        assert code == "forbidden_path" and "permission" in msg
    finally:
        os.chmod(root / "locked.safetensors", 0o600)


# ----------------------------------------------------------------------------- other readers
@needs_fifo
def test_config_token_and_warm_start_files_never_block(tmp_path, make_settings, mkfifo):
    fifo = mkfifo(tmp_path / "config.toml")
    with pytest.raises(SettingsError) as err:
        within(Settings.load, config_file=str(fifo), env={"LUNA_HOME": str(tmp_path / "h")})
    assert "FIFO" in str(err.value)
    settings = make_settings()
    mkfifo(settings.token_path)
    assert code_of(read_token, settings)[0] == "bad_args"
    mkfifo(settings.state_file)
    within(restore_previous, SimpleNamespace(settings=settings, registry=None))  # logged and skipped


def test_safetensors_header_check_agrees_with_the_library():
    """What the header check accepts, safetensors loads; what it refuses, safetensors does too."""
    from safetensors.torch import load

    valid = save({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.zeros(3, dtype=torch.bfloat16),
                  "c": torch.zeros(0), "d": torch.ones(2, dtype=torch.uint8)}, metadata={"k": "v"})
    n = struct.unpack("<Q", valid[:8])[0]
    head = json.loads(valid[8:8 + n])

    def with_header(h: dict, data: bytes | None = None) -> bytes:
        raw = json.dumps(h).encode()
        return struct.pack("<Q", len(raw)) + raw + (valid[8 + n:] if data is None else data)

    def edit(name: str, **change) -> dict:
        h = json.loads(json.dumps(head))
        h[name].update(change)
        return h

    blobs = {
        "valid": valid,
        "truncated": valid[:-1],
        "trailing": valid + b"\0",
        "short": valid[:7],
        "len_past_end": struct.pack("<Q", len(valid)) + valid[8:],
        "not_json": struct.pack("<Q", 4) + b"abcd",
        "not_object": with_header([1, 2]),  # type: ignore[arg-type]
        "unknown_dtype": with_header(edit("a", dtype="F33")),
        "bad_shape": with_header(edit("a", shape=[2, -3])),
        "size_mismatch": with_header(edit("a", shape=[2, 2])),
        "overlap": with_header(edit("b", data_offsets=[0, 6])),
        "gap": with_header(edit("d", data_offsets=[head["d"]["data_offsets"][0] + 1, head["d"]["data_offsets"][1] + 1]),
                           valid[8 + n:] + b"\0"),
        "bad_metadata": with_header({**head, "__metadata__": {"k": 1}}),
        "empty_ok": with_header({}, b""),
    }
    for name, blob in blobs.items():
        try:
            load(bytes(blob))
            library_ok = True
        except Exception:  # noqa: BLE001 - SafetensorError has no stable import name
            library_ok = False
        try:
            fsutil.safetensors_header_of(blob)
            ours_ok = True
        except ValueError:
            ours_ok = False
        assert ours_ok == library_ok, (name, ours_ok, library_ok)
    assert fsutil.safetensors_header_of(valid).nbytes() == 6 * 4 + 3 * 2 + 0 + 2


# ----------------------------------------------------------------------------- comfy engine
@pytest.fixture(scope="module")
def comfy_engine(tmp_path_factory):
    import comfy_models

    from luna_daemon.models.engines.comfy import ComfyEngine

    with comfy_models.fake_comfy_isolated():
        settings = Settings.load(env={"LUNA_HOME": str(tmp_path_factory.mktemp("ch") / "home")},
                                 overrides={"engine": "comfy", "comfyui_root": str(comfy_models.FAKE_COMFY_ROOT)})
        eng = ComfyEngine(settings, comfy_models.FAKE_COMFY_ROOT)
        eng.prepare()
        yield eng, comfy_models


@needs_fifo
def test_comfy_engine_is_never_handed_a_fifo_or_a_link_out(comfy_engine, make_settings, root, outside, mkfifo):
    eng, comfy_models = comfy_engine
    reg = Registry(make_settings(model_roots=[str(root)]), eng)
    try:
        mkfifo(root / "vae" / "fifo.safetensors")
        mkfifo(root / "text_encoders" / "fifo.safetensors")
        comfy_models.write_vae(root / "vae" / "side.safetensors", seed=1)
        mkfifo(root / "vae" / "side.json")
        comfy_models.write_vae(root / "vae" / "link.safetensors", seed=1)
        shutil.move(root / "vae" / "link.json", outside / "link.json")
        (root / "vae" / "link.json").symlink_to(outside / "link.json")
        assert code_of(reg.load, "vae", ["vae/fifo.safetensors"])[0] == "bad_args"
        assert code_of(reg.load, "clip", ["text_encoders/fifo.safetensors"])[0] == "bad_args"
        # The engine's own checks, without the registry in front.
        cpu = torch.device("cpu")
        assert code_of(eng.load_vae, [str(root / "vae" / "fifo.safetensors")], cpu, None)[0] == "bad_args"
        assert code_of(eng.load_clip, [str(root / "text_encoders" / "fifo.safetensors")], "sd1", cpu, None)[0] == "bad_args"
        code, msg = code_of(reg.load, "vae", ["vae/side.safetensors"])
        assert code == "bad_args" and "FIFO" in msg
        assert code_of(reg.load, "vae", ["vae/link.safetensors"])[0] == "forbidden_path"
        assert code_of(reg.load, "vae", ["vae"])[0] == "bad_args"  # a folder: single files only
        (root / "vae" / "side.json").unlink()
        assert within(reg.load, "vae", ["vae/side.safetensors"]).kind == "vae"  # without the FIFO it loads
    finally:
        reg.close(10)
