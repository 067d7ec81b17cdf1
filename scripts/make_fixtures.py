#!/usr/bin/env python3
"""Generate the tiny ModelOpt NVFP4 DeepSeek-V4 test fixtures under ``tests/fixtures/``.

Each fixture is a *real* ModelOpt export: a randomly initialised transformers
``DeepseekV4ForCausalLM`` (built with ``dtype=torch.bfloat16``, so transformers'
``_keep_in_fp32_modules_strict`` modules stay float32), quantized with
``mtq.quantize(model, NVFP4_DEFAULT_CFG + per-layer overrides, forward_loop)``
and written by ``modelopt.torch.export.export_hf_checkpoint``. Nothing in an
export is edited afterwards.

What it writes (``--out`` defaults to ``tests/fixtures``):

``tiny-dsv4/`` (``--which tiny`` or ``all``)
    4 layers ``[sliding, heavily_compressed, compressed_sparse,
    compressed_sparse]``, ``mlp_layer_types`` ``[hash_moe, hash_moe, moe, moe]``,
    hidden 128, 4 experts top-2. ``o_a_proj`` is NVFP4 in layers 0 and 2 and BF16
    in layers 1 and 3. Files, all as written by ``export_hf_checkpoint(...,
    max_shard_size=TINY_MAX_SHARD_SIZE)``: ``config.json``,
    ``generation_config.json``, ``hf_quant_config.json``,
    ``model-0000{1,2,3}-of-00003.safetensors``, ``model.safetensors.index.json``.
``tiny-dsv4-golden/dequant.safetensors`` (with ``tiny``)
    For every NVFP4 linear ``X`` of ``tiny-dsv4`` (every ``X.weight_scale`` in
    the export), key ``X`` (transformers module name, no ``.weight``) holds the
    float32 weight computed by ModelOpt's own
    ``NVFP4QTensor(shape, float32, X.weight).dequantize(dtype=float32,
    scale=X.weight_scale, double_scale=X.weight_scale_2, block_sizes={-1: 16})``.
    Routed experts of every layer are included when the file stays under
    ``GOLDEN_MAX_BYTES``, otherwise only those of layer ``GOLDEN_EXPERT_LAYER``.
``tiny-dsv4-ref/`` (with ``tiny``)
    ``model.safetensors`` (one file): the same model's ``state_dict()`` *before*
    quantization, transformers names (routed experts fused, as the module holds
    them: ``mlp.experts.gate_up_proj`` [E, 2I, H], ``mlp.experts.down_proj``
    [E, H, I]), BF16 with the float32 kept modules and int64 ``tid2eid``; and
    ``config.json`` of the unquantized model.
``tiny-dsv4-e2e/`` (``--which e2e`` or ``all``)
    A model sized for vLLM's CPU kernels (``/work/shared/VLLM-CPU.md`` section
    2): 3 layers ``[sliding, compressed_sparse, heavily_compressed]``, the first
    hash-routed, 8 heads, head_dim 512, 64 experts top-6; every linear NVFP4
    (``o_a_proj`` included). One shard, no index file.
``tiny-dsv4-e2e-ref/`` (with ``e2e``)
    The e2e model's weights *before* quantization without the routed experts
    (no ``mlp.experts.*``): ``model.safetensors`` (one file) + the unquantized
    ``config.json``, transformers names, for ``--attention-from`` and the
    reference model of the graft test. Plain tensors are as in ``tiny-dsv4-ref``
    (BF16, float32 kept modules, int64 ``tid2eid``; byte-identical to the
    export's). The non-expert linears would be 8.5 MB in BF16, so each is stored
    as DeepSeek's release stores them: ``weight`` float8_e4m3fn + ``scale``
    float32 power-of-two 128x128 block scales (``2**ceil(log2(amax / 448))``),
    the FP8 rounding of the pre-quantization BF16 weight (5.0 MB in all).

Before quantization ``tid2eid`` (valid, distinct expert ids per token),
``sinks``, ``position_bias``, ``e_score_correction_bias``, every RMSNorm weight
and the hyper-connection ``base``/``scale`` tensors are filled with distinct
nonzero random values, so that a swapped or dropped tensor shows in a test.

``o_a_proj`` and ModelOpt: transformers 5.24 implements ``self_attn.o_a_proj``
as ``DeepseekV4GroupedLinear``, an ``nn.Linear`` subclass that overrides
``forward`` (a batched ``bmm`` over groups). ModelOpt auto-quantizes only
``nn.Linear`` subclasses that keep ``nn.Linear.forward``, and its HF exporter
packs only modules whose class name contains ``QuantLinear``; so a plain run
leaves ``o_a_proj`` BF16 everywhere. This script re-classes each ``o_a_proj``
to :class:`LinearDeepseekV4Grouped` (same forward; the name makes the dynamic
class ``QuantLinearDeepseekV4Grouped``) and registers it with ModelOpt's own
``_QuantLinear`` (the class ModelOpt uses for ``nn.Linear``). The grouped
forward reads ``self.weight``, which ModelOpt's dynamic attribute
fake-quantizes, so calibration and export are ModelOpt's unchanged NVFP4 path.
Each layer in ``bf16_o_a_layers`` gets
``{"quantizer_name": "*layers.N.self_attn.o_a_proj*", "enable": False}``
appended to the quant config and is exported BF16 (ModelOpt then lists it in
``ignore`` / ``exclude_modules``).

``recipes/<name>/`` (``--which recipes [--recipe NAME]``; not part of ``all``)
    One ``tiny``-model export per ModelOpt recipe users make for DeepSeek-V4 (one
    shard each, every ``o_a_proj`` quantized like the other attention linears):
    ``nvfp4-kv-fp8`` (``hf_ptq.py --qformat nvfp4 --kv_cache_qformat fp8``),
    ``experts-nvfp4-attn-fp8`` (routed experts NVFP4, ``*self_attn*`` per-tensor
    FP8), ``nvfp4-bs32`` (NVFP4 block 32 except routed experts), ``experts-w4a16``
    (routed experts without ``input_quantizer``), ``nvfp4-embed-lm-head``
    (``lm_head`` and ``embed_tokens`` NVFP4 too), ``nvfp4-fp32`` (model built with
    ``dtype=float32``), ``nvfp4-awq`` (``NVFP4_AWQ_LITE_CFG``; two runtime patches of ModelOpt, see
    ``awq_patches``). ``tests/fixtures/README.md`` documents each.

Made with (CPU only): Python 3.11.7, torch 2.13.0+cpu, transformers 5.24.0,
nvidia-modelopt 0.45.0, safetensors 0.8.0, numpy 2.4.6 (requests 2.34.2, needed
by modelopt's import).

Usage::

    python scripts/make_fixtures.py [--out DIR] [--which all|tiny|e2e|recipes] [--recipe NAME] [--seed 0]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import modelopt.torch.quantization as mtq
import torch
from modelopt.recipe.presets import KV_QUANT_CFG_CHOICES
from modelopt.torch.export import export_hf_checkpoint
from modelopt.torch.quantization.config import _load_quantizer_attribute_dict, _load_quantizer_cfg_dict_list
from modelopt.torch.quantization.nn import QuantModuleRegistry
from modelopt.torch.quantization.nn.modules.quant_linear import _QuantLinear
from modelopt.torch.quantization.qtensor import NVFP4QTensor
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM
from transformers.models.deepseek_v4.modeling_deepseek_v4 import (
    DeepseekV4GroupedLinear,
    DeepseekV4HyperConnection,
    DeepseekV4HyperHead,
    DeepseekV4RMSNorm,
)

NVFP4_BLOCK = 16
TINY_MAX_SHARD_SIZE = "450KB"
TINY_NUM_SHARDS = 3
GOLDEN_MAX_BYTES = 3_000_000
GOLDEN_EXPERT_LAYER = 2
QUANT_SUFFIXES = ("weight", "weight_scale", "weight_scale_2", "input_scale")
FP8_BLOCK = 128
E4M3_MAX = 448.0
E2E_REF_MAX_BYTES = 6_000_000


class LinearDeepseekV4Grouped(DeepseekV4GroupedLinear):
    """``DeepseekV4GroupedLinear`` under a name ModelOpt's exporter takes as linear.

    ModelOpt names the dynamic class ``"Quant" + cls.__name__`` and its HF exporter
    packs a module only when that name contains ``QuantLinear``
    (``modelopt.torch.export.layer_utils.is_quantlinear``). Behaviour is identical
    to the parent class.
    """


if LinearDeepseekV4Grouped not in QuantModuleRegistry:
    QuantModuleRegistry.register({LinearDeepseekV4Grouped: "LinearDeepseekV4Grouped"})(_QuantLinear)


@dataclass
class FixtureSpec:
    """Recipe of one fixture."""

    name: str
    config: DeepseekV4Config
    bf16_o_a_layers: list[int] = field(default_factory=list)
    calib_batches: int = 2
    calib_tokens: int = 32
    max_shard_size: str = "10GB"
    num_shards: int = 1
    quant_cfg: dict | None = None  # None: ``quant_config(bf16_o_a_layers)``
    dtype: torch.dtype = torch.bfloat16
    patches: Callable[[], contextlib.AbstractContextManager] | None = None  # runtime patches of ModelOpt, if any


def tiny_config() -> DeepseekV4Config:
    """Config of ``tiny-dsv4``: the shared fixture's dims, 2 hash + 2 scored MoE."""
    return DeepseekV4Config(
        vocab_size=256,
        hidden_size=128,
        moe_intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=64,
        q_lora_rank=64,
        num_experts_per_tok=2,
        n_routed_experts=4,
        n_shared_experts=1,
        o_groups=2,
        o_lora_rank=64,
        index_n_heads=2,
        index_head_dim=64,
        index_topk=4,
        sliding_window=16,
        max_position_embeddings=256,
        num_nextn_predict_layers=0,
        layer_types=[
            "sliding_attention",
            "heavily_compressed_attention",
            "compressed_sparse_attention",
            "compressed_sparse_attention",
        ],
        mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"],
        architectures=["DeepseekV4ForCausalLM"],
    )


