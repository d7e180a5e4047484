"""Logit parity of our model against transformers' Llama with the muP factors folded in.

    .venv/bin/python benchmarks/parity.py            # prints a table, writes benchmarks/results/parity.json
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from minicpm4.config import RopeScaling, minicpm4_05b, tiny
from minicpm4.export.llama import to_transformers_llama
from minicpm4.model import build_model


def errors(ours: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    diff = (ours.float() - ref.float()).abs()
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "max_rel": float(diff.max() / ref.abs().max())}


def main() -> None:
    t = tiny()
    cases = {
        "tiny, LongRoPE short factors": (t, 48),
        "tiny, LongRoPE long factors + attention scaling": (tiny(max_position_embeddings=1024, rope_scaling=RopeScaling(
            t.rope_scaling.long_factor, t.rope_scaling.short_factor, original_max_position_embeddings=64)), 80),
        "0.5B widths, 2 layers": (minicpm4_05b(num_hidden_layers=2), 48),
    }
    rows = []
    for name, (cfg, seq_len) in cases.items():
        model = build_model(cfg, seed=1).eval()
        ids = torch.randint(0, cfg.vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref = to_transformers_llama(model)(ids).logits
            rows.append({"case": name, "dtype": "float32", **errors(model(ids), ref)})
            if "0.5B" in name:
                rows.append({"case": name + " (transformers' own bf16 Llama)", "dtype": "bfloat16",
                             **errors(to_transformers_llama(model, torch.bfloat16)(ids).logits, ref)})
                rows.append({"case": name, "dtype": "bfloat16", **errors(model.to(torch.bfloat16)(ids), ref)})
    print("| case | dtype | max abs | mean abs | max rel |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['dtype']} | {r['max_abs']:.2e} | {r['mean_abs']:.2e} | {r['max_rel']:.2e} |")
    out = Path(__file__).parent / "results" / "parity.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
