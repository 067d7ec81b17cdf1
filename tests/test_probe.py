"""``nvfp4-convert probe`` against a real HTTP server on 127.0.0.1 that answers well, badly or not at all."""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nvfp4_convert.cli import app
from nvfp4_convert.probe import (
    QUESTIONS,
    garble_reasons,
    is_correct,
    is_word_like,
    normalise,
    parse_metrics,
    spec_summary,
)

BY_PROMPT = {q.prompt: q for q in QUESTIONS}
DRAFTS_PER_ANSWER = 50

# What a broken checkpoint's server sends back, one kind per garbage check.
GARBAGE = [
    "42\x00\x01\x02",  # control characters
    "Paris \ufffd\ufffd",  # replacement characters (bytes that were not UTF-8)
    "the the the the the the the the the the",  # a word repeated
    "of the of the of the of the of the of the",  # a phrase repeated
    "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!",  # a character repeated
    "ਸ਼ਕ੍ਰ𝟓ж ΩxЖq ⲧⲁⲓ⁂ ҉҉ 凸ab∑ Яz𝔸",  # tokens mixing scripts
    "answer <｜end▁of▁sentence｜>",  # special tokens as text
]


class SpecMetrics:
    """vLLM's speculative-decoding counters, declared as vllm/v1/spec_decode/metrics.py (SpecDecodingProm, vLLM
    0.32.0) declares them, labelled as vllm/v1/metrics/loggers.py labels them, in a private registry that
    prometheus_client's own ``generate_latest`` writes out: /metrics as vLLM's exporter serves it."""

    def __init__(self, num_spec_tokens: int = 1, *, engines: int = 1, speculative: bool = True) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.registry = CollectorRegistry()
        labels = ["model_name", "engine"]
        self.k = num_spec_tokens
        self.engines = [("dsv4", str(e)) for e in range(engines)]
        # one counter vLLM always exports, so /metrics is never empty
        Gauge(
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            labels,
            registry=self.registry,
        )
        if not speculative:  # no --speculative-config: SpecDecodingProm registers nothing
            return
        self.drafts = Counter(
            "vllm:spec_decode_num_drafts", "Number of spec decoding drafts.", labels, registry=self.registry
        )
        self.draft_tokens = Counter(
            "vllm:spec_decode_num_draft_tokens", "Number of draft tokens.", labels, registry=self.registry
        )
        self.accepted = Counter(
            "vllm:spec_decode_num_accepted_tokens", "Number of accepted tokens.", labels, registry=self.registry
        )
        self.per_pos = Counter(
            "vllm:spec_decode_num_accepted_tokens_per_pos",
            "Accepted tokens per draft position.",
            [*labels, "position"],
            registry=self.registry,
        )
        for lv in self.engines:  # vLLM creates every labelled child up front: zeros before the first draft
            for c in (self.drafts, self.draft_tokens, self.accepted):
                c.labels(*lv)
            for pos in range(num_spec_tokens):
                self.per_pos.labels(*lv, str(pos))

    def observe(self, drafts: int, rate: float) -> None:
        """``drafts`` drafts of K tokens each, spread over the engines, a share ``rate`` of each position accepted."""
        for i, lv in enumerate(self.engines):
            n = drafts // len(self.engines) + (i < drafts % len(self.engines))
            accepted_at = [round(n * rate) for _ in range(self.k)]
            self.drafts.labels(*lv).inc(n)
            self.draft_tokens.labels(*lv).inc(n * self.k)
            self.accepted.labels(*lv).inc(sum(accepted_at))
            for pos, a in enumerate(accepted_at):
                self.per_pos.labels(*lv, str(pos)).inc(a)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class FakeVLLM(BaseHTTPRequestHandler):
    """Just enough of vLLM's OpenAI server: /health, /v1/models, /v1/chat/completions, /metrics."""

    server: FakeServer

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, code: int, body: object | None) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
            pass

    def do_GET(self) -> None:
        if self.path == "/health":
            healthy = time.monotonic() - self.server.started >= self.server.healthy_after
            self._send(200 if healthy else 503, None)
        elif self.path == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": "dsv4", "object": "model"}]})
        elif self.path == "/metrics" and self.server.metrics is not None:
            data = self.server.metrics.text()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        else:
            self._send(404, {"error": "not found"})

    def do_POST(self) -> None:
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(payload)
        if self.server.metrics is not None and self.server.acceptance is not None:
            self.server.metrics.observe(DRAFTS_PER_ANSWER, self.server.acceptance)
        question = BY_PROMPT[payload["messages"][-1]["content"]]
        index = list(BY_PROMPT).index(question.prompt)
        mode = self.server.mode
        if mode == "slow":
            time.sleep(3.0)
        if mode in ("good", "slow") or (mode == "half" and index % 2 == 0):
            # the accepted answer dressed the way models dress it: markdown, a lead-in, a full stop
            answer = question.answers[0]
            content = [answer, f"**{answer}**", f"The answer is {answer}.", f"`{answer}`\n"][index % 4]
        elif mode == "garbled":
            content = GARBAGE[index % len(GARBAGE)]
        else:
            content = "I am not sure about that."
        body = {
            "id": f"chatcmpl-{index}",
            "object": "chat.completion",
            "model": payload["model"],
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": content, "reasoning_content": None}}
                | {"finish_reason": "stop"}
            ],
        }
        self._send(200, body)


class FakeServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self, mode: str, healthy_after: float = 0.0, metrics: SpecMetrics | None = None, acceptance: float | None = None
    ) -> None:
        super().__init__(("127.0.0.1", 0), FakeVLLM)
        self.mode = mode
        self.metrics = metrics  # None: /metrics answers 404
        self.acceptance = acceptance  # share of draft tokens accepted while answering (None: no drafting)
        self.healthy_after = healthy_after
        self.started = time.monotonic()
        self.requests: list[dict] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def serve() -> Iterator:
    servers: list[FakeServer] = []

    def start(mode: str, healthy_after: float = 0.0, **spec: object) -> FakeServer:
        server = FakeServer(mode, healthy_after, **spec)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def probe(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["probe", *args])
    return result.exit_code, result.output


def test_good_answers_pass(serve, tmp_path: Path) -> None:
    server = serve("good")
    code, output = probe(server.url, "--json", str(tmp_path / "p.json"), "--concurrency", "6")
    assert code == 0, output
    assert "PASS" in output
    result = json.loads((tmp_path / "p.json").read_text())
    assert result["verdict"] == "PASS" and result["score"] == 1.0
    assert result["model"] == "dsv4" and result["models"] == ["dsv4"]
    assert (result["correct"], result["total"], result["garbled"], result["errors"]) == (
        len(QUESTIONS),
        len(QUESTIONS),
        0,
        0,
    )
    assert {r["kind"] for r in result["results"]} == {"arithmetic", "fact", "copy", "reverse", "word-problem"}
    # every question was asked once, greedily, of the listed model, with thinking off
    assert sorted(r["messages"][-1]["content"] for r in server.requests) == sorted(BY_PROMPT)
    assert all(r["model"] == "dsv4" and r["temperature"] == 0 for r in server.requests)
    assert all(r["chat_template_kwargs"] == {"thinking": False} for r in server.requests)


def test_garbled_answers_fail(serve, tmp_path: Path) -> None:
    server = serve("garbled")
    code, output = probe(server.url, "--json", str(tmp_path / "p.json"))
    assert code == 1, output
    assert "GARBAGE" in output
    result = json.loads((tmp_path / "p.json").read_text())
    assert result["verdict"] == "GARBAGE"
    assert result["garbled"] == len(QUESTIONS) and result["correct"] == 0
    reasons = " | ".join(r for row in result["results"] for r in row["reasons"])
    for expected in ("non-printable", "runaway repetition", "word-like tokens", "special-token"):
        assert expected in reasons


def test_wrong_answers_fail(serve, tmp_path: Path) -> None:
    server = serve("wrong")
    code, output = probe(server.url, "--json", str(tmp_path / "p.json"))
    assert code == 1, output
    result = json.loads((tmp_path / "p.json").read_text())
    assert (result["verdict"], result["correct"], result["garbled"]) == ("WRONG", 0, 0)


def test_threshold_decides(serve, tmp_path: Path) -> None:
    server = serve("half")
    code, _ = probe(server.url, "--json", str(tmp_path / "p.json"))
    result = json.loads((tmp_path / "p.json").read_text())
    assert code == 1 and result["verdict"] == "WRONG" and result["score"] == 0.5
    code, output = probe(server.url, "--threshold", "0.5")
    assert code == 0, output


