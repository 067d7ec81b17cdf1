"""Real ModelOpt 0.45 recipe exports (``tests/fixtures/recipes/``): what ``run`` does with each.

- ``nvfp4-fp32`` (a model exported in float32) and ``nvfp4-kv-fp8`` (FP8 KV-cache calibration) convert; verify agrees.
- ``experts-nvfp4-attn-fp8`` (per-tensor FP8 attention) and ``nvfp4-bs32`` (NVFP4 block 32 on non-expert linears)
  convert: those linears are decoded exactly and written as the policy says, BF16 bit-exact and FP8 equal to vLLM's
  own ``per_block_cast_to_fp8(use_ue8m0=True)`` of the decoded values. Block-32 routed experts kept NVFP4 are
  re-encoded exactly to block 16 (a synthetic variant of ``nvfp4-bs32``: ModelOpt's recipe keeps experts at 16).
- ``nvfp4-embed-lm-head``: the NVFP4 embedding and ``lm_head`` are written BF16, bit-exact.
- ``experts-w4a16`` (experts without ``input_scale``) is refused by name with what ``--experts bf16`` costs, which then
  converts; a W4A8 recipe (synthetic: the config says ``W4A8_NVFP4_FP8``) is refused by name likewise.
- ``nvfp4-awq`` (``NVFP4_AWQ_LITE_CFG``; ModelOpt patched to run, see the fixtures README): ModelOpt's export fused the
  shared experts' gate/up scale into ``post_attention_layernorm``, which the router reads unrescaled: refused, naming
  the norm. As if unfused (shared gate/up given a scale of ones), each ``pre_quant_scale`` (non-expert linears) is
  folded exactly, ``decode(W) * pre_quant_scale`` per input column in float32, before BF16/FP8. AWQ routed experts
  kept NVFP4 (synthetic: this export has none) are refused by name; ``--experts bf16`` folds them.
- Any other ModelOpt tensor kind (``output_scale``, ``k_bias``, a scale or ``pre_quant_scale`` on an unquantizable
  module) stops the run naming what it is.

Expected values are computed here (``helpers.modelopt_value``) and, for FP8, by the installed vLLM.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import load_all, modelopt_value, mutated_copy, plant
from typer.testing import CliRunner

from nvfp4_convert.cli import app
from nvfp4_convert.naming import to_native
from nvfp4_convert.verify import verify

RECIPES = Path(__file__).resolve().parent / "fixtures" / "recipes"
vllm_deep_gemm = pytest.importorskip("vllm.utils.deep_gemm")


def _ok(dst: Path, src: Path) -> None:
    result = verify(dst, source=src)
    assert result["ok"], [f for f in result["findings"] if not f["ok"]][:5]


def _accounts(dst: Path) -> dict[str, dict]:
    return {t["source"]: t for t in json.loads((dst / "nvfp4-convert-report.json").read_text())["tensors"]}


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _linears(src: dict[str, torch.Tensor], kind: str) -> list[str]:
    """Transformers module names of the source's linears whose weight is ``kind`` (``fp8``/``nvfp4``), experts aside."""
    dtype = {"fp8": torch.float8_e4m3fn, "nvfp4": torch.uint8}[kind]
    return sorted(
        n.removesuffix(".weight")
        for n, t in src.items()
        if n.endswith(".weight") and t.dtype == dtype and ".mlp.experts." not in n
    )


