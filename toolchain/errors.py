"""The errors socc reports to users: one line each, with the exit code the CLI uses."""

from __future__ import annotations


class SoccError(Exception):
    """An error with a one-line message meant for the user (no traceback unless --debug)."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        # One line: the CLI prints exactly this. Long native messages are cut to their first line.
        first_line = " ".join(str(message).strip().splitlines()[:1]) or self.__class__.__name__
        super().__init__(first_line)


class UserError(SoccError):
    """Bad input or options: not a model, an unsupported op, an unknown target, ..."""


class BuildError(SoccError):
    """A compiler stage failed on a model that passed the import checks; names the stage."""


class ArtifactError(SoccError):
    """An artifact is missing, tampered with, truncated, or cannot run here."""


class VerificationFailed(SoccError):
    """The artifact ran but its outputs are outside tolerance of the reference."""

    exit_code = 1
