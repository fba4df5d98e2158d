"""Exceptions users see; each message names the layer or argument at fault."""

from __future__ import annotations


def first_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message``: how a foreign exception is named in a one-line error."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:limit] if lines else ''}"


class RankdownError(Exception):
    """Base class: the CLI prints these as one-line errors, without a traceback."""


class UnsupportedLayerError(RankdownError):
    def __init__(self, fqn: str, module_type: str, reason: str) -> None:
        self.fqn, self.reason = fqn, reason
        super().__init__(f"layer {fqn!r} ({module_type}) cannot be factorized exactly: {reason}")


class LayerNotFoundError(RankdownError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class RankError(RankdownError, ValueError):
    pass


class PlanError(RankdownError, ValueError):
    pass


class OutputExistsError(RankdownError, FileExistsError):
    pass
