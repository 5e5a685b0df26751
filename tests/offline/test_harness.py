"""The vLLM harness's pieces that need no engine: provenance, the quiet log, output redirection, progress."""

import datetime
import json
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from vllm_smoothquant.offline import harness


def test_provenance_records_date_device_and_versions():
    import transformers
    import vllm

    p = harness.provenance()
    json.dumps(p)  # results files hold it as is
    assert set(p) <= set(harness.PROVENANCE_KEYS)
    assert p["date"] == datetime.date.today().isoformat()
    assert p["device"] == harness.device_name()
    assert (p["vllm"], p["torch"], p["transformers"], p["python"]) == (
        vllm.__version__, torch.__version__, transformers.__version__, platform.python_version())
    if torch.cuda.is_available():
        assert p["device_count"] == torch.cuda.device_count()
    elif Path("/proc/cpuinfo").is_file():  # the flags agree with torch's own CPU detection
        flags = p["cpu_flags"]
        assert ("avx2" in flags) == torch.cpu._is_avx2_supported()
        assert ("avx512_vnni" in flags) == torch.cpu._is_vnni_supported()
        assert ("avx512_bf16" in flags) == torch.cpu._is_avx512_bf16_supported()


def test_cpu_info_reads_model_name_and_int8_relevant_flags():
    text = "processor\t: 0\nmodel name\t: Some CPU @ 2.0GHz\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni foo\n\n"
    assert harness.cpu_info(text) == {"cpu": "Some CPU @ 2.0GHz", "cpu_flags": ["avx2", "avx512f", "avx512_vnni"]}


def test_quiet_vllm_sends_this_and_child_processes_vllm_log_to_the_file(tmp_path):
    """An engine process inherits the environment and configures logging the way vLLM does."""
    child = textwrap.dedent("""
        import vllm.logger as L
        if hasattr(L, "configure_logging"):  # vLLM >= 0.32 configures when an engine starts; 0.26 at import
            from vllm.config.logging import LoggingConfig
            L.configure_logging(LoggingConfig())
        L.init_logger("vllm.child").warning("child says hi")
    """)
    parent = textwrap.dedent(f"""
        import logging, subprocess, sys
        from pathlib import Path
        from vllm_smoothquant.offline import harness
        log = harness.quiet_vllm("test", Path(sys.argv[1]))
        logging.getLogger("vllm.engine").info("parent says hi")
        subprocess.run([sys.executable, "-c", {child!r}], check=True)
        print(log)
    """)
    proc = subprocess.run([sys.executable, "-c", parent, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    log = Path(proc.stdout.strip())
    assert log == tmp_path / "vllm-test.log"
    text = log.read_text()
    assert "parent says hi" in text and "child says hi" in text
    assert "says hi" not in proc.stderr


def test_output_to_sends_this_process_and_its_children_to_the_file(tmp_path, capfd):
    log = tmp_path / "engine.log"
    with harness._output_to(log):
        os.write(1, b"one\n")
        os.write(2, b"two\n")
        subprocess.run([sys.executable, "-c", "import sys; print('three'); print('four', file=sys.stderr)"], check=True)
    os.write(2, b"after\n")
    out, err = capfd.readouterr()
    assert log.read_text().split() == ["one", "two", "three", "four"]
    assert out == "" and err == "after\n"
    assert harness.tail(log, 2) == "three\nfour"


def test_progress_bar_is_one_bar_across_generate_calls():
    """vLLM calls ``use_tqdm`` with an iterable (rendering prompts), then with ``total=`` (finished requests)."""
    bar = harness.progress_bar("perplexity", "window", total=32, done=16, leave=False)
    assert list(bar([1, 2], desc="Rendering prompts")) == [1, 2]
    b = bar(total=16, desc="Processed prompts", dynamic_ncols=True, postfix="speed")
    b.update(1)
    assert (b.total, b.n, b.desc, b.unit, b.leave) == (32, 17, "perplexity", "window", False)
    b.close()
