"""Do GPTQ-aware tools read our INT4 files? Writes a Llama-shaped GPTQ folder with minicpm4's quantizer and
reads it back with transformers + optimum + gptqmodel (their own unpacking), comparing logits.

    .venv/bin/python benchmarks/gptq_interop.py write OUT          # our side (muP constants set to 1: a plain Llama)
    OTHER_VENV/bin/python benchmarks/gptq_interop.py read OUT      # transformers' side, e.g. a venv with
                                                                   # transformers, optimum, gptqmodel (CPU)
Writes OUT/ours_logits.pt, then OUT/result.json (max |logit difference| relative to the largest logit).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch


def write(out: Path) -> None:
    from safetensors.torch import save_file

    from minicpm4.config import MiniCPMConfig
    from minicpm4.export.llama import llama_config_dict
    from minicpm4.model import build_model
    from minicpm4.quant import GPTQConfig, quantize_

    L, H = 2, 128
    # muP factors all 1 (scale_emb 1, residual scale_depth / sqrt(L) = 1, logit divisor H / dim_model_base = 1) and
    # an untied head: the forward is a plain Llama, so a Llama GPTQ folder holds exactly our tensors.
    cfg = MiniCPMConfig(vocab_size=256, hidden_size=H, intermediate_size=256, num_hidden_layers=L,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        scale_emb=1.0, scale_depth=math.sqrt(L), dim_model_base=H, tie_word_embeddings=False,
                        bos_token_id=1, eos_token_id=2)
    model = build_model(cfg, seed=0)
    calib = [torch.randint(3, 256, (64,), generator=torch.Generator().manual_seed(i)) for i in range(8)]
    quantize_(model, GPTQConfig(group_size=32, act_order=True), calibration=calib)
    ids = torch.randint(3, 256, (1, 16), generator=torch.Generator().manual_seed(99))
    out.mkdir(parents=True, exist_ok=True)
    dense = build_model(cfg, seed=0)  # the same packed weights, dequantized into plain nn.Linear: W4 exactly
    with torch.no_grad():
        for name, m in model.named_modules():
            if hasattr(m, "dequantize") and name:
                dense.get_submodule(name).weight.copy_(m.dequantize())
        torch.save({"ids": ids, "logits": model(ids), "dequantized_logits": dense(ids)}, out / "ours_logits.pt")
    llama = {**llama_config_dict(model), "architectures": ["LlamaForCausalLM"], "model_type": "llama",
             "torch_dtype": "float16", "quantization_config": model.config.extra["quantization_config"]}
    (out / "config.json").write_text(json.dumps(llama, indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors", {"format": "pt"})
    print(f"wrote {out}")


def read(out: Path) -> None:
    import transformers

    saved = torch.load(out / "ours_logits.pt")
    model = transformers.AutoModelForCausalLM.from_pretrained(out, device_map="cpu", dtype=torch.float16)
    with torch.no_grad():
        theirs = model(saved["ids"]).logits.float().detach()
    def rel(a, b) -> float:
        return float((a - b).abs().max() / b.abs().max())

    kinds = sorted({type(m).__name__ for m in model.modules()
                    if "Linear" in type(m).__name__ and type(m) is not torch.nn.Linear})
    result = {"transformers": transformers.__version__, "their_linear_modules": kinds,
              "vs_our_dequantized_weights_fp32": rel(theirs, saved["dequantized_logits"]),
              "vs_our_packed_forward": rel(theirs, saved["logits"]),
              "our_packed_vs_dequantized": rel(saved["logits"], saved["dequantized_logits"])}
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    {"write": write, "read": read}[sys.argv[1]](Path(sys.argv[2]))
