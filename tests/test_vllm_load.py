"""Stock vLLM's own loader accepts our output: every tensor read and used, every parameter holding our values.

The e2e fixture is converted with BF16 routed experts (the only experts vLLM's CPU build runs) under the
``default`` and ``fp8`` policies and loaded with ``vllm.LLM(...)`` in a subprocess (``vllm_worker.py``,
shims in ``vllm_shims.py``). An observer on the model's ``load_weights`` records what vLLM's weights
iterator read, the name vLLM's ``hf_to_vllm_mapper`` gave each tensor, and every parameter right after
loading (after vLLM fused ``fused_wqa_wkv``, ``fused_wkv_wgate``, ``gate_up_proj`` and the experts'
``w13``, before kernel repacking). vLLM's own ``enable_weights_track`` check is switched on as well.

The recipe tensor kinds (FP8 KV-cache scales, a float32 export, per-tensor FP8 attention, NVFP4 block 32) are planted
into the e2e model and their outputs loaded the same way, one vLLM run each.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

import torch
from helpers import Tensors, load_all, modelopt_value, mutated_copy
from vllm_harness import E2E_FIXTURE, expected_parameters, load_record, run_vllm, same_values

from nvfp4_convert.convert import run
from nvfp4_convert.policy import Policy

POLICIES = ["default", "fp8"]


@pytest.fixture(scope="module", params=POLICIES)
def loaded(request, convert_once, tmp_path_factory):
    dst = convert_once(E2E_FIXTURE, request.param, "bf16")
    run = run_vllm(dst, tmp_path_factory.mktemp(f"vllm-{request.param}"))
    return request.param, load_all(dst), load_record(run)


def test_vllm_reads_and_maps_every_tensor(loaded):
    policy, ckpt, rec = loaded
    read = [name for name, _ in rec["ckpt"]]
    assert sorted(read) == sorted(ckpt), f"{policy}: vLLM's weights iterator read a different set of tensors"
    dropped = [name for name, mapped in rec["ckpt"] if mapped is None]
    assert not dropped, f"{policy}: vLLM's hf_to_vllm_mapper drops {dropped}"
    # Everything but the head goes on to the inner model's loader, under the mapped name.
    to_model = sorted(m.removeprefix("model.") for _, m in rec["ckpt"] if m.startswith("model."))
    assert sorted(rec["model"]) == to_model
    assert len(to_model) == len(ckpt) - 1  # lm_head.weight is loaded by the top-level module


def test_every_parameter_holds_our_values(loaded):
    policy, ckpt, rec = loaded
    params = rec["params"]
    assert set(rec["loaded"]) == set(params), f"{policy}: load_weights reports a different set of parameters"
    expected, used_by = expected_parameters(ckpt, dict(rec["ckpt"]))
    assert set(used_by) == set(ckpt)
    assert set(expected) == set(params), (
        f"{policy}: parameters without a checkpoint tensor: {sorted(set(params) - set(expected))}; "
        f"tensors aimed at no parameter: {sorted(set(expected) - set(params))}"
    )
    wrong = [n for n in params if not same_values(params[n], expected[n])]
    assert not wrong, f"{policy}: vLLM holds other values than ours in {wrong}"
    # Only widenings/narrowings vLLM chose by design (float32 norms held in BF16, tid2eid int32) change dtype;
    # no FP8 tensor is converted numerically.
    converted = {n for n in params if params[n].dtype != expected[n].dtype}
    assert all(params[n].dtype.itemsize > 1 and expected[n].dtype.itemsize > 1 for n in converted)


def test_fp8_tensors_arrive_as_fp8_with_e8m0_scales(loaded):
    import torch

    policy, _, rec = loaded
    params = rec["params"]
    fp8 = sorted(n for n, p in params.items() if p.dtype == torch.float8_e4m3fn)
    assert fp8, f"{policy}: no FP8 parameter"
    for n in fp8:
        scale = params[n.removesuffix("weight") + "weight_scale_inv"]
        assert scale.dtype == torch.float8_e8m0fnu, n
        assert tuple(scale.shape) == tuple(-(-d // 128) for d in params[n].shape), n
    wo_a = [n for n in fp8 if n.endswith(".attn.wo_a.weight")]
    assert len(wo_a) == 3
    if policy == "fp8":
        assert any(n.endswith(".attn.fused_wqa_wkv.weight") for n in fp8)


# The recipe fixtures (tests/fixtures/recipes/) have head_dim 64, which vLLM CPU 0.32 cannot build ("Unsupported
# head_dim for fused quant+cache: 64"): each recipe's tensor kinds are planted into the e2e model instead.
def _kv_fp8(t: Tensors) -> None:
    layers = {n.split(".")[2] for n in t if n.startswith("model.layers.")}
    for i in layers:
        t[f"model.layers.{i}.self_attn.k_proj.k_scale"] = torch.tensor(0.0074)
        t[f"model.layers.{i}.self_attn.v_proj.v_scale"] = torch.tensor(0.0074)


def _float32(t: Tensors) -> None:
    for n in [n for n in t if n in ("model.embed_tokens.weight", "lm_head.weight") or n.endswith(".mlp.gate.weight")]:
        t[n] = t[n].float()


def _attn_fp8(t: Tensors) -> None:
    """ModelOpt per-tensor FP8 on every self_attn linear: e4m3 weight, float32 scalar weight_scale, input_scale."""
    for m in [n.removesuffix(".weight_scale_2") for n in t if ".self_attn." in n and n.endswith(".weight_scale_2")]:
        x = modelopt_value(t, m)
        scale = x.abs().max() / 448
        t[f"{m}.weight"] = (x / scale).to(torch.float8_e4m3fn)
        t[f"{m}.weight_scale"] = scale.reshape(())
        del t[f"{m}.weight_scale_2"]


def _bs32(t: Tensors) -> None:
    """NVFP4 block 32 on every non-expert linear: every other block scale of the block-16 export."""
    for n in [n for n in t if n.endswith(".weight_scale") and ".mlp.experts." not in n]:
        t[n] = t[n][:, 0::2].contiguous()


RECIPE_KINDS = {
    "nvfp4-kv-fp8": _kv_fp8,
    "nvfp4-fp32": _float32,
    "experts-nvfp4-attn-fp8": _attn_fp8,
    "nvfp4-bs32": _bs32,
}


@pytest.mark.parametrize("recipe", list(RECIPE_KINDS))
def test_vllm_loads_every_recipe_output_with_our_values(recipe, tmp_path_factory):
    """The converted output (default policy, BF16 experts) of each recipe's tensor kinds: vLLM reads every tensor and
    every parameter holds our values (as ``test_every_parameter_holds_our_values``)."""
    work = tmp_path_factory.mktemp(f"recipe-{recipe}")
    src = mutated_copy(E2E_FIXTURE, work / "src", RECIPE_KINDS[recipe])
    run(src, work / "dst", Policy("default", "bf16"))
    ckpt, rec = load_all(work / "dst"), load_record(run_vllm(work / "dst", work))
    assert sorted(name for name, _ in rec["ckpt"]) == sorted(ckpt)
    params = rec["params"]
    expected, used_by = expected_parameters(ckpt, dict(rec["ckpt"]))
    assert set(used_by) == set(ckpt) and set(expected) == set(params)
    wrong = [n for n in params if not same_values(params[n], expected[n])]
    assert not wrong, f"{recipe}: vLLM holds other values than ours in {wrong}"
