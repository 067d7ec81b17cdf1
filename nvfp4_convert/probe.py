"""``nvfp4-convert probe URL``: is a served model answering sensibly, or producing garbage?

A converted checkpoint that loads can still answer with garbage (a wrong scale, a dropped tensor):
the server starts and answers every request. The probe waits for ``/health``, lists ``/v1/models``
and sends a fixed set of questions with known answers (arithmetic, facts, copying and reversing a
string, short word problems of our own) through ``/v1/chat/completions``, greedy and with DeepSeek's
thinking off. Each answer is scored exactly, after normalisation, and checked for signs of garbage:
non-printable characters, runaway repetition, special-token text, a low share of word-like tokens.

Verdict: ``PASS`` (no garbage, score >= threshold, exit 0), ``GARBAGE`` or ``WRONG`` (exit 1), or one
line saying the server cannot be used (unreachable, no such model: exit 3). Standard library HTTP
only (urllib + a thread pool): no runtime dependency beyond the converter's own.
"""

from __future__ import annotations

import http.client
import json
import re
import time
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

EXIT_FAIL = 1  # garbage or a score below the threshold
EXIT_UNUSABLE = 3  # unreachable server, no model, malformed answers to /v1/models

SYSTEM_PROMPT = "Answer with only the final answer: no explanation, no working, no extra words."


@dataclass(frozen=True)
class Question:
    """One prompt and the answers accepted for it (already normalised)."""

    id: str
    kind: str  # arithmetic | fact | copy | reverse | word-problem
    prompt: str
    answers: tuple[str, ...]
    case_sensitive: bool = False


NUMBER_WORDS = (
    *("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"),
    *("eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"),
)


def _num(n: int, *units: str) -> tuple[str, ...]:
    words = NUMBER_WORDS
    base = [str(n)] + ([words[n]] if 0 <= n < len(words) else [])
    return tuple(base + [f"{b} {u}" for b in base for u in units])


QUESTIONS: tuple[Question, ...] = (
    Question("add", "arithmetic", "What is 17 + 25?", _num(42)),
    Question("mul", "arithmetic", "What is 12 * 13?", _num(156)),
    Question("sub", "arithmetic", "What is 1000 - 387?", _num(613)),
    Question("div", "arithmetic", "What is 144 divided by 12?", _num(12)),
    Question("capital", "fact", "What is the capital of France?", ("paris",)),
    Question("week", "fact", "How many days are there in a week?", _num(7, "days")),
    Question("gold", "fact", "What is the chemical symbol for gold?", ("au",)),
    Question("spider", "fact", "How many legs does a spider have?", _num(8, "legs")),
    Question("red-planet", "fact", "Which planet is known as the Red Planet?", ("mars", "the red planet is mars")),
    Question(
        "copy-token",
        "copy",
        "Repeat this string exactly, character for character, and nothing else: Zq7-kite-Bm4",
        ("Zq7-kite-Bm4",),
        case_sensitive=True,
    ),
    Question(
        "copy-words",
        "copy",
        "Repeat this text exactly and nothing else: purple otters juggle 93 lemons",
        ("purple otters juggle 93 lemons",),
        case_sensitive=True,
    ),
    Question(
        "reverse-word",
        "reverse",
        "Write the word 'lantern' backwards, letter by letter. Reply with the reversed word only.",
        ("nretnal",),
    ),
    Question(
        "reverse-mixed",
        "reverse",
        "Reverse the string 'abc123'. Reply with the reversed string only.",
        ("321cba",),
    ),
    Question(
        "pencils",
        "word-problem",
        "Mara has 3 boxes with 4 pencils in each box. She gives 5 pencils to a friend. How many pencils does she have left?",
        _num(7, "pencils"),
    ),
    Question(
        "train",
        "word-problem",
        "A train leaves at 2 pm and the trip takes 3 hours. At what time in the afternoon does it arrive?",
        ("5 pm", "5pm", "5:00 pm", "5:00pm", "5", "five", "five pm", "17:00", "5 p.m"),
    ),
    Question(
        "ages",
        "word-problem",
        "Tom is 4 years older than Ana. Ana is 9. How old is Tom?",
        _num(13, "years old", "years"),
    ),
    Question(
        "apples",
        "word-problem",
        "Apples cost 2 dollars each. How many dollars do 6 apples cost?",
        (*_num(12, "dollars"), "$12", "$12.00", "12.00"),
    ),
    Question(
        "birds",
        "word-problem",
        "There are 10 birds on a fence. 4 fly away, then 2 more land on it. How many birds are on the fence now?",
        _num(8, "birds"),
    ),
)

