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


def test_a_released_child_answers_the_same_and_ends(tmp_path: Path, monkeypatch):
    """``release=True`` (the CLI's ``verify``): asked at once, the same answer, and the child it started is gone after
    it, so its memory is not held while verify decodes; a child already serving the process is kept. A stand-in vLLM
    whose mapper drops ``*.k_scale`` keeps it fast."""
    fake = tmp_path / "vllm" / "models" / "deepseek_v4" / "nvidia"
    fake.mkdir(parents=True)
    for d in (fake, *fake.parents):
        if d == tmp_path:
            break
        (d / "__init__.py").touch()
    (fake / "model.py").write_text(
        "class _Mapper:\n"
        "    def _map_name(self, n):\n"
        "        return None if n.endswith('.k_scale') else n\n"
        "class DeepseekV4ForCausalLM:\n"
        "    hf_to_vllm_mapper = _Mapper()\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setattr(vllm_names, "_child", None)
    check = DroppedNames(["embed.weight", "layers.0.attn.k_scale"], release=True)
    assert check.result() == ["layers.0.attn.k_scale"] and check.unavailable is None
    assert vllm_names._child is not None and vllm_names._child.poll() is not None  # ended
    assert DroppedNames(["a.k_scale"]).result() == ["a.k_scale"]  # a later question starts a new child, kept
    serving = vllm_names._child
    assert DroppedNames(["b.k_scale"], release=True).result() == ["b.k_scale"]  # not its child: not ended
    assert vllm_names._child is serving and serving.poll() is None
