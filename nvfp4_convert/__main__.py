"""``python -m nvfp4_convert``: the command line, for interpreters without the console script on PATH."""

from .cli import app

app()
