"""Stop strings over streamed text: emit what is safe, hold back what could still start a stop string."""

from __future__ import annotations


class StopStringFilter:
    """Feed text chunks with `push`; it returns the text that may be shown now. Once a stop string
    appears, `stopped` is True and the text is cut just before it (the stop string is not shown)."""

    def __init__(self, stop: list[str]) -> None:
        self.stop = [s for s in stop if s]
        self.pending = ""  # text received but not yet released
        self.stopped = False

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        self.pending += text
        cut = min((i for i in (self.pending.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            out, self.pending, self.stopped = self.pending[:cut], "", True
            return out
        hold = self._longest_stop_prefix_at_end()
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out

    def _longest_stop_prefix_at_end(self) -> int:
        """Length of the longest tail of `pending` that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.pending)), best, -1):
                if self.pending.endswith(s[:n]):
                    best = n
                    break
        return best
