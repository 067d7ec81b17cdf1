"""Run stock vLLM (CPU build) on one converted checkpoint, in its own process; used by the vLLM tests.

    python tests/vllm_worker.py DST OUT [--prompts PROMPTS.json]

Builds ``vllm.LLM(model=DST, ...)`` exactly as a user would (after ``cpu_shims.install()``) and writes:

- ``OUT/load.pt``: what vLLM's own loader did, seen by an observer on the model's ``load_weights``
  (``DeepseekV4ForCausalLM`` and its inner ``DeepseekV4Model``, the CPU implementation vLLM picked):
  every checkpoint name vLLM's weights iterator produced with the name vLLM's ``hf_to_vllm_mapper``
  gave it, the names the inner model received, the set ``load_weights`` reported loaded, and a copy of
  every parameter right after ``load_weights`` returned (after vLLM's fusing, before
  ``process_weights_after_loading`` repacks weights into kernel layouts). The observer passes every
  tensor through unchanged and changes no weight.
- ``OUT/result.json``: ``{"mode": "generate" | "load-only", ...}`` plus, in generate mode, the greedy
  tokens and their logprobs for each prompt of PROMPTS.json.

vLLM's CPU DeepSeek-V4 forward needs kernels that only its AVX-512 build has (``convert_weight_packed``,
``fp8_scaled_mm_cpu``, ``flash_mla_with_kvcache_cpu``, ...); on an AVX2-only CPU vLLM loads its AVX2
build, which lacks them. There the worker runs in **load-only** mode: the FP8 kernel selection also
ignores the missing op (the kernel is never run), and the run stops where vLLM's loader would call
``process_weights_after_loading`` (that repacking is exactly what needs the missing ops). Everything
before that point (config, model construction, quant config, ``load_weights`` and vLLM's own
``enable_weights_track`` check) is stock.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nvfp4_convert.preflight import cpu_shims as vllm_shims
from nvfp4_convert.preflight.worker import missing_cpu_ops  # the preflight's own list of the AVX-512 kernels

LLM_KWARGS = {
    "skip_tokenizer_init": True,
    "dtype": "bfloat16",
    "max_model_len": 4096,
    "max_num_batched_tokens": 4096,
    "max_num_seqs": 8,
    "enforce_eager": True,
    "max_logprobs": 20,
    "seed": 0,
    # vLLM's own check that every parameter got a weight; by default it runs for unquantized models only.
    "model_loader_extra_config": {"enable_weights_track": True},
}


class StopAfterLoading(Exception):
    """Raised in load-only mode where vLLM would start repacking weights for kernels this CPU lacks."""


def _observe_loading(record: dict) -> None:
    """Wrap the CPU DeepSeek-V4 ``load_weights`` methods to record names and parameters (pass-through)."""
    import torch
    from vllm.models.deepseek_v4.cpu import model as cpu_model

    outer_load = cpu_model.DeepseekV4ForCausalLM.load_weights
    inner_load = cpu_model.DeepseekV4Model.load_weights

    def outer(self, weights):
        mapper = self.hf_to_vllm_mapper

        def tap(it):
            for name, tensor in it:
                record["ckpt"].append((name, mapper.map_name(name)))
                yield name, tensor

        loaded = outer_load(self, tap(weights))
        record["loaded"] = sorted(loaded)
        record["params"] = {n: p.detach().clone() for n, p in self.named_parameters()}
        return loaded

    def inner(self, weights):
        def tap(it):
            for name, tensor in it:
                record["model"].append(name)
                yield name, tensor

        return inner_load(self, tap(weights))

    cpu_model.DeepseekV4ForCausalLM.load_weights = outer
    cpu_model.DeepseekV4Model.load_weights = inner
    del torch


def _stop_before_repacking() -> None:
    from vllm.model_executor.model_loader import base_loader

    def stop(*args, **kwargs):
        raise StopAfterLoading

    base_loader.process_weights_after_loading = stop


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("dst")
    ap.add_argument("out")
    ap.add_argument("--prompts")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    vllm_shims.install()
    missing = missing_cpu_ops()
    mode = "load-only" if missing else "generate"
    if missing:
        vllm_shims.install_load_only()
        _stop_before_repacking()
    record: dict = {"ckpt": [], "model": [], "loaded": None, "params": None}
    _observe_loading(record)

    import torch
    from vllm import LLM, SamplingParams

    result: dict = {"mode": mode, "missing_ops": missing}
    # A model shorter than LLM_KWARGS' 4096 positions (the recipe fixtures: 256) is run at its own length.
    positions = json.loads((Path(args.dst) / "config.json").read_text()).get("max_position_embeddings", 4096)
    length = min(LLM_KWARGS["max_model_len"], int(positions))
    kwargs = {**LLM_KWARGS, "max_model_len": length, "max_num_batched_tokens": length}
    try:
        llm = LLM(model=args.dst, **kwargs)
    except Exception as exc:
        if not missing or record["params"] is None:
            raise
        chain, e = [], exc
        while e is not None and not isinstance(e, StopAfterLoading):
            chain.append(repr(e))
            e = e.__cause__ or e.__context__
        if e is None:
            raise
        llm = None
    torch.save(record, out / "load.pt")

    if llm is not None and args.prompts:
        prompts = json.loads(Path(args.prompts).read_text())
        params = SamplingParams(temperature=0.0, max_tokens=prompts["max_tokens"], logprobs=1, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts["prompts"]], params, use_tqdm=False)
        gens = []
        for o in outs:
            c = o.outputs[0]
            gens.append(
                {
                    "tokens": list(c.token_ids),
                    "logprobs": [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids, strict=True)],
                }
            )
        result["generations"] = gens
    (out / "result.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
