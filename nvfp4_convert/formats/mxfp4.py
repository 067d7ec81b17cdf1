"""DeepSeek's release MXFP4 (routed experts): ``weight`` int8 [out, in/2] (two E2M1 codes a byte, element 2i in the
low nibble) + ``scale`` float8_e8m0fnu (or its raw exponent bytes, uint8) [out, in/32], nothing else.

Value: ``E2M1[code] * 2^(scale byte - 127)`` (``codecs.dequantize_mxfp4``, exact; a NaN scale byte or a float32
overflow raises naming the tensor). Recognised, validated and decoded; ``run`` does not convert it yet.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..codecs import MX_BLOCK, dequantize_mxfp4
from ..errors import ConvertError
from .base import Format, Params, Scalars, Tensors, fail, refuse_extra

WEIGHT_DTYPE = "I8"
SCALE_DTYPES = ("F8_E8M0", "U8")


class Mxfp4(Format):
    name: ClassVar[str] = "mxfp4"
    label: ClassVar[str] = "MXFP4"
    weight_dtypes: ClassVar[tuple[str, ...]] = (WEIGHT_DTYPE,)
    decode_params: ClassVar[tuple[str, ...]] = ("weight", "scale")

    def validate(self, module: str, params: Params) -> Scalars:
        weight = params["weight"]
        scale = params.get("scale")
        if scale is None:
            raise fail(weight, "MXFP4 (int8) weight without its E8M0 'scale'")
        if scale.dtype not in SCALE_DTYPES:
            raise fail(scale, f"MXFP4 scale must be F8_E8M0, got {scale.dtype}")
        out, half_in = weight.shape
        if (half_in * 2) % MX_BLOCK or scale.shape != (out, half_in * 2 // MX_BLOCK):
            raise fail(
                scale,
                f"scale shape {list(scale.shape)} != [{out}, {half_in * 2 // MX_BLOCK}] for weight {list(weight.shape)}",
            )
        refuse_extra(params, ("weight", "scale"), "an MXFP4")
        return Scalars()

    def logical_shape(self, params: Params) -> tuple[int, int]:
        w = params["weight"]
        return (w.shape[0], w.shape[1] * 2)

    def decode(self, tensors: Tensors) -> torch.Tensor:
        return dequantize_mxfp4(tensors["weight"], tensors["scale"])

    def decode_rows(self, params: Params, r0: int, r1: int) -> torch.Tensor:
        try:
            return super().decode_rows(params, r0, r1)
        except ConvertError as e:  # name the scale tensor, its file, and the block's row in the whole tensor
            raise fail(params["scale"], e.what + (f" (band from row {r0})" if r0 else "")) from e


MXFP4 = Mxfp4()