# ------------------------------------------------------------------------------------------ scoring

_THINK = re.compile(r"<think>.*?(</think>|$)", re.DOTALL)
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_LEAD = re.compile(r"^(final answer|the answer is|answer|result)\s*[:=]?\s*", re.IGNORECASE)
_EDGE = " \t\r\n\"'`*_“”‘’«».!,;:"


def normalise(text: str, *, case_sensitive: bool = False) -> str:
    """The answer's core: no reasoning block, markdown, lead-in phrase, quotes or final full stop."""
    t = unicodedata.normalize("NFKC", _THINK.sub("", text))
    t = _BOXED.sub(r"\1", t).replace("**", "").replace("`", "")
    t = t.strip(_EDGE)
    t = _LEAD.sub("", t).strip(_EDGE)
    t = re.sub(r"\s+", " ", t)
    t = re.sub(r"(?<=\d),(?=\d{3}\b)", "", t)  # 1,000 -> 1000
    return t if case_sensitive else t.lower()


def is_correct(question: Question, text: str) -> bool:
    """Exact match of the normalised answer (or of its last line) with one accepted answer."""
    candidates = {normalise(text, case_sensitive=question.case_sensitive)}
    lines = [ln for ln in _THINK.sub("", text).strip().splitlines() if ln.strip()]
    if lines:
        candidates.add(normalise(lines[-1], case_sensitive=question.case_sensitive))
    accepted = {a if question.case_sensitive else a.lower() for a in question.answers}
    return bool(candidates & accepted)


# ----------------------------------------------------------------------------------- garbage checks

_SPECIAL_TOKEN = re.compile(r"<[|｜][^<>\s]{1,40}[|｜]>")
_CHAR_RUN = re.compile(r"(.{1,10}?)\1{15,}", re.DOTALL)
_PUNCT = "".join(chr(c) for c in range(0x2000, 0x2070)) + "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~“”‘’«»…"


def _script(ch: str) -> str:
    return unicodedata.name(ch, "?").split(" ")[0]


def is_word_like(token: str) -> bool:
    """A word, a number, or hyphen/apostrophe-joined parts of them, each in a single script."""
    core = token.strip(_PUNCT)
    if not core or len(core) > 40:
        return False
    if re.fullmatch(r"[$€£]?\d+([.,:/]\d+)*%?", core):
        return True
    for part in re.split(r"[-'’/]", core):
        if not part or not all(c.isalpha() or (c.isascii() and c.isdigit()) for c in part):
            return False
        if len({_script(c) for c in part if c.isalpha()}) > 1:
            return False
    return True


def _repeated_ngram(tokens: list[str], max_n: int = 5) -> str | None:
    """A 1..max_n token sequence repeated back to back (6 times for single tokens, 5 for longer)."""
    low = [t.lower() for t in tokens]
    for n in range(1, max_n + 1):
        need = 6 if n == 1 else 5
        for start in range(len(low) - n * need + 1):
            unit = low[start : start + n]
            if all(low[start + k * n : start + (k + 1) * n] == unit for k in range(1, need)):
                return " ".join(tokens[start : start + n])
    return None


def garble_reasons(text: str) -> list[str]:
    """Why ``text`` looks like garbage rather than language (empty: it does not)."""
    reasons = []
    bad = sorted(
        {
            c
            for c in text
            if c == "\ufffd" or (unicodedata.category(c) in ("Cc", "Cs", "Co", "Cn") and c not in "\n\r\t")
        }
    )
    if bad:
        reasons.append(f"non-printable characters {''.join(repr(c)[1:-1] for c in bad[:5])}")
    if m := _SPECIAL_TOKEN.search(text):
        reasons.append(f"special-token text {m.group(0)!r}")
    tokens = text.split()
    if unit := _repeated_ngram(tokens):
        reasons.append(f"runaway repetition of {unit[:30]!r}")
    elif m := _CHAR_RUN.search(text):
        reasons.append(f"runaway repetition of {m.group(1)!r}")
    elif len(text) >= 200 and len(zlib.compress(text.encode())) < 0.12 * len(text.encode()):
        reasons.append("runaway repetition (text compresses > 8x)")
    if len(tokens) >= 5:
        share = sum(map(is_word_like, tokens)) / len(tokens)
        if share < 0.6:
            reasons.append(f"only {share:.0%} word-like tokens")
    return reasons


