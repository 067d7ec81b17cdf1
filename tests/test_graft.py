"""``--attention-from REF``: non-expert linears from a BF16/FP8 reference, experts from SRC."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO_FIXTURE
from helpers import load_all, mutated_copy

from nvfp4_convert.codecs import dequantize_fp8_block, quantize_fp8_block
from nvfp4_convert.convert import prepare, run
from nvfp4_convert.errors import ConvertError
from nvfp4_convert.naming import to_native
from nvfp4_convert.policy import Policy
from nvfp4_convert.verify import verify

REF = REPO_FIXTURE.parent / "tiny-dsv4-ref"
pytestmark = pytest.mark.skipif(not REF.exists(), reason="reference fixture not present")


@pytest.fixture(scope="module")
def grafted(tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("graft") / "out"
    run(REPO_FIXTURE, dst, Policy(), attention_from=REF)
    return dst


def _ref_errors(dst: Path) -> dict[str, float]:
    result = verify(dst, reference=REF)
    assert result["ok"], [f for f in result["findings"] if not f["ok"]][:3]
    return {f["tensor"]: f["metrics"]["rel_error"] for f in result["findings"] if f["check"] == "vs reference"}


def test_grafted_output_has_fp8_level_errors_where_plain_has_nvfp4_level(grafted, convert_once):
    grafted_err, plain_err = _ref_errors(grafted), _ref_errors(convert_once(REPO_FIXTURE))
    nvfp4_in_source = {
        to_native(n).removesuffix(".weight_scale") for n in load_all(REPO_FIXTURE) if n.endswith(".weight_scale")
    }
    non_expert = [m for m in grafted_err if ".ffn.experts." not in m]
    assert len(non_expert) >= 40
    for m in non_expert:
        assert grafted_err[m] < 0.04, m  # FP8 (e4m3) rounding, or zero for BF16
        if m in nvfp4_in_source:
            assert plain_err[m] > 0.06, m  # NVFP4 rounding
        else:  # the BF16 o_a_proj of layers 1 and 3: only FP8 rounding either way
            assert plain_err[m] == pytest.approx(grafted_err[m]), m
    for m in (m for m in grafted_err if ".ffn.experts." in m):
        assert grafted_err[m] == plain_err[m]  # experts still come from SRC, untouched


def test_bf16_modules_are_the_reference_bit_for_bit(grafted):
    ref, out = load_all(REF), load_all(grafted)
    q_a = out["layers.2.attn.wq_a.weight"]
    assert q_a.dtype == torch.bfloat16
    assert torch.equal(q_a, ref["model.layers.2.self_attn.q_a_proj.weight"])


def test_experts_still_come_from_the_source_byte_for_byte(grafted, convert_once):
    out, plain = load_all(grafted), load_all(convert_once(REPO_FIXTURE))
    experts = [n for n in plain if ".ffn.experts." in n]
    assert len(experts) == 4 * 4 * 3 * 4
    for n in experts:
        assert torch.equal(out[n].reshape(-1).view(torch.uint8), plain[n].reshape(-1).view(torch.uint8)), n


def test_report_shows_origin_and_what_the_graft_buys(grafted):
    report = json.loads((grafted / "nvfp4-convert-report.json").read_text())
    assert report["reference"] == str(REF)
    errors = {row["module"]: row for row in report["graft_errors"]}
    assert len(errors) >= 40
    for row in errors.values():  # NVFP4 rounding; the BF16 o_a_proj of the source is the reference itself
        assert 0.06 < row["rel_error"] < 0.2 if row["source_format"] == "nvfp4" else row["rel_error"] == 0, row
    taken = [t for t in report["tensors"] if t.get("from") == "reference"]
    replaced = [t for t in report["tensors"] if t["action"] == "dropped" and "--attention-from" in t.get("reason", "")]
    assert len(taken) >= 40 and len(replaced) >= 40
    assert "What --attention-from buys" in (grafted / "nvfp4-convert-report.txt").read_text()


def test_verify_source_rebuilds_the_plan_with_the_reference_the_run_took_tensors_from(grafted):
    """``verify DST --source SRC`` on a grafted output: the report's ``inputs`` name REF, so the attention written from
    REF is compared with REF (its BF16 bytes, FP8 within e4m3) and the experts with SRC, with no option to repeat."""
    report = json.loads((grafted / "nvfp4-convert-report.json").read_text())
    assert report["inputs"]["attention_from"] == str(REF.absolute())
    result = verify(grafted, source=REPO_FIXTURE)
    assert result["ok"], [f for f in result["findings"] if not f["ok"]][:3]
    findings = {f["tensor"]: f["check"] for f in result["findings"]}
    assert findings["layers.0.attn.wq_a.weight"] == "vs source: bytes"  # REF is BF16: copied
    assert findings["layers.0.attn.wo_a.weight"] == "vs source: fp8 within e4m3"


def test_plan_shows_where_each_tensor_comes_from():
    prep = prepare(REPO_FIXTURE, Policy(), attention_from=REF)
    origins = {(a.role, a.origin) for a in prep.plan.accounts}
    assert ("attention", "reference") in origins and ("routed_expert", "source") in origins


@pytest.mark.parametrize(
    ("what", "change", "config"),
    [
        ("a module missing", lambda t: t.pop("model.layers.1.self_attn.q_b_proj.weight"), None),
        (
            "a shape",
            lambda t: t.__setitem__(
                "model.layers.0.self_attn.o_b_proj.weight", torch.zeros(128, 32, dtype=torch.bfloat16)
            ),
            None,
        ),
        ("a config dimension", None, lambda c: c.update(hidden_size=256)),
    ],
)
def test_a_reference_that_does_not_match_is_refused_before_writing(tmp_path, what, change, config):
    bad = mutated_copy(REF, tmp_path / "ref", change, config=config)
    dst = tmp_path / "out"
    with pytest.raises(ConvertError) as err:
        run(REPO_FIXTURE, dst, Policy(), attention_from=bad)
    assert str(bad) in str(err.value)
    assert not dst.exists()


def test_fp8_release_round_trips_through_a_bf16_cast(tmp_path):
    """DeepSeek's release stores these weights FP8 with power-of-two 128x128 scales. A BF16 reference
    made by casting it is exact, and our FP8 path gives back the release's values bit for bit; its
    bytes too, except in blocks whose largest code rounded down to 224, where the ceil rule picks
    half the scale and doubles every code (the same values, another encoding)."""
    vllm_deep_gemm = pytest.importorskip("vllm.utils.deep_gemm")
    ref = load_all(REF)
    linears = {k: v for k, v in ref.items() if k.endswith("_proj.weight") and v.dim() == 2 and ".experts." not in k}
    release, cast = {}, {}
    for name, w in linears.items():
        q, s = vllm_deep_gemm.per_block_cast_to_fp8(w.float(), [128, 128], use_ue8m0=True)  # the release's quantizer
        value = dequantize_fp8_block(q, s)
        cast[name] = value.to(torch.bfloat16)
        assert torch.equal(cast[name].float(), value), name  # exactly representable in BF16
        release[name] = (q, s)
    ref_dir = mutated_copy(REF, tmp_path / "ref", lambda t: t.update(cast))
    dst = tmp_path / "out"
    run(REPO_FIXTURE, dst, Policy("fp8"), attention_from=ref_dir)
    out = load_all(dst)
    same_bytes = other_encoding = 0
    for name, (q, s) in release.items():
        native = to_native(name).removesuffix(".weight")
        if f"{native}.scale" not in out:
            continue  # a module vLLM builds in BF16 whatever the policy (compressors, weights_proj)
        oq, os_ = out[f"{native}.weight"], out[f"{native}.scale"].float()
        assert torch.equal(dequantize_fp8_block(oq, os_), dequantize_fp8_block(q, s)), native
        for bi in range(s.shape[0]):
            for bj in range(s.shape[1]):
                rows, cols = slice(bi * 128, (bi + 1) * 128), slice(bj * 128, (bj + 1) * 128)
                if float(q[rows, cols].float().abs().max()) == 224.0:
                    assert float(os_[bi, bj]) == float(s[bi, bj]) / 2
                    other_encoding += 1
                else:
                    assert float(os_[bi, bj]) == float(s[bi, bj])
                    assert torch.equal(oq[rows, cols].view(torch.uint8), q[rows, cols].view(torch.uint8))
                    same_bytes += 1
    assert same_bytes >= 20
    # the 224 case in miniature: a block whose largest value is exactly 224 * 2^-9 gets scale 2^-10
    q224, s224 = quantize_fp8_block(torch.full((1, 1), 224.0 * 2**-9))
    assert float(s224) == 2**-10 and float(q224.float()) == 448.0
    print(f"blocks with the release's bytes: {same_bytes}; same values, other encoding: {other_encoding}")


def test_e2e_graft_tracks_the_unquantized_reference_at_least_as_well_as_plain_in_transformers(convert_once):
    """Issue 6's acceptance without vLLM (test_vllm_generate.py has it with vLLM, where its CPU forward runs):
    transformers stands in for vLLM. The reference is REF's non-expert weights + the source's dequantized
    experts; each conversion of the e2e fixture (routed experts NVFP4, dequantized as they load) greedily
    generates and is scored against it by the vLLM tests' agreement function."""
    pytest.importorskip("transformers")
    from vllm_harness import (
        E2E_FIXTURE,
        E2E_REF,
        agreement,
        converted_state_dict,
        greedy_generations,
        reference_state_dict,
        transformers_model,
    )

    reference = reference_state_dict(ref=E2E_REF)
    results, weights = {}, {}
    for name, ref in (("plain", None), ("grafted", E2E_REF)):
        weights[name] = converted_state_dict(convert_once(E2E_FIXTURE, "default", "nvfp4", attention_from=ref))
        model = transformers_model(weights[name])  # strict=True, as the reference's own (in agreement)
        results[name] = agreement(greedy_generations(model, max_tokens=8), ref=E2E_REF)
        print(f"{name} vs the unquantized reference (transformers): {results[name]}")
    assert results["grafted"].matches >= results["plain"].matches, results
    # Why: REF is FP8 with power-of-two block scales, so the default policy's BF16 and FP8 modules give REF's
    # values back exactly; the plain conversion's come from NVFP4.
    non_expert = [k for k in reference if ".mlp.experts." not in k]
    assert all(torch.equal(weights["grafted"][k], reference[k]) for k in non_expert)
    fp8_in_ref = {f"{n.removesuffix('.scale')}.weight" for n in load_all(E2E_REF) if n.endswith("_proj.scale")}
    assert len(fp8_in_ref) == 32
    assert {k for k in non_expert if not torch.equal(weights["plain"][k], reference[k])} == fp8_in_ref