def e2e_config() -> DeepseekV4Config:
    """Config of ``tiny-dsv4-e2e``: the smallest model vLLM's CPU kernels accept."""
    return DeepseekV4Config(
        vocab_size=256,
        hidden_size=128,
        moe_intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=1,
        head_dim=512,
        partial_rotary_factor=64 / 512,  # qk_rope_head_dim 64
        q_lora_rank=128,
        num_experts_per_tok=6,
        n_routed_experts=64,
        n_shared_experts=1,
        o_groups=2,
        o_lora_rank=128,
        index_n_heads=8,
        index_head_dim=128,
        index_topk=512,
        sliding_window=128,
        max_position_embeddings=4096,
        num_nextn_predict_layers=0,
        layer_types=[
            "sliding_attention",
            "compressed_sparse_attention",
            "heavily_compressed_attention",
        ],
        mlp_layer_types=["hash_moe", "moe", "moe"],
        architectures=["DeepseekV4ForCausalLM"],
    )


def _fp32_kept(name: str, patterns: Iterable[str]) -> bool:
    """Whether ``name`` is in a module transformers keeps in float32 (strict)."""
    parts = name.split(".")
    return any(p in parts for p in patterns)


@torch.no_grad()
def build_model(config: DeepseekV4Config, seed: int, dtype: torch.dtype = torch.bfloat16) -> DeepseekV4ForCausalLM:
    """Random model as a ``dtype=...`` load gives it; distinctive plain tensors."""
    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM._from_config(config, dtype=dtype)
    model.eval()
    gen = torch.Generator().manual_seed(seed + 1000)

    def randn_like(t: torch.Tensor, scale: float, offset: float = 0.0) -> torch.Tensor:
        return (torch.randn(t.shape, generator=gen) * scale + offset).to(t.dtype)

    for module in model.modules():
        if isinstance(module, DeepseekV4RMSNorm):
            module.weight.copy_(randn_like(module.weight, 0.1, 1.0))
        elif isinstance(module, DeepseekV4HyperConnection):
            module.base.copy_(randn_like(module.base, 0.1))
            module.scale.copy_(randn_like(module.scale, 0.1, 1.0))
        elif isinstance(module, DeepseekV4HyperHead):
            module.hc_base.copy_(randn_like(module.hc_base, 0.1))
            module.hc_scale.copy_(randn_like(module.hc_scale, 0.1, 1.0))
        if hasattr(module, "sinks"):
            module.sinks.copy_(randn_like(module.sinks, 0.5))
        if isinstance(getattr(module, "position_bias", None), torch.Tensor):
            module.position_bias.copy_(randn_like(module.position_bias, 0.1))
        if isinstance(getattr(module, "e_score_correction_bias", None), torch.Tensor):
            module.e_score_correction_bias.copy_(randn_like(module.e_score_correction_bias, 0.01))
        if isinstance(getattr(module, "tid2eid", None), torch.Tensor):
            vocab, top_k = module.tid2eid.shape
            rows = [torch.randperm(config.n_routed_experts, generator=gen)[:top_k] for _ in range(vocab)]
            module.tid2eid.copy_(torch.stack(rows).to(torch.int64))
    check_plain_dtypes(model, dtype)
    return model


