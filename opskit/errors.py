"""Errors that carry the command-line contract's exit codes.

0 done; 1 the operation or a gate failed and the system was left safe; 2 bad input, nothing changed;
3 another operation holds the environment's lock.
"""

from __future__ import annotations


class OpsError(Exception):
    """An error the command line reports as one line and the exit code below."""

    exit_code = 1


class BadInput(OpsError):
    """The input was refused before anything changed."""

    exit_code = 2


class OperationFailed(OpsError):
    """The operation or a gate failed; the system was left safe."""

    exit_code = 1


class LockHeld(OpsError):
    """Another operation holds the environment's lock."""

    exit_code = 3
