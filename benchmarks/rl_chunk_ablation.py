"""The report's chunk-wise rollout ablation (MINICPM4.md §7.3's table) at our scale: vanilla synchronous rollout vs
chunk lengths of 1/2, 1/4 and 1/8 of the maximum response length — step time, rollout time, final reward.

    .venv/bin/python benchmarks/rl_chunk_ablation.py [--steps 40] [--seeds 0,1] [--max-len 128] [--threads 1]

Task (nothing downloaded): a small randomly initialised MiniCPM4 (vocab 256, 4 layers, hidden 128, head dim 16); 8 prompts of
token ids; reward 1 when the response starts with one of 32 target tokens (1/8 of the vocabulary at init). Response
lengths are set by when the policy samples one of its 2 EOS ids — geometric at init (mean about 128 tokens), a long
tail cut at the maximum (256; truncated responses are filtered from the loss): the distribution that stalls
synchronous rollouts, where every step waits for its longest response.
Same RLConfig for every system except chunk_tokens (the trainer's vanilla mode is chunk = max length).
Metrics per run: mean step and rollout seconds, reward over the last 10 steps, updates done, wall time;
medians over seeds. Writes benchmarks/results/rl_chunk_ablation.json and .png.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS_DIR, command_line, machine_info, median, publish  # noqa: E402

from minicpm4.config import tiny  # noqa: E402
from minicpm4.model import MiniCPMForCausalLM  # noqa: E402
from minicpm4.train.rl.toy import FirstTokenTask  # noqa: E402
from minicpm4.train.rl.trainer import RLConfig, RLTrainer  # noqa: E402



def run(chunk: int | None, seed: int, args) -> dict:
    model = MiniCPMForCausalLM(tiny(vocab_size=args.vocab, hidden_size=128, intermediate_size=320, num_attention_heads=8,
                                    num_hidden_layers=4, max_position_embeddings=args.max_len + 16))
    model.init_weights(torch.Generator().manual_seed(seed))
    cfg = RLConfig(steps=args.steps, prompts_per_step=8, group_size=8, train_groups=4, max_response_tokens=args.max_len,
                   chunk_tokens=chunk, lr=args.lr, seed=seed, save_every=10**9)
    with tempfile.TemporaryDirectory() as out:
        trainer = RLTrainer(model, FirstTokenTask(set(range(16, 16 + args.vocab // 8))), cfg, out, log=False)
        t0 = time.perf_counter()
        records = trainer.train()
        wall = time.perf_counter() - t0
    rewards = [r["reward"] for r in records if "reward" in r]
    lengths = [r["response_tokens"] for r in records if "response_tokens" in r]
    return {"chunk": chunk or args.max_len, "seed": seed, "wall_s": wall,
            "step_s": sum(r["step_s"] for r in records) / len(records),
            "rollout_s": sum(r["rollout_s"] for r in records) / len(records),
            "update_s": sum(r.get("update_s", 0) + r.get("score_s", 0) for r in records) / len(records),
            "final_reward": sum(rewards[-10:]) / max(len(rewards[-10:]), 1),
            "updates": trainer.counters.version, "mean_response_tokens": sum(lengths) / max(len(lengths), 1),
            "curve": [(r["step"], r.get("reward")) for r in records]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=256, help="2 of its ids are EOS: mean free length vocab / 2")
    ap.add_argument("--lr", type=float, default=3e-2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS_DIR / "rl_chunk_ablation.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    chunks = [None, args.max_len // 2, args.max_len // 4, args.max_len // 8]
    runs = []
    for seed in seeds:  # systems interleaved per seed: host noise hits them alike
        for chunk in chunks:
            r = run(chunk, seed, args)
            runs.append(r)
            print(f"chunk {r['chunk']:4d} seed {seed}: step {r['step_s']:.3f}s rollout {r['rollout_s']:.3f}s "
                  f"final reward {r['final_reward']:.3f} ({r['updates']} updates, {r['wall_s']:.1f}s)", flush=True)

    base = [r for r in runs if r["chunk"] == args.max_len]
    lines = ["| strategy | step s | rollout s | rollout vs vanilla | final reward | updates | wall s |",
             "|---|---|---|---|---|---|---|"]
    summary = {}
    for chunk in chunks:
        c = chunk or args.max_len
        mine = [r for r in runs if r["chunk"] == c]
        ratio = median(b["rollout_s"] / r["rollout_s"] for b, r in zip(base, mine))
        row = {k: median(r[k] for r in mine) for k in ("step_s", "rollout_s", "final_reward", "updates", "wall_s")}
        row["rollout_speedup"] = ratio
        summary["vanilla" if chunk is None else f"chunk {c}"] = row
        name = f"vanilla ({c})" if chunk is None else f"chunk {c} (1/{args.max_len // c})"
        lines.append(f"| {name} | {row['step_s']:.3f} | {row['rollout_s']:.3f} | {ratio:.2f}x | "
                     f"{row['final_reward']:.3f} | {row['updates']:.0f} | {row['wall_s']:.1f} |")

    def draw(png: Path):
        from common import pyplot, save_figure

        plt = pyplot()
        if plt is None:
            return None
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for chunk in chunks:
            c = chunk or args.max_len
            r = next(r for r in runs if r["chunk"] == c and r["seed"] == seeds[0])
            pts = [(s, v) for s, v in r["curve"] if v is not None]
            ax.plot(*zip(*pts), label="vanilla" if chunk is None else f"chunk {c}", linewidth=1)
        ax.set_xlabel("rollout step")
        ax.set_ylabel("reward of completed groups")
        ax.legend(fontsize=8)
        return save_figure(fig, png, f"RL rollout ablation (seed {seeds[0]}, max length {args.max_len})")

    publish({"command": command_line(), "machine": machine_info(args.threads), "dtype": "float32",
             "max_len": args.max_len, "steps": args.steps, "seeds": seeds, "summary": summary,
             "runs": runs, "table": "\n".join(lines)}, args.out, draw)


if __name__ == "__main__":
    main()
