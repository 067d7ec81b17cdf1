"""Precision policy: the output format of every module (CONTRACT.md section 3).

Presets (``--policy``):

- ``default``: ``wo_a`` FP8, the other attention projections BF16, shared experts FP8.
- ``fp8``: every attention projection and shared expert FP8 (NVIDIA's own hybrid layout).
- ``bf16``: every attention projection (``wo_a`` included) and shared expert BF16; BF16 ``wo_a``
  needs vLLM >= 0.30.

Whatever the preset, vLLM dictates: compressors and the indexer's ``weights_proj`` BF16 (built
with no quant config), MTP ``e_proj``/``h_proj`` FP8 (built with no prefix, so ``ignored_layers``
cannot reach them), the router and non-linear tensors copied. Routed experts (``--experts``):
``nvfp4`` keeps ModelOpt's bytes, ``bf16`` dequantizes them (a reference checkpoint, and the only
form vLLM's CPU build can run); BF16 experts are listed in ``ignored_layers``. ``--mtp-experts`` sets the MTP
block's routed experts apart (default: as ``--experts``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .inventory import Module, Role
from .options import ExpertFormat, Preset


class Target(str, Enum):
    """Output format of a module."""

    FP8 = "fp8"  # float8_e4m3fn weight + float8_e8m0fnu 128x128 block `scale`
    BF16 = "bf16"
    NVFP4 = "nvfp4"  # ModelOpt NVFP4, bytes kept
    COPY = "copy"  # a non-linear tensor or the router, dtype and bytes kept


ATTENTION_PROJECTIONS = ("wq_a", "wkv", "wq_b", "wo_a", "wo_b", "indexer.wq_b")
MIN_VLLM = "0.22"  # moe_quant_algo NVFP4 (CONTRACT.md section 5)
MIN_VLLM_BF16_WO_A = "0.30"  # BF16 wo_a accepted (CONTRACT.md section 5)
PRESETS = tuple(p.value for p in Preset)
EXPERT_FORMATS = tuple(f.value for f in ExpertFormat)


@dataclass(frozen=True)
class Policy:
    """A precision preset plus the routed-experts format (``mtp_experts``: the MTP block's, None = ``experts``)."""

    name: str = "default"
    experts: str = "nvfp4"
    mtp_experts: str | None = None

    def __post_init__(self) -> None:
        if self.name not in PRESETS:
            raise ValueError(f"unknown policy {self.name!r}; choose one of {', '.join(PRESETS)}")
        if self.experts not in EXPERT_FORMATS:
            raise ValueError(f"unknown experts format {self.experts!r}; choose one of {', '.join(EXPERT_FORMATS)}")
        if self.mtp_experts is not None and self.mtp_experts not in EXPERT_FORMATS:
            raise ValueError(
                f"unknown MTP experts format {self.mtp_experts!r}; choose one of {', '.join(EXPERT_FORMATS)}"
            )

    def attention_target(self, projection: str) -> Target:
        if self.name == "fp8" or (self.name == "default" and projection == "wo_a"):
            return Target.FP8
        return Target.BF16

    @property
    def shared_expert_target(self) -> Target:
        return Target.BF16 if self.name == "bf16" else Target.FP8

    def target(self, module: Module) -> Target:
        """Output format of ``module`` under this policy."""
        role = module.role
        if role == Role.ATTENTION:
            return self.attention_target(module.name.split(".attn.", 1)[1])
        if role in (Role.COMPRESSOR, Role.INDEXER_WEIGHTS):
            return Target.BF16
        if role == Role.SHARED_EXPERT:
            return self.shared_expert_target
        if role == Role.MTP_PROJ:
            return Target.FP8
        if role == Role.ROUTED_EXPERT:
            fmt = self.mtp_experts if module.name.startswith("mtp.") and self.mtp_experts else self.experts
            return Target.NVFP4 if fmt == "nvfp4" else Target.BF16
        return Target.COPY

    @property
    def bf16_wo_a(self) -> bool:
        """Whether ``wo_a`` is written BF16, which only vLLM >= ``MIN_VLLM_BF16_WO_A`` builds."""
        return self.attention_target("wo_a") == Target.BF16

    @property
    def min_vllm(self) -> str:
        """Oldest vLLM release that serves this layout."""
        return MIN_VLLM_BF16_WO_A if self.bf16_wo_a else MIN_VLLM

    def describe(self) -> str:
        attn = ", ".join(f"{p}={self.attention_target(p).value}" for p in ATTENTION_PROJECTIONS)
        return (
            f"policy {self.name}: attention {attn}; shared experts {self.shared_expert_target.value}; "
            f"routed experts {self.experts}"
            f"{f' (MTP block {self.mtp_experts})' if self.mtp_experts else ''}; compressors/indexer weights_proj bf16; mtp e_proj/h_proj fp8; "
            f"needs vLLM >= {self.min_vllm}"
        )
