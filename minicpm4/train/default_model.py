"""Package the bundled default model: weights (bf16 safetensors), tokenizer, a slice of validation tokens,
measured numbers (eval.json) and the model card.

    .venv/bin/python -m minicpm4.train.default_model --run runs/default --data build/data --out minicpm4/assets/default-model

The validation loss in eval.json is computed here exactly as `validation_loss` computes it in the tests
(the shipped weights, loaded with the default dtype, over the shipped validation tokens), so the test
"the shipped model matches its card" needs nothing outside the package.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch

from minicpm4.api import Pipeline, from_pretrained
from minicpm4.checkpoint import load_model, save_model
from minicpm4.io import write_text_atomic
from minicpm4.model import MiniCPMForCausalLM
from minicpm4.tokenizer import Tokenizer
from minicpm4.train.chat_eval import read_heldout, score_generations
from minicpm4.train.trainer import TrainModule
from minicpm4.train.tunnel import mean_nll, scalingbench_set

VAL_TOKENS_FILE = "val_tokens.npy"
VAL_SEQ_LEN = 256
VAL_NUM_TOKENS = 65_536  # 256 windows of 256: ~0.4% standard error on the mean loss, 128 KB as uint16
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@torch.no_grad()
def validation_loss(model: MiniCPMForCausalLM, tokens: np.ndarray, seq_len: int = VAL_SEQ_LEN, batch: int = 16) -> float:
    """Mean next-token NLL over consecutive non-overlapping windows of `tokens` (deterministic)."""
    n = len(tokens) // seq_len
    windows = torch.from_numpy(tokens[: n * seq_len].astype(np.int64)).view(n, seq_len)
    total, count = 0.0, 0
    for start in range(0, n, batch):
        ids = windows[start:start + batch]
        logits = model(ids[:, :-1])
        total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"))
        count += ids[:, 1:].numel()
    return total / count


@torch.no_grad()
def answer_nll(model: MiniCPMForCausalLM, tokenizer: Tokenizer, rows, limit: int = 200) -> float:
    """ScalingBench-style indicator (MINICPM4.md §6.5): mean NLL per token of the gold answer given the
    ChatML question, over `limit` held-out rows; the same measure ModelTunnel reports (tunnel.py)."""
    conversations = [[{"role": "user", "content": r.question}, {"role": "assistant", "content": r.answer}] for r in rows]
    data = scalingbench_set(conversations, tokenizer, seq_len=512, limit=limit)
    return mean_nll(TrainModule(model), data, range(len(data)), batch_size=8)


def evaluate_chat(pipe: Pipeline, heldout: Path, task: str, generations: int, nll_rows: int = 200) -> dict:
    rows = read_heldout(heldout, task=task)
    gen = score_generations(pipe, rows[:generations])
    return {"task": task, "answer_nll": answer_nll(pipe.model, pipe.tokenizer, rows, nll_rows),
            "answer_nll_rows": min(len(rows), nll_rows),
            "greedy_f1": gen["mean_f1"], "greedy_rows": gen["rows"], "examples": gen["examples"][:3]}


def model_card(r: dict, note: str = "") -> str:
    """The model card: data, recipe, exact commands, measured numbers, what it can and cannot do."""
    h = r["heldout_definitions"]
    stages = "\n".join(f"| {name} | {s['steps']} | {s['tokens']:,} | {s['final_train_loss']:.3f} | "
                       f"{'' if s['final_val_loss'] is None else format(s['final_val_loss'], '.3f')} |"
                       for name, s in r["stages"].items())
    examples = "\n".join(f"- Q: {e['question']}\n  - gold: {e['gold']}\n  - model: {e['answer']!r} (F1 {e['f1']:.2f})"
                         for e in h["final"]["examples"])
    return f"""# minicpm4 default model

A {r['parameters']:,}-parameter MiniCPM4-architecture model (4 layers, hidden 192, 3 query heads on 1 KV head,
head_dim 64 with MiniCPM4-0.5B's LongRoPE factors, muP constants scale_emb 12 / scale_depth 1.4 /
dim_model_base 256, tied embeddings, vocab 8,192), trained from scratch on a 2-core AVX2 CPU by this
project's own pipeline. Weights: bf16 safetensors. It exists so that every minicpm4 command works
offline on a fresh machine; it is a toy, not a useful assistant.

