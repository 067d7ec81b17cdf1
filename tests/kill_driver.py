"""Run a conversion in this process and SIGKILL it at a chosen point (used by test_crash_resume).

usage: python kill_driver.py SRC DST SHARD_BYTES POINT RESUME [IO]
POINT is ``tensor:K`` (before the K-th converted tensor or copy run is written), ``journal:K`` (after the K-th
shard was renamed into place, before its journal line), ``meta:K`` (before the K-th metadata file
is written), or ``none``. The kill is a real SIGKILL: no cleanup, no finally blocks.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import nvfp4_convert.convert as convert
import nvfp4_convert.execute as execute
import nvfp4_convert.state as state
from nvfp4_convert.policy import Policy


def _arm(targets: list[tuple[object, str]], k: int) -> None:
    count = [0]  # shared by the targets: one sequence of write steps

    def wrap(original: Callable[..., object]) -> Callable[..., object]:
        def wrapped(*args: object, **kwargs: object) -> object:
            count[0] += 1
            if count[0] == k:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*args, **kwargs)

        return wrapped

    for module, attr in targets:
        setattr(module, attr, wrap(getattr(module, attr)))


def main() -> None:
    src, dst, shard_bytes, point, resume = sys.argv[1:6]
    io = sys.argv[6] if len(sys.argv) > 6 else "auto"
    if point != "none":
        kind, k = point.split(":")
        targets = {
            "tensor": [(execute, "produce"), (execute, "copy_run")],
            "journal": [(state.RunState, "record")],
            "meta": [(convert, "write_file_atomic")],
        }
        _arm(targets[kind], int(k))
    convert.run(Path(src), Path(dst), Policy(), workers=1, shard_bytes=int(shard_bytes), resume=resume == "1", io=io)


if __name__ == "__main__":
    main()
