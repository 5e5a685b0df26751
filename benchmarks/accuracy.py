"""Perplexity through vLLM of SmoothQuant variants of one model: the tables in docs/ACCURACY.md.

    python benchmarks/accuracy.py --out docs/accuracy-<device>-<date>.json [--device cuda] [--only ROW ...]
        [--heldout NAME|FILE.txt ...] [--workdir DIR]

Builds every variant with ``vllm-smoothquant quantize`` (calibration text C) — and the peer rows with
llm-compressor (``llmc-*``: its SmoothQuant + GPTQ / round-to-nearest W8A8 recipe on the very same calibration
token windows, saved as compressed-tensors) — then evaluates each checkpoint through vLLM (the real int8
kernels: CUTLASS on CUDA, oneDNN on CPU) on every held-out text, one engine per checkpoint, with the code of
``vllm-smoothquant eval`` (same windows, same engine settings; each row records the equivalent ``eval``
command). Writes JSON rows (device, versions, date, exact commands, perplexity per held-out text, the change over
the unquantized model, the share of naive W8A8's gap that SmoothQuant closes, the cost of an fp8 KV cache over
the same weights with a 16-bit one) and a per-variant summary over the texts (mean, worst), plus a PNG chart.
Perplexity is deterministic for a given checkpoint and engine: one repeat.

Defaults: SmolLM2-135M-Instruct, convention speeches, every held-out text of ``offline/assets.py``
(movie reviews, Hamlet, news headlines). Checkpoints in ``--workdir`` are reused when they were built by the
same command (``NAME.build.json`` beside them), so an interrupted table resumes where it stopped.

llm-compressor runs in its own virtual environment (``--llmc-venv``, default ``<cache>/llmc-venv``), created on
first use with ``llmcompressor==0.14.0`` and this environment's torch build pinned (so pip does not pull another,
e.g. a CUDA one on a CPU host); ``benchmarks/llmc_quantize.py`` runs there as a subprocess. It is a benchmark
dependency only.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLI = str(Path(sys.executable).with_name("vllm-smoothquant"))  # this environment's console script
if not Path(CLI).is_file():  # e.g. pip put the scripts elsewhere (a system python's /usr/local/bin)
    import shutil

    CLI = shutil.which("vllm-smoothquant") or CLI
LLMC_VERSION = "0.14.0"
ALL = "qkv,gate_up,o,down"
# name -> (activation scheme, quantize flags); None: the unquantized model
VARIANTS: dict[str, tuple[str, list[str] | None]] = {
    "unquantized": ("-", None),
    "naive-token": ("token", ["--no-smooth"]),
    "sq-0.8-norm-pairs-token": ("token", ["--alpha", "0.8", "--smooth-groups", "qkv,gate_up"]),
    "sq-0.8-all-pairs-token": ("token", ["--alpha", "0.8", "--smooth-groups", ALL]),
    "sq-auto-all-pairs-token": ("token", ["--alpha", "auto", "--smooth-groups", ALL]),
    # GPTQ-rounded int8 weights (issue 14 item 1): run only where `quantize --help` offers --weight-rounding
    "sq-0.8-norm-pairs-token-gptq": ("token", ["--alpha", "0.8", "--smooth-groups", "qkv,gate_up",
                                               "--weight-rounding", "gptq"]),
    "sq-0.8-all-pairs-token-gptq": ("token", ["--alpha", "0.8", "--smooth-groups", ALL, "--weight-rounding", "gptq"]),
    "sq-auto-all-pairs-token-gptq": ("token", ["--alpha", "auto", "--smooth-groups", ALL, "--weight-rounding", "gptq"]),
    # the peer (issue 14 item 4): llm-compressor's SmoothQuantModifier(0.8) + GPTQ / round-to-nearest, W8A8
    "llmc-sq-0.8-gptq-token": ("token", None),
    "llmc-sq-0.8-rtn-token": ("token", None),
    "naive-static": ("static", ["--no-smooth", "--activations", "static"]),
    "sq-0.8-norm-pairs-static": ("static", ["--alpha", "0.8", "--smooth-groups", "qkv,gate_up", "--activations", "static"]),
    "sq-0.8-all-pairs-static": ("static", ["--alpha", "0.8", "--smooth-groups", ALL, "--activations", "static"]),
    "sq-auto-all-pairs-static": ("static", ["--alpha", "auto", "--smooth-groups", ALL, "--activations", "static"]),
    "sq-0.8-all-pairs-static-gptq": ("static", ["--alpha", "0.8", "--smooth-groups", ALL, "--activations", "static",
                                                "--weight-rounding", "gptq"]),
    "sq-0.8-all-pairs-static-down-token": ("static", ["--alpha", "0.8", "--smooth-groups", ALL, "--activations", "static",
                                                      "--activation-override", "down_proj=token"]),
    # 8-bit KV cache (issue 10): "-kv8" rows run an fp8 e4m3 KV cache, the others a 16-bit one
    "unquantized-kv8-scale1": ("-", None),
    "sq-0.8-all-pairs-token-kv8-scale1": ("token", ["--alpha", "0.8", "--smooth-groups", ALL]),
    "sq-0.8-all-pairs-token-kv8": ("token", ["--alpha", "0.8", "--smooth-groups", ALL, "--kv-cache", "fp8"]),
    "sq-0.8-all-pairs-token-kv8-head": ("token", ["--alpha", "0.8", "--smooth-groups", ALL, "--kv-cache", "fp8",
                                                  "--kv-cache-scales", "head"]),
    "sq-auto-all-pairs-token-kv8": ("token", ["--alpha", "auto", "--smooth-groups", ALL, "--kv-cache", "fp8"]),
    # issue 22: the down_proj input rotation (rows above run with --rotate none where the CLI has --rotate)
    "defaults-token": ("token", []),  # no flags: alpha auto, all pairs, --rotate down_proj (block 256)
    "sq-auto-no-down-token-rot": ("token", ["--alpha", "auto", "--smooth-groups", "qkv,gate_up,o", "--rotate",
                                            "down_proj"]),
    "sq-auto-all-pairs-token-rot-gptq": ("token", ["--alpha", "auto", "--smooth-groups", ALL, "--rotate",
                                                   "down_proj", "--weight-rounding", "gptq"]),
    "sq-auto-all-pairs-token-rot-b64": ("token", ["--alpha", "auto", "--smooth-groups", ALL, "--rotate", "down_proj",
                                                  "--rotate-block", "64"]),
    "defaults-static": ("static", ["--activations", "static"]),  # alpha 0.8, all pairs, rotated down_proj
    "sq-auto-all-pairs-static-rot": ("static", ["--alpha", "auto", "--smooth-groups", ALL, "--activations", "static",
                                                "--rotate", "down_proj"]),
    # vLLM's own FP8 W8A8 of the unquantized model (per-tensor e4m3 weights, per-token e4m3 activations)
    "fp8-online": ("fp8", None),
}
# llm-compressor rows -> weight rounding of its recipe (benchmarks/llmc_quantize.py --rounding)
LLMC = {"llmc-sq-0.8-gptq-token": "gptq", "llmc-sq-0.8-rtn-token": "rtn"}
# eval flags of a row beyond the common ones: "-scale1" rows ask vLLM for an fp8 KV cache without calibrated scales
# (vLLM uses 1.0); rows whose checkpoint has --kv-cache fp8 get the fp8 cache by themselves (no flag).
EVAL_FLAGS = {name: ["--kv-cache-dtype", "fp8"] for name in VARIANTS if name.endswith("-kv8-scale1")}
EVAL_FLAGS["fp8-online"] = ["--quantization", "fp8"]


def _needs_rounding_flag(flags: list[str] | None) -> bool:
    return flags is not None and "--weight-rounding" in flags


def _run(cmd: list[str], env: dict | None = None) -> str:
    print("+", shlex.join(cmd), flush=True)
    return subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, env=env).stdout


def _quantize_help() -> str:
    return subprocess.run([CLI, "quantize", "--help"], stdout=subprocess.PIPE, text=True).stdout


# ---------------------------------------------------------------- evaluation (one engine, every held-out text)
def _eval_mode(argv: list[str]) -> int:
    """``accuracy.py --eval-model CKPT --text A.txt --text B.txt ...``: what ``vllm-smoothquant eval`` computes,
    for several texts in one engine (the engine start costs more than a text on a small CPU). One JSON line per
    text."""
    p = argparse.ArgumentParser()
    p.add_argument("--eval-model", required=True)
    p.add_argument("--text", action="append", required=True)
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--kv-cache-dtype", default=None)
    p.add_argument("--quantization", default=None)
    a = p.parse_args(argv)
    from transformers import AutoTokenizer

    from vllm_smoothquant.offline.calibration import token_windows
    from vllm_smoothquant.offline.harness import make_llm, quiet_vllm

    tok = AutoTokenizer.from_pretrained(a.eval_model)
    windows = {t: token_windows(t, tok, a.windows, a.seq_len, what="evaluation text") for t in a.text}
    log = quiet_vllm("accuracy-eval")  # before vLLM is imported; a log of its own
    print(f"vLLM's log: {log}", file=sys.stderr)
    from vllm_smoothquant.offline.evaluate import perplexity

    extra = {"kv_cache_dtype": a.kv_cache_dtype} if a.kv_cache_dtype else {}
    # as `vllm-smoothquant eval --enforce-eager` builds it
    llm = make_llm(a.eval_model, a.quantization, log=log, max_model_len=max(2048, a.seq_len + 1), enforce_eager=True, **extra)
    config = llm.llm_engine.vllm_config
    for text, w in windows.items():
        t0 = time.perf_counter()
        r = perplexity(llm, w, progress=False)
        print(json.dumps({"model": a.eval_model, "quantization": config.model_config.quantization,
                          "kv_cache_dtype_arg": str(config.cache_config.cache_dtype), "text": text,
                          "windows": len(w), "seq_len": a.seq_len, "eval_s": round(time.perf_counter() - t0, 1),
                          **vars(r)}), flush=True)
    return 0


def _eval(target: str, texts: list[str], windows: int, seq_len: int, flags: list[str]) -> tuple[list[dict], str, float]:
    """{text: result} of one engine over every text, the command, and its wall time. vLLM's engine sometimes
    aborts while shutting down after the results are printed: accept that when every text has its line."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--eval-model", target,
           *[x for t in texts for x in ("--text", t)], "--windows", str(windows), "--seq-len", str(seq_len), *flags]
    print("+", shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    results = [json.loads(ln) for ln in p.stdout.splitlines() if ln.startswith("{")]
    if len(results) != len(texts):
        raise RuntimeError(f"eval exited with {p.returncode} and printed {len(results)} of {len(texts)} results: "
                           f"{shlex.join(cmd)}")
    if p.returncode:
        print(f"(eval exited with {p.returncode} after printing its results)", flush=True)
    return results, shlex.join(["python", "benchmarks/accuracy.py", *cmd[2:]]), time.perf_counter() - t0


# ---------------------------------------------------------------- building checkpoints
def _stamped(target: Path, command: list[str]) -> dict | None:
    """The build record of ``target`` when it exists and was built by ``command`` (then it is reused)."""
    stamp = target.with_name(target.name + ".build.json")
    if target.is_dir() and stamp.is_file():
        rec = json.loads(stamp.read_text())
        if rec.get("command") == command:
            return rec
    return None


def _stamp(target: Path, rec: dict) -> None:
    target.with_name(target.name + ".build.json").write_text(json.dumps(rec, indent=1))


def _building(target: Path):
    """A marker ``NAME.building`` (holding the builder's pid) while ``target`` is built: a second
    ``accuracy.py`` (e.g. ``--build-only`` building ahead of an evaluating one) waits for it, then reuses it."""
    marker = target.with_name(target.name + ".building")
    while marker.is_file():
        try:
            os.kill(int(marker.read_text().strip() or 0), 0)
        except (OSError, ValueError):  # the builder is gone: the build did not finish
            marker.unlink(missing_ok=True)
            break
        time.sleep(10)
    return marker


def _checkpoint_name(flags: list[str]) -> str:
    """Rows with the same quantize flags share one checkpoint, named after the first of them."""
    return next(n for n, (_, f) in VARIANTS.items() if f == flags and n not in LLMC)


def _build_ours(name: str, flags: list[str], model: str, calib: str, a, work: Path) -> tuple[str, dict]:
    target = work / name
    qcmd = [CLI, "quantize", model, str(target), "--calib", calib, "--num-samples", str(a.num_samples),
            "--seq-len", str(a.seq_len), "--device", a.device, "--overwrite", *flags]
    marker = _building(target)
    if (rec := _stamped(target, qcmd)) is None:
        marker.write_text(str(os.getpid()))
        try:
            t0 = time.perf_counter()
            tail = _run(qcmd).strip().splitlines()[-1]
            rec = {"command": qcmd, "quantize_output_tail": tail, "build_s": round(time.perf_counter() - t0, 1)}
            _stamp(target, rec)
        finally:
            marker.unlink(missing_ok=True)
    else:
        print(f"reusing {target} (built by the same command)", flush=True)
    return str(target), {"quantize_output_tail": rec["quantize_output_tail"], "build_s": rec["build_s"],
                         "quantize_command": shlex.join(["vllm-smoothquant", *qcmd[1:]])}


def _llmc_python(venv: Path) -> Path:
    """The python of llm-compressor's venv, created on first use (``venv.partial`` until it is complete)."""
    py = venv / "bin" / "python"
    check = [str(py), "-c", f"import llmcompressor; assert llmcompressor.__version__ == {LLMC_VERSION!r}"]
    if py.is_file() and subprocess.run(check, capture_output=True).returncode == 0:
        return py
    import torch

    partial = venv.with_name(venv.name + ".partial")
    print(f"creating llm-compressor's venv {venv} (llmcompressor=={LLMC_VERSION}, torch=={torch.__version__} "
          "as here)", flush=True)
    subprocess.run(["rm", "-rf", str(partial)], check=True)
    base = getattr(sys, "_base_executable", None) or sys.executable
    _run([base, "-m", "venv", str(partial)])
    constraints = partial / "constraints.txt"
    # keep this environment's torch build (pip would otherwise pull the newest, a CUDA build of several GB)
    constraints.write_text(f"torch=={torch.__version__}\n")
    _run([str(partial / "bin" / "python"), "-m", "pip", "install", "-q", "-c", str(constraints),
          f"torch=={torch.__version__}", f"llmcompressor=={LLMC_VERSION}"])
    subprocess.run(["rm", "-rf", str(venv)], check=True)
    partial.rename(venv)  # only `bin/python -m ...` is used: the venv works under its new name
    return py


def _build_llmc(name: str, model: str, calib: str, a, work: Path) -> tuple[str, dict]:
    """llm-compressor's recipe on the same calibration windows as ``vllm-smoothquant quantize`` takes."""
    from transformers import AutoTokenizer

    from vllm_smoothquant.offline.calibration import token_windows

    windows = token_windows(calib, AutoTokenizer.from_pretrained(model), a.num_samples, a.seq_len)
    wfile = work / f"calib-windows-{len(windows)}x{a.seq_len}.json"
    if not wfile.is_file() or wfile.read_text() != json.dumps(windows):
        wfile.with_suffix(".partial").write_text(json.dumps(windows))
        wfile.with_suffix(".partial").replace(wfile)
    py = _llmc_python(Path(a.llmc_venv))
    target = work / name
    cmd = [str(py), str(HERE / "llmc_quantize.py"), model, str(target), "--windows", str(wfile),
           "--rounding", LLMC[name], "--alpha", "0.8"]
    marker = _building(target)
    if (rec := _stamped(target, cmd)) is None:
        marker.write_text(str(os.getpid()))
        try:
            subprocess.run(["rm", "-rf", str(target)], check=True)
            t0 = time.perf_counter()
            env = os.environ | {"TOKENIZERS_PARALLELISM": "false"}
            out = _run(cmd, env=env)
            info = json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])
            rec = {"command": cmd, "llmc": info, "build_s": round(time.perf_counter() - t0, 1)}
            _stamp(target, rec)
        finally:
            marker.unlink(missing_ok=True)
    else:
        print(f"reusing {target} (built by the same command)", flush=True)
    info = rec["llmc"]
    return str(target), {
        "llmc_command": shlex.join(["LLMC_PYTHON", "benchmarks/llmc_quantize.py", *cmd[2:]]),
        "llmc_recipe": info["recipe"], "llmcompressor": info["llmcompressor"],
        "llmc_versions": {k: info[k] for k in ("torch", "transformers", "compressed_tensors")},
        "calibration_windows": f"{info['windows']} x {info['seq_len']} tokens (offline/calibration.py token_windows)",
        "build_s": rec["build_s"], "oneshot_s": info["oneshot_s"]}


