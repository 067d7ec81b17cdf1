"""``nvfp4-convert probe URL``: is a served model answering sensibly, or producing garbage?

A converted checkpoint that loads can still answer with garbage (a wrong scale, a dropped tensor):
the server starts and answers every request. The probe waits for ``/health``, lists ``/v1/models``
and sends a fixed set of questions with known answers (arithmetic, facts, copying and reversing a
string, short word problems of our own) through ``/v1/chat/completions``, greedy and with DeepSeek's
thinking off. Each answer is scored exactly, after normalisation, and checked for signs of garbage:
non-printable characters, runaway repetition, special-token text, a low share of word-like tokens.

Before and after the questions it reads vLLM's Prometheus ``/metrics``: when speculative decoding (MTP) is
on, the spec-decode counters' growth gives the draft's acceptance rate during the probe.

Verdict: ``PASS`` (no garbage, score >= threshold, exit 0), ``GARBAGE`` or ``WRONG`` (exit 1),
``DRAFT-BROKEN`` (answers fine, but the draft's acceptance rate is below ``--min-acceptance``: exit 1), or
one line saying the server cannot be used (unreachable, no such model: exit 3). Standard library HTTP
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


def _open(url: str, payload: dict | None, timeout: float, *, raw: bool = False) -> Any:
    """GET (or POST ``payload`` as JSON) and decode the JSON answer (``raw``: the text); loopback hosts bypass
    proxies."""
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    host = urllib.parse.urlsplit(url).hostname or ""
    handlers = [urllib.request.ProxyHandler({})] if host in ("localhost", "::1") or host.startswith("127.") else []
    with urllib.request.build_opener(*handlers).open(req, timeout=timeout) as resp:
        body = resp.read()
    if raw:
        return body.decode("utf-8", errors="replace")
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


# ------------------------------------------------------------------------- speculative decoding

# vLLM's spec-decode counters, as vllm/v1/spec_decode/metrics.py (SpecDecodingProm, vLLM 0.32.0) declares them:
# prometheus_client Counters, so /metrics shows each as NAME_total, labelled model_name and engine
# (vllm/v1/metrics/loggers.py, PrometheusStatLogger), the per-position one also position="0".."K-1".
SPEC_DRAFTS = "vllm:spec_decode_num_drafts"
SPEC_DRAFT_TOKENS = "vllm:spec_decode_num_draft_tokens"
SPEC_ACCEPTED = "vllm:spec_decode_num_accepted_tokens"
SPEC_ACCEPTED_PER_POS = "vllm:spec_decode_num_accepted_tokens_per_pos"
MIN_ACCEPTANCE = 0.30  # below this a draft (MTP) is broken, not merely weak: healthy MTP accepts well over half

_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\S+)?$")
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"')
_UNESCAPE = re.compile(r"\\(.)")


def _unescape(m: re.Match) -> str:
    return "\n" if m.group(1) == "n" else m.group(1)


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Samples ``(name, labels, value)`` of a Prometheus text exposition.

    prometheus_client's own parser when it is importable (vLLM depends on it), else a small one for the
    lines vLLM's exporter writes: ``name{label="value",...} value [timestamp]``.
    """
    try:
        from prometheus_client.parser import text_string_to_metric_families
    except ImportError:
        samples = []
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#") or not (m := _SAMPLE.match(line)):
                continue
            labels = {k: _UNESCAPE.sub(_unescape, v) for k, v in _LABEL.findall(m.group(2) or "")}
            try:
                samples.append((m.group(1), labels, float(m.group(3))))
            except ValueError:
                continue
        return samples
    return [(s.name, dict(s.labels), float(s.value)) for f in text_string_to_metric_families(text) for s in f.samples]


