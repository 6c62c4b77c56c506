"""The continual report's pictures (matplotlib, Agg): the accuracy matrix as a heat map, accuracy over the stream."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_matrix(path: Path, R: list[list[float | None]], classes: list[list[int]], title: str,
                rows: list[str] | None = None) -> None:
    """R[i][j] as a heat map: rows = after each step (row 0 the starting model), columns = tasks; a None cell
    (the column's classes all forgotten) is left blank and marked "forgotten"."""
    plt = _pyplot()
    T = len(R[0])
    fig, ax = plt.subplots(figsize=(1.6 + 0.9 * T, 1.2 + 0.6 * len(R)))
    image = ax.imshow([[float("nan") if v is None else v for v in row] for row in R], vmin=0, vmax=100,
                      cmap="viridis", aspect="auto")
    for i, row in enumerate(R):
        for j, v in enumerate(row):
            ax.text(j, i, "forgotten" if v is None else f"{v:.1f}", ha="center", va="center", fontsize=7 if v is None
                    else 8, color="black" if v is None or v >= 60 else "white")
    ax.set_xticks(range(T), [f"task {j + 1}\n{c}" for j, c in enumerate(classes)], fontsize=7)
    ax.set_yticks(range(len(R)), rows or ["start"] + [f"step {i}" for i in range(1, len(R))], fontsize=8)
    ax.set_title(f"{title}: accuracy (%) on each task after each step", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_stream(path: Path, R: list[list[float]], anytime: list[dict], steps: list[dict], title: str) -> None:
    """Accuracy on the tasks seen so far against the batches of the stream: the anytime evaluations when the
    recipe asked for them (training.eval_every), and the average over the seen tasks after each step."""
    plt = _pyplot()
    ends, at = [], 0
    for s in steps:
        at += s["batches"]
        ends.append(at)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    if anytime:
        offset = {s["step"]: end - s["batches"] for s, end in zip(steps, ends)}
        ax.plot([offset[a["step"]] + a["batch"] for a in anytime], [a["accuracy"] for a in anytime], lw=1,
                label="anytime (seen tasks)")
    after = []
    for i in range(1, len(R)):
        seen = [v for v in R[i][:i] if v is not None]  # None: a task whose classes were all forgotten
        after.append(sum(seen) / len(seen) if seen else float("nan"))
    ax.plot(ends, after, "o-", label="after each step (seen tasks)")
    for end in ends[:-1]:
        ax.axvline(end, color="grey", lw=0.5, ls=":")
    ax.set_xlabel("batches of the stream")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{title}: accuracy over the stream", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