# ---------------------------------------------------------------- main
def _heldout(names: list[str] | None) -> dict[str, str]:
    from vllm_smoothquant.offline import assets

    if not names:
        return {k: str(v) for k, v in assets.heldout_texts().items()}
    out = {}
    for n in names:
        out[n if n in assets.HELDOUT_TEXTS else Path(n).stem] = \
            str(assets.heldout_texts([n])[n]) if n in assets.HELDOUT_TEXTS else str(Path(n).resolve())
    return out


def main() -> int:
    if "--eval-model" in sys.argv:
        return _eval_mode(sys.argv[1:])
    import torch

    from vllm_smoothquant.offline import assets
    from vllm_smoothquant.offline.harness import device_name

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="HF model dir (default: SmolLM2-135M-Instruct bf16)")
    p.add_argument("--calib", default=None)
    p.add_argument("--heldout", action="append", default=None, metavar="NAME|FILE",
                   help=f"held-out text: one of {list(assets.HELDOUT_TEXTS)} or a .txt file (repeatable; "
                        "default: all of them)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="quantize on cpu|cuda")
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--only", nargs="*", choices=list(VARIANTS), help="a subset of the rows (in this order)")
    p.add_argument("--workdir", default=None, help="where checkpoints go (default: a temp dir); reused when "
                                                  "built by the same command")
    p.add_argument("--llmc-venv", default=str(assets.cache_dir() / "llmc-venv"),
                   help="llm-compressor's virtual environment (created on first use)")
    p.add_argument("--out", required=True, help="JSON file to write (a PNG is written beside it)")
    p.add_argument("--plot-only", action="store_true", help="only draw the PNG of an existing --out JSON")
    p.add_argument("--markdown", action="store_true", help="only print the tables of an existing --out JSON")
    p.add_argument("--build-only", action="store_true",
                   help="only build (and stamp) the rows' checkpoints in --workdir, e.g. ahead of an evaluating run")
    a = p.parse_args()
    out = Path(a.out)
    if a.plot_only or a.markdown:  # derived fields recomputed from the measured ones (and written back)
        result = json.loads(out.read_text())
        result["summary"] = _derive(result["rows"], list(result["heldout"]))
        out.write_text(json.dumps(result, indent=2))
        if a.plot_only:
            _plot(result, out.with_suffix(".png"))
        else:
            print(_markdown(result))
        return 0
    model = a.model or str(assets.smollm2_dir())
    calib = a.calib or str(assets.calibration_text())
    held = _heldout(a.heldout)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="sq-accuracy-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    help_text = _quantize_help()
    has_rounding, has_rotate = "--weight-rounding" in help_text, "--rotate" in help_text

    # Resumable: rows already in --out (same device) are kept, so a long table can be built in several calls.
    previous = json.loads(out.read_text()) if out.is_file() else {}
    measured = {(name, text) for name in (a.only or VARIANTS) for text in held}
    rows = [r for r in previous.get("rows", []) if "heldout" in r and (r["variant"], r["heldout"]) not in measured] \
        if previous.get("device") == device_name() else []
    skipped = dict(previous.get("skipped", {})) if rows else {}
    meta = {"model": Path(model).name, "calib": calib, "heldout": held, "llmc": previous.get("llmcompressor")}
    built: dict[tuple[str, ...], tuple[str, dict]] = {}  # quantize flags -> (checkpoint, its row fields): built once
    for name in a.only or VARIANTS:
        scheme, flags = VARIANTS[name]
        if _needs_rounding_flag(flags) and not has_rounding:
            skipped[name] = "`vllm-smoothquant quantize` has no --weight-rounding yet"
            print(f"{name}: skipped ({skipped[name]})", flush=True)
            continue
        skipped.pop(name, None)
        if flags is not None and has_rounding and "--weight-rounding" not in flags:
            flags = [*flags, "--weight-rounding", "nearest"]  # rows without "-gptq" stay round-to-nearest
        if flags is not None and has_rotate and "--rotate" not in flags and not name.startswith("defaults-"):
            flags = [*flags, "--rotate", "none"]  # rows from before the rotation keep their meaning
        fields: dict = {}
        target = model
        if name in LLMC:
            target, fields = _build_llmc(name, model, calib, a, work)
            meta["llmc"] = fields["llmcompressor"]
        elif flags is not None and tuple(flags) in built:
            target, fields = built[tuple(flags)]
        elif flags is not None:
            target, fields = _build_ours(_checkpoint_name(VARIANTS[name][1]), flags, model, calib, a, work)
            built[tuple(flags)] = (target, fields)
        if a.build_only:
            continue
        extra = EVAL_FLAGS.get(name, [])
        results, ecmd, seconds = _eval(target, list(held.values()), a.windows, a.seq_len, extra)
        for text, r in zip(held, results):
            equivalent = ["vllm-smoothquant", "eval", target, "--text", r["text"], "--windows", str(a.windows),
                          "--seq-len", str(a.seq_len), "--enforce-eager", "--json", *extra]
            rows.append({"variant": name, "heldout": text, "activations": scheme, "model": Path(model).name,
                         "kv_cache": "fp8" if "kv8" in name else "16-bit", **fields,
                         "eval_command": ecmd, "eval_equivalent": shlex.join(equivalent),
                         "eval_wall_s": round(seconds, 1), "eval_s": r["eval_s"],
                         "quantization": r["quantization"], "kv_cache_dtype_arg": r["kv_cache_dtype_arg"],
                         "perplexity": r["ppl"], "nll": r["nll"], "tokens": r["tokens"]})
            print(f"{name} on {text}: {r['ppl']:.3f}", flush=True)
        _write(out, rows, skipped, a, meta)
    if a.build_only:
        return 0
    result = _write(out, rows, skipped, a, meta)
    try:
        _plot(result, out.with_suffix(".png"))
    except ImportError:
        print(f"matplotlib is missing here: draw the plot elsewhere with `{Path(__file__).name} --out {out} --plot-only`")
    print(f"wrote {out}")
    return 0


def _kv16_twin(variant: str) -> str | None:
    """The 16-bit-KV row a "-kv8" row is compared with (same weights)."""
    if "-kv8" not in variant:
        return None
    base = variant.split("-kv8")[0]
    return base if base in VARIANTS else None


def _naive_twin(r: dict) -> str | None:
    return f"naive-{r['activations']}" if r["activations"] in ("token", "static") else None


def _derive(rows: list[dict], texts: list[str]) -> list[dict]:
    """Sort the rows, (re)compute each row's comparisons with its twins on the same text, and the per-variant
    summary over the texts. Naive W8A8's gap is only asked of rows with a 16-bit KV cache (an fp8 cache adds
    its own error: those rows compare with their 16-bit-KV twin instead)."""
    order = list(VARIANTS)
    rows.sort(key=lambda r: (order.index(r["variant"]), texts.index(r["heldout"]) if r["heldout"] in texts else 99))
    ppl = {(r["variant"], r["heldout"]): r["perplexity"] for r in rows}
    for r in rows:
        for k in ("vs_unquantized_pct", "naive_gap_closed_pct", "vs_16bit_kv_pct"):
            r.pop(k, None)
        base, t = ppl.get(("unquantized", r["heldout"])), r["heldout"]
        naive, kv16 = ppl.get((_naive_twin(r), t)), ppl.get((_kv16_twin(r["variant"]), t))
        if kv16 is not None:
            r["vs_16bit_kv_pct"] = round(100 * (r["perplexity"] / kv16 - 1), 3)
        if base is not None:
            r["vs_unquantized_pct"] = round(100 * (r["perplexity"] / base - 1), 3)
            if naive is not None and naive != base and r["variant"] != "unquantized" and r["kv_cache"] == "16-bit":
                r["naive_gap_closed_pct"] = round(100 * (naive - r["perplexity"]) / (naive - base), 1)
    summary = []
    for name in order:
        mine = [r for r in rows if r["variant"] == name]
        if not mine:
            continue
        s = {"variant": name, "activations": mine[0]["activations"], "kv_cache": mine[0]["kv_cache"],
             "heldout_texts": len(mine), "perplexity": {r["heldout"]: round(r["perplexity"], 4) for r in mine},
             "mean_perplexity": round(statistics.fmean(r["perplexity"] for r in mine), 4)}
        for k in ("vs_unquantized_pct", "naive_gap_closed_pct", "vs_16bit_kv_pct"):
            vals = [r[k] for r in mine if k in r]
            if len(vals) == len(mine):
                s[f"mean_{k}"] = round(statistics.fmean(vals), 3)
                s[f"worst_{k}"] = min(vals) if k == "naive_gap_closed_pct" else max(vals)
        summary.append(s)
    return summary


def _write(out: Path, rows: list[dict], skipped: dict, a, meta: dict) -> dict:
    """Write the table so far (after every checkpoint: an interrupted run keeps what it measured)."""
    from vllm_smoothquant.offline.harness import provenance

    summary = _derive(rows, list(meta["heldout"]))
    result = {**provenance(), "llmcompressor": meta.get("llmc"), "quantize_device": a.device,
              "model": meta["model"], "calibration": Path(meta["calib"]).name,
              "heldout": {k: Path(v).name for k, v in meta["heldout"].items()}, "windows": a.windows,
              "seq_len": a.seq_len, "num_samples": a.num_samples,
              "repeats": 1, "repeats_note": "perplexity through vLLM is deterministic for a given checkpoint and "
                                            "engine, and the calibration is deterministic: one run per row",
              "command": shlex.join(["python", "benchmarks/accuracy.py", *sys.argv[1:]]), "git": _git(),
              "skipped": skipped, "summary": summary, "rows": rows}
    out.write_text(json.dumps(result, indent=2))
    return result


def _git() -> dict:
    """The commit the checkout is at, and whether it had uncommitted changes (checkpoints are built from it)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "uncommitted_changes": bool(git("status", "--porcelain", "-uno"))}


def _markdown(result: dict) -> str:
    """The summary as markdown: perplexity (and % over the unquantized model) per held-out text, and the mean."""
    texts = list(result["heldout"])
    rows = {(r["variant"], r["heldout"]): r for r in result["rows"]}
    head = "| variant | " + " | ".join(texts) + " | mean Δ vs unquantized | mean naive gap closed | mean Δ vs 16-bit KV |"
    lines = [head, "|---|" + "---:|" * (len(texts) + 3)]
    for s in result["summary"]:
        cells = []
        for t in texts:
            r = rows.get((s["variant"], t))
            if r is None:
                cells.append("—")
            elif s["variant"] == "unquantized":
                cells.append(f"{r['perplexity']:.3f}")
            else:
                cells.append(f"{r['perplexity']:.3f} ({r.get('vs_unquantized_pct', float('nan')):+.2f} %)")
        fmt = {"mean_vs_unquantized_pct": "{:+.2f} %", "mean_naive_gap_closed_pct": "{:.0f} %",
               "mean_vs_16bit_kv_pct": "{:+.3f} %"}
        extra = [fmt[k].format(s[k]) if k in s else "—" for k in fmt]
        lines.append(f"| {s['variant']} | " + " | ".join(cells + extra) + " |")
    return "\n".join(lines)


def _plot(result: dict, path: Path) -> None:
    """Per variant: % perplexity over the unquantized model on each held-out text (bars) and their mean (◆)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = [s for s in result["summary"] if "mean_vs_unquantized_pct" in s]
    texts = list(result["heldout"])
    fig, ax = plt.subplots(figsize=(10, 0.55 * len(summary) + 1.8))
    h = 0.8 / max(1, len(texts))
    rows = {(r["variant"], r["heldout"]): r for r in result["rows"]}
    for j, text in enumerate(texts):
        ys = [i - 0.4 + h * (j + 0.5) for i in range(len(summary))]
        xs = [rows[(s["variant"], text)].get("vs_unquantized_pct", 0) if (s["variant"], text) in rows else 0
              for s in summary]
        ax.barh(ys, xs, height=h, label=f"{text} (FP {rows[('unquantized', text)]['perplexity']:.2f})"
                if ("unquantized", text) in rows else text)
    means = [s["mean_vs_unquantized_pct"] for s in summary]
    ax.scatter(means, range(len(summary)), marker="D", color="black", zorder=3, s=18, label="mean")
    for i, m in enumerate(means):
        ax.text(max(m, 0), i, f"  {m:+.2f} %", va="center", fontsize=7)
    ax.set_yticks(range(len(summary)), [s["variant"] for s in summary], fontsize=8)
    ax.set_xscale("symlog", linthresh=5)
    ax.axvline(0, color="gray", lw=0.8)
    ax.axvline(0.3, color="green", ls=":", lw=0.8)
    ax.invert_yaxis()
    ax.legend(loc="lower right", fontsize=7)
    ax.set_xlabel("perplexity over the unquantized model, % (symlog; green: +0.3 %)")
    ax.set_title(f"{result.get('model', '')} through vLLM {result['vllm']} on {result.get('cpu', result['device'])}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
