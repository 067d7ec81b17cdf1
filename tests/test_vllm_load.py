"""Stock vLLM's own loader accepts our output: every tensor read and used, every parameter holding our values.

The e2e fixture is converted with BF16 routed experts (the only experts vLLM's CPU build runs) under the
``default`` and ``fp8`` policies and loaded with ``vllm.LLM(...)`` in a subprocess (``vllm_worker.py``,
shims in ``vllm_shims.py``). An observer on the model's ``load_weights`` records what vLLM's weights
iterator read, the name vLLM's ``hf_to_vllm_mapper`` gave each tensor, and every parameter right after
loading (after vLLM fused ``fused_wqa_wkv``, ``fused_wkv_wgate``, ``gate_up_proj`` and the experts'
``w13``, before kernel repacking). vLLM's own ``enable_weights_track`` check is switched on as well.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from helpers import load_all
from vllm_harness import E2E_FIXTURE, expected_parameters, load_record, run_vllm, same_values

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
