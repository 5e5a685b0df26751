"""SIGTERM and SIGHUP end a command the way Ctrl-C does: partial output and scratch removed, one line, 128 + signal."""

import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
from tiny_models import calib_text, save_tiny

from vllm_smoothquant.offline import harness
from vllm_smoothquant.offline.signals import Terminated, exit_status, terminate_on


SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


def _default_signals():
    """In a child, before exec: the three signals at their default action, whatever the test runner inherited
    (under ``nohup`` SIGHUP is ignored, in a script's background job SIGINT)."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_DFL)


def test_importing_the_cli_installs_no_handler():
    code = ("import signal; before = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)]; "
            "import vllm_smoothquant.offline.cli, vllm_smoothquant.offline.pipeline; "
            "assert [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)] == before")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGINT, 130)])
def test_the_signal_raises_in_the_main_thread_and_the_old_handler_comes_back(sig, status):
    inherited = signal.getsignal(sig)
    if inherited is signal.SIG_IGN:  # the runner was started with it ignored (nohup, a background job)
        signal.signal(sig, signal.SIG_DFL)
    old = signal.getsignal(sig)
    try:
        _raise_and_restore(sig, status, old)
    finally:
        signal.signal(sig, inherited)


def _raise_and_restore(sig, status, old):
    with pytest.raises(Terminated) as e:
        with terminate_on():
            os.kill(os.getpid(), sig)
            time.sleep(5)  # the handler runs before this returns
    assert e.value.signum == sig and exit_status(e.value) == status
    assert not isinstance(e.value, KeyboardInterrupt)  # code that swallows Ctrl-C (vLLM's zmq_socket_ctx) lets it by
    assert signal.getsignal(sig) == old
    assert exit_status(KeyboardInterrupt()) == 130


def test_a_signal_ignored_on_entry_stays_ignored():
    """``nohup`` ignores SIGHUP (and a script's background job SIGINT): the command must not take it back."""
    old = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with terminate_on():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.1)
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, old)


def test_a_second_signal_while_cleaning_up_ends_the_process_at_once():
    code = ("import os, signal, time\n"
            "from vllm_smoothquant.offline.signals import Terminated, terminate_on\n"
            "with terminate_on():\n"
            "    try:\n"
            "        os.kill(os.getpid(), signal.SIGTERM); time.sleep(5)\n"
            "    except Terminated:\n"
            "        os.kill(os.getpid(), signal.SIGHUP); time.sleep(5)\n"
            "raise SystemExit(0)\n")
    run = subprocess.run([sys.executable, "-c", code], timeout=60, preexec_fn=_default_signals)
    assert run.returncode == -signal.SIGHUP

# ---------------------------------------------------------------- a real quantize run, stopped by a real signal
@pytest.fixture(scope="module")
def slow(tmp_path_factory):
    """A model and calibration set that take seconds to quantize on CPU, so a signal lands mid-run."""
    root = tmp_path_factory.mktemp("slow")
    return save_tiny("LlamaForCausalLM", root / "llama", hidden=128, layers=8), calib_text(root / "calib.txt", 40000)


def _run_and_stop(slow, tmp_path, sig) -> tuple[int, str]:
    """Start `vllm-smoothquant quantize` (activations offloaded to disk), send ``sig`` once its .partial directory
    exists; return its exit status and stderr."""
    model, calib = slow
    cmd = [sys.executable, "-m", "vllm_smoothquant.offline.cli", "quantize", str(model), str(tmp_path / "out"),
           "--calib", str(calib), "--num-samples", "64", "--seq-len", "128", "--offload-activations", "disk"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         preexec_fn=_default_signals)  # none ignored, whatever the runner inherited
    try:
        deadline = time.monotonic() + 300
        while not list(tmp_path.glob(".out.*.partial")):
            assert p.poll() is None, f"quantize ended before its .partial directory was seen: {p.stderr.read()}"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        p.send_signal(sig)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    return p.returncode, err


@pytest.mark.parametrize("sig, status, name", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGHUP, 129, "SIGHUP"),
                                               (signal.SIGINT, 130, "Ctrl-C (SIGINT)")])
def test_a_signal_mid_run_leaves_nothing_and_exits_128_plus_signal(slow, tmp_path, sig, status, name):
    code, err = _run_and_stop(slow, tmp_path, sig)
    assert code == status, err
    assert "Traceback" not in err, err
    assert err.rstrip().splitlines()[-1] == (f"vllm-smoothquant quantize: stopped by {name}; nothing half-written "
                                             "is left behind")
    assert list(tmp_path.iterdir()) == []  # no out, no .partial, no .activations


# ---------------------------------------------------------------- engines started by eval / demo
class _Client:
    def __init__(self):
        self.shutdowns = 0

    def shutdown(self):
        self.shutdowns += 1


class _FakeLLM:
    def __init__(self):
        self.llm_engine = SimpleNamespace(engine_core=_Client())


def test_a_stopped_eval_shuts_its_engine_down(tmp_path, monkeypatch, capsys):
    from vllm_smoothquant.offline import evaluate
    from vllm_smoothquant.offline.cli import main

    model, text = save_tiny("LlamaForCausalLM", tmp_path / "llama"), calib_text(tmp_path / "text.txt")
    monkeypatch.setenv("VLLM_SMOOTHQUANT_CACHE", str(tmp_path / "cache"))
    llm = _FakeLLM()
    monkeypatch.setattr(harness, "make_llm", lambda *a, **k: harness._started(llm))

    def terminated(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)

    monkeypatch.setattr(evaluate, "perplexity", terminated)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["eval", str(model), "--text", str(text), "--windows", "2", "--seq-len", "16"]) == 143
    assert llm.llm_engine.engine_core.shutdowns == 1
    assert capsys.readouterr().err.rstrip().endswith("vllm-smoothquant eval: stopped by SIGTERM; nothing half-written "
                                                     "is left behind")
    assert signal.getsignal(signal.SIGTERM) == before  # main() put the previous handler back
