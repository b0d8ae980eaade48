"""Scenario 3: stop under load.

Client processes each put ``stop_threads`` requests (tiny VAE decodes and CLIP encodes,
with the token) in flight on their own connections, then the daemon is stopped with
``luna-daemon stop`` or SIGTERM. A request the daemon had before the stop began must end
with exactly the solo reference result (max abs diff 0) or a typed ``stopping`` answer;
one more request per connection sent after its answer may also find the connection
closed (*unavailable*). Closed without an answer before that is *lost*; no answer within
the deadline is *hung*; a different result is *wrong*.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from luna_daemon.reliability.harness import (
    STOP_GRACE, STOP_TIMEOUT, Background, DaemonProc, Suite, kill, read_line, reply, send_line, traceback_failure,
)
from luna_daemon.reliability.wire import Outcome, Wire, await_answer, call, request_bytes

CHILD = "from luna_daemon.reliability.stop import child_main; child_main()"
TEXTS = ["a photo of a cat", "a red car in the rain", "mountains at dawn", "a bowl of fruit on a table"]
OUTCOMES = ("right", "stopping", "unavailable", "wrong", "lost", "hung", "other")


def child_main() -> None:
    """One client process (``python -c CHILD``): the job as a JSON line on stdin; prints
    "ready" once loaded, waits for "go", prints "sent" when every request is out, then
    one JSON line with each connection's outcomes."""
    import torch
    from safetensors.torch import load_file

    job = json.loads(sys.stdin.readline())
    refs = load_file(job["refs"])
    port, token, n, deadline_s = job["port"], job["token"], job["threads"], job["deadline"]
    reply("ready")
    if sys.stdin.readline().strip() != "go":
        return
    results: list[dict[str, str]] = [{} for _ in range(n)]
    sent = threading.Barrier(n + 1)

    def request(i: int) -> tuple[str, str, dict]:
        k = (job["index"] * n + i) % len(TEXTS)
        if i % 2 == 0:
            return f"vae{k}", "vae_decode", {"model": job["vae"], "latent": refs[f"latent{k}"]}
        return f"clip{k}", "clip_encode", {"model": job["clip"], "text": TEXTS[k]}

    def right(ref: str, result: Any) -> bool:
        if ref.startswith("vae"):
            pairs = [(result.get("image"), refs[f"image{ref[3:]}"])]
        else:
            pairs = [(result.get("cond"), refs[f"cond{ref[4:]}"]), (result.get("pooled_output"), refs[f"pooled{ref[4:]}"])]
        return all(isinstance(got, torch.Tensor) and got.shape == want.shape and bool((got - want).abs().max() == 0)
                   for got, want in pairs)

    def classify(ref: str, o: Outcome, before_stop: bool) -> str:
        if o.kind == "ok":
            return "right" if right(ref, o.result) else "wrong"
        if o.kind == "error":
            return "stopping" if o.code == "stopping" else f"error:{o.code}"
        if o.kind == "hung":
            return "hung"
        # Closed without an answer. A request the daemon had before the stop began was
        # promised an answer; one sent later may meet a connection the stop has closed.
        return "lost" if before_stop else "unavailable"

    def worker(i: int) -> None:
        w = None
        try:
            w = Wire(port)
            # A ping round trip first: the daemon has accepted this connection before the stop.
            if call(port, "ping", None, None, 30, wire=w).kind != "ok":
                results[i]["phase1"] = "unavailable"
                w.close()
                w = None
            else:
                ref, op, args = request(i)
                results[i]["phase1"] = "lost" if not w.send(request_bytes(op, args, token)) else "pending"
        except OSError:
            results[i]["phase1"] = "unavailable"
        finally:
            try:
                sent.wait(60)
            except threading.BrokenBarrierError:
                pass
        if w is None or results[i]["phase1"] != "pending":
            return
        try:
            o = await_answer(w, deadline_s, decode=True)
            results[i]["phase1"] = classify(ref, o, True)
            if o.kind in ("ok", "error"):
                ref, op, args = request(i + 1)
                results[i]["phase2"] = classify(ref, call(port, op, args, token, deadline_s, decode=True, wire=w), False)
        finally:
            w.close()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    try:
        sent.wait(60)
    except threading.BrokenBarrierError:
        pass
    reply("sent")
    end = time.monotonic() + deadline_s * 2 + 10  # one deadline for all of them
    for t in threads:
        t.join(max(0.0, end - time.monotonic()))
    for i, t in enumerate(threads):
        if t.is_alive():
            results[i]["phase1"] = "hung"
    reply(json.dumps(results))


