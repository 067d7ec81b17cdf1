"""Real ModelOpt 0.45 recipe exports (``tests/fixtures/recipes/``): what ``run`` does with each.

So far: the model exported in float32 and the FP8 KV-cache calibration convert, and ``verify`` agrees. The others are
refused today (issue 12 item 3 is making them convert or be refused by name).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from helpers import load_all

from nvfp4_convert.verify import verify

RECIPES = Path(__file__).resolve().parent / "fixtures" / "recipes"


def test_a_float32_export_converts_and_verify_agrees(convert_once):
    src = RECIPES / "nvfp4-fp32"
    dst = convert_once(src, "default", "nvfp4")
    result = verify(dst, source=src)
    assert result["ok"], [f for f in result["findings"] if not f["ok"]][:5]
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
    result = verify(dst, source=src)
    assert result["ok"], [f for f in result["findings"] if not f["ok"]][:5]
