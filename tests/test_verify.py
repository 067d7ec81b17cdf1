"""``verify`` passes a good conversion and fails, naming the tensor, on each planted fault."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import REPO_FIXTURE
from helpers import plant
from typer.testing import CliRunner

from nvfp4_convert.cli import app
from nvfp4_convert.verify import verify

REF = REPO_FIXTURE.parent / "tiny-dsv4-ref"


def _set(name, fn):
    return lambda t: t.__setitem__(name, fn(t))


def _swap(a, b):
    def change(t):
        t[a], t[b] = t[b], t[a]

    return change


def _bump_smallest_block(t: dict[str, torch.Tensor], module: str) -> None:
    """Raise one e4m3 code by 4 steps inside the block with the smallest scale: far outside e4m3 rounding for
    that block, yet tiny next to the largest block scale (which an absolute, band-wide bound would allow)."""
    w, s = t[f"{module}.weight"].view(torch.uint8), t[f"{module}.scale"].float()
    br, bc = divmod(int(s.argmin()), s.shape[1])
    code = w[br * 128, bc * 128]
    w[br * 128, bc * 128] = int(code) + 4 if (int(code) & 0x7F) < 0x70 else int(code) - 4


FAULTS: dict[str, tuple[Callable | None, Callable | None, str]] = {
    # fault: (tensor change, config change, tensor the failure must name)
    "input_scale folded into a weight": (
        _set(
            "layers.0.attn.wq_b.weight", lambda t: (t["layers.0.attn.wq_b.weight"].float() * 448.0).to(torch.bfloat16)
        ),
        None,
        "layers.0.attn.wq_b.weight",
    ),
    "all-ones block scale": (
        _set("layers.2.attn.wo_a.scale", lambda t: torch.ones_like(t["layers.2.attn.wo_a.scale"])),
        None,
        "layers.2.attn.wo_a.weight",
    ),
    "non-power-of-two scale": (
        _set("layers.1.attn.wo_a.scale", lambda t: t["layers.1.attn.wo_a.scale"].float() * 1.5),
        None,
        "layers.1.attn.wo_a.scale",
    ),
    "e4m3 scale where e8m0 belongs": (
        _set(
            "layers.3.ffn.shared_experts.w1.scale",
            lambda t: t["layers.3.ffn.shared_experts.w1.scale"].float().to(torch.float8_e4m3fn),
        ),
        None,
        "layers.3.ffn.shared_experts.w1.scale",
    ),
    "wkv/wgate swapped": (
        _swap("layers.2.attn.compressor.wkv.weight", "layers.2.attn.compressor.wgate.weight"),
        None,
        "layers.2.attn.compressor.wkv.weight",
    ),
    "indexer compressor from the main compressor": (
        _set("layers.3.attn.indexer.compressor.wkv.weight", lambda t: t["layers.3.attn.compressor.wkv.weight"].clone()),
        None,
        "layers.3.attn.indexer.compressor.wkv.weight",
    ),
    "gate/up global-scale mismatch": (
        _set("layers.1.ffn.experts.2.w3.weight_scale_2", lambda t: t["layers.1.ffn.experts.2.w3.weight_scale_2"] * 2),
        None,
        "layers.1.ffn.experts.2",
    ),
    "NaN in an FP8 weight (e4m3 0x7F)": (
        lambda t: t["layers.2.attn.wo_a.weight"].view(torch.uint8).__setitem__((5, 7), 0x7F),
        None,
        "layers.2.attn.wo_a.weight",
    ),
    "FP8 value off by more than e4m3 rounding in a small-scale block": (
        lambda t: _bump_smallest_block(t, "layers.1.attn.wo_a"),
        None,
        "layers.1.attn.wo_a.weight",
    ),
    "missing tensor": (
        lambda t: t.pop("layers.2.attn.indexer.weights_proj.weight"),
        None,
        "layers.2.attn.indexer.weights_proj.weight",
    ),
    "stale NVFP4 tensor beside its converted twin": (
        _set("layers.0.attn.wo_a.weight_scale", lambda t: torch.ones(128, 8).to(torch.float8_e4m3fn)),
        None,
        "layers.0.attn.wo_a",
    ),
    "one byte of a copied NVFP4 expert changed": (
        lambda t: (
            t["layers.1.ffn.experts.3.w2.weight"]
            .view(-1)
            .__setitem__(-1, t["layers.1.ffn.experts.3.w2.weight"].view(-1)[-1] ^ 1)
        ),
        None,
        "layers.1.ffn.experts.3.w2.weight",
    ),
    "layer missing from ignored_layers": (
        None,
        lambda c: c["quantization_config"]["ignored_layers"].remove("layers.1.attn.wq_b"),
        "layers.1.attn.wq_b",
    ),
}


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    from nvfp4_convert.convert import run
    from nvfp4_convert.policy import Policy

    dst = tmp_path_factory.mktemp("good") / "out"
    run(REPO_FIXTURE, dst, Policy())
    return dst


def test_a_good_conversion_passes(good):
    result = verify(good, source=REPO_FIXTURE)
    assert result["ok"], [f for f in result["findings"] if not f["ok"]][:5]
    assert result["checks"] > 300


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_each_planted_fault_fails_naming_the_tensor(tmp_path, good, fault):
    change, config, tensor = FAULTS[fault]
    bad = plant(good, tmp_path / "bad", change, config)
    result = verify(bad, source=REPO_FIXTURE)
    failed = [f for f in result["findings"] if not f["ok"]]
    assert not result["ok"]
    assert any(tensor in f["tensor"] for f in failed), failed[:5]


def test_cli_verdict_and_exit_codes(tmp_path, good):
    runner = CliRunner()
    ok = runner.invoke(app, ["verify", str(good), "--source", str(REPO_FIXTURE), "--json", str(tmp_path / "v.json")])
    assert ok.exit_code == 0 and "PASS" in ok.output
    assert json.loads((tmp_path / "v.json").read_text())["ok"] is True
    bad = plant(good, tmp_path / "bad", FAULTS["missing tensor"][0])
    result = runner.invoke(app, ["verify", str(bad)])
    assert result.exit_code == 1 and "FAIL" in result.output


def test_unfinished_destination_fails(tmp_path, good):
    bad = plant(good, tmp_path / "bad")
    (bad / ".nvfp4-convert").mkdir()
    result = verify(bad)
    assert not result["ok"] and result["findings"][0]["check"] == "finished"


def test_reference_comparison_shows_nvfp4_level_error(good):
    if not REF.exists():
        pytest.skip("reference fixture not present")
    result = verify(good, reference=REF)
    ref = [f for f in result["findings"] if f["check"] == "vs reference"]
    assert result["ok"], [f for f in ref if not f["ok"]][:3]
    assert len(ref) >= 90
    errors = [f["metrics"]["rel_error"] for f in ref]
    assert 0.02 < max(errors) < 0.25  # NVFP4-level, not zero and not garbage


def test_reference_comparison_fails_a_garbage_weight(tmp_path, good):
    if not REF.exists():
        pytest.skip("reference fixture not present")
    bad = plant(
        good, tmp_path / "bad", _set("layers.0.attn.wq_a.weight", lambda t: t["layers.0.attn.wq_a.weight"] * 0.001)
    )
    result = verify(bad, reference=REF)
    assert any(not f["ok"] and f["tensor"] == "layers.0.attn.wq_a" for f in result["findings"])


def test_copies_are_compared_byte_for_byte_and_only_the_changed_tensor_fails(tmp_path, good):
    """The copies are compared in long runs of back-to-back tensors; a difference names its own tensor only."""
    changed = "layers.2.ffn.experts.1.w1.weight_scale"

    def change(t):
        flat = t[changed].view(torch.uint8).view(-1)
        flat[0] ^= 1  # the first byte: right after the tensor before it in the run

    bad = plant(good, tmp_path / "bad", change)
    failed = {f["tensor"] for f in verify(bad, source=REPO_FIXTURE)["findings"] if not f["ok"]}
    assert failed == {changed}
