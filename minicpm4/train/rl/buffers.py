"""Trajectories and the buffers of chunk-wise rollout (MINICPM4.md §7.2).

A trajectory is a prompt and a response grown one chunk per rollout step. Every response token records the
policy version (optimizer updates done) that generated it and, once scored, its behaviour log-probability under
that version — the denominator of its importance ratio. Tokens are scored before the policy next changes
(trainer.py), so a chunk's log-probs are always those of the version that sampled it.

Buffers: R (replay) holds unfinished trajectories between steps; `waiting` holds finished trajectories whose
group (the G samples of one prompt) is not complete yet; B holds complete groups that passed dynamic sampling.
All of it serialises to JSON for checkpoints (floats round-trip exactly).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Trajectory:
    uid: int  # unique over the run; seeds its sampling
    group: int  # uid of its group
    task_index: int
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)  # per response token
    behaviour_logprobs: list[float | None] = field(default_factory=list)  # per response token; None = not scored
    chunks: int = 0  # rollout steps that extended it
    finished: bool = False  # stopped by EOS or by the length limit
    truncated: bool = False  # reached the length limit without EOS (overlong: no loss)
    reward: float | None = None
    text: str | None = None  # the decoded response, once finished

    def append_chunk(self, tokens: list[int], version: int) -> None:
        self.response_ids += tokens
        self.versions += [version] * len(tokens)
        self.behaviour_logprobs += [None] * len(tokens)
        self.chunks += 1

    def unscored(self) -> list[int]:
        return [i for i, lp in enumerate(self.behaviour_logprobs) if lp is None]

    def chunk_spans(self) -> list[tuple[int, int, int]]:
        """(start, end, version) of each run of tokens from one policy version."""
        spans: list[tuple[int, int, int]] = []
        for i, v in enumerate(self.versions):
            if spans and spans[-1][2] == v:
                spans[-1] = (spans[-1][0], i + 1, v)
            else:
                spans.append((i, i + 1, v))
        return spans

    @classmethod
    def from_dict(cls, d: dict) -> "Trajectory":
        return cls(**d)


@dataclass
class Group:
    uid: int
    task_index: int
    trajectories: list[Trajectory]

    @property
    def rewards(self) -> list[float]:
        return [t.reward for t in self.trajectories]

    @classmethod
    def from_dict(cls, d: dict) -> "Group":
        return cls(d["uid"], d["task_index"], [Trajectory.from_dict(t) for t in d["trajectories"]])


def keeps_signal(rewards: list[float]) -> bool:
    """Dynamic sampling (DAPO, Eq. 7 of the report: 0 < #correct < G): a group whose rewards are all equal has
    zero advantages everywhere and teaches nothing. For 0/1 rewards that is exactly all-right or all-wrong."""
    return max(rewards) != min(rewards)


@dataclass
class Buffers:
    replay: list[Trajectory] = field(default_factory=list)  # R
    waiting: dict[int, list[Trajectory]] = field(default_factory=dict)  # group uid -> finished members
    ready: list[Group] = field(default_factory=list)  # B

    def live(self) -> list[Trajectory]:
        """Every trajectory still held (what must be scored before the policy changes)."""
        return self.replay + [t for ts in self.waiting.values() for t in ts] + \
            [t for g in self.ready for t in g.trajectories]

    def to_dict(self) -> dict:
        return {"replay": [asdict(t) for t in self.replay],
                "waiting": {str(k): [asdict(t) for t in ts] for k, ts in self.waiting.items()},
                "ready": [asdict(g) for g in self.ready]}

    @classmethod
    def from_dict(cls, d: dict) -> "Buffers":
        return cls([Trajectory.from_dict(t) for t in d["replay"]],
                   {int(k): [Trajectory.from_dict(t) for t in ts] for k, ts in d["waiting"].items()},
                   [Group.from_dict(g) for g in d["ready"]])
