"""The conversion report: a machine-readable JSON and a readable summary, both from the plan.

``plan_summary(plan)`` groups every source tensor by (role, action) with counts and bytes in, and
every output tensor by (role, dtype) with counts and bytes out. ``report_dict`` adds the
per-tensor accounting (every input tensor: action, outputs, reason; tensors taken from a reference marked
``from``), deliberate drops, gate/up fixes, MTP experts re-encoded from MXFP4, notes and ``ignored_layers``. ``render_text`` is the human summary written beside the JSON.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from rich.console import Console
from rich.table import Table

from .plan import Plan, human_bytes

REPORT_JSON = "nvfp4-convert-report.json"
REPORT_TEXT = "nvfp4-convert-report.txt"


def plan_summary(plan: Plan) -> dict[str, Any]:
    by_action: dict[tuple[str, str, str], list[int]] = {}
    for a in plan.accounts:
        row = by_action.setdefault((a.role, a.origin, a.action), [0, 0])
        row[0] += 1
        row[1] += a.nbytes
    role_of_output = {o: a.role for a in plan.accounts for o in a.outputs}
    by_output: dict[tuple[str, str, str], list[int]] = {}
    for o in plan.outputs:
        row = by_output.setdefault((role_of_output.get(o.name, "?"), o.op, o.dtype), [0, 0])
        row[0] += 1
        row[1] += o.nbytes
    return {
        "inputs": [
            {"role": r, "from": origin, "action": act, "tensors": c, "bytes": b}
            for (r, origin, act), (c, b) in sorted(by_action.items())
        ],
        "outputs": [
            {"role": r, "op": op, "dtype": dt, "tensors": c, "bytes": b}
            for (r, op, dt), (c, b) in sorted(by_output.items())
        ],
    }


def report_dict(
    plan: Plan,
    *,
    dst: str | None = None,
    timing: dict[str, float] | None = None,
    graft_errors: list[dict] | None = None,
    inputs: dict | None = None,
) -> dict[str, Any]:
    actions = Counter(a.action for a in plan.accounts)
    return {
        "tool": "nvfp4-convert",
        "source": str(plan.source),
        "reference": str(plan.reference) if plan.reference else None,
        "destination": dst,
        "naming": plan.naming,
        "policy": {"name": plan.policy.name, "experts": plan.policy.experts, "min_vllm": plan.policy.min_vllm},
        "inputs": inputs or {},  # the other options that decided the plan (``convert.plan_inputs``)
        "totals": {
            "input_tensors": len(plan.accounts),
            "input_bytes": plan.source_bytes,
            "output_tensors": len(plan.outputs),
            "output_bytes": plan.output_bytes,
            "shards": len(plan.shards),
            "actions": dict(sorted(actions.items())),
        },
        "timing": timing or {},
        "summary": plan_summary(plan),
        "dropped": [{"source": a.source, "reason": a.reason} for a in plan.accounts if a.action == "dropped"],
        "gate_up_fixes": [f.__dict__ for f in plan.fixes],
        "notes": list(plan.notes),
        "followed_links": dict(plan.followed_links),
        "ignored_layers": list(plan.ignored_layers),
        "graft_errors": graft_errors,
        "mtp_reference": str(plan.mtp_reference) if plan.mtp_reference else None,
        "mtp_reencoded": [
            {
                "expert": r.expert,
                "gate_up_global_scale": f"2^{r.gate_up_exponent}",
                "down_global_scale": f"2^{r.down_exponent}",
                "requantized_blocks": dict(r.requantized),
            }
            for r in plan.reencoded
        ],
        "tensors": [
            {
                "source": a.source,
                "action": a.action,
                "outputs": list(a.outputs),
                **({"reason": a.reason} if a.reason else {}),
                **({"from": a.origin} if a.origin != "source" else {}),
            }
            for a in plan.accounts
        ],
    }


def summary_tables(plan: Plan) -> list[Table]:
    """Rich tables: inputs by role/action, outputs by role/op/dtype."""
    summary = plan_summary(plan)
    t_in = Table(title="Input tensors: what happens to them")
    for col in ("role", "from", "action", "tensors", "bytes in"):
        t_in.add_column(col, justify="right" if col in ("tensors", "bytes in") else "left")
    for row in summary["inputs"]:
        t_in.add_row(row["role"], row["from"], row["action"], str(row["tensors"]), human_bytes(row["bytes"]))
    t_out = Table(title="Output tensors")
    for col in ("role", "op", "dtype", "tensors", "bytes out"):
        t_out.add_column(col, justify="right" if col in ("tensors", "bytes out") else "left")
    for row in summary["outputs"]:
        t_out.add_row(row["role"], row["op"], row["dtype"], str(row["tensors"]), human_bytes(row["bytes"]))
    return [t_in, t_out]


def render_text(plan: Plan, *, width: int = 110, graft_errors: list[dict] | None = None) -> str:
    """The readable report (plain text, no colour)."""
    # markup off: paths, notes and tensor names are printed literally (a "[/x]" in a path is text, not a tag)
    console = Console(width=width, record=True, file=open("/dev/null", "w"), color_system=None, markup=False)  # noqa: SIM115
    console.print(f"nvfp4-convert: {plan.source} ({plan.naming} names)")
    console.print(plan.policy.describe())
    console.print(
        f"{len(plan.accounts)} input tensors ({human_bytes(plan.source_bytes)}) -> {len(plan.outputs)} output tensors "
        f"({human_bytes(plan.output_bytes)}) in {len(plan.shards)} shard(s)"
    )
    for table in summary_tables(plan):
        console.print(table)
    drops = [a for a in plan.accounts if a.action == "dropped"]
    reasons = Counter(a.reason for a in drops)
    console.print(f"Dropped deliberately: {len(drops)} tensor(s)")
    for reason, n in reasons.items():
        console.print(f"  {n} x {reason}")
    console.print(f"Gate/up global-scale fixes: {len(plan.fixes)}")
    for f in plan.fixes:
        console.print(
            f"  {f.expert}: w1 {f.gate_scale_2:g}, w3 {f.up_scale_2:g}; {f.rescaled} block scales x {f.ratio:.6g}, "
            f"{f.scale_error:.2%} off the exact values"
        )
    for note in plan.notes:
        console.print(f"Note: {note}")
    console.print(f"ignored_layers: {len(plan.ignored_layers)} module name(s)")
    if graft_errors:
        table = Table(title="What --attention-from buys: the NVFP4-derived weight vs the reference")
        for col in ("module", "source format", "rel. error", "cosine"):
            table.add_column(col)
        for row in graft_errors:
            table.add_row(row["module"], row["source_format"], f"{row['rel_error']:.4f}", f"{row['cosine']:.6f}")
        console.print(table)
    return console.export_text()
