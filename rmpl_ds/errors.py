"""Errors meant for people.

A :class:`UserError` is a problem with what the user gave us (a recipe, a file, an argument). The CLI
prints its message without a traceback and exits with :data:`USER_ERROR_EXIT`. Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Sequence

USER_ERROR_EXIT = 2


class UserError(Exception):
    """A bad input; the message names the file and the line or key path, and what was expected."""


class ConfigError(UserError):
    """A recipe with one or more problems; every problem is listed, each with its key path."""

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.source = source
        self.problems = list(problems)
        noun = "problem" if len(self.problems) == 1 else "problems"
        lines = [f"{source}: {len(self.problems)} {noun}:"]
        lines += [f"  {problem}" for problem in self.problems]
        super().__init__("\n".join(lines))
