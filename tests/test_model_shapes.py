"""The shapes config.json implies, against transformers' own model (built on the meta device: no memory), and the
refusals of a source that does not match its config.

The oracle: ``DeepseekV4ForCausalLM(config)``'s parameters and buffers, routed experts split per expert as
ModelOpt exports them; checked for the repo's fixtures, the preflight's sizes and transformers' default config
(DeepSeek-V4-Pro's dimensions: 61 layers, 384 experts).
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import REPO_FIXTURE, SHARED_FIXTURE
from helpers import mutated_copy

from nvfp4_convert.convert import prepare
from nvfp4_convert.errors import ConvertError
from nvfp4_convert.model_shapes import expected_shapes
from nvfp4_convert.naming import native_name
from nvfp4_convert.policy import Policy

pytestmark = pytest.mark.usefixtures("src_unchanged")  # every SRC the tool opened is unchanged afterwards

E2E_FIXTURE = REPO_FIXTURE.parent / "tiny-dsv4-e2e"


def _transformers_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    cfg = DeepseekV4Config.from_dict({k: v for k, v in config.items() if k != "quantization_config"})
    with torch.device("meta"):
        model = DeepseekV4ForCausalLM(cfg)
    out = {}
    for name, t in model.state_dict().items():
        m = re.fullmatch(r"(.*\.mlp\.experts)\.(gate_up_proj|down_proj)", name)
        if not m:
            out[name] = tuple(t.shape)
            continue
        for e in range(t.shape[0]):
            if m[2] == "down_proj":
                out[f"{m[1]}.{e}.down_proj.weight"] = tuple(t.shape[1:])
            else:
                half = (t.shape[1] // 2, t.shape[2])
                out[f"{m[1]}.{e}.gate_proj.weight"] = out[f"{m[1]}.{e}.up_proj.weight"] = half
    return out


def _configs() -> dict[str, dict]:
    from transformers import DeepseekV4Config

    from nvfp4_convert.preflight import tiny_model

    configs = {p.name: json.loads((p / "config.json").read_text()) for p in (REPO_FIXTURE, E2E_FIXTURE)}
    if SHARED_FIXTURE.exists():
        configs["shared"] = json.loads((SHARED_FIXTURE / "config.json").read_text())
    configs["preflight-gpu"] = DeepseekV4Config(**tiny_model.config_dict(tiny_model.SIZES["gpu"])).to_dict()
    configs["transformers-default (V4-Pro dims)"] = DeepseekV4Config().to_dict()
    return configs


def test_expected_shapes_are_transformers_own():
    pytest.importorskip("transformers")
    for name, config in _configs().items():
        ours, theirs = expected_shapes(config), _transformers_shapes(config)
        assert ours.keys() == theirs.keys(), (name, sorted(ours.keys() ^ theirs.keys())[:5])
        bad = {k: (ours[k], theirs[k]) for k in ours if ours[k] != theirs[k]}
        assert not bad, (name, list(bad.items())[:5])


def test_every_expected_tensor_has_a_native_name():
    config = json.loads((REPO_FIXTURE / "config.json").read_text())
    assert all(native_name(n, "transformers") for n in expected_shapes(config))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"hidden_size": 256}, r"shape \[.*\] but config\.json implies \[.*256"),
        ({"num_hidden_layers": 3, "layer_types": None}, "num_hidden_layers is 3, the source has 4 layers"),
        ({"n_routed_experts": 3}, "n_routed_experts is 3, the source has 4 routed experts"),
        ({"n_routed_experts": 8}, "n_routed_experts is 8, the source has 4 routed experts"),
        ({"n_routed_experts": 10**9}, "n_routed_experts is 1000000000, the source has 4"),  # never expanded
        ({"n_routed_experts": True}, "n_routed_experts is True, not a count"),
        ({"num_hash_layers": None, "mlp_layer_types": "drop"}, "cannot derive the model's tensors"),
        ({"compress_rates": [4, 128]}, "cannot derive the model's tensors"),
        ({"moe_intermediate_size": 32}, "but config.json implies"),
        ({"o_groups": 4}, "but config.json implies"),
    ],
)
def test_a_source_that_does_not_match_its_config_is_refused_naming_the_tensor(tmp_path, edit, message):
    def change(cfg: dict) -> None:
        for k, v in edit.items():
            if v == "drop":
                del cfg[k]
            elif v is None and k == "layer_types":
                cfg[k] = cfg[k][: edit["num_hidden_layers"]]
                cfg["mlp_layer_types"] = cfg["mlp_layer_types"][: edit["num_hidden_layers"]]
            else:
                cfg[k] = v

    src = mutated_copy(REPO_FIXTURE, tmp_path / "src", config=change)
    with pytest.raises(ConvertError, match=message) as e:
        prepare(src, Policy())
    assert "config.json" in str(e.value)
    if "implies" in message:
        assert "model." in str(e.value) or "lm_head" in str(e.value)  # names a tensor


def test_a_missing_expert_is_refused_naming_it(tmp_path):
    def drop(t: dict) -> None:
        for k in [k for k in t if k.startswith("model.layers.1.mlp.experts.3.")]:
            del t[k]

    src = mutated_copy(REPO_FIXTURE, tmp_path / "src", drop)
    with pytest.raises(
        ConvertError,
        match=r"3 tensor\(s\) config\.json implies are not in the source, first "
        r"model\.layers\.1\.mlp\.experts\.3\.",
    ):
        prepare(src, Policy())
