"""PNG figures of ``convergence.py``'s summary (matplotlib, the ``bench`` extra). Without
matplotlib nothing is drawn and the JSON still holds every number."""

from __future__ import annotations

from pathlib import Path

import numpy as np

COLORS = {"vanilla": "tab:gray", "dts": "tab:blue", "selfflow": "tab:red", "repa": "tab:green",
          "repa_label_free": "tab:olive"}


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plots")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _band(ax, curve, label, color=None) -> None:
    """Mean line with a ±1 std band; ``curve`` is ``[(step, mean, std), ...]``."""
    st = [c[0] for c in curve]
    mu = np.array([c[1] for c in curve])
    sd = np.array([c[2] for c in curve])
    ax.plot(st, mu, label=label, color=color, marker="." if len(st) < 12 else None)
    ax.fill_between(st, mu - sd, mu + sd, alpha=0.2, color=color)


def replot(json_path: Path) -> list[Path]:
    """Draw the figures of a result file again (``python benchmarks/plots.py RESULT.json``)."""
    import json

    json_path = Path(json_path)
    return plot_convergence(json.loads(json_path.read_text())["summary"], json_path.parent,
                            json_path.stem)


def plot_convergence(summary: dict, out: Path, name: str) -> list[Path]:
    """``<name>.png`` (FD against steps, probe per block) and, when the summary has sweeps,
    ``<name>_sweeps.png`` (one panel per sweep, ±1 std error bars over seeds)."""
    plt = _pyplot()
    if plt is None:
        return []
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for m, s in summary["methods"].items():
        _band(axes[0], s["fd_curve"], f"{m} ({s['seeds']} seeds)", COLORS.get(m))
        final = {int(k[5:]): v[-1] for k, v in s["probe_curves"].items()}
        blocks = sorted(final)
        axes[1].errorbar(blocks, [final[b][1] for b in blocks], yerr=[final[b][2] for b in blocks],
                         marker="o", capsize=3, label=m, color=COLORS.get(m))
    axes[0].set(xlabel="training step", ylabel="FD (lower is better)", yscale="log",
                title="FD against steps (mean ± std)")
    axes[1].set(xlabel="block", ylabel="linear-probe accuracy", title="probe at the last step")
    for ax in axes:
        ax.legend(fontsize=8)
    paths.append(_save(fig, out / f"{name}.png", plt))
    sweeps = summary.get("sweeps", {})
    if sweeps:
        fig, axes = plt.subplots(1, len(sweeps), figsize=(4.5 * len(sweeps), 4), squeeze=False)
        for ax, (group, rows) in zip(axes[0], sweeps.items()):
            _sweep_panel(ax, group, rows)
        paths.append(_save(fig, out / f"{name}_sweeps.png", plt))
    return paths


def _sweep_panel(ax, group: str, rows: list[dict]) -> None:
    methods = sorted({r["method"] for r in rows})
    if group == "length":
        for r in rows:
            _band(ax, r["fd_curve"], f"{r['method']} ({len(r['seeds'])} seeds)",
                  COLORS.get(r["method"]))
        ax.set(xlabel="training step", ylabel="FD", yscale="log", title="training length")
        ax.legend(fontsize=8)
        return
    if group == "size":
        for m in methods:
            pts = sorted((r["params"], r["final_fd"]) for r in rows if r["method"] == m)
            ax.errorbar([p for p, _ in pts], [f[0] for _, f in pts], yerr=[f[1] for _, f in pts],
                        marker="o", capsize=3, label=m, color=COLORS.get(m))
        ax.set(xscale="log", yscale="log", xlabel="parameters", ylabel="final FD",
               title="model size")
        ax.legend(fontsize=8)
        return
    labels = [r["variant"] for r in rows]
    ax.errorbar(range(len(rows)), [r["final_fd"][0] for r in rows],
                yerr=[r["final_fd"][1] for r in rows], fmt="o", capsize=3,
                color=COLORS.get(methods[0]) if len(methods) == 1 else None)
    ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="final FD", title=f"{group} ({', '.join(methods)})")


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


if __name__ == "__main__":
    import sys

    for arg in sys.argv[1:]:
        print(*replot(Path(arg)))
