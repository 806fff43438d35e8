"""PNG figures of ``convergence.py``'s and ``prompt_tasks.py``'s summaries (matplotlib, the
``bench`` extra). Without matplotlib nothing is drawn and the JSON still holds every number."""

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
    data = json.loads(json_path.read_text())
    if "metrics" in data["summary"]:  # prompt_tasks.py
        evaluation = {k: data["protocol"]["prompt_metrics"][k] for k in ("ceiling", "chance")}
        paths = plot_prompt_tasks(data["summary"], json_path.parent, json_path.stem, evaluation)
        grid = {m: p for m, p in data.get("sample_grid", {}).items() if p and Path(p).is_file()}
        if grid:
            paths += plot_sample_grid(grid, json_path.parent / f"{json_path.stem}_samples.png",
                                      json_path.stem)
        return paths
    return plot_convergence(data["summary"], json_path.parent, json_path.stem)


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


def _sweep_panel(ax, group: str, rows: list[dict], metric: str = "fd", label: str = "FD",
                 log: bool = True) -> None:
    """One sweep's panel of ``metric`` (``final_<metric>`` / ``<metric>_curve`` of the rows of
    :func:`common.summarize_sweep`), on a log axis with ``log``."""
    methods = sorted({r["method"] for r in rows})
    scale = "log" if log else "linear"
    if group == "length":
        for r in rows:
            _band(ax, r[f"{metric}_curve"], f"{r['method']} ({len(r['seeds'])} seeds)",
                  COLORS.get(r["method"]))
        ax.set(xlabel="training step", ylabel=label, yscale=scale, title="training length")
        ax.legend(fontsize=8)
        return
    if group == "size":
        for m in methods:
            pts = sorted((r["params"], r[f"final_{metric}"]) for r in rows if r["method"] == m)
            ax.errorbar([p for p, _ in pts], [f[0] for _, f in pts], yerr=[f[1] for _, f in pts],
                        marker="o", capsize=3, label=m, color=COLORS.get(m))
        ax.set(xscale="log", yscale=scale, xlabel="parameters", ylabel=f"final {label}",
               title="model size")
        ax.legend(fontsize=8)
        return
    labels = [r["variant"] for r in rows]
    ax.errorbar(range(len(rows)), [r[f"final_{metric}"][0] for r in rows],
                yerr=[r[f"final_{metric}"][1] for r in rows], fmt="o", capsize=3,
                color=COLORS.get(methods[0]) if len(methods) == 1 else None)
    ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=8)
    ax.set(ylabel=f"final {label}", title=f"{group} ({', '.join(methods)})")


def plot_prompt_tasks(summary: dict, out: Path, name: str, evaluation: dict) -> list[Path]:
    """``<name>.png``: each metric of ``prompt_tasks.py`` against steps per method (mean ± std
    over seeds; the evaluator's ceiling and chance as dashed and dotted lines), and the probe
    per block at the last step; ``<name>_sweeps.png``: one panel per sweep of the primary
    metric (and FD)."""
    plt = _pyplot()
    if plt is None:
        return []
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = summary["metrics"]
    fig, axes = plt.subplots(1, len(metrics) + 1, figsize=(4.2 * (len(metrics) + 1), 3.8))
    for ax, k in zip(axes, metrics):
        for m, s in summary["methods"].items():
            _band(ax, s["curves"][k], f"{m} ({s['seeds']} seeds)", COLORS.get(m))
        if k in evaluation.get("ceiling", {}):
            ax.axhline(evaluation["ceiling"][k], color="k", ls="--", lw=0.8, label="ceiling")
        if k in evaluation.get("chance", {}):
            ax.axhline(evaluation["chance"][k], color="k", ls=":", lw=0.8, label="chance")
        better = "lower" if k == "fd" else "higher"
        ax.set(xlabel="training step", ylabel=f"{k} ({better} is better)",
               yscale="log" if k == "fd" else "linear", title=f"{k} (held-out prompts)")
        ax.legend(fontsize=7)
    for m, s in summary["methods"].items():
        final = {int(k[5:]): v[-1] for k, v in s["probe_curves"].items()}
        blocks = sorted(final)
        axes[-1].errorbar(blocks, [final[b][1] for b in blocks],
                          yerr=[final[b][2] for b in blocks], marker="o", capsize=3, label=m,
                          color=COLORS.get(m))
    axes[-1].set(xlabel="block", ylabel="linear-probe accuracy (word)",
                 title="probe at the last step")
    axes[-1].legend(fontsize=7)
    paths = [_save(fig, out / f"{name}.png", plt)]
    sweeps = summary.get("sweeps", {})
    if sweeps:
        p = summary["primary"]
        fig, axes = plt.subplots(2, len(sweeps), figsize=(4.5 * len(sweeps), 7.5), squeeze=False)
        for col, (group, rows) in enumerate(sweeps.items()):
            _sweep_panel(axes[0][col], group, rows, metric=p, label=p, log=False)
            _sweep_panel(axes[1][col], group, rows, metric="fd", label="FD", log=True)
        paths.append(_save(fig, out / f"{name}_sweeps.png", plt))
    return paths


def plot_sample_grid(grids: dict[str, Path], path: Path, title: str) -> list[Path]:
    """One column per method: its sample grid (the PNG its adapter's ``save_prompt_samples``
    wrote: the same prompts in the same order for every method), in one figure."""
    plt = _pyplot()
    if plt is None or not grids:
        return []
    import matplotlib.image

    images = {m: matplotlib.image.imread(str(p)) for m, p in grids.items()}
    aspect = max(img.shape[0] / img.shape[1] for img in images.values())
    fig, axes = plt.subplots(1, len(images), figsize=(3.6 * len(images), 3.6 * aspect + 0.8),
                             squeeze=False)
    for ax, (m, img) in zip(axes[0], images.items()):
        ax.imshow(img)
        ax.set_title(m, fontsize=12, color=COLORS.get(m, "k"))
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return [_save(fig, Path(path), plt)]


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
