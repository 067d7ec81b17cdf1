"""Shared machinery of the vLLM tests: run stock vLLM on a converted checkpoint (once per checkpoint and
session, in a subprocess), build the float32 transformers reference, score greedy agreement, plant faults.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from helpers import Tensors, load_all, mutated_copy

from nvfp4_convert.naming import to_native
from nvfp4_convert.preflight import reference
from nvfp4_convert.preflight.faults import FAULTS
from nvfp4_convert.preflight.reference import Agreement, dequantized_state_dict

TESTS = Path(__file__).resolve().parent
E2E_FIXTURE = TESTS / "fixtures" / "tiny-dsv4-e2e"
E2E_REF = TESTS / "fixtures" / "tiny-dsv4-e2e-ref"  # its weights before quantization, no routed experts
WORKER = TESTS / "vllm_worker.py"

# Three fixed prompts (token ids of the 256-token vocabulary; 0 = bos and 1 = eos avoided), 16 greedy steps each.
PROMPTS = [
    [36, 147, 218, 207, 197, 18, 67, 32, 128, 196, 117, 122, 168, 99, 203, 55, 26, 126, 9, 230, 215, 101, 112, 157],
    [246, 222, 244, 219, 16, 25, 23, 94, 215, 45, 190, 209, 173, 220, 80, 66, 157, 56, 157, 11, 150, 176, 42, 112,
     165, 102, 207, 187, 222, 132, 245],
    [62, 153, 141, 35, 96, 236, 156, 123, 162, 150, 18, 157, 5, 234, 216, 122, 68, 143, 61, 51, 185, 122, 140, 216,
     142, 123, 103, 165, 222, 40, 61, 164, 40, 224, 239, 135, 101, 191],
]  # fmt: skip
MAX_TOKENS = 16

# vLLM's fused parameters, stated independently of vLLM: (shard substring in vLLM's name, fused substring, order).
STACKED = [
    (".attn.wq_a.", ".attn.fused_wqa_wkv.", 0),
    (".attn.wkv.", ".attn.fused_wqa_wkv.", 1),
    (".compressor.wkv.", ".compressor.fused_wkv_wgate.", 0),
    (".compressor.wgate.", ".compressor.fused_wkv_wgate.", 1),
    (".shared_experts.w1.", ".shared_experts.gate_up_proj.", 0),
    (".shared_experts.w3.", ".shared_experts.gate_up_proj.", 1),
]
ROUTED_EXPERT = re.compile(r"^(.*\.ffn\.experts)\.(\d+)\.(w[123])\.weight$")


@dataclass
class VllmRun:
    dst: Path
    mode: str  # "generate" or "load-only" (a CPU without the AVX-512 kernels, see vllm_worker.py)
    missing_ops: list[str]
    generations: list[dict] | None
    load_record: Path
    log: Path


_runs: dict[Path, VllmRun] = {}


def run_vllm(dst: Path, workdir: Path) -> VllmRun:
    """Run ``vllm_worker.py`` on ``dst`` (once per session and checkpoint) with the fixed prompts."""
    dst = dst.resolve()
    if dst in _runs:
        return _runs[dst]
    out = workdir / "vllm-run"
    out.mkdir(parents=True, exist_ok=True)
    prompts = out / "prompts.json"
    prompts.write_text(json.dumps({"prompts": PROMPTS, "max_tokens": MAX_TOKENS}))
    log = out / "worker.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
    with log.open("w") as fh:
        proc = subprocess.run(
            [sys.executable, str(WORKER), str(dst), str(out), "--prompts", str(prompts)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
            timeout=900,
            check=False,
        )
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-40:])
        raise AssertionError(f"vLLM worker failed on {dst} (exit {proc.returncode}); log {log}:\n{tail}")
    result = json.loads((out / "result.json").read_text())
    run = VllmRun(dst, result["mode"], result["missing_ops"], result.get("generations"), out / "load.pt", log)
    _runs[dst] = run
    return run


def load_record(run: VllmRun) -> dict:
    return torch.load(run.load_record, weights_only=False)


# ----------------------------------------------------------------------------------------------------------
# What vLLM's parameters must hold, built from our checkpoint


def expected_parameters(ckpt: Tensors, mapped: dict[str, str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """vLLM parameter name -> the value it must hold, from our tensors and vLLM's name for each.

    ``mapped``: our name -> the name vLLM's ``hf_to_vllm_mapper`` gave it. Fusing follows ``STACKED``
    (concatenation along dim 0 in order) and the routed experts' ``w13 = [w1; w3]``, ``w2``, stacked
    over experts. Also returns, per our name, the parameter it went into.
    """
    parts: dict[str, dict] = {}
    used_by: dict[str, str] = {}
    for ours, vname in mapped.items():
        t = ckpt[ours]
        m = ROUTED_EXPERT.match(vname)
        if m:
            prefix, e, w = m[1], int(m[2]), m[3]
            pname = f"{prefix}.routed_experts.{'w2' if w == 'w2' else 'w13'}_weight"
            parts.setdefault(pname, {})[(e, {"w1": 0, "w3": 1, "w2": 0}[w])] = t
        else:
            for shard, fused, order in STACKED:
                if shard in vname:
                    pname = vname.replace(shard, fused)
                    parts.setdefault(pname, {})[(0, order)] = t
                    break
            else:
                pname = vname
                parts.setdefault(pname, {})[(0, 0)] = t
        used_by[ours] = pname
    expected = {}
    for pname, pieces in parts.items():
        experts = sorted({e for e, _ in pieces})
        rows = [torch.cat([pieces[(e, o)] for o in sorted(o for ee, o in pieces if ee == e)]) for e in experts]
        expected[pname] = torch.stack(rows) if ".routed_experts." in pname else rows[0]
    return expected, used_by


def same_values(held: torch.Tensor, ours: torch.Tensor) -> bool:
    """vLLM's tensor equals ours converted to vLLM's dtype (bit-exact; 1-byte floats compared as bytes)."""
    if held.shape != ours.shape:
        return False
    want = ours.to(held.dtype)
    if held.dtype.itemsize == 1 and held.dtype.is_floating_point:
        return torch.equal(held.view(torch.uint8), want.view(torch.uint8))
    return torch.equal(held, want)


# ----------------------------------------------------------------------------------------------------------
# The reference: transformers' DeepseekV4ForCausalLM in float32 holding the source's dequantized weights, or, given
# REF (``--attention-from``'s reference, e.g. ``E2E_REF``), REF's non-expert weights and the source's routed experts


def source_state_dict(src: Path = E2E_FIXTURE) -> Tensors:
    """The weights ModelOpt's fake-quantized model had, by transformers names, experts fused as transformers holds them."""
    return dequantized_state_dict(load_all(src))


