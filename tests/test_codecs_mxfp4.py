"""MXFP4 (DeepSeek's release) codecs, specified against an independent oracle.

The oracle is written here, not taken from the code under test: the E2M1 table of the OCP MX spec (below), the nibble
order of vLLM's MXFP4 dequantizer (element 2i in the low nibble), and torch's own dtypes for the scales
(``float8_e8m0fnu`` for MXFP4, ``float8_e4m3fn`` for NVFP4's block scales).
"""

from __future__ import annotations

import pytest
import torch

from nvfp4_convert.codecs import (
    dequantize_mxfp4,
    dequantize_nvfp4,
    mxfp4_down_to_nvfp4,
    mxfp4_gate_up_to_nvfp4,
    mxfp4_to_nvfp4,
    mxfp4_top_exponent,
    nvfp4_global_exponent,
    recover_mxfp4,
)
from nvfp4_convert.errors import ConvertError

# OCP MX E2M1, codes 0..15: bit 3 the sign, code 8 is -0.0
ORACLE_E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def oracle_codes(packed: torch.Tensor) -> list[list[int]]:
    """Codes of each row, element 2i from the low nibble of byte i."""
    out = []
    for row in packed.view(torch.uint8).tolist():
        codes = []
        for byte in row:
            codes += [byte & 0xF, byte >> 4]
        out.append(codes)
    return out


def oracle_mxfp4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float64 values: E2M1[code] * (E8M0 scale decoded by torch), one scale per 32 elements."""
    s = scale.view(torch.uint8).view(torch.float8_e8m0fnu).to(torch.float64)
    codes = torch.tensor(oracle_codes(packed))
    return torch.tensor(ORACLE_E2M1, dtype=torch.float64)[codes] * s.repeat_interleave(32, dim=1)


def oracle_nvfp4(packed: torch.Tensor, ws: torch.Tensor, ws2: torch.Tensor) -> torch.Tensor:
    """float64 values: E2M1[code] * (e4m3 block scale decoded by torch) * global scale, one block scale per 16."""
    codes = torch.tensor(oracle_codes(packed))
    s = ws.to(torch.float64).repeat_interleave(16, dim=1) * float(ws2)
    return torch.tensor(ORACLE_E2M1, dtype=torch.float64)[codes] * s


def oracle_nearest_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 value (magnitudes), ties to the even code (0, 1, 2, 4), by brute force over the table."""
    table = torch.tensor(ORACLE_E2M1[:8], dtype=torch.float64)
    dist = (x.abs().to(torch.float64).unsqueeze(-1) - table).abs()
    best = dist == dist.min(-1, keepdim=True).values
    even = best & (torch.arange(8) % 2 == 0)
    idx = torch.where(even.any(-1), even.to(torch.int8).argmax(-1), best.to(torch.int8).argmax(-1))
    return table[idx] * torch.where(x < 0, -1.0, 1.0).to(torch.float64)


def e8m0(k: torch.Tensor | list) -> torch.Tensor:
    """E8M0 scales of exponents k, as torch's dtype."""
    return (torch.as_tensor(k, dtype=torch.int32) + 127).to(torch.uint8).view(torch.float8_e8m0fnu)