def check_plain_dtypes(model: DeepseekV4ForCausalLM, dtype: torch.dtype = torch.bfloat16) -> None:
    """Assert fp32 kept modules are float32, ``tid2eid`` int64, the rest ``dtype``."""
    kept = type(model)._keep_in_fp32_modules_strict
    for name, tensor in model.state_dict().items():
        if name.endswith("tid2eid"):
            want = torch.int64
        elif _fp32_kept(name, kept):
            want = torch.float32
        else:
            want = dtype
        if tensor.dtype != want:
            raise AssertionError(f"{name}: {tensor.dtype}, expected {want}")


def enable_o_a_proj_quantization(model: DeepseekV4ForCausalLM) -> None:
    """Re-class every ``o_a_proj`` so ModelOpt quantizes and exports it (see top)."""
    for layer in model.model.layers:
        o_a = layer.self_attn.o_a_proj
        assert type(o_a) is DeepseekV4GroupedLinear, type(o_a)
        o_a.__class__ = LinearDeepseekV4Grouped


def quant_config(bf16_o_a_layers: Iterable[int]) -> dict:
    """``NVFP4_DEFAULT_CFG`` plus one disabling entry per BF16 ``o_a_proj`` layer."""
    cfg = dict(mtq.NVFP4_DEFAULT_CFG)
    cfg["quant_cfg"] = list(cfg["quant_cfg"]) + [
        {"quantizer_name": f"*layers.{i}.self_attn.o_a_proj*", "enable": False} for i in bf16_o_a_layers
    ]
    return cfg


def make_forward_loop(vocab: int, batches: int, tokens: int, seed: int) -> Callable[[nn.Module], None]:
    """Calibration loop over random token batches (fixed seed)."""

    def forward_loop(model: nn.Module) -> None:
        gen = torch.Generator().manual_seed(seed + 2000)
        with torch.no_grad():
            for _ in range(batches):
                model(torch.randint(0, vocab, (1, tokens), generator=gen))

    return forward_loop


