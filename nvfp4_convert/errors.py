"""The single error type of the converter: every failure names the file and tensor it concerns."""

from __future__ import annotations

from pathlib import Path


class ConvertError(Exception):
    """A problem with the input or output that stops the run.

    ``str(err)`` is a one-line message of the form ``FILE: TENSOR: what is wrong``.
    """

    def __init__(self, what: str, *, file: str | Path | None = None, tensor: str | None = None) -> None:
        self.what = what
        self.file = str(file) if file is not None else None
        self.tensor = tensor
        parts = [p for p in (self.file, self.tensor) if p]
        super().__init__(": ".join([*parts, what]))
