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
import math
import shutil
from pathlib import Path

import numpy as np
import torch

from minicpm4.api import Pipeline, from_pretrained
from minicpm4.checkpoint import load_model, save_model
from minicpm4.config import write_text_atomic
from minicpm4.model import MiniCPMForCausalLM
from minicpm4.tokenizer import Tokenizer
from minicpm4.train.chat_eval import read_heldout, score_generations

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
    """ScalingBench-style indicator: mean NLL per token of the gold answer (+ <|im_end|>) given the
    ChatML question, over held-out rows (MINICPM4.md §6.5)."""
    total, count = 0.0, 0
    for row in rows[:limit]:
        prompt = tokenizer.encode_chat([{"role": "user", "content": row.question}], add_generation_prompt=True)
        answer = tokenizer.encode(row.answer, add_bos=False) + [tokenizer.eos_token_id]
        ids = torch.tensor([prompt + answer])
        logits = model(ids[:, :-1])[0, len(prompt) - 1:]
        total += float(torch.nn.functional.cross_entropy(logits, ids[0, len(prompt):], reduction="sum"))
        count += len(answer)
    return total / count


def evaluate_chat(pipe: Pipeline, heldout: Path, task: str, generations: int) -> dict:
    rows = read_heldout(heldout, task=task)
    gen = score_generations(pipe, rows[:generations])
    return {"task": task, "answer_nll": answer_nll(pipe.model, pipe.tokenizer, rows), "answer_nll_rows": min(len(rows), 200),
            "greedy_f1": gen["mean_f1"], "greedy_rows": gen["rows"], "examples": gen["examples"][:3]}


def package(run: Path, data: Path, out: Path, generations: int = 64) -> dict:
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
    write_text_atomic(tmp / "eval.json", json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, default=Path("runs/default"))
    p.add_argument("--data", type=Path, default=Path("build/data"))
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "assets" / "default-model")
    p.add_argument("--generations", type=int, default=64)
    args = p.parse_args()
    results = package(args.run, args.data, args.out, args.generations)
    print(json.dumps({k: v for k, v in results.items() if k != "heldout_definitions"}, indent=2))
    for name, r in results["heldout_definitions"].items():
        print(f"{name}: answer NLL {r['answer_nll']:.3f} nats/token, greedy F1 {r['greedy_f1']:.3f}")


if __name__ == "__main__":
    main()
