"""
compare.py: finished train_math.py runs side by side, mean ± standard error over seeds.

    python compare.py runs/pmd-mean-s0 runs/pmd-mean-s1 runs/grpo-s0 runs/grpo-s1 --out compare.png

Runs that differ only in --seed (and in flags that change nothing they compute, such as --out) are
one setting. It prints held-out accuracy at every evaluation step; end and peak values of every
evaluation metric with the training metrics at the end; a table of each setting minus the first one
given, paired by seed (the same seed starts from the same model, so the difference has none of the
spread between starts); and draws the panels (`--panels`) as one figure, mean ± s.e. shaded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from math_tasks import UsageError
from train_math import TIMING_KEYS, build_parser, read_jsonl

# Flags that do not change what a run computes (or only which seed it is).
NOT_THE_SETTING = {"seed", "out", "resume", "no_plot", "tiny_cache", "fresh", "checkpoint_every", "eval_batch",
                   "device", "overwrite"}
# Panels by metric: (key, title, where it is logged). A key ending in "@" takes the runs' k (pass@8, ...).
PANELS = {
    "reward": ("training reward", "metrics"),
    "accuracy": ("held-out greedy accuracy", "evals"),
    "avg@": ("avg@k", "evals"),
    "maj@": ("maj@k", "evals"),
    "pass@": ("pass@k (Best@k)", "evals"),
    "unparseable": ("held-out answers that do not parse", "evals"),
    "greedy_length": ("greedy response length (tokens, held-out)", "evals"),
    "response_length": ("sampled response length (tokens, training)", "metrics"),
    "entropy": ("entropy of π_t (nats/token)", "metrics"),
    "kl": ("KL(π_t ‖ π_θ) per step", "metrics"),
    "seconds": ("held-out greedy accuracy against training seconds", "clock"),    # derived below
}


def load_run(d: Path) -> dict:
    """{"dir", "args", "config", "evals", "metrics", "summary"} of a finished run, or one sentence why not."""
    if not (d / "summary.json").is_file() or not (d / "run.json").is_file():
        raise UsageError(f"{d} is not a finished run (no summary.json or run.json).")
    try:
        run, summary = json.loads((d / "run.json").read_text()), json.loads((d / "summary.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"{d}: its run.json or summary.json cannot be read ({type(e).__name__}).") from None
    if not (isinstance(run, dict) and isinstance(run.get("args"), dict) and isinstance(summary, dict)):
        raise UsageError(f"{d}: its run.json is not one train_math.py wrote.")
    run_id = run.get("run_id")                                             # absent in runs of earlier versions
    if summary.get("run_id", run_id) != run_id:
        raise UsageError(f"{d} mixes two runs: its summary.json belongs to run {summary.get('run_id')}, "
                         f"its run.json to run {run_id}.")
    defaults = vars(build_parser().parse_args([]))
    args = {**defaults, **{k: v for k, v in run["args"].items() if k in defaults}}
    evals, metrics = read_jsonl(d / "eval.jsonl", run_id), read_jsonl(d / "metrics.jsonl", run_id)
    if not evals:
        raise UsageError(f"{d} has no evaluation.")
    return {"dir": d, "args": args, "evals": evals, "metrics": metrics, "summary": summary}


def load_runs(run_dirs: list[str]) -> dict:
    """Group finished runs into settings: {label: [run, ...]}; the label names the flags that tell
    the settings apart (or the algorithm, if there is one setting)."""
    seen = {}
    for d in run_dirs:
        key = Path(d).resolve()
        if key in seen:
            raise UsageError(f"{d} is given twice (as {seen[key]} too): it would count as two seeds.")
        seen[key] = d
    runs = [load_run(Path(d)) for d in run_dirs]
    key = lambda r: json.dumps({k: v for k, v in sorted(r["args"].items()) if k not in NOT_THE_SETTING})
    groups = {}
    for r in runs:
        groups.setdefault(key(r), []).append(r)
    setting = {k: json.loads(k) for k in groups}
    differ = sorted({f for a in setting.values() for b in setting.values() for f in a if a.get(f) != b.get(f)})
    label = lambda k: " ".join(f"{f}={setting[k].get(f)}" for f in differ) or str(setting[k].get("algo"))
    return {label(k): g for k, g in groups.items()}


def mean_se(values) -> tuple[float, float]:
    """Mean and standard error (std with ddof 1 over √n) across seeds; s.e. is nan for one seed."""
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")


def metric_key(runs: list[dict], name: str) -> str | None:
    """The key `name` has in these runs (pass@ → pass@8), or None where some run did not measure it."""
    source = PANELS[name][1]
    keys = set.intersection(*[set().union(*[row.keys() for row in r[source]]) for r in runs])
    if name.endswith("@"):
        return next((k for k in sorted(keys) if k.startswith(name)), None)
    return name if name in keys else None


def aggregate(runs: list[dict], window: int = 10) -> dict:
    """Mean ± s.e. across seeds: {metric: (steps, means, ses)}, evaluation metrics at each evaluation
    step, training metrics (a `window`-step moving average) at each step, for the steps every run has."""
    out = {}
    for name in [n for n in PANELS if PANELS[n][1] != "clock"]:
        key, source = metric_key(runs, name), PANELS[name][1]
        if key is None:
            continue
        per_seed = []
        for r in runs:
            rows = [row for row in r[source] if key in row]
            vals = np.array([row[key] for row in rows], dtype=float)
            if source == "metrics":                                        # trailing moving average: less noise
                vals = np.array([vals[max(0, i - window + 1):i + 1].mean() for i in range(len(vals))])
            per_seed.append(dict(zip([row["step"] for row in rows], vals)))
        steps = sorted(set.intersection(*[set(v) for v in per_seed]))
        if steps:
            stats = [mean_se([v[s] for v in per_seed]) for s in steps]
            out[name] = (steps, [m for m, _ in stats], [e for _, e in stats], key)
    # Training seconds (sampling, scoring, log-probs, updates, KL pass; not evaluation) spent before
    # each evaluation step, averaged over seeds: the x-axis of "accuracy against wall-clock".
    phases = [k for k in TIMING_KEYS if k.startswith("time_")]
    steps = out["accuracy"][0]
    clocks = []
    for r in runs:
        cum = np.cumsum([0.0] + [sum(m.get(k, 0.0) for k in phases) for m in r["metrics"]])  # cum[s]: after s steps
        clocks.append([cum[min(s, len(cum) - 1)] for s in steps])
    out["seconds"] = (list(np.mean(clocks, axis=0)), out["accuracy"][1], out["accuracy"][2], "accuracy")
    return out


def fmt_mse(m: float, e: float, pct: bool = True) -> str:
    f = (lambda x: f"{100 * x:.1f}") if pct else (lambda x: f"{x:.3g}")
    return f"{f(m)} ± {f(e)}" if e == e else f(m)                         # e != e: one seed, no s.e.


# What the paired table compares, per run: (column, function of a run, in percentage points?).
PAIRED = [("end accuracy", lambda r: r["evals"][-1]["accuracy"], True),
          ("peak accuracy", lambda r: max(e["accuracy"] for e in r["evals"]), True),
          ("end unparseable", lambda r: r["evals"][-1]["unparseable"], True),
          ("end greedy length", lambda r: r["evals"][-1].get("greedy_length", float("nan")), False),
          ("mean KL", lambda r: float(np.mean([m["kl"] for m in r["metrics"]])), False),
          ("entropy end", lambda r: float(np.mean([m["entropy"] for m in r["metrics"][-10:]])), False)]


def paired_table(groups: dict) -> None:
    """Every setting minus the first one given, seed by seed, over the seeds both ran."""
    labels = list(groups)
    ref = {r["args"]["seed"]: r for r in groups[labels[0]]}
    rows = []
    for lab in labels[1:]:
        mine = {r["args"]["seed"]: r for r in groups[lab]}
        seeds = sorted(set(mine) & set(ref))
        if seeds:
            diffs = [[f(mine[s]) - f(ref[s]) for s in seeds] for _, f, _ in PAIRED]
            rows.append((lab, seeds, diffs))
    if not rows:
        return
    print(f"\nPaired by seed against {labels[0]}: the setting's value minus the reference's, mean ± s.e. over "
          "the seeds both ran (accuracy and unparseable share in points); \"higher\" counts the pairs in which "
          "the setting's end accuracy is higher:\n")
    print("| setting | pairs | higher | " + " | ".join(name for name, _, _ in PAIRED) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in PAIRED) + " |")
    for lab, seeds, diffs in rows:
        cells = [fmt_mse(*mean_se(d), pct=pct) for d, (_, _, pct) in zip(diffs, PAIRED)]
        print(f"| {lab} | {len(seeds)} | {sum(x > 0 for x in diffs[0])}/{len(seeds)} | " + " | ".join(cells) + " |")


def compare(run_dirs: list[str], out_png: str, panels: list[str]) -> int:
    """Print the tables and draw the figure."""
    groups = load_runs(run_dirs)
    aggs = {label: aggregate(runs) for label, runs in groups.items()}
    steps = sorted({s for a in aggs.values() for s in a["accuracy"][0]})
    print("Held-out greedy accuracy (%), mean ± s.e. over seeds, at each evaluation step:\n")
    print("| setting | seeds | " + " | ".join(f"step {s}" for s in steps) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in steps) + " |")
    for label, a in aggs.items():
        acc = dict(zip(a["accuracy"][0], zip(a["accuracy"][1], a["accuracy"][2])))
        cells = [fmt_mse(*acc[s]) if s in acc else "–" for s in steps]
        print(f"| {label} | {len(groups[label])} | " + " | ".join(cells) + " |")

    evals = [n for n in PANELS if PANELS[n][1] == "evals" and any(n in a for a in aggs.values())]
    trains = [n for n in PANELS if PANELS[n][1] == "metrics"]
    print("\nEnd (last evaluation) and peak (best evaluation step of the mean) values, mean ± s.e.; training "
          "metrics are 10-step moving averages at the last step, KL the mean over all steps:\n")
    print("| setting | " + " | ".join(f"{n} end / peak" for n in evals) + " | " + " | ".join(f"{n} end" for n in trains)
          + " | mean KL | ended below start | seconds |")
    print("|" + " --- |" * (len(evals) + len(trains) + 4))
    for label, a in aggs.items():
        cells = []
        for n in evals:
            if n not in a:
                cells.append("–")
                continue
            _, m, e, _ = a[n]
            best = int(np.argmin(m)) if n in ("unparseable", "greedy_length") else int(np.argmax(m))
            pct = n not in ("greedy_length",)
            cells.append(f"{fmt_mse(m[-1], e[-1], pct)} / {fmt_mse(m[best], e[best], pct)}")
        cells += [fmt_mse(a[n][1][-1], a[n][2][-1], False) if n in a else "–" for n in trains]
        runs = groups[label]
        kl = mean_se([np.mean([m["kl"] for m in r["metrics"]]) for r in runs]) if all(r["metrics"] for r in runs) \
            else (float("nan"), float("nan"))
        sec = np.mean([r["summary"].get("seconds_this_run", float("nan")) for r in runs])
        below = sum(r["evals"][-1]["accuracy"] < r["evals"][0]["accuracy"] for r in runs)
        print(f"| {label} | " + " | ".join(cells) + f" | {fmt_mse(*kl, pct=False)} | {below}/{len(runs)} | {sec:.0f} |")

    paired_table(groups)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, ax = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    for axis, name in zip(ax.flat, panels):
        for label, a in aggs.items():
            if name not in a:                                              # e.g. pass@k with --eval-samples 0
                continue
            x, m, e, key = a[name]
            x, m, e = (np.asarray(v, dtype=float) for v in (x, m, e))
            axis.plot(x, m, "o-" if len(x) < 20 else "-", ms=3, label=f"{label} (n={len(groups[label])})")
            axis.fill_between(x, m - np.nan_to_num(e), m + np.nan_to_num(e), alpha=0.2)
        if not axis.lines:
            axis.text(0.5, 0.5, "not measured in these runs", ha="center", va="center", transform=axis.transAxes)
        axis.set_title(PANELS[name][0], fontsize=9)
        axis.set_xlabel("seconds (sampling + updates, no evaluation), mean over seeds" if PANELS[name][1] == "clock"
                        else "step (rollout batches)")
    for axis in ax.flat[len(panels):]:
        axis.axis("off")
    ax.flat[0].legend(fontsize=6)
    fig.tight_layout()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    print(f"\nfigure: {out_png} (mean ± s.e. shaded)")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])

    def fail(message):                                                     # argparse's own errors: one sentence too
        raise UsageError(message + ".")
    p.error = fail
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="finished train_math.py output directories")
    p.add_argument("--out", default="compare.png", help="the figure (PNG); its folder is created")
    p.add_argument("--panels", nargs="+", default=list(PANELS), metavar="METRIC",
                   help="what to draw, from: " + " ".join(PANELS))
    try:
        args = p.parse_args(argv)
        unknown = [n for n in args.panels if n not in PANELS]
        if unknown:
            raise UsageError(f"unknown --panels {' '.join(unknown)}: use some of {' '.join(PANELS)}.")
        return compare(args.runs, args.out, args.panels)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
