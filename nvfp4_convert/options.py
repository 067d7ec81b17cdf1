"""The values the command line's options take, importable without torch.

``nvfp4-convert --help`` and the start of ``run`` (which begins reading the source into the page cache before
torch is imported: ``prefetch``) need these and nothing heavier. Each is re-exported where it belongs:
``Preset``/``ExpertFormat`` by ``policy``, ``IOMode`` by ``convert``, ``Thresholds`` by ``verify``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Preset(str, Enum):
    """``--policy``: the precision preset of the non-expert linears."""

    DEFAULT = "default"
    FP8 = "fp8"
    BF16 = "bf16"


class ExpertFormat(str, Enum):
    """``--experts``: the routed experts' output format."""

    NVFP4 = "nvfp4"  # ModelOpt's bytes kept
    BF16 = "bf16"  # dequantized: a reference checkpoint


class IOMode(str, Enum):
    """``--io``: how shards are written and expert bytes copied (see ``convert.run``)."""

    AUTO = "auto"
    DIRECT = "direct"
    BUFFERED = "buffered"


@dataclass
class Thresholds:
    """Limits of ``verify``'s reference comparison (defaults: comfortably above NVFP4's error)."""

    max_rel_error: float = 0.25
    min_cosine: float = 0.97
    max_matmul_rel_error: float = 0.25