def _awq_value(src: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    """``modelopt_value`` times the module's AWQ ``pre_quant_scale`` per input column (float32), when it has one."""
    x = modelopt_value(src, module)
    s = src.get(f"{module}.pre_quant_scale")
    return x if s is None else x * s.to(torch.float32)[None, :]


def _assert_written_as_policy_says(src: dict, out: dict, modules: list[str]) -> tuple[int, int]:
    """Each module's output equals its exact decoded value (AWQ ``pre_quant_scale`` folded): BF16 bit for bit (zero
    signs aside), FP8 byte for byte vLLM's ``per_block_cast_to_fp8(x, [128, 128], use_ue8m0=True)``. Returns (BF16,
    FP8) counts."""
    bf16 = fp8 = 0
    for module in modules:
        native = to_native(f"{module}.weight").removesuffix(".weight")
        x = _awq_value(src, module)
        got = out[f"{native}.weight"]
        if got.dtype == torch.bfloat16:
            want = x.to(torch.bfloat16)
            same = (got.view(torch.int16) == want.view(torch.int16)) | ((got == 0) & (want == 0))
            assert bool(same.all()), native
            bf16 += 1
        else:
            q, s = vllm_deep_gemm.per_block_cast_to_fp8(x, [128, 128], use_ue8m0=True)
            assert torch.equal(got.view(torch.uint8), q.view(torch.uint8)), native
            assert torch.equal(out[f"{native}.scale"].to(torch.float32), s.to(torch.float32)), native
            fp8 += 1
    return bf16, fp8


def test_a_float32_export_converts_and_verify_agrees(convert_once):
    src = RECIPES / "nvfp4-fp32"
    dst = convert_once(src, "default", "nvfp4")
    _ok(dst, src)
    # The routers (float32 in this export) are held in BF16 by vLLM's GateLinear: written BF16, rounded by torch.
    source, out = load_all(src), load_all(dst)
    gates = sorted(n for n in source if n.endswith(".mlp.gate.weight"))
    assert gates and all(source[n].dtype == torch.float32 for n in gates)
    for name in gates:
        native = "layers." + name.split(".")[2] + ".ffn.gate.weight"
        assert out[native].dtype == torch.bfloat16
        assert torch.equal(out[native], source[name].to(torch.bfloat16))


def test_kv_cache_scales_are_dropped_with_their_reason_and_the_setting_is_reported(convert_once):
    """hf_ptq.py --kv_cache_qformat fp8: k_scale/v_scale on k_proj/v_proj, modules DeepSeek-V4 does not have."""
    src = RECIPES / "nvfp4-kv-fp8"
    kv = sorted(n for n in load_all(src) if n.endswith(("k_proj.k_scale", "v_proj.v_scale")))
    assert len(kv) == 8  # 4 layers x (k, v)
    dst = convert_once(src, "default", "nvfp4")
    report = json.loads((dst / "nvfp4-convert-report.json").read_text())
    accounts = {t["source"]: t for t in report["tensors"]}
    assert all(accounts[n]["action"] == "dropped" and "KV-cache scale" in accounts[n]["reason"] for n in kv)
    assert any("calibrated with an FP8 KV cache" in n for n in report["notes"])
    assert not any(n.endswith("_scale") and ("k_proj" in n or "v_proj" in n) for n in load_all(dst))
    assert "kv_cache" not in json.dumps(json.loads((dst / "config.json").read_text())["quantization_config"])
    _ok(dst, src)


@pytest.mark.parametrize("policy", ["default", "fp8", "bf16"])
def test_per_tensor_fp8_attention_is_decoded_exactly_and_written_as_the_policy_says(convert_once, policy):
    """experts-nvfp4-attn-fp8: e4m3 weight x float32 scalar weight_scale; input_scale dropped with its reason."""
    src_dir = RECIPES / "experts-nvfp4-attn-fp8"
    dst = convert_once(src_dir, policy, "nvfp4")
    _ok(dst, src_dir)
    src, out = load_all(src_dir), load_all(dst)
    fp8_modules = _linears(src, "fp8")
    assert len(fp8_modules) == 34  # every self_attn linear, compressors and indexer included
    bf16, fp8 = _assert_written_as_policy_says(src, out, fp8_modules)
    assert fp8 == {"default": 4, "fp8": 22, "bf16": 0}[policy]  # wo_a x4; all 5 projections x4 + 2 indexer wq_b
    assert bf16 + fp8 == 34
    accounts = _accounts(dst)
    for module in fp8_modules:
        assert accounts[f"{module}.weight_scale"]["action"] == "consumed"
        dropped = accounts[f"{module}.input_scale"]
        assert dropped["action"] == "dropped" and "FP8 per-tensor (ModelOpt)" in dropped["reason"]
    experts = [n for n in src if ".mlp.experts." in n]
    assert all(_same_bytes(out[to_native(n)], src[n]) for n in experts)


@pytest.mark.parametrize("policy", ["default", "fp8"])
def test_nvfp4_block_32_linears_are_decoded_exactly_and_written_as_the_policy_says(convert_once, policy):
    src_dir = RECIPES / "nvfp4-bs32"
    dst = convert_once(src_dir, policy, "nvfp4")
    _ok(dst, src_dir)
    src, out = load_all(src_dir), load_all(dst)
    modules = _linears(src, "nvfp4")
    assert len(modules) == 46 and all(
        src[f"{m}.weight_scale"].shape[1] * 32 == src[f"{m}.weight"].shape[1] * 2 for m in modules
    )
    bf16, fp8 = _assert_written_as_policy_says(src, out, modules)
    assert bf16 + fp8 == 46 and fp8 > 0
    experts = [n for n in src if ".mlp.experts." in n]  # block 16 in this recipe: bytes kept
    assert all(_same_bytes(out[to_native(n)], src[n]) for n in experts)


def _experts_block_32(t: dict[str, torch.Tensor]) -> None:
    """Routed experts in NVFP4 block 32: every other block scale of the block-16 export (any e4m3 scale is valid)."""
    for n in [n for n in t if ".mlp.experts." in n and n.endswith(".weight_scale")]:
        t[n] = t[n][:, 0::2].contiguous()


def _run_mutated(tmp_path: Path, change) -> tuple[Path, dict, dict, dict]:
    """``nvfp4-bs32`` edited by ``change``, converted by the CLI and verified: DST, SRC's and DST's tensors, accounts."""
    src_dir = mutated_copy(RECIPES / "nvfp4-bs32", tmp_path / "src", change)
    dst = tmp_path / "dst"
    result = CliRunner().invoke(app, ["run", str(src_dir), str(dst), "--quiet", "--workers", "1"])
    assert result.exit_code == 0, result.output
    _ok(dst, src_dir)
    return dst, load_all(src_dir), load_all(dst), _accounts(dst)


def test_block_32_routed_experts_kept_nvfp4_are_re_encoded_exactly_to_block_16(tmp_path):
    dst, src, out, accounts = _run_mutated(tmp_path, _experts_block_32)
    experts = sorted({n.rsplit(".", 1)[0] for n in src if ".mlp.experts." in n})
    assert len(experts) == 48
    for module in experts:
        native = to_native(f"{module}.weight").removesuffix(".weight")
        ws32 = src[f"{module}.weight_scale"].view(torch.uint8)
        ws16 = out[f"{native}.weight_scale"]
        assert ws16.dtype == torch.float8_e4m3fn and ws16.shape[1] * 16 == out[f"{native}.weight"].shape[1] * 2
        assert torch.equal(ws16.view(torch.uint8), ws32.repeat_interleave(2, dim=1)), native  # each scale repeated
        for p in ("weight", "weight_scale_2", "input_scale"):  # the rest byte for byte
            assert _same_bytes(out[f"{native}.{p}"], src[f"{module}.{p}"])
        assert torch.equal(modelopt_value(out, native), modelopt_value(src, module))  # identical values
        assert accounts[f"{module}.weight_scale"]["action"] == "rescaled"
    quant = json.loads((dst / "hf_quant_config.json").read_text())["quantization"]
    assert {v["group_size"] for v in quant["quantized_layers"].values()} == {16}


def _experts_block_32_gate_scaled(t: dict[str, torch.Tensor]) -> None:
    """Block-32 experts whose gate global scale is 3/4 of up's: vLLM fuses w1/w3 under one ``weight_scale_2``."""
    _experts_block_32(t)
    for n in [n for n in t if ".mlp.experts." in n and n.endswith(".gate_proj.weight_scale_2")]:
        t[n] = t[n.replace(".gate_proj.", ".up_proj.")] * 0.75


def test_block_32_experts_with_differing_gate_up_scales_are_restated_and_folded(tmp_path):
    dst, src, out, accounts = _run_mutated(tmp_path, _experts_block_32_gate_scaled)
    gates = sorted({n.rsplit(".", 1)[0] for n in src if ".mlp.experts." in n and ".gate_proj." in n})
    assert len(gates) == 16
    for gate in gates:
        up = gate.replace(".gate_proj", ".up_proj")
        w1, w3 = (to_native(f"{m}.weight").removesuffix(".weight") for m in (gate, up))
        # one global scale for both halves (up's, the larger); gate's block scales x gate/up (float32, ~0.75),
        # rounded by torch's e4m3 cast
        assert out[f"{w1}.weight_scale_2"] == out[f"{w3}.weight_scale_2"] == src[f"{up}.weight_scale_2"]
        ratio = src[f"{gate}.weight_scale_2"].float() / src[f"{up}.weight_scale_2"].float()
        want = (src[f"{gate}.weight_scale"].float() * ratio).to(torch.float8_e4m3fn).view(torch.uint8)
        assert torch.equal(out[f"{w1}.weight_scale"].view(torch.uint8), want.repeat_interleave(2, dim=1)), w1
        assert torch.equal(modelopt_value(out, w3), modelopt_value(src, up))  # up: restated only, identical values
        assert _same_bytes(out[f"{w1}.weight"], src[f"{gate}.weight"])
        assert "x 0.75" in accounts[f"{gate}.weight_scale"]["reason"]
    # verify checks the restated-and-folded scales: the gate scales written unfolded (restated only) fail
    w1 = to_native(f"{gates[0]}.weight").removesuffix(".weight")

    def unfolded(t: dict[str, torch.Tensor]) -> None:
        t[f"{w1}.weight_scale"] = src[f"{gates[0]}.weight_scale"].repeat_interleave(2, dim=1)

    bad = verify(plant(dst, tmp_path / "bad", unfolded), source=tmp_path / "src")
    assert [(f["check"], f["tensor"]) for f in bad["findings"] if not f["ok"]] == [
        ("vs source: folded scale", f"{w1}.weight_scale")
    ]


def test_nvfp4_embedding_and_lm_head_are_written_bf16_bit_exact(convert_once):
    src_dir = RECIPES / "nvfp4-embed-lm-head"
    dst = convert_once(src_dir, "default", "nvfp4")
    _ok(dst, src_dir)
    src, out = load_all(src_dir), load_all(dst)
    for module, native in (("model.embed_tokens", "embed"), ("lm_head", "head")):
        assert src[f"{module}.weight"].dtype == torch.uint8
        assert out[f"{native}.weight"].dtype == torch.bfloat16
        assert torch.equal(out[f"{native}.weight"], modelopt_value(src, module).to(torch.bfloat16)), native
        assert not any(n.startswith(f"{native}.") and n != f"{native}.weight" for n in out)
    accounts = _accounts(dst)
    assert accounts["lm_head.weight"]["action"] == accounts["model.embed_tokens.weight"]["action"] == "dequantized"
    assert accounts["lm_head.input_scale"]["action"] == "dropped"
    assert accounts["model.embed_tokens.weight_scale_2"]["action"] == "consumed"


def _refused(src: Path, dst: Path, *args: str) -> str:
    """Run the CLI on ``src``; it must stop (the exit status of every refusal) with one error line and no DST."""
    result = CliRunner().invoke(app, ["run", str(src), str(dst), "--quiet", *args])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    assert not dst.exists()
    return " ".join(result.output.split())  # the line as one string, whatever the terminal wrapped


def test_weight_only_experts_are_refused_by_name_and_convert_with_bf16_experts(tmp_path, convert_once):
    src_dir = RECIPES / "experts-w4a16"
    line = _refused(src_dir, tmp_path / "dst")
    assert "experts.0.gate_proj.weight" in line and str(src_dir) in line
    assert "W4A16_NVFP4" in line and "no input_scale" in line
    assert "--experts bf16" in line and "786.4 kB instead of 221.4 kB" in line  # 48 x 64 x 128 x 2 bytes
    dst = convert_once(src_dir, "default", "bf16")
    _ok(dst, src_dir)
    src, out = load_all(src_dir), load_all(dst)
    experts = sorted({n.rsplit(".", 1)[0] for n in src if ".mlp.experts." in n})
    for module in experts:
        native = to_native(f"{module}.weight")
        assert torch.equal(out[native], modelopt_value(src, module).to(torch.bfloat16)), native


def test_a_w4a8_recipe_is_refused_by_name(tmp_path):
    """Synthetic: ModelOpt's W4A8_NVFP4_FP8 writes NVFP4-looking tensors whose input_scale is an FP8 activation scale;
    only its quantization_config tells them apart."""

    def w4a8(cfg: dict) -> None:
        cfg["quantization_config"]["quant_algo"] = "W4A8_NVFP4_FP8"

    src = mutated_copy(RECIPES / "nvfp4-kv-fp8", tmp_path / "src", config=w4a8)
    line = _refused(src, tmp_path / "dst")
    assert "W4A8_NVFP4_FP8" in line and "FP8 activations" in line and "--experts bf16" in line


@pytest.mark.parametrize(
    ("name", "what"),
    [
        ("model.layers.0.self_attn.q_a_proj.output_scale", "ModelOpt output_scale on model.layers.0.self_attn.q_a_proj (quant_algo NVFP4): output activation scale"),
        ("model.norm.pre_quant_scale", "ModelOpt pre_quant_scale on model.norm (quant_algo NVFP4): AWQ/SmoothQuant"),
        ("model.layers.1.self_attn.k_proj.k_bias", "ModelOpt k_bias on model.layers.1.self_attn.k_proj (quant_algo NVFP4): KV-cache quantization bias"),
        ("model.norm.weight_scale", "ModelOpt weight_scale on model.norm (quant_algo NVFP4): weight quantization scale on a module"),
    ],
)  # fmt: skip
def test_another_modelopt_tensor_kind_is_named_for_what_it_is(tmp_path, name, what):
    src = mutated_copy(RECIPES / "nvfp4-kv-fp8", tmp_path / "src", lambda t: t.update({name: torch.ones(128)}))
    line = _refused(src, tmp_path / "dst")
    assert name in line and what in line
    assert "no DeepSeek-V4 naming rule" not in line


def test_awq_export_that_fused_the_moe_scale_into_the_norm_is_refused_naming_the_norm(tmp_path):
    """ModelOpt's export of this recipe fused the shared experts' gate/up scale into ``post_attention_layernorm``, which
    the router also reads: refused by name, nothing written."""
    line = _refused(RECIPES / "nvfp4-awq", tmp_path / "dst")
    assert "model.layers.0.post_attention_layernorm.weight" in line and "model.layers.0.mlp.gate " in line
    assert "model.layers.0.mlp.shared_experts.gate_proj has none left" in line and "NVFP4_DEFAULT_CFG" in line


def test_the_fused_norm_is_real_in_modelopts_export_and_the_router_was_not_rescaled():
    """Why the refusal: against ModelOpt's export of the same model without AWQ, this export's MoE norm differs per
    channel (by the fused scale) while the router that reads it, and the routed experts, are the same bytes."""
    awq, plain = load_all(RECIPES / "nvfp4-awq"), load_all(RECIPES / "experts-nvfp4-attn-fp8")
    for layer in range(4):
        p = f"model.layers.{layer}."
        ratio = (
            awq[f"{p}post_attention_layernorm.weight"].float() / plain[f"{p}post_attention_layernorm.weight"].float()
        )
        assert float(ratio.min()) < 0.9 and float(ratio.max()) > 1.1, layer
        assert torch.equal(awq[f"{p}mlp.gate.weight"], plain[f"{p}mlp.gate.weight"])
        assert f"{p}mlp.shared_experts.gate_proj.pre_quant_scale" not in awq
        assert f"{p}mlp.shared_experts.down_proj.pre_quant_scale" in awq
    experts = [n for n in plain if ".mlp.experts." in n]
    assert experts and all(torch.equal(awq[n], plain[n]) for n in experts)


def _awq_unfused(t: dict[str, torch.Tensor]) -> None:
    """The export as if nothing had been fused into the MoE norm: the shared experts' gate/up carry a pre_quant_scale
    again (ones, BF16, as ModelOpt writes scales), so the refusal above does not apply and the folding can be seen."""
    for n in [n for n in t if ".mlp.shared_experts." in n and n.endswith(("gate_proj.weight", "up_proj.weight"))]:
        t[n.replace(".weight", ".pre_quant_scale")] = torch.ones(t[n].shape[1] * 2, dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def awq_unfused(tmp_path_factory) -> Path:
    return mutated_copy(RECIPES / "nvfp4-awq", tmp_path_factory.mktemp("awq") / "src", _awq_unfused)


@pytest.mark.parametrize("policy", ["default", "fp8"])
def test_awq_pre_quant_scale_is_folded_exactly_and_written_as_the_policy_says(convert_once, awq_unfused, policy):
    src_dir = awq_unfused
    dst = convert_once(src_dir, policy, "nvfp4")
    _ok(dst, src_dir)
    src, out = load_all(src_dir), load_all(dst)
    awq = sorted(n.removesuffix(".pre_quant_scale") for n in src if n.endswith(".pre_quant_scale"))
    assert awq and not [m for m in awq if ".mlp.experts." in m]
    modules = _linears(src, "nvfp4")
    assert set(awq) <= set(modules) and len(modules) == 46
    bf16, fp8 = _assert_written_as_policy_says(src, out, modules)
    assert bf16 + fp8 == 46 and fp8 > 0
    as_fp8 = [m for m in awq if out[to_native(f"{m}.weight")].dtype == torch.float8_e4m3fn]
    assert as_fp8 and (len(as_fp8) < len(awq)) == (policy == "default")  # default: BF16 attention but wo_a
    accounts = _accounts(dst)
    for module in awq:
        folded = accounts[f"{module}.pre_quant_scale"]
        assert folded["action"] == "consumed" and "pre_quant_scale folded" in folded["reason"]
    assert not any(n.endswith("pre_quant_scale") for n in out)
    experts = [n for n in src if ".mlp.experts." in n]  # no AWQ scale: bytes kept
    assert all(_same_bytes(out[to_native(n)], src[n]) for n in experts)


def _awq_experts(t: dict[str, torch.Tensor]) -> None:
    """Layer 0's routed experts get an AWQ ``pre_quant_scale`` [in] (BF16, positive, as ModelOpt writes them)."""
    gen = torch.Generator().manual_seed(12)
    for n in [n for n in t if n.startswith("model.layers.0.mlp.experts.") and n.endswith(".weight")]:
        cols = t[n].shape[1] * 2
        t[n.replace(".weight", ".pre_quant_scale")] = (0.5 + torch.rand(cols, generator=gen)).to(torch.bfloat16)


def test_awq_routed_experts_kept_nvfp4_are_refused_by_name_and_fold_with_bf16_experts(tmp_path):
    """Synthetic: ModelOpt's export of this model puts no pre_quant_scale on the routed experts."""
    src_dir = mutated_copy(RECIPES / "nvfp4-awq", tmp_path / "src", lambda t: (_awq_unfused(t), _awq_experts(t)))
    line = _refused(src_dir, tmp_path / "dst")
    assert "model.layers.0.mlp.experts.0.gate_proj.pre_quant_scale" in line and str(src_dir) in line
    assert "12 routed expert linear(s) are AWQ" in line and "--experts bf16" in line
    dst = tmp_path / "bf16"
    result = CliRunner().invoke(app, ["run", str(src_dir), str(dst), "--quiet", "--experts", "bf16"])
    assert result.exit_code == 0, result.output
    _ok(dst, src_dir)
    src, out = load_all(src_dir), load_all(dst)
    experts = sorted({n.rsplit(".", 1)[0] for n in src if n.startswith("model.layers.0.mlp.experts.")})
    assert len(experts) == 12
    for module in experts:
        native = to_native(f"{module}.weight")
        assert torch.equal(out[native], _awq_value(src, module).to(torch.bfloat16)), native