def write_export(spec: FixtureSpec, seed: int, out_root: Path) -> dict[str, torch.Tensor]:
    """Build, quantize and export one fixture; return the pre-quantization weights."""
    model = build_model(spec.config, seed, spec.dtype)
    reference = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    enable_o_a_proj_quantization(model)
    loop = make_forward_loop(spec.config.vocab_size, spec.calib_batches, spec.calib_tokens, seed)
    patches = spec.patches() if spec.patches is not None else contextlib.nullcontext()
    with patches, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = spec.quant_cfg if spec.quant_cfg is not None else quant_config(spec.bf16_o_a_layers)
        model = mtq.quantize(model, cfg, loop)
        dest = out_root / spec.name
        if dest.exists():
            shutil.rmtree(dest)
        with tempfile.TemporaryDirectory() as tmp:
            export_hf_checkpoint(model, export_dir=tmp, max_shard_size=spec.max_shard_size)
            shutil.copytree(tmp, dest)
    _make_readable(dest)
    shards = sorted(dest.glob("*.safetensors"))
    if len(shards) != spec.num_shards:
        raise SystemExit(
            f"{spec.name}: export wrote {len(shards)} shards, "
            f"expected {spec.num_shards}; "
            f"adjust max_shard_size ({spec.max_shard_size})"
        )
    return reference


def _make_readable(directory: Path) -> None:
    """Give a written fixture directory ordinary permissions (0755 dir, 0644 files)."""
    directory.chmod(0o755)
    for path in directory.iterdir():
        path.chmod(0o644)


