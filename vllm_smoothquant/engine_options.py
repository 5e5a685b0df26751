"""The plugin's engine options: vLLM's ``--additional-config '{"smoothquant": {...}}'``, validated once.

    fused_quant   which producers quantize a linear's input inside their own kernel (``fused_quant.py``):
                  true, false, or a list of roles from ``fused_quant.ALL_ROLES``; default none
    moe_kernel    the kernel of the int8 experts on CUDA: "auto" (the default: "int32_acc" where it can run, else
                  vLLM's), "int32_acc" (``moe_int8.py``: vLLM's kernel design accumulating in int32 inside the MMA;
                  a warning where it cannot run) or "vllm" (vLLM's Triton fused-MoE kernel)

``additional_config`` is part of vLLM's compile-cache key, so switching an option never reuses a graph built the
other way. Anything that is not a mapping (None, or another plugin's config object) means the defaults.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

SECTION = "smoothquant"  # key of this plugin's section in additional_config
MOE_KERNELS = ("auto", "int32_acc", "vllm")
EXAMPLE = '--additional-config \'{"smoothquant": {"moe_kernel": "int32_acc", "fused_quant": ["norm", "act"]}}\''


class EngineOptionsError(ValueError):
    """``additional_config["smoothquant"]`` holds something this plugin does not know."""


@dataclass(frozen=True)
class EngineOptions:
    fused_quant: frozenset[str] = frozenset()
    moe_kernel: str = "auto"

    @classmethod
    def parse(cls, additional_config: Mapping | object | None) -> EngineOptions:
        from .fused_quant import ALL_ROLES

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
        roles = section.get("fused_quant", [])
        if roles is True:
            roles = ALL_ROLES
        elif roles is False or roles is None:
            roles = []
        elif isinstance(roles, str) or not isinstance(roles, Iterable) or not set(roles) <= set(ALL_ROLES):
            raise EngineOptionsError(f'additional_config["{SECTION}"]["fused_quant"] = {roles!r}: use true, false, '
                                     f"or a list of roles from {list(ALL_ROLES)} (default: none).")
        kernel = section.get("moe_kernel", cls.moe_kernel)
        if kernel not in MOE_KERNELS:
            raise EngineOptionsError(f'additional_config["{SECTION}"]["moe_kernel"] = {kernel!r}: use one of '
                                     f"{list(MOE_KERNELS)} (default \"{cls.moe_kernel}\").")
        return cls(fused_quant=frozenset(roles), moe_kernel=kernel)


def current() -> EngineOptions:
    """The options of the engine being built (the defaults outside one)."""
    from vllm.config import get_current_vllm_config_or_none

    return EngineOptions.parse(getattr(get_current_vllm_config_or_none(), "additional_config", None))
