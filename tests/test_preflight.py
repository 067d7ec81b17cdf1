"""``nvfp4-convert preflight``: its source is a real ModelOpt export's twin, it refuses what cannot run in one line,
and on vLLM's CPU build it PASSes a correct conversion and FAILs a planted fault.

The generation tests run where vLLM's CPU DeepSeek-V4 forward has its AVX-512 kernels and skip elsewhere, naming
the missing kernels, like ``test_vllm_generate.py``.
"""

from __future__ import annotations

import json
import re
import shutil
import stat
import sys
from pathlib import Path

import pytest
import torch
from helpers import load_all
from typer.testing import CliRunner

from nvfp4_convert.cli import app
from nvfp4_convert.codecs import FP8_BLOCK
from nvfp4_convert.convert import prepare
from nvfp4_convert.errors import ConvertError
from nvfp4_convert.policy import Policy
from nvfp4_convert.preflight import check, tiny_model
from nvfp4_convert.preflight.check import Options, Unavailable, preflight

E2E_FIXTURE = Path(__file__).resolve().parent / "fixtures" / "tiny-dsv4-e2e"  # a real ModelOpt 0.45 export


@pytest.fixture(scope="module")
def cpu_source(tmp_path_factory) -> Path:
    pytest.importorskip("transformers")
    return tiny_model.write_source(tiny_model.SIZES["cpu"], tmp_path_factory.mktemp("pf") / "src")


def test_cpu_source_has_the_names_dtypes_and_shapes_of_a_real_modelopt_export(cpu_source):
    ours, real = load_all(cpu_source), load_all(E2E_FIXTURE)
    assert set(ours) == set(real)
    assert {k: (v.dtype, tuple(v.shape)) for k, v in ours.items()} == {
        k: (v.dtype, tuple(v.shape)) for k, v in real.items()
    }
    ours_cfg = json.loads((cpu_source / "config.json").read_text())
    real_cfg = json.loads((E2E_FIXTURE / "config.json").read_text())
    assert set(ours_cfg) == set(real_cfg)
    assert ours_cfg["quantization_config"] == real_cfg["quantization_config"]
    differ = {k for k in ours_cfg if ours_cfg[k] != real_cfg[k]}
    assert differ == {"transformers_version", "routed_scaling_factor"}, differ  # the latter on purpose (tiny_model)


def test_cpu_source_passes_the_converters_inventory_checks(cpu_source):
    plan = prepare(cpu_source, Policy("default", "nvfp4")).plan
    assert not plan.notes or all("MTP" in n or "mtp" in n for n in plan.notes), plan.notes


def test_input_scales_are_calibrated_activation_scales_not_weight_scales(cpu_source):
    t = load_all(cpu_source)
    scales = [v for k, v in t.items() if k.endswith(".input_scale")]
    assert scales and all(v.dtype == torch.float32 and v.dim() == 0 and float(v) > 0 for v in scales)
    # an activation amax / (6 * 448): RMS-normalised inputs of this model are O(1), so ~1e-3, never 1.0
    assert all(1e-5 < float(v) < 0.1 for v in scales)


@pytest.fixture(scope="module")
def gpu_source(tmp_path_factory) -> Path:
    pytest.importorskip("transformers")
    return tiny_model.write_source(tiny_model.SIZES["gpu"], tmp_path_factory.mktemp("pf-gpu") / "src")


@pytest.mark.parametrize("policy", ["default", "fp8"])
def test_gpu_model_has_the_dimensions_vllms_cuda_kernels_accept(policy, gpu_source):
    cfg = tiny_model.config_dict(tiny_model.SIZES["gpu"])
    assert cfg["head_dim"] == 512 and cfg["index_head_dim"] == 128
    assert cfg["index_n_heads"] in (32, 64)  # DeepGEMM fp8_fp4_mqa_logits on sm90
    assert cfg["num_attention_heads"] in (64, 128)  # FlashMLA's FP8 decode kernel, no padding
    # every FP8 output of the plan: both dimensions whole 128-blocks (DeepGEMM's block-scaled GEMM)
    plan = prepare(gpu_source, Policy(policy, "nvfp4")).plan
    fp8 = [o for o in plan.outputs if o.name.endswith(".weight") and o.dtype == "F8_E4M3"]
    assert fp8, "no FP8 output"
    assert all(s % FP8_BLOCK == 0 for o in fp8 for s in o.shape), [(o.name, o.shape) for o in fp8]


