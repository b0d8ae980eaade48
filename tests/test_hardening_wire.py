"""Issue 11 (wire items): malformed or unauthenticated input over real sockets.

Real daemon processes (``python -m luna_daemon serve``, LUNA_HOME in tmp) for memory, log
and stderr checks; an in-process daemon for the property-based fuzz, so that an exception
escaping a connection thread (threading.excepthook) is seen directly.
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import psutil
import pytest
from hypothesis import HealthCheck, given, settings as hsettings

from conftest import free_port, serve_env
from hostile_frames import encode, hostile_frame
from luna_daemon import protocol, transport
from luna_daemon.client import DaemonClient, wait_for_daemon
from luna_daemon.logs import RateLimitedLog
from luna_daemon.protocol import ErrorCode, Limits
from luna_daemon.service import UNKNOWN_OP_LABEL
from luna_daemon.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
CODES = {c.value for c in ErrorCode}
MiB = 1024 * 1024


class Served:
    """A ``luna-daemon serve`` process under a tmp LUNA_HOME; stderr goes to a file (a
    pipe nobody reads could fill and block the daemon's logging)."""

    def __init__(self, home: Path, model_dir: Path):
        self.home = home
        self.port, self.monitor_port = free_port(), free_port()
        self.env = serve_env(home, model_dir, LUNA_PORT=str(self.port), LUNA_MONITOR_PORT=str(self.monitor_port),
                             PYTHONPATH=str(ROOT))
        home.mkdir(parents=True, exist_ok=True)
        self.stderr_path = home / "stderr.txt"
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115 -- lives as long as the process
        self.proc = subprocess.Popen([sys.executable, "-m", "luna_daemon", "serve"], env=self.env,
                                     stdout=subprocess.DEVNULL, stderr=self._stderr)
        try:
            wait_for_daemon("127.0.0.1", self.port, 90, proc=self.proc)
        except BaseException:
            self.stop()
            raise
        self.token = (home / "config" / "token").read_text().strip()
        self.addr = ("127.0.0.1", self.port)

    def rss(self) -> int:
        return psutil.Process(self.proc.pid).memory_info().rss

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def log_text(self) -> str:
        return (self.home / "logs" / "luna-daemon.log").read_text(errors="replace")

    def client(self) -> DaemonClient:
        return DaemonClient(*self.addr, token=self.token, timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._stderr.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory, model_dir):
    s = Served(tmp_path_factory.mktemp("served") / "home", model_dir)
    yield s
    s.stop()


def _answer(sock: socket.socket, timeout: float = 5.0):
    """(id, code-or-"ok", message) of the next answer, or "closed" if the daemon closed
    the connection without one."""
    try:
        frame = transport.Channel(sock).read_frame(Limits(), idle_timeout=timeout, frame_timeout=timeout)
    except (transport.PeerClosed, ConnectionError):
        return "closed"
    rid, ok, payload = protocol.parse_response(frame)
    return (rid, "ok", None) if ok else (rid, *payload)


def _closed(sock: socket.socket, timeout: float = 5.0) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def _no_tracebacks(served: Served) -> None:
    err = served.stderr()
    assert "Traceback" not in err and "Exception in thread" not in err, err[-3000:]


# ----------------------------------------------------------------------------- item 3
def test_unknown_op_names_are_never_stored(served):
    """200 requests with unique 100 KB op names, with and without the token: answered
    unknown_op with the name cut short; status and /metrics stay small."""
    with socket.create_connection(served.addr) as s:
        for i in range(200):
            header = {"id": i, "op": f"{i:04d}" + "x" * 100_000}
            if i % 2:
                header["token"] = served.token
            s.sendall(encode(header))
            rid, code, msg = _answer(s)
            assert (rid, code) == (i, "unknown_op") and len(msg) < 2000, msg[:300]
    with served.client() as c:
        status = c.status()
    by_op = status["requests"]["by_op"]
    assert by_op[UNKNOWN_OP_LABEL] == {"unknown_op": 200}
    assert all(len(op) < 40 for op in by_op), [op[:40] for op in by_op]
    assert len(json.dumps(status)) < 64 * 1024
    with urllib.request.urlopen(f"http://127.0.0.1:{served.monitor_port}/metrics", timeout=10) as r:
        metrics = r.read().decode()
    assert len(metrics) < 256 * 1024 and "xxxxxxxxxx" not in metrics
    assert f'op="{UNKNOWN_OP_LABEL}"' in metrics
    _no_tracebacks(served)


# ----------------------------------------------------------------------------- item 4
def test_body_refused_from_the_header_before_it_is_sent(served):
    """A header claiming a 55 MiB body is answered before any body byte is sent."""
    cases = [
        ({"id": 7, "op": "vae_decode", "args": {}}, "unauthorized"),                      # no token
        ({"id": 8, "op": "vae_decode", "args": {}, "token": "wrong"}, "unauthorized"),
        ({"id": 9, "op": "ping", "token": served.token}, "bad_frame"),                    # auth=False op: no body
        ({"id": 10, "op": "no_such_op", "token": served.token}, "bad_frame"),
        ({"id": {"$tensor": "t"}, "op": "status"}, "unauthorized"),                      # id that cannot be echoed
    ]
    for header, want in cases:
        with socket.create_connection(served.addr) as s:
            s.sendall(encode(header, body_len=55 * MiB))
            rid, code, msg = _answer(s)
            assert code == want, (header, code, msg)
            assert rid == (header["id"] if isinstance(header["id"], int) else None)
            assert _closed(s)
    # A small unauthenticated body that fits the receive buffer is refused the same way.
    with socket.create_connection(served.addr) as s:
        s.sendall(encode({"id": 11, "op": "status"}, bytes(64)))
        assert _answer(s)[1] == "unauthorized" and _closed(s)
    with served.client() as c:
        assert c.ping()["pong"] and c.status()["state"] == "running"


def test_tokenless_bodies_do_not_grow_daemon_memory(served):
    """Six token-less connections streaming 54 of a claimed 55 MiB each, held open."""
    socks = [socket.create_connection(served.addr) for _ in range(6)]
    before = served.rss()
    chunk = bytes(MiB)

    def blast(s: socket.socket) -> None:
        s.settimeout(20)
        try:
            s.sendall(encode({"id": 1, "op": "lora_put", "args": {}}, body_len=55 * MiB))
            for _ in range(54):
                s.sendall(chunk)
        except OSError:
            pass  # the daemon refused the body and closed: expected

    threads = [threading.Thread(target=blast, args=(s,)) for s in socks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        grown = served.rss() - before
    finally:
        for s in socks:
            s.close()
    # Before the fix the daemon held every partial body: about 6 x 54 MiB.
    assert grown < 60 * MiB, f"daemon RSS grew by {grown / MiB:.0f} MiB"
    with served.client() as c:
        assert c.ping()["pong"]


# ----------------------------------------------------------------------------- item 8
def test_malformed_frames_get_bad_frame_not_a_dead_thread(served):
    tok = served.token
    body64 = bytes(64)
    cases = [
        # (header, body, expected id in the answer)
        ({"id": 1, "op": "status", "token": tok, "tensors": [{"name": "t", "dtype": ["float32"], "shape": [1], "offset": 0, "nbytes": 4}]}, body64, None),
        ({"id": 2, "op": "status", "token": tok, "tensors": [{"name": "t", "dtype": {"x": 1}, "shape": [1], "offset": 0, "nbytes": 4}]}, body64, None),
        ({"id": 3, "op": "status", "token": tok, "tensors": [{"name": "t", "dtype": "float32", "shape": [2**62, 2**62, 0], "offset": 0, "nbytes": 0}]}, body64, None),
        ({"id": 4, "op": "status", "token": tok, "tensors": [{"name": "t", "dtype": "float32", "shape": [0, 2**64 - 1], "offset": 0, "nbytes": 0}]}, body64, None),
        # Without a body, no token is needed to reach the descriptor checks.
        ({"id": 5, "op": "ping", "tensors": [{"name": "t", "dtype": "float32", "shape": [2**62, 2**62, 0], "offset": 0, "nbytes": 0}]}, b"", None),
        ({"id": 6, "op": "ping", "tensors": [{"name": "t", "dtype": ["x"], "shape": [], "offset": 0, "nbytes": 0}]}, b"", None),
        # ids that cannot be echoed: answered with id null.
        ({"id": {"$tensor": "t"}, "op": "status", "token": tok,
          "tensors": [{"name": "t", "dtype": "float32", "shape": [1], "offset": 0, "nbytes": 4}]}, body64, None),
        ({"id": {"$tuple": [1]}, "op": "ping"}, b"", None),
        ({"id": [1, 2], "op": "ping"}, b"", None),
        ({"id": "i" * 100_000, "op": "ping"}, b"", None),
        ({"id": 2**64, "op": "ping"}, b"", None),
    ]
    for header, body, want_id in cases:
        with socket.create_connection(served.addr) as s:
            s.sendall(encode(header, body))
            got = _answer(s)
            assert got != "closed", f"no answer to {str(header)[:200]}"
            rid, code, msg = got
            assert (rid, code) == (want_id, "bad_frame"), (str(header)[:200], got)
            assert len(msg) < 1000 and _closed(s)
    with served.client() as c:
        assert c.ping()["pong"]
    _no_tracebacks(served)


def test_client_calls_never_import_torch(served):
    """The CLI's control calls (issue 12): ping, hello, status, ps, unload without torch."""
    code = (f"import sys\nfrom luna_daemon.client import DaemonClient\n"
            f"with DaemonClient('127.0.0.1', {served.port}, token={served.token!r}) as c:\n"
            f"    assert c.ping()['pong'] and c.hello()['protocol'] == 1\n"
            f"    assert c.status()['state'] == 'running' and c.ps() == [] and c.unload(all=True) == []\n"
            f"assert 'torch' not in sys.modules, 'torch was imported'\nprint('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120, env=served.env)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# ----------------------------------------------------------------------------- item 7
def test_log_lines_from_hostile_peers_are_bounded(tmp_path, model_dir):
    served = Served(tmp_path / "home", model_dir)
    try:
        for i in range(300):  # garbage: bad_frame
            with socket.create_connection(served.addr) as s:
                s.sendall(b"\x80\x04\x95garbage-garbage-garbage")
                assert _answer(s)[1] == "bad_frame"
        for i in range(300):  # token-less bodies: unauthorized
            with socket.create_connection(served.addr) as s:
                s.sendall(encode({"id": i, "op": "status"}, bytes(64)))
                assert _answer(s)[1] == "unauthorized"
        for i in range(100):  # unparseable requests: bad_frame after decoding
            with socket.create_connection(served.addr) as s:
                s.sendall(encode({"id": [i], "op": "ping"}))
                assert _answer(s)[1] == "bad_frame"
        with served.client() as c:
            assert c.ping()["pong"]
        lines = [ln for ln in served.log_text().splitlines() if "luna_daemon.server" in ln]
        warnings = [ln for ln in lines if " WARNING " in ln]
        # 10 a category at once (bad_frame, unauthorized), then 6 a minute: far below 700.
        assert len(warnings) <= 40, "\n".join(warnings[-5:])
        assert len(served.log_text()) < 64 * 1024
        _no_tracebacks(served)
    finally:
        served.stop()


def test_rate_limited_log_suppresses_and_reports(tmp_path):
    now = [0.0]
    logger = logging.getLogger("luna_daemon.test_rate_limit")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    path = tmp_path / "rl.log"
    handler = logging.FileHandler(path, encoding="utf-8")
    logger.addHandler(handler)
    try:
        rl = RateLimitedLog(logger, burst=3, per_minute=6, max_keys=4, clock=lambda: now[0])
        written = [rl.warning("bad_frame", "bad frame %d", i) for i in range(50)]
        assert written == [True] * 3 + [False] * 47
        assert rl.warning("other", "another category has its own bucket")
        now[0] += 10.0  # 6 a minute: one line per 10 s
        assert rl.warning("bad_frame", "bad frame later")
        assert not rl.warning("bad_frame", "bad frame right after")
        for k in range(100):  # many keys: only max_keys are kept
            rl.info(("peer", k), "x")
        assert len(rl._buckets) <= 4
        handler.flush()
        text = path.read_text().splitlines()
        assert text[:3] == ["bad frame 0", "bad frame 1", "bad frame 2"]
        assert "47 similar messages (bad_frame) suppressed" in text and "bad frame later" in text
        assert "bad frame right after" not in text
    finally:
        logger.removeHandler(handler)
        handler.close()


# ----------------------------------------------------------------------------- fuzz
@pytest.fixture(scope="module")
def inproc(tmp_path_factory, model_dir):
    """An in-process daemon; collects exceptions that escape any thread and ERROR records."""
    from luna_daemon.daemon import Daemon

    home = tmp_path_factory.mktemp("inproc")
    settings = Settings.load(env={"LUNA_HOME": str(home)}, overrides={
        "port": 0, "monitor_port": 0, "lock_port": 0, "model_roots": [str(model_dir)], "engine": "standalone",
        "frame_timeout": 3.0})
    escaped: list[str] = []
    errors: list[str] = []
    old_hook = threading.excepthook
    threading.excepthook = lambda a: escaped.append(f"{a.thread.name}: {a.exc_type.__name__}: {a.exc_value}")

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.ERROR:
                errors.append(record.getMessage())

    collect = Collect()
    logging.getLogger("luna_daemon").addHandler(collect)
    d = Daemon(settings)
    d.start()
    try:
        yield d, escaped, errors
    finally:
        d.stop(10)
        logging.getLogger("luna_daemon").removeHandler(collect)
        threading.excepthook = old_hook
    # A thread that died after its example was checked is still caught here.
    assert not escaped and not errors, (escaped, errors)


@hsettings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(frame=hostile_frame())
def test_fuzz_real_server_answers_typed_or_closes(inproc, frame):
    d, escaped, errors = inproc
    n_escaped, n_errors = len(escaped), len(errors)
    header, body = frame
    with socket.create_connection(d.address) as s:
        s.sendall(encode(header, body, token=d.token))
        got = _answer(s, timeout=10)
        if got != "closed":
            rid, code, _ = got
            assert code == "ok" or code in CODES - {"internal"}, got
            sent_id = header.get("id")
            assert rid is None or rid == sent_id
            if code in {c.value for c in protocol.FATAL_CODES}:
                assert _closed(s)
    with DaemonClient(*d.address, token=d.token, timeout=10) as c:
        assert c.ping()["pong"]
    assert not escaped[n_escaped:], escaped[n_escaped:]
    assert not errors[n_errors:], errors[n_errors:]
