"""The embedded `hf` engine: continuous batching on a transformers causal LM (nano-vllm's shape).

``sequence`` (a request's state) -> ``engine`` (the scheduler and the loop) -> ``model_runner`` (owns the device, runs
prefill/decode, CUDA graphs) with ``kv_cache`` (KV rows, decode attention) and ``sampler``.
``areal_hpc.inference.http_server`` puts SGLang's HTTP API in front.
"""

from areal_hpc.inference.hf_engine.engine import LLMEngine
from areal_hpc.inference.hf_engine.model_runner import ModelRunner
from areal_hpc.inference.hf_engine.sequence import SamplingParams, Sequence

__all__ = ["LLMEngine", "ModelRunner", "SamplingParams", "Sequence"]