def spec_counters(base: str, model: str, timeout: float) -> dict | str:
    """vLLM's spec-decode counters now, summed over engines (``{}``: none exported); a string says why not read."""
    try:
        text = _open(f"{base}/metrics", None, timeout, raw=True)
        samples = parse_metrics(text)
    except (OSError, ValueError, http.client.HTTPException) as e:
        return f"/metrics {_why(e)}"
    mine = [s for s in samples if s[1].get("model_name") == model]
    if not mine:  # a server that labels no model name (or another one): take every engine's counters
        mine = samples
    counts: dict[str, Any] = {}
    per_pos: dict[int, float] = {}
    for name, labels, value in mine:
        base_name = name.removesuffix("_total")
        if base_name == SPEC_ACCEPTED_PER_POS and labels.get("position", "").isdigit():
            pos = int(labels["position"])
            per_pos[pos] = per_pos.get(pos, 0.0) + value
        elif base_name in (SPEC_DRAFTS, SPEC_DRAFT_TOKENS, SPEC_ACCEPTED):
            counts[base_name] = counts.get(base_name, 0.0) + value
    if SPEC_DRAFT_TOKENS not in counts or SPEC_ACCEPTED not in counts:
        return {}
    return {
        "drafts": counts.get(SPEC_DRAFTS, 0.0),
        "draft_tokens": counts[SPEC_DRAFT_TOKENS],
        "accepted_tokens": counts[SPEC_ACCEPTED],
        "accepted_per_position": [per_pos.get(i, 0.0) for i in range(max(per_pos, default=-1) + 1)],
    }


def spec_summary(before: dict | str, after: dict | str, min_rate: float = MIN_ACCEPTANCE) -> dict:
    """Acceptance during the probe (the counters' growth), else since the server started (their totals).

    As vLLM computes them (SpecDecodingLogging.log / SpecDecodingProm's docstring): acceptance rate =
    accepted / draft tokens, mean acceptance length = 1 + accepted / drafts (the bonus token included),
    per-position rate = accepted at position i / drafts. ``broken``: draft tokens were proposed and fewer
    than ``min_rate`` of them accepted.
    """
    if isinstance(after, str):
        return {"enabled": None, "broken": False, "note": f"metrics not read ({after})"}
    if not after:
        return {"enabled": False, "broken": False, "note": "speculative decoding off (no vllm:spec_decode_* metrics)"}
    counts, scope = after, "total"
    if isinstance(before, dict) and before and after["draft_tokens"] > before["draft_tokens"]:
        scope = "probe"
        counts = {k: after[k] - before[k] for k in ("drafts", "draft_tokens", "accepted_tokens")}
        n_pos = len(after["accepted_per_position"])
        prev = before["accepted_per_position"] + [0.0] * n_pos
        counts["accepted_per_position"] = [a - prev[i] for i, a in enumerate(after["accepted_per_position"])]
    drafts, draft_tokens, accepted = counts["drafts"], counts["draft_tokens"], counts["accepted_tokens"]
    rate = accepted / draft_tokens if draft_tokens > 0 else None
    broken = rate is not None and rate < min_rate
    return {
        "enabled": True,
        "scope": scope,
        "drafts": int(drafts),
        "draft_tokens": int(draft_tokens),
        "accepted_tokens": int(accepted),
        "acceptance_rate": None if rate is None else round(rate, 4),
        "mean_acceptance_length": round(1 + accepted / drafts, 4) if drafts > 0 else None,
        "per_position": [round(a / drafts, 4) for a in counts["accepted_per_position"]] if drafts > 0 else [],
        "min_rate": min_rate,
        "broken": broken,
        "note": "no draft tokens yet" if rate is None else ("draft broken" if broken else "ok"),
    }


