"""A tiny random DeepSeek-V4 written exactly as ModelOpt exports an NVFP4 model (the preflight's source).

``write_source(size, dst)`` writes, in ``dst``: ``model.safetensors`` with transformers names, every
linear but the router and ``lm_head`` NVFP4 (``weight`` uint8 pairs of E2M1 codes, ``weight_scale``
e4m3 per 16 inputs, ``weight_scale_2`` and ``input_scale`` float32 scalars), routed experts unfused,
one module per expert; plain tensors as a ``dtype=bfloat16`` load keeps them (transformers'
``_keep_in_fp32_modules_strict`` in float32, ``tid2eid`` int64, the rest BF16); ``config.json`` with
ModelOpt's ``quantization_config``, ``hf_quant_config.json`` and ``generation_config.json``. The repo's
real ModelOpt export ``tests/fixtures/tiny-dsv4-e2e`` is the format oracle: the ``cpu`` size has its
exact names, dtypes and shapes (tested).

Sizes (``SIZES``): ``cpu`` is the smallest model vLLM's CPU kernels accept (the e2e fixture's config);
``gpu`` what vLLM's CUDA kernels need besides: ``index_n_heads`` 64 for DeepGEMM's MQA logits on sm90, 64 query
heads as FlashMLA's FP8 decode kernel computes them, ``o_groups`` 8 so every group and head count divides over 8
ranks, and hidden 2048, the narrowest residual stream vLLM's CUDA decode computes (``cuda_decode_computes``).
Weights are random (seeded): linears N(0, 0.02) as transformers initialises them, routed experts wider and
weighted more (``EXPERT_STD``, ``ROUTED_SCALING``) so that the experts move the logits; ``input_scale`` is
calibrated like ModelOpt does (amax of each linear's input over random tokens / (6 * 448)).

``write_mtp_reference(size, dst)`` writes the MTP block the source lacks (transformers' DeepSeek-V4 has none, so
ModelOpt exports none): ``mtp.0.*`` and the top level (embeddings, head), no ``layers.*``, random, in DeepSeek's
release format (FP8 dense with e8m0 block scales,
MXFP4 routed experts; ``release_format``) for the same dimensions, the reference of ``run --mtp-from``.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..codecs import E4M3_MAX, FP4_MAX, quantize_nvfp4
from ..release_format import random_native_state, release_config, write_release

# Routed experts drawn wider than transformers' 0.02 and weighted 6x (V4: 1.5 to 2.5) so that they carry a large
# share of each layer's output: a fault in them must move the greedy tokens. Wider still, the random model turns
# chaotic (BF16 rounding alone flips greedy tokens). Measured with transformers standing in for vLLM, CPU size:
# all-BF16 compute 46/48 steps agree; experts' up halves 16x too small 35/48; compressor wkv/wgate swapped 27/48. GPU size
# (hidden 2048, block magnitudes spread over +-2 binades): FP8 rounding of wo_a's input and of the KV cache as vLLM
# does 45/48 (median |dlogp| 0.008); up halves 16x too large 0/48; compressor swapped 1/48; wo_a's block scales all
# 1.0 0/48 (without the spread: 48/48, 0/48, 8/48 and 41/48). At hidden 4096 the same draw is chaotic (FP8: 33/48).
EXPERT_STD = 0.03
ROUTED_SCALING = 6.0
HEAD_STD = 0.02
REFERENCE_HIDDEN = 128  # the hidden size those were chosen at (see random_model for wider models)

MODELOPT_VERSION = "0.45.0"


@dataclass(frozen=True)
class Size:
    """A preflight model size: config overrides and the prompts (lengths) it is scored on."""

    name: str
    overrides: dict[str, Any]
    prompt_lengths: tuple[int, ...]
    max_tokens: int = 16
    spread_binades: float = 0.0  # block magnitudes spread 2^U(-s, s) over 128-bands (``_band_gains``); 0: none


_BASE: dict[str, Any] = {
    "vocab_size": 256,
    "hidden_size": 128,
    "moe_intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 8,
    "num_key_value_heads": 1,
    "head_dim": 512,
    "partial_rotary_factor": 64 / 512,
    "q_lora_rank": 128,
    "num_experts_per_tok": 6,
    "n_routed_experts": 64,
    "n_shared_experts": 1,
    "o_groups": 2,
    "o_lora_rank": 128,
    "index_n_heads": 8,
    "index_head_dim": 128,
    "index_topk": 512,
    "sliding_window": 128,
    "max_position_embeddings": 4096,
    "num_nextn_predict_layers": 0,
    "layer_types": ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
    "mlp_layer_types": ["hash_moe", "moe", "moe"],
    "routed_scaling_factor": ROUTED_SCALING,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "architectures": ["DeepseekV4ForCausalLM"],
}

# The dimensions a preflight result reports (what the kernels were asked to accept).
SIZE_KEYS = (
    "hidden_size",
    "num_attention_heads",
    "head_dim",
    "o_groups",
    "o_lora_rank",
    "q_lora_rank",
    "index_n_heads",
    "index_head_dim",
    "index_topk",
    "n_routed_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "layer_types",
)

SIZES = {
    # No spread on the CPU size: at hidden 128 it makes the model chaotic (vLLM's CPU BF16 alone: 40/48 at 0.5 binades)
    "cpu": Size("cpu", {}, (24, 31, 38)),
    "gpu": Size(
        "gpu",
        {"hidden_size": 2048, "index_n_heads": 64, "num_attention_heads": 64, "o_groups": 8},
        (40, 300, 600),
        spread_binades=2.0,
    ),
}

MHC_FUSED_THREADS = 256  # vLLM's mhc_fused_tilelang: each thread block covers a split in steps of 256 elements


def cuda_decode_computes(hidden_size: int) -> bool:
    """Whether vLLM's CUDA decode computes a residual stream this wide at all.

    For at most 16 tokens (every decode step here) vLLM's mHC post + pre-norm (``mhc_fused_tilelang``, vLLM
    0.26 to 0.33) splits the hidden dimension into 8 parts (fewer than 8 tokens, hidden <= 4096) or 4 and covers
    each part in ``part // 256`` steps of 256 threads: a part that is not a whole number of 256 is left partly
    unwritten (uninitialised memory). At hidden 128 no step runs at all and decode collapses from its second token
    on (seen on the H200: docs/proof/h200-vllm-0.26). Real models (4096, 7168) are whole multiples.
    """
    splits = (8, 4) if hidden_size <= 4096 else (4,)
    return all(hidden_size % (n * MHC_FUSED_THREADS) == 0 for n in splits)


def config_dict(size: Size) -> dict[str, Any]:
    return {**_BASE, **size.overrides}


def resized(size: Size, hidden_size: int | None = None, prompt_lengths: tuple[int, ...] | None = None) -> Size:
    """``size`` with another hidden size and/or other prompt lengths (to tell a kernel's shape limits apart)."""
    overrides = dict(size.overrides)
    name = size.name
    if hidden_size is not None:
        if hidden_size <= 0 or hidden_size % 128:
            raise ValueError(f"hidden size {hidden_size} is not a positive multiple of 128")
        overrides["hidden_size"] = hidden_size
        name += f"-h{hidden_size}"
    lengths = size.prompt_lengths if prompt_lengths is None else prompt_lengths
    if not lengths or any(n < 1 for n in lengths):
        raise ValueError(f"prompt lengths {lengths} must be positive")
    return Size(name, overrides, tuple(lengths), size.max_tokens, size.spread_binades)


def prompts(size: Size, seed: int = 0) -> list[list[int]]:
    """Random token ids (never 0 = bos or 1 = eos) of the size's prompt lengths."""
    rng = random.Random(seed)
    vocab = config_dict(size)["vocab_size"]
    return [[rng.randrange(2, vocab) for _ in range(n)] for n in size.prompt_lengths]


def _fp32_kept(name: str, patterns: list[str]) -> bool:
    return any(p in name.split(".") for p in patterns)


BAND = 128  # the FP8 block edge: gains change from one block row / column to the next


def _band_gains(n: int, spread: float, gen: torch.Generator) -> torch.Tensor:
    """``n`` gains, constant over each 128-wide band, 2^U(-spread, spread), normalised to mean square 1."""
    bands = -(-n // BAND)
    g = torch.exp2((torch.rand(bands, generator=gen) * 2 - 1) * spread)
    return (g / g.pow(2).mean().sqrt()).repeat_interleave(BAND)[:n]


def quantized_weights(model) -> list[str]:
    """Names of the parameters ModelOpt's NVFP4 export quantizes: every linear's weight but the routers' and
    ``lm_head``'s, and the routed experts' fused weights (exported one module per expert)."""
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    linears -= {"lm_head"} | {n for n in linears if n.endswith(".mlp.gate")}
    return [n for n, _ in model.named_parameters() if n.removesuffix(".weight") in linears or ".mlp.experts." in n]


@torch.no_grad()
def random_model(size: Size, seed: int = 0):
    """transformers' ``DeepseekV4ForCausalLM`` in float32 with the preflight's random weights (BF16-exact)."""
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    torch.manual_seed(seed)
    config = DeepseekV4Config(**config_dict(size))
    model = DeepseekV4ForCausalLM._from_config(config, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(seed + 1)

    def randn(t: torch.Tensor, std: float, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(t.shape, generator=gen) * std + mean

    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if ".mlp.experts." in name:
            p.copy_(randn(p, EXPERT_STD))
        elif name == "lm_head.weight":
            p.copy_(randn(p, HEAD_STD))
        elif leaf == "weight" and p.dim() == 1:  # RMSNorm gains
            p.copy_(randn(p, 0.1, 1.0))
        elif leaf in ("base", "hc_base", "position_bias"):
            p.copy_(randn(p, 0.1))
        elif leaf in ("scale", "hc_scale"):
            p.copy_(randn(p, 0.1, 1.0))
        elif leaf == "sinks":
            p.copy_(randn(p, 0.5))
    # Wider than 128, keep every hidden-fed projection's output at the 128-wide model's scale (fan-in scaling):
    # the stds above were chosen there, and unscaled a hidden-4096 model is chaotic (CPU: 32/48 steps agree).
    hidden, gain = config.hidden_size, (REFERENCE_HIDDEN / config.hidden_size) ** 0.5
    if hidden != REFERENCE_HIDDEN:
        for name, p in model.named_parameters():
            if p.dim() >= 2 and p.shape[-1] in (hidden, config.hc_mult * hidden) and "embed" not in name:
                p.mul_(gain)
    # Trained weights have blocks of very different magnitudes; uniform random ones do not, and there every block of
    # a linear gets the same scale, so a wrong block scale is a uniform rescale the next norm absorbs (on the H200,
    # wo_a's scales all set to 1.0 moved 3 of 48 tokens). Each 128-row and 128-column band of every linear the
    # export quantizes gets a gain 2^U(-s, s) (``Size.spread_binades``, mean square 1), so that neighbouring blocks differ.
    band_gen, spread = torch.Generator().manual_seed(seed + 2), size.spread_binades  # ``gen`` draws on below
    params = dict(model.named_parameters())
    for name in quantized_weights(model) if spread else ():
        p = params[name]
        p.mul_(_band_gains(p.shape[-2], spread, band_gen)[:, None] * _band_gains(p.shape[-1], spread, band_gen))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(randn(b, 0.01))
        elif name.endswith("tid2eid"):
            vocab, top_k = b.shape
            b.copy_(torch.stack([torch.randperm(config.n_routed_experts, generator=gen)[:top_k] for _ in range(vocab)]))
    # What a dtype=bfloat16 load holds: every tensor outside the float32-kept modules rounded to BF16.
    kept = type(model)._keep_in_fp32_modules_strict
    for name, p in model.named_parameters():
        if not _fp32_kept(name, kept):
            p.copy_(p.to(torch.bfloat16).float())
    return model


@torch.no_grad()
def _input_amax(model, token_batches: list[list[int]]) -> dict[str, float]:
    """Max |input| of every linear over the batches (ModelOpt's calibration); experts computed per expert."""
    amax: dict[str, float] = {}
    hooks = []

    def keep(name: str, value: torch.Tensor) -> None:
        amax[name] = max(amax.get(name, 0.0), float(value.abs().max()) if value.numel() else 0.0)

    for mname, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            hooks.append(module.register_forward_hook(lambda m, a, o, n=mname: keep(n, a[0])))
        elif type(module).__name__ == "DeepseekV4Experts":

            def experts_hook(m, a, o, n=mname):
                x = a[0]  # [tokens, hidden]: every token through every expert bounds what the routed ones see
                for e in range(m.num_experts):
                    keep(f"{n}.{e}.gate_proj", x)
                    keep(f"{n}.{e}.up_proj", x)
                    keep(f"{n}.{e}.down_proj", m._apply_gate(x @ m.gate_up_proj[e].T))

            hooks.append(module.register_forward_hook(experts_hook))
    try:
        for ids in token_batches:
            model(input_ids=torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    return amax


def _nvfp4(tensors: dict[str, torch.Tensor], module: str, w: torch.Tensor, input_amax: float) -> None:
    packed, ws, ws2 = quantize_nvfp4(w)
    tensors[f"{module}.weight"] = packed
    tensors[f"{module}.weight_scale"] = ws
    tensors[f"{module}.weight_scale_2"] = ws2
    tensors[f"{module}.input_scale"] = torch.tensor(max(input_amax, 1e-6) / (FP4_MAX * E4M3_MAX), dtype=torch.float32)


def modelopt_tensors(model, input_amax: dict[str, float]) -> dict[str, torch.Tensor]:
    """The model's state dict as ModelOpt's NVFP4 export writes it (names, dtypes, per-expert modules)."""
    kept = type(model)._keep_in_fp32_modules_strict
    quantized = {n.removesuffix(".weight") for n in quantized_weights(model)}
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        module = name.removesuffix(".weight")
        m = re.fullmatch(r"(.*\.mlp\.experts)\.(gate_up_proj|down_proj)", name)
        if m:
            for e in range(t.shape[0]):
                if m[2] == "down_proj":
                    _nvfp4(out, f"{m[1]}.{e}.down_proj", t[e], input_amax[f"{m[1]}.{e}.down_proj"])
                else:
                    gate, up = t[e].chunk(2)
                    _nvfp4(out, f"{m[1]}.{e}.gate_proj", gate, input_amax[f"{m[1]}.{e}.gate_proj"])
                    _nvfp4(out, f"{m[1]}.{e}.up_proj", up, input_amax[f"{m[1]}.{e}.up_proj"])
        elif name.endswith(".weight") and module in quantized:
            _nvfp4(out, module, t, input_amax[module])
        elif name.endswith("tid2eid"):
            out[name] = t.to(torch.int64)
        else:
            out[name] = t.clone() if _fp32_kept(name, kept) else t.to(torch.bfloat16)
    return out


def modelopt_quantization_config(num_layers: int) -> dict[str, Any]:
    """``quantization_config`` as ModelOpt 0.45 writes it for an NVFP4 DeepSeek-V4 (the e2e fixture's)."""
    group = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}
    return {
        "config_groups": {"group_0": {"input_activations": group, "weights": dict(group), "targets": ["Linear"]}},
        "ignore": ["lm_head", "model.embed_tokens", *(f"model.layers.{i}.mlp.gate" for i in range(num_layers))],
        "quant_algo": "NVFP4",
        "producer": {"name": "modelopt", "version": MODELOPT_VERSION},
        "quant_method": "modelopt",
    }


def write_source(size: Size, dst: Path, seed: int = 0) -> Path:
    """Write the tiny ModelOpt NVFP4 export of ``size`` into the new directory ``dst``."""
    from safetensors.torch import save_file

    model = random_model(size, seed)
    calibration = prompts(size, seed + 7)
    tensors = modelopt_tensors(model, _input_amax(model, calibration))
    dst.mkdir(parents=True)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    config = model.config.to_diff_dict()  # what save_pretrained writes
    config["dtype"] = "bfloat16"
    config["quantization_config"] = modelopt_quantization_config(model.config.num_hidden_layers)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    hf_quant = {
        "producer": {"name": "modelopt", "version": MODELOPT_VERSION},
        "quantization": {
            "quant_algo": "NVFP4",
            "kv_cache_quant_algo": None,
            "group_size": 16,
            "exclude_modules": config["quantization_config"]["ignore"],
        },
    }
    (dst / "hf_quant_config.json").write_text(json.dumps(hf_quant, indent=2))
    (dst / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}, indent=2))
    return dst


def write_mtp_reference(size: Size, dst: Path, seed: int = 0) -> Path:
    """Write into ``dst`` DeepSeek's release format of one random MTP block (``mtp.0.*`` and the top-level tensors that
    mark the naming, no main layers; seeded) of ``size``'s model: ``run --mtp-from``'s reference for the source
    ``write_source(size, ...)`` writes."""
    from transformers import DeepseekV4Config

    config = release_config(DeepseekV4Config(**config_dict(size)).to_dict(), mtp_layers=1)
    write_release(random_native_state(config, seed, main_layers=False), config, dst)
    return dst
