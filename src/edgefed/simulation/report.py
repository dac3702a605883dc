"""The simulation's plots: test perplexity per round per variant, and the trust matrices.

PNG files in the run folder, drawn with matplotlib's non-interactive Agg backend so that a
headless machine (CI, a server over SSH) draws them the same as a laptop.
"""

from __future__ import annotations

from pathlib import Path

from edgefed.atomic import atomic_path

PERPLEXITY_PLOT = "perplexity-per-round.png"
TRUST_PLOT = "trust-matrices.png"


def write_plots(results: dict, folder: Path) -> list[Path]:
    """Draw both figures into `folder`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = results["summary"]
    clients = [c["name"] for c in results["clients"]]
    paths = []

    figure, axes = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for label, row in summary.items():
        axes.plot(range(len(row["per_round"])), row["per_round"], marker="o", label=label)
    axes.set_xlabel("round")
    axes.set_ylabel("test perplexity (mean over clients and seeds)")
    axes.set_title(f"{results['dataset']}: the device's mixed adapter on its test split")
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.legend(fontsize="small")
    figure.tight_layout()
    paths.append(_save(figure, folder / PERPLEXITY_PLOT))
    plt.close(figure)

    shown = [label for label in summary if label not in ("local", "fedavg")] or list(summary)
    figure, grid = plt.subplots(
        1, len(shown), figsize=(3.6 * len(shown), 3.6), dpi=120, squeeze=False
    )
    for axes, label in zip(grid[0], shown, strict=True):
        image = axes.imshow(summary[label]["trust_matrices"][0], vmin=0, vmax=1, cmap="viridis")
        axes.set_title(f"{label} (seed 0, last round)", fontsize="small")
        axes.set_xticks(range(len(clients)), clients, rotation=90, fontsize="x-small")
        axes.set_yticks(range(len(clients)), clients, fontsize="x-small")
        axes.set_xlabel("trusted device")
    grid[0][0].set_ylabel("device")
    figure.colorbar(image, ax=grid[0].tolist(), shrink=0.8, label="weight")
    paths.append(_save(figure, folder / TRUST_PLOT))
    plt.close(figure)
    return paths


def _save(figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", bbox_inches="tight")
    return path
