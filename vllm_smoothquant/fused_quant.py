"""RMSNorm -> int8 in one kernel: vLLM's ``rms_norm_dynamic_per_token_quant`` in place of the norm + quant pair.

Unfused, an int8 linear after an RMSNorm costs two kernels: the norm (with the residual add before it) writes
16-bit activations, and vLLM's ``dynamic_scaled_int8_quant`` reads them back to write int8 values and per-token
scales. vLLM has the kernel that does both in one pass, ``rms_norm_dynamic_per_token_quant`` (int8 or fp8 out,
optional residual add), and a compile pass that uses it -- for fp8 only (``RMSNormQuantFusionPass`` in
``compilation/passes/fusion/rms_quant_fusion.py`` registers no int8 pattern, vLLM 0.26 and 0.32). This module is
that pass for int8, modelled on vLLM's fp8 one: two patterns on vLLM's graph before it lowers its IR ops,

    rms_norm(x, w, eps)                      -> scaled_int8_quant   =>  rms_norm_dynamic_per_token_quant(x, w, eps)
    fused_add_rms_norm(x, residual, w, eps)  -> scaled_int8_quant   =>  ... (x, w, eps, residual=residual)

matched only where the norm's output feeds nothing but the quant (a MoE router reading the same norm output keeps
the pair unfused) and only for the epsilon the pattern was registered with. The int8 GEMM stays vLLM's CUTLASS one.

The plugin installs the pass in the engine's ``compilation_config.inductor_compile_config
["post_grad_custom_post_pass"]``: vLLM's slot for one extra post-grad pass, which its pass manager runs after its
own fusions and before lowering its IR ops, and hashes (``uuid``) into its compile-cache key. Nothing is installed
unless the engine runs CUDA under vLLM's compilation (mode VLLM_COMPILE, Inductor) with ``fused_quant`` on; eager
mode and the CPU run vLLM's quant kernel after the norm. Not covered, because vLLM has no such
kernel: static per-tensor input scales (``rms_norm_static_fp8_quant`` is fp8 only), LayerNorm families (OPT, BLOOM,
Falcon, ...) and the SiLU-and-mul -> quant in front of down_proj.

Off by default, because it measured slower (H200, vLLM 0.26, Llama-3-8B shape, 3 interleaved repeats,
benchmarks/RESULTS.md): throughput 0.987x of the two kernels; in a 64 x 1024-token prefill vLLM's fused kernel took
86 ms where Inductor's RMSNorm kernel + vLLM's quant kernel for the same pairs took about 52 ms (batch 1: equal).
On: ``--additional-config '{"smoothquant": {"fused_quant": true}}'`` (``engine_options.py``).

Values: the kernel takes each token's scale from its fp32 normalized values, before the 16-bit rounding the unfused
norm applies, so int8 values differ from the pair's by up to 2 steps and scales by up to 1 % in bfloat16 (1 step,
0.12 % in float16) -- measured in tests/gpu/test_cuda_fused_quant.py.
"""

from __future__ import annotations

from typing import Any

import torch

POST_PASS_KEY = "post_grad_custom_post_pass"  # vLLM's (and Inductor's) name of the slot
DEFAULT_EPSILONS = (1e-5, 1e-6)  # registered for every model, plus the model's own
STATS = {"installed": False, "matched": 0}  # in this process: pass installed, pairs replaced (over all compiles)


def engine_fuses(vllm_config: Any) -> bool:
    """Whether the engine being built fuses its RMSNorm -> int8 pairs: CUDA, vLLM's Inductor compilation, option on."""
    from vllm.config import CompilationMode
    from vllm.platforms import current_platform

    from .engine_options import EngineOptions

    on = EngineOptions.parse(getattr(vllm_config, "additional_config", None)).fused_quant  # validated everywhere
    if vllm_config is None or not on or not current_platform.is_cuda():
        return False
    cc = vllm_config.compilation_config
    return cc.mode == CompilationMode.VLLM_COMPILE and cc.backend == "inductor"


def install(cfg: Any) -> bool:
    """Put the pass into the engine's compilation config ``cfg`` (idempotent; where ``engine_fuses(cfg)``); False
    where it cannot. Called by the linear method while vLLM builds the model, before vLLM configures its pass
    manager."""
    from .engine_log import engine_logger

    if _pass_class().FUSED_OP is None:
        engine_logger(__name__).warning_once("SmoothQuant: fused_quant is on but this vLLM build has no "
                                             "rms_norm_dynamic_per_token_quant kernel; the unfused quant kernel runs")
        return False
    slots = cfg.compilation_config.inductor_compile_config
    current = slots.get(POST_PASS_KEY)
    if current is not None and not isinstance(current, _pass_class()):
        engine_logger(__name__).warning_once(
            "SmoothQuant: compilation_config.inductor_compile_config['%s'] already holds %r; the RMSNorm -> int8 "
            "fusion needs that slot and stays off (the unfused quant kernel runs)", POST_PASS_KEY, current)
        return False
    if current is None:
        slots[POST_PASS_KEY] = _pass_class()(cfg)
        STATS["installed"] = True
        engine_logger(__name__).info_once("SmoothQuant: RMSNorm -> int8 quant fused (vLLM's "
                                          "rms_norm_dynamic_per_token_quant, additional_config "
                                          "smoothquant.fused_quant=true)", scope="global")
    return True


def fusion_stats(model: torch.nn.Module | None = None) -> dict:
    """``{"installed": bool, "matched": int}`` in this process; use with ``LLM.apply_model``. ``matched`` counts the
    replacements over every graph compiled here (none when vLLM loaded the compiled graphs from its cache)."""
    return dict(STATS)


