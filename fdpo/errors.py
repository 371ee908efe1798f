"""fdpo's user-facing errors: the bottom module every layer may import.

An error here is something the user caused and can fix (a recipe key, a data file and row, a model
directory, a command-line value). Its message names the place and the fix; the CLI prints it
without a traceback. Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """Base of every error the user caused and can fix: the CLI prints it without a traceback, exit code 2."""


class RecipeError(UserError, ValueError):
    """A recipe, its data or its model could not be used. The message names the place and a fix."""


class RunDirError(RecipeError):
    """A run directory cannot be used as asked (another run's files, a lock held, a changed recipe on resume)."""


def nearest(name: str, candidates: Iterable[str]) -> str | None:
    """The closest valid name to `name` (difflib ratio ≥ 0.6), or None."""
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None
