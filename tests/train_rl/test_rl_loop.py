"""Chunk-wise rollout RL on a tiny model: buffers and behaviour log-probs, the objective's hand-computed values,
reward going up in chunk and in vanilla mode, and bit-identical kill-and-resume."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from minicpm4.config import tiny
from minicpm4.model import MiniCPMForCausalLM
from minicpm4.train.rl.buffers import Buffers, Trajectory, keeps_signal
from minicpm4.train.rl.objective import ClipConfig, GarbleFilter, clipped_surrogate, group_advantages, k3_kl, policy_loss
from minicpm4.train.rl.rollout import ChunkRollout, RolloutConfig
from minicpm4.train.rl.scoring import response_logprobs
from minicpm4.train.rl.toy import FirstTokenTask
from minicpm4.train.rl.trainer import RLConfig, RLTrainer

def tiny_model(seed: int = 0) -> MiniCPMForCausalLM:
    model = MiniCPMForCausalLM(tiny(vocab_size=32, max_position_embeddings=64))
    model.init_weights(torch.Generator().manual_seed(seed))
    return model.eval()


def config(**overrides) -> RLConfig:
    base = dict(steps=30, prompts_per_step=4, group_size=8, train_groups=2, max_response_tokens=8, lr=3e-2,
                seed=0, save_every=2)
    base.update(overrides)
    return RLConfig(**base)


# ---- rollout and buffers -----------------------------------------------------------------------------------

def test_a_chunked_trajectory_has_the_tokens_of_the_unchunked_one_greedy():
    model = tiny_model()
    prompts = [[1, 10 + i, 20 + i] for i in range(4)]

    def run(chunk: int) -> list[list[int]]:
        rollout = ChunkRollout(model, RolloutConfig(chunk, 12, temperature=0.0), max_prompt_tokens=3)
        trajs = [Trajectory(i, 0, 0, p) for i, p in enumerate(prompts)]
        steps = 0
        while not all(t.finished for t in trajs):
            rollout.extend(trajs, version=0)
            steps += 1
        assert all(t.chunks <= -(-12 // chunk) for t in trajs)
        return [t.response_ids for t in trajs], steps

    whole, one_step = run(12)
    for chunk in (1, 3, 5):
        chunked, steps = run(chunk)
        assert chunked == whole
        assert steps > one_step or all(len(r) <= chunk for r in whole)


def test_every_token_keeps_the_log_prob_of_the_version_that_sampled_it(tmp_path):
    trainer = RLTrainer(tiny_model(), FirstTokenTask(), config(steps=8, chunk_tokens=2, train_groups=1,
                                                               prompts_per_step=2), tmp_path)
    snapshots = {}
    seen: dict[int, Trajectory] = {}
    for _ in range(trainer.cfg.steps):
        snapshots.setdefault(trainer.counters.version, copy.deepcopy(trainer.model.state_dict()))
        trainer.step()
        for t in trainer.buffers.live():
            seen[t.uid] = t
    assert trainer.counters.version >= 3
    multi = [t for t in seen.values() if len(set(t.versions)) > 1 and not t.unscored()]
    assert multi, "no trajectory spanned a policy update"
    judge = tiny_model()
    for t in multi:
        for start, end, version in t.chunk_spans():
            judge.load_state_dict(snapshots[version])
            with torch.no_grad():
                logp, _ = response_logprobs(judge, [t])
            assert t.behaviour_logprobs[start:end] == pytest.approx(logp[0, start:end].tolist(), abs=1e-5)


def test_dynamic_sampling_and_buffer_round_trip():
    assert not keeps_signal([1.0] * 4) and not keeps_signal([0.0] * 4) and keeps_signal([0.0, 1.0, 0.0, 0.0])
    assert keeps_signal([0.5, 1.0]) and not keeps_signal([0.25, 0.25])
    t = Trajectory(3, 1, 0, [1, 2])
    t.append_chunk([5, 6], 0)
    t.append_chunk([7], 2)
    t.behaviour_logprobs[:2] = [-0.1, -0.2]
    assert t.chunk_spans() == [(0, 2, 0), (2, 3, 2)] and t.unscored() == [2]
    b = Buffers(replay=[t], waiting={1: [copy.deepcopy(t)]})
    assert Buffers.from_dict(json.loads(json.dumps(b.to_dict()))) == b


# ---- objective ---------------------------------------------------------------------------------------------

def test_group_advantages_hand_computed():
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]]), eps=0.0)
    assert adv[0].tolist() == [1.0, -1.0, -1.0, 1.0]
    std = (0.25 * 0.75) ** 0.5  # population std of [1, 0, 0, 0]
    assert adv[1].tolist() == pytest.approx([0.75 / std, -0.25 / std, -0.25 / std, -0.25 / std])


@pytest.mark.parametrize("ratio, adv, expected", [
    (1.5, 1.0, 1.28),  # clip-higher caps a positive advantage at 1 + eps_high
    (0.5, 1.0, 0.5),  # below 1 - eps_low with A > 0: min keeps the unclipped (smaller) term
    (0.5, -1.0, -0.8),  # A < 0: min takes the clipped 0.8 * A
    (2.0, -1.0, -2.0),  # A < 0, ratio below c: the ordinary clipped term
    (5.0, -1.0, -3.0),  # dual-clip: bounded at c * A = -3
    (5.0, 1.0, 1.28),  # no dual-clip for A > 0 (the sign condition)
])
def test_clip_higher_and_sign_conditioned_dual_clip(ratio, adv, expected):
    cfg = ClipConfig(eps_low=0.2, eps_high=0.28, dual_clip=3.0)
    got = clipped_surrogate(torch.tensor([ratio]), torch.tensor([adv]), cfg)
    assert got.item() == pytest.approx(expected)


def test_token_level_normalisation_and_masked_rows_get_no_gradient():
    cfg = ClipConfig(kl_beta=0.0)
    logp = torch.zeros(2, 3, requires_grad=True)
    behaviour = torch.zeros(2, 3)
    adv = torch.tensor([[1.0], [-1.0]]).expand(2, 3)
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    loss, stats = policy_loss(logp, behaviour, None, adv, mask, cfg)
    assert stats.tokens == 4 and loss.item() == pytest.approx(-(1 - 3) / 4)  # -(Σ r·A) / Σ|o_i|
    loss.backward()
    assert logp.grad[0, 1:].tolist() == [0.0, 0.0]  # padding / filtered tokens: no gradient
    overlong = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    logp.grad = None
    policy_loss(logp, behaviour, None, adv, overlong, cfg)[0].backward()
    assert logp.grad[0].abs().sum() == 0


def test_k3_kl_is_zero_at_equal_policies_and_positive_elsewhere():
    a = torch.tensor([-1.0, -2.0])
    assert k3_kl(a, a).tolist() == [0.0, 0.0]
    assert (k3_kl(a, a + 0.5) > 0).all()


def test_garble_filter_golden_cases():
    g = GarbleFilter()
    assert g.is_garbled([7] * 40)  # one token dominates
    assert g.is_garbled([1, 2, 3, 4, 5] * 10)  # a loop: few distinct 4-grams
    assert not g.is_garbled(list(range(40)))
    assert not g.is_garbled([7] * 10)  # short responses are not judged by token statistics
    assert g.is_garbled([1, 2], "ab\ufffd\ufffd")


# ---- the loop ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [None, 2])
def test_a_few_rl_steps_raise_the_reward(tmp_path, chunk):
    trainer = RLTrainer(tiny_model(), FirstTokenTask(), config(chunk_tokens=chunk), tmp_path)
    records = trainer.train()
    rewards = [r["reward"] for r in records if "reward" in r]
    first, last = sum(rewards[:8]) / 8, sum(rewards[-8:]) / 8
    assert last > first + 0.1, rewards
    assert any(r.get("updated") for r in records)
    if chunk is not None:
        assert max(r["resumed"] for r in records) > 0  # trajectories really waited in the replay buffer
    else:
        assert all(r["resumed"] == 0 for r in records)  # vanilla: everything finishes in its first step


def _deterministic(records):
    drop = ("_s",)
    return [{k: v for k, v in r.items() if not k.endswith(drop)} for r in records]


def test_kill_and_resume_continues_bit_identically(tmp_path):
    cfg = config(steps=12, chunk_tokens=3, save_every=2)
    whole = RLTrainer(tiny_model(), FirstTokenTask(), cfg, tmp_path / "whole")
    whole.train()

    killed = RLTrainer(tiny_model(), FirstTokenTask(), cfg, tmp_path / "resumed")
    while killed.counters.version < 3:  # stop mid-run: steps after the last checkpoint are lost
        killed.step()
    del killed
    resumed = RLTrainer(tiny_model(seed=1), FirstTokenTask(), cfg, tmp_path / "resumed")  # other init: overwritten
    assert resumed.resume()
    assert resumed.counters.version == 2
    resumed.train()

    read = lambda p: [json.loads(line) for line in (p / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert _deterministic(read(tmp_path / "resumed")) == _deterministic(read(tmp_path / "whole"))
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed.buffers == whole.buffers


WORKER = '''
import sys, torch
from pathlib import Path
from minicpm4.train.distributed import cleanup, init_distributed
from minicpm4.train.rl.trainer import RLTrainer
from minicpm4.train.rl.toy import FirstTokenTask
from tests.train_rl.test_rl_loop import config, tiny_model

out = Path(sys.argv[1])
info = init_distributed("cpu")
trainer = RLTrainer(tiny_model(), FirstTokenTask(), config(steps=6, chunk_tokens=3, save_every=2), out / "run", info)
records = trainer.train()
torch.save({"state": trainer.model.state_dict(), "records": records}, out / f"rank{info.rank}.pt")
cleanup(info)
'''


def test_torchrun_ranks_roll_out_apart_and_update_together(tmp_path):
    """2 gloo processes: each rolls out its own prompts with its own seeds, both take the same updates (summed
    gradients over the global token count), so the replicas stay identical; each rank checkpoints its buffers."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    (tmp_path / "worker.py").write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(tmp_path / "worker.py"), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=400, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert any(r.get("updated") for r in r0["records"])
    for name, a in r0["state"].items():
        assert torch.equal(a, r1["state"][name]), name
    assert [r["generated_tokens"] for r in r0["records"]] != [r["generated_tokens"] for r in r1["records"]]
    ckpt = sorted((tmp_path / "run" / "checkpoints").glob("step_*"))[-1]
    assert (ckpt / "rl_state_rank00000.json").is_file() and (ckpt / "rl_state_rank00001.json").is_file()
    single = RLTrainer(tiny_model(), FirstTokenTask(), config(steps=6, chunk_tokens=3), tmp_path / "run")
    with pytest.raises(ValueError, match="same world size"):
        single.resume()