def _model_epsilons(cfg: Any) -> tuple[float, ...]:
    hf = getattr(getattr(cfg, "model_config", None), "hf_text_config", None)
    own = [getattr(hf, k, None) for k in ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps")]
    return tuple(sorted({*DEFAULT_EPSILONS, *(float(e) for e in own if isinstance(e, (int, float)))}))


_PASS_CLASS = None


def _pass_class():
    """The pass class, defined on first use (vLLM's compilation modules import CUDA-only pieces)."""
    global _PASS_CLASS
    if _PASS_CLASS is None:
        _PASS_CLASS = _define_pass()
    return _PASS_CLASS


def _define_pass():
    import torch._inductor.pattern_matcher as pm
    from torch._higher_order_ops.auto_functionalize import auto_functionalized
    import vllm._custom_ops  # noqa: F401  (registers torch.ops._C)
    from vllm import ir
    from vllm.compilation.passes.inductor_pass import InductorPass, enable_fake_mode
    from vllm.compilation.passes.vllm_inductor_pass import VllmInductorPass

    norm_ops = (torch.ops.vllm_ir.rms_norm.default, torch.ops.vllm_ir.fused_add_rms_norm.default)

    def _arg(node: torch.fx.Node, i: int, name: str):
        return node.args[i] if len(node.args) > i else node.kwargs.get(name)

    def _same_norm(epsilon: float):
        """extra_check of a match: the norm's epsilon is the pattern's (the matcher ignores float arguments), and
        its input and gain have one dtype (the kernel's requirement, as vLLM's fp8 pass checks)."""
        def check(match: pm.Match) -> bool:
            for node in match.nodes:
                if node.target in norm_ops:
                    add = node.target == norm_ops[1]
                    x, w = node.args[0], _arg(node, 2 if add else 1, "weight")
                    eps = _arg(node, 3 if add else 2, "epsilon")
                    if not isinstance(eps, float) or abs(eps - epsilon) > 1e-12 * max(1.0, epsilon):
                        return False
                    if isinstance(x, torch.fx.Node) and isinstance(w, torch.fx.Node):
                        return x.meta["val"].dtype == w.meta["val"].dtype
                    return True
            return False
        return check

    def _quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """vLLM's ``scaled_int8_quant`` (dynamic, symmetric) as it appears in the functionalized graph."""
        quant = torch.ops._C.dynamic_scaled_int8_quant.default
        out_name = quant._schema.arguments[0].name  # "result" (CUDA build), "out" (CPU build)
        result = torch.empty_like(x, dtype=torch.int8)
        scale = torch.empty((x.numel() // x.shape[-1], 1), device=x.device, dtype=torch.float32)
        at = auto_functionalized(quant, **{out_name: result}, input=x, scale=scale, azp=None)
        return at[1], at[2]

    class Int8RMSNormQuantFusionPass(VllmInductorPass):
        """vLLM's RMSNorm + quant fusion for int8 dynamic per-token quant (see the module docstring)."""

        FUSED_OP = torch.ops._C.rms_norm_dynamic_per_token_quant.default if hasattr(
            torch.ops._C, "rms_norm_dynamic_per_token_quant") else None  # CUDA builds of vLLM

        @enable_fake_mode
        def __init__(self, config) -> None:
            super().__init__(config)
            self.epsilons = _model_epsilons(config)
            self.patterns = pm.PatternMatcherPass(pass_name="smoothquant_int8_rmsnorm_quant_fusion")
            kw = dict(device=self.device or "cuda", dtype=torch.bfloat16)
            x, w, r = torch.empty(5, 16, **kw), torch.empty(16, **kw), torch.empty(5, 16, **kw)
            for eps in self.epsilons:  # the residual pattern first: the plain one is a sub-pattern of it in torch ops
                pm.register_replacement(*self._fused_add(eps), [x, w, r], pm.fwd_only, self.patterns,
                                        extra_check=_same_norm(eps))
                pm.register_replacement(*self._plain(eps), [x, w], pm.fwd_only, self.patterns,
                                        extra_check=_same_norm(eps))

        def _plain(self, eps: float):
            def pattern(input: torch.Tensor, weight: torch.Tensor):
                return _quant(ir.ops.rms_norm(input, weight, eps))

            def replacement(input: torch.Tensor, weight: torch.Tensor):
                return self._fused(input, weight, eps, None)[:2]
            return pattern, replacement

        def _fused_add(self, eps: float):
            def pattern(input: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor):
                out, residual = ir.ops.fused_add_rms_norm(input, residual, weight, eps)
                return (*_quant(out), residual)

            def replacement(input: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor):
                return self._fused(input, weight, eps, residual)
            return pattern, replacement

        def _fused(self, input, weight, eps, residual):
            if self.model_dtype is not None:
                input = input.to(dtype=self.model_dtype)  # a native norm's conversions may have been folded away
            result = torch.empty_like(input, dtype=torch.int8)
            scale = torch.empty((input.numel() // input.shape[-1], 1), device=input.device, dtype=torch.float32)
            at = auto_functionalized(self.FUSED_OP, result=result, input=input, weight=weight, scale=scale,
                                     epsilon=eps, scale_ub=None, residual=residual)
            return (at[1], at[2]) if residual is None else (at[1], at[2], at[3])  # int8, scales[, new residual]

        @VllmInductorPass.time_and_log
        def __call__(self, graph: torch.fx.Graph) -> None:
            STATS["matched"] += self.patterns.apply(graph)

        def uuid(self) -> str:
            return InductorPass.hash_dict({"source": self.hash_source(self, _define_pass, _model_epsilons),
                                           "epsilons": list(self.epsilons)})

        def __deepcopy__(self, memo):  # vLLM deep-copies its Inductor config; the pass itself is stateless
            return self

    return Int8RMSNormQuantFusionPass
