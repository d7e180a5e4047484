"""Engine settings: one typed value, validated where it is built."""

from __future__ import annotations

from dataclasses import dataclass, replace

from minicpm4.speculative.config import SpeculativeConfig


@dataclass
class EngineConfig:
    # Tokens per KV page. None: the model's InfLLM v2 block size when it is sparse (a sparse block is then
    # one page, and its C1/C2 compressed keys, strides 16 / 64, tile pages exactly), else 64 (the
    # MiniCPM4 sparse block, MINICPM4.md §3.2, so dense and sparse runs share a page size).
    block_size: int | None = None
    # KV pages in the pool; None: enough for `kv_cache_tokens`.
    num_kv_blocks: int | None = None
    kv_cache_tokens: int = 32768
    max_num_seqs: int = 64  # running requests at most
    # Tokens processed per step, prefill chunks and decodes together (the scheduler's budget).
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None  # prompt + generated tokens; None: the model's max_position_embeddings
    enable_prefix_caching: bool = True  # reuse full KV pages of an identical prefix (block hashing)
    enable_chunked_prefill: bool = True  # split long prompts over steps (else a prompt is prefilled in one step)
    max_waiting: int = 1024  # queued requests at most; adding more raises QueueFullError (HTTP 429)
    fast_forward: bool = True  # FastDecoder (fused weights) instead of the model's own forward
    speculative: SpeculativeConfig | None = None  # draft + tree settings (minicpm4/speculative/); None: off
    # Requests whose draft trees one step verifies at most (the rest decode plainly that step): bounds the
    # step's size (tree_size rows per tree) under many concurrent requests.
    spec_max_seqs: int = 16

    def __post_init__(self) -> None:
        def positive(name: str) -> None:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"EngineConfig.{name} must be a positive integer, got {value!r}")

        for name in ("block_size", "num_kv_blocks", "kv_cache_tokens", "max_num_seqs", "max_num_batched_tokens",
                     "max_model_len", "max_waiting", "spec_max_seqs"):
            positive(name)

    def resolved(self, sparse_block_size: int | None) -> EngineConfig:
        """This config with block_size decided for a model (sparse_block_size: its InfLLM v2 block, if any)."""
        if self.block_size is not None:
            return self
        return replace(self, block_size=sparse_block_size or 64)

    def num_blocks(self) -> int:
        assert self.block_size is not None, "EngineConfig.resolved() decides block_size first"
        return self.num_kv_blocks or -(-self.kv_cache_tokens // self.block_size)
