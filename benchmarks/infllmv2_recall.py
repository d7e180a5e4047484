"""Attention recall of InfLLM v2 block selection on a real model's attention.

For sampled query positions of a long input, per layer and query head: the fraction of the DENSE
attention probability mass that falls on the keys the sparse layer attends (`stage2_mask`: selected
blocks, the local window and the query's own block, causal). 1.0 = the sparse layer sees everything that
mattered. The model runs dense; q/k are recorded at the attention seam, selection runs on them with
the config's sparse settings (or the README defaults).

    .venv/bin/python benchmarks/infllmv2_recall.py MODEL_DIR --context 32768 --text long.txt
    .venv/bin/python benchmarks/infllmv2_recall.py minicpm4/assets/default-model --context 4096 \
        --corpus-jsonl build/data/corpus/val.jsonl --sources bible,foldoc,jargon   # after `make corpus`
    .venv/bin/python benchmarks/infllmv2_recall.py --demo    # tiny RANDOM model, small blocks

Recall is only meaningful for trained weights: random weights give near-uniform attention, so the
demo's number is about the fraction of tokens attended, not about selection quality. Without --text
the input is random token ids, which also makes attention unrepresentative; pass real text.
Writes JSON to benchmarks/results/infllmv2_recall.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

from minicpm4.attention.dense import DenseAttention
from minicpm4.attention.infllmv2.compress import compress_keys
from minicpm4.attention.infllmv2.selection import select_blocks
from minicpm4.attention.infllmv2.settings import InfLLMv2Settings, settings_from_config
from minicpm4.attention.infllmv2.sparse_attention import stage2_mask
from minicpm4.attention.metadata import AttentionMetadata


class RecordingDense(DenseAttention):
    """Dense attention that keeps, per layer, the keys [Hkv, T, D] and the queries [Hq, nq, D] of the
    sampled positions (post-RoPE; pre-RoPE too when selection uses them)."""

    def __init__(self, query_positions: torch.Tensor, use_nope: bool) -> None:
        self.query_positions = query_positions
        self.needs_pre_rope = use_nope
        self.records: dict[int, dict[str, torch.Tensor]] = {}

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 meta: AttentionMetadata, pre_rope=None) -> torch.Tensor:
        qp = self.query_positions
        rec = {"q": q[0, :, qp].float(), "k": k[0].float()}
        if self.needs_pre_rope:
            q0, k0 = pre_rope
            rec["q_sel"], rec["k_sel"] = q0[0, :, qp].float(), k0[0].float()
        self.records[layer_idx] = rec
        return super().__call__(layer_idx, q, k, v, meta, pre_rope)


def layer_recall(rec: dict[str, torch.Tensor], positions: torch.Tensor, s: InfLLMv2Settings) -> torch.Tensor:
    """-> [Hq, nq]: dense probability mass inside the attended keys."""
    q, k = rec["q"], rec["k"]  # [Hq, nq, D], [Hkv, L, D]
    Hq, _, D = q.shape
    Hkv, L, _ = k.shape
    G = Hq // Hkv
    q_sel, k_sel = rec.get("q_sel", q), rec.get("k_sel", k)
    c1 = compress_keys(k_sel, s.kernel_size, s.kernel_stride)
    c2 = compress_keys(k_sel, s.coarse_kernel_size, s.coarse_kernel_stride) if s.lse == "coarse" else None
    block_idx = select_blocks(q_sel, c1, c2, positions, L, s)  # [Hkv, nq, K]
    keep = stage2_mask(positions, block_idx, L, s).repeat_interleave(G, dim=0)  # [Hq, nq, L]: what stage 2 attends
    scores = torch.einsum("hqd,hld->hql", q, k.repeat_interleave(G, dim=0)) / math.sqrt(D)
    causal = torch.arange(L)[None, :] <= positions[:, None]
    probs = scores.masked_fill(~causal[None], float("-inf")).softmax(-1)
    return (probs * keep).sum(-1)


def corpus_text(path: Path, sources: list[str] | None) -> str:
    """The documents of a corpus split file (DIR/{train,val}.jsonl) joined by blank lines: the given sources in
    that order, else all."""
    from minicpm4.data.corpus import iter_corpus

    docs = list(iter_corpus(path.parent, path.stem))
    groups = [[d for d in docs if d.source == s] for s in sources] if sources else [docs]
    return "\n\n".join(d.text for group in groups for d in group)


def demo_model_dir(path: Path) -> Path:
    """A tiny random checkpoint with small sparse settings (block 16, kernels 8/4, 2 local + 4 chosen)."""
    import minicpm4
    from minicpm4.config import tiny
    from minicpm4.model import build_model

    cfg = tiny(initializer_range=0.3, max_position_embeddings=4096).with_sparse(
        True, block_size=16, kernel_size=8, kernel_stride=4, window_size=32, topk=4, dense_len=-1)
    minicpm4.save_model(build_model(cfg, seed=0), path)
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", nargs="?", help="Hugging Face MiniCPM4 folder")
    p.add_argument("--demo", action="store_true", help="use a tiny random model (recall NOT meaningful)")
    p.add_argument("--context", type=int, default=None, help="input tokens (default 32768; --demo: 2048)")
    p.add_argument("--queries", type=int, default=32, help="query positions, evenly spaced over the second half")
    p.add_argument("--text", default=None, help="UTF-8 text file for the input (repeated to --context tokens)")
    p.add_argument("--corpus-jsonl", default=None,
                   help="input from a corpus JSONL (e.g. build/data/corpus/val.jsonl): its documents' text, joined")
    p.add_argument("--sources", default=None,
                   help="with --corpus-jsonl: comma-separated sources, in this order (default: all, file order)")
    p.add_argument("--sparse-variant", default=None)
    p.add_argument("--sparse-config", default=None, metavar="JSON",
                   help="sparse_config keys overriding the model's (or the README defaults), e.g. to score a "
                        "dense-trained model with the budget another model was trained with")
    p.add_argument("--lse", choices=["exact", "coarse"], default="exact")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "infllmv2_recall.json"))
    args = p.parse_args(argv)

    from minicpm4.checkpoint import load_model

    if args.demo:
        import tempfile

        model_dir = demo_model_dir(Path(tempfile.mkdtemp(prefix="infllmv2-recall-demo-")))
    elif args.model_dir:
        model_dir = Path(args.model_dir)
    else:
        p.error("give MODEL_DIR or --demo")
    if args.context is None:
        args.context = 2048 if args.demo else 32768
    model = load_model(model_dir, dtype={"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]).eval()
    cfg = model.config.with_sparse(True, variant=args.sparse_variant, **json.loads(args.sparse_config or "{}"))
    settings = settings_from_config(cfg.sparse_config, variant=cfg.sparse_config.extra.get("variant", "hf"), lse=args.lse)

    if args.text or args.corpus_jsonl:
        from minicpm4.tokenizer import Tokenizer

        text = (Path(args.text).read_text(encoding="utf-8") if args.text
                else corpus_text(Path(args.corpus_jsonl), args.sources.split(",") if args.sources else None))
        ids = Tokenizer.from_pretrained(model_dir).encode(text)
        ids = (ids * math.ceil(args.context / len(ids)))[: args.context]
        source = (f"text file {args.text}" if args.text else
                  f"{args.corpus_jsonl} documents ({args.sources or 'all sources'}), joined in order")
    else:
        ids = torch.randint(4, cfg.vocab_size, (args.context,), generator=torch.Generator().manual_seed(0)).tolist()
        source = "random token ids (unrepresentative attention; pass --text)"
    T = len(ids)
    positions = torch.linspace(T // 2, T - 1, args.queries).round().long().unique()
    recorder = RecordingDense(positions, settings.use_nope)
    model.set_attention_backend(recorder)
    with torch.inference_mode():
        model(torch.tensor([ids]))
        per_layer = {i: layer_recall(rec, positions, settings) for i, rec in sorted(recorder.records.items())}

    layers = []
    for i, r in per_layer.items():  # r [Hq, nq]
        layers.append({"layer": i, "mean": r.mean().item(), "min": r.min().item(),
                       "per_head_mean": [round(x, 4) for x in r.mean(1).tolist()]})
        print(f"layer {i:2d}: mean recall {r.mean():.4f}, min {r.min():.4f}, heads "
              + " ".join(f"{x:.3f}" for x in r.mean(1).tolist()))
    all_r = torch.stack(list(per_layer.values()))
    budget = settings.max_blocks * settings.block_size
    result = {
        "command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
        "model": "tiny RANDOM demo model (recall not meaningful)" if args.demo else str(model_dir),
        "input": source, "context": T, "query_positions": positions.tolist(), "settings": repr(settings),
        "approx_attended_fraction": min(1.0, budget / T),
        "mean_recall": all_r.mean().item(), "median_recall": statistics.median(all_r.flatten().tolist()),
        "min_recall": all_r.min().item(), "layers": layers,
    }
    print(f"overall mean recall {result['mean_recall']:.4f} (median {result['median_recall']:.4f}); "
          f"the sparse layer attends about {100 * result['approx_attended_fraction']:.1f}% of the keys")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
