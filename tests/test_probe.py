"""``nvfp4-convert probe`` against a real HTTP server on 127.0.0.1 that answers well, badly or not at all."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nvfp4_convert.cli import app
from nvfp4_convert.probe import QUESTIONS, garble_reasons, is_correct, is_word_like, normalise

BY_PROMPT = {q.prompt: q for q in QUESTIONS}

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


class FakeVLLM(BaseHTTPRequestHandler):
    """Just enough of vLLM's OpenAI server: /health, /v1/models, /v1/chat/completions."""

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
        else:
            self._send(404, {"error": "not found"})

    def do_POST(self) -> None:
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(payload)
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

    def __init__(self, mode: str, healthy_after: float = 0.0) -> None:
        super().__init__(("127.0.0.1", 0), FakeVLLM)
        self.mode = mode
        self.healthy_after = healthy_after
        self.started = time.monotonic()
        self.requests: list[dict] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def serve() -> Iterator:
    servers: list[FakeServer] = []

    def start(mode: str, healthy_after: float = 0.0) -> FakeServer:
        server = FakeServer(mode, healthy_after)
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
