"""The one error type bad input turns into: the CLI prints it on one line and exits 2."""

from __future__ import annotations

import difflib
from typing import Iterable, Optional


class ConfigError(ValueError):
    """Bad user input. ``key`` names what was wrong, ``hint`` says how to fix it."""

    def __init__(self, key: str, problem: str, hint: Optional[str] = None):
        self.key, self.problem, self.hint = key, problem, hint
        super().__init__(self.one_line())

    def __reduce__(self):  # rebuilt from the fields: a child process's error reaches its parent intact
        return type(self), (self.key, self.problem, self.hint)

    def one_line(self) -> str:
        msg = f"{self.key}: {self.problem}" if self.key else self.problem
        return f"{msg} ({self.hint})" if self.hint else msg


def did_you_mean(word: str, choices: Iterable[str]) -> Optional[str]:
    """A 'did you mean ...?' hint for a misspelt key or value, or None."""
    choices = list(choices)
    close = difflib.get_close_matches(word, choices, n=2, cutoff=0.75)
    if not close:
        # Also match on the last dotted component: `trainer.ppo.asyn_training` -> `...async_training`.
        tail = word.rsplit(".", 1)[-1]
        by_tail = {c.rsplit(".", 1)[-1]: c for c in choices}
        close = [by_tail[t] for t in difflib.get_close_matches(tail, list(by_tail), n=2, cutoff=0.75)]
    return f"did you mean {' or '.join(repr(c) for c in close)}?" if close else None
