"""``verify --reference --plot``: one series per module kind, a real PNG."""

from __future__ import annotations

import re

import pytest
from conftest import REPO_FIXTURE
from typer.testing import CliRunner

from nvfp4_convert.cli import app
from nvfp4_convert.plots import layer_series

pytestmark = pytest.mark.usefixtures("src_unchanged")  # every SRC the tool opened is unchanged afterwards

REF = REPO_FIXTURE.parent / "tiny-dsv4-ref"


def test_layer_series_keeps_the_worst_module_of_each_kind_and_layer():
    findings = [
        {"check": "vs reference", "tensor": "layers.0.attn.wo_a", "metrics": {"rel_error": 0.1}},
        {"check": "vs reference", "tensor": "layers.0.ffn.experts.3.w1", "metrics": {"rel_error": 0.2}},
        {"check": "vs reference", "tensor": "layers.0.ffn.experts.9.w1", "metrics": {"rel_error": 0.3}},
        {"check": "vs reference", "tensor": "layers.2.attn.wo_a", "metrics": {"rel_error": 0.05}},
        {"check": "vs source: bytes", "tensor": "layers.1.attn.wo_a", "metrics": {}},
    ]
    assert layer_series(findings) == {"attn.wo_a": {0: 0.1, 2: 0.05}, "ffn.experts.w1": {0: 0.3}}


def test_verify_plot_writes_a_png_with_one_series_per_module_kind(tmp_path, convert_once):
    pytest.importorskip("matplotlib")
    if not REF.exists():
        pytest.skip("reference fixture not present")
    dst = convert_once(REPO_FIXTURE, "default", "nvfp4")
    png = tmp_path / "errors.png"
    js = tmp_path / "v.json"
    args = ["verify", str(dst), "--reference", str(REF), "--plot", str(png), "--json", str(js)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    kinds = int(result.output.split("plot: ")[1].split("(")[1].split()[0])
    import json

    findings = [f for f in json.loads(js.read_text())["findings"] if f["check"] == "vs reference"]
    expected = {re.sub(r"^layers\.\d+\.|(?<=experts)\.\d+", "", f["tensor"]) for f in findings}
    assert kinds == len(expected) >= 10  # one series per module kind: attention, compressors, indexer, experts
    import matplotlib.image

    assert matplotlib.image.imread(png).shape[2] in (3, 4)  # a decodable image


def test_graft_series_puts_nvfp4_derived_and_written_side_by_side():
    from nvfp4_convert.plots import graft_series

    rows = [
        {"module": "layers.0.attn.wo_a", "rel_error": 0.09, "written_rel_error": 0.026},
        {"module": "layers.0.attn.wkv", "rel_error": 0.09, "written_rel_error": 0.0},
        {"module": "layers.1.attn.wkv", "rel_error": 0.08},
    ]
    assert graft_series(rows) == {
        "NVFP4-derived": {"attn.wkv": {0: 0.09, 1: 0.08}, "attn.wo_a": {0: 0.09}},
        "grafted (written)": {"attn.wkv": {0: 0.0}, "attn.wo_a": {0: 0.026}},
    }


def test_run_attention_from_plot_writes_a_png_and_the_written_errors(tmp_path):
    pytest.importorskip("matplotlib")
    if not REF.exists():
        pytest.skip("reference fixture not present")
    import json

    dst, png = tmp_path / "out", tmp_path / "graft.png"
    result = CliRunner().invoke(
        app, ["run", str(REPO_FIXTURE), str(dst), "--attention-from", str(REF), "--plot", str(png), "--quiet"]
    )
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads((dst / "nvfp4-convert-report.json").read_text())["graft_errors"]
    assert rows and all("written_rel_error" in r for r in rows)
    # BF16 reference written as BF16: exact; as FP8 (wo_a, shared experts): e4m3-level, far under NVFP4's
    assert all(r["written_rel_error"] < 0.05 < r["rel_error"] or r["source_format"] != "nvfp4" for r in rows)


def test_plot_without_a_reference_is_refused_in_one_line(tmp_path):
    result = CliRunner().invoke(app, ["run", str(REPO_FIXTURE), str(tmp_path / "o"), "--plot", str(tmp_path / "p.png")])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "--attention-from" in result.output


def test_an_mtp_block_is_not_drawn_as_layer_0():
    findings = [{"check": "vs reference", "tensor": "mtp.0.attn.wo_a", "metrics": {"rel_error": 0.5}}]
    assert layer_series(findings) == {}
