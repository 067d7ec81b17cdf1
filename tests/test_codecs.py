"""Numeric codecs against the libraries that define the formats.

- NVFP4 decoding: ModelOpt's own dequantization (``NVFP4QTensor.dequantize``), stored as golden
  values when the fixture was generated (``tests/fixtures/tiny-dsv4-golden``).
- FP8 block quantization: vLLM's own ``per_block_cast_to_fp8(x, [128, 128], use_ue8m0=True)``.
- e8m0 storage: torch's ``float8_e8m0fnu``.
- gate/up fold (trap 6): numpy's float32 division for the ratio, a nearest-value search over e4m3's code table
  for the folded block scales.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import GOLDEN, REPO_FIXTURE
from helpers import load_all

from nvfp4_convert.codecs import (
    FOLD_MAX_REL_ERROR,
    dequantize_fp8_block,
    dequantize_nvfp4,
    fold_block_scales,
    gate_up_fold,
    is_power_of_two,
    quantize_fp8_block,
    quantize_nvfp4,
    unpack_e2m1,
)


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    if not GOLDEN.exists():
        pytest.skip("golden values not present")
    return load_all(GOLDEN.parent)


def test_nvfp4_decoding_equals_modelopt_bit_for_bit(golden):
    src = load_all(REPO_FIXTURE)
    assert len(golden) >= 50
    for module, expected in golden.items():
        got = dequantize_nvfp4(src[f"{module}.weight"], src[f"{module}.weight_scale"], src[f"{module}.weight_scale_2"])
        assert got.dtype == torch.float32
        assert torch.equal(got.view(torch.int32), expected.view(torch.int32)), module


def test_nvfp4_decoding_of_a_row_band_equals_the_rows_of_the_whole(golden):
    src = load_all(REPO_FIXTURE)
    module = next(m for m in golden if golden[m].shape[0] >= 128)
    w, ws, ws2 = (src[f"{module}.{p}"] for p in ("weight", "weight_scale", "weight_scale_2"))
    band = dequantize_nvfp4(w[32:96], ws[32:96], ws2)
    assert torch.equal(band, golden[module][32:96])


def test_e2m1_nibble_order_and_table():
    # byte 0x71: low nibble 1 (0.5) is element 0, high nibble 7 (6.0) element 1; 0x8F: -6.0 then +0.0
    packed = torch.tensor([[0x71, 0x8F]], dtype=torch.uint8)
    assert unpack_e2m1(packed).tolist() == [[0.5, 6.0, -6.0, 0.0]]


def test_input_scale_never_enters_dequantization():
    import inspect

    assert "input_scale" not in inspect.signature(dequantize_nvfp4).parameters


vllm_deep_gemm = pytest.importorskip("vllm.utils.deep_gemm")


def _fp8_cases() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    big = torch.randn(384, 300, generator=g) * 3
    big[:128, :128] = 0  # an all-zero block: amax floor 1e-4
    big[128:256, 128:256] *= 1e-7  # tiny values
    big[256:, 256:] *= 1e4  # large values
    return [
        torch.randn(128, 128, generator=g),
        torch.randn(200, 130, generator=g) * 0.01,  # ragged: padding in both dims
        big,
        dequantize_nvfp4(
            torch.randint(0, 256, (256, 128), dtype=torch.uint8, generator=g),
            (torch.rand(256, 16, generator=g) * 400).to(torch.float8_e4m3fn),
            torch.tensor(3.1e-4),
        ),
    ]


@pytest.mark.parametrize("case", range(4))
def test_fp8_block_quantization_equals_vllm_ue8m0_quantizer(case):
    x = _fp8_cases()[case]
    q, s = quantize_fp8_block(x)
    ref_q, ref_s = vllm_deep_gemm.per_block_cast_to_fp8(x, [128, 128], use_ue8m0=True)
    assert q.dtype == torch.float8_e4m3fn and ref_q.dtype == torch.float8_e4m3fn
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))
    assert torch.equal(s, ref_s.to(torch.float32))
    assert bool(is_power_of_two(s).all())
    # stored as e8m0: exact, because every scale is a power of two
    assert torch.equal(s.to(torch.float8_e8m0fnu).to(torch.float32), s)


def test_fp8_quantization_of_row_bands_equals_the_whole():
    x = _fp8_cases()[2]
    q, s = quantize_fp8_block(x)
    q1, s1 = quantize_fp8_block(x[:128])
    q2, s2 = quantize_fp8_block(x[128:])
    assert torch.equal(torch.cat([q1, q2]).view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(torch.cat([s1, s2]), s)


def test_fp8_round_trip_error_is_within_half_an_e4m3_step():
    x = _fp8_cases()[0]
    q, s = quantize_fp8_block(x)
    err = (dequantize_fp8_block(q, s) - x).abs()
    # e4m3: 3 mantissa bits (half an ulp <= 2^-4 of the value); subnormal step 2^-9 of the scale
    assert bool((err <= x.abs() * 2**-4 + s.max() * 2**-10).all())


def test_is_power_of_two():
    t = torch.tensor([1.0, 0.5, 2.0**-20, 3.0, 0.0, -2.0, float("inf"), float("nan"), 0.75])
    assert is_power_of_two(t).tolist() == [True, True, True, False, False, False, False, False, False]


def _nearest_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest finite e4m3 value, ties to the even code: by search over the 126 non-negative codes
    (only their decoding is torch's), independent of torch's float32 -> float8 cast."""
    codes = torch.arange(0x7F, dtype=torch.uint8)  # 0x00..0x7E: every finite non-negative e4m3 value
    values = codes.view(torch.float8_e4m3fn).to(torch.float64)
    distance = (x.to(torch.float64).reshape(-1, 1) - values).abs()
    best = distance.min(dim=1, keepdim=True).values
    # among the nearest (one, or two on a tie) the even code wins: add 0.5 to the odd ones' distance
    pick = torch.where(distance == best, (codes % 2).to(torch.float64) * 0.5, torch.inf).argmin(dim=1)
    return values[pick].reshape(x.shape).to(torch.float32)