def random_mxfp4(rows: int, cols: int, exponents: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random int8 codes (every byte value) with the given [rows, cols/32] block exponents."""
    g = torch.Generator().manual_seed(seed)
    packed = torch.randint(-128, 128, (rows, cols // 2), dtype=torch.int8, generator=g)
    return packed, e8m0(exponents)


def set_block(packed: torch.Tensor, row: int, block: int, codes: list[int]) -> None:
    """Write 32 codes (or 2 repeated 16 times) into block ``block`` of ``row``."""
    codes = (codes * (32 // len(codes)))[:32]
    packed.view(torch.uint8)[row, block * 16 : block * 16 + 16] = torch.tensor(
        [lo | (hi << 4) for lo, hi in zip(codes[0::2], codes[1::2], strict=True)], dtype=torch.uint8
    )


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


# --- the oracle itself ---------------------------------------------------------------------------------------------


def test_oracle_reads_torch_scales_as_the_spec_says():
    # E8M0: 2^(byte - 127), byte 0 is 2^-127, 0xFF NaN; e4m3 holds every power of two from 2^-9 to 2^8 exactly
    bytes_ = torch.tensor([0, 1, 127, 254, 255], dtype=torch.uint8).view(torch.float8_e8m0fnu).to(torch.float64)
    assert bytes_[:4].tolist() == [2.0**-127, 2.0**-126, 1.0, 2.0**127] and bytes_[4].isnan()
    powers = torch.tensor([2.0**d for d in range(-9, 9)])
    assert torch.equal(powers.to(torch.float8_e4m3fn).to(torch.float32), powers)
    assert float(torch.tensor(2.0**-10).to(torch.float8_e4m3fn)) == 0.0  # 2^-10 is not an e4m3 value


# --- dequantize_mxfp4 ----------------------------------------------------------------------------------------------


def test_dequantize_mxfp4_element_2i_is_the_low_nibble_and_code_8_is_minus_zero():
    packed = torch.zeros(1, 16, dtype=torch.int8)
    packed.view(torch.uint8)[0, 0] = 0x71  # element 0: code 1 (0.5), element 1: code 7 (6)
    packed.view(torch.uint8)[0, 1] = 0x8F  # element 2: code 15 (-6), element 3: code 8 (-0.0)
    got = dequantize_mxfp4(packed, e8m0([[1]]))
    assert got.dtype == torch.float32 and got.shape == (1, 32)
    assert got[0, :4].tolist() == [1.0, 12.0, -12.0, 0.0] and torch.signbit(got[0, 3])


def test_dequantize_mxfp4_equals_the_oracle_on_random_blocks():
    k = torch.randint(-127, 126, (64, 8), generator=torch.Generator().manual_seed(1))
    packed, scale = random_mxfp4(64, 256, k)
    got = dequantize_mxfp4(packed, scale)
    assert torch.equal(got.to(torch.float64), oracle_mxfp4(packed, scale))
    # uint8 in either place: the same bytes, the same values; any band of rows: the same rows
    assert torch.equal(dequantize_mxfp4(packed.view(torch.uint8), scale.view(torch.uint8)), got)
    assert torch.equal(dequantize_mxfp4(packed[8:24], scale[8:24]), got[8:24])


def test_dequantize_mxfp4_at_the_e8m0_extremes():
    packed = torch.zeros(2, 16, dtype=torch.int8)
    set_block(packed, 0, 0, [1, 9])  # +-0.5 * 2^-127 = 2^-128, a float32 subnormal
    set_block(packed, 1, 0, [3, 11])  # +-1.5 * 2^127, the largest that float32 holds at this scale
    scale = e8m0([[-127], [127]])
    got = dequantize_mxfp4(packed, scale)
    assert torch.equal(got.to(torch.float64), oracle_mxfp4(packed, scale))
    assert got[0, :2].tolist() == [2.0**-128, -(2.0**-128)] and got[1, 0] == 1.5 * 2.0**127
    set_block(packed, 1, 0, [4])  # 2 * 2^127 is past float32: refused, not inf
    with pytest.raises(ConvertError, match=r"block \(row 1, block 0\).*overflows"):
        dequantize_mxfp4(packed, scale)


def test_dequantize_mxfp4_refuses_the_e8m0_nan():
    scale = e8m0([[0, 0]]).view(torch.uint8).clone()
    scale[0, 1] = 0xFF
    with pytest.raises(ConvertError, match=r"w2: MXFP4 block \(row 0, block 1\) has the E8M0 NaN"):
        dequantize_mxfp4(torch.zeros(1, 32, dtype=torch.int8), scale, name="w2")


# --- MXFP4 -> NVFP4 ------------------------------------------------------------------------------------------------


def check_reencoding(packed, scale, out, m: int, kept: torch.Tensor) -> None:
    """Global scale 2^m; each kept 32-block: bytes unchanged, both halves' e4m3 scale 2^(k - m), values equal."""
    assert same_bits(out.weight_scale_2, torch.tensor(2.0**m, dtype=torch.float32))
    assert out.weight.dtype == torch.uint8 and out.weight_scale.dtype == torch.float8_e4m3fn
    k = scale.view(torch.uint8).to(torch.int64) - 127
    halves = out.weight_scale.to(torch.float64).view(k.shape[0], k.shape[1], 2)
    mx = oracle_mxfp4(packed, scale).view(k.shape[0], k.shape[1], 32)
    nv = oracle_nvfp4(out.weight, out.weight_scale, out.weight_scale_2).view(k.shape[0], k.shape[1], 32)
    project_nv = dequantize_nvfp4(out.weight, out.weight_scale, out.weight_scale_2).view(mx.shape)
    mx_bytes = packed.view(torch.uint8).view(k.shape[0], k.shape[1], 16)
    nv_bytes = out.weight.view(k.shape[0], k.shape[1], 16)
    for r, b in kept.nonzero().tolist():
        assert torch.equal(nv_bytes[r, b], mx_bytes[r, b]), (r, b)
        assert halves[r, b].tolist() == [2.0 ** (int(k[r, b]) - m)] * 2, (r, b)
        assert torch.equal(nv[r, b], mx[r, b]) and torch.equal(project_nv[r, b].to(torch.float64), mx[r, b]), (r, b)


def test_random_blocks_within_17_binades_are_reencoded_exactly():
    g = torch.Generator().manual_seed(2)
    k = torch.randint(-20, -3, (32, 16), generator=g)  # spread 16 binades
    packed, scale = random_mxfp4(32, 512, k, seed=3)
    out = mxfp4_down_to_nvfp4(packed, scale)
    assert out.requantized == 0
    check_reencoding(packed, scale, out, int(k.max()) - 8, torch.ones_like(k, dtype=torch.bool))


ADVERSARIAL = {
    # name: (block exponents of a [1, 4] tensor, blocks expected re-quantized)
    "all_equal": ([-5, -5, -5, -5], []),
    "exactly_17_below_kept": ([-5, -22, -22, -5], []),
    "18_below_requantized": ([-5, -23, -22, -40], [1, 3]),
    "e8m0_top_and_bottom": ([127, 110, 109, -127], [2, 3]),
    "all_at_e8m0_bottom": ([-127, -127, -127, -127], []),
    "all_at_e8m0_top": ([127, 127, 127, 127], []),
}


@pytest.mark.parametrize("case", ADVERSARIAL)
def test_adversarial_exponents(case):
    exps, expected = ADVERSARIAL[case]
    packed = torch.zeros(1, 64, dtype=torch.int8)
    for b in range(4):  # every block nonzero, codes at most 1.5 so that 2^127 still decodes in float32
        set_block(packed, 0, b, [1, 3, 10, 0, 2, 9, 11, 8] * 4)
    scale = e8m0([exps])
    out = mxfp4_to_nvfp4(packed, scale, nvfp4_global_exponent(mxfp4_top_exponent(packed, scale)))
    assert out.requantized == len(expected)
    kept = torch.tensor([[b not in expected for b in range(4)]])
    check_reencoding(packed, scale, out, max(exps) - 8, kept)
    for b in expected:  # re-quantized: the smallest e4m3 scale, 2^-9, codes nearest to the true values
        assert out.weight_scale[0, 2 * b : 2 * b + 2].to(torch.float64).tolist() == [2.0**-9] * 2
        step = 2.0 ** (max(exps) - 17)
        true = oracle_mxfp4(packed, scale)[0, 32 * b : 32 * b + 32]
        got = oracle_nvfp4(out.weight, out.weight_scale, out.weight_scale_2)[0, 32 * b : 32 * b + 32]
        assert torch.equal(got, oracle_nearest_e2m1(true / step) * step)


def test_requantized_blocks_round_to_the_nearest_value_ties_to_even():
    # one block 18 binades below the top: its values fall on half steps of the floor grid 2^(K-17)
    packed = torch.zeros(1, 32, dtype=torch.int8)
    set_block(packed, 0, 0, [7])  # 6 * 2^0: the top block
    set_block(packed, 0, 1, [1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 0, 8])
    scale = e8m0([[0, -18]])
    out = mxfp4_down_to_nvfp4(packed, scale)
    assert out.requantized == 1
    step = 2.0**-17
    got = oracle_nvfp4(out.weight, out.weight_scale, out.weight_scale_2)[0, 32:48] / step
    # true values / step: 0.25 0.5 0.75 1 1.5 2 3 | -0.25 -0.5 -0.75 -1 -1.5 -2 -3 | 0 -0
    assert got.tolist() == [0, 0.5, 1, 1, 1.5, 2, 3, -0.0, -0.5, -1, -1, -1.5, -2, -3, 0, 0]
    true = oracle_mxfp4(packed, scale)[0, 32:]
    err = (oracle_nvfp4(out.weight, out.weight_scale, out.weight_scale_2)[0, 32:] - true).abs()
    assert float(err.max()) <= step / 4  # values below 3 steps: the grid's spacing there is at most half a step


def test_zero_blocks_keep_their_bytes_and_are_not_counted():
    packed = torch.zeros(1, 48, dtype=torch.int8)
    set_block(packed, 0, 0, [7])
    set_block(packed, 0, 1, [0, 8])  # +0 and -0, with the top E8M0 exponent: does not raise the global scale
    set_block(packed, 0, 2, [8])  # all -0, DeepSeek's zero-block exponent 2^-126: far below, still exact
    scale = e8m0([[-4, 127, -126]])
    assert mxfp4_top_exponent(packed, scale) == -4
    out = mxfp4_down_to_nvfp4(packed, scale)
    assert out.requantized == 0 and same_bits(out.weight, packed.view(torch.uint8))
    assert torch.equal(
        dequantize_nvfp4(out.weight, out.weight_scale, out.weight_scale_2), dequantize_mxfp4(packed, scale)
    )
    assert out.weight_scale.to(torch.float32).tolist() == [[256.0, 256.0, 256.0, 256.0, 2.0**-9, 2.0**-9]]
    allzero = mxfp4_down_to_nvfp4(torch.zeros(2, 16, dtype=torch.int8), e8m0([[3], [-127]]))
    assert allzero.requantized == 0 and float(allzero.weight_scale_2) == 1.0 and not allzero.weight.any()


def test_gate_and_up_share_one_global_scale_from_both():
    g = torch.Generator().manual_seed(4)
    k1 = torch.randint(-14, -8, (16, 4), generator=g)  # w1's top is 5 binades below w3's
    k3 = torch.randint(-9, -3, (16, 4), generator=g)
    k3[0, 0] = -3
    k1[1, 1] = -21  # 18 below w3's top: re-quantized although w1 alone would have kept it
    (p1, s1), (p3, s3) = random_mxfp4(16, 128, k1, seed=5), random_mxfp4(16, 128, k3, seed=6)
    set_block(p1, 1, 1, [7])
    w1, w3 = mxfp4_gate_up_to_nvfp4(p1, s1, p3, s3)
    assert same_bits(w1.weight_scale_2, w3.weight_scale_2) and float(w1.weight_scale_2) == 2.0**-11
    assert (w1.requantized, w3.requantized) == (1, 0)
    kept1 = torch.ones_like(k1, dtype=torch.bool)
    kept1[1, 1] = False
    check_reencoding(p1, s1, w1, -11, kept1)
    check_reencoding(p3, s3, w3, -11, torch.ones_like(k3, dtype=torch.bool))
    assert mxfp4_down_to_nvfp4(p1, s1).requantized == 0  # alone (w2's rule), its own m keeps every block


def test_reencoding_refuses_nan_scales_and_a_global_scale_below_the_tensor():
    packed = torch.full((1, 16), 0x11, dtype=torch.int8)
    nan = torch.tensor([[0xFF]], dtype=torch.uint8)
    with pytest.raises(ConvertError, match="NaN"):
        mxfp4_down_to_nvfp4(packed, nan)
    with pytest.raises(ValueError, match="above the global scale"):
        mxfp4_to_nvfp4(packed, e8m0([[5]]), global_exponent=-4)  # 5 - (-4) = 9 > 8


def test_reencoding_a_row_band_equals_the_rows_of_the_whole():
    k = torch.randint(-40, -3, (32, 4), generator=torch.Generator().manual_seed(7))
    packed, scale = random_mxfp4(32, 128, k, seed=8)
    m = nvfp4_global_exponent(mxfp4_top_exponent(packed[:16], scale[:16]), mxfp4_top_exponent(packed[16:], scale[16:]))
    whole = mxfp4_to_nvfp4(packed, scale, m)
    top, bottom = mxfp4_to_nvfp4(packed[:16], scale[:16], m), mxfp4_to_nvfp4(packed[16:], scale[16:], m)
    assert whole.requantized == top.requantized + bottom.requantized > 0
    assert torch.equal(torch.cat([top.weight, bottom.weight]), whole.weight)
    assert same_bits(torch.cat([top.weight_scale, bottom.weight_scale]), whole.weight_scale)


# --- BF16 -> MXFP4 -------------------------------------------------------------------------------------------------


def test_bf16_round_trip_is_bit_exact_on_random_blocks():
    k = torch.randint(-127, 125, (64, 8), generator=torch.Generator().manual_seed(9))
    packed, scale = random_mxfp4(64, 256, k, seed=10)
    bf16 = oracle_mxfp4(packed, scale).to(torch.bfloat16)  # exact: at most two significant bits, in range
    assert torch.equal(bf16.to(torch.float64), oracle_mxfp4(packed, scale))
    got_packed, got_scale = recover_mxfp4(bf16)
    assert got_packed.dtype == torch.int8 and got_scale.dtype == torch.float8_e8m0fnu
    assert got_packed.shape == packed.shape and got_scale.shape == scale.shape
    assert same_bits(dequantize_mxfp4(got_packed, got_scale).to(torch.bfloat16), bf16)  # signed zeros included
    assert same_bits(oracle_mxfp4(got_packed, got_scale).to(torch.bfloat16), bf16)
    # never a larger exponent than the original (the recovered one is the smallest that works)
    assert bool((got_scale.view(torch.uint8) <= scale.view(torch.uint8)).all())


def test_recovery_need_not_give_back_the_original_bytes():
    # largest code 3 (1.5 * 2^1): the same values are codes doubled under half the scale
    packed = torch.zeros(1, 16, dtype=torch.int8)
    set_block(packed, 0, 0, [5, 1, 12, 3])  # 3, 0.5, -2, 1.5 at 2^4
    bf16 = dequantize_mxfp4(packed, e8m0([[4]])).to(torch.bfloat16)
    got_packed, got_scale = recover_mxfp4(bf16)
    assert float(got_scale.to(torch.float32)) == 2.0**3
    assert oracle_codes(got_packed)[0][:4] == [7, 2, 14, 5]  # 6, 1, -4, 3
    assert same_bits(dequantize_mxfp4(got_packed, got_scale).to(torch.bfloat16), bf16)


def test_recovery_at_the_e8m0_extremes_and_of_zero_blocks():
    w = torch.zeros(3, 32, dtype=torch.float32)
    w[0, :2] = torch.tensor([2.0**-128, -(2.0**-127)])  # 0.5 and -1 at 2^-127, E8M0's smallest scale
    w[1, :2] = torch.tensor([6 * 2.0**125, 2.0**124])  # 6 and 0.5 at 2^125, BF16's largest binade
    w[2, 1] = -0.0  # an all-zero block keeps its signed zero, scale 2^-127
    bf16 = w.to(torch.bfloat16)
    got_packed, got_scale = recover_mxfp4(bf16)
    assert got_scale.view(torch.uint8).flatten().tolist() == [0, 252, 0]
    assert same_bits(dequantize_mxfp4(got_packed, got_scale).to(torch.bfloat16), bf16)


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (1.25, "a mantissa E2M1 lacks"),
        (0.25, "6 and 0.25 in one block: 0.25 would be code 0.25 at 2^0"),
        (2.0**-133, "alone: needs 2^-135, below E8M0's 2^-127"),
    ],
)
def test_recovery_refuses_a_block_that_is_not_mxfp4(value, why):
    w = torch.zeros(2, 64, dtype=torch.bfloat16)
    w[1, 40] = value
    if value == 0.25:
        w[1, 33] = 6.0
    with pytest.raises(ConvertError, match=r"mtp\.0\.ffn\.experts\.3\.w1: block \(row 1, block 1\) is not exactly"):
        recover_mxfp4(w, name="mtp.0.ffn.experts.3.w1")


