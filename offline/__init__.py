"""Offline side of vllm-smoothquant: calibrate, smooth, quantize and export a checkpoint.

Modules, one job each: ``mappings`` (which norm/linear feeds which linears, per architecture),
``calibration`` (text -> token windows -> per-channel input absmax), ``smoothing`` (the
migration math and its apply step), ``layer_smoothing`` (one layer's groups), ``quantization``
(int8 weights), ``gptq`` (error-compensating int8 rounding), ``experts`` (mixture-of-experts blocks as
per-expert linears), ``kv_stats`` (fp8 KV-cache scales), ``options`` (QuantizeOptions and their checks), ``loading`` (the model, layer by
layer), ``export`` (atomic safetensors checkpoint, written as it goes), ``report`` (time and
memory), ``pipeline`` (the steps in order), ``harness`` (the one way to build a
vLLM engine, read its logprobs, keep its log in a file and record provenance), ``evaluate`` (perplexity
through vLLM), ``assets`` (the embedded default model and texts), ``api`` (the Python API: ``quantize`` with
the CLI's options as keywords), ``cli``.
"""
