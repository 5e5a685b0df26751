"""A checkpoint's safetensors against the SmoothQuant format, read from the files' headers alone.

vLLM calls ``SmoothQuantConfig.maybe_update_config`` once the engine config is built, before any
weight is read; ``check_checkpoint`` then opens each weight file's header (never a tensor's data)
and fails, naming the file or the checkpoint tensor and the fix, on

- a file that is not valid safetensors (truncated, corrupt) or that the index lists and is absent;
- a tensor the format declares for a quantized module and the checkpoint lacks: ``<m>.weight``
  int8 [out, in], ``<m>.weight_scale`` float32 [out, 1] ("channel") or [1] ("tensor"), and
  ``<m>.input_scale`` float32 [1] exactly when ``<m>``'s activations are static (``format.py``; a
  compressed-tensors checkpoint's scales may also be bf16 / fp16, ``SmoothQuantFormat.scale_dtypes``);
  a module is quantized when it has an int8 weight or one of these scales;
- a tensor the format does not expect: an ``input_scale`` of a dynamic module, scales of a module
  whose weight is not int8 or that ``ignore`` keeps unquantized, another method's quantization
  tensors (zero points, GPTQ/AWQ packing, ...), a tensor stored twice;
- a wrong dtype or rank, or a channel scale whose rows differ from its weight's;
- a mixture-of-experts tensor of an expert config.json does not have (``experts.<e>.`` with ``e`` at or above
  ``num_local_experts`` / ``num_experts``): vLLM would drop or misplace it.

Always an error, never a warning: vLLM itself fails on most unknown names, but with a raw
``KeyError`` (Falcon), ``ValueError`` (``AutoWeightsLoader``) or ``AttributeError`` (a fused layer's
``load_weights`` meeting ``input_scale = None``), and drops others silently (zero points and
``g_idx`` in ``AutoWeightsLoader``, a model that skips names it lacks); either way such tensors mean
config.json and the tensors disagree, so the served model would not be the one quantized.
KV-cache scales (``k_scale``, ``v_scale``, ...) are left to vLLM's KV-cache path.

What the headers cannot show (which modules the model has; how many rows vLLM's layer expects; a
fused layer's shard with no tensor at all) the plugin's weight loaders check (``linear_method.py``).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .format import SmoothQuantFormat

logger = logging.getLogger(__name__)

FIX = "re-create the checkpoint with `vllm-smoothquant quantize` (int8 weight [out, in], float32 scales)"
CT_FIX = ("this compressed-tensors checkpoint holds tensors vllm-smoothquant does not run (it serves int8 weights "
          "with float scales); serve it without --quantization smoothquant, or re-create it")
INDEX = "model.safetensors.index.json"
DECLARED = ("weight", "weight_scale", "input_scale")
# Quantization tensors of other methods (compressed-tensors asymmetric/fp4, GPTQ, AWQ, bitsandbytes, fp8 blocks).
FOREIGN = frozenset({
    "weight_zero_point", "input_zero_point", "output_zero_point", "weight_g_idx", "g_idx", "qweight", "qzeros",
    "scales", "weight_packed", "weight_shape", "weight_scale_inv", "weight_scale_2", "weight_global_scale",
    "input_global_scale", "output_scale", "SCB",
})
MAX_LISTED = 12


class CheckpointError(Exception):
    """The checkpoint's files do not hold what its quantization_config declares.

    Not a ``ValueError``: pydantic turns a ``ValueError`` raised while vLLM builds its config (where
    ``check_checkpoint`` runs) into a ``ValidationError`` that loses the type and buries the message.
    """


class CheckpointFileError(CheckpointError):
    """A checkpoint file cannot be read as safetensors, or the index names a file that is absent."""


class CheckpointTensorError(CheckpointError):
    """A checkpoint tensor is missing, unexpected, or does not match the SmoothQuant format."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors' name: "I8", "F32", "BF16", ...
    shape: tuple[int, ...]
    file: str


