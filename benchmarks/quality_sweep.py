"""Training recipes side by side at an equal budget, scored by benchmarks/quality.py: the table of docs/quality.md.

Each recipe trains the demo preset's network (benchmarks/quality_preset.yaml, 32 px) with ddpmctl options laid over
it, for the same number of training images (8 minutes of the demo recipe on a 2-core CPU by default: a
budget in images is deterministic and fair however busy the machine is), then samples 1,000 images with
the sampler given and scores them (FD in the judge's features, confidence, label coverage, memorization).
Jobs run two at a time with one torch thread each; every row is one ``benchmarks/quality.py`` run whose
JSON line is kept in ``--log``.

    python benchmarks/quality_sweep.py                       # every recipe below
    python benchmarks/quality_sweep.py --only demo edm-g8    # some of them
    python benchmarks/quality_sweep.py --table               # print the table of what --log holds

``--plot`` draws FD against training minutes (docs/images/quality_vs_minutes.png) from every row of ``--log``
and of the logs given to it (runs of the same recipes with other ``--images`` budgets, kept apart with
``--log``), and prints those points. ``--steps-curve LABEL`` re-samples a finished run with its sampler at
10/20/50/100 steps (``--samplers`` changes them) and ``--checkpoints LABEL`` scores every checkpoint a run kept.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUALITY = ROOT / "benchmarks" / "quality.py"
DEMO_8_MINUTES = 68_640  # images the demo recipe trained in 8 minutes on the 2-core CPU (2,145 steps of 32)
DEMO_IMAGES_PER_MINUTE = DEMO_8_MINUTES / 8

# label: (quality.py recipe, ddpmctl options, sampler, sampling steps)
RECIPES: dict[str, tuple[str, dict[str, object], str, int]] = {
    "seed": ("seed", {}, "ddim", 50),
    "demo": ("demo", {}, "ddim", 50),
    "house": ("house", {}, "dpmpp2m", 20),
    "demo-dpm20": ("demo", {}, "dpmpp2m", 20),
    "demo-minsnr": ("demo", {"loss_weighting": "min_snr"}, "dpmpp2m", 20),
    "minsnr-g8": ("demo", {"loss_weighting": "min_snr", "norm_groups": 8}, "dpmpp2m", 20),
    "minsnr-g8-lr1e-3": ("demo", {"loss_weighting": "min_snr", "norm_groups": 8, "learning_rate": 1e-3}, "dpmpp2m", 20),
    "w48-minsnr-g8": ("demo", {"loss_weighting": "min_snr", "norm_groups": 8, "starting_channels": 48}, "dpmpp2m", 20),
    "eps-minsnr": ("demo", {"prediction_type": "epsilon", "loss_weighting": "min_snr"}, "dpmpp2m", 20),
    "demo-g8": ("demo", {"norm_groups": 8}, "dpmpp2m", 20),
    "edm": ("demo", {"formulation": "edm"}, "heun", 10),
    "edm-g8": ("demo", {"formulation": "edm", "norm_groups": 8}, "heun", 10),
    "edm-g8-lr1e-3": ("demo", {"formulation": "edm", "norm_groups": 8, "learning_rate": 1e-3}, "heun", 10),
    "edm-g8-ema5k": ("demo", {"formulation": "edm", "norm_groups": 8, "ema_halflife_images": 5000}, "heun", 10),
    "edm-g8-ema2k": ("demo", {"formulation": "edm", "norm_groups": 8, "ema_halflife_images": 2000}, "heun", 10),
}

# Recipes whose network is slower than the demo's train for the same minutes, not the same images: the share of
# the demo's images they see in that time (training speed ratio measured here, 1 torch thread, 2026-12-05).
EQUAL_MINUTES_SHARE = {"w48-minsnr-g8": 0.46}


def command(label: str, args: argparse.Namespace, extra: list[str] | None = None) -> list[str]:
    recipe, options, sampler, steps = RECIPES[label]
    images = int(args.images * EQUAL_MINUTES_SHARE.get(label, 1.0)) // 32 * 32
    cmd = [sys.executable, str(QUALITY), "--recipe", recipe, "--images", str(images), "--num", str(args.num),
           "--sampler", sampler, "--steps", str(steps), "--out", str(args.out)]
    for key, value in options.items():
        cmd += ["--set", f"{key}={value}"]
    return cmd + (extra or [])


def run_one(cmd: list[str], label: str, log: Path, threads: int) -> dict | None:
    """One quality.py run; its JSON line goes into ``log`` under ``label``."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        print(f"# {label} failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}", flush=True)
        return None
    row = {"label": label, "wall_seconds": time.perf_counter() - started, "date": time.strftime("%Y-%m-%d"),
           "command": " ".join(cmd[1:]), **json.loads(lines[-1])}
    with open(log, "a") as fh:
        fh.write(json.dumps(row) + "\n")
    print(f"# {label}: FD {row['scores']['fd']:.2f} in {row['wall_seconds']:.0f} s", flush=True)
    return row


