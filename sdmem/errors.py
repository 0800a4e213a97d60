"""User-facing errors: the CLI prints them as one line and exits with status 2."""

from __future__ import annotations

import os


class SdmemError(Exception):
    """An error in the user's input, reported without a traceback (exit code 2)."""

    exit_code = 2


class InputError(SdmemError):
    """Bad input tied to a path or key: the message names it and says what was expected."""

    def __init__(self, where: str | os.PathLike, problem: str):
        self.where = str(where)
        self.problem = problem
        super().__init__(f"{self.where}: {problem}")