# -------------------------------------------------------------------------------------------- HTTP


class ProbeError(Exception):
    """The server cannot be probed: one line for the user."""


def _open(url: str, payload: dict | None, timeout: float) -> Any:
    """GET (or POST ``payload`` as JSON) and decode the JSON answer; loopback hosts bypass proxies."""
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    host = urllib.parse.urlsplit(url).hostname or ""
    handlers = [urllib.request.ProxyHandler({})] if host in ("localhost", "::1") or host.startswith("127.") else []
    with urllib.request.build_opener(*handlers).open(req, timeout=timeout) as resp:
        body = resp.read()
    return json.loads(body) if body.strip() else None


def _why(e: BaseException) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        e = e.reason if isinstance(e.reason, BaseException) else e
    if isinstance(e, TimeoutError):
        return "timed out"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    return str(e) or type(e).__name__


def wait_for_health(base: str, wait: float, timeout: float) -> float:
    """Poll ``/health`` until it answers 200 or ``wait`` seconds pass; returns the seconds waited."""
    t0 = time.monotonic()
    while True:
        try:
            _open(f"{base}/health", None, min(timeout, 10.0))
            return time.monotonic() - t0
        except (OSError, ValueError, http.client.HTTPException) as e:
            waited = time.monotonic() - t0
            if waited >= wait:
                hint = "" if wait else "; pass --wait SECONDS to wait for a starting server"
                raise ProbeError(
                    f"server unreachable at {base}: /health {_why(e)} after {waited:.0f} s{hint}"
                ) from None
            time.sleep(min(2.0, max(0.05, wait - waited)))


def list_models(base: str, timeout: float) -> list[str]:
    try:
        body = _open(f"{base}/v1/models", None, timeout)
        return [m["id"] for m in body["data"]]
    except (OSError, ValueError, http.client.HTTPException) as e:
        raise ProbeError(f"{base}/v1/models failed: {_why(e)}") from None
    except (KeyError, TypeError):
        raise ProbeError(f"{base}/v1/models answered something that is not a model list") from None


def ask(base: str, model: str, question: Question, timeout: float, max_tokens: int = 128) -> dict:
    """One chat completion; the result row (answer, correctness, garbage reasons, error, latency)."""
    payload = {
        "model": model,
        "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question.prompt}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "chat_template_kwargs": {"thinking": False},
    }
    row: dict[str, Any] = {
        "id": question.id,
        "kind": question.kind,
        "prompt": question.prompt,
        "expected": question.answers[0],
        "answer": None,
        "reasoning": None,
        "finish_reason": None,
        "correct": False,
        "garbled": False,
        "reasons": [],
        "error": None,
    }
    t0 = time.monotonic()
    try:
        body = _open(f"{base}/v1/chat/completions", payload, timeout)
        choice = body["choices"][0]
        message = choice.get("message") or {}
        row["answer"] = message.get("content") or ""
        row["reasoning"] = message.get("reasoning_content") or message.get("reasoning")
        row["finish_reason"] = choice.get("finish_reason")
    except (OSError, ValueError, http.client.HTTPException) as e:
        row["error"] = _why(e)
    except (KeyError, IndexError, TypeError, AttributeError):
        row["error"] = "malformed chat completion"
    row["latency_s"] = round(time.monotonic() - t0, 3)
    if row["error"] is None:
        reasons = garble_reasons(row["answer"])
        if row["reasoning"]:
            reasons += [f"reasoning: {r}" for r in garble_reasons(row["reasoning"])]
        row["reasons"] = reasons
        row["garbled"] = bool(reasons)
        row["correct"] = is_correct(question, row["answer"]) and not reasons
    return row