def weight_files(model_dir: Path) -> list[Path]:
    """The files vLLM loads: those the index names if there is one, else every top-level ``*.safetensors``."""
    index = model_dir / INDEX
    if not index.is_file():
        return sorted(p for p in model_dir.glob("*.safetensors") if p.is_file())
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointFileError(
            f"{index}: not a valid safetensors index ({type(e).__name__}: {e}); copy it again, or {FIX}."
        ) from None
    absent = [n for n in names if not (model_dir / n).is_file()]
    if absent:
        raise CheckpointFileError(
            f"{model_dir}: {', '.join(absent)} listed in {INDEX} but not in the directory (an incomplete copy "
            f"or download?); copy the missing files, or {FIX}."
        )
    return [model_dir / n for n in names]


def read_headers(files: list[Path]) -> tuple[dict[str, TensorInfo], list[str]]:
    """``({tensor name: TensorInfo}, [problems])`` from the files' headers; reads no tensor data."""
    from safetensors import SafetensorError, safe_open

    tensors: dict[str, TensorInfo] = {}
    problems = []
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    s = f.get_slice(name)
                    if name in tensors:
                        problems.append(f"{name}: stored twice, in {tensors[name].file} and {path.name}")
                    tensors[name] = TensorInfo(s.get_dtype(), tuple(s.get_shape()), path.name)
        except (SafetensorError, OSError) as e:
            raise CheckpointFileError(
                f"{path}: cannot be read as safetensors ({e}): the file is truncated or corrupt, e.g. an "
                f"interrupted copy or download. Copy or download it again, or {FIX}."
            ) from None
    return tensors, problems


def find_problems(fmt: SmoothQuantFormat, tensors: Mapping[str, TensorInfo]) -> list[str]:
    """Every way ``tensors`` (checkpoint name -> header info) departs from the format, one line each."""
    modules: dict[str, dict[str, TensorInfo]] = {}
    problems = []
    for name, info in tensors.items():
        module, _, leaf = name.rpartition(".")
        if leaf in DECLARED:
            modules.setdefault(module, {})[leaf] = info
        elif leaf in FOREIGN:
            problems.append(f"{name}: not a tensor of the SmoothQuant format (another quantization method's "
                            f"{leaf!r}); this checkpoint was made by another tool or edited")
    if fmt.rotation_tensor:  # compressed-tensors transforms: the plugin rotates dense linears only
        if experts := sorted(n for n in tensors if _EXPERT.search(n) and f".{fmt.rotation_tensor}." in n):
            problems.append(f"{', '.join(experts[:3])}{' ...' if len(experts) > 3 else ''}: the transform_config "
                            "rotates MoE experts' inputs, which the plugin's fused-MoE method does not do; serve "
                            "this checkpoint without --quantization smoothquant")
    for module, have in sorted(modules.items()):
        weight = have.get("weight")
        scales = [t for t in ("weight_scale", "input_scale") if t in have]
        if not scales and (weight is None or weight.dtype != "I8"):
            continue  # an unquantized module (norm, embedding, lm_head): not the format's business
        if fmt.is_ignored(module):
            int8 = weight is not None and weight.dtype == "I8"
            names = [f"{module}.{t}" for t in (["weight"] if int8 else []) + scales]
            problems.append(f"{', '.join(names)}: unexpected: quantization_config.ignore keeps {module} unquantized "
                            "(an unquantized module has a float weight and no scales)")
            continue
        if weight is not None and weight.dtype != "I8":
            problems.append(f"{module}.weight: dtype {weight.dtype}, but {module} has {' and '.join(scales)}: a "
                            "quantized module needs an int8 (I8) weight, an unquantized one has no scales")
            continue
        static = not fmt.activations_for(module).dynamic
        needed = ["weight", "weight_scale"] + (["input_scale"] if static else [])
        for t in needed:
            if t not in have:
                problems.append(f"{module}.{t}: missing from the checkpoint ({module} is quantized, the checkpoint "
                                f"has its {' and '.join(have)}; the format stores {' + '.join(needed)})")
        if "input_scale" in have and not static:
            problems.append(f"{module}.input_scale: unexpected: quantization_config declares dynamic per-token "
                            f"activations for {module} (a static input_scale belongs to `activations: "
                            "{strategy: tensor, dynamic: false}`)")
        problems += _shape_problems(fmt, module, have)
    return problems


