"""``python -m nvfp4_convert``: the command line, for interpreters without the console script on PATH."""

import sys

from .cli import main_entry

sys.exit(main_entry())
