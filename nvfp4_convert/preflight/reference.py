"""The float32 reference and the agreement score (tiny checkpoints only: everything is read whole).

- ``dequantized_state_dict``: a checkpoint's tensors as transformers' ``DeepseekV4ForCausalLM`` holds them in
  float32: NVFP4 and block-FP8 linears decoded (``codecs``), ``input_scale`` dropped (an activation scale),
  routed experts fused into ``gate_up_proj`` / ``down_proj``.
- ``transformers_model``: that model of a source's ``config.json`` holding a state dict (strict).
- ``teacher_forced``: the reference's log-probabilities at every step of vLLM's greedy tokens (one forward per prompt).
- ``score_decode``: at every step, does the reference pick vLLM's token, and how far is its logprob of that token?
  ``score_prefill`` does the same for the per-position top-1 and logprob vLLM computed in one prefill
  (``prompt_logprobs``) of prompt + generated tokens.
- ``decode_vs_prefill``: the same comparison of vLLM's decode against vLLM's own prefill (no reference).
- ``same_tokens``: vLLM with MTP speculative decoding against vLLM without it: exactly the same greedy tokens?
- ``Agreement.ok``: at least 7/8 of the steps agree (42 of 48) and the median |delta logprob| < 0.05. A step
  agrees when vLLM's token is the reference's greedy token, or a near-tie: the reference ranks it less than
  ``TIE_NATS`` below its own greedy token, 0.05 nats, the logprob error the verdict accepts anyway (two tokens
  that close trade places under such error). Measured on the H200 (docs/proof/h200-vllm-0.26-h2048): of the 28
  steps where a correct conversion's greedy token differed from the reference's, 26 were such ties (gaps 0.002 to
  0.049; the others 0.075 and 0.108), while planted faults leave median gaps of 0.23 (compressor swap) and 0.51
  nats (expert scale). ``matches`` counts exact agreement only; ``near_ties`` the others that count.
"""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..formats import recognise_tensors
from ..naming import LINEAR_PARAMS

Tensors = dict[str, torch.Tensor]

MIN_AGREEING_FRACTION = 42 / 48
MAX_MEDIAN_ABS_DLOGP = 0.05
TIE_NATS = MAX_MEDIAN_ABS_DLOGP  # two tokens closer than the logprob error we accept are a tie


def load_tensors(path: Path) -> Tensors:
    """Every tensor of a (tiny) checkpoint directory, read with safetensors."""
    from safetensors import safe_open

    out: Tensors = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "pt") as sf:
            for k in sf.keys():  # noqa: SIM118 - safe_open is not a mapping
                out[k] = sf.get_tensor(k)
    return out


def dequantized_state_dict(tensors: Tensors) -> Tensors:
    """float32 weights by transformers name, experts fused as transformers holds them.

    A linear may be stored in any format of ``formats`` (NVFP4 with ``weight_scale``, ``weight_scale_2``;
    ``input_scale`` is an activation scale and is dropped; FP8 with a block ``scale`` or a per-tensor
    ``weight_scale``; MXFP4), decoded by that format, or plain; other tensors are cast to float32 (integers kept).
    """
    sd: Tensors = {}
    for name, t in tensors.items():
        if name.endswith((".weight_scale", ".weight_scale_2", ".input_scale")):
            continue  # consumed with their weight
        if name.endswith(".scale") and f"{name.removesuffix('.scale')}.weight" in tensors:
            continue  # an FP8 block scale (not attn_hc.scale and the like, which have no weight beside them)
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and (f"{module}.weight_scale" in tensors or f"{module}.scale" in tensors):
            params = {p: tensors[f"{module}.{p}"] for p in LINEAR_PARAMS if f"{module}.{p}" in tensors}
            sd[name] = recognise_tensors(params, module).decode(params)  # NVFP4, FP8 (block or per-tensor), MXFP4
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


