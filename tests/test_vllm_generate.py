"""Stock vLLM's forward on our output agrees with transformers on the source's own weights.

vLLM (CPU build, ``vllm_worker.py``) greedily generates 16 tokens for each of three fixed prompts from the
e2e fixture converted with BF16 routed experts (``default`` and ``fp8`` policies). The reference is
transformers' ``DeepseekV4ForCausalLM`` in float32 holding the dequantized NVFP4 weights of the source
(the weights ModelOpt's fake-quantized model had), teacher-forced on vLLM's tokens: at least 42 of the 48
steps must pick the same greedy token and the median |delta logprob| of vLLM's token must stay below 0.05.
A planted fault (the main compressors' ``wkv`` and ``wgate`` swapped) must fail the same check.

``--attention-from`` (issue 6): the e2e fixture converted plain and grafted from ``tiny-dsv4-e2e-ref`` (its
non-expert weights before quantization, in the FP8 form of DeepSeek's release) are both scored against the
reference holding REF's non-expert weights and the source's dequantized NVFP4 experts (the common ground: the
experts come from the source in both); the grafted checkpoint must agree at least as well as the plain one.

vLLM's CPU DeepSeek-V4 forward needs its AVX-512 kernel library; on a CPU without AVX-512 the worker can
only load (see ``vllm_worker.py``) and these tests skip, naming the missing kernels.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")
pytest.importorskip("transformers")

import torch
from vllm_harness import E2E_FIXTURE, E2E_REF, agreement, plant_fault, run_vllm

# vLLM loads its AVX-512 kernel library only where torch reports AVX-512 (vllm/platforms/cpu.py import_kernels);
# its AVX2 library lacks the DeepSeek-V4 CPU kernels. Skip at once rather than after a load-only vLLM run.
pytestmark = pytest.mark.skipif(
    not torch.cpu._is_avx512_supported(),
    reason="vLLM's CPU DeepSeek-V4 forward needs its AVX-512 kernel library; this CPU has no AVX-512",
)


def _generations(run):
    if run.mode != "generate":
        pytest.skip(
            "vLLM's CPU DeepSeek-V4 forward needs kernels of its AVX-512 build, missing on this CPU: "
            + ", ".join(run.missing_ops)
        )
    return run.generations


@pytest.mark.parametrize("policy", ["default", "fp8"])
def test_vllm_greedy_agrees_with_transformers_reference(policy, convert_once, tmp_path_factory):
    dst = convert_once(E2E_FIXTURE, policy, "bf16")
    gens = _generations(run_vllm(dst, tmp_path_factory.mktemp(f"vllm-{policy}")))
    result = agreement(gens)
    print(f"{policy}: {result}")
    assert result.ok, f"{policy}: {result}"


def test_planted_fault_fails_agreement(convert_once, tmp_path_factory):
    dst = convert_once(E2E_FIXTURE, "default", "bf16")
    _generations(run_vllm(dst, tmp_path_factory.mktemp("vllm-default")))  # skip early where vLLM cannot run
    faulty = plant_fault(dst, tmp_path_factory.mktemp("fault") / "out", "compressor_wkv_wgate_swapped")
    gens = _generations(run_vllm(faulty, tmp_path_factory.mktemp("vllm-fault")))
    result = agreement(gens)
    print(f"planted compressor_wkv_wgate_swapped: {result}")
    assert not result.ok, f"a planted fault went unnoticed: {result}"


def test_grafted_agrees_with_the_unquantized_reference_at_least_as_well_as_plain(convert_once, tmp_path_factory):
    results = {}
    for name, ref in (("plain", None), ("grafted", E2E_REF)):
        dst = convert_once(E2E_FIXTURE, "default", "bf16", attention_from=ref)
        gens = _generations(run_vllm(dst, tmp_path_factory.mktemp(f"vllm-default-{name}")))
        results[name] = agreement(gens, ref=E2E_REF)
        print(f"{name} vs the unquantized reference: {results[name]}")
    assert results["grafted"].matches >= results["plain"].matches, results