def run_probe(
    url: str,
    *,
    model: str | None = None,
    concurrency: int = 4,
    timeout: float = 120.0,
    wait: float = 0.0,
    threshold: float = 0.8,
    questions: tuple[Question, ...] = QUESTIONS,
) -> dict:
    """Probe the server at ``url``; the whole result (also what ``--json`` writes). Raises ProbeError."""
    base = url.rstrip("/")
    if base.endswith("/v1"):
        base = base[:-3]
    if not urllib.parse.urlsplit(base).scheme:
        base = "http://" + base
    waited = wait_for_health(base, wait, timeout)
    models = list_models(base, timeout)
    if not models:
        raise ProbeError(f"{base}/v1/models lists no model")
    if model is None:
        model = models[0]
    elif model not in models:
        raise ProbeError(f"model {model!r} is not served at {base}; it serves {', '.join(models)}")
    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        rows = list(pool.map(lambda q: ask(base, model, q, timeout), questions))
    correct = sum(r["correct"] for r in rows)
    garbled = sum(r["garbled"] for r in rows)
    errors = sum(r["error"] is not None for r in rows)
    score = correct / len(rows) if rows else 0.0
    verdict = "GARBAGE" if garbled else ("WRONG" if score < threshold else "PASS")
    return {
        "url": base,
        "model": model,
        "models": models,
        "health_wait_s": round(waited, 3),
        "seconds": round(time.monotonic() - t0, 3),
        "threshold": threshold,
        "score": round(score, 4),
        "correct": correct,
        "total": len(rows),
        "garbled": garbled,
        "errors": errors,
        "verdict": verdict,
        "results": rows,
    }


# --------------------------------------------------------------------------------------------- CLI

console = Console(stderr=True)
out = Console()


def _cell(text: str | None, width: int = 40) -> Text:
    if text is None:
        return Text("")
    shown = text if text.isprintable() else repr(text)[1:-1]
    return Text(shown if len(shown) <= width else shown[: width - 1] + "…")


def results_table(result: dict) -> Table:
    table = Table(title=f"probe of {result['model']} at {result['url']}")
    for col in ("id", "kind", "expected", "answer", "result", "s"):
        table.add_column(col, overflow="fold")
    for r in result["results"]:
        if r["error"]:
            status = Text(f"error: {r['error']}", style="red")
        elif r["garbled"]:
            status = Text("garbled: " + "; ".join(r["reasons"]), style="bold red")
        elif r["correct"]:
            status = Text("ok", style="green")
        else:
            status = Text("wrong", style="yellow")
        table.add_row(r["id"], r["kind"], _cell(r["expected"], 20), _cell(r["answer"]), status, f"{r['latency_s']:.1f}")
    return table


def probe_cmd(
    url: Annotated[str, typer.Argument(help="server base URL, e.g. http://localhost:8000")],
    model: Annotated[str | None, typer.Option(help="served model name (default: the first in /v1/models)")] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="requests in flight at once")] = 4,
    timeout: Annotated[float, typer.Option(min=0.1, help="seconds allowed for each request")] = 120.0,
    wait: Annotated[float, typer.Option(min=0, help="seconds to wait for /health to answer (a starting server)")] = 0.0,
    threshold: Annotated[float, typer.Option(min=0, max=1, help="lowest share of exact answers that passes")] = 0.8,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the result as JSON to this file")] = None,
) -> None:
    """Ask a served model questions with known answers: exit 0 if it answers sensibly, 1 on garbage or a low score."""
    try:
        result = run_probe(url, model=model, concurrency=concurrency, timeout=timeout, wait=wait, threshold=threshold)
    except ProbeError as e:
        console.print(Text.assemble(("error:", "bold red"), f" {e}"), soft_wrap=True)
        raise typer.Exit(EXIT_UNUSABLE) from None
    out.print(results_table(result))
    style = {"PASS": "bold green", "WRONG": "bold yellow", "GARBAGE": "bold red"}[result["verdict"]]
    line = Text.assemble(
        (result["verdict"], style),
        f": {result['correct']}/{result['total']} exact answers (score {result['score']:.2f}, "
        f"threshold {threshold:.2f}), {result['garbled']} garbled, {result['errors']} failed request(s), "
        f"{result['seconds']:.1f} s",
    )
    out.print(line)
    if json_out:
        json_out.write_text(json.dumps(result, indent=1, ensure_ascii=False))
    if result["verdict"] != "PASS":
        raise typer.Exit(EXIT_FAIL)
