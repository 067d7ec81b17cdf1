"""vLLM's own DeepSeek-V4 weight-name mapper, asked about a checkpoint's names from a child process.

Contract: ``DroppedNames(names)`` makes sure a child of this interpreter is importing vLLM's DeepSeek-V4 model (one
child per process, started by the first call, serving every later one); ``result()`` asks it which of ``names`` its
``hf_to_vllm_mapper`` drops (maps to None) and returns them, or None where vLLM cannot be imported by this interpreter
(the reason in ``unavailable``). With ``release=True`` the question is asked at once, on a thread, and a child that
this call started ends as soon as it has answered (a one-shot command: its memory is not held while the caller goes
on; a child already serving this process, as in the test suite, is kept).

Why a child: importing vLLM takes seconds and ~0.6 GiB. ``verify`` needs only this one answer from it, so the import
runs beside its own work (on another core, outside its GIL; the CLI's verify decodes no tensor until the child has
answered and ended, so the two memories are never held at once).
"""

from __future__ import annotations

import atexit
import json
import subprocess
import sys
import threading
from collections.abc import Iterable

TIMEOUT_S = 600

# One JSON line in (a list of names), one JSON line out. vLLM's own output goes to stderr (discarded): stdout is
# the answer channel alone.
_CHILD = """
import json, os, sys
answers = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)
try:
    from vllm.models.deepseek_v4.nvidia.model import DeepseekV4ForCausalLM
    mapper, failed = DeepseekV4ForCausalLM.hf_to_vllm_mapper, None
except Exception as e:  # vLLM absent or unimportable here
    mapper, failed = None, f"{type(e).__name__}: {e}"
for line in sys.stdin:
    names = json.loads(line)
    if mapper is None:
        answer = {"unavailable": failed}
    else:
        answer = {"dropped": [n for n in names if mapper._map_name(n) is None]}
    answers.write(json.dumps(answer) + "\\n")
    answers.flush()
"""

_lock = threading.Lock()
_child: subprocess.Popen | None = None


def _server() -> subprocess.Popen:
    global _child
    if _child is None or _child.poll() is not None:
        _child = subprocess.Popen(
            [sys.executable, "-c", _CHILD],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        atexit.register(_stop, _child)
    return _child


def close() -> None:
    """Kill the child serving this process, if any: the CLI, which exits without running ``atexit`` (without the lock:
    a question still waiting for vLLM's import must not hold the exit)."""
    child = _child
    if child is not None and child.poll() is None:
        child.kill()


def _stop(child: subprocess.Popen) -> None:
    if child.stdin:
        child.stdin.close()  # the child ends at end of input
    try:
        child.wait(timeout=10)
    except subprocess.TimeoutExpired:
        child.kill()


class DroppedNames:
    """The names of ``names`` that vLLM's DeepSeek-V4 ``hf_to_vllm_mapper`` drops, computed in a child process."""

    def __init__(self, names: Iterable[str], *, release: bool = False) -> None:
        self.names = list(names)
        self.unavailable: str | None = None
        self._answer: dict | None = None
        with _lock:
            started = _child is None or _child.poll() is not None
            _server()  # vLLM's import starts now
        release = release and started
        self._asking = threading.Thread(target=self._query, args=(True,), daemon=True) if release else None
        if self._asking:
            self._asking.start()

    def result(self) -> list[str] | None:
        if self._asking:
            self._asking.join()
        elif self._answer is None:  # asked once: a second call gives the same answer
            self._query(release=False)
        assert self._answer is not None
        self.unavailable = self._answer.get("unavailable")
        return self._answer.get("dropped")

    def _query(self, release: bool) -> None:
        answer: dict | None = None
        with _lock:
            child = _server()
            try:
                answer = _ask(child, self.names)
            except (OSError, ValueError) as e:  # a pipe closed, a garbled line: said, not raised on a thread
                answer = {"unavailable": f"the vLLM child process failed: {e}"}
            finally:
                if answer is None or release:
                    _stop(child)
        self._answer = answer or {"unavailable": f"the vLLM child process gave no answer within {TIMEOUT_S} s"}


def _ask(child: subprocess.Popen, names: list[str]) -> dict | None:
    assert child.stdin and child.stdout
    try:
        child.stdin.write(json.dumps(names) + "\n")
        child.stdin.flush()
    except OSError:
        return None
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(child.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(TIMEOUT_S)
    if not got or not got[0]:
        return None
    return json.loads(got[0])
