"""What the RL trainer needs from a task set: prompts as token ids, and rewards of finished responses.

`ChatTasks` is the real one: RLTask prompts (tasks.py) rendered as one user turn in the model's chat template,
responses decoded with the tokenizer and scored by a reward function (rewards.py: math-verify, sandboxed code
tests, or the user's own `module:function`). Tests plug in environments over raw token ids.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

from minicpm4.train.rl.buffers import Trajectory


class Environment(Protocol):
    def __len__(self) -> int: ...

    def prompt_ids(self, task_index: int) -> list[int]: ...

    def decode(self, response_ids: list[int]) -> str: ...

    def rewards(self, trajectories: Sequence[Trajectory]) -> list[float]: ...


class ChatTasks:
    def __init__(self, tasks: list, tokenizer, reward_fn: Callable | None = None, max_workers: int = 4,
                 system: str | None = None) -> None:
        from minicpm4.train.rl.rewards import reward_for_kind

        self.tasks, self.tokenizer, self.max_workers, self.system = tasks, tokenizer, max_workers, system
        self.reward_fn = reward_fn
        if reward_fn is None:  # a kind without a built-in reward fails here, not at the first finished group
            for kind in {t.kind for t in tasks}:
                reward_for_kind(kind)
        self._prompts: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self.tasks)

    def prompt_ids(self, task_index: int) -> list[int]:
        if task_index not in self._prompts:
            messages = ([{"role": "system", "content": self.system}] if self.system else []) + \
                [{"role": "user", "content": self.tasks[task_index].prompt}]
            self._prompts[task_index] = self.tokenizer.encode_chat(messages, add_generation_prompt=True)
        return self._prompts[task_index]

    def decode(self, response_ids: list[int]) -> str:
        return self.tokenizer.decode(response_ids, skip_special_tokens=True)

    def rewards(self, trajectories: Sequence[Trajectory]) -> list[float]:
        from minicpm4.train.rl.rewards import batch_rewards

        return batch_rewards([self.tasks[t.task_index] for t in trajectories],
                             [t.text if t.text is not None else self.decode(t.response_ids) for t in trajectories],
                             self.reward_fn, self.max_workers)
