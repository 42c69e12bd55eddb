"""
Draws docs/figures/real_model.png from the per-run tables of docs/EXPERIMENTS.md.

    python docs/figures/real_model.py

The real-model runs' folders were not all kept, so this figure is drawn from the rows that
EXPERIMENTS.md records for every run: held-out accuracy at steps 0, 5, 10, 15, 20 (every seed), and
greedy and sampled response length at every evaluation (the runs in its lengths table). With every
run folder at hand, `compare.py` draws the same panels from the folders (EXPERIMENTS.md gives the
command). Mean ± standard error over seeds, shaded.
"""

import re
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

HERE = Path(__file__).resolve().parent
SETTINGS = {"pmd-mean": "PMD-mean", "grpo": "GRPO", "pmd-mean-seq-lr1e-5": "PMD-mean, no 1/|y| (sequence loss)"}


def table_rows(text: str, columns: int) -> dict[str, list[str]]:
    """{run name: its cells} for every markdown row of `columns` cells whose first cell is a run (name-sS)."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == columns and re.fullmatch(r"[a-z0-9.-]+-s\d", cells[0]):
            rows[cells[0]] = cells
    return rows


def by_setting(rows: dict, column: int) -> dict[str, tuple[str, np.ndarray]]:
    """{setting: (its seeds, e.g. "0-4", (seeds, 5) array of one column's five numbers)}."""
    out = {}
    for prefix in SETTINGS:
        names = [n for n in sorted(rows) if re.fullmatch(re.escape(prefix) + r"-s\d", n)]
        if names:
            seeds = [n[-1] for n in names]
            out[prefix] = (f"{seeds[0]}–{seeds[-1]}" if len(seeds) > 1 else seeds[0],
                           np.array([[float(x) for x in rows[n][column].split()] for n in names]))
    return out


def main() -> None:
    text = (HERE.parent / "EXPERIMENTS.md").read_text()
    per_run = table_rows(text, 9)                 # run | accuracy at steps 0..20 | ... (the per-run tables)
    lengths = table_rows(text, 3)                 # run | greedy length at steps 0..20 | sampled at steps 1..20
    panels = [("held-out greedy accuracy (%)", by_setting(per_run, 1), [0, 5, 10, 15, 20]),
              ("greedy response length (tokens, held-out)", by_setting(lengths, 1), [0, 5, 10, 15, 20]),
              ("sampled response length (tokens, training)", by_setting(lengths, 2), [1, 5, 10, 15, 20])]
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.6))
    for ax, (title, data, steps) in zip(axes, panels):
        for prefix, label in SETTINGS.items():
            if prefix not in data:
                continue
            seeds, x = data[prefix]                                        # x: (seeds, 5)
            mean = x.mean(0)
            se = x.std(0, ddof=1) / np.sqrt(len(x)) if len(x) > 1 else np.zeros_like(mean)
            ax.plot(steps, mean, marker="o", label=f"{label}, seeds {seeds}")
            ax.fill_between(steps, mean - se, mean + se, alpha=0.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_xticks([0, 5, 10, 15, 20])
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(HERE / "real_model.png", dpi=110)


if __name__ == "__main__":
    main()