def load_export(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of an export directory (any number of shards)."""
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():  # noqa: SIM118
                assert key not in tensors, f"{key} duplicated across shards"
                tensors[key] = f.get_tensor(key)
    return tensors


def quantized_modules(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names (no ``.weight``) of all NVFP4 linears: those with a ``weight_scale``."""
    return sorted(k[: -len(".weight_scale")] for k in tensors if k.endswith(".weight_scale"))


def modelopt_dequantize(tensors: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    """float32 weight of one NVFP4 linear by ModelOpt's ``NVFP4QTensor.dequantize``."""
    packed = tensors[f"{module}.weight"]
    shape = torch.Size([packed.shape[0], packed.shape[1] * 2])
    qtensor = NVFP4QTensor(shape, torch.float32, packed)
    return qtensor.dequantize(
        dtype=torch.float32,
        scale=tensors[f"{module}.weight_scale"],
        double_scale=tensors[f"{module}.weight_scale_2"],
        block_sizes={-1: NVFP4_BLOCK},
    ).contiguous()


def write_golden(export_dir: Path, golden_dir: Path) -> list[str]:
    """Write ``dequant.safetensors``; return the modules it holds."""
    tensors = load_export(export_dir)
    golden = {m: modelopt_dequantize(tensors, m) for m in quantized_modules(tensors)}
    total = sum(t.numel() * t.element_size() for t in golden.values())
    if total > GOLDEN_MAX_BYTES:
        keep_prefix = f"model.layers.{GOLDEN_EXPERT_LAYER}.mlp.experts."
        golden = {k: v for k, v in golden.items() if ".mlp.experts." not in k or k.startswith(keep_prefix)}
    if golden_dir.exists():
        shutil.rmtree(golden_dir)
    golden_dir.mkdir(parents=True)
    save_file(golden, str(golden_dir / "dequant.safetensors"), metadata={"format": "pt"})
    _make_readable(golden_dir)
    return sorted(golden)


def write_reference(reference: dict[str, torch.Tensor], config: DeepseekV4Config, ref_dir: Path) -> None:
    """Write the pre-quantization weights (one file) and the unquantized config."""
    if ref_dir.exists():
        shutil.rmtree(ref_dir)
    ref_dir.mkdir(parents=True)
    save_file(reference, str(ref_dir / "model.safetensors"), metadata={"format": "pt"})
    config.dtype = torch.bfloat16  # as a ``dtype=bfloat16`` model's config says
    config.to_json_file(str(ref_dir / "config.json"))
    _make_readable(ref_dir)


def verify_export(directory: Path, expect_bf16_o_a: Iterable[int], num_layers: int) -> None:
    """Reopen an export, print every tensor, check each NVFP4 linear's 4 tensors."""
    tensors = load_export(directory)
    index_path = directory / "model.safetensors.index.json"
    if index_path.exists():
        weight_map = json.loads(index_path.read_text())["weight_map"]
        assert set(weight_map) == set(tensors), "index.json does not list exactly the tensors"
    for key in sorted(tensors):
        t = tensors[key]
        print(f"  {key:78s} {str(t.dtype)[6:]:14s} {tuple(t.shape)}")
    modules = quantized_modules(tensors)
    for m in modules:
        w, ws = tensors[f"{m}.weight"], tensors[f"{m}.weight_scale"]
        ws2, ins = tensors[f"{m}.weight_scale_2"], tensors[f"{m}.input_scale"]
        assert w.dtype == torch.uint8 and w.dim() == 2, m
        assert ws.dtype == torch.float8_e4m3fn, m
        assert tuple(ws.shape) == (w.shape[0], w.shape[1] * 2 // NVFP4_BLOCK), m
        assert ws2.dtype == torch.float32 and ws2.dim() == 0, m
        assert ins.dtype == torch.float32 and ins.dim() == 0, m
    stray = [k for k in tensors if k.rsplit(".", 1)[-1] in QUANT_SUFFIXES[1:] and k.rsplit(".", 1)[0] not in modules]
    assert not stray, stray
    bf16_o_a = set(expect_bf16_o_a)
    for i in range(num_layers):
        key = f"model.layers.{i}.self_attn.o_a_proj"
        want = torch.bfloat16 if i in bf16_o_a else torch.uint8
        assert tensors[f"{key}.weight"].dtype == want, (
            key,
            tensors[f"{key}.weight"].dtype,
        )
    print(f"  {len(tensors)} tensors, {len(modules)} NVFP4 linears: OK")


def verify_golden(golden_path: Path, export_dir: Path, reference: dict[str, torch.Tensor]) -> None:
    """Check the golden weights against the pre-quantization ones and a 2nd decoder."""
    with safe_open(str(golden_path), "pt") as f:
        golden = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    tensors = load_export(export_dir)
    worst = 0.0
    for name, deq in golden.items():
        assert deq.dtype == torch.float32
        src = _reference_weight(reference, name).float()
        assert deq.shape == src.shape, (name, deq.shape, src.shape)
        # Per-block bound: half the largest E2M1 step (2, at the top of the range)
        # times the block scale, plus the e4m3 rounding of that block scale.
        block_scale = tensors[f"{name}.weight_scale"].float() * tensors[f"{name}.weight_scale_2"]
        bound = block_scale.repeat_interleave(NVFP4_BLOCK, dim=1) * (1.0 + 6 * 2**-3)
        contract = _contract_dequantize(tensors, name)
        assert torch.equal(deq.view(torch.int32), contract.view(torch.int32)), name
        err = (deq - src).abs()
        assert torch.all(err <= bound + 1e-12), name
        worst = max(worst, float((err / src.abs().amax()).max()))
    print(f"  golden: {len(golden)} modules, max |deq - bf16| / amax = {worst:.3f}: OK")


def _contract_dequantize(tensors: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    """Independent decoder: ``E2M1[code] * (float32(weight_scale) * weight_scale_2)``.

    Low nibble = even column, high nibble = odd column, bit 3 = sign (CONTRACT.md
    section 1). Only used to confirm it is bit-identical to ModelOpt's decoder.
    """
    e2m1 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, 0, -0.5, -1, -1.5, -2, -3, -4, -6])
    packed = tensors[f"{module}.weight"]
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(1).long()
    scale = tensors[f"{module}.weight_scale"].float() * tensors[f"{module}.weight_scale_2"]
    return e2m1[codes] * scale.repeat_interleave(NVFP4_BLOCK, dim=1)


def _reference_weight(reference: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    """Pre-quantization weight of a module (splits the fused routed experts)."""
    if f"{module}.weight" in reference:
        return reference[f"{module}.weight"]
    prefix, expert, proj = module.rsplit(".", 2)
    e = int(expert)
    if proj == "down_proj":
        return reference[f"{prefix}.down_proj"][e]
    gate_up = reference[f"{prefix}.gate_up_proj"][e]
    half = gate_up.shape[0] // 2
    return gate_up[:half] if proj == "gate_proj" else gate_up[half:]


def assert_plain_tensors_match(tensors: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> list[str]:
    """Every non-quantized tensor of the export equals the reference's, dtype and bytes; returns their names."""
    quantized = set(quantized_modules(tensors))
    plain = [k for k in tensors if k.rsplit(".", 1)[0] not in quantized]
    for key in plain:
        assert tensors[key].dtype == ref[key].dtype, key
        assert torch.equal(tensors[key].view(torch.uint8), ref[key].view(torch.uint8)), key
    return plain


def verify_reference(ref_dir: Path, export_dir: Path) -> None:
    """Check the reference loads strictly and matches each plain export tensor."""
    with safe_open(str(ref_dir / "model.safetensors"), "pt") as f:
        ref = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    model = DeepseekV4ForCausalLM._from_config(
        DeepseekV4Config.from_json_file(str(ref_dir / "config.json")),
        dtype=torch.bfloat16,
    )
    model.load_state_dict(ref, strict=True)
    check_plain_dtypes(model)
    plain = assert_plain_tensors_match(load_export(export_dir), ref)
    print(f"  ref: loads strictly; {len(plain)} plain export tensors byte-identical: OK")


def fp8_block_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[m, n] -> (float8_e4m3fn [m, n], float32 [ceil(m/128), ceil(n/128)]) with power-of-two scales.

    DeepSeek's release rule: per 128x128 block ``scale = 2**ceil(log2(amax / 448))``, ``q = e4m3(w / scale)``
    (round to nearest even). A partial block at the edge is scaled by the values it has.
    """
    w = w.float()
    m, n = w.shape
    pm, pn = -(-m // FP8_BLOCK), -(-n // FP8_BLOCK)
    padded = w.new_zeros(pm * FP8_BLOCK, pn * FP8_BLOCK)
    padded[:m, :n] = w
    blocks = padded.view(pm, FP8_BLOCK, pn, FP8_BLOCK)
    amax = blocks.abs().amax(dim=(1, 3), keepdim=True)
    assert torch.all(amax > 0)
    scale = torch.exp2(torch.ceil(torch.log2(amax / E4M3_MAX)))
    q = (blocks / scale).to(torch.float8_e4m3fn).view(pm * FP8_BLOCK, pn * FP8_BLOCK)[:m, :n]
    return q.contiguous(), scale.view(pm, pn).contiguous()


def fp8_block_dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 value of an FP8 block-scaled weight."""
    m, n = q.shape
    full = scale.repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)[:m, :n]
    return q.float() * full


def e2e_reference_tensors(reference: dict[str, torch.Tensor], export_dir: Path) -> dict[str, torch.Tensor]:
    """The pre-quantization state dict less the routed experts, NVFP4 linears of the export as FP8."""
    linears = {m for m in quantized_modules(load_export(export_dir)) if ".mlp.experts." not in m}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in reference.items():
        if ".mlp.experts." in key:
            continue
        module = key.removesuffix(".weight")
        if key.endswith(".weight") and module in linears:
            out[f"{module}.weight"], out[f"{module}.scale"] = fp8_block_quantize(tensor)
        else:
            out[key] = tensor
    assert all(f"{m}.scale" in out for m in linears)
    return out


def verify_e2e_reference(ref_dir: Path, export_dir: Path, reference: dict[str, torch.Tensor]) -> None:
    """No experts; plain tensors byte-identical to the export; FP8 = e4m3 rounding of the BF16 weight; loads."""
    with safe_open(str(ref_dir / "model.safetensors"), "pt") as f:
        ref = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert not [k for k in ref if ".mlp.experts." in k]
    tensors = load_export(export_dir)
    quantized = set(quantized_modules(tensors))
    plain = assert_plain_tensors_match(tensors, ref)
    state: dict[str, torch.Tensor] = {}
    fp8, worst = 0, 0.0
    for key, t in ref.items():
        module = key.removesuffix(".scale")
        if key.endswith(".scale") and f"{module}.weight" in ref:
            continue
        module = key.removesuffix(".weight")
        if t.dtype == torch.float8_e4m3fn:
            s = ref[f"{module}.scale"]
            assert s.dtype == torch.float32 and torch.equal(s, torch.exp2(torch.log2(s).round())), key
            value = fp8_block_dequantize(t, s)
            src = reference[key].float()
            # half an e4m3 step: 2**-4 relative (normal range), 2**-10 * scale (subnormal)
            step = torch.maximum(src.abs() * 2**-4, fp8_block_dequantize(torch.ones_like(t), s) * 2**-10)
            assert torch.all((value - src).abs() <= step * 1.0001), key
            worst = max(worst, float((value - src).norm() / src.norm()))
            state[key] = value.to(torch.bfloat16)
            fp8 += 1
        else:
            state[key] = t
    assert fp8 == len([m for m in quantized if ".mlp.experts." not in m])
    for key, t in reference.items():
        if ".mlp.experts." in key:
            state[key] = t
    assert set(state) == set(reference)
    model = DeepseekV4ForCausalLM._from_config(
        DeepseekV4Config.from_json_file(str(ref_dir / "config.json")), dtype=torch.bfloat16
    )
    model.load_state_dict(state, strict=True)
    size = (ref_dir / "model.safetensors").stat().st_size
    assert size < E2E_REF_MAX_BYTES, size
    print(
        f"  e2e ref: {len(plain)} plain tensors byte-identical to the export; {fp8} FP8 linears, "
        f"worst relative error {worst:.4f}; with the experts loads strictly: OK"
    )


def file_sizes(directory: Path) -> None:
    """Print the files of a fixture directory with their sizes."""
    for path in sorted(directory.iterdir()):
        print(f"  {path.name:40s} {path.stat().st_size:>10d}")


def make_tiny(out_root: Path, seed: int) -> None:
    """``tiny-dsv4`` + its golden dequantization + its BF16 reference."""
    spec = FixtureSpec(
        name="tiny-dsv4",
        config=tiny_config(),
        bf16_o_a_layers=[1, 3],
        max_shard_size=TINY_MAX_SHARD_SIZE,
        num_shards=TINY_NUM_SHARDS,
    )
    reference = write_export(spec, seed, out_root)
    export_dir = out_root / spec.name
    print(f"{export_dir}:")
    verify_export(export_dir, spec.bf16_o_a_layers, spec.config.num_hidden_layers)
    golden_dir = out_root / "tiny-dsv4-golden"
    write_golden(export_dir, golden_dir)
    verify_golden(golden_dir / "dequant.safetensors", export_dir, reference)
    write_reference(reference, tiny_config(), out_root / "tiny-dsv4-ref")
    verify_reference(out_root / "tiny-dsv4-ref", export_dir)
    for d in (export_dir, golden_dir, out_root / "tiny-dsv4-ref"):
        print(f"{d}:")
        file_sizes(d)


def make_e2e(out_root: Path, seed: int) -> None:
    """``tiny-dsv4-e2e``: vLLM-CPU-sized, every linear NVFP4, one shard; + its non-expert reference."""
    spec = FixtureSpec(
        name="tiny-dsv4-e2e",
        config=e2e_config(),
        calib_batches=4,
        calib_tokens=64,
    )
    reference = write_export(spec, seed, out_root)
    export_dir = out_root / spec.name
    print(f"{export_dir}:")
    verify_export(export_dir, [], spec.config.num_hidden_layers)
    ref_dir = out_root / "tiny-dsv4-e2e-ref"
    write_reference(e2e_reference_tensors(reference, export_dir), e2e_config(), ref_dir)
    verify_e2e_reference(ref_dir, export_dir, reference)
    for d in (export_dir, ref_dir):
        print(f"{d}:")
        file_sizes(d)


# --- recipe fixtures (``--which recipes``) -------------------------------------------------
# Each recipe's quant config is composed from ModelOpt 0.45's own building blocks (the units
# under ``modelopt_recipes/configs/ptq/``, loaded with ModelOpt's loaders) the way its presets
# and ``examples/llm_ptq/hf_ptq.py`` compose them. Every recipe uses the ``tiny`` model
# (one shard, ``o_a_proj`` re-classed as above and quantized like the other attention linears).

RECIPES_DIR = "recipes"
_BASE_DISABLE_ALL = _load_quantizer_cfg_dict_list("configs/ptq/units/base_disable_all")
_DEFAULT_DISABLED = _load_quantizer_cfg_dict_list("configs/ptq/units/default_disabled_quantizers")
_EXPERTS_NVFP4 = _load_quantizer_cfg_dict_list("configs/ptq/units/experts_nvfp4")
_NVFP4 = _load_quantizer_attribute_dict("configs/numerics/nvfp4")
_NVFP4_BS32 = _load_quantizer_attribute_dict("configs/numerics/nvfp4_bs32")
_FP8 = _load_quantizer_attribute_dict("configs/numerics/fp8")


def _cfg(entries: list[dict]) -> dict:
    return {"algorithm": "max", "quant_cfg": [dict(e) for e in entries]}


def recipe_kv_fp8() -> dict:
    """``hf_ptq.py --qformat nvfp4 --kv_cache_qformat fp8``: NVFP4_DEFAULT_CFG + the ``kv/fp8`` preset."""
    return mtq.update_quant_cfg_with_kv_cache_quant(mtq.NVFP4_DEFAULT_CFG, KV_QUANT_CFG_CHOICES["fp8"]["quant_cfg"])


def recipe_experts_fp8_attn() -> dict:
    """Routed experts NVFP4 (``units/experts_nvfp4``), per-tensor FP8 W8A8 on ``*self_attn*``."""
    fp8_attn = [
        {"quantizer_name": "*self_attn*weight_quantizer", "cfg": dict(_FP8)},
        {"quantizer_name": "*self_attn*input_quantizer", "cfg": dict(_FP8)},
    ]
    return _cfg(_BASE_DISABLE_ALL + fp8_attn + _EXPERTS_NVFP4 + _DEFAULT_DISABLED)


def recipe_bs32() -> dict:
    """NVFP4 W4A4 with ``numerics/nvfp4_bs32`` everywhere but the routed experts (block 16)."""
    bs32 = [
        {"quantizer_name": "*weight_quantizer", "cfg": dict(_NVFP4_BS32)},
        {"quantizer_name": "*input_quantizer", "cfg": dict(_NVFP4_BS32)},
    ]
    return _cfg(_BASE_DISABLE_ALL + bs32 + _EXPERTS_NVFP4 + _DEFAULT_DISABLED)


def recipe_experts_w4a16() -> dict:
    """NVFP4_DEFAULT_CFG with the routed experts' input quantizers disabled (weight-only NVFP4)."""
    cfg = dict(mtq.NVFP4_DEFAULT_CFG)
    cfg["quant_cfg"] = [*cfg["quant_cfg"], {"quantizer_name": "*.experts.*input_quantizer", "enable": False}]
    return cfg


def recipe_embed_lm_head() -> dict:
    """NVFP4_DEFAULT_CFG, then NVFP4 re-enabled on ``lm_head`` (W4A4) and ``embed_tokens`` (weight)."""
    cfg = dict(mtq.NVFP4_DEFAULT_CFG)
    cfg["quant_cfg"] = [
        *cfg["quant_cfg"],
        {"quantizer_name": "*lm_head*weight_quantizer", "cfg": dict(_NVFP4)},
        {"quantizer_name": "*lm_head*input_quantizer", "cfg": dict(_NVFP4)},
        {"quantizer_name": "*embed_tokens*weight_quantizer", "cfg": dict(_NVFP4)},
    ]
    return cfg


def _cpu_nvfp4_fake_quant(inputs: torch.Tensor, block_size: int, amax: torch.Tensor, bias, num_bits, scale_bits, *_):
    """NVFP4 fake quantization on CPU with ModelOpt's own ``NVFP4QTensor`` (quantize, then dequantize): global scale
    ``amax / (6 * 448)``, e4m3 block scales, E2M1 values, as ModelOpt's CUDA/Triton kernel computes them."""
    assert num_bits == (2, 1) and scale_bits == (4, 3), (num_bits, scale_bits)
    ws2 = amax.float().reshape(()) / (6.0 * 448.0)
    q, ws, ws2 = NVFP4QTensor.quantize(inputs.float(), block_size, weights_scaling_factor_2=ws2)
    x = q.dequantize(dtype=torch.float32, scale=ws, double_scale=ws2, block_sizes={-1: block_size})
    return x.to(inputs.dtype)


@contextlib.contextmanager
def awq_patches():
    """The two runtime patches ``nvfp4-awq`` needs with stock ModelOpt 0.45 on this CPU-only machine (undone after):

    1. ``awq_lite``'s search runs the model with NVFP4 fake quantization, which ModelOpt only implements in CUDA/Triton
       (``tensor_quant._dynamic_block_quantize_impl``: "amax must be a CUDA tensor for dynamic block quantization"):
       ``tensor_quantizer.dynamic_block_quant`` is replaced by ``_cpu_nvfp4_fake_quant``. Calibration only; the
       exported tensors are packed by ModelOpt's unchanged exporter.
    2. Expert discovery: ``export_hf_checkpoint`` groups the experts of each MoE block to average their
       ``pre_quant_scale`` (``export/layer_utils.get_experts_list``), which knows Mixtral, Qwen-MoE, NemotronH and
       Gemma4 only and raises ``NotImplementedError: deepseekv4forcausallm not supported``. For DeepSeek-V4 it returns
       no groups (transformers' ``DeepseekV4Experts`` are fused, handled by ModelOpt's ``_QuantFusedExperts``), so
       that averaging step is skipped; every other model type is unchanged.
    """
    from modelopt.torch.export import unified_export_hf
    from modelopt.torch.quantization.nn.modules import tensor_quantizer

    fake_quant, experts_list = tensor_quantizer.dynamic_block_quant, unified_export_hf.get_experts_list

    def get_experts_list(module: nn.Module, model_type: str) -> list:
        return [] if "deepseekv4" in model_type else experts_list(module, model_type)

    tensor_quantizer.dynamic_block_quant = _cpu_nvfp4_fake_quant
    unified_export_hf.get_experts_list = get_experts_list
    try:
        yield
    finally:
        tensor_quantizer.dynamic_block_quant, unified_export_hf.get_experts_list = fake_quant, experts_list


def recipe_specs() -> list[FixtureSpec]:
    """One spec per recipe fixture, written to ``recipes/<name>/``."""

    def spec(name: str, cfg: dict, dtype: torch.dtype = torch.bfloat16, patches=None) -> FixtureSpec:
        return FixtureSpec(
            name=f"{RECIPES_DIR}/{name}", config=tiny_config(), quant_cfg=cfg, dtype=dtype, patches=patches
        )

    return [
        spec("nvfp4-kv-fp8", recipe_kv_fp8()),
        spec("experts-nvfp4-attn-fp8", recipe_experts_fp8_attn()),
        spec("nvfp4-bs32", recipe_bs32()),
        spec("experts-w4a16", recipe_experts_w4a16()),
        spec("nvfp4-embed-lm-head", recipe_embed_lm_head()),
        spec("nvfp4-fp32", dict(mtq.NVFP4_DEFAULT_CFG), dtype=torch.float32),
        spec("nvfp4-awq", dict(mtq.NVFP4_AWQ_LITE_CFG), patches=awq_patches),
    ]


def describe_export(directory: Path) -> None:
    """Print every tensor (dtype, shape) and ``hf_quant_config.json`` of an export."""
    tensors = load_export(directory)
    for key in sorted(tensors):
        t = tensors[key]
        print(f"  {key:78s} {str(t.dtype)[6:]:14s} {tuple(t.shape)}")
    print("  hf_quant_config.json:", (directory / "hf_quant_config.json").read_text())
    print(f"  {len(tensors)} tensors")


def make_recipes(out_root: Path, seed: int, only: str | None = None) -> None:
    """Export every recipe fixture (or the one named ``only``); a recipe ModelOpt fails on is reported."""
    failed = []
    for spec in recipe_specs():
        if only and spec.name != f"{RECIPES_DIR}/{only}":
            continue
        print(f"{out_root / spec.name}:")
        try:
            write_export(spec, seed, out_root)
        except Exception as exc:  # report ModelOpt's error as is and go on
            print(f"  NOT EXPORTED: {type(exc).__name__}: {exc}")
            failed.append(spec.name)
            continue
        describe_export(out_root / spec.name)
        file_sizes(out_root / spec.name)
    if failed:
        print("not exported:", failed)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures"))
    parser.add_argument("--which", choices=("all", "tiny", "e2e", "recipes"), default="all")
    parser.add_argument("--recipe", help="with --which recipes: only this recipe (directory name)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.which in ("all", "tiny"):
        make_tiny(args.out, args.seed)
    if args.which in ("all", "e2e"):
        make_e2e(args.out, args.seed)
    if args.which == "recipes":
        make_recipes(args.out, args.seed, args.recipe)
    return 0


if __name__ == "__main__":
    sys.exit(main())