## Data
The offline corpus of `make corpus` (WordNet, GCIDE, KJV Bible, FOLDOC, Jargon File, V.E.R.A., The
Devil's Dictionary, fortunes; licences in minicpm4/data/corpus.py), 22.9 M training tokens, and the SFT
set of `minicpm4 data build-sft` (dictionary, synonym, usage, verse tasks; held out by word/verse).

## Recipe (exact commands: `make default-model`, which runs these stages from the Makefile)
1. pretrain: `minicpm4 train pretrain` — muP, WSD (lr 5e-3, 10 warmup steps, exponential decay over the
   last 60 of 600 steps), MTP head (lambda 0.3), 16 x 256 tokens per step. (It first ran as a 200-step
   run; WSD let it continue from that run's step-180 checkpoint, taken before the decay began.)
2. long context: `minicpm4 train long` — 4,096-token sequences with InfLLM v2 sparse attention switched on,
   sparse_config scaled down from the report's 32K stage in the same proportions (block 64, kernels 32/16,
   top-8 blocks incl. the initial block + a 256-token window = 19% of the keys at 4K; dense below 1,024
   tokens), 30 steps of 4 x 4,096 tokens, lr 2e-3, attention crossing the packed documents (the corpus has
   no 4K-token documents; packed in corpus order, a window is contiguous Bible chapters or neighbouring
   dictionary entries). The model keeps this sparse_config: prompts longer than
   1,024 tokens run InfLLM v2 at inference too (`--sparse off` turns it off).
3. SFT: `minicpm4 train sft` on the chat set (loss on assistant tokens only), 150 steps of 16 x 256 tokens, lr 3e-3.

| stage | steps | tokens seen | final train loss | final val loss |
|---|---|---|---|---|
{stages}

{note}

## Measured (`.venv/bin/python -m minicpm4.train.default_model`, numbers in eval.json)
- Validation loss of the shipped weights on the shipped validation tokens ({r['val_tokens']:,} tokens of
  the corpus validation split, windows of {r['val_seq_len']}): **{r['val_loss']:.4f}** nats/token.
  `tests/test_default_model.py` recomputes it.
- Held-out definition questions ("What does WORD mean?" for words never asked in SFT training):

| model | answer NLL (nats/token, {h['final']['answer_nll_rows']} questions) | greedy answer F1 ({h['final']['greedy_rows']} questions) |
|---|---|---|
| pretrained only | {h['pretrained_only']['answer_nll']:.3f} | {h['pretrained_only']['greedy_f1']:.3f} |
| shipped (after SFT) | {h['final']['answer_nll']:.3f} | {h['final']['greedy_f1']:.3f} |

Answer NLL is the ScalingBench-style indicator (loss of the gold answer given the ChatML question);
F1 is word overlap of the greedy answer with the gold definition.

Examples (greedy):
{examples}

## What it can and cannot do
It has learned the shape of dictionary entries and of the chat format, and answers in that shape; its
definitions are mostly wrong or generic, because {r['parameters'] / 1e6:.1f} M parameters trained on well
under one epoch of the corpus cannot memorise a dictionary. It knows no facts beyond its corpus, no
Chinese, no code. Use it to exercise the software, not for answers.
"""


def package(run: Path, data: Path, out: Path, generations: int = 64, note: str = "") -> dict:
    final = run / "sft" / "final"
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(load_model(final, dtype=torch.float32), tmp, dtype=torch.bfloat16)
    for name in TOKENIZER_FILES:
        shutil.copy(final / name if (final / name).exists() else data / "tokenizer" / name, tmp / name)
    (tmp / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": [2, 3], "do_sample": False}, indent=2) + "\n")
    val = np.fromfile(data / "shards" / "val.bin", dtype=np.uint16)[:VAL_NUM_TOKENS]
    np.save(tmp / VAL_TOKENS_FILE, val)

    shipped = from_pretrained(tmp)  # what users and the tests load
    results = {"val_loss": validation_loss(shipped.model, val), "val_tokens": int(len(val)), "val_seq_len": VAL_SEQ_LEN,
               "parameters": shipped.model.num_parameters(), "stages": {}}
    for stage in ("pretrain", "long", "sft"):
        metrics = run / stage / "metrics.jsonl"
        if metrics.exists():
            lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
            evals = [x for x in lines if "val_loss" in x]
            last_train = [x for x in lines if "loss" in x][-1]
            results["stages"][stage] = {"steps": last_train.get("step"), "final_train_loss": last_train["loss"],
                                        "final_val_loss": evals[-1]["val_loss"] if evals else None,
                                        "tokens": last_train.get("tokens")}
    heldout = data / "sft" / "heldout.jsonl"
    pretrained = from_pretrained(run / "pretrain" / "final")
    results["heldout_definitions"] = {
        "pretrained_only": evaluate_chat(pretrained, heldout, "definition", generations),
        "final": evaluate_chat(shipped, heldout, "definition", generations),
    }
    publish(tmp, out, results, model_card(results, note))
    return results


def publish(tmp: Path, out: Path, results: dict, card: str) -> None:
    """Finish a model folder built in `tmp` (eval.json + README.md) and move it to `out` in one rename, so a
    failed packaging never leaves a half-written asset folder behind."""
    write_text_atomic(tmp / "eval.json", json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    write_text_atomic(tmp / "README.md", card)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, default=Path("runs/default"))
    p.add_argument("--data", type=Path, default=Path("build/data"))
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "assets" / "default-model")
    p.add_argument("--generations", type=int, default=64)
    p.add_argument("--note", default="", help="a paragraph for the model card (e.g. how this run differed)")
    args = p.parse_args()
    results = package(args.run, args.data, args.out, args.generations, args.note)
    print(json.dumps({k: v for k, v in results.items() if k != "heldout_definitions"}, indent=2))
    for name, r in results["heldout_definitions"].items():
        print(f"{name}: answer NLL {r['answer_nll']:.3f} nats/token, greedy F1 {r['greedy_f1']:.3f}")


if __name__ == "__main__":
    main()