def reference_state_dict(src: Path = E2E_FIXTURE, ref: Path | None = None) -> Tensors:
    """``source_state_dict(src)``; with ``ref``, every non-expert tensor taken from REF instead (which has them all)."""
    sd = source_state_dict(src)
    if ref is None:
        return sd
    theirs = {k: v for k, v in dequantized_state_dict(load_all(ref)).items() if ".mlp.experts." not in k}
    ours = {k for k in sd if ".mlp.experts." not in k}
    assert set(theirs) == ours, (
        f"{ref}: missing {sorted(ours - set(theirs))[:5]}, extra {sorted(set(theirs) - ours)[:5]}"
    )
    sd.update(theirs)
    return sd


def converted_state_dict(dst: Path, src: Path = E2E_FIXTURE) -> Tensors:
    """A converted checkpoint (native names, any formats) back in transformers' names and float32, as it would load."""
    names = {}
    for name in load_all(src):  # the source's transformers names; FP8 output adds a block scale to some weights
        for n in (name, f"{name.removesuffix('.weight')}.scale"):
            native = to_native(n)
            if native is not None:
                names.setdefault(native, n)
    out = load_all(dst)
    unknown = sorted(set(out) - set(names))
    assert not unknown, f"{dst}: tensors without a transformers name: {unknown[:5]}"
    return dequantized_state_dict({names[k]: v for k, v in out.items()})


def transformers_model(state_dict: Tensors, src: Path = E2E_FIXTURE):
    """transformers' ``DeepseekV4ForCausalLM`` of ``src``'s config in float32 holding ``state_dict`` (strict)."""
    return reference.transformers_model(state_dict, src / "config.json")


@lru_cache(maxsize=2)
def reference_model(src: Path = E2E_FIXTURE, ref: Path | None = None):
    return transformers_model(reference_state_dict(src, ref), src)


def greedy_generations(model, prompts: list[list[int]] = PROMPTS, max_tokens: int = MAX_TOKENS) -> list[dict]:
    """What ``vllm_worker.py`` returns, from a transformers model: greedy tokens and their logprobs."""
    return reference.greedy_generations(model, prompts, max_tokens)


def agreement(generations: list[dict], prompts: list[list[int]] = PROMPTS, ref: Path | None = None) -> Agreement:
    """Teacher-force the reference (``reference_model(ref=ref)``) on vLLM's tokens: same greedy token? logprob of
    vLLM's token? (``nvfp4_convert.preflight.reference.score_decode``, the preflight's own score)"""
    steps = reference.teacher_forced(reference_model(ref=ref), prompts, generations)
    return reference.score_decode(steps, generations)


# ----------------------------------------------------------------------------------------------------------
# Planted faults (CONTRACT.md section 4): a converted checkpoint with one known mistake


def plant_fault(dst: Path, out: Path, fault: str) -> Path:
    """A copy of the converted checkpoint ``dst`` in ``out`` with one planted fault (see ``FAULTS``)."""
    return mutated_copy(dst, out, FAULTS[fault])  # the preflight's own faults (nvfp4_convert.preflight.faults)
