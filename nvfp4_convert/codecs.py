"""Numeric codecs, pure functions on tensors (CONTRACT.md sections 1, 3 and 4.6).

- ``dequantize_nvfp4``: ModelOpt NVFP4 (uint8 pairs of E2M1 codes, e4m3 block scales per 16 inputs,
  float32 global scale) to float32, in exactly ModelOpt's order ``code * (float32(ws) * ws2)``.
  ``input_scale`` is an activation scale and never enters here.
- ``quantize_fp8_block``: float32 to ``float8_e4m3fn`` with one power-of-two scale per 128x128
  block, ``s = 2**ceil(log2(max(amax, 1e-4) / 448))``, weight ``e4m3(w * (1/s))``: the values of
  vLLM's ``per_block_cast_to_fp8(x, [128, 128], use_ue8m0=True)``; scales returned as float32 and
  stored as ``float8_e8m0fnu`` (exact, being powers of two).
- ``fold_global_scales``: give gate and up of one expert one global scale (trap 6).
- ``quantize_nvfp4``: float32 to ModelOpt's NVFP4 form (the inverse of ``dequantize_nvfp4``, ModelOpt's
  recipe: ``weight_scale_2 = amax / (6 * 448)``, block scale ``e4m3(block_amax / (6 * weight_scale_2))``,
  codes rounded to the nearest E2M1 value). Used to build test and preflight sources, never on a
  checkpoint being converted.

Row-band processing: each function works on any band of whole rows (FP8: multiples of 128 rows),
so callers can stream large tensors in bounded memory.
"""

from __future__ import annotations

import torch

FP4_BLOCK = 16
FP8_BLOCK = 128
E4M3_MAX = 448.0
AMAX_FLOOR = 1e-4

# E2M1 value of each 4-bit code; bit 3 is the sign, code 8 decodes to +0.0 as in ModelOpt.
E2M1_VALUES = torch.tensor(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    dtype=torch.float32,
)


# Both E2M1 values of every byte: row b is (value of the low nibble, value of the high nibble).
_BYTE_PAIRS = torch.stack((E2M1_VALUES.repeat(16), E2M1_VALUES.repeat_interleave(16)), dim=1)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [rows, in/2] -> float32 [rows, in]; element 2i is the low nibble, 2i+1 the high one."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed FP4 must be uint8, got {packed.dtype}")
    rows, half = packed.shape
    return torch.nn.functional.embedding(packed.to(torch.int32), _BYTE_PAIRS).view(rows, half * 2)


