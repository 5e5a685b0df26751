"""Interleaved A/B speed of two checkpoints on one GPU, with vLLM's own tools (issue 22: rotation on vs off).

    python benchmarks/ab_serve.py --a NAME=DIR --b NAME=DIR --repeats 3 --rows rows.jsonl [-- ENGINE ARGS]

Both checkpoints are served at once (`vllm serve`, each with ``--gpu-memory-utilization 0.42``: same KV-cache
budget), so the repeats alternate A, B, A, B, ... on the same warm engines instead of paying an engine start per
run, and slow drift of the machine lands on both. Per repeat and checkpoint, `vllm bench serve` (random tokens,
``--ignore-eos``) runs three workloads:

- throughput: 1000 prompts, 1024 in / 128 out, all at once (request rate inf): total tokens/s;
- latency batch 1: 16 prompts one at a time (max concurrency 1), 128 in / 128 out: mean end-to-end latency;
- latency batch 64: 256 prompts, at most 64 in flight, 128 in / 128 out: mean end-to-end latency.

One JSON row per run is appended to ``--rows``; ``--summary`` prints B/A as mean and range over the repeats.
Device calls are short (the GPU machine's limit is 10 min a command): ``--keep-servers`` leaves both servers
running (their process groups in ``WORK/servers.json``), and a later call with ``--first-repeat N`` attaches to
them instead of starting new ones; the last call stops them (without ``--keep-servers``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_bench import _tool, wait_healthy  # noqa: E402

WORKLOADS = {  # name -> (input len, output len, prompts, max concurrency or None)
    "throughput": (1024, 128, 1000, None),
    "latency-b1": (128, 128, 16, 1),
    "latency-b64": (128, 128, 256, 64),
}


def _serve(name: str, model: str, port: int, work: Path, extra: list[str]) -> subprocess.Popen:
    log = open(work / f"{name}-serve.log", "w")
    cmd = ["vllm", "serve", model, "--port", str(port), "--gpu-memory-utilization", "0.42", *extra]
    print("$ " + " ".join(cmd), flush=True)
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _wait(servers: dict[str, tuple[subprocess.Popen, int]], work: Path) -> None:
    for name, (proc, port) in servers.items():
        wait_healthy(proc, port, str(work / f"{name}-serve.log"), timeout=420)


def _bench(name: str, model: str, port: int, workload: str, rep: int, work: Path) -> dict:
    i, o, n, conc = WORKLOADS[workload]
    out = f"{name}-{workload}-r{rep}.json"
    cmd = ["vllm", "bench", "serve", "--backend", "vllm", "--model", model, "--port", str(port),
           "--dataset-name", "random", "--random-input-len", str(i), "--random-output-len", str(o),
           "--num-prompts", str(n), "--request-rate", "inf", "--ignore-eos", "--percentile-metrics",
           "ttft,tpot,itl,e2el", "--save-result", "--result-dir",
           str(work), "--result-filename", out, *(["--max-concurrency", str(conc)] if conc else [])]
    _tool(cmd, work / f"{out}.log")
    r = json.loads((work / out).read_text())
    return {"variant": name, "workload": workload, "repeat": rep, "total_tok_s": r["total_token_throughput"],
            "output_tok_s": r["output_throughput"], "mean_e2el_ms": r["mean_e2el_ms"],
            "mean_tpot_ms": r["mean_tpot_ms"], "mean_ttft_ms": r["mean_ttft_ms"], "command": " ".join(cmd)}


def summary(rows: list[dict], a: str, b: str) -> list[dict]:
    """Per workload: B/A per repeat (throughput: tokens/s; latency: end-to-end ms), mean and range."""
    out = []
    for w in WORKLOADS:
        key = "total_tok_s" if w == "throughput" else "mean_e2el_ms"
        by = {(r["variant"], r["repeat"]): r[key] for r in rows if r["workload"] == w}
        reps = sorted({rep for (v, rep) in by if (a, rep) in by and (b, rep) in by})
        if not reps:
            continue
        ratios = [by[(b, rep)] / by[(a, rep)] for rep in reps]
        out.append({"workload": w, "metric": key, "repeats": len(reps),
                    a: [by[(a, rep)] for rep in reps], b: [by[(b, rep)] for rep in reps],
                    "ratio_b_over_a_mean": round(statistics.fmean(ratios), 4),
                    "ratio_min": round(min(ratios), 4), "ratio_max": round(max(ratios), 4)})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", help="NAME=DIR (the baseline)")
    p.add_argument("--b", help="NAME=DIR")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rows", type=Path, required=True)
    p.add_argument("--work", type=Path, default=Path("/tmp/ab-work"))
    p.add_argument("--summary", action="store_true", help="only print B/A from --rows")
    p.add_argument("--plot", type=Path, help="with --summary: also draw B/A per workload (mean, range) as a PNG")
    p.add_argument("--first-repeat", type=int, default=0, help="number of the first repeat (a later call)")
    p.add_argument("--keep-servers", action="store_true", help="leave both servers running for a later call")
    p.add_argument("extra", nargs="*", help="engine args for both servers, after --")
    a = p.parse_args(argv)
    (na, da), (nb, db) = (x.split("=", 1) for x in (a.a, a.b))
    if a.summary:
        rows = [json.loads(ln) for ln in a.rows.read_text().splitlines() if ln.strip()]
        print(json.dumps(summary(rows, na, nb), indent=1))
        if a.plot:
            plot(rows, na, nb, a.plot)
        return 0
    from vllm_smoothquant.offline.harness import provenance

    a.work.mkdir(parents=True, exist_ok=True)
    env = provenance()
    pids = a.work / "servers.json"
    if pids.exists():  # a previous call's servers, still answering
        servers = {n: (_Attached(pid), port) for n, (pid, port) in json.loads(pids.read_text()).items()}
        _wait(servers, a.work)
    else:
        servers = {na: (_serve(na, da, 8301, a.work, a.extra), 8301)}
        _wait(servers, a.work)  # one at a time: two engines profiling memory at once would see each other
        servers[nb] = (_serve(nb, db, 8302, a.work, a.extra), 8302)
        _wait(servers, a.work)
        pids.write_text(json.dumps({n: (proc.pid, port) for n, (proc, port) in servers.items()}))
    try:
        for rep in range(a.first_repeat, a.first_repeat + a.repeats):
            for name, model in ((na, da), (nb, db)) if rep % 2 == 0 else ((nb, db), (na, da)):
                for w in WORKLOADS:
                    row = {**env, "tool": "vllm bench serve", **_bench(name, model, servers[name][1], w, rep, a.work)}
                    with open(a.rows, "a") as f:
                        f.write(json.dumps(row) + "\n")
                    print("  " + json.dumps({k: row[k] for k in ("variant", "workload", "repeat", "total_tok_s",
                                                                    "mean_e2el_ms")}), flush=True)
    finally:
        if not a.keep_servers:
            for proc, _ in servers.values():
                os.killpg(proc.pid, signal.SIGTERM)
            for proc, _ in servers.values():
                proc.wait(timeout=60)
            pids.unlink(missing_ok=True)
    return 0


def plot(rows: list[dict], a: str, b: str, png: Path) -> None:
    """B/A per workload: the mean over the repeats as a bar, each repeat as a dot; 1.0 and ±3 % marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summary(rows, a, b)
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for i, w in enumerate(s):
        ratios = [y / x for x, y in zip(w[a], w[b])]
        if w["metric"] == "mean_e2el_ms":  # latency: lower is better; plot speed (A/B) so that > 1 is faster
            ratios = [1 / r for r in ratios]
        ax.bar(i, statistics.fmean(ratios), color="tab:blue", alpha=0.6)
        ax.plot([i] * len(ratios), ratios, "ko", ms=4)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(0.97, color="tab:red", lw=0.8, ls="--", label="-3 %")
    ax.set_xticks(range(len(s)), [f"{w['workload']}\n({w['repeats']} repeats)" for w in s])
    ax.set_ylim(0.85, 1.05)
    ax.set_ylabel(f"speed of {b} relative to {a}")
    r0 = rows[0]
    ax.set_title(f"{b} vs {a}: {r0.get('device')}, vLLM {r0.get('vllm')}, {r0.get('date')} (vllm bench serve)",
                 fontsize=8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(png)


class _Attached:
    """A server started by an earlier call (its own process group): poll() and wait() as for a Popen."""

    def __init__(self, pid: int):
        self.pid = pid

    def poll(self):
        try:
            os.kill(self.pid, 0)
            return None
        except ProcessLookupError:
            return 1

    def wait(self, timeout: float):
        import time

        deadline = time.time() + timeout
        while self.poll() is None and time.time() < deadline:
            time.sleep(1)


if __name__ == "__main__":
    sys.exit(main())
