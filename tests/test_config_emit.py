"""config.json / hf_quant_config.json: accepted by vLLM's own config and quantization classes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO_FIXTURE

from nvfp4_convert.config_emit import compress_ratios, num_hash_layers, vllm_config
from nvfp4_convert.errors import ConvertError


def _src_config() -> dict:
    return json.loads((REPO_FIXTURE / "config.json").read_text())


def test_derived_keys_from_transformers_form():
    cfg = vllm_config(_src_config(), ["layers.0.attn.wq_b"])
    assert cfg["compress_ratios"] == [0, 128, 4, 4]
    assert cfg["num_hash_layers"] == 2
    assert cfg["topk_method"] == "noaux_tc"
    assert cfg["expert_dtype"] == "fp4"
    assert "mlp_layer_types" not in cfg
    assert cfg["quantization_config"] == {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
        "scale_fmt": "ue8m0",
        "moe_quant_algo": "NVFP4",
        "ignored_layers": ["layers.0.attn.wq_b"],
    }


def test_deepseek_native_form_is_kept():
    src = {k: v for k, v in _src_config().items() if k not in ("layer_types", "mlp_layer_types")}
    src.update(compress_ratios=[0, 128, 4, 4], num_hash_layers=3)
    assert compress_ratios(src) == [0, 128, 4, 4]
    assert num_hash_layers(src) == 3


def test_mtp_layers_get_a_compress_ratio():
    src = _src_config() | {"num_nextn_predict_layers": 1}
    assert compress_ratios(src) == [0, 128, 4, 4, 0]


@pytest.mark.parametrize("drop", [("layer_types", "compress_ratios"), ("mlp_layer_types", "num_hash_layers")])
def test_neither_form_stops_with_a_clear_message(drop):
    src = {k: v for k, v in _src_config().items() if k not in drop}
    with pytest.raises(ConvertError, match="cannot derive"):
        vllm_config(src, [])


def test_not_deepseek_v4_is_refused():
    with pytest.raises(ConvertError, match="deepseek_v4"):
        vllm_config(_src_config() | {"model_type": "deepseek_v3"}, [])


vllm_config_mod = pytest.importorskip("vllm.transformers_utils.config")


def test_vllm_accepts_the_output_config_and_rejects_the_source(convert_once, source):
    dst = convert_once(source)
    cfg = vllm_config_mod.get_config(str(dst), trust_remote_code=False)
    assert type(cfg).__name__ == "DeepseekV4Config"
    assert list(cfg.compress_ratios) == json.loads((dst / "config.json").read_text())["compress_ratios"]
    with pytest.raises(Exception, match="mlp_layer_types"):
        vllm_config_mod.get_config(str(source), trust_remote_code=False)


@pytest.mark.parametrize("policy", ["default", "fp8", "bf16"])
def test_vllm_quant_config_selects_block_fp8_and_skips_exactly_the_bf16_layers(convert_once, policy):
    from vllm.model_executor.layers.quantization.utils.quant_utils import is_layer_skipped
    from vllm.models.deepseek_v4.nvidia.model import DeepseekV4ForCausalLM
    from vllm.models.deepseek_v4.quant_config import DeepseekV4FP8Config

    dst = convert_once(REPO_FIXTURE, policy)
    cfg = json.loads((dst / "config.json").read_text())
    qc = cfg["quantization_config"]

    class _Hf:
        model_type = "deepseek_v4"

    assert DeepseekV4FP8Config.override_quantization_method(qc, None, _Hf()) == "deepseek_v4_fp8"
    quant = DeepseekV4FP8Config.from_config(qc)
    assert quant.weight_block_size == [128, 128]
    quant.apply_vllm_mapper(DeepseekV4ForCausalLM.hf_to_vllm_mapper)
    fused = DeepseekV4ForCausalLM.packed_modules_mapping

    def skipped(prefix: str) -> bool:
        return is_layer_skipped(prefix, quant.ignored_layers, fused)

    bf16_attention = policy == "bf16" or policy == "default"
    for layer in range(4):
        p = f"model.layers.{layer}"
        assert skipped(f"{p}.attn.fused_wqa_wkv") == bf16_attention
        assert skipped(f"{p}.attn.wq_b") == bf16_attention
        assert skipped(f"{p}.attn.wo_b") == bf16_attention
        assert skipped(f"{p}.attn.wo_a") == (policy == "bf16")
        assert skipped(f"{p}.ffn.shared_experts.gate_up_proj") == (policy == "bf16")
        assert skipped(f"{p}.ffn.shared_experts.down_proj") == (policy == "bf16")
        assert not skipped(f"{p}.ffn.experts")
    for layer in (2, 3):  # compressed-sparse layers have the indexer
        assert skipped(f"model.layers.{layer}.attn.indexer.wq_b") == bf16_attention


def test_bf16_experts_are_listed_per_layer(convert_once):
    qc = json.loads((convert_once(REPO_FIXTURE, "default", "bf16") / "config.json").read_text())["quantization_config"]
    assert [f"layers.{i}.ffn.experts" for i in range(4)] == [
        x for x in qc["ignored_layers"] if x.endswith("ffn.experts")
    ]


def test_hf_quant_config_lists_nvfp4_experts(convert_once):
    hq = json.loads((convert_once(REPO_FIXTURE) / "hf_quant_config.json").read_text())["quantization"]
    assert hq["quant_algo"] == "MIXED_PRECISION"
    assert len(hq["quantized_layers"]) == 4 * 4 * 3
    assert hq["quantized_layers"]["layers.0.ffn.experts.0.w1"] == {"quant_algo": "NVFP4", "group_size": 16}


E2E_CONFIG = Path(__file__).parent / "fixtures" / "tiny-dsv4-e2e" / "config.json"


def _rotary_buffers(cfg: dict) -> dict:
    from transformers import DeepseekV4Config
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4RotaryEmbedding

    cfg = {k: v for k, v in cfg.items() if k != "quantization_config"}
    m = DeepseekV4RotaryEmbedding(DeepseekV4Config.from_dict(cfg))
    scaling = {
        f"{t}_attention_scaling": torch.tensor(float(getattr(m, f"{t}_attention_scaling"))) for t in m.layer_types
    }
    return {k: v.clone() for k, v in m.named_buffers()} | scaling


@pytest.mark.parametrize("compress", ["default", "yarn"])
def test_rope_is_written_in_deepseeks_flat_release_form_with_the_same_frequencies(compress):
    """vLLM 0.26 reads only the flat form; transformers (the oracle) must get the same RoPE back from it."""
    pytest.importorskip("transformers")
    src = json.loads(E2E_CONFIG.read_text())
    if compress == "yarn":
        src["rope_parameters"]["compress"] = {
            **src["rope_parameters"]["compress"],
            "rope_type": "yarn",
            "factor": 16.0,
            "original_max_position_embeddings": 1024,
            "beta_fast": 32,
            "beta_slow": 1,
            "attention_factor": 1.0,
        }
    out = vllm_config(src, [])
    flat = out["rope_parameters"]
    assert flat["rope_type"] == "yarn" and not any(isinstance(v, dict) for v in flat.values()), flat
    assert flat["factor"] == (16.0 if compress == "yarn" else 1.0)
    want, got = _rotary_buffers(src), _rotary_buffers(out)
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=0, msg=k)


def test_rope_that_has_no_flat_form_is_kept_nested():
    src = json.loads(E2E_CONFIG.read_text())
    src["rope_parameters"]["main"]["rope_type"] = "yarn"  # YaRN on sliding layers: DeepSeek's form cannot say it
    assert vllm_config(src, [])["rope_parameters"] == src["rope_parameters"]
    src = json.loads(E2E_CONFIG.read_text())
    src["rope_parameters"]["compress"]["partial_rotary_factor"] = 0.25  # differs from the top-level factor
    assert vllm_config(src, [])["rope_parameters"] == src["rope_parameters"]


def test_compress_ratios_follow_the_sources_own_compress_rates():
    src = json.loads(E2E_CONFIG.read_text())
    src["compress_rates"] = {"compressed_sparse_attention": 8, "heavily_compressed_attention": 64}
    assert compress_ratios(src) == [0, 8, 64]