def test_recovery_refuses_nan_and_inf():
    for bad in (float("nan"), float("inf"), -float("inf")):
        w = torch.zeros(1, 64, dtype=torch.bfloat16)
        w[0, 63] = bad
        with pytest.raises(ConvertError, match=r"block \(row 0, block 1\) holds NaN or Inf"):
            recover_mxfp4(w)


def test_bf16_to_mxfp4_to_nvfp4_keeps_every_value():
    k = torch.randint(-12, -2, (16, 8), generator=torch.Generator().manual_seed(11))
    packed, scale = random_mxfp4(16, 256, k, seed=12)
    bf16 = dequantize_mxfp4(packed, scale).to(torch.bfloat16)
    out = mxfp4_down_to_nvfp4(*recover_mxfp4(bf16))
    assert out.requantized == 0
    assert torch.equal(dequantize_nvfp4(out.weight, out.weight_scale, out.weight_scale_2), bf16.to(torch.float32))


def test_quantize_mxfp4_round_trips_through_recover():
    from nvfp4_convert.codecs import quantize_mxfp4

    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(7)) * 0.02
    packed, scale = quantize_mxfp4(w)
    assert packed.dtype == torch.int8 and scale.dtype == torch.float8_e8m0fnu
    again = recover_mxfp4(dequantize_mxfp4(packed, scale))
    assert torch.equal(again[0], packed) and torch.equal(again[1].view(torch.uint8), scale.view(torch.uint8))
