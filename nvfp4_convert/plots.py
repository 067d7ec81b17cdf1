"""Per-layer error plots of a reference comparison (``verify --reference ... --plot FILE.png``).

``layer_series(findings)`` (pure): module kind (the native name without its layer and expert numbers, e.g.
``attn.wo_a``, ``ffn.experts.w1``) -> {layer: largest ``metric`` among that kind's modules in the layer}.
``graft_series(rows)`` (pure) does the same for ``--attention-from``'s report: the NVFP4-derived error and the
written (grafted) error of each module kind. ``plot_layer_series`` draws one line per kind against the layer
index, one panel per series set side by side, and writes a PNG; it needs matplotlib (the ``plot`` extra) and
says so in one line where it is missing.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import ConvertError

_LAYER = re.compile(r"^layers\.(\d+)\.(.*)$")  # decoder layers (an MTP block is not one of them)


Series = dict[str, dict[int, float]]


def _add(series: Series, module: str, value: float) -> None:
    m = _LAYER.match(module)
    if m:
        kind = re.sub(r"\.experts\.\d+\.", ".experts.", m[2])
        per_layer = series.setdefault(kind, {})
        per_layer[int(m[1])] = max(per_layer.get(int(m[1]), 0.0), value)


def layer_series(findings: list[dict], metric: str = "rel_error") -> Series:
    series: Series = {}
    for f in findings:
        if f["check"] == "vs reference" and metric in f.get("metrics", {}):
            _add(series, f["tensor"], float(f["metrics"][metric]))
    return dict(sorted(series.items()))


def graft_series(rows: list[dict]) -> dict[str, Series]:
    """``--attention-from``'s report rows -> {"NVFP4-derived": ..., "grafted (written)": ...}."""
    derived: Series = {}
    written: Series = {}
    for r in rows:
        _add(derived, r["module"], float(r["rel_error"]))
        if "written_rel_error" in r:
            _add(written, r["module"], float(r["written_rel_error"]))
    return {"NVFP4-derived": dict(sorted(derived.items())), "grafted (written)": dict(sorted(written.items()))}


def require_matplotlib() -> None:
    """Refuse ``--plot`` at once where matplotlib is missing (not after an hour of converting)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConvertError("--plot needs matplotlib: pip install 'nvfp4-convert[plot]'") from None


def plot_layer_series(panels: dict[str, Series], path: Path, title: str, metric: str = "rel_error") -> None:
    """One panel per entry of ``panels`` (side by side, same y axis), one line per module kind; a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise ConvertError("--plot needs matplotlib: pip install 'nvfp4-convert[plot]'") from None
    panels = {name: s for name, s in panels.items() if s}
    if not panels:
        raise ConvertError("nothing to plot: no per-layer reference comparison in the result")
    kinds = sorted({k for s in panels.values() for k in s})
    colours = plt.get_cmap("tab20").colors
    fig, axes = plt.subplots(1, len(panels), figsize=(11 * len(panels), 5.5), sharey=True, squeeze=False)
    for ax, (name, series) in zip(axes[0], panels.items(), strict=True):
        for kind, per_layer in series.items():
            i = kinds.index(kind)
            layers = sorted(per_layer)
            style = {"color": colours[i % 20], "linestyle": ("-", "--", ":")[i // 20 % 3], "marker": "os^D"[i % 4]}
            ax.plot(layers, [per_layer[k] for k in layers], markersize=3, label=kind, **style)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer")
        ax.set_yscale("symlog", linthresh=1e-3)  # exact (0) shows as 0, NVFP4-level errors on a log scale
        ax.set_ylim(bottom=0)
        ax.set_title(f"{title}: {name}" if len(panels) > 1 else title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    axes[0][0].set_ylabel(f"{metric} vs reference (max over the layer's modules)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