def _shape_problems(fmt: SmoothQuantFormat, module: str, have: dict[str, TensorInfo]) -> list[str]:
    weight, scale, act = have.get("weight"), have.get("weight_scale"), have.get("input_scale")
    out = []
    if weight is not None and len(weight.shape) != 2:
        out.append(f"{module}.weight: shape {list(weight.shape)}, the format declares [out, in]")
    for name, info in (("weight_scale", scale), ("input_scale", act)):
        if info is not None and info.dtype not in fmt.scale_dtypes:
            declared = "float32 (F32)" if fmt.scale_dtypes == ("F32",) else f"one of {', '.join(fmt.scale_dtypes)}"
            out.append(f"{module}.{name}: dtype {info.dtype}, the format declares {declared}")
    if scale is not None:
        channel = fmt.weights.strategy == "channel"
        rows = weight.shape[0] if weight is not None and len(weight.shape) == 2 else None
        want = [rows, 1] if channel else [1]
        ok = len(scale.shape) == len(want) and all(w is None or s == w for s, w in zip(scale.shape, want))
        if not ok:
            decl = f"[{rows if rows is not None else 'out'}, 1] (weights.strategy 'channel')" if channel else \
                "[1] (weights.strategy 'tensor')"
            out.append(f"{module}.weight_scale: shape {list(scale.shape)}, the format declares {decl}")
    if act is not None and act.shape != (1,):
        out.append(f"{module}.input_scale: shape {list(act.shape)}, the format declares [1]")
    return out


_EXPERT = re.compile(r"\.experts\.(\d+)\.")
_EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts")  # config.json's routed-expert count


def expert_problems(tensors: Mapping[str, TensorInfo], hf_config) -> list[str]:
    """Tensors of experts beyond config.json's routed-expert count, one line each."""
    count = next((getattr(hf_config, a) for a in _EXPERT_COUNTS if isinstance(getattr(hf_config, a, None), int)),
                 None)
    if count is None:
        return []
    return [f"{name}: expert {int(m[1])}, but config.json declares {count} experts (0..{count - 1}): the weights and "
            "config.json come from different models" for name in sorted(tensors)
            if (m := _EXPERT.search(name)) and int(m[1]) >= count]


def check_checkpoint(model: str, fmt: SmoothQuantFormat, hf_config=None) -> None:
    """Fail before loading if the local checkpoint ``model`` does not follow the format (see the module doc).

    A hub id (not a local directory) is skipped: its files are fetched later, by vLLM's loader, whose
    per-tensor checks (``linear_method.py``) still apply. So is a directory with no safetensors files
    (``--load-format dummy`` on a config-only directory; otherwise vLLM reports no weights itself).
    """
    model_dir = Path(model)
    if not model_dir.is_dir():
        logger.debug("SmoothQuant header check skipped: %s is not a local directory", model)
        return
    files = weight_files(model_dir)
    if not files:
        return
    tensors, problems = read_headers(files)
    problems += find_problems(fmt, tensors)
    if hf_config is not None:
        problems += expert_problems(tensors, getattr(hf_config, "get_text_config", lambda: hf_config)())
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems[:MAX_LISTED])
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        kind, fix = (("compressed-tensors checkpoint", CT_FIX) if fmt.compressed_tensors else
                     ("SmoothQuant checkpoint", FIX))
        raise CheckpointTensorError(
            f"{kind} {model_dir} does not match its quantization_config, found "
            f"before loading any weight:\n{listed}{more}\nFix: {fix}."
        )
