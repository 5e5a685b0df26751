"""The plugin's engine options: vLLM's ``--additional-config '{"smoothquant": {...}}'``, validated once.

    fused_quant   RMSNorm -> int8 quant in vLLM's one fused kernel (``fused_quant.py``): true or false (the
                  default: it measured slower than the two kernels on an H200); CUDA under vLLM's compilation only
    moe_kernel    the kernel of the int8 experts on CUDA: "auto" (the default: "int32_acc" where it can run, else
                  vLLM's), "int32_acc" (``moe_int8.py``: vLLM's kernel design accumulating in int32 inside the MMA;
                  a warning where it cannot run) or "vllm" (vLLM's Triton fused-MoE kernel)

``additional_config`` is part of vLLM's compile-cache key, so switching an option never reuses a graph built the
other way. Anything that is not a mapping (None, or another plugin's config object) means the defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

SECTION = "smoothquant"  # key of this plugin's section in additional_config
MOE_KERNELS = ("auto", "int32_acc", "vllm")
EXAMPLE = '--additional-config \'{"smoothquant": {"moe_kernel": "int32_acc", "fused_quant": true}}\''


class EngineOptionsError(ValueError):
    """``additional_config["smoothquant"]`` holds something this plugin does not know."""


@dataclass(frozen=True)
class EngineOptions:
    fused_quant: bool = False
    moe_kernel: str = "auto"

    @classmethod
    def parse(cls, additional_config: Mapping | object | None) -> EngineOptions:
        if not isinstance(additional_config, Mapping):
            return cls()
        section = additional_config.get(SECTION, {})
        if not isinstance(section, Mapping):
            raise EngineOptionsError(f'additional_config["{SECTION}"] must be a JSON object, got {section!r}; '
                                     f"e.g. {EXAMPLE}.")
        unknown = set(section) - {"fused_quant", "moe_kernel"}
        if unknown:
            raise EngineOptionsError(f'additional_config["{SECTION}"] has unknown key(s) {sorted(unknown)}; the keys '
                                     f'are "fused_quant" and "moe_kernel", e.g. {EXAMPLE}.')
        fused = section.get("fused_quant", cls.fused_quant)
        if not isinstance(fused, bool):
            raise EngineOptionsError(f'additional_config["{SECTION}"]["fused_quant"] = {fused!r}: use true or false '
                                     f"(default false; true: RMSNorm -> int8 in vLLM's fused kernel). The per-producer "
                                     f"lists of earlier versions are gone: the fusion covers RMSNorm only.")
        kernel = section.get("moe_kernel", cls.moe_kernel)
        if kernel not in MOE_KERNELS:
            raise EngineOptionsError(f'additional_config["{SECTION}"]["moe_kernel"] = {kernel!r}: use one of '
                                     f"{list(MOE_KERNELS)} (default \"{cls.moe_kernel}\").")
        return cls(fused_quant=fused, moe_kernel=kernel)


def current() -> EngineOptions:
    """The options of the engine being built (the defaults outside one)."""
    from vllm.config import get_current_vllm_config_or_none

    return EngineOptions.parse(getattr(get_current_vllm_config_or_none(), "additional_config", None))