def table(log: Path) -> str:
    """A markdown table of the newest row of each label in ``log``."""
    rows: dict[str, dict] = {}
    for line in log.read_text().splitlines() if log.is_file() else []:
        row = json.loads(line)
        rows[row["label"]] = row
    out = ["| recipe | options | sampler | FD | confidence | coverage TV | memorization | images |",
           "|---|---|---|---|---|---|---|---|"]
    floor = next(iter(rows.values()), {}).get("floor")
    for label, r in rows.items():
        s, samp = r["scores"], r.get("samples", {})
        opts = ", ".join(f"{k}={v}" for k, v in r.get("options", {}).items()) or "-"
        images = r.get("budget", {}).get("images", "-")
        out.append(f"| {label} | {opts} | {samp.get('sampler', '?')}-{samp.get('steps', '?')} | {s['fd']:.2f} | "
                   f"{s['confidence']:.3f} | {s['coverage_tv']:.3f} | {s['memorization']:.3f} | {images} |")
    if floor:
        out.append(f"| real held-out images (floor) | | | {floor['fd']:.2f} | {floor['confidence']:.3f} | "
                   f"{floor['coverage_tv']:.3f} | {floor['memorization']:.3f} | |")
    return "\n".join(out)


def plot(logs: list[Path], out: Path) -> None:
    """FD against training minutes on the 2-core CPU (images / the demo recipe's measured speed), one line a recipe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[str, dict[float, float]] = {}
    for log in logs:
        for row in (json.loads(x) for x in log.read_text().splitlines()) if log.is_file() else []:
            minutes = row["budget"]["images"] / DEMO_IMAGES_PER_MINUTE
            lines.setdefault(row["label"], {})[minutes] = row["scores"]["fd"]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, points in sorted(lines.items()):
        if len(points) > 1:
            xs = sorted(points)
            ax.plot(xs, [points[x] for x in xs], marker="o", label=label)
            print(f"# {label}: " + ", ".join(f"{x:.1f} min FD {points[x]:.2f}" for x in xs))
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"training minutes on a 2-core CPU (images / {DEMO_IMAGES_PER_MINUTE / 60:.0f} img/s)")
    ax.set_ylabel("FD in the judge's features (lower is better)")
    ax.set_title(f"quality against training time ({time.strftime('%Y-%m-%d')})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    print(f"# wrote {out}")


def resample(label: str, sampler: str, steps: int, checkpoint: str, args: argparse.Namespace, tag: str) -> dict | None:
    """Sample a finished run's checkpoint again and score the folder (quality.py --score-only)."""
    folder = args.out / "resampled" / f"{label}-{tag}-{sampler}{steps}"
    sample = [sys.executable, "-m", "ddpmctl", "sample", "--checkpoint", checkpoint, "--out", str(folder), "--num",
              str(args.num), "--sampler", sampler, "--steps", str(steps), "--device", "cpu", "--force"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    if subprocess.run(sample, capture_output=True, text=True, env=env).returncode != 0:
        print(f"# sampling {label} {tag} failed", flush=True)
        return None
    return run_one([sys.executable, str(QUALITY), "--score-only", str(folder), "--out", str(args.out)],
                   f"{label}@{tag}:{sampler}-{steps}", args.curves, args.threads)


def newest(log: Path, label: str) -> dict:
    rows = [json.loads(x) for x in log.read_text().splitlines()] if log.is_file() else []
    found = [r for r in rows if r["label"] == label]
    if not found:
        sys.exit(f"no finished run of {label} in {log}: run it first")
    return found[-1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help=f"recipes to run (default all: {', '.join(RECIPES)})")
    ap.add_argument("--images", type=int, default=DEMO_8_MINUTES, help="training images per recipe")
    ap.add_argument("--num", type=int, default=1000, help="samples scored per recipe")
    ap.add_argument("--jobs", type=int, default=2, help="runs at once")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "quality")
    ap.add_argument("--log", type=Path, default=ROOT / "runs" / "quality" / "sweep.jsonl")
    ap.add_argument("--curves", type=Path, default=ROOT / "runs" / "quality" / "curves.jsonl")
    ap.add_argument("--table", action="store_true", help="only print the table of --log")
    ap.add_argument("--plot", nargs="*", type=Path, metavar="LOG", help="only plot FD against minutes (--log + LOGs)")
    ap.add_argument("--plot-out", type=Path, default=ROOT / "docs" / "images" / "quality_vs_minutes.png")
    ap.add_argument("--steps-curve", metavar="LABEL", help="re-sample LABEL's run at 10/20/50/100 steps")
    ap.add_argument("--samplers", nargs="*", default=None, help="samplers for --steps-curve (default: the run's)")
    ap.add_argument("--checkpoints", metavar="LABEL", help="score every checkpoint LABEL's run kept")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.table:
        print(table(args.log))
        return 0
    if args.plot is not None:
        plot([args.log, *args.plot], args.plot_out)
        return 0
    if args.steps_curve:
        row = newest(args.log, args.steps_curve)
        samplers = args.samplers or [row["samples"]["sampler"]]
        jobs = [(s, n) for s in samplers for n in (10, 20, 50, 100)]
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda j: resample(args.steps_curve, j[0], j[1], row["checkpoint"], args, "final"), jobs))
        return 0
    if args.checkpoints:
        row = newest(args.log, args.checkpoints)
        run_dir = Path(row["checkpoint"]).parent
        sampler, steps = row["samples"]["sampler"], row["samples"]["steps"]
        found = sorted(run_dir.glob("checkpoint_*"), key=lambda p: int(p.name.split("_")[1]))
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda c: resample(args.checkpoints, sampler, steps, str(c), args, c.name), found))
        return 0
    labels = args.only or list(RECIPES)
    unknown = [x for x in labels if x not in RECIPES]
    if unknown:
        sys.exit(f"unknown recipe {', '.join(unknown)}; pick from {', '.join(RECIPES)}")
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda label: run_one(command(label, args), label, args.log, args.threads), labels))
    print(table(args.log))
    return 0


if __name__ == "__main__":
    sys.exit(main())
