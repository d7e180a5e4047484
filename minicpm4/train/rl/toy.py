"""A token-level toy task for RL tests and benchmarks (no tokenizer, nothing downloaded): 8 prompts of raw token
ids; reward 1 when the response starts with one of the `target` tokens. With `len(target)` = vocab / 8 a random
policy succeeds 1/8 of the time, so groups carry signal from the first step."""

from __future__ import annotations


class FirstTokenTask:
    def __init__(self, target: set[int] | frozenset[int] = frozenset({5, 6, 7, 8})) -> None:
        self.target = frozenset(target)

    def __len__(self) -> int:
        return 8

    def prompt_ids(self, i: int) -> list[int]:
        return [1, 10 + i, 20 + i % 3]

    def decode(self, ids: list[int]) -> str:
        return " ".join(map(str, ids))

    def rewards(self, trajectories) -> list[float]:
        return [1.0 if t.response_ids and t.response_ids[0] in self.target else 0.0 for t in trajectories]
