"""Training curves as a PNG, drawn from metrics.jsonl rows.

Each stage change is marked on both panels (a dashed line labelled with the new stage), so the
loss jump where ``instruct`` takes over from ``align`` (new tasks, longer answers) does not read
as divergence.
"""

from __future__ import annotations

from pathlib import Path

from vledge.files import atomic_path


def stage_changes(rows: list[dict]) -> list[tuple[int, str]]:
    """(step, stage) where a run's training rows switch to another stage, in order."""
    changes, current = [], None
    for row in rows:
        if row.get("kind") != "train" or "stage" not in row:
            continue
        if current is not None and row["stage"] != current:
            changes.append((row["step"], row["stage"]))
        current = row["stage"]
    return changes


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
    for step, stage in stage_changes(rows):
        for ax in (ax_loss, ax_acc):
            ax.axvline(step, color="grey", ls="--", lw=1)
            ax.annotate(f"{stage} from here", (step, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -12),
                        textcoords="offset points", fontsize=8, color="grey")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as temp:
        fig.savefig(temp, dpi=110, format="png")
    plt.close(fig)
    return path
