"""minicpm4: the MiniCPM4 system in plain PyTorch.

Public API (see README):
    pipe = minicpm4.from_pretrained(path, dtype="bfloat16", device="cpu")
    pipe.generate("text") / pipe.chat(messages) / pipe.stream(prompt)
Lower level: MiniCPMConfig, MiniCPMForCausalLM, load_model/save_model, Tokenizer, generate().
"""

from minicpm4.api import Completion, Pipeline, demo_pipeline, from_pretrained
from minicpm4.checkpoint import load_model, save_model
from minicpm4.config import MiniCPMConfig, SparseConfig, preset
from minicpm4.generate import decode_one_token, generate, generate_tokens, prefill
from minicpm4.model import MiniCPMForCausalLM, build_model
from minicpm4.sampling import SamplingParams
from minicpm4.tokenizer import StreamDecoder, Tokenizer

__version__ = "0.1.0"

__all__ = [
    "Completion", "MiniCPMConfig", "MiniCPMForCausalLM", "Pipeline", "SamplingParams", "SparseConfig",
    "StreamDecoder", "Tokenizer", "build_model", "decode_one_token", "demo_pipeline", "from_pretrained",
    "generate", "generate_tokens", "load_model", "prefill", "preset", "save_model",
]