class StopRound:
    """One daemon, its solo references and its client processes, prepared in the
    background (``ready``) so that the round itself only goes, stops and counts.
    ``daemon``: stop that (already launched) one instead of a fresh one of its own."""

    def __init__(self, suite: Suite, how: str, index: int, daemon: DaemonProc | None = None):
        self.suite, self.how, self.index = suite, how, index
        self.daemon = daemon
        self.shared = daemon is not None
        self.children: list[subprocess.Popen] = []
        self.models: tuple[str, str] = ("", "")
        self.ready = Background(self._prepare, f"prepare-stop-{index}")

    def _prepare(self) -> None:
        import torch
        from safetensors.torch import save_file

        s, p = self.suite, self.suite.p
        if self.daemon is None:
            # Its own daemon: more connections and queue slots than 5 x 20 requests need.
            self.daemon = DaemonProc(s.work, f"home-stop-{self.index}", [str(s.models.root)], monitor=False, settings={
                "LUNA_STOP_TIMEOUT": str(STOP_TIMEOUT), "LUNA_QUEUE_SIZE": "512", "LUNA_MAX_CONNECTIONS": "512"})
            self.daemon.launch()
        d = self.daemon
        d.wait_ready()
        side = 32 if p.stop_procs * p.stop_threads <= 20 else 16  # a few seconds of queued VAE work either way
        refs: dict[str, torch.Tensor] = {}
        with d.client(timeout=120) as c:
            vae, clip = self.models = self._load(c)
            # The solo reference: the same requests one at a time, before any load.
            for k, text in enumerate(TEXTS):
                refs[f"latent{k}"] = latent = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(100 + k))
                refs[f"image{k}"] = c.vae_decode(vae, latent).contiguous()
                enc = c.clip_encode(clip, text=text)
                refs[f"cond{k}"], refs[f"pooled{k}"] = enc["cond"].contiguous(), enc["pooled_output"].contiguous()
        refs_path = d.home / "refs.safetensors"
        save_file(refs, str(refs_path))
        job = {"port": d.port, "token": d.token, "threads": p.stop_threads, "refs": str(refs_path), "vae": vae,
               "clip": clip, "deadline": STOP_TIMEOUT + 20}
        for i in range(p.stop_procs):
            ch = s.work.python(CHILD, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, stderr=d.home / f"client-{i}.err")
            self.children.append(ch)
            send_line(ch, json.dumps({**job, "index": i}))
        if not all(read_line(ch, 120) == "ready" for ch in self.children):
            raise RuntimeError("a stop-under-load client process did not start")

    def _load(self, c: Any) -> tuple[str, str]:
        return c.vae_load(str(self.suite.models.vae))["model"], c.clip_load([str(self.suite.models.clip)], "sd1")["model"]

    def run(self) -> dict[str, Any]:
        p = self.suite.p
        out: dict[str, Any] = {"how": self.how, "clients": f"{p.stop_procs} processes x {p.stop_threads} requests in flight",
                               "stop_timeout_s": STOP_TIMEOUT}
        fails: list[str] = []
        tally = dict.fromkeys(OUTCOMES, 0)
        try:
            self.ready.result(300)
            d = self.daemon
            if self.shared:
                # Still loaded after the other scenarios (a restart after a crash would have lost them)?
                with d.client(timeout=60) as c:
                    if self._load(c) != self.models:
                        raise RuntimeError("the model ids changed since the references were taken")
            tb = d.stderr_offset()
            for ch in self.children:
                send_line(ch, "go")
            if not all(read_line(ch, 90) == "sent" for ch in self.children):
                raise RuntimeError("a stop-under-load client did not send its requests")
            st = call(d.port, "status", None, d.token, 10)
            if st.kind == "ok":
                out["in_flight_at_stop"] = max(0, st.result.get("in_flight", 0) - 1)  # minus this status call
            out.update(self._stop(d, fails))
            end = time.monotonic() + STOP_TIMEOUT + 60  # one deadline for all the clients' reports
            for ch in self.children:
                try:
                    text = ch.communicate(timeout=max(1.0, end - time.monotonic()))[0]
                    rows = json.loads(text.strip().splitlines()[-1])
                except (subprocess.TimeoutExpired, ValueError, IndexError):
                    rows = [{"phase1": "hung"}] * p.stop_threads
                for row in rows:
                    for phase, res in row.items():
                        key = res if res in OUTCOMES else "other"
                        tally[key] += 1
                        out.setdefault(f"{phase}_outcomes", {}).setdefault(res, 0)
                        out[f"{phase}_outcomes"][res] += 1
            out.update(d.tracebacks_since(tb))
        finally:
            for ch in self.children:
                kill(ch)
            if self.daemon is not None and self.daemon.alive:
                kill(self.daemon.proc)
        out.update(tally)
        for k in ("wrong", "lost", "hung", "other"):
            if out[k]:
                fails.append(f"{out[k]} requests {'ended with another error' if k == 'other' else k} during the stop")
        fails += traceback_failure(out)
        out["failures"] = fails
        return out

    def _stop(self, d: DaemonProc, fails: list[str]) -> dict[str, Any]:
        """Stop ``d`` the chosen way; how long it took to exit after the stop was asked."""
        out: dict[str, Any] = {}
        t_issue = time.monotonic()
        if self.how == "sigterm":
            d.proc.send_signal(signal.SIGTERM)
            t_asked = t_issue
        else:
            cli = self.suite.work.spawn([sys.executable, "-m", "luna_daemon", "stop", "--port", str(d.port)], env=d.env,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            try:
                text = cli.communicate(timeout=60)[0]
            except subprocess.TimeoutExpired:
                text = "(no answer within 60 s)"
            kill(cli)
            t_asked = time.monotonic()  # the CLI returned: the daemon has the shutdown request
            out.update(cli_exit_code=cli.returncode, cli_output=text.strip()[-300:], cli_seconds=round(t_asked - t_issue, 2))
            if cli.returncode != 0:
                fails.append(f"luna-daemon stop exited with code {cli.returncode}: {text.strip()[-200:]}")
        try:
            d.proc.wait(STOP_TIMEOUT + 30)
            out["stop_seconds"] = round(time.monotonic() - t_asked, 2)
            out["exit_code"] = d.proc.returncode
            if out["stop_seconds"] > STOP_TIMEOUT + STOP_GRACE:
                fails.append(f"the stop took {out['stop_seconds']}s (bound: stop_timeout {STOP_TIMEOUT:.0f}s + {STOP_GRACE:.0f}s)")
            if d.proc.returncode != 0:
                fails.append(f"serve exited with code {d.proc.returncode} (0 expected: the work fits in stop_timeout)")
        except subprocess.TimeoutExpired:
            out["stop_seconds"] = None
            fails.append(f"the daemon did not exit within {STOP_TIMEOUT + 30:.0f}s of the stop")
        return out


def prepare_stop(suite: Suite) -> list[StopRound]:
    """Start preparing every round now (daemons, references, client processes)."""
    shared = suite.main if suite.p.stop_on_main else None
    return [StopRound(suite, how, i, shared if i == 0 else None) for i, how in enumerate(suite.p.stop_rounds)]


def scenario_stop(suite: Suite) -> dict[str, Any]:
    prepared = suite.prepared.get("stop") or prepare_stop(suite)
    rounds = []
    for r in prepared:
        try:
            rounds.append(r.run())
        except Exception as exc:  # noqa: BLE001 - reported; the next round still runs
            rounds.append({"how": r.how, "failures": [f"could not run: {type(exc).__name__}: {exc}"]})
    out: dict[str, Any] = {"rounds": rounds}
    for k in OUTCOMES:
        out[k] = sum(r.get(k, 0) for r in rounds)
    out["failures"] = [f"[{r['how']}] {f}" for r in rounds for f in r["failures"]]
    return out
