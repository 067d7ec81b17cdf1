"""Shared machinery of the vLLM tests: run stock vLLM on a converted checkpoint (once per checkpoint and
session, in a subprocess), build the float32 transformers reference, score greedy agreement, plant faults.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from helpers import Tensors, load_all, mutated_copy

from nvfp4_convert.codecs import dequantize_fp8_block, dequantize_nvfp4
from nvfp4_convert.naming import to_native

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
MIN_MATCHES = 42  # of len(PROMPTS) * MAX_TOKENS = 48 greedy steps
MAX_MEDIAN_ABS_DLOGP = 0.05

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


def dequantized_state_dict(tensors: Tensors) -> Tensors:
    """float32 weights by transformers name, experts fused as transformers holds them.

    A linear may be stored NVFP4 (``weight_scale``, ``weight_scale_2``; ``input_scale`` is an activation scale and
    is dropped), FP8 with a block ``scale``, or plain; other tensors are cast to float32 (integers kept).
    """
    sd: Tensors = {}
    for name, t in tensors.items():
        if name.endswith((".weight_scale", ".weight_scale_2", ".input_scale")):
            continue  # consumed with their weight
        if name.endswith(".scale") and f"{name.removesuffix('.scale')}.weight" in tensors:
            continue  # an FP8 block scale (not attn_hc.scale and the like, which have no weight beside them)
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and f"{module}.weight_scale" in tensors:
            sd[name] = dequantize_nvfp4(t, tensors[f"{module}.weight_scale"], tensors[f"{module}.weight_scale_2"])
        elif name.endswith(".weight") and f"{module}.scale" in tensors:
            sd[name] = dequantize_fp8_block(t, tensors[f"{module}.scale"])
        else:
            sd[name] = t.float() if t.is_floating_point() else t
    experts: dict[str, dict[tuple[int, str], torch.Tensor]] = {}
    for name in list(sd):
        m = re.match(r"^(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$", name)
        if m:
            experts.setdefault(m[1], {})[(int(m[2]), m[3])] = sd.pop(name)
    for prefix, d in experts.items():
        n = 1 + max(e for e, _ in d)
        sd[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([d[(e, "gate")], d[(e, "up")]]) for e in range(n)])
        sd[f"{prefix}.down_proj"] = torch.stack([d[(e, "down")] for e in range(n)])
    return sd


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
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("quantization_config", None)
    model = DeepseekV4ForCausalLM._from_config(DeepseekV4Config.from_dict(cfg), dtype=torch.float32)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


@lru_cache(maxsize=2)
def reference_model(src: Path = E2E_FIXTURE, ref: Path | None = None):
    return transformers_model(reference_state_dict(src, ref), src)


@torch.no_grad()
def greedy_generations(model, prompts: list[list[int]] = PROMPTS, max_tokens: int = MAX_TOKENS) -> list[dict]:
    """What ``vllm_worker.py`` returns, from a transformers model: greedy tokens and their logprobs."""
    generations = []
    for prompt in prompts:
        ids, logprobs = list(prompt), []
        for _ in range(max_tokens):
            logp = model(input_ids=torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)
            token = int(logp.argmax())
            ids.append(token)
            logprobs.append(float(logp[token]))
        generations.append({"tokens": ids[len(prompt) :], "logprobs": logprobs})
    return generations


@dataclass
class Agreement:
    matches: int
    steps: int
    median_abs_dlogp: float
    per_prompt: list[int]

    @property
    def ok(self) -> bool:
        return self.matches >= MIN_MATCHES and self.median_abs_dlogp < MAX_MEDIAN_ABS_DLOGP

    def __str__(self) -> str:
        return (
            f"{self.matches}/{self.steps} greedy steps agree (per prompt {self.per_prompt}), "
            f"median |delta logprob| {self.median_abs_dlogp:.4f}"
        )


@torch.no_grad()
def agreement(generations: list[dict], prompts: list[list[int]] = PROMPTS, ref: Path | None = None) -> Agreement:
    """Teacher-force the reference (``reference_model(ref=ref)``) on vLLM's tokens: same greedy token? logprob of
    vLLM's token?"""
    model = reference_model(ref=ref)
    matches, deltas, per_prompt = 0, [], []
    for prompt, gen in zip(prompts, generations, strict=True):
        tokens = gen["tokens"]
        ids = torch.tensor([prompt + tokens])
        logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
        steps = logp[len(prompt) - 1 : len(prompt) - 1 + len(tokens)]
        chosen = torch.tensor(tokens)
        ok = int((steps.argmax(-1) == chosen).sum())
        matches += ok
        per_prompt.append(ok)
        ref_lp = steps.gather(1, chosen[:, None])[:, 0]
        deltas += (ref_lp - torch.tensor(gen["logprobs"])).abs().tolist()
    return Agreement(matches, len(deltas), statistics.median(deltas), per_prompt)


# ----------------------------------------------------------------------------------------------------------
# Planted faults (CONTRACT.md section 4): a converted checkpoint with one known mistake


def _wo_a_scale_ones(t: Tensors) -> None:
    """Trap 2: every ``wo_a`` block scale replaced by 1.0 (as if a placeholder scale had been written)."""
    names = [n for n in t if re.fullmatch(r"layers\.\d+\.attn\.wo_a\.scale", n)]
    assert names, "no FP8 wo_a scales to plant the fault in"
    for n in names:
        t[n] = torch.ones_like(t[n].float()).to(t[n].dtype)


def _compressor_wkv_wgate_swapped(t: Tensors) -> None:
    """Trap 4's kin: the main compressor's ``wkv`` and ``wgate`` exchanged (same shapes, silently wrong)."""
    names = [n for n in t if re.fullmatch(r"layers\.\d+\.attn\.compressor\.wkv\.weight", n)]
    assert names, "no compressor to plant the fault in"
    for n in names:
        g = n.replace(".wkv.", ".wgate.")
        t[n], t[g] = t[g], t[n]


# On the random tiny fixture (near-uniform logits, median top-1/top-2 gap ~0.05 nats) transformers standing
# in for vLLM gave: wkv/wgate swapped 24/48, wo_a scales all 1.0 39/48, input_scale folded into the BF16
# routed experts 44/48 (undetectable by this check). The test plants the swap.
FAULTS = {"compressor_wkv_wgate_swapped": _compressor_wkv_wgate_swapped, "wo_a_scale_ones": _wo_a_scale_ones}


def plant_fault(dst: Path, out: Path, fault: str) -> Path:
    """A copy of the converted checkpoint ``dst`` in ``out`` with one planted fault (see ``FAULTS``)."""
    return mutated_copy(dst, out, FAULTS[fault])
