"""The plugin logs under vLLM's ``vllm`` logger, so its INFO lines reach the engine's log."""

from __future__ import annotations

import logging

from vllm_smoothquant.engine_log import engine_logger


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_info_lines_reach_the_handlers_vllm_configures():
    vllm_root = logging.getLogger("vllm")  # vLLM attaches its handler here and stops propagation
    capture, level = _Capture(), vllm_root.level
    vllm_root.addHandler(capture)
    vllm_root.setLevel(logging.INFO)
    try:
        engine_logger("vllm_smoothquant.moe_configs").info("tuned kernel configs from %s", "X")
    finally:
        vllm_root.removeHandler(capture)
        vllm_root.setLevel(level)
    assert capture.messages == ["tuned kernel configs from X"]
