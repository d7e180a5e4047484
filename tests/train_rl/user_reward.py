"""A user reward for the `train rl --reward` test: longer responses score higher (so groups differ)."""


def response_length(task, response: str) -> float:
    return min(len(response), 200) / 200