def test_request_timeout(serve, tmp_path: Path) -> None:
    server = serve("slow")
    t0 = time.monotonic()
    code, output = probe(server.url, "--timeout", "0.3", "--concurrency", "32", "--json", str(tmp_path / "p.json"))
    assert time.monotonic() - t0 < 2.5  # did not wait for the slow answers
    assert code == 1, output
    result = json.loads((tmp_path / "p.json").read_text())
    assert result["errors"] == len(QUESTIONS) and result["verdict"] == "WRONG"
    assert {r["error"] for r in result["results"]} == {"timed out"}


def test_waits_for_health(serve) -> None:
    server = serve("good", healthy_after=0.6)
    code, output = probe(server.url)
    assert code == 3 and "HTTP 503" in output and "--wait" in output
    code, output = probe(server.url + "/v1/", "--wait", "10")
    assert code == 0, output


def test_dead_port_is_one_clear_line() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, output = probe(f"http://127.0.0.1:{port}", "--wait", "0.3")
    assert code == 3
    assert len(output.strip().splitlines()) == 1
    assert "unreachable" in output and "connection refused" in output


def test_unknown_model(serve) -> None:
    server = serve("good")
    code, output = probe(server.url, "--model", "nope")
    assert code == 3 and "'nope' is not served" in output and "dsv4" in output


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("**42**.", "42"),
        ("The answer is: Paris.", "paris"),
        ("\\boxed{613}", "613"),
        ("1,000", "1000"),
        (" 'Au' ", "au"),
    ],
)
def test_normalise(text: str, expected: str) -> None:
    assert normalise(text) == expected


def test_scoring_is_exact() -> None:
    q = {x.id: x for x in QUESTIONS}
    assert is_correct(q["add"], "42") and is_correct(q["add"], "forty-two") is False
    assert is_correct(q["add"], "<think>17+25</think>\n42")
    assert is_correct(q["add"], "17 + 25 = 42\n42")  # working, then the answer on its own line
    assert not is_correct(q["add"], "421")
    assert is_correct(q["copy-token"], "Zq7-kite-Bm4") and not is_correct(q["copy-token"], "zq7-kite-bm4")
    assert is_correct(q["reverse-word"], "Nretnal") and not is_correct(q["reverse-word"], "lantern")


def test_no_false_garbage() -> None:
    for q in QUESTIONS:
        for a in q.answers:
            assert garble_reasons(a) == [], a
        assert garble_reasons(q.prompt) == [], q.prompt
    prose = (
        "Sure! Paris is the capital of France; it has about 2.1 million inhabitants (2023), "
        "and the Eiffel Tower — built in 1889 — is 330 m tall. Привет, мир. 東京は日本の首都です。"
    )
    assert garble_reasons(prose) == []
    assert all(is_word_like(t) for t in ("don't", "well-known", "$12", "3.14", "x86-64", "Zq7-kite-Bm4", "(2023),"))
    assert not any(is_word_like(t) for t in ("ΩxЖq", "...", "⁂", "a" * 50))


# ------------------------------------------------------------------------------ speculative decoding


@pytest.fixture
def no_prometheus_client(monkeypatch) -> None:
    """``import prometheus_client.parser`` fails: probe falls back to its own parser."""
    monkeypatch.setitem(sys.modules, "prometheus_client.parser", None)


@pytest.mark.parametrize("parser", ["prometheus_client", "fallback"])
def test_spec_healthy_draft(serve, tmp_path: Path, request, parser: str) -> None:
    """Two engines, two draft positions; the server's earlier traffic had a poor rate, the probe's own is ~0.9."""
    if parser == "fallback":
        request.getfixturevalue("no_prometheus_client")
    metrics = SpecMetrics(2, engines=2)
    metrics.observe(1000, 0.1)  # before the probe: counters are cumulative, so only their growth counts
    server = serve("good", metrics=metrics, acceptance=0.9)
    code, output = probe(server.url, "--json", str(tmp_path / "p.json"))
    assert code == 0, output
    result = json.loads((tmp_path / "p.json").read_text())
    spec = result["speculative"]
    assert result["verdict"] == "PASS" and spec["enabled"] is True and spec["broken"] is False
    assert spec["scope"] == "probe"
    assert spec["drafts"] == DRAFTS_PER_ANSWER * len(QUESTIONS)
    assert spec["draft_tokens"] == 2 * spec["drafts"]
    assert spec["acceptance_rate"] == pytest.approx(0.9, abs=0.03)
    assert spec["mean_acceptance_length"] == pytest.approx(1 + 2 * 0.9, abs=0.06)  # 1 + accepted / drafts
    assert spec["per_position"] == [pytest.approx(0.9, abs=0.03)] * 2
    assert "speculative decoding: acceptance rate 8" in output and "during this probe" in output
    assert "FAIL" not in output


