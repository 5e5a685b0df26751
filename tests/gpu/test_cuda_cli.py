"""On CUDA: ``vllm-smoothquant quantize`` with the default ``--device auto`` runs on the GPU and says so (stderr,
``report.json``). Skipped where there is no CUDA (``tests/offline`` checks the CPU pick).
``SQ_DEVICE_RECORD=FILE`` writes what was seen as JSON."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch

from vllm_smoothquant.offline import harness

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_device_auto_picks_cuda(tmp_path):
    from tiny_models import calib_text, save_tiny

    base = save_tiny("LlamaForCausalLM", tmp_path / "base", dtype=torch.float16)
    cli = shutil.which("vllm-smoothquant")
    assert cli, "vllm-smoothquant is not on PATH: install the package"
    run = subprocess.run([cli, "quantize", str(base), str(tmp_path / "sq"), "--calib", str(calib_text(tmp_path / "c.txt")),
                          "--num-samples", "4", "--seq-len", "64"], capture_output=True, text=True, timeout=300)
    picked = [line for line in run.stderr.splitlines() if line.startswith("device:")]
    report = json.loads((tmp_path / "sq" / "smoothquant" / "report.json").read_text()) if run.returncode == 0 else {}
    record = {**harness.provenance(), "returncode": run.returncode, "stderr_device_line": picked,
              "report_device": report.get("device"), "gpu": torch.cuda.get_device_name()}
    print(json.dumps(record, indent=2))
    if path := os.environ.get("SQ_DEVICE_RECORD"):
        with open(path, "w") as f:
            json.dump(record, f, indent=2)
    assert run.returncode == 0, run.stderr[-2000:]
    assert picked and picked[0].startswith("device: cuda"), picked
    assert str(report["device"]).startswith("cuda"), report.get("device")
