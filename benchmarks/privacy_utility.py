"""Issue 12's privacy-utility experiment: DP-FedAvg at epsilon 1, 4, 8 against no privacy.

Runs `fedforge compare` over experiments/privacy/base.toml (Fashion-MNIST, 10,000 IID clients,
Poisson sampling q = 0.1, the tutorial's MLP, FedAvgM) and experiments/privacy/privacy.toml
(one run per privacy level), then reads each run's history.json and checkpoint and prints the
table of docs/privacy.md (Markdown) and draws docs/privacy.png (test accuracy per round, and
epsilon spent per round).

    python benchmarks/privacy_utility.py                      # run (8-11 min on 2 shared cores), table, plot
    python benchmarks/privacy_utility.py --skip-run           # table and plot from runs/privacy-utility
    python benchmarks/privacy_utility.py --ablation           # also the clip-only diagnostic (3-4 min more)
    python benchmarks/privacy_utility.py --seed 1 --name privacy-utility-seed1 --plot /tmp/seed1.png
    python benchmarks/privacy_utility.py --jobs 1 --out-dir /tmp/runs --plot /tmp/privacy.png

Each run is given one thread (OMP_NUM_THREADS=1 unless already set): --jobs 2 runs two at once.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "experiments" / "privacy" / "base.toml"
RUNS = ROOT / "experiments" / "privacy" / "privacy.toml"
CLIP_ONLY = ROOT / "experiments" / "privacy" / "clip-only.toml"  # the --ablation diagnostic
CHECKPOINTS = (10, 20, 30)  # rounds whose accuracy the table shows besides the last


def run_compare(runs: Path, out_dir: Path, name: str, jobs: int, seed: int | None) -> None:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [
        sys.executable,
        "-m",
        "fedforge",
        "compare",
        "--config",
        str(BASE),
        "--runs",
        str(runs),
        "--jobs",
        str(jobs),
        "--out-dir",
        str(out_dir),
        "--name",
        name,
    ]
    if seed is not None:  # else base.toml's seed (0)
        cmd += ["--seed", str(seed)]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)


def wall_seconds(comparison: Path) -> dict[str, float]:
    """Each run's wall seconds, as `fedforge compare` measured them (its comparison.md table)."""
    path = comparison / "comparison.md"
    if not path.exists():
        return {}
    rows = [
        [c.strip() for c in line.strip().strip("|").split("|")]
        for line in path.read_text().splitlines()
        if line.startswith("|")
    ]
    if not rows or "wall s" not in rows[0]:
        return {}
    col = rows[0].index("wall s")
    return {row[0]: float(row[col]) for row in rows[2:] if len(row) > col}


def summarize(run_dir: Path) -> dict:
    """Accuracy per round, epsilon, z and C of one run (z and C from its checkpoint)."""
    from fedforge.experiment import load_checkpoint

    records = json.loads((run_dir / "history.json").read_text())["rounds"]
    privacy = load_checkpoint(run_dir, "cpu").state.privacy
    accountant = privacy.accountant if privacy is not None else None
    acc = [r["test_accuracy"] for r in records]
    return {
        "rounds": len(records) - 1,
        "accuracy": acc,
        "epsilon": [r["metrics"].get("epsilon") for r in records],
        "clip": records[-1]["metrics"].get("clip"),
        "z": accountant.noise_multiplier if accountant else None,
        "accountant": accountant.method if accountant else None,
        "round_seconds": sum(r["seconds"] for r in records[1:]),
    }


def table(results: dict[str, dict], walls: dict[str, float]) -> str:
    base = results.get("no-dp", {}).get("accuracy", [None])[-1]
    head = (
        ["run", "z", "C", "epsilon spent (delta 1e-5)", "rounds"]
        + [f"acc. r{r}" for r in CHECKPOINTS]
        + ["final acc.", "best acc.", "vs no-dp (points)", "round s (sum)", "wall s"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, s in results.items():
        acc, eps = s["accuracy"], s["epsilon"][-1]
        at = [f"{acc[r]:.4f}" if r < len(acc) else "-" for r in CHECKPOINTS]
        gap = f"{100 * (acc[-1] - base):+.2f}" if base is not None and label != "no-dp" else "-"
        lines.append(
            "| "
            + " | ".join(
                [
                    label,
                    f"{s['z']:.4f}" if s["z"] else "-",
                    f"{s['clip']:g}" if s["clip"] else "-",
                    (f"{eps:.3f}" if eps < 1e3 else f"{eps:.2g} (none)") if eps is not None else "- (no DP)",
                    str(s["rounds"]),
                    *at,
                    f"{acc[-1]:.4f}",
                    f"{max(acc):.4f}",
                    gap,
                    f"{s['round_seconds']:.0f}",
                    f"{walls[label]:.0f}" if label in walls else "-",
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, eps_ax) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    zoom = acc_ax.inset_axes([0.42, 0.36, 0.55, 0.34])  # the last half of the run, where the curves meet
    for label, s in results.items():
        name = label if s["z"] is None else f"{label} (z={s['z']:.2f}, C={s['clip']:g})"
        (line,) = acc_ax.plot(range(len(s["accuracy"])), s["accuracy"], marker=".", label=name)
        half = len(s["accuracy"]) // 2
        zoom.plot(range(half, len(s["accuracy"])), s["accuracy"][half:], marker=".", color=line.get_color())
        if s["z"] is not None:
            eps_ax.plot(range(1, len(s["epsilon"])), s["epsilon"][1:], marker=".", color=line.get_color(), label=label)
    acc_ax.set(
        xlabel="round",
        ylabel="test accuracy",
        ylim=(0, 0.9),
        title="Fashion-MNIST, 10,000 clients, Poisson q = 0.1, MLP, FedAvgM",
    )
    eps_ax.set(xlabel="round", ylabel="epsilon spent (delta = 1e-5)", title="privacy spent (PLD accountant)")
    eps_ax.set_yscale("log")
    zoom.grid(alpha=0.3)
    zoom.tick_params(labelsize=8)
    for ax in (acc_ax, eps_ax):
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=ROOT / "runs")
    parser.add_argument("--name", default="privacy-utility")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--seed", type=int, help="another seed than base.toml's 0 (partition, init, selection, noise)")
    parser.add_argument("--skip-run", action="store_true", help="only read runs already in OUT_DIR/NAME")
    parser.add_argument(
        "--ablation",
        action="store_true",
        help="also the clip-only diagnostic (experiments/privacy/clip-only.toml, in OUT_DIR/NAME-clip-only)",
    )
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "privacy.png")
    args = parser.parse_args()
    comparisons = [(RUNS, args.out_dir / args.name)]
    if args.ablation:
        comparisons.append((CLIP_ONLY, args.out_dir / f"{args.name}-clip-only"))
    if not args.skip_run:
        for runs, comparison in comparisons:
            run_compare(runs, comparison.parent, comparison.name, args.jobs, args.seed)
    order = ["no-dp", "eps-8", "eps-4", "eps-1"]
    results, walls = {}, {}
    for _, comparison in comparisons:
        labels = sorted(
            (p.name for p in comparison.iterdir() if (p / "history.json").exists()),
            key=lambda n: (order.index(n) if n in order else len(order), n),
        )
        results.update({label: summarize(comparison / label) for label in labels})
        walls.update(wall_seconds(comparison))
    print(table(results, walls))
    plot({k: v for k, v in results.items() if k in order}, args.plot)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
