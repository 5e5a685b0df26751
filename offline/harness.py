"""The one vLLM harness of the CLI, the demo, the tests and the benchmarks: build an engine, read prompt
logprobs and greedy continuations from it, keep vLLM's log out of the terminal, and record what ran where.

Importing this module imports neither vLLM nor torch: ``quiet_vllm`` must run before vLLM is imported.
"""

from __future__ import annotations

import datetime
import json
import logging.config
import os
import platform
import sys
import weakref
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

Prompt = str | list[int]  # text, or token ids
_ENGINES: weakref.WeakSet = weakref.WeakSet()  # every LLM make_llm built and that is still alive


# ---------------------------------------------------------------- engine
def make_llm(model: str, quantization: str | None = None, *, log: Path | None = None, **engine_args):
    """A ``vllm.LLM`` with settings that suit evaluation on CPU and GPU alike; ``engine_args`` override them.

    ``log``: the file ``quiet_vllm`` returned. The engine is then built with this process's stdout/stderr
    going to that file, so the engine processes it starts (which inherit them) write there for good; if
    building fails, the end of the log is printed before the error propagates.
    """
    cpu = _platform().is_cpu()
    defaults = dict(
        # CPU: skip torch.compile warm-up (minutes per new model on 2 cores) and compute in fp32
        # (bf16 is emulated, ~2x slower, on CPUs without AVX512-BF16/AMX); CUDA: vLLM's defaults.
        enforce_eager=cpu,
        dtype="float32" if cpu else "auto",
        quantization=quantization,
        max_model_len=2048,
        enable_prefix_caching=False,  # every prompt logprob is computed, none served from cache
        gpu_memory_utilization=0.3,
        seed=0,
    )
    if log is None:
        from vllm import LLM

        return _started(LLM(model=model, **(defaults | engine_args)))
    try:
        with _output_to(log):
            from vllm import LLM

            return _started(LLM(model=model, **(defaults | engine_args)))
    except Exception:
        print(f"vLLM failed to start; the end of its log ({log}):\n{tail(log)}", file=sys.stderr)
        raise


def _started(llm):
    _ENGINES.add(llm)
    return llm


def stop_engines() -> None:
    """Shut down the engine processes of every LLM ``make_llm`` built that is still alive (a command that was
    stopped by a signal: now, not whenever the interpreter exits). vLLM's engine client shutdown is idempotent."""
    for llm in list(_ENGINES):
        client = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if client is not None:
            client.shutdown()
        _ENGINES.discard(llm)


@dataclass(frozen=True)
class Generation:
    token_ids: list[int]  # the greedy continuation
    text: str
    prompt_logprobs: list[float] | None  # log p(prompt[t] | prompt[:t]) for t >= 1, when asked for


