"""``nvfp4-convert``: the command line. Thin: parse, call the library, print with Rich.

Commands: ``run`` (convert), ``plan`` (what run would do, writes nothing), ``inspect`` (what a
checkpoint holds), ``demo`` (convert the tiny fixture shipped in the repo into a temporary folder).
Every ``ConvertError`` becomes one red line and exit code 1. Options with a fixed set of values (``--policy``,
``--experts``, ``--io``) are enums (``policy.Preset``, ``policy.ExpertFormat``, ``convert.IOMode``): Typer refuses
any other value before a command runs, in one line with exit code 2 (``main_entry``).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from . import __version__
from .errors import ConvertError
from .options import ExpertFormat, IOMode, Preset, Thresholds
from .plots import graft_series, layer_series, plot_layer_series, require_matplotlib
from .prefetch import Prefetch
from .preflight.faults import FAULTS
from .probe import probe_cmd

if TYPE_CHECKING:
    from .convert import Prepared
    from .plan import Plan

# The library (torch) is imported by the commands that use it, not here: ``--help`` answers at once, and ``run``
# starts reading the source (``Prefetch``) while torch is being imported.

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,  # every expected error is one line (main_entry); anything else a plain traceback
    no_args_is_help=True,
    help="Rewrite a ModelOpt NVFP4 DeepSeek-V4 checkpoint into the hybrid checkpoint stock vLLM serves.",
)
console = Console(stderr=True)
out = Console()

DEMO_FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tiny-dsv4"

PolicyOpt = Annotated[Preset, typer.Option("--policy", help="precision of the non-expert linears")]
ExpertsOpt = Annotated[
    ExpertFormat, typer.Option("--experts", help="routed experts: nvfp4 (keep bytes) or bf16 (dequantized reference)")
]
RefOpt = Annotated[
    Path | None,
    typer.Option("--attention-from", help="take every non-expert linear from this BF16/FP8 reference checkpoint"),
]
MtpOpt = Annotated[
    Path | None,
    typer.Option(
        "--mtp-from",
        help="write the whole MTP block (mtp.0.*) from this reference: DeepSeek's release (FP8 + MXFP4) or a BF16 "
        "cast of it; routed experts re-encoded MXFP4 -> NVFP4 exactly (--attention-from brings it too when SRC has none)",
    ),
]
MtpExpertsOpt = Annotated[
    ExpertFormat | None,
    typer.Option(
        "--mtp-experts",
        help="the MTP block's routed experts: nvfp4 (re-encoded from MXFP4) or bf16 (about 4x their NVFP4 size); "
        "default: as --experts",
    ),
]
JsonOpt = Annotated[Path | None, typer.Option("--json", help="also write the result as JSON to this file")]
LinksOpt = Annotated[
    bool,
    typer.Option("--allow-outside-links", help="follow symlinks in SRC that resolve outside it (listed in the report)"),
]


def literal(text: str) -> str:
    """``text`` safe to print on one line: control characters shown as escapes, Rich markup escaped."""
    return escape("".join(c if c.isprintable() else repr(c)[1:-1] for c in text))


def _error(text: str) -> None:
    """One red line; the text (paths, tensor names) printed literally, never read as Rich markup."""
    console.print(f"[bold red]error:[/] {literal(text)}", highlight=False, soft_wrap=True)


def _fail_cleanly(fn: Callable[[], Any], *, on_interrupt: str = "") -> Any:
    """Run ``fn``; every expected failure is one red line naming the file (and tensor), never a traceback."""
    try:
        return fn()
    except ConvertError as e:
        _error(str(e))
        raise typer.Exit(1) from None
    except ValueError as e:  # bad option values (sizes, preflight's options)
        _error(str(e))
        raise typer.Exit(2) from None
    except OSError as e:
        _error(f"{e.filename}: {e.strerror or e}" if e.filename else str(e.strerror or e))
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        console.print(f"[bold red]interrupted[/]{': ' + on_interrupt if on_interrupt else ''}", highlight=False)
        raise typer.Exit(130) from None


def parse_size(text: str) -> int:
    """``5GB``, ``500MB``, ``2GiB`` or a plain byte count."""
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    t = text.strip().lower()
    for suffix, mult in units.items():
        if t.endswith(suffix):
            return int(float(t[: -len(suffix)]) * mult)
    return int(t)


def _print_plan(plan: Plan) -> None:
    from .report import summary_tables

    out.print(f"[bold]{literal(str(plan.source))}[/] ({plan.naming} names)")
    out.print(plan.policy.describe())
    for table in summary_tables(plan):
        out.print(table)
    out.print(
        f"{len(plan.accounts)} input tensors -> {len(plan.outputs)} output tensors, "
        f"{plan.output_bytes / 1e9:.3f} GB in {len(plan.shards)} shard(s); "
        f"{len(plan.ignored_layers)} ignored_layers entries; {len(plan.fixes)} gate/up fix(es)"
    )
    for fix in plan.fixes:
        out.print(
            f"  gate/up fix {fix.expert}: w1 {fix.gate_scale_2:g} / w3 {fix.up_scale_2:g} -> {fix.rescaled} x {fix.ratio:.6g}"
            f" (its block scales {fix.scale_error:.2%} off the exact values)"
        )
    for note in plan.notes:
        out.print(f"[yellow]note:[/] {literal(note)}")


def _prepare(src: Path, choice: tuple[Preset, ExpertFormat, ExpertFormat | None], **options: Any) -> Prepared:
    """``convert.prepare``: read and plan SRC with the chosen ``--policy``, ``--experts`` and ``--mtp-experts``."""
    from .convert import prepare
    from .policy import Policy

    policy, experts, mtp_experts = choice
    return prepare(src, Policy(policy.value, experts.value, mtp_experts.value if mtp_experts else None), **options)


@app.command("plan")
def plan_cmd(
    src: Annotated[Path, typer.Argument(help="ModelOpt NVFP4 checkpoint directory")],
    policy: PolicyOpt = Preset.DEFAULT,
    experts: ExpertsOpt = ExpertFormat.NVFP4,
    shard_size: Annotated[str, typer.Option(help="target output shard size")] = "5GB",
    pass_unknown: Annotated[bool, typer.Option(help="pass unrecognised tensors through (loudly)")] = False,
    attention_from: RefOpt = None,
    mtp_from: MtpOpt = None,
    mtp_experts: MtpExpertsOpt = None,
    allow_outside_links: LinksOpt = False,
    json_out: JsonOpt = None,
) -> None:
    """Show what `run` would do, writing nothing."""

    def go() -> None:
        prep = _prepare(
            src,
            (policy, experts, mtp_experts),
            shard_bytes=parse_size(shard_size),
            pass_unknown=pass_unknown,
            attention_from=attention_from,
            allow_outside_links=allow_outside_links,
            mtp_from=mtp_from,
        )
        _print_plan(prep.plan)
        if json_out:
            from .report import report_dict

            json_out.write_text(json.dumps(report_dict(prep.plan), indent=1))

    _fail_cleanly(go)


@app.command("run")
def run_cmd(
    src: Annotated[Path, typer.Argument(help="ModelOpt NVFP4 checkpoint directory (read-only)")],
    dst: Annotated[Path, typer.Argument(help="output directory (new or empty; or an unfinished run with --resume)")],
    policy: PolicyOpt = Preset.DEFAULT,
    experts: ExpertsOpt = ExpertFormat.NVFP4,
    workers: Annotated[int, typer.Option(help="parallel worker processes (0 = half the cores)")] = 0,
    shard_size: Annotated[str, typer.Option(help="target output shard size")] = "5GB",
    resume: Annotated[bool, typer.Option(help="continue an unfinished run in DST")] = False,
    pass_unknown: Annotated[bool, typer.Option(help="pass unrecognised tensors through (loudly)")] = False,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
    attention_from: RefOpt = None,
    mtp_from: MtpOpt = None,
    mtp_experts: MtpExpertsOpt = None,
    allow_outside_links: LinksOpt = False,
    plot: Annotated[
        Path | None,
        typer.Option("--plot", help="with --attention-from: per-layer error, NVFP4-derived vs grafted (PNG)"),
    ] = None,
    io: Annotated[
        IOMode,
        typer.Option(
            help="direct (O_DIRECT, no page cache), buffered (page cache, copy_file_range), or auto: direct where accepted"
        ),
    ] = IOMode.AUTO,
) -> None:
    """Convert SRC into a checkpoint stock vLLM serves."""
    if plot is not None and attention_from is None:
        _error("--plot shows what --attention-from changed: give it a reference")
        raise typer.Exit(2)
    if plot is not None:
        _fail_cleanly(require_matplotlib)

    def go() -> None:
        # the disk reads the source's first bytes while torch is imported and the plan is made; ``run`` stops it
        warming = Prefetch.start(src) if io != IOMode.DIRECT else None  # direct: no page cache, as asked
        try:
            prep = _prepare(
                src,
                (policy, experts, mtp_experts),
                shard_bytes=parse_size(shard_size),
                pass_unknown=pass_unknown,
                attention_from=attention_from,
                allow_outside_links=allow_outside_links,
                mtp_from=mtp_from,
            )
        finally:
            if warming is not None:
                warming.stop()
        report = _run(prep, dst, workers=workers, resume=resume, quiet=quiet, io=io.value, warmed=warming)
        if plot is not None:
            panels = graft_series(report.get("graft_errors") or [])
            plot_layer_series(panels, plot, f"{src.name} grafted from {attention_from.name if attention_from else ''}")
            out.print(f"plot: {literal(str(plot))}")

    _fail_cleanly(go, on_interrupt="run the same command again with --resume to continue")


def _run(
    prep: Prepared,
    dst: Path,
    *,
    workers: int,
    resume: bool,
    quiet: bool,
    io: str = "auto",
    warmed: Prefetch | None = None,
) -> dict:
    """Run the prepared conversion into DST with a progress bar; print the summary line."""
    from .convert import run
    from .execute import default_workers

    if prep.inventory.unknown:
        console.print(
            f"[bold yellow]warning:[/] passing {len(prep.inventory.unknown)} unrecognised tensor(s) through: {sorted(prep.inventory.unknown)[:5]}"
        )
    workers = workers or default_workers()
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TextColumn("{task.fields[tensors]}/{task.fields[total_tensors]} tensors"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, disable=quiet) as progress:
        task = progress.add_task(
            "converting", total=prep.plan.output_bytes, tensors=0, total_tensors=len(prep.plan.outputs)
        )
        count = [0]

        def advance(nbytes: int, ntensors: int) -> None:
            count[0] += ntensors
            progress.update(task, advance=nbytes, tensors=count[0])

        report = run(
            prep.ckpt.path,
            dst,
            prep.plan.policy,
            workers=workers,
            resume=resume,
            progress=advance,
            prepared=prep,
            io=io,
            prefetched=warmed.summary() if warmed else None,
        )
    t = report["totals"]
    secs = report["timing"]["seconds"]
    out.print(
        f"[green]done[/]: {t['input_tensors']} input tensors -> {t['output_tensors']} output tensors, "
        f"{t['output_bytes'] / 1e9:.3f} GB in {t['shards']} shard(s), {secs:.1f} s "
        f"({t['output_bytes'] / 1e9 / max(secs, 1e-9):.2f} GB/s, {report['timing']['io']} I/O); "
        f"report: {literal(str(dst / 'nvfp4-convert-report.txt'))}"
    )
    return report


@app.command("inspect")
def inspect_cmd(
    path: Annotated[Path, typer.Argument(help="a source or converted checkpoint directory")],
    deep: Annotated[bool, typer.Option(help="also scan every block-scale tensor for NaN/Inf/negative/zero")] = False,
    json_out: JsonOpt = None,
) -> None:
    """What a checkpoint holds: naming, formats, layers, experts, MTP, scale problems."""

    def go() -> None:
        from .inspect import inspect_checkpoint

        info = inspect_checkpoint(path, deep=deep)
        out.print(
            f"[bold]{info['path']}[/]: {info['status']}, {info['naming']} names, quant_method {info['quant_method']}"
        )
        out.print(
            f"{info['tensors']} tensors, {info['bytes'] / 1e9:.3f} GB in {info['shards']} shard(s); {info['layers']} layers; "
            f"experts per layer {info['experts_per_layer']}; MTP {'present' if info['mtp'] else 'absent'}"
        )
        if info["source_format"]:
            mtp = f"an MTP block of {info['mtp_layers']} layer(s)" if info["mtp_layers"] else "no MTP block"
            out.print(f"[bold]format:[/] {info['source_format']}, with {mtp}")
        table = Table(title="Modules by role and storage format")
        for col in ("role", "format", "modules"):
            table.add_column(col)
        for row in info["formats"]:
            table.add_row(row["role"], row["format"], str(row["modules"]))
        out.print(table)
        out.print(f"gate/up global-scale mismatches: {len(info['gate_up_mismatches'])}")
        for m in info["gate_up_mismatches"][:20]:
            out.print(f"  {m['expert']}: w1 {m['w1']:g} vs w3 {m['w3']:g}")
        if info["bad_scales"] is not None:
            out.print(f"block-scale tensors with NaN/Inf/negative/zero entries: {len(info['bad_scales'])}")
            for b in info["bad_scales"][:20]:
                out.print(f"  {literal(str(b))}")
        if info["unknown_tensors"]:
            out.print(f"[yellow]tensors matching no naming rule:[/] {literal(str(info['unknown_tensors'][:20]))}")
        if info["status"] == "unfinished conversion":
            out.print("[bold red]this is an UNFINISHED conversion: resume it with `nvfp4-convert run ... --resume`[/]")
        if json_out:
            json_out.write_text(json.dumps(info, indent=1))

    _fail_cleanly(go)


@app.command("verify")
def verify_cmd(
    dst: Annotated[Path, typer.Argument(help="a converted checkpoint")],
    source: Annotated[Path | None, typer.Option("--source", help="the ModelOpt source it was converted from")] = None,
    reference: Annotated[
        Path | None, typer.Option("--reference", help="a BF16 reference checkpoint of the same model")
    ] = None,
    sample: Annotated[
        int | None, typer.Option(help="check at most N row blocks per tensor and N experts per layer")
    ] = None,
    max_rel_error: Annotated[
        float, typer.Option(help="reference: max relative Frobenius error")
    ] = Thresholds.max_rel_error,
    min_cosine: Annotated[float, typer.Option(help="reference: min cosine similarity")] = Thresholds.min_cosine,
    max_matmul_rel_error: Annotated[
        float, typer.Option(help="reference: max relative error of x @ W.T")
    ] = Thresholds.max_matmul_rel_error,
    show: Annotated[int, typer.Option(help="rows of the findings table")] = 25,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="with --reference: per-layer error of each module kind (PNG)")
    ] = None,
    json_out: JsonOpt = None,
    allow_outside_links: LinksOpt = False,
) -> None:
    """Check a converted checkpoint: structure for vLLM, values vs the source and/or a BF16 reference."""

    def go() -> None:
        from .verify import verify

        result = verify(
            dst,
            source=source,
            reference=reference,
            sample=sample,
            thresholds=Thresholds(
                max_rel_error=max_rel_error, min_cosine=min_cosine, max_matmul_rel_error=max_matmul_rel_error
            ),
            allow_outside_links=allow_outside_links,
            release_vllm=True,  # one command: vLLM's child ends once it has answered
        )
        table = Table(
            title=f"verify {literal(str(dst))}: {result['checks']} checks, {result['failed']} failed (worst first)"
        )
        for col in ("", "check", "tensor", "detail"):
            table.add_column(col)
        for f in result["findings"][:show]:
            metrics = ", ".join(f"{k} {v:.4g}" for k, v in f["metrics"].items())
            table.add_row(
                "[green]ok[/]" if f["ok"] else "[red]FAIL[/]",
                f["check"],
                literal(f["tensor"]),
                literal(" ".join(x for x in (f["detail"], metrics) if x)),
            )
        out.print(table)
        if json_out:
            json_out.write_text(json.dumps(result, indent=1))
        if plot is not None:
            series = layer_series(result["findings"])
            plot_layer_series({"": series}, plot, f"{dst.name} vs {reference.name if reference else '?'}")
            out.print(f"plot: {literal(str(plot))} ({len(series)} module kinds)")
        verdict = "[bold green]PASS[/]" if result["ok"] else f"[bold red]FAIL[/]: {result['failed']} check(s) failed"
        out.print(f"verdict: {verdict}")
        if not result["ok"]:
            raise typer.Exit(1)

    _fail_cleanly(go)


@app.command("demo")
def demo_cmd(
    policy: PolicyOpt = Preset.DEFAULT,
    experts: ExpertsOpt = ExpertFormat.NVFP4,
) -> None:
    """Convert the tiny ModelOpt fixture shipped in the repo into a temporary folder."""
    if not DEMO_FIXTURE.exists():
        console.print(
            f"[red]error:[/] demo fixture not found at {DEMO_FIXTURE} (install from a git checkout with `pip install -e .`)"
        )
        raise typer.Exit(1)
    dst = Path(tempfile.mkdtemp(prefix="nvfp4-convert-demo-")) / "out"
    out.print(f"[bold]demo[/]: {literal(str(DEMO_FIXTURE))} -> {literal(str(dst))}")

    def go() -> None:
        from .inspect import inspect_checkpoint

        prep = _prepare(DEMO_FIXTURE, (policy, experts, None))
        _print_plan(prep.plan)
        _run(prep, dst, workers=1, resume=False, quiet=True)
        info = inspect_checkpoint(dst)
        out.print(f"result: {info['status']}, {info['naming']} names, {info['tensors']} tensors; formats:")
        for row in info["formats"]:
            out.print(f"  {row['role']:<22} {row['format']:<7} {row['modules']}")

    _fail_cleanly(go)


app.command("probe")(probe_cmd)


@app.command("preflight")
def preflight_cmd(
    policy: PolicyOpt = Preset.DEFAULT,
    experts: ExpertsOpt = ExpertFormat.NVFP4,
    device: Annotated[str, typer.Option("--device", help="auto | cuda | cpu (vLLM's CPU build)")] = "auto",
    python: Annotated[str, typer.Option("--python", help="the interpreter that has vLLM")] = sys.executable,
    tensor_parallel_size: Annotated[int, typer.Option("--tensor-parallel-size", min=1)] = 1,
    enable_expert_parallel: Annotated[bool, typer.Option("--enable-expert-parallel")] = False,
    planted_fault: Annotated[
        str | None, typer.Option("--planted-fault", help=f"plant one fault to see a FAIL: {', '.join(FAULTS)}")
    ] = None,
    max_num_seqs: Annotated[int, typer.Option("--max-num-seqs", min=1, help="vLLM's batch of sequences")] = 8,
    gpu_memory_utilization: Annotated[
        float,
        typer.Option(
            "--gpu-memory-utilization", min=0.05, max=0.95, help="vLLM's share of each GPU (several checks at once)"
        ),
    ] = 0.3,
    cuda_graphs: Annotated[
        bool, typer.Option("--cuda-graphs", help="compile and capture CUDA graphs as a server does (slower start)")
    ] = False,
    hidden_size: Annotated[
        int | None,
        typer.Option("--hidden-size", help="diagnosis: the model's hidden size (multiple of 128; on CUDA of 2048)"),
    ] = None,
    prompt_lengths: Annotated[
        str | None, typer.Option("--prompt-lengths", help="diagnosis: prompt lengths, e.g. 1,8,600")
    ] = None,
    mtp: Annotated[
        bool,
        typer.Option(
            "--mtp",
            help="also convert an MTP block (--mtp-from) and decode with MTP speculative decoding: the tokens must "
            "be exactly the same (CUDA only; a second vLLM start)",
        ),
    ] = False,
    workdir: Annotated[
        Path | None, typer.Option("--workdir", help="keep the model, vLLM's log and results here")
    ] = None,
    json_path: JsonOpt = None,
) -> None:
    """Before converting: does the vLLM installed here compute this format correctly on this hardware?

    Builds a tiny random DeepSeek-V4 in ModelOpt's NVFP4 format, converts it, runs stock vLLM on it and scores
    vLLM's greedy decode against transformers in float32 on the same weights. Exit 0 PASS; 1 FAIL, or vLLM failed
    on the model; 2 cannot run here (or a bad option).
    """
    if device not in ("auto", "cuda", "cpu"):
        _error(f"unknown device {device!r} (auto, cuda or cpu)")
        raise typer.Exit(2)
    from .preflight.check import Options as PreflightOptions
    from .preflight.check import Unavailable, preflight

    opts = PreflightOptions(
        policy=policy.value,
        experts=experts.value,
        device=device,
        python=python,
        tensor_parallel_size=tensor_parallel_size,
        enable_expert_parallel=enable_expert_parallel,
        planted_fault=planted_fault,
        max_num_seqs=max_num_seqs,
        gpu_memory_utilization=gpu_memory_utilization,
        cuda_graphs=cuda_graphs,
        hidden_size=hidden_size,
        prompt_lengths=_int_list(prompt_lengths, "--prompt-lengths"),
        mtp=mtp,
        workdir=workdir,
    )

    def go() -> dict:
        try:
            return preflight(opts, say=lambda m: console.print(m, highlight=False))
        except Unavailable as e:  # not a verdict: this machine cannot run the check
            console.print(f"[bold red]cannot run:[/] {literal(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    result = _fail_cleanly(go)  # a bad option value exits 2, vLLM failing on the model 1
    _print_preflight(result)
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=2))
    if result["verdict"] != "PASS":
        raise typer.Exit(1)


def _int_list(text: str | None, option: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        _error(f"{option} {text!r}: comma-separated integers expected")
        raise typer.Exit(2) from None


def _print_preflight(r: dict) -> None:
    env = r["environment"]
    table = Table(
        title=f"preflight: vLLM {env['vllm']} on {env['gpu'] or 'CPU'}, policy {r['policy']}, experts {r['experts']}"
    )
    table.add_column("pass")
    table.add_column("greedy steps agreeing", justify="right")
    table.add_column("per prompt")
    table.add_column("median |dlogp|", justify="right")
    table.add_column("max |dlogp|", justify="right")
    table.add_column("counts")
    for name in ("decode", "prefill", "decode_vs_prefill"):
        a = r[name]
        table.add_row(
            name.replace("_", " "),
            f"{a['agreeing']}/{a['steps']}" + (f" ({a['near_ties']} near-ties)" if a["near_ties"] else ""),
            str(a["per_prompt"]),
            f"{a['median_abs_dlogp']:.4f}",
            f"{a['max_abs_dlogp']:.4f}",
            {"decode": "verdict", "prefill": "reported", "decode_vs_prefill": "vLLM vs itself"}[name],
        )
    if r.get("mtp"):
        table.add_row(*_mtp_row(r["mtp"]))
    out.print(table)
    for line in r["backends"][:12]:
        out.print(f"  [dim]{literal(line)}[/]", highlight=False)
    fault = f" (planted fault {r['planted_fault']})" if r["planted_fault"] else ""
    colour = "green" if r["verdict"] == "PASS" else "red"
    out.print(f"verdict: [bold {colour}]{r['verdict']}[/]{fault}")


def _mtp_row(m: dict) -> tuple[str, ...]:
    """The table line of ``preflight --mtp``: greedy tokens with MTP speculative decoding against without it."""
    same, acc = m["same_tokens"], m.get("acceptance") or {}
    steps = sum(same["per_prompt"])  # identical up to each prompt's first difference
    counts = "exact: verdict"
    if "draft_tokens" in acc:
        counts += f"; accepted {acc.get('accepted_tokens', 0)}/{acc['draft_tokens']} drafts"
    d = same["first_difference"]
    where = "" if d is None else f" (first differs: prompt {d['prompt']} step {d['step']})"
    return ("mtp vs plain", f"{steps}/{same['steps']} identical{where}", str(same["per_prompt"]), "", "", counts)


@app.callback(invoke_without_command=True)
def main(version: Annotated[bool, typer.Option("--version", help="print the version")] = False) -> None:
    if version:
        out.print(__version__)
        raise typer.Exit()


def _click_classes(name: str) -> tuple[type[BaseException], ...]:
    """``name`` (UsageError, Abort) of click and of the click that newer Typer releases vendor."""
    found = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        with contextlib.suppress(ImportError, AttributeError):
            found.append(getattr(importlib.import_module(module), name))
    return tuple(found)


def main_entry() -> NoReturn:
    """The console script (and ``python -m nvfp4_convert``): ``main``'s exit code, without the interpreter's teardown.

    With torch loaded that teardown takes ~0.6 s on the VM of BENCHMARKS.md and has nothing left to do: every file
    is written, fsynced and renamed, every worker, thread and child process ended (vLLM's mapper child ends when its
    input closes), and the output is flushed here. An unexpected exception still ends the usual way, with its
    traceback."""
    code = _main()
    names = sys.modules.get(f"{__package__}.vllm_names")  # atexit does not run: end verify's vLLM child here
    if names is not None:
        names.close()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe (``| head``) has nothing left to flush into
            stream.flush()
    os._exit(code)


def _main() -> int:
    """The Typer app, its usage errors (a bad or missing value) one line like every error."""
    usage_errors, aborts = _click_classes("UsageError"), _click_classes("Abort")
    try:
        code = app(standalone_mode=False)
    except usage_errors as e:
        if not e.format_message():  # no arguments at all: the help was printed, nothing to add
            return 2
        ctx = getattr(e, "ctx", None)
        where = ctx.command_path if ctx is not None else "nvfp4-convert"
        console.print(
            f"[bold red]error:[/] {literal(e.format_message())} (see {where} --help)", highlight=False, soft_wrap=True
        )
        return 2
    except (*aborts, KeyboardInterrupt):
        console.print("[bold red]interrupted[/]", highlight=False)
        return 130
    return code if isinstance(code, int) else 0


if __name__ == "__main__":  # pragma: no cover
    main_entry()
