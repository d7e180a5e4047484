"""The inference engine (the CPM.cu counterpart, in nano-vllm's shape): paged KV with prefix reuse, a
pure-Python scheduler with chunked prefill and preemption, a batched model runner, per-request sampling.

    sequence.py       one request's state            block_manager.py  pages, block tables, prefix hashing
    scheduler.py      tokens per request per step    runner.py         one packed forward per step
    fast_forward.py   fused-weight decoder forward   sampler.py        per-request sampling + logprobs
    text.py           detokenization, stop strings   llm_engine.py     the step loop
    llm.py            LLM facade                     async_llm.py      asyncio API for the server

Speculative decoding (EngineConfig.speculative, minicpm4/speculative/): a decode step drafts a tree per request,
verifies every tree of the step in the same packed forward and keeps the accepted tokens' K/V.
"""

from minicpm4.engine.config import EngineConfig
from minicpm4.engine.llm import LLM
from minicpm4.engine.async_llm import AsyncLLM
from minicpm4.engine.llm_engine import EngineStats, LLMEngine, QueueFullError
from minicpm4.engine.outputs import RequestMetrics, RequestOutput, TokenLogprob
from minicpm4.sampling import SamplingParams
from minicpm4.speculative.config import SpeculativeConfig
from minicpm4.speculative.tree import TreeShape

__all__ = ["AsyncLLM", "EngineConfig", "EngineStats", "LLM", "LLMEngine", "QueueFullError", "RequestMetrics", "RequestOutput",
           "SamplingParams", "SpeculativeConfig", "TokenLogprob", "TreeShape"]
