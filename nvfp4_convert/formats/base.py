"""The interface every number format implements, and the helpers they share.

A *format* is the knowledge of which tensors, dtypes and shapes make one linear's weight, and how to turn them into
float32 (and, for output formats, back). A module's tensors are passed as ``Params``: parameter name (``weight``,
``weight_scale``, ``weight_scale_2``, ``input_scale``, ``scale``) -> ``TensorInfo`` (dtype string, shape, file).

Contract of a ``Format``:

- ``recognise(params)``: whether these tensors claim this format (the weight's dtype, and where two formats share
  it, the companions that tell them apart). Cheap, header only, never raises.
- ``validate(module, params)``: everything the headers (and scalar scales) must satisfy; raises ``ConvertError``
  naming the file and tensor at fault; returns the scalar scales it read (``Scalars``).
- ``logical_shape(params)``: the [out, in] of the weight the tensors encode.
- ``decode_params``: the parameters decoding reads, weight first (``decode_sources`` gives their ``TensorInfo``, plus
  a ``pre_quant_scale`` when the module has one: see below).
- ``decode(tensors)``: float32 [rows, in] from in-memory tensors of any band of whole rows; ``decode_rows(params,
  r0, r1)`` reads rows ``[r0, r1)`` (``r0`` a multiple of ``row_multiple``) and decodes them, checking the scales it
  reads on the way. Decoding a band equals the same rows of decoding the whole.
- output formats only (``output``): ``encode(x)`` float32 -> the tensors to write, ``output_tensors(rows, cols)``
  their safetensors dtypes and shapes, ``in_output_form(params)`` whether a module is already what ``encode`` writes.
- ``restated_as(target, params)``: whether this module can be written in ``target`` exactly (same decoded values,
  bytes re-arranged, never re-rounded), and which tensors change: param -> (dtype, shape); ``{}`` when it already is
  ``target``, ``None`` when there is no exact restatement. ``restate(param, tensor, shape)`` makes a changed tensor.

AWQ (any format): a module may carry ModelOpt's ``pre_quant_scale`` (float [in], > 0). ModelOpt's AWQ divides the
weight by it before quantizing and multiplies the activations by it at run time
(``modelopt/torch/quantization/model_calib.py: apply_pre_quant_scale_and_smooth``: ``input_quantizer.pre_quant_scale =
s``, ``weight * (1 / s)[None, :]``; ``nn/modules/tensor_quantizer.py: TensorQuantizer`` forward: ``inputs *
pre_quant_scale``), so ``y = (x * s) @ decode(W).T = x @ (decode(W) * s[None, :]).T``: the module's value is
``decode(W) * s`` per input column, in float32 (``fold_pre_quant_scale``, applied by ``formats.decode_rows``).

The math (E2M1 tables, block scaling) lives in ``codecs``; formats call it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import ConvertError
from ..safetensors_io import TensorInfo, read_rows, read_tensor

Params = Mapping[str, TensorInfo]
Tensors = Mapping[str, torch.Tensor]

PRE_QUANT_SCALE = "pre_quant_scale"  # ModelOpt AWQ's per-input-column activation scale (see the module docstring)
PRE_QUANT_SCALE_DTYPES = ("BF16", "F16", "F32")


@dataclass(frozen=True)
class Scalars:
    """Scalar scales a format reads while validating (``None`` where it has none)."""

    global_scale: float | None = None  # NVFP4 ``weight_scale_2``; per-tensor FP8 ``weight_scale``
    input_scale: float | None = None  # activation scale: never part of a weight's value


class Format:
    """Base of the format classes; the subclasses are stateless singletons (see ``formats.FORMATS``)."""

    name: ClassVar[str]  # the ``Module.format`` string
    label: ClassVar[str]  # how messages name it
    weight_dtypes: ClassVar[tuple[str, ...]]  # safetensors dtypes of its ``weight``
    decode_params: ClassVar[tuple[str, ...]] = ("weight",)
    row_multiple: ClassVar[int] = 1  # a decoded band must start on a multiple of this many rows
    output: ClassVar[bool] = False  # the converter writes it (``encode``)
    run_source: ClassVar[bool] = False  # ``run`` converts it today

    def recognise(self, params: Params) -> bool:
        w = params.get("weight")
        return w is not None and w.dtype in self.weight_dtypes

    def validate(self, module: str, params: Params) -> Scalars:
        raise NotImplementedError

    def logical_shape(self, params: Params) -> tuple[int, int]:
        w = params["weight"]
        return (w.shape[0], w.shape[1])

    def decode_sources(self, params: Params) -> tuple[TensorInfo, ...]:
        awq = (params[PRE_QUANT_SCALE],) if PRE_QUANT_SCALE in params else ()
        return tuple(params[p] for p in self.decode_params) + awq

    def read_band(self, params: Params, r0: int, r1: int) -> dict[str, torch.Tensor]:
        """The in-memory tensors ``decode`` needs for rows ``[r0, r1)``."""
        if r0 % self.row_multiple:
            raise ValueError(f"{self.label} bands must start on a {self.row_multiple}-row boundary")
        return {p: read_rows(params[p], r0, r1) for p in self.decode_params}

    def decode(self, tensors: Tensors) -> torch.Tensor:
        raise NotImplementedError

    def decode_rows(self, params: Params, r0: int, r1: int) -> torch.Tensor:
        return self.decode(self.read_band(params, r0, r1))

    def restated_as(self, target: Format, params: Params) -> dict[str, tuple[str, tuple[int, ...]]] | None:
        """The tensors that change when this module is written exactly as ``target`` (none: ``{}``), ``None``
        when no exact restatement exists. Default: only a format is exactly itself."""
        return {} if target is self else None

    def restate(self, param: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """``tensor`` (this format's ``param``) re-encoded into ``shape`` as ``restated_as`` declared."""
        raise NotImplementedError(f"{self.label} has no restatement of {param}")

    def __repr__(self) -> str:
        return f"<format {self.name}>"


def fail(info: TensorInfo, what: str) -> ConvertError:
    """A ``ConvertError`` about ``info``, naming its file and tensor."""
    return ConvertError(what, file=info.file, tensor=info.name)


def require(params: Params, needed: tuple[str, ...], what: str) -> None:
    """Each of ``needed`` is present, else an error on the weight: ``<what> weight without its <param>``."""
    weight = params["weight"]
    for p in needed:
        if p not in params:
            raise fail(weight, f"{what} weight without its {p}")


def refuse_extra(params: Params, allowed: tuple[str, ...], what: str) -> None:
    """No parameter beyond ``allowed``: ``unexpected <param> beside <what> weight``."""
    extra = sorted(set(params) - set(allowed))
    if extra:
        raise fail(params[extra[0]], f"unexpected {extra[0]} beside {what} weight")


def check_pre_quant_scale(info: TensorInfo, cols: int) -> None:
    """A ``pre_quant_scale`` must be a float vector [cols] (the weight's input columns), finite and > 0."""
    if info.dtype not in PRE_QUANT_SCALE_DTYPES or info.shape != (cols,):
        raise fail(info, f"pre_quant_scale must be a float vector [{cols}], got {info.dtype}{list(info.shape)}")
    s = read_tensor(info).to(torch.float32)
    bad = ~(torch.isfinite(s) & (s > 0))
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise fail(info, f"pre_quant_scale [{i}] is {float(s[i])}: must be finite and > 0")


def fold_pre_quant_scale(x: torch.Tensor, params: Params) -> torch.Tensor:
    """``x`` (float32 rows of a decoded weight) times the module's ``pre_quant_scale`` per input column, in float32;
    ``x`` itself when it has none."""
    info = params.get(PRE_QUANT_SCALE)
    return x if info is None else x * read_tensor(info).to(torch.float32)[None, :]


def positive_scalar(info: TensorInfo) -> float:
    """The value of a float32 scalar scale; it must be finite and > 0."""
    if info.dtype != "F32" or info.numel != 1:
        raise fail(info, f"must be a float32 scalar, got {info.dtype}{list(info.shape)}")
    value = float(read_tensor(info).reshape(()).item())
    if not (value > 0 and torch.isfinite(torch.tensor(value))):
        raise fail(info, f"scale is {value}: must be finite and > 0")
    return value