def run_probe(
    url: str,
    *,
    model: str | None = None,
    concurrency: int = 4,
    timeout: float = 120.0,
    wait: float = 0.0,
    threshold: float = 0.8,
    min_acceptance: float = MIN_ACCEPTANCE,
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
    spec_before = spec_counters(base, model, timeout)
    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        rows = list(pool.map(lambda q: ask(base, model, q, timeout), questions))
    correct = sum(r["correct"] for r in rows)
    garbled = sum(r["garbled"] for r in rows)
    errors = sum(r["error"] is not None for r in rows)
    score = correct / len(rows) if rows else 0.0
    seconds = time.monotonic() - t0
    speculative = spec_summary(spec_before, spec_counters(base, model, timeout), min_acceptance)
    verdict = "GARBAGE" if garbled else ("WRONG" if score < threshold else "PASS")
    if verdict == "PASS" and speculative["broken"]:
        verdict = "DRAFT-BROKEN"
    return {
        "url": base,
        "model": model,
        "models": models,
        "health_wait_s": round(waited, 3),
        "seconds": round(seconds, 3),
        "threshold": threshold,
        "score": round(score, 4),
        "correct": correct,
        "total": len(rows),
        "garbled": garbled,
        "errors": errors,
        "verdict": verdict,
        "speculative": speculative,
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


def spec_line(spec: dict) -> Text:
    """One line on speculative decoding: off, not read, the acceptance figures, or FAIL when the draft is broken."""
    if not spec["enabled"]:
        return Text(spec["note"], style="dim")
    if spec["acceptance_rate"] is None:
        return Text(f"speculative decoding on, {spec['note']} ({spec['scope']} counters)")
    during = "during this probe" if spec["scope"] == "probe" else "since the server started"
    figures = (
        f"acceptance rate {spec['acceptance_rate']:.1%} of {spec['draft_tokens']} draft tokens {during}, "
        f"mean acceptance length {spec['mean_acceptance_length'] or 0:.2f}"
    )
    if spec["per_position"]:
        figures += ", per position " + " ".join(f"{r:.2f}" for r in spec["per_position"])
    if spec["broken"]:
        return Text.assemble(
            ("FAIL", "bold red"),
            f" speculative decoding: {figures}; below {spec['min_rate']:.0%}, the draft (MTP) is broken",
        )
    return Text(f"speculative decoding: {figures}")


def probe_cmd(
    url: Annotated[str, typer.Argument(help="server base URL, e.g. http://localhost:8000")],
    model: Annotated[str | None, typer.Option(help="served model name (default: the first in /v1/models)")] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="requests in flight at once")] = 4,
    timeout: Annotated[float, typer.Option(min=0.1, help="seconds allowed for each request")] = 120.0,
    wait: Annotated[float, typer.Option(min=0, help="seconds to wait for /health to answer (a starting server)")] = 0.0,
    threshold: Annotated[float, typer.Option(min=0, max=1, help="lowest share of exact answers that passes")] = 0.8,
    min_acceptance: Annotated[
        float, typer.Option(min=0, max=1, help="lowest speculative-decoding acceptance rate that passes")
    ] = MIN_ACCEPTANCE,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the result as JSON to this file")] = None,
) -> None:
    """Ask a served model questions with known answers: exit 0 if it answers sensibly, 1 on garbage, a low score
    or a broken speculative-decoding draft."""
    try:
        result = run_probe(
            url,
            model=model,
            concurrency=concurrency,
            timeout=timeout,
            wait=wait,
            threshold=threshold,
            min_acceptance=min_acceptance,
        )
    except ProbeError as e:
        console.print(Text.assemble(("error:", "bold red"), f" {e}"), soft_wrap=True)
        raise typer.Exit(EXIT_UNUSABLE) from None
    out.print(results_table(result))
    style = {"PASS": "bold green", "WRONG": "bold yellow", "GARBAGE": "bold red", "DRAFT-BROKEN": "bold red"}[
        result["verdict"]
    ]
    line = Text.assemble(
        (result["verdict"], style),
        f": {result['correct']}/{result['total']} exact answers (score {result['score']:.2f}, "
        f"threshold {threshold:.2f}), {result['garbled']} garbled, {result['errors']} failed request(s), "
        f"{result['seconds']:.1f} s",
    )
    out.print(line)
    out.print(spec_line(result["speculative"]), soft_wrap=True)
    if json_out:
        json_out.write_text(json.dumps(result, indent=1, ensure_ascii=False))
    if result["verdict"] != "PASS":
        raise typer.Exit(EXIT_FAIL)
