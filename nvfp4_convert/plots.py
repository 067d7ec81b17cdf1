"""Per-layer error plots of a reference comparison (``verify --reference ... --plot FILE.png``).

``layer_series(findings)`` (pure): module kind (the native name without its layer and expert numbers, e.g.
``attn.wo_a``, ``ffn.experts.w1``) -> {layer: largest ``metric`` among that kind's modules in the layer}.
``plot_layer_series`` draws one line per kind against the layer index and writes a PNG; it needs matplotlib
(the ``plot`` extra) and says so in one line where it is missing.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import ConvertError

_LAYER = re.compile(r"^(?:layers|mtp)\.(\d+)\.(.*)$")


def layer_series(findings: list[dict], metric: str = "rel_error") -> dict[str, dict[int, float]]:
    series: dict[str, dict[int, float]] = {}
    for f in findings:
        m = _LAYER.match(f["tensor"])
        if f["check"] != "vs reference" or not m or metric not in f.get("metrics", {}):
            continue
        kind = re.sub(r"\.experts\.\d+\.", ".experts.", m[2])
        per_layer = series.setdefault(kind, {})
        layer = int(m[1])
        per_layer[layer] = max(per_layer.get(layer, 0.0), float(f["metrics"][metric]))
    return dict(sorted(series.items()))


def plot_layer_series(series: dict[str, dict[int, float]], path: Path, title: str, metric: str = "rel_error") -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConvertError("--plot needs matplotlib: pip install 'nvfp4-convert[plot]'") from None
    if not series:
        raise ConvertError("nothing to plot: no per-layer reference comparison in the result")
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(11, 5.5))
    colours = plt.get_cmap("tab20").colors
    for i, (kind, per_layer) in enumerate(series.items()):
        layers = sorted(per_layer)
        style = {"color": colours[i % 20], "linestyle": ("-", "--", ":")[i // 20 % 3], "marker": "os^D"[i % 4]}
        ax.plot(layers, [per_layer[k] for k in layers], markersize=3, label=kind, **style)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel(f"{metric} vs reference (max over the layer's modules)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
