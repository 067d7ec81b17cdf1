"""NVFP4 routed experts (the default output) land where vLLM's NVIDIA model loads them, byte for byte.

vLLM's CPU build has no NVFP4 MoE path (VLLM-CPU.md section 5), so the experts are proved by names, dtypes
and shapes against vLLM's own code: every expert tensor of the converted e2e fixture is renamed by the NVIDIA
model's ``hf_to_vllm_mapper`` (``vllm/models/deepseek_v4/nvidia/model.py``), routed by the expert params
mapping vLLM builds for that model (``fused_moe_make_expert_params_mapping`` with checkpoint names
w1/w2/w3), and must hit a parameter that ``ModelOptNvFp4FusedMoE.create_weights`` creates (the method vLLM's
``DeepseekV4FP8Config`` picks for ``moe_quant_algo: NVFP4``), with its dtype and per-expert shape. The bytes
must be the source's.
"""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("vllm")

import torch
from helpers import load_all
from vllm_harness import E2E_FIXTURE

SOURCE_PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
EXPERT = re.compile(r"^layers\.(\d+)\.ffn\.experts\.(\d+)\.(w[123])\.(\w+)$")


@pytest.fixture(scope="module")
def converted(convert_once):
    return convert_once(E2E_FIXTURE, "default", "nvfp4")


@pytest.fixture(scope="module")
def expert_layer(converted):
    """A stand-in module holding the parameters ``ModelOptNvFp4FusedMoE.create_weights`` registers."""
    from vllm.model_executor import parameter
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.config import (
        FusedMoEConfig,
        FusedMoEParallelConfig,
        RoutingMethodType,
    )
    from vllm.model_executor.layers.quantization.modelopt import ModelOptNvFp4FusedMoE
    from vllm.models.deepseek_v4.quant_config import DeepseekV4FP8Config

    cfg = json.loads((converted / "config.json").read_text())
    quant = DeepseekV4FP8Config.from_config(cfg["quantization_config"])
    experts, hidden, inter = cfg["n_routed_experts"], cfg["hidden_size"], cfg["moe_intermediate_size"]
    moe = FusedMoEConfig(
        num_experts=experts,
        experts_per_token=cfg["num_experts_per_tok"],
        hidden_dim=hidden,
        intermediate_size=inter,
        num_local_experts=experts,
        num_logical_experts=experts,
        activation=MoEActivation.SILU,
        device="cpu",
        routing_method=RoutingMethodType.DeepSeekV3,
        moe_parallel_config=FusedMoEParallelConfig(
            tp_size=1,
            pcp_size=1,
            dp_size=1,
            ep_size=1,
            tp_rank=0,
            pcp_rank=0,
            dp_rank=0,
            ep_rank=0,
            sp_size=1,
            use_ep=False,
            all2all_backend="naive",
            enable_eplb=False,
        ),
        in_dtype=torch.bfloat16,
    )
    # ModelOptNvFp4FusedMoE.__init__ also selects a GPU kernel backend, which fails on a CPU; create_weights
    # reads only what the base __init__ sets plus quant_config and use_global_sf (no expert parallelism here).
    method = ModelOptNvFp4FusedMoE.__new__(ModelOptNvFp4FusedMoE)
    super(ModelOptNvFp4FusedMoE, method).__init__(moe)
    method.quant_config = quant._get_nvfp4_config()
    method.use_global_sf = False
    layer = torch.nn.Module()
    # vLLM's parameter classes ask the tensor-parallel group for rank and size; answer for a world of one
    # instead of starting torch.distributed in the test process.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(parameter, "get_tensor_model_parallel_rank", lambda: 0)
        mp.setattr(parameter, "get_tensor_model_parallel_world_size", lambda: 1)
        method.create_weights(
            layer,
            num_experts=experts,
            hidden_size=hidden,
            intermediate_size_per_partition=inter,
            params_dtype=torch.bfloat16,
            weight_loader=None,
            global_num_experts=experts,
        )
    return layer, experts, inter


def _vllm_target(name: str, mapping, mapper) -> tuple[str, int, str]:
    """Our expert tensor name -> the parameter name vLLM's NVIDIA model loads it into (vLLM's own rules)."""
    mapped = mapper.map_name(name)
    assert mapped is not None, f"the NVIDIA mapper drops {name}"
    for param_name, weight_name, expert_id, shard_id in mapping:
        if weight_name in mapped:
            return mapped.replace(weight_name, param_name), expert_id, shard_id
    raise AssertionError(f"{name} (mapped {mapped}) matches no expert mapping entry")


def test_expert_tensors_land_on_nvfp4_moe_parameters(converted, expert_layer):
    from vllm.model_executor.layers.fused_moe.layer import fused_moe_make_expert_params_mapping
    from vllm.models.deepseek_v4.nvidia.model import DeepseekV4ForCausalLM

    layer, experts, inter = expert_layer
    params = dict(layer.named_parameters())
    mapper = DeepseekV4ForCausalLM.hf_to_vllm_mapper  # the class attribute: expert_dtype "fp4"
    mapping = fused_moe_make_expert_params_mapping(layer, "w1", "w2", "w3", num_experts=experts)
    ours = load_all(converted)
    names = [n for n in ours if EXPERT.match(n)]
    assert len(names) == 3 * experts * 3 * 4  # layers x experts x {w1,w2,w3} x 4 tensors
    seen: set[tuple[int, str, int, str]] = set()
    for name in names:
        target, expert_id, shard = _vllm_target(name, mapping, mapper)
        layer_idx, e, w, _ = EXPERT.match(name).groups()
        assert expert_id == int(e) and shard == w, name
        prefix = f"model.layers.{layer_idx}.ffn.experts.routed_experts."
        assert target.startswith(prefix), (name, target)
        pname = target.removeprefix(prefix)
        assert pname in params, f"{name} -> {target}: ModelOptNvFp4FusedMoE creates no {pname}"
        p, t = params[pname], ours[name]
        assert p.dtype == t.dtype, (name, p.dtype, t.dtype)
        # One expert's slot; w13 holds gate (w1) then up (w3) along dim 1 of the per-expert tensor.
        slot = p[expert_id]
        if pname.startswith("w13_"):
            half = {"w1": 0, "w3": 1}[shard]
            slot = slot[half] if slot.dim() == 1 else slot[half * inter : (half + 1) * inter]
        assert tuple(slot.shape) == tuple(t.shape), (name, pname, tuple(slot.shape), tuple(t.shape))
        seen.add((int(layer_idx), pname, expert_id, shard))
    for layer_idx in range(3):
        for pname in params:
            for e in range(experts):
                for s in ("w2",) if pname.startswith("w2_") else ("w1", "w3"):
                    assert (layer_idx, pname, e, s) in seen, f"layer {layer_idx}: nothing for {pname} [{e}] {s}"


def test_expert_bytes_equal_the_source(converted):
    ours = load_all(converted)
    src = load_all(E2E_FIXTURE)
    names = [n for n in ours if EXPERT.match(n)]
    assert names
    for name in names:
        layer_idx, e, w, suffix = EXPERT.match(name).groups()
        source = src[f"model.layers.{layer_idx}.mlp.experts.{e}.{SOURCE_PROJ[w]}.{suffix}"]
        t = ours[name]
        assert t.dtype == source.dtype and t.shape == source.shape, name
        assert torch.equal(t.reshape(-1).view(torch.uint8), source.reshape(-1).view(torch.uint8)), name
