"""Number formats of a linear's weight, one module each, and the registry that tells them apart.

- ``nvfp4``: ModelOpt NVFP4, every block size it reads (``NVFP4_VARIANTS``: block 32, and block 16 ``NVFP4``)
- ``fp8_block``: e4m3 ``weight`` + e8m0/float32 128x128 ``scale`` (``FP8_BLOCK_FORMAT``; an output format)
- ``fp8_tensor``: ModelOpt per-tensor FP8, e4m3 ``weight`` + float32 scalar ``weight_scale`` (``FP8_TENSOR``)
- ``mxfp4``: DeepSeek's release MXFP4, int8 ``weight`` + E8M0 ``scale`` per 32 (``MXFP4``)
- ``dense``: BF16/F16/F32 ``weight`` (``DENSE``; an output format, as BF16)

``recognise(params)`` gives the one format a module's tensors claim (``ConvertError`` naming the weight when none
does; ``recognise_tensors`` the same for in-memory tensors); ``FORMATS[name]`` the format of a ``Module.format`` string; ``decode_rows(sources, r0, r1)`` decodes the
tensors a plan names (``OutputTensor.sources``, recognised again from their names and dtypes) and stops on a value
that is not finite. Contract of each format: ``base.Format``. Nothing here imports planning or verification.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import ConvertError
from ..safetensors_io import TORCH_TO_ST, TensorInfo
from .base import PRE_QUANT_SCALE, Format, Params, Scalars, fold_pre_quant_scale
from .dense import DENSE
from .fp8_block import FP8_BLOCK_FORMAT
from .fp8_tensor import FP8_TENSOR
from .mxfp4 import MXFP4
from .nvfp4 import NVFP4, NVFP4_VARIANTS

# In recognition order: the first that claims a module's tensors is its format (NVFP4's block sizes in its own
# order, block 16 last; per-tensor FP8 before block FP8), so that the catch-all of each dtype comes last and names
# what is wrong.
ALL: tuple[Format, ...] = (*NVFP4_VARIANTS, FP8_TENSOR, FP8_BLOCK_FORMAT, MXFP4, DENSE)
FORMATS: dict[str, Format] = {f.name: f for f in ALL}

__all__ = [
    "ALL",
    "DENSE",
    "FORMATS",
    "FP8_BLOCK_FORMAT",
    "FP8_TENSOR",
    "MXFP4",
    "NVFP4",
    "NVFP4_VARIANTS",
    "PRE_QUANT_SCALE",
    "Format",
    "Params",
    "Scalars",
    "decode_module",
    "decode_rows",
    "of_sources",
    "recognise",
    "recognise_tensors",
]


def recognise(params: Params) -> Format:
    """The format of one linear's tensors (header only); ``ConvertError`` on the weight when no format claims it."""
    fmt = next((f for f in ALL if f.recognise(params)), None)
    if fmt is None:
        weight = params["weight"]
        raise ConvertError(f"unsupported linear weight dtype {weight.dtype}", file=weight.file, tensor=weight.name)
    return fmt


def recognise_tensors(tensors: Mapping[str, torch.Tensor], module: str = "<memory>") -> Format:
    """The format of one linear held in memory (param -> tensor), recognised from torch dtypes and shapes."""
    return recognise(
        {
            p: TensorInfo(f"{module}.{p}", TORCH_TO_ST[t.dtype], tuple(t.shape), Path("<memory>"), 0, t.nbytes)
            for p, t in tensors.items()
        }
    )


def params_of(sources: tuple[TensorInfo, ...]) -> dict[str, TensorInfo]:
    """Parameter name -> tensor, from full tensor names (``<module>.<param>``, the weight first)."""
    return {info.name.rpartition(".")[2]: info for info in sources}


def of_sources(sources: tuple[TensorInfo, ...]) -> tuple[Format, dict[str, TensorInfo]]:
    """The format of a plan's decode sources, and those sources by parameter name."""
    params = params_of(sources)
    return recognise(params), params


def decode_rows(sources: tuple[TensorInfo, ...], r0: int, r1: int) -> torch.Tensor:
    """float32 rows ``[r0, r1)`` of a linear from its decode sources (weight first; any format).

    An AWQ ``pre_quant_scale`` among the sources is folded in (``base.fold_pre_quant_scale``). A NaN or infinite
    value (from the weight or any of its scales) stops the run naming the tensor and element.
    """
    fmt, params = of_sources(sources)
    return _finite(fold_pre_quant_scale(fmt.decode_rows(params, r0, r1), params), params["weight"], r0)


def decode_module(fmt: Format, params: Params) -> torch.Tensor:
    """float32 value of a whole linear (its ``pre_quant_scale`` folded in, as ``decode_rows``)."""
    x = fmt.decode_rows(params, 0, fmt.logical_shape(params)[0])
    return _finite(fold_pre_quant_scale(x, params), params["weight"], 0)


def _finite(x: torch.Tensor, weight: TensorInfo, r0: int) -> torch.Tensor:
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        r, c = (int(i) for i in (~finite).nonzero()[0])
        raise ConvertError(
            f"decoded value [{r0 + r}, {c}] is {float(x[r, c])} (weight or scale): not finite",
            file=weight.file,
            tensor=weight.name,
        )
    return x
