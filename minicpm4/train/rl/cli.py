"""`minicpm4 train rl`: chunk-wise rollout RL on verifiable tasks (MINICPM4.md §7).

    minicpm4 train rl --task math --out runs/rl-math                       # the bundled model, shipped tasks
    minicpm4 train rl --task code --chunk-len 64 --max-len 256 --out runs/rl-code
    minicpm4 train rl --task tasks.jsonl --reward mypkg.rewards:score --init MODEL_DIR --out runs/rl
    minicpm4 train rl ... --resume                                          # continue the latest checkpoint
    torchrun --nproc_per_node 2 -m minicpm4.cli train rl ...               # ranks roll out different prompts

Writes OUT/metrics.jsonl, OUT/metrics.png, OUT/checkpoints/, OUT/final (a model folder) and OUT/eval.json
(held-out accuracy before and after, for the shipped task sets or --eval-tasks).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from minicpm4.errors import UserError

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "rl-tasks"


def register_stage(stages: argparse._SubParsersAction) -> None:
    from minicpm4.train.rl.objective import ClipConfig
    from minicpm4.train.rl.trainer import RLConfig

    d, c = RLConfig(), ClipConfig()
    s = stages.add_parser("rl", help="chunk-wise rollout RL (GRPO + DAPO tricks) on math / code / your tasks",
                          description=__doc__.split("\n\n")[0])
    s.add_argument("--task", required=True, metavar="math|code|FILE",
                   help="a shipped task set (minicpm4/assets/rl-tasks) or a task JSONL")
    s.add_argument("--reward", default=None, metavar="MODULE:FUNCTION",
                   help="reward(task, response) -> float for your own task kinds (default: by task kind)")
    s.add_argument("--eval-tasks", default=None, metavar="FILE", help="held-out tasks (default: the set's test file)")
    s.add_argument("--eval-limit", type=int, default=100, help="held-out tasks evaluated before and after")
    s.add_argument("--init", default=None, metavar="DIR", help="model folder (default: the bundled default model)")
    s.add_argument("--out", required=True, metavar="DIR")
    s.add_argument("--steps", type=int, default=d.steps, help="rollout steps")
    s.add_argument("--chunk-len", type=int, default=None, help="tokens per trajectory per step (default: --max-len, "
                   "the vanilla synchronous rollout)")
    s.add_argument("--max-len", type=int, default=d.max_response_tokens, help="maximum response tokens")
    s.add_argument("--group-size", type=int, default=d.group_size, help="rollouts per prompt (G)")
    s.add_argument("--prompts-per-step", type=int, default=d.prompts_per_step)
    s.add_argument("--train-groups", type=int, default=d.train_groups, help="groups per update (N)")
    s.add_argument("--mini-batch-groups", type=int, default=None, help="groups per optimizer step (default: N)")
    s.add_argument("--update-iters", type=int, default=d.update_iters, help="passes over each batch (mu)")
    s.add_argument("--lr", type=float, default=d.lr, help="base LR (muP-scaled per parameter group; constant)")
    s.add_argument("--eps-low", type=float, default=c.eps_low)
    s.add_argument("--eps-high", type=float, default=c.eps_high)
    s.add_argument("--dual-clip", type=float, default=c.dual_clip)
    s.add_argument("--kl-beta", type=float, default=c.kl_beta)
    s.add_argument("--ref-refresh", type=int, default=d.ref_refresh, help="updates between reference refreshes")
    s.add_argument("--temperature", type=float, default=d.temperature)
    s.add_argument("--top-p", type=float, default=d.top_p)
    s.add_argument("--seed", type=int, default=d.seed)
    s.add_argument("--save-every", type=int, default=d.save_every, help="updates between checkpoints")
    s.add_argument("--resume", action="store_true", help="continue from OUT's latest checkpoint")
    s.add_argument("--threads", type=int, default=None, help="torch threads")
    s.set_defaults(func=cmd_rl)


def task_files(task: str) -> tuple[Path, Path | None]:
    if task in ("math", "code"):
        return ASSETS / f"{task}-train.jsonl", ASSETS / f"{task}-test.jsonl"
    path = Path(task)
    if not path.is_file():
        raise UserError(f"--task {task}: not 'math', 'code' or a task file")
    return path, None


def rl_config(a: argparse.Namespace):
    from minicpm4.train.rl.objective import ClipConfig
    from minicpm4.train.rl.trainer import RLConfig

    try:
        clip = ClipConfig(a.eps_low, a.eps_high, a.dual_clip, a.kl_beta)
        return RLConfig(steps=a.steps, prompts_per_step=a.prompts_per_step, group_size=a.group_size,
                        train_groups=a.train_groups, mini_batch_groups=a.mini_batch_groups,
                        update_iters=a.update_iters, max_response_tokens=a.max_len, chunk_tokens=a.chunk_len,
                        temperature=a.temperature, top_p=a.top_p, lr=a.lr, ref_refresh=a.ref_refresh, clip=clip,
                        seed=a.seed, save_every=a.save_every)
    except ValueError as e:
        raise UserError(str(e)) from e


def cmd_rl(a: argparse.Namespace) -> None:
    import torch

    from minicpm4.api import DEFAULT_MODEL_DIR
    from minicpm4.checkpoint import copy_tokenizer_files, load_model, save_model
    from minicpm4.io import write_text_atomic
    from minicpm4.tokenizer import Tokenizer
    from minicpm4.train.rl.env import ChatTasks
    from minicpm4.train.rl.evaluate import evaluate
    from minicpm4.train.rl.plot import plot_run
    from minicpm4.train.rl.rewards import load_reward
    from minicpm4.train.rl.tasks import load_tasks
    from minicpm4.train.rl.trainer import RLTrainer

    from minicpm4.train.distributed import cleanup, init_distributed

    if a.threads:
        torch.set_num_threads(a.threads)
    info = init_distributed("cpu")
    cfg = rl_config(a)
    train_file, test_file = task_files(a.task)
    test_file = Path(a.eval_tasks) if a.eval_tasks else test_file
    init = Path(a.init) if a.init else DEFAULT_MODEL_DIR
    if not (init / "config.json").is_file():
        raise UserError(f"--init {init}: no config.json")
    reward = load_reward(a.reward) if a.reward else None
    tokenizer = Tokenizer.from_pretrained(init)
    model = load_model(init, dtype=torch.float32).eval()
    env = ChatTasks(load_tasks(train_file), tokenizer, reward)
    held_out = ChatTasks(load_tasks(test_file), tokenizer, reward) if test_file else None

    out = Path(a.out)
    trainer = RLTrainer(model, env, cfg, out, info)
    main_rank = info.is_main
    results: dict = {"task": a.task, "init": str(init), "config": cfg.to_dict()}
    try:
        resumed = a.resume and trainer.resume()
    except ValueError as e:
        raise UserError(str(e)) from e
    if resumed:
        print(f"rl: resumed at step {trainer.counters.step} (policy version {trainer.counters.version})", file=sys.stderr)
        before_file = out / "eval_before.json"
        if before_file.is_file():
            results["before"] = json.loads(before_file.read_text())
    else:
        trainer.metrics.reset()
        if held_out is not None and main_rank:
            results["before"] = vars(evaluate(model, held_out, cfg.max_response_tokens, a.eval_limit))
            write_text_atomic(out / "eval_before.json", json.dumps(results["before"], indent=1))
            print(f"rl: held-out accuracy before {results['before']['accuracy']:.3f}", file=sys.stderr)

    def show(r: dict) -> None:
        reward = f"reward {r['reward']:.3f}" if "reward" in r else "no group complete"
        upd = f", update (clip {r['clip_fraction']:.3f}, kl {r['kl']:.4f})" if r.get("updated") else ""
        print(f"step {r['step']}: {reward}, active {r['active']} (replay {r['replay']}), "
              f"rollout {r['rollout_s']:.1f}s{upd}", file=sys.stderr)

    try:
        trainer.train(on_step=show if main_rank else None)
    finally:
        cleanup(info)
    if not main_rank:
        return
    final = save_model(model, out / "final")
    copy_tokenizer_files(init, final)
    if held_out is not None:
        results["after"] = vars(evaluate(model, held_out, cfg.max_response_tokens, a.eval_limit))
        print(f"rl: held-out accuracy after {results['after']['accuracy']:.3f}", file=sys.stderr)
    write_text_atomic(out / "eval.json", json.dumps(results, indent=1))
    png = plot_run(out / "metrics.jsonl", out / "metrics.png", f"RL {a.task}, chunk {cfg.chunk}/{cfg.max_response_tokens}")
    print(f"rl: model {final}; metrics {out / 'metrics.jsonl'}" + (f", plot {png}" if png else ""))