def transformers_model(state_dict: Tensors, config_json: Path):
    """transformers' ``DeepseekV4ForCausalLM`` of ``config_json`` in float32 holding ``state_dict`` (strict)."""
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    cfg = json.loads(config_json.read_text())
    cfg.pop("quantization_config", None)
    model = DeepseekV4ForCausalLM._from_config(DeepseekV4Config.from_dict(cfg), dtype=torch.float32)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def source_model(src: Path):
    """The reference for a ModelOpt source: the weights its fake-quantized model had, in float32."""
    return transformers_model(dequantized_state_dict(load_tensors(src)), src / "config.json")


@torch.no_grad()
def greedy_generations(model, prompts: list[list[int]], max_tokens: int) -> list[dict]:
    """What the vLLM worker returns, from a transformers model: greedy tokens and their logprobs."""
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
    matches: int  # steps where vLLM's token is the reference's greedy token
    steps: int
    median_abs_dlogp: float
    max_abs_dlogp: float
    per_prompt: list[int]  # matches per prompt
    near_ties: int = 0  # other steps where the reference ranks vLLM's token within TIE_NATS of its greedy token
    tie_gaps: list[float] = field(default_factory=list)  # the reference's gap at every step that is not a match

    @property
    def agreeing(self) -> int:
        return self.matches + self.near_ties

    @property
    def ok(self) -> bool:
        return (
            self.steps > 0
            and self.agreeing >= MIN_AGREEING_FRACTION * self.steps
            and self.median_abs_dlogp < MAX_MEDIAN_ABS_DLOGP  # False for NaN
        )

    def as_dict(self) -> dict:
        return {**asdict(self), "agreeing": self.agreeing, "ok": self.ok}

    def __str__(self) -> str:
        return (
            f"{self.agreeing}/{self.steps} greedy steps agree ({self.matches} exactly, {self.near_ties} near-ties; "
            f"per prompt {self.per_prompt}), median |delta logprob| {self.median_abs_dlogp:.4f}"
        )


@torch.no_grad()
def teacher_forced(model, prompts: list[list[int]], generations: list[dict]) -> list[torch.Tensor]:
    """Per prompt, the reference's log-probabilities [steps, vocab] at the steps that produced vLLM's tokens."""
    out = []
    for prompt, gen in zip(prompts, generations, strict=True):
        tokens = gen["tokens"]
        logp = model(input_ids=torch.tensor([prompt + tokens])).logits[0].float().log_softmax(-1)
        out.append(logp[len(prompt) - 1 : len(prompt) - 1 + len(tokens)])
    return out


def _agreement(rows: list[tuple[torch.Tensor, list[int], list[int], list[float]]]) -> Agreement:
    """rows: (reference log-probs per step, vLLM's top-1 per step, vLLM's tokens, vLLM's logprob of them)."""
    matches, deltas, per_prompt, gaps = 0, [], [], []
    for steps, top1, tokens, logprobs in rows:
        picked = torch.tensor(top1)
        best, greedy = steps.max(-1)
        gap = best - steps.gather(1, picked[:, None])[:, 0]  # 0 where vLLM picked the reference's greedy token
        same = greedy == picked
        matches += int(same.sum())
        per_prompt.append(int(same.sum()))
        gaps += [round(float(g), 6) for g in gap[~same]]
        ref_lp = steps.gather(1, torch.tensor(tokens)[:, None])[:, 0]
        deltas += (ref_lp - torch.tensor(logprobs, dtype=torch.float32)).abs().tolist()
    return _summary(matches, deltas, per_prompt, gaps)


def _summary(matches: int, deltas: list[float], per_prompt: list[int], gaps: list[float] | None = None) -> Agreement:
    if not deltas:
        return Agreement(0, 0, float("nan"), float("nan"), per_prompt)
    median = float("nan") if any(d != d for d in deltas) else statistics.median(deltas)
    gaps = gaps or []
    ties = sum(1 for g in gaps if g < TIE_NATS)  # NaN never a tie
    return Agreement(matches, len(deltas), median, max(deltas, key=lambda d: (d != d, d)), per_prompt, ties, gaps)


