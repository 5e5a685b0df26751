"""What a quantize run reports: per group (alpha, max|X|), per linear (weight rounding error), per layer (time, peak
memory), per run.

Host memory is the process's resident set (``VmHWM``, reset per layer through ``/proc/self/clear_refs`` where the
kernel allows it; the run's peak is the max over all segments); CUDA memory is torch's peak allocation.
"""

from __future__ import annotations

import os
import resource
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class GroupReport:
    layer: int
    group: str
    alpha: float
    act_max_before: float
    act_max_after: float


@dataclass
class LinearRounding:
    """One linear's relative output error ``||X Wᵀ − X Ŵᵀ||² / ||X Wᵀ||²`` on its calibration inputs
    (``gptq.output_error``) with round-to-nearest and with GPTQ integers (``--weight-rounding gptq``; ``W``: the
    smoothed weight)."""

    layer: int
    linear: str  # name inside the decoder layer, e.g. self_attn.q_proj
    nearest: float
    gptq: float


def rounding_summary(rows: list[LinearRounding]) -> dict[str, dict[str, float]]:
    """Mean over layers per linear (``self_attn.q_proj``: {nearest, gptq, linears}), and over all linears ("all")."""
    by: dict[str, list[LinearRounding]] = {}
    for x in rows:
        by.setdefault(x.linear, []).append(x)
    by["all"] = list(rows)
    return {k: {"nearest": sum(x.nearest for x in v) / len(v), "gptq": sum(x.gptq for x in v) / len(v),
                "linears": len(v)} for k, v in by.items() if v}


def rounding_json(method: str, damp: float, act_order: bool, rows: list[LinearRounding]) -> dict:
    """report.json's ``weight_rounding``: the method, and for gptq its settings, per-linear errors and their means."""
    if method != "gptq":
        return {"method": method}
    return {"method": method, "damp": damp, "act_order": act_order, "mean_output_error": rounding_summary(rows),
            "linears": [vars(x) for x in rows]}


@dataclass
class LayerReport:
    layer: int
    seconds: float
    peak_rss_bytes: int | None  # None where the peak cannot be reset per layer
    peak_cuda_bytes: int | None = None


@dataclass
class QuantizeReport:
    output: str
    seconds: float
    output_bytes: int
    groups: list[GroupReport] = field(default_factory=list)
    layers: list[LayerReport] = field(default_factory=list)
    peak_rss_bytes: int = 0  # this process's peak resident memory over the whole run
    peak_cuda_bytes: int | None = None  # peak CUDA allocation (--device cuda)
    loading: str = ""  # how the weights were read (lazily from safetensors, or the whole model in memory)
    activations: str = ""  # where the calibration activations were kept
    rotation: str = ""  # which linears' inputs are rotated, block size
    device: str = ""  # where the layers ran (--device, "auto" resolved)


def _status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """Peak resident memory since start or the last :func:`reset_peak_rss`."""
    kib = _status_kib("VmHWM")
    return (kib if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class MemoryMeter:
    """Time and peak memory per decoder layer, and the run's peak."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.layers: list[LayerReport] = []
        self._run_peak = self._cuda_peak = 0
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    @contextmanager
    def layer(self, index: int):
        self._fold_peaks()
        per_layer = reset_peak_rss()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        yield
        rss, cuda = peak_rss_bytes(), torch.cuda.max_memory_allocated() if self.cuda else None
        self._fold_peaks()
        self.layers.append(LayerReport(index, round(time.perf_counter() - start, 3), rss if per_layer else None, cuda))

    def _fold_peaks(self) -> None:
        self._run_peak = max(self._run_peak, peak_rss_bytes())
        if self.cuda:
            self._cuda_peak = max(self._cuda_peak, torch.cuda.max_memory_allocated())

    def peaks(self) -> dict[str, int | None]:
        """``peak_rss_bytes`` and ``peak_cuda_bytes`` of the run so far."""
        self._fold_peaks()
        return {"peak_rss_bytes": self._run_peak, "peak_cuda_bytes": self._cuda_peak if self.cuda else None}


def return_freed_memory_to_os() -> None:
    """Serve allocations of 1 MiB and more by mmap (glibc), so a freed layer goes back to the OS at once.

    glibc raises its mmap threshold to the size of each freed mmapped block (up to 32 MiB); layer-sized tensors
    then come from the heap, and with the reader thread's arena a freed layer stayed resident: host memory grew
    by ~50 MiB per layer of a 1.1 B model (2.2 GiB peak vs 0.9 GiB with this). No effect elsewhere.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (fixed: no dynamic adjustment)
    except (OSError, AttributeError):
        pass


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _cgroup_limit() -> int | None:
    """This process's cgroup memory limit (v1 or v2), if any."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):  # cgroup v1
            f = Path("/sys/fs/cgroup/memory", path.lstrip("/"), "memory.limit_in_bytes")
        elif controllers == "":  # cgroup v2
            f = Path("/sys/fs/cgroup", path.lstrip("/"), "memory.max")
        else:
            continue
        try:
            text = f.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:
            return int(text)
    return None


def host_memory_available() -> int | None:
    """Bytes this process can still take: /proc/meminfo's MemAvailable, capped by its cgroup's memory limit."""
    try:
        avail = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                     if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None
    limit = _cgroup_limit()
    return avail if limit is None else min(avail, limit - rss_bytes())


def gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"