def test_spec_broken_draft_fails(serve, tmp_path: Path) -> None:
    server = serve("good", metrics=SpecMetrics(1), acceptance=0.02)
    code, output = probe(server.url, "--json", str(tmp_path / "p.json"))
    assert code == 1, output
    result = json.loads((tmp_path / "p.json").read_text())
    spec = result["speculative"]
    assert result["score"] == 1.0 and result["verdict"] == "DRAFT-BROKEN"
    assert spec["broken"] is True and spec["acceptance_rate"] == pytest.approx(0.02)
    assert spec["mean_acceptance_length"] == pytest.approx(1.02)
    assert "FAIL speculative decoding: acceptance rate 2.0%" in output and "draft (MTP) is broken" in output
    # the bar is an option; garbage still outranks a broken draft
    assert probe(server.url, "--min-acceptance", "0.01")[0] == 0
    garbled = serve("garbled", metrics=SpecMetrics(1), acceptance=0.02)
    code, output = probe(garbled.url, "--json", str(tmp_path / "g.json"))
    result = json.loads((tmp_path / "g.json").read_text())
    assert code == 1 and result["verdict"] == "GARBAGE" and result["speculative"]["broken"] is True
    assert "FAIL speculative decoding" in output


def test_spec_off_is_not_an_error(serve, tmp_path: Path) -> None:
    server = serve("good", metrics=SpecMetrics(speculative=False))
    code, output = probe(server.url, "--json", str(tmp_path / "p.json"))
    assert code == 0, output
    result = json.loads((tmp_path / "p.json").read_text())
    assert result["speculative"] == {
        "enabled": False,
        "broken": False,
        "note": "speculative decoding off (no vllm:spec_decode_* metrics)",
    }
    assert "speculative decoding off" in output
    # a server without /metrics at all: said, not failed
    code, output = probe(serve("good").url, "--json", str(tmp_path / "n.json"))
    assert code == 0, output
    spec = json.loads((tmp_path / "n.json").read_text())["speculative"]
    assert spec["enabled"] is None and "HTTP 404" in spec["note"] and "HTTP 404" in output


def test_spec_falls_back_to_totals(serve, tmp_path: Path) -> None:
    """Counters that did not move during the probe: the totals since the server started are reported (and judged)."""
    metrics = SpecMetrics(1)
    metrics.observe(400, 0.1)
    server = serve("good", metrics=metrics)
    code, output = probe(server.url, "--json", str(tmp_path / "p.json"))
    spec = json.loads((tmp_path / "p.json").read_text())["speculative"]
    assert code == 1 and spec["scope"] == "total" and spec["draft_tokens"] == 400
    assert spec["acceptance_rate"] == pytest.approx(0.1) and spec["broken"] is True
    assert "since the server started" in output


def test_fallback_parser_matches_prometheus_client(monkeypatch) -> None:
    metrics = SpecMetrics(3, engines=2)
    metrics.observe(7, 0.5)
    text = metrics.text().decode() + 'x_total{a="q\\"uo\\\\te",b="n\\nl"} 1e3 1700000000\n'
    expected = parse_metrics(text)
    monkeypatch.setitem(sys.modules, "prometheus_client.parser", None)
    assert parse_metrics(text) == expected
    assert ("x_total", {"a": 'q"uo\\te', "b": "n\nl"}, 1000.0) in expected


def test_spec_summary_edges() -> None:
    zero = {"drafts": 0.0, "draft_tokens": 0.0, "accepted_tokens": 0.0, "accepted_per_position": [0.0]}
    spec = spec_summary(zero, zero)
    assert spec["enabled"] is True and spec["acceptance_rate"] is None and spec["broken"] is False
    assert spec_summary("/metrics timed out", "/metrics timed out")["enabled"] is None
    # a restarted server (counters went down) is judged on its totals
    before = {"drafts": 100.0, "draft_tokens": 100.0, "accepted_tokens": 90.0, "accepted_per_position": [90.0]}
    after = {"drafts": 10.0, "draft_tokens": 10.0, "accepted_tokens": 9.0, "accepted_per_position": [9.0]}
    assert spec_summary(before, after)["scope"] == "total"
