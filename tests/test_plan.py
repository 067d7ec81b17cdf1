"""Planning: MTP blocks, deliberate drops, sharding, and what the plan refuses."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO_FIXTURE
from helpers import load_all, mutated_copy

from nvfp4_convert.checkpoint import Checkpoint
from nvfp4_convert.convert import prepare, run
from nvfp4_convert.errors import ConvertError
from nvfp4_convert.inventory import build_inventory
from nvfp4_convert.plan import assign_shards, build_plan
from nvfp4_convert.policy import Policy

NVFP4 = "model.layers.0.self_attn.o_b_proj"  # an NVFP4 [128, 128] linear to dress up as MTP projections


def _with_mtp(t: dict[str, torch.Tensor]) -> None:
    for proj in ("e_proj", "h_proj"):
        for p in ("weight", "weight_scale", "weight_scale_2", "input_scale"):
            t[f"mtp.0.{proj}.{p}"] = t[f"{NVFP4}.{p}"].clone()
    for norm in ("enorm", "hnorm", "norm"):
        t[f"mtp.0.{norm}.weight"] = torch.ones(128)
    for p in ("q_a_proj", "o_b_proj"):  # an MTP block's own attention, in transformers names
        for q in ("weight", "weight_scale", "weight_scale_2", "input_scale"):
            t[f"mtp.0.self_attn.{p}.{q}"] = t[f"model.layers.0.self_attn.{p}.{q}"].clone()


def test_mtp_is_converted_per_the_contract(tmp_path):
    src = mutated_copy(REPO_FIXTURE, tmp_path / "src", _with_mtp, config=lambda c: c.update(num_nextn_predict_layers=1))
    dst = tmp_path / "out"
    report = run(src, dst, Policy())
    out = load_all(dst)
    for proj in ("e_proj", "h_proj"):  # FP8 whatever the policy: vLLM builds them with no prefix
        assert out[f"mtp.0.{proj}.weight"].dtype == torch.float8_e4m3fn
        assert out[f"mtp.0.{proj}.scale"].dtype == torch.float8_e8m0fnu
    assert out["mtp.0.attn.wq_a.weight"].dtype == torch.bfloat16  # the MTP block follows the policy
    # spelled as vLLM builds the MTP layer, layers.{num_hidden_layers + j}: the mtp.0. spelling never matches
    assert {"layers.4.attn.fused_wqa_wkv", "layers.4.attn.wq_a", "layers.4.attn.wkv"} <= set(report["ignored_layers"])
    assert not any(n.startswith("mtp.") for n in report["ignored_layers"])
    assert torch.equal(out["mtp.0.enorm.weight"], torch.ones(128))
    assert not any("no MTP" in n for n in report["notes"])
    import json

    assert json.loads((dst / "config.json").read_text())["compress_ratios"] == [0, 128, 4, 4, 0]


def test_absent_mtp_is_reported(convert_once):
    import json

    report = json.loads((convert_once(REPO_FIXTURE) / "nvfp4-convert-report.json").read_text())
    assert any("no MTP" in n for n in report["notes"])


def test_input_scales_of_converted_linears_are_the_only_drops():
    plan = prepare(REPO_FIXTURE, Policy()).plan
    drops = [a for a in plan.accounts if a.action == "dropped"]
    assert drops and all(a.source.endswith(".input_scale") and ".experts." not in a.source for a in drops)
    assert all("activation scale" in a.reason for a in drops)


def test_sharding_is_order_preserving_and_bounded():
    plan = prepare(REPO_FIXTURE, Policy(), shard_bytes=100_000).plan
    assert [o.name for s in plan.shards for o in s.outputs] == [o.name for o in plan.outputs]
    assert all(s.nbytes <= 100_000 or len(s.outputs) == 1 for s in plan.shards)
    assert plan.shards[0].file == f"model-00001-of-{len(plan.shards):05d}.safetensors"
    assert assign_shards(plan.outputs, 10**12)[0].file == "model-00001-of-00001.safetensors"


def test_nvfp4_experts_need_nvfp4_source(tmp_path):
    def dense_expert(t):
        e = "model.layers.0.mlp.experts.0.gate_proj"
        for p in ("weight_scale", "weight_scale_2", "input_scale"):
            t.pop(f"{e}.{p}")
        t[f"{e}.weight"] = torch.zeros(64, 128, dtype=torch.bfloat16)

    src = mutated_copy(REPO_FIXTURE, tmp_path / "src", dense_expert)
    inv = build_inventory(Checkpoint.open(src))
    with pytest.raises(ConvertError, match="--experts bf16"):
        build_plan(inv, Policy(), src)
    assert build_plan(inv, Policy(experts="bf16"), src).outputs  # a BF16 reference is still possible


@pytest.mark.parametrize(("preset", "min_vllm"), [("default", "0.22"), ("fp8", "0.22"), ("bf16", "0.30")])
def test_the_oldest_vllm_follows_wo_a_and_the_plan_says_so(preset, min_vllm):
    """BF16 ``wo_a`` needs vLLM >= 0.30 (CONTRACT.md section 5): one rule, in the policy, behind the report's
    ``min_vllm`` and the plan's note alike."""
    policy = Policy(preset)
    assert policy.min_vllm == min_vllm
    plan = prepare(REPO_FIXTURE, policy).plan
    notes = [n for n in plan.notes if "wo_a" in n]
    assert notes == (["BF16 wo_a needs vLLM >= 0.30"] if preset == "bf16" else [])
