"""``python -m nvfp4_convert``: the command line, for interpreters without the console script on PATH."""

from .cli import main_entry

main_entry()