def greedy(llm, prompts: Sequence[Prompt], max_tokens: int, *, prompt_logprobs: bool = False,
           progress: Callable | None = None) -> list[Generation]:
    """Greedy continuations of ``prompts`` (text or token ids) through ``llm``, in one ``generate`` call.

    ``progress``: a ``progress_bar(...)``; None shows nothing.
    """
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, prompt_logprobs=0 if prompt_logprobs else None)
    inputs = [p if isinstance(p, str) else TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
    outs = llm.generate(inputs, params, use_tqdm=progress or False)
    result = []
    for o in outs:
        ids = o.prompt_token_ids
        lps = [o.prompt_logprobs[t][ids[t]].logprob for t in range(1, len(ids))] if prompt_logprobs else None
        result.append(Generation(list(o.outputs[0].token_ids), o.outputs[0].text, lps))
    return result


def prompt_logprobs(llm, prompts: Sequence[Prompt], progress: Callable | None = None) -> list[list[float]]:
    """log p(token_t | tokens_<t) for t >= 1 of every prompt, through ``llm`` (the engine's own kernels)."""
    return [g.prompt_logprobs for g in greedy(llm, prompts, 1, prompt_logprobs=True, progress=progress)]


def progress_bar(desc: str, unit: str, total: int, done: int = 0, leave: bool = True) -> Callable:
    """A ``use_tqdm`` factory for ``LLM.generate``: one bar that advances as each request finishes.

    ``total``/``done`` span several ``generate`` calls (e.g. batches of windows): the bar of each call
    starts where the last one ended; ``leave=False`` for all but the last call keeps one line on screen.
    """
    from tqdm.auto import tqdm

    def bar(iterable=None, **kwargs):
        if iterable is not None:  # vLLM's "Rendering prompts" pass: no bar of its own
            return iterable
        return tqdm(**(kwargs | dict(desc=desc, unit=unit, total=total, initial=done, leave=leave)))

    return bar


# ---------------------------------------------------------------- vLLM's log
def quiet_vllm(name: str, directory: Path | None = None) -> Path:
    """Send vLLM's log to ``<directory>/vllm-<name>.log`` (default: the cache dir's ``logs/``), not the terminal.

    Call before vLLM is imported: vLLM reads ``VLLM_CONFIGURE_LOGGING``/``VLLM_LOGGING_CONFIG_PATH`` when it
    configures logging, and the engine processes inherit them. Pass the returned path to ``make_llm(log=...)``
    so that what the engine processes print outside the logger (progress bars, C++ warnings) goes there too.
    """
    if directory is None:
        from .assets import cache_dir

        directory = cache_dir() / "logs"
    directory.mkdir(parents=True, exist_ok=True)
    log = directory / f"vllm-{name}.log"
    log.write_text("")  # this run's log only; every process appends
    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"vllm": {"format": "%(levelname)s %(asctime)s pid=%(process)d [%(filename)s:%(lineno)d] "
                                          "%(message)s", "datefmt": "%m-%d %H:%M:%S"}},
        "handlers": {"file": {"class": "logging.FileHandler", "filename": str(log), "mode": "a",
                              "formatter": "vllm", "encoding": "utf-8"}},
        "loggers": {"vllm": {"handlers": ["file"], "level": os.environ.get("VLLM_LOGGING_LEVEL", "INFO"),
                             "propagate": False}},
    }
    config_path = log.with_suffix(".logging.json")
    config_path.write_text(json.dumps(config, indent=1))
    os.environ["VLLM_CONFIGURE_LOGGING"] = "1"
    os.environ["VLLM_LOGGING_CONFIG_PATH"] = str(config_path)
    logging.config.dictConfig(config)  # this process: also what vLLM logs before it configures itself
    return log


@contextmanager
def _output_to(path: Path):
    """File descriptors 1 and 2 (this process's stdout/stderr, and every child's started meanwhile) -> ``path``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (fd, *saved):
            os.close(f)


def tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a text file."""
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])


# ---------------------------------------------------------------- provenance
# every key provenance() may return: the vocabulary results files share
PROVENANCE_KEYS = ("date", "device", "device_count", "cuda", "cpu", "cpu_flags", "vllm", "torch", "transformers",
                   "python", "vllm_smoothquant")
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


def _platform():
    """vLLM's platform: asked through it (NVML), never ``torch.cuda``, whose device count poisons fork(): vLLM's
    engine processes, forked after it, then fail with "Cannot re-initialize CUDA in forked subprocess"."""
    from vllm.platforms import current_platform

    return current_platform


def device_name() -> str:
    """What results files record as ``device``: the GPU's name, or the CPU architecture and thread count."""
    import torch

    if not _platform().is_cpu():
        return _platform().get_device_name()
    return f"CPU {platform.machine()} ({torch.get_num_threads()} threads)"


def cpu_info(cpuinfo: str | None = None) -> dict:
    """The CPU's model name and which of ``CPU_FLAGS`` (what decides vLLM's int8/bf16 CPU kernels) it has."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return {"cpu": platform.processor() or platform.machine()}
    fields = dict(line.split(":", 1) for line in cpuinfo.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    return {"cpu": fields.get("model name", platform.machine()), "cpu_flags": [f for f in CPU_FLAGS if f in flags]}


def provenance() -> dict:
    """Where and with what a result was measured: date, device, versions (and the CPU's flags on CPU)."""
    import torch
    import transformers
    import vllm

    import vllm_smoothquant

    record = {
        "date": datetime.date.today().isoformat(), "device": device_name(), "vllm": vllm.__version__,
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "vllm_smoothquant": vllm_smoothquant.__version__,
    }
    if not _platform().is_cpu():
        record |= {"device_count": _platform().device_count(), "cuda": torch.version.cuda}
    else:
        record |= cpu_info()
    return record
