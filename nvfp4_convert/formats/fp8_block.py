"""Block FP8 (DeepSeek's release and the converter's output, CONTRACT.md section 3).

``weight`` float8_e4m3fn [N, K] + ``scale`` [ceil(N/128), ceil(K/128)], float8_e8m0fnu (the output form) or float32
(accepted as input). Value: ``float32(weight) * scale`` of the row's and column's 128x128 block. ``encode`` is vLLM's
``per_block_cast_to_fp8(x, [128, 128], use_ue8m0=True)`` (``codecs.quantize_fp8_block``), scales stored as e8m0.
Bands start on 128-row boundaries (a scale row covers 128 weight rows).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..codecs import FP8_BLOCK, dequantize_fp8_block, fp8_scale_shape, quantize_fp8_block
from ..safetensors_io import read_rows
from .base import PRE_QUANT_SCALE, Format, Params, Scalars, Tensors, fail, refuse_extra

WEIGHT_DTYPE = "F8_E4M3"
SCALE_DTYPE = "F8_E8M0"  # what the converter writes and vLLM's DeepseekV4FP8Config expects
SCALE_DTYPES = (SCALE_DTYPE, "F32")


class Fp8Block(Format):
    name: ClassVar[str] = "fp8"
    label: ClassVar[str] = "FP8 block"
    weight_dtypes: ClassVar[tuple[str, ...]] = (WEIGHT_DTYPE,)
    decode_params: ClassVar[tuple[str, ...]] = ("weight", "scale")
    row_multiple: ClassVar[int] = FP8_BLOCK
    output: ClassVar[bool] = True
    run_source: ClassVar[bool] = True

    def validate(self, module: str, params: Params) -> Scalars:
        weight = params["weight"]
        scale = params.get("scale")
        if scale is None:
            raise fail(weight, "FP8 weight without its block 'scale'")
        if scale.dtype not in SCALE_DTYPES:
            raise fail(scale, f"FP8 block scale must be F8_E8M0 or F32, got {scale.dtype}")
        expected = fp8_scale_shape(*weight.shape)
        if scale.shape != expected:
            raise fail(scale, f"scale shape {list(scale.shape)} != {list(expected)}")
        refuse_extra(params, ("weight", "scale"), "an FP8")
        return Scalars()

    def read_band(self, params: Params, r0: int, r1: int) -> dict[str, torch.Tensor]:
        if r0 % FP8_BLOCK:
            raise ValueError("FP8 bands must start on a 128-row boundary")
        scale = read_rows(params["scale"], r0 // FP8_BLOCK, -(-r1 // FP8_BLOCK))
        return {"weight": read_rows(params["weight"], r0, r1), "scale": scale}

    def decode(self, tensors: Tensors) -> torch.Tensor:
        return dequantize_fp8_block(tensors["weight"], tensors["scale"])

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """float32 [m, n] (whole, or a band of whole 128-row blocks) -> e4m3 ``weight`` and e8m0 ``scale``."""
        q, scale = quantize_fp8_block(x)
        return {"weight": q, "scale": scale.to(torch.float8_e8m0fnu)}

    def output_tensors(self, rows: int, cols: int) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {"weight": (WEIGHT_DTYPE, (rows, cols)), "scale": (SCALE_DTYPE, fp8_scale_shape(rows, cols))}

    def in_output_form(self, params: Params) -> bool:
        return params["scale"].dtype == SCALE_DTYPE and PRE_QUANT_SCALE not in params


FP8_BLOCK_FORMAT = Fp8Block()