class TestGateUpFold:
    """Trap 6: gate/up with different global scales get the larger one; the smaller half is rescaled."""

    def setup_method(self):
        g = torch.Generator().manual_seed(1)
        self.ws = (torch.rand(64, 8, generator=g) * 448).to(torch.float8_e4m3fn)
        self.codes = torch.randint(0, 256, (64, 64), dtype=torch.uint8, generator=g)

    def test_equal_global_scales_need_no_fold(self):
        assert gate_up_fold(2e-4, 2e-4) is None

    @pytest.mark.parametrize(("gate", "up", "half"), [(1e-4, 3e-4, "gate"), (3e-4, 1e-4, "up"), (5e-4, 4.9e-4, "up")])
    def test_the_half_with_the_smaller_global_scale_is_rescaled_by_the_float32_ratio(self, gate, up, half):
        got_half, ratio = gate_up_fold(gate, up)
        assert got_half == half
        small, big = np.float32(min(gate, up)), np.float32(max(gate, up))
        assert ratio == float(small / big) and ratio < 1

    @pytest.mark.parametrize("ratio", [1 / 3, 0.9, 2**-5, 1e-3])
    def test_folded_block_scales_are_the_nearest_e4m3_of_the_float32_product(self, ratio):
        folded, error = fold_block_scales(self.ws, ratio)
        exact = self.ws.to(torch.float32) * np.float32(ratio)
        assert folded.dtype == torch.float8_e4m3fn
        assert torch.equal(folded.to(torch.float32), _nearest_e4m3(exact))
        rounded = folded.to(torch.float64)
        want = float((rounded - exact.double()).norm() / exact.double().norm())
        assert error == pytest.approx(want, rel=1e-5)

    def test_a_ratio_that_empties_the_block_scales_is_over_the_limit(self):
        _, error = fold_block_scales(self.ws, 1e-6)  # every product below e4m3's smallest subnormal
        assert error > FOLD_MAX_REL_ERROR

    @pytest.mark.parametrize("smaller", ["gate", "up"])
    def test_the_folded_half_decodes_to_its_weight_under_the_larger_global_scale(self, smaller):
        small, big = 1e-4, 3e-4
        half, ratio = gate_up_fold(*((small, big) if smaller == "gate" else (big, small)))
        assert half == smaller
        folded, error = fold_block_scales(self.ws, ratio)
        assert error <= FOLD_MAX_REL_ERROR
        before = dequantize_nvfp4(self.codes, self.ws, torch.tensor(small))
        after = dequantize_nvfp4(self.codes, folded, torch.tensor(big))
        # the rescaled block scales are e4m3-rounded: within one e4m3 rounding (2^-4 relative), or the
        # subnormal step, of the original weight
        step = 2.0**-9 * big * 6
        assert bool(((after - before).abs() <= before.abs() * 2**-4 + step).all())


def test_nvfp4_quantization_packs_element_2i_in_the_low_nibble_with_the_sign_in_bit_3():
    # amax 6 -> global scale 6 / (6 * 448), block scale 448: the values themselves are the E2M1 codes' values
    row = torch.tensor([6, -0.5, 1, 1.5, 2, 3, 4, -6, 0, 0.5, -1, -1.5, -2, -3, -4, 6], dtype=torch.float32)
    packed, ws, ws2 = quantize_nvfp4(row[None])
    assert packed.dtype == torch.uint8 and packed.shape == (1, 8) and int(packed[0, 0]) == 0x97  # 6 = 7, -0.5 = 9
    assert ws.dtype == torch.float8_e4m3fn and float(ws) == 448.0 and float(ws2) == pytest.approx(6 / 2688)
    assert torch.equal(dequantize_nvfp4(packed, ws, ws2), row[None])


def test_nvfp4_quantization_rounds_ties_to_the_even_code_as_modelopt():
    """ModelOpt's _cast_fp4: midpoints 0.75, 1.75 and 3.5 round up, 0.25, 1.25, 2.5 and 5 down."""
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 2, dtype=torch.float32)
    got = dequantize_nvfp4(*quantize_nvfp4(ties[None]))[0, :8]
    assert got.tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0]


def test_nvfp4_quantization_error_stays_within_half_a_step_of_each_block():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(3)) * torch.logspace(-3, 1, 64)[:, None]
    packed, ws, ws2 = quantize_nvfp4(w)
    back = dequantize_nvfp4(packed, ws, ws2)
    step = (ws.float() * ws2).repeat_interleave(16, 1)  # one unit of E2M1 in each block
    assert bool(((back - w).abs() <= step * 1.0 + w.abs() * 2**-3).all())  # half the widest step (2), e4m3 slack
    assert float((back - w).norm() / w.norm()) < 0.12
    zero = quantize_nvfp4(torch.zeros(2, 32))
    assert float(zero[1].float().min()) == 1.0 and not bool(dequantize_nvfp4(*zero).any())  # ModelOpt: scale 1
