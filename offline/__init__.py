"""Offline side of vllm-smoothquant: calibrate, smooth, quantize and export a checkpoint.

Modules, one job each: ``mappings`` (which norm/linear feeds which linears, per architecture),
``calibration`` (text -> token windows -> per-channel input absmax), ``smoothing`` (the
migration math and its apply step), ``quantization`` (int8 weights), ``export`` (atomic
safetensors checkpoint), ``pipeline`` (the steps in order), ``evaluate`` (perplexity through
vLLM), ``assets`` (the embedded default model and texts), ``cli``.
"""
