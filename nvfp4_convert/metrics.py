"""Error metrics between a decoded weight and a reference, and a module's decoded weight (below planning).

``weight_errors(w, ref)``: relative Frobenius error, cosine, max abs error and the relative error of ``x @ W.T``
for a seeded random ``x``. ``output_weight(m)``: the float32 value of an inventory module, decoded by its format.
Imports formats only: ``graft`` (converting) and ``verify`` (checking) both use it without importing each other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .formats import FORMATS, decode_module

if TYPE_CHECKING:
    from .inventory import Module


def weight_errors(w: torch.Tensor, ref: torch.Tensor, *, seed: int = 0) -> dict[str, float]:
    """Relative Frobenius error, cosine, max abs error and relative error of x @ W.T (random x)."""
    diff = w - ref
    ref_norm = float(ref.norm()) or 1.0
    x = torch.randn(8, w.shape[1], generator=torch.Generator().manual_seed(seed))
    y_ref = x @ ref.T
    return {
        "rel_error": float(diff.norm()) / ref_norm,
        "cosine": float(torch.nn.functional.cosine_similarity(w.flatten(), ref.flatten(), dim=0)),
        "max_abs_error": float(diff.abs().max()),
        "matmul_rel_error": float((x @ w.T - y_ref).norm()) / (float(y_ref.norm()) or 1.0),
    }


def output_weight(m: Module) -> torch.Tensor:
    """float32 value of a linear module (as vLLM will compute with it, for a converted one)."""
    return decode_module(FORMATS[m.format], m.params)