def score_decode(reference_steps: list[torch.Tensor], generations: list[dict]) -> Agreement:
    """vLLM's greedy decode: at each step, same greedy token as the reference? logprob of vLLM's token?

    ``reference_steps``: ``teacher_forced(reference, prompts, generations)``.
    """
    rows = [
        (steps, gen["tokens"], gen["tokens"], gen["logprobs"])
        for steps, gen in zip(reference_steps, generations, strict=True)
    ]
    return _agreement(rows)


def decode_vs_prefill(generations: list[dict], prefill: list[dict]) -> Agreement:
    """vLLM against itself: its greedy decode against its own prefill of the same tokens (no reference).

    Where the reference is right and this disagrees, vLLM's decode path is what differs from its prefill path.
    """
    matches, deltas, per_prompt = 0, [], []
    for gen, row in zip(generations, prefill, strict=True):
        ok = sum(int(a == b) for a, b in zip(gen["tokens"], row["top1"], strict=True))
        matches += ok
        per_prompt.append(ok)
        deltas += [abs(a - b) for a, b in zip(gen["logprobs"], row["logprobs"], strict=True)]
    return _summary(matches, deltas, per_prompt)


def score_prefill(reference_steps: list[torch.Tensor], generations: list[dict], prefill: list[dict]) -> Agreement:
    """vLLM's prefill of prompt + generated tokens (``prompt_logprobs``): per position top-1 and logprob."""
    rows = [
        (steps, row["top1"], gen["tokens"], row["logprobs"])
        for steps, gen, row in zip(reference_steps, generations, prefill, strict=True)
    ]
    return _agreement(rows)


@dataclass
class SameTokens:
    """Greedy tokens of two vLLM runs compared exactly (``same_tokens``); ``first_difference`` None when identical."""

    steps: int  # steps compared (the plain run's)
    per_prompt: list[int]  # leading steps identical, per prompt
    first_difference: dict | None = None  # prompt, step, both tokens and (where recorded) both logprobs

    @property
    def ok(self) -> bool:
        return self.steps > 0 and self.first_difference is None

    def as_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}

    def __str__(self) -> str:
        if self.first_difference is None:
            return f"{self.steps}/{self.steps} greedy tokens identical"
        d = self.first_difference
        return (
            f"tokens differ first at prompt {d['prompt']} step {d['step']}: {d['tokens'][0]} without, "
            f"{d['tokens'][1]} with speculative decoding (logprobs {d['logprobs']})"
        )


def same_tokens(plain: list[dict], spec: list[dict]) -> SameTokens:
    """``spec``'s greedy tokens (per prompt ``{"tokens", "logprobs"}``) against ``plain``'s, exactly; a missing or
    extra token counts as a difference at its step."""
    if len(plain) != len(spec):
        raise ValueError(f"{len(plain)} prompts without speculative decoding, {len(spec)} with it")
    per_prompt, first = [], None
    for k, (a, b) in enumerate(zip(plain, spec, strict=True)):
        n = max(len(a["tokens"]), len(b["tokens"]))
        same = next((i for i in range(n) if _token_at(a, i) != _token_at(b, i)), n)
        per_prompt.append(same)
        if same < n and first is None:
            first = {
                "prompt": k,
                "step": same,
                "tokens": [_token_at(a, same), _token_at(b, same)],
                "logprobs": [_logprob_at(a, same), _logprob_at(b, same)],
            }
    return SameTokens(sum(len(g["tokens"]) for g in plain), per_prompt, first)


def _token_at(generation: dict, step: int) -> int | None:
    tokens = generation["tokens"]
    return tokens[step] if step < len(tokens) else None


def _logprob_at(generation: dict, step: int) -> float | None:
    logprobs = generation.get("logprobs") or []
    return logprobs[step] if step < len(logprobs) else None
