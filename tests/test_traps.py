"""The seven traps of CONTRACT.md section 4 that produced garbage before: each test fails if its
trap comes back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO_FIXTURE
from helpers import load_all, mutated_copy

from nvfp4_convert.codecs import dequantize_fp8_block, dequantize_nvfp4
from nvfp4_convert.convert import run
from nvfp4_convert.errors import ConvertError
from nvfp4_convert.inspect import inspect_checkpoint
from nvfp4_convert.policy import Policy
from nvfp4_convert.safetensors_io import read_header

pytestmark = pytest.mark.usefixtures("src_unchanged")  # every SRC the tool opened is unchanged afterwards

L2 = "model.layers.2"


def _convert(src: Path, tmp_path: Path, **kw) -> tuple[dict[str, torch.Tensor], dict]:
    dst = tmp_path / "out"
    run(src, dst, Policy(kw.pop("policy", "default"), kw.pop("experts", "nvfp4")), **kw)
    return load_all(dst), json.loads((dst / "nvfp4-convert-report.json").read_text())


def test_1_input_scale_never_touches_weights(tmp_path, convert_once):
    """Scaling every activation scale by 1000 changes no converted weight byte."""

    def scale_inputs(t):
        for k in t:
            if k.endswith("input_scale") and ".experts." not in k:
                t[k] = t[k] * 1000

    out, _ = _convert(mutated_copy(REPO_FIXTURE, tmp_path / "src", scale_inputs), tmp_path)
    ref = load_all(convert_once(REPO_FIXTURE))
    for name, t in ref.items():
        if ".experts." not in name:
            assert torch.equal(out[name].view(-1).view(torch.uint8), t.view(-1).view(torch.uint8)), name


def test_2_fp8_block_scales_reproduce_the_source_values(convert_once):
    """Scales of ones or one per-tensor value would put blocks off by 0.75x-1.5x (or into subnormals)."""
    src, out = load_all(REPO_FIXTURE), load_all(convert_once(REPO_FIXTURE, "fp8"))
    for name in (n for n in out if n.endswith(".scale")):
        module = name.removesuffix(".scale")
        tf = {  # the source module of each FP8 output we check
            "attn.wo_a": "self_attn.o_a_proj",
            "attn.wq_a": "self_attn.q_a_proj",
            "ffn.shared_experts.w1": "mlp.shared_experts.gate_proj",
        }.get(module.split(".", 2)[2])
        if tf is None:
            continue
        prefix = f"model.layers.{module.split('.')[1]}.{tf}"
        w = src[f"{prefix}.weight"]
        x = (
            w.float()
            if w.dtype != torch.uint8
            else dequantize_nvfp4(w, src[f"{prefix}.weight_scale"], src[f"{prefix}.weight_scale_2"])
        )
        scale = out[name].float()
        assert len(set(scale.flatten().tolist())) >= 1 and not bool((scale == 1).all()), name
        back = dequantize_fp8_block(out[f"{module}.weight"], out[name])
        assert bool(((back - x).abs() <= x.abs() * 2**-4 + scale.max() * 2**-10).all()), name


def test_3_scale_dtypes_on_disk(convert_once):
    dst = convert_once(REPO_FIXTURE)
    dtypes = {}
    for shard in dst.glob("*.safetensors"):
        dtypes.update({n: t.dtype for n, t in read_header(shard)[0].items()})
    for name, dtype in dtypes.items():
        if name.endswith(".scale"):
            assert dtype == "F8_E8M0", name
        elif name.endswith(".weight_scale"):
            assert dtype == "F8_E4M3" and ".ffn.experts." in name, name
        elif name.endswith((".weight_scale_2", ".input_scale")):
            assert dtype == "F32" and ".ffn.experts." in name, name


def test_4_indexer_compressor_comes_from_its_own_prefix(convert_once):
    src, out = load_all(REPO_FIXTURE), load_all(convert_once(REPO_FIXTURE))

    def deq(prefix):
        return dequantize_nvfp4(src[f"{prefix}.weight"], src[f"{prefix}.weight_scale"], src[f"{prefix}.weight_scale_2"])

    for native, tf in [
        ("attn.indexer.compressor.wkv", "self_attn.compressor.indexer.kv_proj"),
        ("attn.indexer.compressor.wgate", "self_attn.compressor.indexer.gate_proj"),
        ("attn.compressor.wkv", "self_attn.compressor.kv_proj"),
        ("attn.compressor.wgate", "self_attn.compressor.gate_proj"),
    ]:
        expected = deq(f"{L2}.{tf}").to(torch.bfloat16)
        assert torch.equal(out[f"layers.2.{native}.weight"], expected), native
    assert not torch.equal(
        out["layers.2.attn.indexer.compressor.wkv.weight"], out["layers.2.attn.compressor.wkv.weight"]
    )
    assert torch.equal(
        out["layers.2.attn.indexer.compressor.ape"], src[f"{L2}.self_attn.compressor.indexer.position_bias"]
    )


@pytest.mark.parametrize("missing", ["weight_scale", "weight_scale_2"])
def test_5_a_quantized_weight_without_its_scales_stops_the_run(tmp_path, missing):
    victim = f"{L2}.self_attn.o_a_proj.{missing}"
    src = mutated_copy(REPO_FIXTURE, tmp_path / "src", lambda t: t.pop(victim))
    with pytest.raises(ConvertError, match=r"without its " + missing):
        _convert(src, tmp_path)


def test_5_every_converted_weight_has_its_scale_and_every_expert_its_four_tensors(convert_once):
    out = load_all(convert_once(REPO_FIXTURE, "fp8"))
    for name, t in out.items():
        if t.dtype == torch.float8_e4m3fn and name.endswith(".weight"):
            assert name.removesuffix(".weight") + ".scale" in out, name
        if ".ffn.experts." in name and name.endswith(".weight"):
            for p in ("weight_scale", "weight_scale_2", "input_scale"):
                assert name.removesuffix("weight") + p in out, name


@pytest.mark.parametrize("larger", ["gate", "up"])
def test_6_gate_up_global_scales_are_made_equal_and_reported(tmp_path, larger):
    e = f"{L2}.mlp.experts.1"
    bump = "gate_proj" if larger == "gate" else "up_proj"

    def mismatch(t):
        t[f"{e}.{bump}.weight_scale_2"] = t[f"{e}.{bump}.weight_scale_2"] * 2.5

    src_dir = mutated_copy(REPO_FIXTURE, tmp_path / "src", mismatch)
    src = load_all(src_dir)
    out, report = _convert(src_dir, tmp_path)
    w1, w3 = "layers.2.ffn.experts.1.w1", "layers.2.ffn.experts.1.w3"
    assert float(out[f"{w1}.weight_scale_2"]) == float(out[f"{w3}.weight_scale_2"])
    assert float(out[f"{w1}.weight_scale_2"]) == max(
        float(src[f"{e}.gate_proj.weight_scale_2"]), float(src[f"{e}.up_proj.weight_scale_2"])
    )
    assert [f["expert"] for f in report["gate_up_fixes"]] == ["layers.2.ffn.experts.1"]
    assert 0 <= report["gate_up_fixes"][0]["scale_error"] < 2**-5  # the error the fix introduced, reported
    assert report["gate_up_fixes"][0]["rescaled"] == ("w3" if larger == "gate" else "w1")
    g2, u2 = (float(src[f"{e}.{p}.weight_scale_2"]) for p in ("gate_proj", "up_proj"))
    assert inspect_checkpoint(src_dir)["gate_up_mismatches"] == [
        {"expert": "layers.2.ffn.experts.1", "w1": g2, "w3": u2}
    ]
    assert inspect_checkpoint(tmp_path / "out")["gate_up_mismatches"] == []
    for native, tf in ((w1, "gate_proj"), (w3, "up_proj")):
        assert torch.equal(out[f"{native}.weight"], src[f"{e}.{tf}.weight"])  # FP4 codes unchanged
        before = dequantize_nvfp4(
            src[f"{e}.{tf}.weight"], src[f"{e}.{tf}.weight_scale"], src[f"{e}.{tf}.weight_scale_2"]
        )
        after = dequantize_nvfp4(
            out[f"{native}.weight"], out[f"{native}.weight_scale"], out[f"{native}.weight_scale_2"]
        )
        tol = before.abs() * 2**-4 + 6 * 2**-9 * float(out[f"{native}.weight_scale_2"])
        assert bool(((after - before).abs() <= tol).all()), native
    # every other expert is byte-identical
    for name, t in out.items():
        if ".ffn.experts." in name and not name.startswith("layers.2.ffn.experts.1."):
            parts = name.split(".")
            tf = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}[parts[5]]
            source = src[f"model.layers.{parts[1]}.mlp.experts.{parts[4]}.{tf}.{parts[6]}"]
            assert torch.equal(t.reshape(-1).view(torch.uint8), source.reshape(-1).view(torch.uint8)), name


def test_7_an_unrecognised_tensor_stops_the_run_with_its_name(tmp_path):
    name = f"{L2}.self_attn.mystery_proj.weight"
    src = mutated_copy(REPO_FIXTURE, tmp_path / "src", lambda t: t.__setitem__(name, torch.ones(4, 4)))
    with pytest.raises(ConvertError, match=name.replace(".", r"\.")):
        _convert(src, tmp_path)
    assert not (tmp_path / "out").exists()


def test_7_pass_unknown_keeps_it_and_says_so(tmp_path):
    name = f"{L2}.self_attn.mystery_proj.weight"
    src = mutated_copy(REPO_FIXTURE, tmp_path / "src", lambda t: t.__setitem__(name, torch.ones(4, 4)))
    out, report = _convert(src, tmp_path, pass_unknown=True)
    assert torch.equal(out[name.removeprefix("model.")], torch.ones(4, 4))
    assert [t["action"] for t in report["tensors"] if t["source"] == name] == ["passed-unknown"]


def test_6_a_fold_that_would_zero_a_half_is_refused_by_name(tmp_path):
    """A large ratio between the two global scales pushes the smaller half's block scales below e4m3's range:
    the run refuses naming the tensor instead of writing an expert whose half decodes to (nearly) zero."""

    e = f"{L2}.mlp.experts.1"

    def mismatch(t):
        t[f"{e}.gate_proj.weight_scale_2"] = t[f"{e}.gate_proj.weight_scale_2"] * 2.0**20

    src_dir = mutated_copy(REPO_FIXTURE, tmp_path / "src", mismatch)
    with pytest.raises(ConvertError, match=r"differ 1\.049e\+06x: folding them pushes .*refused") as err:
        _convert(src_dir, tmp_path)
    assert f"{e}.up_proj.weight_scale" in str(err.value)
    assert not (tmp_path / "out").exists()  # decided while planning: nothing was written
