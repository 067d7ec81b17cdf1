"""The whole ``run``: SRC (read-only) -> DST, in the order that keeps an unfinished DST recognisable.

1. Open and validate SRC (headers, index, config), classify every tensor, build the plan and the
   output config: any problem stops here, before DST is touched.
2. Check DST (not SRC or inside it, empty / our unfinished run with ``resume``, writable, enough
   free space), take its lock, record the plan fingerprint.
3. Write the shards (skipping those the journal lists as finished on ``resume``).
4. Write the index, ``config.json``, ``hf_quant_config.json``, the other files of SRC (hard-linked,
   copied where linking fails), then the report, and remove the state directory last.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import direct_io, formats, model_shapes
from .checkpoint import INDEX_NAME, Checkpoint
from .config_emit import hf_quant_config, vllm_config
from .errors import ConvertError
from .execute import PHASES, Progress, ShardResult, write_shards
from .graft import REPLACED_REASON, Graft, graft, graft_errors
from .inventory import Inventory, Role, build_inventory, source_format
from .mtp import MTP_REPLACED_REASON, MtpBlock, has_mtp, take_mtp
from .options import IOMode
from .plan import DEFAULT_SHARD_BYTES, Account, Plan, build_plan
from .policy import ExpertFormat, Policy, Target
from .report import REPORT_JSON, REPORT_TEXT, render_text, report_dict
from .safetensors_io import check_readable, write_file_atomic
from .state import (
    JOURNAL,
    STATE_DIR,
    RunState,
    destination_lock,
    dst_status,
    header_digest,
    plan_fingerprint,
    read_journal,
    source_identity,
)


@dataclass
class Prepared:
    """Everything decided before a byte is written."""

    ckpt: Checkpoint
    inventory: Inventory
    plan: Plan
    config: dict
    graft: Graft | None = None
    mtp: MtpBlock | None = None
    inputs: dict = field(default_factory=dict)  # what else decided the plan (``plan_inputs``), for the report


def plan_inputs(
    attention_from: Path | None, mtp_from: Path | None, pass_unknown: bool, policy: Policy
) -> dict[str, str | bool | None]:
    """The options besides SRC that decide the plan, as the report records them (absolute paths): ``verify --source``
    rebuilds the same plan from them (``prepare_from_report``)."""
    return {
        "attention_from": str(attention_from.absolute()) if attention_from else None,
        "mtp_from": str(mtp_from.absolute()) if mtp_from else None,
        "pass_unknown": pass_unknown,
        "mtp_experts": policy.mtp_experts,
    }


def prepare(
    src: Path,
    policy: Policy,
    *,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    pass_unknown: bool = False,
    attention_from: Path | None = None,
    allow_outside_links: bool = False,
    mtp_from: Path | None = None,
) -> Prepared:
    """Open SRC (and REF), classify, plan and derive the output config (headers and scalar scales only; with an MTP
    block to re-encode, its routed experts are read once to choose their NVFP4 global scales).

    ``mtp_from``: the whole MTP block from this reference (``mtp.take_mtp``); ``attention_from`` brings REF's MTP
    block too when SRC has none and REF has one."""
    ckpt = Checkpoint.open(src, allow_outside_links=allow_outside_links)
    inv = build_inventory(ckpt, pass_unknown=pass_unknown)
    if (fmt := source_format(inv)) is not None:
        raise ConvertError(f"{fmt}: not a ModelOpt NVFP4 export; converting it is not supported yet", file=ckpt.path)
    refuse_unconverted_formats(inv)
    model_shapes.check(inv, ckpt.config)
    g = (
        graft(ckpt.config, inv, attention_from, allow_outside_links=allow_outside_links)
        if attention_from is not None
        else None
    )
    block = None
    if mtp_from is not None:
        block = take_mtp(ckpt.config, inv, mtp_from, allow_outside_links=allow_outside_links)
    elif attention_from is not None and not has_mtp(inv):
        block = take_mtp(ckpt.config, inv, attention_from, required=False, allow_outside_links=allow_outside_links)
    planned = g.inventory if g else inv
    if block is not None:
        kept = {n: m for n, m in planned.modules.items() if not n.startswith("mtp.")}
        planned = Inventory(planned.naming, kept | block.modules, planned.unknown, planned.kv_cache_scales)
    plan = build_plan(planned, policy, ckpt.path, shard_bytes=shard_bytes)
    if g is not None and attention_from is not None:
        mark_grafted(plan, g, attention_from)
    config_source = ckpt.config
    if block is not None:
        mark_mtp(plan, block)
        config_source = {**ckpt.config, "num_nextn_predict_layers": block.layers}
    for name, what in ckpt.not_carried.items():
        plan.notes.append(f"{what} {name} of the source is not carried over (not part of the checkpoint)")
    if ckpt.links:
        plan.followed_links = ckpt.links
        plan.notes.append(f"{len(ckpt.links)} symlink(s) in the source followed (the report's followed_links)")
    config = vllm_config(config_source, plan.ignored_layers)
    return Prepared(ckpt, inv, plan, config, g, block, plan_inputs(attention_from, mtp_from, pass_unknown, policy))


def prepare_from_report(src: Path, report: dict, *, allow_outside_links: bool = False) -> Prepared:
    """``prepare`` SRC as the run that wrote ``report`` (its policy and ``inputs``) did: the plan it executed. A report
    from before ``inputs`` was recorded gives the plan of its policy alone."""
    try:
        inputs = report.get("inputs") or {}
        policy = Policy(report["policy"]["name"], report["policy"]["experts"], inputs.get("mtp_experts"))
        refs = {k: Path(inputs[k]) for k in ("attention_from", "mtp_from") if inputs.get(k) is not None}
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise ConvertError(f"the report does not say how the plan was made ({type(e).__name__}: {e})") from None
    for key, ref in refs.items():
        if not ref.exists():
            raise ConvertError(
                f"the output was converted with --{key.replace('_', '-')} {ref} (its report says so); "
                "that reference is needed to rebuild the plan and is not there",
                file=ref,
            )
    return prepare(
        src,
        policy,
        pass_unknown=bool(inputs.get("pass_unknown")),
        allow_outside_links=allow_outside_links,
        **refs,
    )


def refuse_unconverted_formats(inv: Inventory) -> None:
    """Stop at the first linear whose format ``run`` does not convert yet (``Format.run_source``), naming it."""
    converted = ", ".join(f.label for f in formats.ALL if f.run_source)
    for m in inv.linears():
        fmt = formats.FORMATS[m.format]
        if not fmt.run_source:
            w = m.params["weight"]
            raise ConvertError(
                f"{fmt.label} linear: run does not convert this format yet ({converted} do)",
                file=w.file,
                tensor=w.name,
            )


def mark_grafted(plan: Plan, g: Graft, ref: Path) -> None:
    """Tag the tensors taken from REF and account for the SRC tensors they replace."""
    from_ref = {t.name for m in g.replaced for t in g.reference.modules[m.name].params.values()}
    plan.accounts = [replace(a, origin="reference") if a.source in from_ref else a for a in plan.accounts]
    for m in g.replaced:
        for t in m.params.values():
            plan.accounts.append(Account(t.name, "dropped", (), REPLACED_REASON, m.role.value, t.nbytes))
    plan.reference = ref
    plan.notes.append(f"{len(g.replaced)} non-expert linear(s) taken from the reference {ref}")


def mark_mtp(plan: Plan, block: MtpBlock) -> None:
    """Tag the tensors taken from REF's MTP block and account for the SRC mtp.* tensors they replace."""
    from_ref = {t.name for m in block.modules.values() for t in m.params.values()}  # SRC's mtp.* were not planned
    plan.accounts = [replace(a, origin="reference") if a.source in from_ref else a for a in plan.accounts]
    for m in block.replaced:
        for t in m.params.values():
            plan.accounts.append(Account(t.name, "dropped", (), MTP_REPLACED_REASON, m.role.value, t.nbytes))
    plan.mtp_reference = block.reference
    plan.notes = [n for n in plan.notes if not n.startswith("no MTP block")]
    written = sum(1 for o in plan.outputs if o.name.startswith("mtp."))
    plan.notes.append(
        f"MTP block ({block.layers} layer(s), {written} tensors) taken whole from the reference {block.reference}"
        + (f"; {block.unread} other mtp.* tensor(s) of the reference not needed, not read" if block.unread else "")
    )
    weights = [o for o in plan.outputs if o.name.startswith("mtp.") and ".ffn.experts." in o.name]
    experts = [m for m in block.modules.values() if m.role == Role.ROUTED_EXPERT]
    params = sum(m.shape[0] * m.shape[1] for m in experts)  # logical [out, in], whatever REF's format
    bf16 = (plan.policy.mtp_experts or plan.policy.experts) == ExpertFormat.BF16.value
    nbytes = sum(o.nbytes for o in weights)
    other = ("NVFP4", params * 9 // 16 + 8 * len(experts)) if bf16 else ("BF16", params * 2)
    plan.notes.append(
        f"MTP routed experts {'BF16' if bf16 else 'NVFP4'}: {nbytes / 1e6:.3f} MB ({other[0]} would be "
        f"{other[1] / 1e6:.3f} MB)"
    )
    lost = sum(n for r in plan.reencoded for n in r.requantized.values())
    if plan.reencoded:
        plan.notes.append(
            f"{len(plan.reencoded)} MTP routed expert(s) re-encoded MXFP4 -> NVFP4: "
            + (f"{lost} 32-block(s) more than 17 binades below their tensor's top re-quantized" if lost else "exact")
        )


def is_same_or_inside(dst: Path, src: Path) -> bool:
    """Whether DST is SRC or below it, decided by device and inode (bind mounts, symlinked parents, ``..``).

    DST's nearest existing folder is resolved as the kernel resolves it, and it and each folder above it is compared
    with SRC by (device, inode); path strings never are.
    """
    s = src.stat()
    existing = dst if dst.is_absolute() else Path.cwd() / dst
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent  # DST (or folders above it) not created yet
    real = Path(os.path.realpath(existing))
    for p in (real, *real.parents):
        st = p.stat()
        if (st.st_dev, st.st_ino) == (s.st_dev, s.st_ino):
            return True
    return False


def check_destination(src: Path, dst: Path, *, resume: bool, needed_bytes: int) -> None:
    """Refuse a DST that would overwrite or sit inside SRC, hold other data, or not fit."""
    if is_same_or_inside(dst, src):
        raise ConvertError("destination is the source or inside it; the source is never written", file=dst)
    status = dst_status(dst)
    if status == "finished":
        raise ConvertError("destination already holds a finished conversion; remove it or choose another", file=dst)
    if status == "foreign":
        raise ConvertError("destination exists and is not empty (and is not an unfinished nvfp4-convert run)", file=dst)
    if status == "unfinished" and not resume:
        raise ConvertError("destination holds an unfinished run: add --resume to continue it", file=dst)
    parent = dst if dst.exists() else dst.parent
    if not parent.exists():
        raise ConvertError("parent directory does not exist", file=parent)
    if not writable(parent):
        raise ConvertError("not writable", file=parent)
    free = shutil.disk_usage(parent).free
    if free < needed_bytes:
        raise ConvertError(f"needs {needed_bytes / 1e9:.2f} GB, only {free / 1e9:.2f} GB free", file=parent)


def writable(path: Path) -> bool:
    """Whether this process may create files in ``path``."""
    return os.access(path, os.W_OK)


def run(
    src: Path,
    dst: Path,
    policy: Policy,
    *,
    workers: int = 1,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    resume: bool = False,
    pass_unknown: bool = False,
    attention_from: Path | None = None,
    progress: Progress | None = None,
    prepared: Prepared | None = None,
    io: str = "auto",
    allow_outside_links: bool = False,
    mtp_from: Path | None = None,
    prefetched: dict | None = None,
) -> dict:
    """Convert SRC into DST; returns the report dict.

    ``io``: ``direct`` (``O_DIRECT``: no page cache), ``buffered`` (page cache, ``copy_file_range``)
    or ``auto`` (direct where both filesystems accept it, reading from the page cache what is there already:
    whole files there, and every chunk of the others found there). The bytes written are the same.
    ``prefetched``: what a ``prefetch.Prefetch`` read of SRC while the run started (its ``summary()``), for the report.
    """
    t0 = time.monotonic()
    prep = prepared or prepare(
        src,
        policy,
        shard_bytes=shard_bytes,
        pass_unknown=pass_unknown,
        attention_from=attention_from,
        allow_outside_links=allow_outside_links,
        mtp_from=mtp_from,
    )
    if io not in IO_MODES:
        raise ConvertError(f"unknown I/O mode {io!r} (one of {', '.join(IO_MODES)})")
    if is_same_or_inside(dst, src):  # before anything is created
        raise ConvertError("destination is the source or inside it; the source is never written", file=dst)
    if not dst.parent.exists():
        raise ConvertError("parent directory does not exist", file=dst.parent)
    created = not dst.exists()
    if created:
        try:
            dst.mkdir()
        except OSError as e:
            raise ConvertError(f"cannot create: {e.strerror}", file=dst) from e
    locked = False
    try:
        with destination_lock(dst):
            locked = True
            return _run_locked(
                src,
                dst,
                prep,
                t0=t0,
                resume=resume,
                workers=workers,
                io=io,
                progress=progress,
                created=created,
                prefetched=prefetched,
            )
    except BaseException:
        # refused before a byte was written: leave no trace (never for a DST another run holds)
        if created and locked and dst_status(dst) == "empty":
            dst.rmdir()
        raise


def _run_locked(
    src: Path,
    dst: Path,
    prep: Prepared,
    *,
    t0: float,
    resume: bool,
    workers: int,
    io: str,
    progress: Progress | None,
    created: bool,
    prefetched: dict | None = None,
) -> dict:
    """``run`` once DST is locked: its state is read and written by this process alone."""
    plan = prep.plan
    done_bytes = _already_written(dst, plan) if resume else 0
    check_destination(src, dst, resume=resume, needed_bytes=plan.output_bytes - done_bytes)
    status = "missing" if created else dst_status(dst)
    inputs = prep.ckpt.shards + (prep.graft.shards if prep.graft else []) + (prep.mtp.shards if prep.mtp else [])
    with RunState(dst, plan_fingerprint(plan), resume=resume, sources=source_identity(inputs)) as state:
        try:
            direct = use_direct_io(io, dst / STATE_DIR, plan)  # probed inside the state dir: no stray file
        except ConvertError:
            if status in ("missing", "empty"):  # nothing was written yet: not "unfinished"
                state.remove()
            raise
        for stale in dst.glob("*.partial"):  # left by a killed run; never part of a finished shard
            stale.unlink()
        finished = state.finished()
        todo = []
        for shard in plan.shards:
            entry = finished.get(shard.file)
            path = dst / shard.file
            if (
                entry
                and path.exists()
                and path.stat().st_size == entry["size"]
                and entry["header_sha256"] == header_digest(shard.entries)
            ):
                if progress:
                    progress(shard.nbytes, len(shard.outputs))
                continue
            todo.append(shard)
        digests = {s.file: header_digest(s.entries) for s in todo}

        names = {s.file: [o.name for o in s.outputs] for s in todo}

        def on_done(res: ShardResult) -> None:
            check_readable(dst / res.file, names[res.file])  # read back by safetensors before it is journalled
            state.record(res.file, res.size, digests[res.file])

        cached = cached_sources(plan) if direct and io == "auto" else frozenset()
        t_start = time.monotonic()
        try:
            results = write_shards(
                todo,
                dst,
                workers=workers,
                direct=direct,
                cached=cached,
                probe_cache=direct and io == "auto",  # chunks a prefetch (or anything) put in the page cache
                progress=progress,
                on_done=on_done,
            )
        except OSError as e:
            raise ConvertError(f"write failed: {e.strerror or e}; free space and rerun with --resume", file=dst) from e
        t_shards = time.monotonic() - t0
        errors = graft_errors(prep.graft, {o.name: o.op for o in plan.outputs}) if prep.graft else None
        timing = {
            "seconds": round(time.monotonic() - t0, 3),
            "shards_seconds": round(t_shards, 3),
            "io": "direct" if direct else "buffered",
            "reads_through_page_cache": sorted(p.name for p in cached),
            "bytes_read_from_page_cache": sum(r.cached_bytes for r in results),
            **({"prefetch": prefetched} if prefetched else {}),
            "phases": {
                "prepare": round(t_start - t0, 3),
                **{k: round(sum(r.seconds.get(k, 0.0) for r in results), 3) for k in PHASES if k != "wall"},
                "shards": round(t_shards - (t_start - t0), 3),
            },
        }
        try:
            _write_metadata(prep, dst)
            timing["phases"]["metadata"] = round(time.monotonic() - t0 - t_shards, 3)
            report = report_dict(plan, dst=str(dst), timing=timing, graft_errors=errors, inputs=prep.inputs)
            write_file_atomic(dst / REPORT_TEXT, render_text(plan, graft_errors=errors).encode())
            write_file_atomic(dst / REPORT_JSON, json.dumps(report, indent=1).encode())
        except OSError as e:  # the shards are journalled: a rerun with --resume writes only what is missing
            raise ConvertError(
                f"writing {Path(e.filename).name if e.filename else 'metadata'} failed: {e.strerror or e}; "
                "free space and rerun with --resume",
                file=dst,
            ) from e
        state.remove()
    return report


IO_MODES = tuple(m.value for m in IOMode)


def use_direct_io(io: str, directory: Path, plan: Plan) -> bool:
    """Resolve ``io`` (see ``run``) for a directory of DST and one file of each directory copies read from."""
    if io == "buffered":
        return False
    samples = {o.sources[0].file.parent: o.sources[0].file for o in plan.outputs if o.op == "copy"}
    refusals = [direct_io.refusal(directory, f) for f in samples.values()] or [direct_io.refusal(directory)]
    why = next((r for r in refusals if r), None)
    if io == "direct" and why:
        raise ConvertError(f"O_DIRECT refused ({why}); use --io buffered", file=directory.parent)
    return why is None


def cached_sources(plan: Plan) -> frozenset[Path]:
    """The source files that copies read and that are wholly in the page cache already (``mincore``):
    read from memory, not again from the disk with ``O_DIRECT`` (ModelOpt has just written them, say).
    ``direct_io.read_from_cache``, the rule ``verify`` uses too."""
    files = {o.sources[0].file for o in plan.outputs if o.op == "copy"}
    return direct_io.read_from_cache(files)


def _already_written(dst: Path, plan: Plan) -> int:
    """Bytes of the plan's shards that DST's journal lists as finished (read before DST's state is taken)."""
    names = read_journal(dst / STATE_DIR / JOURNAL)
    return sum(s.nbytes for s in plan.shards if s.file in names)


def _write_metadata(prep: Prepared, dst: Path) -> None:
    plan = prep.plan
    index = {"metadata": {"total_size": plan.output_bytes}, "weight_map": plan.weight_map()}
    write_file_atomic(dst / INDEX_NAME, json.dumps(index, indent=2).encode())
    write_file_atomic(dst / "config.json", json.dumps(prep.config, indent=2).encode())
    experts = sorted(
        m.name for m in prep.inventory.linears(Role.ROUTED_EXPERT) if plan.policy.target(m) == Target.NVFP4
    )
    write_file_atomic(
        dst / "hf_quant_config.json", json.dumps(hf_quant_config(experts, plan.ignored_layers), indent=2).encode()
    )
    for f in prep.ckpt.other_files:
        link_or_copy(f, dst / f.name)


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst`` (same filesystem), else copy it; replaces ``dst``.

    A symlinked ``src`` (a Hugging Face cache snapshot) is resolved first: link(2) would link the symlink itself,
    leaving DST a relative link that dangles there.
    """
    src = src.resolve()
    if dst.exists() and os.path.samefile(src, dst):
        return  # linked by an earlier (interrupted) run; rename(2) onto the same inode would be a no-op
    tmp = dst.with_name(dst.name + ".partial")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)
