"""ModelOpt NVFP4 (CONTRACT.md section 1), block 16 (ModelOpt's NVFP4) and block 32.

``weight`` uint8 [out, in/2] (two E2M1 codes a byte, element 2i in the low nibble) + ``weight_scale`` float8_e4m3fn
[out, in/block] + ``weight_scale_2`` float32 scalar (+ ``input_scale``, an activation scale, never part of the
weight). Value: ``E2M1[code] * (float32(weight_scale) * weight_scale_2)`` (``codecs.dequantize_nvfp4``).

Recognition: a uint8 weight is NVFP4; it is block 32 when its ``weight_scale`` has exactly [out, in/32] entries,
else block 16 (whose ``validate`` then names what is wrong). Block scales must be finite and non-negative:
``check_block_scales`` checks them wherever their bytes pass (decoding, folding, copying). ``run`` decodes both; routed
experts are kept in block 16, which block 32 restates exactly (``restated_as``: each block scale repeated, FP4 codes
and global scale unchanged, so every decoded value is the same).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from ..codecs import FP4_BLOCK, dequantize_nvfp4
from ..safetensors_io import TensorInfo, read_rows, read_tensor
from .base import Format, Params, Scalars, Tensors, fail, positive_scalar, require

WEIGHT_DTYPE = "U8"
SCALE_DTYPE = "F8_E4M3"
PARAMS = ("weight", "weight_scale", "weight_scale_2", "input_scale")


class Nvfp4(Format):
    weight_dtypes: ClassVar[tuple[str, ...]] = (WEIGHT_DTYPE,)
    decode_params: ClassVar[tuple[str, ...]] = ("weight", "weight_scale", "weight_scale_2")

    def __init__(self, block: int) -> None:
        self.block = block

    @property
    def name(self) -> str:  # type: ignore[override]
        return "nvfp4" if self.block == FP4_BLOCK else f"nvfp4_{self.block}"

    @property
    def label(self) -> str:  # type: ignore[override]
        return "NVFP4" if self.block == FP4_BLOCK else f"NVFP4 (block {self.block})"

    run_source: ClassVar[bool] = True

    def scale_shape(self, weight: TensorInfo) -> tuple[int, int] | None:
        """[out, in/block] of a weight, ``None`` when ``in`` is no multiple of the block."""
        out, half_in = weight.shape
        return None if (half_in * 2) % self.block else (out, half_in * 2 // self.block)

    def recognise(self, params: Params) -> bool:
        if not super().recognise(params):
            return False
        if self.block == FP4_BLOCK:
            return True
        ws = params.get("weight_scale")
        return ws is not None and len(params["weight"].shape) == 2 and ws.shape == self.scale_shape(params["weight"])

    def validate(self, module: str, params: Params) -> Scalars:
        weight = params["weight"]
        require(params, ("weight_scale", "weight_scale_2"), "NVFP4 (uint8)")
        if "scale" in params:
            raise fail(params["scale"], "FP8 'scale' beside an NVFP4 weight")
        ws = params["weight_scale"]
        if ws.dtype != SCALE_DTYPE:
            raise fail(ws, f"weight_scale must be F8_E4M3, got {ws.dtype}")
        out, half_in = weight.shape
        if ws.shape != self.scale_shape(weight):
            raise fail(
                ws,
                f"weight_scale shape {list(ws.shape)} != [{out}, {half_in * 2 // self.block}] for weight "
                f"{list(weight.shape)}",
            )
        global_scale = positive_scalar(params["weight_scale_2"])
        input_scale = positive_scalar(params["input_scale"]) if "input_scale" in params else None
        return Scalars(global_scale, input_scale)

    def logical_shape(self, params: Params) -> tuple[int, int]:
        w = params["weight"]
        return (w.shape[0], w.shape[1] * 2)

    def read_band(self, params: Params, r0: int, r1: int) -> dict[str, torch.Tensor]:
        ws = read_rows(params["weight_scale"], r0, r1)
        check_block_scales(ws, params["weight_scale"], first_row=r0)
        return {
            "weight": read_rows(params["weight"], r0, r1),
            "weight_scale": ws,
            "weight_scale_2": read_tensor(params["weight_scale_2"]),
        }

    def decode(self, tensors: Tensors) -> torch.Tensor:
        return dequantize_nvfp4(tensors["weight"], tensors["weight_scale"], tensors["weight_scale_2"], block=self.block)

    def restated_as(self, target: Format, params: Params) -> dict[str, tuple[str, tuple[int, ...]]] | None:
        """NVFP4 of a block that is a multiple of ``target``'s restates exactly: only ``weight_scale`` changes, to
        ``[out, in/target.block]`` (each scale repeated ``block/target.block`` times)."""
        if target is self:
            return {}
        if not isinstance(target, Nvfp4) or self.block % target.block:
            return None
        weight = params["weight"]
        shape = target.scale_shape(weight)
        return None if shape is None else {"weight_scale": (SCALE_DTYPE, shape)}

    def restate(self, param: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Block scales ``[out, in/block]`` -> ``[out, in/b]`` for ``shape``'s smaller block ``b``: each repeated."""
        if param != "weight_scale" or shape[0] != tensor.shape[0] or shape[1] % tensor.shape[1]:
            raise ValueError(f"cannot restate NVFP4 {param} {list(tensor.shape)} as {list(shape)}")
        raw = tensor.view(torch.uint8).repeat_interleave(shape[1] // tensor.shape[1], dim=1)
        return raw.view(torch.float8_e4m3fn)


NVFP4 = Nvfp4(FP4_BLOCK)
NVFP4_32 = Nvfp4(32)
# Every NVFP4 the registry recognises, in order: a larger block claims a weight by its scales' exact shape, block 16
# (the catch-all that names what is wrong) comes last. A new block size is one more instance here, nothing else.
NVFP4_VARIANTS: tuple[Nvfp4, ...] = (NVFP4_32, NVFP4)


def is_block_scale(info: TensorInfo) -> bool:
    """An NVFP4 block-scale tensor (checked as it streams by, even when copied unchanged)."""
    return info.name.endswith("weight_scale") and info.dtype == SCALE_DTYPE


def check_block_scales(ws: torch.Tensor, info: TensorInfo, *, first_row: int = 0) -> None:
    """NVFP4 block scales (rows ``first_row`` onwards of ``info``) must be finite and non-negative (e4m3fn has NaN
    but no Inf); an error names the element's place in the whole tensor."""
    first = first_row * (info.shape[1] if len(info.shape) > 1 else 1)
    check_e4m3_codes(ws.view(torch.uint8).reshape(-1).numpy(), info, first=first)


def check_e4m3_codes(raw: np.ndarray, info: TensorInfo, first: int = 0) -> None:
    """On flat raw e4m3fn codes, element ``first`` onwards of ``info`` (numpy: ~100x faster than
    torch for uint8 compares here): NaN is 0x7F/0xFF, a negative value has the sign bit and a
    non-zero magnitude (0x80 is -0.0)."""
    if raw.size == 0 or int(raw.max()) <= 0x7E:  # the usual case, decided in one pass
        return
    bad = (raw > 0x80) | (raw == 0x7F)
    if bad.any():
        i = int(np.argmax(bad))
        where = [int(k) for k in np.unravel_index(first + i, info.shape)]
        value = torch.tensor([int(raw[i])], dtype=torch.uint8).view(torch.float8_e4m3fn).float().item()
        raise fail(info, f"block scale {where} is {value}: NaN or negative")
