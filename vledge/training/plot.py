"""Training curves as a PNG, drawn from metrics.jsonl rows."""

from __future__ import annotations

from pathlib import Path

from vledge.files import atomic_path


def plot_curves(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if r.get("kind") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", lw=1)
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val loss")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("cross entropy (answer tokens)")
    ax_loss.set_yscale("log")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    tasks = sorted({t for r in evals for t in r.get("accuracy", {})} - {"overall"})
    for task in tasks + ["overall"]:
        points = [(r["step"], r["accuracy"][task]) for r in evals if task in r.get("accuracy", {})]
        if points:
            steps, values = zip(*points)
            ax_acc.plot(steps, [v * 100 for v in values], "o-" if task == "overall" else ".-",
                        label=task, lw=2.5 if task == "overall" else 1)
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("val exact match (%)")
    ax_acc.set_ylim(0, 100)
    ax_acc.grid(alpha=0.3)
    if tasks:
        ax_acc.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as temp:
        fig.savefig(temp, dpi=110, format="png")
    plt.close(fig)
    return path
