"""Tuned Triton fused-MoE configs for the int8 W8A8 experts (CUDA).

vLLM looks its fused-MoE kernel configs up by a file name that carries the quantization (``E=..,N=..,
device_name=..,dtype=fp8_w8a8.json``), but vLLM 0.26 never names ``dtype=int8_w8a8``: int8 W8A8 experts get the
16-bit configs (``_get_config_dtype_str`` has no int8 W8A8 case), whose K tiles are sized for 2-byte inputs. On the
H100 the tuned int8 configs make the expert GEMMs 1.1-1.8x faster than those (Qwen3-30B-A3B and Mixtral-8x7B shapes,
benchmarks/RESULTS.md).

So the plugin finds the int8 file itself: ``$VLLM_TUNED_CONFIG_FOLDER`` first (vLLM's own variable: a user's tuned
configs win), then the files shipped in ``moe_configs/`` (written by ``benchmarks/moe_tune.py``). The SmoothQuant
MoE method passes the entry for the call's token count to vLLM's ``fused_experts`` through vLLM's
``override_config``, choosing the entry as vLLM does: the nearest tuned token count. No file: vLLM's own choice.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

SHIPPED = Path(__file__).with_name("moe_configs")
DTYPE = "int8_w8a8"
TILE_KEYS = frozenset({"BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K"})  # what every entry must set


def folders(kernel: str = "vllm") -> list[Path]:
    """Where int8 config files are looked for, in order. The int32-accumulating kernel (``moe_int8.py``) prefers
    tiles of its own (a ``int32_acc/`` subfolder: it runs 256-wide N tiles that vLLM's kernel runs slowly) and
    falls back to the tables tuned for vLLM's kernel."""
    user = os.environ.get("VLLM_TUNED_CONFIG_FOLDER")
    base = ([Path(user)] if user else []) + [SHIPPED]
    return ([f / kernel for f in base] if kernel != "vllm" else []) + base


@functools.lru_cache(maxsize=None)
def load_table(file_name: str, search: tuple[Path, ...]) -> dict[int, dict] | None:
    """``{token count: kernel config}`` from the first folder holding ``file_name``; None if none does."""
    for folder in search:
        path = folder / file_name
        if path.is_file():
            try:
                table = {int(m): cfg for m, cfg in json.loads(path.read_text()).items()}
                bad = [m for m, cfg in table.items() if not (isinstance(cfg, dict) and TILE_KEYS <= cfg.keys())]
                if bad:
                    raise ValueError(f"the entries for {bad} lack {sorted(TILE_KEYS)}")
            except (ValueError, AttributeError) as e:
                raise ValueError(f"{path}: not a fused-MoE config file ({{token count: config}}): {e}; fix or "
                                 f"remove it (benchmarks/moe_tune.py writes valid ones)") from e
            from .engine_log import engine_logger

            engine_logger(__name__).info_once("SmoothQuant int8 MoE: tuned kernel configs from %s", path, scope="global")
            return table or None
    return None


def int8_table(num_experts: int, intermediate: int, kernel: str = "vllm") -> dict[int, dict] | None:
    """The tuned table for this expert shape on this GPU (vLLM's file name for ``dtype=int8_w8a8``) and kernel
    (``engine_options.MOE_KERNELS``), or None."""
    from vllm.model_executor.layers.fused_moe.fused_moe import get_config_file_name

    return load_table(get_config_file_name(num_experts, intermediate, DTYPE), tuple(folders(kernel)))


def pick(table: dict[int, dict], tokens: int) -> dict:
    """The entry for ``tokens``: the nearest tuned token count (vLLM's rule in ``try_get_optimal_moe_config``)."""
    return table[min(table, key=lambda m: abs(m - tokens))]