def dequantize_nvfp4(packed: torch.Tensor, weight_scale: torch.Tensor, weight_scale_2: torch.Tensor) -> torch.Tensor:
    """float32 weight of an NVFP4 linear (rows may be any band of the full tensor)."""
    if weight_scale.dtype != torch.float8_e4m3fn:
        raise TypeError(f"weight_scale must be float8_e4m3fn, got {weight_scale.dtype}")
    values = unpack_e2m1(packed)
    rows, cols = values.shape
    if weight_scale.shape != (rows, cols // FP4_BLOCK):
        raise ValueError(f"weight_scale shape {tuple(weight_scale.shape)} != {(rows, cols // FP4_BLOCK)}")
    block_scale = weight_scale.to(torch.float32) * weight_scale_2.to(torch.float32)
    # in place: a fresh [rows, cols] float32 result would cost page faults for nothing
    return values.view(rows, -1, FP4_BLOCK).mul_(block_scale.unsqueeze(-1)).view(rows, cols)


def fp8_scale_shape(rows: int, cols: int) -> tuple[int, int]:
    """Shape of the block-scale tensor of a [rows, cols] FP8 weight."""
    return (-(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK))


def quantize_fp8_block(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 [m, n] -> (float8_e4m3fn [m, n], float32 power-of-two scales [ceil(m/128), ceil(n/128)])."""
    if x.dim() != 2:
        raise ValueError("FP8 block quantization needs a 2-D tensor")
    x = x.to(torch.float32)
    m, n = x.shape
    pm, pn = fp8_scale_shape(m, n)
    if (m, n) != (pm * FP8_BLOCK, pn * FP8_BLOCK):
        padded = x.new_zeros(pm * FP8_BLOCK, pn * FP8_BLOCK)
        padded[:m, :n] = x
        x = padded
    blocks = x.reshape(pm, FP8_BLOCK, pn, FP8_BLOCK)
    # max |x| as max(max x, -min x): the same value without an abs() copy of the whole tensor
    amax = torch.maximum(blocks.amax(dim=(1, 3), keepdim=True), -blocks.amin(dim=(1, 3), keepdim=True))
    amax = amax.clamp(min=AMAX_FLOOR)
    scale = torch.pow(2.0, torch.ceil(torch.log2(amax / E4M3_MAX)))
    q = (blocks * (1.0 / scale)).to(torch.float8_e4m3fn)
    return q.view(pm * FP8_BLOCK, pn * FP8_BLOCK)[:m, :n].contiguous(), scale.view(pm, pn)


def dequantize_fp8_block(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 value of an FP8 block-scaled weight (scale in float32 or float8_e8m0fnu)."""
    m, n = q.shape
    s = scale.to(torch.float32).repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)
    return q.to(torch.float32) * s[:m, :n]


def is_power_of_two(t: torch.Tensor) -> torch.Tensor:
    """Elementwise: finite, positive and an exact power of two."""
    t = t.to(torch.float32)
    mantissa, _ = torch.frexp(t)
    return torch.isfinite(t) & (t > 0) & (mantissa == 0.5)


FOLD_MAX_REL_ERROR = 2**-4  # e4m3 rounds each normal value within 2^-4 (~2^-5 on average over a tensor)


def fold_block_scales(ws: torch.Tensor, ratio: float) -> tuple[torch.Tensor, float]:
    """``e4m3(ws * ratio)`` (trap 6's fix for the half with the smaller global scale) and its error: the folded
    scales against the exact ``ws * ratio``, relative over the whole half (blocks weighted by their scale, so
    near-empty blocks count little; a zeroed half is 1.0). Above ``FOLD_MAX_REL_ERROR`` the ratio has pushed the
    scales out of e4m3's range and the half has lost its values."""
    exact = ws.to(torch.float32) * torch.tensor(ratio, dtype=torch.float32)
    folded = exact.to(torch.float8_e4m3fn)
    norm = float(exact.norm())
    return folded, (float((folded.to(torch.float32) - exact).norm()) / norm if norm > 0 else 0.0)


def fold_global_scales(
    ws_gate: torch.Tensor, ws2_gate: torch.Tensor, ws_up: torch.Tensor, ws2_up: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Give gate and up one global scale: the larger; rescale the other half's block scales.

    The half whose global scale was smaller gets ``e4m3(float32(ws) * (small / large))`` (ratio < 1,
    so no block scale can pass e4m3's maximum); FP4 codes are unchanged. Returns the four new
    tensors (gate ws, gate ws2, up ws, up ws2) in the input dtypes.
    """
    g, u = float(ws2_gate), float(ws2_up)
    big = torch.tensor(max(g, u), dtype=torch.float32)
    if g == u:
        return ws_gate, ws2_gate, ws_up, ws2_up

    def rescale(ws: torch.Tensor, small: float) -> torch.Tensor:
        ratio = torch.tensor(small, dtype=torch.float32) / big
        return (ws.to(torch.float32) * ratio).to(torch.float8_e4m3fn)

    if g < u:
        return rescale(ws_gate, g), big.reshape(ws2_gate.shape), ws_up, ws2_up
    return ws_gate, ws2_gate, rescale(ws_up, u), big.reshape(ws2_up.shape)


# Midpoints between consecutive E2M1 magnitudes (0, 0.5, 1, 1.5, 2, 3, 4, 6): a magnitude's nearest code.
_E2M1_MIDPOINTS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=torch.float32)
# Ties on these midpoints round up, to the even code (1, 2, 4), as ModelOpt's ``_cast_fp4`` does.
_E2M1_ROUND_UP_TIES = _E2M1_MIDPOINTS[1::2]
FP4_MAX = 6.0


def quantize_nvfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 [rows, cols] -> (uint8 [rows, cols/2], float8_e4m3fn [rows, cols/16], float32 scalar).

    ModelOpt's NVFP4 weight recipe (``NVFP4QTensor``): an all-zero block gets block scale 1.0, ties round to
    the even code; ``dequantize_nvfp4`` of the result is within half an E2M1 step of ``w`` (times the block scale).
    """
    w = w.to(torch.float32)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("NVFP4 quantization of a tensor with NaN or Inf")
    rows, cols = w.shape
    if cols % FP4_BLOCK:
        raise ValueError(f"NVFP4 needs a multiple of {FP4_BLOCK} columns, got {cols}")
    amax = float(w.abs().max()) if w.numel() else 0.0
    ws2 = torch.tensor(amax / (FP4_MAX * E4M3_MAX) if amax > 0 else 1.0, dtype=torch.float32)
    blocks = w.view(rows, cols // FP4_BLOCK, FP4_BLOCK)
    per_block = blocks.abs().amax(-1) / (FP4_MAX * ws2)
    ws = torch.where(per_block == 0, torch.ones_like(per_block), per_block).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
    scaled = blocks / (ws.to(torch.float32) * ws2).unsqueeze(-1)
    codes = _nearest_e2m1_codes(scaled).view(rows, cols)
    return codes[:, 0::2] | (codes[:, 1::2] << 4), ws, ws2


def _nearest_e2m1_codes(scaled: torch.Tensor) -> torch.Tensor:
    """uint8 E2M1 code nearest to each float32 value (ties to the even code; negatives get the sign bit 3)."""
    magnitude = scaled.abs()
    codes = torch.bucketize(magnitude, _E2M1_MIDPOINTS)
    codes += (magnitude.unsqueeze(-1) == _E2M1_ROUND_UP_TIES).any(-1)
    return codes.to(torch.uint8) | ((scaled < 0).to(torch.uint8) << 3)
