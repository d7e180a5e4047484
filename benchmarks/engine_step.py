"""Where one engine decode step goes: scheduling, batch building, the decoder layers, the LM head, and
the whole `LLMEngine.step()` (sampling and outputs included), for one request decoding after its prompt.

    .venv/bin/python benchmarks/engine_step.py --model build/bench/minicpm4-0.5b-random --dtype bfloat16

(the random 0.5B checkpoint is what `benchmarks/engine_speed.py --workdir build/bench` leaves there).
Writes benchmarks/results/engine_step.json (medians over --steps steps).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS_DIR, command_line, machine_info, median, publish  # noqa: E402

from minicpm4.engine import LLM, SamplingParams  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model folder")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS_DIR / "engine_step.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    engine = LLM(args.model, dtype=args.dtype).engine
    runner = engine.runner
    engine.add_request([1] + list(range(100, 99 + args.prompt_len)),
                       SamplingParams(max_new_tokens=3 * args.steps + 10, ignore_eos=True))
    while engine.scheduler.running == [] or engine.scheduler.running[0].in_prefill:
        engine.step()
    for _ in range(5):
        engine.step()  # warm
    phases: dict[str, list[float]] = {"schedule": [], "build_batch": [], "layers": [], "lm_head": []}
    for _ in range(args.steps):  # the step's parts, timed one by one (greedy token appended by hand)
        t0 = time.perf_counter()
        plan = engine.scheduler.schedule()
        t1 = time.perf_counter()
        ids, batch = runner.build_batch(plan.scheduled)
        t2 = time.perf_counter()
        with torch.inference_mode():
            hidden = runner.hidden_states(ids, batch)
            t3 = time.perf_counter()
            logits = runner.logits(hidden[-1:])
        t4 = time.perf_counter()
        seq = plan.scheduled[0].seq
        seq.num_computed_tokens += 1
        seq.token_ids.append(int(logits.argmax()))
        for name, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            phases[name].append(dt * 1e3)
    whole = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        engine.step()
        whole.append((time.perf_counter() - t0) * 1e3)
    ms = {name: median(v) for name, v in phases.items()} | {"engine.step": median(whole)}
    rows = "\n".join(f"| {name} | {value:.2f} |" for name, value in ms.items())
    result = {"benchmark": "engine_step", "command": command_line(argv), "machine": machine_info(args.threads),
              "args": vars(args), "context": seq.num_tokens, "ms": ms,
              "table": f"| part (context ~{seq.num_tokens}) | ms |\n|---|---|\n{rows}"}
    publish(result, args.out)
    return result


if __name__ == "__main__":
    main()