def test_gpu_model_blocks_differ_so_a_wrong_block_scale_is_no_uniform_rescale(gpu_source):
    """Every quantized linear of the gpu model spreads its 128x128 blocks over several power-of-two FP8 scales
    (trained weights do; on uniform random ones ``wo_a_scale_ones`` was a uniform rescale vLLM's norms absorb)."""
    from nvfp4_convert.preflight.reference import dequantized_state_dict, load_tensors

    sd = dequantized_state_dict(load_tensors(gpu_source))
    for name in ("model.layers.1.self_attn.o_a_proj.weight", "model.layers.1.self_attn.q_b_proj.weight"):
        w = sd[name]
        rows, cols = w.shape
        amax = w.reshape(rows // FP8_BLOCK, FP8_BLOCK, cols // FP8_BLOCK, FP8_BLOCK).abs().amax((1, 3))
        scales = torch.ceil(torch.log2(amax / 448)).unique()  # the power-of-two block scales our FP8 output gets
        assert len(scales) >= 3, (name, scales)


def test_the_block_spread_changes_the_quantized_weights_and_nothing_else():
    import dataclasses

    cpu = tiny_model.SIZES["cpu"]
    plain = tiny_model.random_model(cpu)
    spread = tiny_model.random_model(dataclasses.replace(cpu, spread_binades=2.0))
    a, b = {**dict(plain.named_parameters()), **dict(plain.named_buffers())}, dict(spread.named_parameters())
    b |= dict(spread.named_buffers())
    quantized = set(tiny_model.quantized_weights(plain))
    assert quantized and all(not torch.equal(a[n], b[n]) for n in quantized if a[n].shape[-1] > 128)
    assert all(torch.equal(a[n], b[n]) for n in a if n not in quantized)  # routing tables, norms, head: same draw


@pytest.mark.parametrize("tp", [2, 8])
def test_gpu_model_shards_evenly_over_tensor_parallel_ranks(tp):
    """Every dimension vLLM splits over TP ranks divides, and each rank keeps whole 128-wide FP8 blocks."""
    c = tiny_model.config_dict(tiny_model.SIZES["gpu"])
    heads, groups = c["num_attention_heads"], c["o_groups"]
    assert heads % tp == 0 and groups % tp == 0
    assert (heads // tp) * c["head_dim"] % FP8_BLOCK == 0  # wq_b rows per rank (column parallel)
    assert (groups // tp) * c["o_lora_rank"] % FP8_BLOCK == 0  # wo_a rows / wo_b columns per rank
    assert c["n_routed_experts"] % tp == 0  # expert parallel: whole experts per rank
    assert c["moe_intermediate_size"] % tp == 0  # tensor-parallel experts and shared expert


# ----------------------------------------------------------------------------------------------------------
# Refusals: an interpreter that answers the probe as a given environment would


def _fake_python(tmp_path: Path, probe: dict) -> str:
    """An executable standing in for ``--python``: answers ``worker.py probe OUT`` with ``probe``."""
    exe = tmp_path / "python"
    exe.write_text(f"#!{sys.executable}\nimport json, sys\nopen(sys.argv[-1], 'w').write({json.dumps(probe)!r})\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return str(exe)


GPU_ENV = {"vllm": "0.26.0", "torch": "2.11.0+cu130", "cuda": True, "gpus": 1, "gpu": "NVIDIA H200", "platform": "cuda"}
CPU_ENV = {"vllm": "0.32.0", "torch": "2.13.0+cpu", "cuda": False, "gpus": 0, "gpu": None, "platform": "cpu"}


@pytest.mark.parametrize(
    ("probe", "options", "message"),
    [
        ({"error": "ModuleNotFoundError: No module named 'vllm'"}, {}, "vLLM is not importable"),
        ({**GPU_ENV, "vllm": "0.21.0"}, {}, "vLLM 0.21.0 is too old for this check on cuda: it needs >= 0.22"),
        (
            {**GPU_ENV, "vllm": "0.26.0"},
            {"policy": "bf16"},
            "vLLM 0.26.0 is too old for this check on cuda: it needs >= 0.30",
        ),
        (CPU_ENV, {"device": "cuda"}, "no GPU: --device cuda"),
        ({**CPU_ENV, "vllm": "0.31.0"}, {}, "vLLM 0.31.0 is too old for this check on cpu: it needs >= 0.32"),
        (GPU_ENV, {"device": "cpu"}, "--device cpu needs vLLM's CPU build"),
        (GPU_ENV, {"tensor_parallel_size": 2}, "--tensor-parallel-size 2, but only 1 GPU(s)"),
        (GPU_ENV, {"hidden_size": 128}, "--hidden-size 128: vLLM's fused mHC decode kernel"),
    ],
)
def test_what_cannot_run_is_refused_in_one_line_before_anything_is_built(tmp_path, probe, options, message):
    opts = Options(python=_fake_python(tmp_path, probe), workdir=tmp_path / "work", **options)
    with pytest.raises(Unavailable, match=re.escape(message)):
        preflight(opts, say=lambda m: None)
    assert not (tmp_path / "work" / "src").exists()


def test_an_interpreter_without_vllm_is_refused(tmp_path):
    """A real one: this CI's base interpreter has no vLLM (the test venv has)."""
    python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else None
    if python is None or python == sys.executable:
        pytest.skip("no second interpreter here")
    with pytest.raises(Unavailable, match="vLLM is not importable"):
        preflight(Options(python=python, workdir=tmp_path), say=lambda m: None)


def test_cli_says_cannot_run_in_one_line_and_exits_2(tmp_path):
    python = _fake_python(tmp_path, {**CPU_ENV})
    result = CliRunner().invoke(app, ["preflight", "--device", "cuda", "--python", python])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "cannot run: no GPU" in lines[0], result.output


def test_unknown_fault_and_device_are_refused(tmp_path):
    result = CliRunner().invoke(app, ["preflight", "--device", "tpu"])
    assert result.exit_code == 2 and "unknown device" in result.output
    python = _fake_python(tmp_path, {**CPU_ENV})
    result = CliRunner().invoke(app, ["preflight", "--python", python, "--planted-fault", "nope"])
    assert result.exit_code == 2 and "unknown planted fault 'nope'" in result.output


def test_a_stale_result_in_the_workdir_is_never_scored(tmp_path):
    """A worker that dies without writing (segfault, OOM kill) must not leave an earlier run's result standing."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "probe.json").write_text(json.dumps(GPU_ENV))  # from an earlier run
    exe = tmp_path / "python"
    exe.write_text(f"#!{sys.executable}\nimport sys\nsys.exit(139)\n")
    exe.chmod(0o755)
    with pytest.raises(ConvertError, match="exited 139 without a result"):
        preflight(Options(python=str(exe), workdir=work), say=lambda m: None)


def test_an_interpreter_that_cannot_run_is_refused_in_one_line(tmp_path):
    exe = tmp_path / "python"
    exe.write_text("not executable")
    with pytest.raises(Unavailable, match="cannot run the interpreter"):
        preflight(Options(python=str(exe), workdir=tmp_path / "w"), say=lambda m: None)


def test_version_parsing():
    assert check.version_tuple("0.26.0") == (0, 26)
    assert check.version_tuple("0.32.0+cpu") == (0, 32)
    assert check.version_tuple("0.10.1rc2") == (0, 10)


# ----------------------------------------------------------------------------------------------------------
# The real thing on vLLM's CPU build


def _cpu_preflight(tmp_path: Path, **options) -> dict:
    pytest.importorskip("vllm")
    if not torch.cpu._is_avx512_supported():
        pytest.skip("vLLM's CPU DeepSeek-V4 forward needs its AVX-512 kernel library; this CPU has no AVX-512")
    try:
        return preflight(Options(device="cpu", experts="bf16", workdir=tmp_path, **options), say=print)
    except Unavailable as e:
        pytest.skip(str(e))


def test_cpu_preflight_passes_a_correct_conversion(tmp_path):
    result = _cpu_preflight(tmp_path, policy="default")
    print(json.dumps({k: result[k] for k in ("verdict", "decode", "prefill", "environment")}))
    assert result["verdict"] == "PASS", result["decode"]
    assert result["decode"]["steps"] == 48


def test_cpu_preflight_fails_a_planted_fault(tmp_path):
    result = _cpu_preflight(tmp_path, policy="default", planted_fault="compressor_wkv_wgate_swapped")
    print(json.dumps({k: result[k] for k in ("verdict", "decode", "prefill")}))
    assert result["verdict"] == "FAIL", result["decode"]


def test_diagnostic_sizes_change_only_what_was_asked():
    gpu = tiny_model.SIZES["gpu"]
    wide = tiny_model.resized(gpu, hidden_size=4096, prompt_lengths=(1, 8))
    assert tiny_model.config_dict(wide) == {**tiny_model.config_dict(gpu), "hidden_size": 4096}
    assert wide.prompt_lengths == (1, 8) and [len(p) for p in tiny_model.prompts(wide)] == [1, 8]
    assert tiny_model.resized(gpu) == gpu
    for bad in ({"hidden_size": 100}, {"hidden_size": 0}, {"prompt_lengths": (0,)}, {"prompt_lengths": ()}):
        with pytest.raises(ValueError):
            tiny_model.resized(gpu, **bad)


@pytest.mark.parametrize(
    ("hidden", "computed"),
    [(128, False), (1024, False), (3072, False), (2048, True), (4096, True), (6144, True), (7168, True)],
)
def test_cuda_decode_needs_a_hidden_size_its_fused_mhc_kernel_covers(hidden, computed):
    """vLLM's mhc_fused_tilelang (<= 16 tokens) covers hidden / splits in steps of 256 threads, splits 8 or 4."""
    assert tiny_model.cuda_decode_computes(hidden) is computed
    assert tiny_model.cuda_decode_computes(tiny_model.config_dict(tiny_model.SIZES["gpu"])["hidden_size"])


def test_cli_refuses_a_gpu_share_vllm_cannot_take():
    result = CliRunner().invoke(app, ["preflight", "--gpu-memory-utilization", "0.99"])
    assert result.exit_code == 2 and "--gpu-memory-utilization" in result.output


def test_cli_refuses_a_malformed_prompt_length_list():
    result = CliRunner().invoke(app, ["preflight", "--prompt-lengths", "1,x"])
    assert result.exit_code == 2 and "comma-separated integers" in result.output


def test_agreement_verdict_needs_seven_eighths_and_a_small_finite_median():
    from nvfp4_convert.preflight.reference import Agreement

    assert Agreement(42, 48, 0.049, 0.2, [14, 14, 14]).ok
    assert not Agreement(41, 48, 0.001, 0.01, [14, 14, 13]).ok
    assert Agreement(40, 48, 0.01, 0.05, [14, 14, 12], near_ties=2).ok  # near-ties count towards the 42
    assert not Agreement(48, 48, 0.05, 0.1, [16, 16, 16]).ok
    assert not Agreement(48, 48, float("nan"), float("nan"), [16, 16, 16]).ok  # NaN logprobs never pass
    assert not Agreement(0, 0, float("nan"), float("nan"), []).ok


def test_a_near_tie_of_the_reference_agrees_and_a_wider_gap_does_not():
    from nvfp4_convert.preflight.reference import TIE_NATS, score_decode

    # the reference's log-probs at three steps over a 4-token vocabulary
    logp = torch.tensor(
        [[-1.0, -2.0, -3.0, -4.0], [-1.0, -1.0 - TIE_NATS / 2, -3.0, -4.0], [-1.0, -1.0 - 2 * TIE_NATS, -3, -4]]
    )
    gens = [{"tokens": [0, 1, 1], "logprobs": [-1.0, -1.0 - TIE_NATS / 2, -1.0 - 2 * TIE_NATS]}]
    a = score_decode([logp], gens)
    assert (a.matches, a.near_ties, a.agreeing, a.steps) == (1, 1, 2, 3)
    assert a.tie_gaps == pytest.approx([TIE_NATS / 2, 2 * TIE_NATS])
    assert a.median_abs_dlogp == 0.0  # the reference's own logprobs


def test_decode_is_compared_with_vllms_own_prefill():
    from nvfp4_convert.preflight.reference import decode_vs_prefill

    gens = [{"tokens": [5, 0, 0], "logprobs": [-1.0, -5.55, -5.55]}]  # decode collapsed after its first token
    rows = [{"top1": [5, 7, 9], "logprobs": [-1.01, -6.0, -7.0]}]
    a = decode_vs_prefill(gens, rows)
    assert (a.matches, a.steps, a.per_prompt) == (1, 3, [1])
    assert a.median_abs_dlogp == pytest.approx(0.45)


def test_planted_faults_change_what_they_say_and_nothing_else(tmp_path, convert_once):
    from nvfp4_convert.preflight import faults
    from nvfp4_convert.preflight.reference import dequantized_state_dict, load_tensors

    good = convert_once(E2E_FIXTURE, "default", "nvfp4")
    before = load_tensors(good)
    for fault in faults.FAULTS:
        dst = tmp_path / fault
        shutil.copytree(good, dst)
        faults.plant(dst, fault)
        after = load_tensors(dst)
        changed = {k for k in before if not torch.equal(_bytes(before[k]), _bytes(after[k]))}
        assert changed, fault
        if fault == "compressor_wkv_wgate_swapped":
            assert all(".attn.compressor.w" in k for k in changed)
        elif fault == "wo_a_scale_ones":
            assert all(k.endswith(".attn.wo_a.scale") for k in changed)
            assert all(float(after[k].float().min()) == float(after[k].float().max()) == 1.0 for k in changed)
        else:  # the gate halves re-expressed: same values decoded per tensor, but 16x w3's global scale
            assert all(".w1.weight_scale" in k for k in changed)
            experts = [k for k in changed if k.endswith("w1.weight_scale_2")]
            assert all(float(after[k]) == 16 * float(after[k.replace(".w1.", ".w3.")]) for k in experts)
            gate = {k: v for k, v in after.items() if ".w1." in k}
            was = {k: v for k, v in before.items() if ".w1." in k}
            a, b = dequantized_state_dict(_as_modules(gate)), dequantized_state_dict(_as_modules(was))
            assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)


def _as_modules(t: dict) -> dict:
    """Native expert tensors under names ``dequantized_state_dict`` decodes one by one (no fusing)."""
    return {k.replace(".ffn.experts.", ".e."): v for k, v in t.items()}


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


# ----------------------------------------------------------------------------------------------------------
# --mtp: an MTP block from DeepSeek's release format, and greedy decode with MTP speculative decoding (GPU only)


@pytest.fixture(scope="module")
def cpu_mtp(cpu_source, tmp_path_factory) -> tuple[Path, Path]:
    """(REF, DST): the cpu size's MTP reference and ``run --mtp-from REF`` of ``cpu_source`` into DST."""
    from nvfp4_convert.convert import run

    work = tmp_path_factory.mktemp("pf-mtp")
    ref = tiny_model.write_mtp_reference(tiny_model.SIZES["cpu"], work / "ref")
    dst = work / "dst"
    run(cpu_source, dst, Policy("default", "nvfp4"), mtp_from=ref)
    return ref, dst


def test_mtp_reference_is_the_release_format_of_the_sources_dimensions(cpu_source, cpu_mtp):
    from nvfp4_convert.checkpoint import Checkpoint
    from nvfp4_convert.inventory import build_inventory
    from nvfp4_convert.model_shapes import expected_mtp_shapes
    from nvfp4_convert.mtp import take_mtp

    ref, _ = cpu_mtp
    rel = load_all(ref)
    assert not any(n.startswith("layers.") for n in rel)  # the MTP block and the top level only
    src_cfg = json.loads((cpu_source / "config.json").read_text())
    ref_cfg = json.loads((ref / "config.json").read_text())
    assert ref_cfg["num_nextn_predict_layers"] == 1
    assert all(ref_cfg[k] == src_cfg[k] for k in tiny_model.SIZE_KEYS if k in ref_cfg)
    expert, dense = "mtp.0.ffn.experts.5.w2", "mtp.0.attn.wq_a"
    assert rel[f"{expert}.weight"].dtype == torch.int8 and rel[f"{expert}.scale"].dtype == torch.float8_e8m0fnu
    assert rel[f"{dense}.weight"].dtype == torch.float8_e4m3fn and rel[f"{dense}.scale"].dtype == torch.float8_e8m0fnu
    src = Checkpoint.open(cpu_source)
    block = take_mtp(src.config, build_inventory(src), ref)
    assert block is not None and block.layers == 1
    assert set(expected_mtp_shapes(src_cfg)) <= {t.name for m in block.modules.values() for t in m.params.values()}


def test_run_mtp_from_the_reference_writes_the_whole_block_with_nvfp4_experts(cpu_source, cpu_mtp):
    from nvfp4_convert.model_shapes import expected_mtp_shapes

    _, dst = cpu_mtp
    out = {n: t for n, t in load_all(dst).items() if n.startswith("mtp.")}
    for name in expected_mtp_shapes(json.loads((cpu_source / "config.json").read_text())):
        assert name in out or name.removesuffix(".weight") + ".weight" in out, name
    experts = {n.split(".ffn.experts.")[1].split(".")[0] for n in out if ".ffn.experts." in n}
    assert len(experts) == tiny_model.config_dict(tiny_model.SIZES["cpu"])["n_routed_experts"]
    assert out["mtp.0.ffn.experts.0.w1.weight_scale_2"].dtype == torch.float32  # NVFP4, as --experts nvfp4
    assert json.loads((dst / "config.json").read_text())["num_nextn_predict_layers"] == 1


def test_the_workers_speculative_arguments_are_what_vllm_accepts(cpu_mtp):
    """vLLM's own EngineArgs (what ``vllm.LLM`` builds) makes a DeepSeek-V4 MTP draft of them for the converted model."""
    pytest.importorskip("vllm")
    from vllm.engine.arg_utils import EngineArgs

    from nvfp4_convert.preflight import worker

    _, dst = cpu_mtp
    args = check.mtp_args(check.worker_args(Options(mtp=True), "cuda", dst, Path("prompts.json")))
    kwargs = worker._llm_kwargs(worker.parser().parse_args([*args, "out.json"]))
    assert kwargs["speculative_config"] == {"method": "mtp", "num_speculative_tokens": 1}
    assert kwargs["disable_log_stats"] is False  # llm.get_metrics() needs vLLM's statistics
    spec = EngineArgs(model=str(dst), **kwargs).create_engine_config().speculative_config
    assert spec.method == "mtp" and spec.num_speculative_tokens == 1
    assert spec.draft_model_config.architectures == ["DeepSeekV4MTPModel"]
    plain = worker._llm_kwargs(worker.parser().parse_args([*check.worker_args(Options(), "cuda", dst, Path("p")), "o"]))
    assert "speculative_config" not in plain


def test_spec_decode_counts_sum_vllms_counters_over_engines():
    pytest.importorskip("vllm")
    from vllm.v1.metrics.reader import Counter, Gauge, Vector

    from nvfp4_convert.preflight.worker import spec_decode_counts

    metrics = [
        Counter("vllm:spec_decode_num_drafts", {"engine": "0"}, 40),
        Counter("vllm:spec_decode_num_draft_tokens", {"engine": "0"}, 40),
        Counter("vllm:spec_decode_num_accepted_tokens", {"engine": "0"}, 3),
        Counter("vllm:spec_decode_num_accepted_tokens", {"engine": "1"}, 2),
        Vector("vllm:spec_decode_num_accepted_tokens_per_pos", {"engine": "0"}, [3]),
        Vector("vllm:spec_decode_num_accepted_tokens_per_pos", {"engine": "1"}, [2]),
        Gauge("vllm:num_requests_running", {}, 0.0),
    ]
    assert spec_decode_counts(metrics) == {
        "drafts": 40,
        "draft_tokens": 40,
        "accepted_tokens": 5,
        "accepted_per_position": [5],
    }


def _gens(*tokens: list[int]) -> list[dict]:
    return [{"tokens": t, "logprobs": [-0.1 * (i + 1) for i in range(len(t))]} for t in tokens]


def test_same_tokens_passes_identical_greedy_tokens_and_names_the_first_difference():
    from nvfp4_convert.preflight.reference import same_tokens

    plain = _gens([5, 6, 7], [8, 9, 10])
    assert same_tokens(plain, _gens([5, 6, 7], [8, 9, 10])).ok
    spec = _gens([5, 6, 7], [8, 11, 12])
    spec[1]["logprobs"][1] = -0.25
    diff = same_tokens(plain, spec)
    assert not diff.ok and diff.per_prompt == [3, 1]
    assert diff.first_difference == {"prompt": 1, "step": 1, "tokens": [9, 11], "logprobs": [-0.2, -0.25]}
    assert "prompt 1 step 1: 9 without, 11 with" in str(diff)
    short = same_tokens(plain, _gens([5, 6], [8, 9, 10]))
    assert not short.ok and short.first_difference["tokens"] == [7, None]
    assert not same_tokens(_gens([]), _gens([])).ok  # nothing compared is no pass


def test_the_verdict_needs_identical_mtp_tokens_as_well():
    from nvfp4_convert.preflight.reference import Agreement

    good = Agreement(48, 48, 0.01, 0.05, [16, 16, 16])
    same = {"same_tokens": {"ok": True}}
    assert check.verdict(good, None) == "PASS" and check.verdict(good, same) == "PASS"
    assert check.verdict(good, {"same_tokens": {"ok": False}}) == "FAIL"
    assert check.verdict(Agreement(10, 48, 0.3, 1.0, [4, 3, 3]), same) == "FAIL"


def test_the_mtp_table_line_names_the_first_difference_and_the_acceptance():
    from nvfp4_convert.cli import _mtp_row

    ok = {"same_tokens": {"steps": 48, "per_prompt": [16, 16, 16], "first_difference": None}, "acceptance": None}
    assert _mtp_row(ok)[:3] == ("mtp vs plain", "48/48 identical", "[16, 16, 16]")
    bad = {
        "same_tokens": {"steps": 48, "per_prompt": [16, 3, 16], "first_difference": {"prompt": 1, "step": 3}},
        "acceptance": {"draft_tokens": 40, "accepted_tokens": 7},
    }
    row = _mtp_row(bad)
    assert row[1] == "35/48 identical (first differs: prompt 1 step 3)" and "accepted 7/40" in row[-1]


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_mtp_on_vllms_cpu_build_is_refused_in_one_line(tmp_path, device):
    opts = Options(python=_fake_python(tmp_path, CPU_ENV), device=device, mtp=True, workdir=tmp_path / "work")
    with pytest.raises(Unavailable, match=re.escape("vLLM's CPU build has no DeepSeek-V4 MTP")):
        preflight(opts, say=lambda m: None)
    assert not (tmp_path / "work" / "src").exists()
    result = CliRunner().invoke(app, ["preflight", "--device", device, "--mtp", "--python", opts.python])
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "cannot run: vLLM's CPU build has no DeepSeek-V4 MTP" in lines[0] and "--device cuda" in lines[0]


def test_the_mtp_run_asks_the_worker_for_speculative_decoding_and_compares_exactly(tmp_path):
    """A stand-in interpreter answers ``worker.py run ... --speculative-config JSON OUT`` (and records its argv)."""
    spec = {"generations": _gens([5, 6, 7], [8, 9, 12]), "spec_decode": {"drafts": 6, "accepted_tokens": 1}}
    exe = tmp_path / "python"
    exe.write_text(
        f"#!{sys.executable}\nimport json, sys\nopen({str(tmp_path / 'argv')!r}, 'w').write(json.dumps(sys.argv))\n"
        f"open(sys.argv[-1], 'w').write({json.dumps(spec)!r})\n"
    )
    exe.chmod(0o755)
    args = check.worker_args(Options(), "cuda", tmp_path / "dst", tmp_path / "prompts.json")
    mtp = check._mtp_run(str(exe), args, tmp_path, _gens([5, 6, 7], [8, 9, 10]), say=lambda m: None)
    argv = json.loads((tmp_path / "argv").read_text())
    i = argv.index("--speculative-config")
    assert json.loads(argv[i + 1]) == check.SPECULATIVE_CONFIG == {"method": "mtp", "num_speculative_tokens": 1}
    assert argv[2:i] == args  # the plain run's arguments, then the speculative config
    assert mtp["acceptance"] == spec["spec_decode"] and mtp["generations"] == spec["generations"]
    assert not mtp["same_tokens"]["ok"] and mtp["same_tokens"]["first_difference"]["step"] == 2
    assert (tmp_path / "vllm-mtp.log").exists()
