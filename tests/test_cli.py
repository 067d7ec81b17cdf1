"""The command line as a user meets it: plan, run, inspect, demo; errors are one red line."""

from __future__ import annotations

import json

import pytest
import typer
from conftest import REPO_FIXTURE
from typer.testing import CliRunner

from nvfp4_convert.cli import app, parse_size

runner = CliRunner()


def test_plan_writes_nothing_and_shows_the_actions(tmp_path):
    before = sorted(p.name for p in REPO_FIXTURE.iterdir())
    result = runner.invoke(app, ["plan", str(REPO_FIXTURE), "--json", str(tmp_path / "plan.json")])
    assert result.exit_code == 0, result.output
    for word in ("quantized", "dequantized", "dropped", "routed_expert", "F8_E8M0", "ignored_layers"):
        assert word in result.output
    assert sorted(p.name for p in REPO_FIXTURE.iterdir()) == before
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["totals"]["input_tensors"] == len(plan["tensors"])


def test_run_then_inspect(tmp_path, source):
    dst = tmp_path / "out"
    result = runner.invoke(app, ["run", str(source), str(dst), "--policy", "fp8", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "done" in result.output
    result = runner.invoke(app, ["inspect", str(dst), "--deep", "--json", str(tmp_path / "i.json")])
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "i.json").read_text())
    assert info["status"] == "converted" and info["naming"] == "native" and info["quant_method"] == "fp8"
    assert {"role": "attention", "format": "fp8", "modules": 22} in info["formats"]
    assert info["bad_scales"] == []


def test_inspect_source_and_unfinished(tmp_path):
    result = runner.invoke(app, ["inspect", str(REPO_FIXTURE)])
    assert result.exit_code == 0 and "transformers names" in result.output
    dst = tmp_path / "out"
    runner.invoke(app, ["run", str(REPO_FIXTURE), str(dst), "--quiet"])
    (dst / ".nvfp4-convert").mkdir()
    result = runner.invoke(app, ["inspect", str(dst)])
    assert "UNFINISHED" in result.output


def test_demo_converts_the_shipped_fixture():
    result = runner.invoke(app, ["demo"])
    assert result.exit_code == 0, result.output
    assert "demo" in result.output and "converted" in result.output


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["plan", str(REPO_FIXTURE), "--policy", "int4"], "--policy"),
        (["plan", str(REPO_FIXTURE), "--experts", "fp8"], "--experts"),
        (["run", str(REPO_FIXTURE), "out", "--io", "mmap"], "--io"),
        (["demo", "--policy", "BF16"], "--policy"),  # the values are lowercase, as documented
    ],
)
def test_bad_option_values_are_refused_by_the_command_line_exit_2(args, option):
    """--policy, --experts and --io take one of their values, checked before anything runs."""
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and f"Invalid value for '{option}'" in result.output, result.output


def test_the_documented_option_values_and_defaults():
    from nvfp4_convert.convert import IO_MODES
    from nvfp4_convert.policy import EXPERT_FORMATS, PRESETS

    assert PRESETS == ("default", "fp8", "bf16") and EXPERT_FORMATS == ("nvfp4", "bf16")
    assert IO_MODES == ("auto", "direct", "buffered")
    commands = typer.main.get_command(app).commands
    for command in ("plan", "run", "demo", "preflight"):
        params = {p.name: p for p in commands[command].params}
        assert params["policy"].default == "default" and params["experts"].default == "nvfp4", command
    assert {p.name: p for p in commands["run"].params}["io"].default == "auto"
    result = runner.invoke(app, ["plan", str(REPO_FIXTURE)])
    assert result.exit_code == 0 and "policy default:" in result.output and "routed experts nvfp4" in result.output
    for preset in PRESETS:
        for experts in EXPERT_FORMATS:
            result = runner.invoke(app, ["plan", str(REPO_FIXTURE), "--policy", preset, "--experts", experts])
            assert result.exit_code == 0, result.output
            assert f"policy {preset}:" in result.output and f"routed experts {experts};" in result.output


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("150kB") == 150_000
    assert parse_size("123") == 123


