"""ModelOpt per-tensor FP8: ``weight`` float8_e4m3fn [out, in] + ``weight_scale`` float32 scalar (+ ``input_scale``,
a float32 scalar activation scale that never enters the weight's value).

Told apart from block FP8 by its ``weight_scale`` (block FP8 has a ``scale``). Value: ``float32(weight) *
weight_scale`` (``codecs.dequantize_fp8_tensor``, exact in float32). ``run`` decodes it and writes it as the policy
says (BF16 or block FP8): vLLM's DeepSeek-V4 has no per-tensor FP8 linear.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..codecs import dequantize_fp8_tensor
from ..safetensors_io import read_rows, read_tensor
from .base import Format, Params, Scalars, Tensors, positive_scalar, refuse_extra, require

WEIGHT_DTYPE = "F8_E4M3"


class Fp8Tensor(Format):
    name: ClassVar[str] = "fp8_tensor"
    label: ClassVar[str] = "FP8 per-tensor (ModelOpt)"
    weight_dtypes: ClassVar[tuple[str, ...]] = (WEIGHT_DTYPE,)
    decode_params: ClassVar[tuple[str, ...]] = ("weight", "weight_scale")
    run_source: ClassVar[bool] = True

    def recognise(self, params: Params) -> bool:
        return super().recognise(params) and "weight_scale" in params and "scale" not in params

    def validate(self, module: str, params: Params) -> Scalars:
        require(params, ("weight_scale",), "FP8 per-tensor")
        refuse_extra(params, ("weight", "weight_scale", "input_scale"), "a per-tensor FP8")
        global_scale = positive_scalar(params["weight_scale"])
        input_scale = positive_scalar(params["input_scale"]) if "input_scale" in params else None
        return Scalars(global_scale, input_scale)

    def read_band(self, params: Params, r0: int, r1: int) -> dict[str, torch.Tensor]:
        return {"weight": read_rows(params["weight"], r0, r1), "weight_scale": read_tensor(params["weight_scale"])}

    def decode(self, tensors: Tensors) -> torch.Tensor:
        return dequantize_fp8_tensor(tensors["weight"], tensors["weight_scale"])


FP8_TENSOR = Fp8Tensor()
