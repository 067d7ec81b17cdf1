"""``vllm_names.DroppedNames``: vLLM's own DeepSeek-V4 ``hf_to_vllm_mapper``, asked from a child process."""

from __future__ import annotations

from pathlib import Path

import pytest

from nvfp4_convert import vllm_names
from nvfp4_convert.vllm_names import DroppedNames


def test_the_mapper_keeps_native_names_and_drops_what_vllm_drops():
    pytest.importorskip("vllm")
    from vllm.models.deepseek_v4.nvidia.model import DeepseekV4ForCausalLM

    names = ["embed.weight", "layers.0.attn.wo_a.weight", "layers.0.ffn.experts.3.w1.weight_scale_2", "head.weight"]
    names += ["model.layers.0.self_attn.q_a_proj.weight", "layers.0.attn.k_scale"]
    want = [n for n in names if DeepseekV4ForCausalLM.hf_to_vllm_mapper._map_name(n) is None]  # vLLM's own answer
    check = DroppedNames(names)
    assert check.result() == want and check.unavailable is None
    again = DroppedNames(names[:1])  # the same child answers again (vLLM imported once per process)
    assert again.result() == [] and vllm_names._child is not None and vllm_names._child.poll() is None


def test_an_interpreter_without_vllm_is_said_and_gives_no_answer(tmp_path: Path, monkeypatch):
    fake = tmp_path / "vllm"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('no vLLM in this interpreter')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the child finds this vllm first
    monkeypatch.setattr(vllm_names, "_child", None)  # a child of its own, not the one earlier tests started
    check = DroppedNames(["embed.weight"])
    assert check.result() is None
    assert check.unavailable == "ImportError: no vLLM in this interpreter"
