"""SmoothQuant W8A8 for vLLM.

``register()`` is the ``vllm.general_plugins`` entry point: vLLM calls it in every
process that builds a model. Importing this package does no work and does not import vLLM.
``quantize`` (the offline quantizer's Python API, ``offline/api.py``) is imported on first use.
"""

__version__ = "0.1.0"

_registered = False


def register() -> None:
    """Register the ``smoothquant`` quantization method with vLLM (idempotent)."""
    global _registered
    if _registered:
        return
    from vllm.model_executor.layers.linear import register_weight_loader_v2_supported_method
    from vllm.model_executor.layers.quantization import register_quantization_config

    from .config import SmoothQuantConfig
    from .linear_method import SmoothQuantLinearMethod

    register_quantization_config("smoothquant")(SmoothQuantConfig)
    register_weight_loader_v2_supported_method(SmoothQuantLinearMethod)
    _registered = True
    _warn_if_untested_vllm()


def _warn_if_untested_vllm() -> None:
    """One warning (not an error) when this vLLM is outside the tested range (``versions.py``)."""
    import vllm

    from .engine_log import engine_logger
    from .versions import untested_warning

    message = untested_warning(getattr(vllm, "__version__", ""))
    if message:
        engine_logger(__name__).warning(message)


def __getattr__(name: str):
    """``vllm_smoothquant.quantize``: the Python API, imported (with torch) only when asked for."""
    if name == "quantize":
        from .offline.api import quantize

        return quantize
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), "quantize"])


__all__ = ["quantize", "register", "__version__"]