def test_an_interrupted_run_says_how_to_continue_in_one_line(tmp_path, monkeypatch):
    import nvfp4_convert.convert as convert  # the CLI imports it when a command runs

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert, "prepare", interrupted)
    result = runner.invoke(app, ["run", str(REPO_FIXTURE), str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 130
    assert result.output.strip() == "interrupted: run the same command again with --resume to continue"


def test_names_are_printed_literally_not_as_markup(tmp_path):
    src = tmp_path / "[red]src[blue]"
    src.mkdir()
    result = runner.invoke(app, ["plan", str(src)])
    assert result.exit_code == 1
    assert "[red]src[blue]" in result.output, result.output


def test_an_os_error_is_one_line_naming_the_file(tmp_path, monkeypatch):
    import nvfp4_convert.convert as convert

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "x.safetensors"))

    monkeypatch.setattr(convert, "prepare", denied)
    result = runner.invoke(app, ["plan", str(REPO_FIXTURE)])
    assert result.exit_code == 1
    assert result.output.strip() == f"error: {tmp_path / 'x.safetensors'}: Permission denied"


def test_control_characters_in_a_name_are_made_visible(tmp_path):
    src = tmp_path / "evil\nerror: all fine\x1b[2J"
    src.mkdir()
    result = runner.invoke(app, ["plan", str(src)])
    assert result.exit_code == 1
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "evil\\nerror: all fine\\x1b[2J" in lines[0], result.output


def test_no_space_for_the_metadata_is_one_line_and_resume_finishes(tmp_path, monkeypatch):
    import errno

    import nvfp4_convert.convert as convert_mod

    real = convert_mod._write_metadata

    def full(prep, dst):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst / "config.json"))

    dst = tmp_path / "out"
    monkeypatch.setattr(convert_mod, "_write_metadata", full)
    result = runner.invoke(app, ["run", str(REPO_FIXTURE), str(dst), "--quiet"])
    assert result.exit_code == 1
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "writing config.json failed: No space left on device" in lines[0]
    assert "--resume" in lines[0]
    monkeypatch.setattr(convert_mod, "_write_metadata", real)
    result = runner.invoke(app, ["run", str(REPO_FIXTURE), str(dst), "--quiet", "--resume"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "a", "b", "--workers", "abc"], "Invalid value for '--workers'"),
        (["run"], "Missing argument 'src'"),
        (["bogus"], "No such command 'bogus'"),
        (["plan", "a", "--policy", "nope"], "'nope' is not one of 'default', 'fp8', 'bf16'"),
    ],
)
def test_a_bad_command_line_is_one_line_and_exit_2(args, message):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "nvfp4_convert", *args], capture_output=True, text=True, timeout=120)
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    assert proc.returncode == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert "Traceback" not in proc.stderr


def test_a_run_and_its_report_with_markup_in_both_paths_finish(tmp_path):
    """Rich markup (``[bold]``) in SRC and DST paths: the report's text, the summary line and the notes print it as text."""
    import shutil

    src = tmp_path / "src[bold]x"
    shutil.copytree(REPO_FIXTURE, src)
    (src / "sub[red]y").mkdir()
    dst = tmp_path / "dst[red]z"
    result = runner.invoke(app, ["run", str(src), str(dst), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "dst[red]z" in result.output.replace("\n", "")
    assert "src[bold]x" in (dst / "nvfp4-convert-report.txt").read_text()
    plan = runner.invoke(app, ["plan", str(src)])
    assert plan.exit_code == 0 and "sub[red]y" in plan.output


RELEASE_FIXTURE = REPO_FIXTURE.parent / "tiny-dsv4-release"


def test_inspect_recognises_deepseek_release_and_run_refuses_it(tmp_path):
    result = runner.invoke(app, ["inspect", str(RELEASE_FIXTURE), "--json", str(tmp_path / "i.json")])
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())
    assert "DeepSeek's native release format" in flat and "MTP block of 1 layer(s)" in flat
    info = json.loads((tmp_path / "i.json").read_text())
    assert info["naming"] == "native" and info["mtp_layers"] == 1 and not info["unknown_tensors"]
    assert {"role": "routed_expert", "format": "mxfp4", "modules": 60} in info["formats"]
    result = runner.invoke(app, ["run", str(RELEASE_FIXTURE), str(tmp_path / "out")])
    assert result.exit_code != 0
    assert "DeepSeek's native release format" in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()
