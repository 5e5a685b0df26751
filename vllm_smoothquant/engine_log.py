"""The plugin's logger inside vLLM's processes.

vLLM configures one logger, ``vllm`` (its handler, format and ``VLLM_LOGGING_LEVEL``); a logger outside that
hierarchy gets no handler, so its INFO lines are dropped and its warnings reach stderr without vLLM's prefix.
The plugin's engine-side modules therefore log as ``vllm.<module>`` (e.g. ``vllm.vllm_smoothquant.kv_cache``).
"""

from __future__ import annotations


def engine_logger(module: str):
    """vLLM's logger (with ``info_once``/``warning_once``) for ``module``, under vLLM's ``vllm`` hierarchy."""
    from vllm.logger import init_logger

    return init_logger(f"vllm.{module}")
