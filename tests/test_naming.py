"""Names: our transformers->native rewrite is the inverse of transformers' own ``deepseek_v4`` rules.

Oracle: ``transformers.conversion_mapping`` (the list transformers uses to load DeepSeek's native
checkpoints) applied by transformers' own ``rename_source_key``.
"""

from __future__ import annotations

import pytest
from helpers import load_all

from nvfp4_convert.naming import detect_naming, is_native, to_native

transformers = pytest.importorskip("transformers")
from transformers.conversion_mapping import get_checkpoint_conversion_mapping  # noqa: E402
from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key  # noqa: E402

# For unfused ModelOpt experts, the oracle merges w1/w3 into gate_up_proj (w1 first: the gate)
# and w2 into down_proj; the per-expert module names follow from that order.
_CONVERTER_HALF = {"gate_up_proj:0": "gate_proj", "gate_up_proj:1": "up_proj", "down_proj:0": "down_proj"}


def transformers_name(native: str) -> str:
    """Rename a native name forward with transformers' own rules (the oracle).

    transformers loads only the ``weight`` of a routed expert (its converter fuses them); the
    module path of an expert's other parameters is the one the oracle gives its ``weight``.
    """
    module, _, param = native.rpartition(".")
    if ".experts." in native and param != "weight":
        return transformers_name(f"{module}.weight").removesuffix(".weight") + f".{param}"
    rules = get_checkpoint_conversion_mapping("deepseek_v4")
    renamings = [r for r in rules if isinstance(r, WeightRenaming)]
    converters = [r for r in rules if isinstance(r, WeightConverter)]
    renamed, pattern = rename_source_key(native, renamings, converters)
    if pattern is not None:  # a routed expert: the converter fuses experts; map back to the unfused module
        converter = next(c for c in converters if pattern in c.source_patterns)
        expert = native.split(".experts.")[1].split(".", 1)[0]
        target = converter.target_patterns[0].split(".")[-1]
        half = _CONVERTER_HALF[f"{target}:{converter.source_patterns.index(pattern)}"]
        renamed = renamed.split(".experts.")[0] + f".experts.{expert}.{half}.{param}"
    return renamed if renamed == "lm_head.weight" else f"model.{renamed}"


def test_every_fixture_name_round_trips_through_transformers_rules(source):
    names = load_all(source).keys()
    for name in names:
        native = to_native(name)
        assert native is not None, name
        assert is_native(native), native
        assert transformers_name(native) == name


def test_every_output_name_maps_back_to_an_input_name(source, convert_once):
    src_names = set(load_all(source))
    for out in load_all(convert_once(source)):
        if out.endswith(".scale"):  # FP8 scales are new tensors of the module whose weight we check
            continue
        assert transformers_name(out) in src_names, out


@pytest.mark.parametrize(
    ("name", "native"),
    [
        ("model.layers.3.self_attn.compressor.kv_norm.weight", "layers.3.attn.compressor.norm.weight"),
        ("model.layers.3.self_attn.kv_norm.weight", "layers.3.attn.kv_norm.weight"),
        ("model.layers.3.self_attn.compressor.indexer.kv_norm.weight", "layers.3.attn.indexer.compressor.norm.weight"),
        ("model.layers.3.self_attn.compressor.indexer.kv_proj.weight", "layers.3.attn.indexer.compressor.wkv.weight"),
        ("model.layers.3.self_attn.compressor.kv_proj.weight", "layers.3.attn.compressor.wkv.weight"),
        ("model.layers.0.mlp.experts.7.up_proj.weight_scale_2", "layers.0.ffn.experts.7.w3.weight_scale_2"),
        ("model.layers.0.mlp.shared_experts.down_proj.input_scale", "layers.0.ffn.shared_experts.w2.input_scale"),
        ("model.layers.1.mlp.gate.e_score_correction_bias", "layers.1.ffn.gate.bias"),
        ("mtp.0.e_proj.weight", "mtp.0.e_proj.weight"),
        ("mtp.0.self_attn.o_a_proj.weight", "mtp.0.attn.wo_a.weight"),
        ("model.mtp.0.mlp.experts.1.gate_proj.weight", "mtp.0.ffn.experts.1.w1.weight"),
    ],
)
def test_tricky_names(name, native):
    assert to_native(name) == native


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.rotary.inv_freq", "model.visual.proj.weight", "foo"])
def test_unknown_names_map_to_none(name):
    assert to_native(name) is None


def test_detect_naming():
    assert detect_naming(["model.layers.0.input_layernorm.weight"]) == "transformers"
    assert detect_naming(["layers.0.attn_norm.weight", "embed.weight"]) == "native"
    with pytest.raises(ValueError):
        detect_naming(["something.else"])
