"""Dense linears: a floating ``weight`` (BF16, F16 or F32) alone.

Recognised by the weight's dtype; a quantization companion beside it is refused. Decoding is the float32 cast;
``encode`` rounds float32 to BF16 (the only dense form the converter writes), and a BF16 module is already in that
form.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from .base import PRE_QUANT_SCALE, Format, Params, Scalars, Tensors, fail

OUTPUT_DTYPE = "BF16"


class Dense(Format):
    name: ClassVar[str] = "dense"
    label: ClassVar[str] = "dense"
    weight_dtypes: ClassVar[tuple[str, ...]] = ("BF16", "F16", "F32")
    output: ClassVar[bool] = True
    run_source: ClassVar[bool] = True

    def validate(self, module: str, params: Params) -> Scalars:
        weight = params["weight"]
        extra = sorted(set(params) - {"weight"})
        if extra:
            raise fail(params[extra[0]], f"{weight.dtype} weight with quantization companion {extra[0]}")
        return Scalars()

    def decode(self, tensors: Tensors) -> torch.Tensor:
        return tensors["weight"].to(torch.float32)

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"weight": x.to(torch.bfloat16)}

    def output_tensors(self, rows: int, cols: int) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {"weight": (OUTPUT_DTYPE, (rows, cols))}

    def in_output_form(self, params: Params) -> bool:
        return params["weight"].dtype == OUTPUT_DTYPE and PRE_QUANT_SCALE not in params


DENSE = Dense()
