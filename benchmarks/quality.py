"""Sample quality offline, on this machine, in minutes: train a ddpmctl recipe for a fixed budget, sample, score.

    python benchmarks/quality.py --quick --recipe demo                # ~10 min on 2 idle cores, the first time
    python benchmarks/quality.py --recipe seed --images 40000 --num 1000 --sampler ddim --steps 50
    python benchmarks/quality.py --recipe demo --set ema_decay=0.9995 --set learning_rate=1e-3 --minutes 8
    python benchmarks/quality.py --score-only runs/samples/demo          # any folder of 32 px PNGs

**The image set** (``quality_data.py``, drawn here from ``--data-seed``, no download; cached under
``runs/quality/data-v<version>-<seed>/`` as PNG folders): 32 px scenes, each with one large rotated main
object (disc, square or triangle) filled with stripes, checks or dots, small solid distractors behind
it, specks and thin lines on top, on a colour-gradient background. Label = kind x texture (9 labels).
4000 ``train`` images (ddpmctl and the judge train on them), 1000 ``ref`` (held-out reference) and 1000
``val`` (other held-out images, for the floor).

**The judge** (``quality_judge.py``): a 7-layer CNN trained on ``train`` to predict the labels (CPU,
1-2 minutes on 2 idle cores, cached as safetensors beside the data). Its held-out accuracy is printed;
its 128 pooled penultimate features are the feature space of FD.

**The scores** (lower is better except confidence): ``fd`` (Fréchet distance to ``ref`` in the judge's
features), ``confidence`` (mean top softmax probability of the judge; at most ~0.91, as the judge is
trained with label smoothing 0.1), ``coverage_tv`` (total-variation distance between the predicted-label
histograms of the samples and of ``ref``), ``memorization`` (share of samples nearer to a training image
than 95% of held-out images are, in pixels and in the judge's features both; ``ddpmctl.memorization``).
Beside each: the **floor**, the same score for N ``val`` images (what a perfect generator gets at this N,
sampling noise included), and the **ceiling**, for N images of smooth colour noise (a generator that
learnt nothing; white-noise-like samples of a barely trained model can score worse than it). FD depends on N:
compare runs at the same ``--num``, and only between runs whose judge digest (in the JSON) is equal.

**Recipes** are named sets of ddpmctl options laid over ``quality_preset.yaml`` (model, batch, EMA,
precision, device), see ``RECIPES``; ``--set NAME=VALUE`` adds or overrides any ddpmctl option by its
name (``ddpmctl train --help``), so options added to ddpmctl later need no change here.

**The budget** is images seen (``--images``; num_training_steps = images / (batch x accumulation), so the
learning-rate schedule ends with the budget). ``--minutes M`` first measures this config's training speed
here (a short calibration run of the same config) and converts M minutes to images; both are printed.
The last line printed is a JSON object with every figure and the time of each phase.

**Determinism.** The image set is bit-identical for a ``--data-seed`` (numpy + Pillow). The judge, the
training run (``--seed``: weights, data order, noise) and the samples are bit-identical on the same
machine, torch build and thread count, not across CPUs/GPUs (float reduction order). ``--minutes``
budgets depend on the measured speed, so they are not deterministic; ``--images`` budgets are.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

import quality_data  # noqa: E402
import quality_judge  # noqa: E402

from ddpmctl.budget import RECIPE  # noqa: E402
from ddpmctl.config import Config, apply_overrides, resolve  # noqa: E402
from ddpmctl.errors import ConfigError, DdpmctlError  # noqa: E402

PRESET = ROOT / "benchmarks" / "quality_preset.yaml"  # the demo preset before this benchmark changed it
# Each recipe: ddpmctl options (by name) laid over PRESET. Add new ones here; --set tries one-off variants.
RECIPES: dict[str, dict[str, object]] = {
    # The seed's algorithm, the DDPM paper's (Ho et al. 2020): linear betas, epsilon, lr 1e-4, 5000 warmup steps.
    "seed": {"beta_schedule": "linear", "prediction_type": "epsilon", "learning_rate": 1e-4, "warmup_steps": 5000},
    # Today's demo preset as it is: cosine schedule + v-prediction, lr 2e-3, 100 warmup steps.
    "demo": {},
    # The adopted recipe, ddpmctl.budget.RECIPE but its learning rate (configs/demo_cpu.yaml since 2026-12-05):
    # Min-SNR-5 weights, 8 GroupNorm groups, EDM's EMA half-life held at 5% of the images seen by its ramp.
    "house": {key.replace("-", "_"): value for key, value in RECIPE.items() if key != "learning-rate"},
}
# Options the harness sets itself (the rest is the recipe's and --set's).
OWNED = {"path_to_data": "the benchmark's own train set", "working_directory": "--out",
         "generated_directory": "--out", "experiment_name": "the recipe and time", "seed": "--seed",
         "num_training_steps": "--images or --minutes", "img_size": "the 32 px image set",
         "resume_from_checkpoint": "every run starts fresh"}
CALIBRATION_STEPS = 30  # optimizer steps of the speed measurement behind --minutes (the first 5 are not timed)
QUICK = {"minutes": 3.0, "num": 256, "steps": 20}


def log(text: str) -> None:
    print(text, flush=True)


# ----------------------------------------------------------------------------- image set, judge, reference


def prepare(out: Path, data_seed: int, sizes: dict[str, int], judge_epochs: int, times: dict[str, float]):
    """The image set, the judge and the reference statistics (each cached or made now); returns (set, reference)."""
    t = time.perf_counter()
    images = quality_data.load_or_make(out, data_seed, sizes)
    times["data"] = time.perf_counter() - t
    counts = ", ".join(f"{len(v)} {k}" for k, v in images.images.items())
    log(f"image set: {images.root} ({counts}; {'drawn now' if images.generated else 'cached'}) in {times['data']:.1f} s")
    t = time.perf_counter()
    judge, trained = quality_judge.load_or_train(images.root, images.images["train"], images.labels["train"],
                                                 len(quality_data.LABELS), data_seed, judge_epochs)
    times["judge"] = time.perf_counter() - t
    t = time.perf_counter()
    reference = quality_judge.build_reference(judge, images.images["train"], images.images["ref"], images.labels["ref"])
    times["reference"] = time.perf_counter() - t
    log(f"judge: {'trained now' if trained else 'cached'} in {times['judge']:.1f} s; held-out accuracy "
        f"{reference.ref_accuracy:.1%} on {len(images.labels['ref'])} ref images; reference in {times['reference']:.1f} s")
    return images, reference


def report(samples: torch.Tensor, images: quality_data.ImageSet, reference: quality_judge.Reference,
           data_seed: int) -> dict[str, dict[str, float]]:
    """Score ``samples`` (uint8 (N, 3, 32, 32)) beside the floor (N val images) and the ceiling (N noise images)."""
    n = samples.shape[0]
    rows = {
        "samples": quality_judge.score(samples, reference),
        "floor": quality_judge.score(images.images["val"][:n], reference),
        "ceiling": quality_judge.score(quality_judge.noise_images(n, data_seed + 1), reference),
    }
    log(f"\n{'score':<14}{'samples':>10}{'floor (real)':>14}{'ceiling (noise)':>17}   better   (N = {n})")
    for key, better in quality_judge.BETTER.items():
        log(f"{key:<14}{rows['samples'][key]:>10.4f}{rows['floor'][key]:>14.4f}{rows['ceiling'][key]:>17.4f}   {better}")
    return rows


# ----------------------------------------------------------------------------- training a recipe


def parse_sets(items: list[str]) -> dict[str, str]:
    """``["key=value", ...]`` -> dict; refuses the options the harness owns."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: write it as NAME=VALUE, e.g. --set learning_rate=1e-3")
        if key in OWNED:
            raise ConfigError(f"--set {key}: the benchmark sets it ({OWNED[key]})")
        out[key] = value
    return out


def build_config(recipe: str, sets: dict[str, str], data: Path, out: Path, name: str, seed: int) -> Config:
    """PRESET < the recipe's options < --set < what the harness owns (data, folders, seed)."""
    if recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {recipe!r}; pick one of {', '.join(RECIPES)}")
    cfg = apply_overrides(resolve(PRESET, {}), {**RECIPES[recipe], **sets})
    return apply_overrides(cfg, {
        "path_to_data": str(data / "train.npy"), "working_directory": str(out / "work"),
        "generated_directory": str(out / "generated"), "experiment_name": name, "seed": seed,
        "img_size": quality_data.SIZE, "resume_from_checkpoint": None,
    })


def images_per_step(cfg: Config) -> int:
    return cfg.training.batch_size * cfg.training.gradient_accumulation_steps


def calibrate(cfg: Config) -> float:
    """Training images/s of ``cfg`` here: a short run of the same config, its first window untimed."""
    from ddpmctl.engine import train
    from ddpmctl.events import StepStats

    cal = apply_overrides(cfg, {"experiment_name": cfg.run.experiment_name + "-calibration",
                                "num_training_steps": CALIBRATION_STEPS, "log_interval": 5,
                                "evaluation_interval": CALIBRATION_STEPS, "num_generations": 1,
                                "sampler": "ddim", "sampling_steps": 1})
    windows: list[StepStats] = []
    train(cal, lambda e: windows.append(e) if isinstance(e, StepStats) else None)
    shutil.rmtree(cal.run_dir, ignore_errors=True)  # our own scratch run: only its speed was wanted
    shutil.rmtree(cal.generated_dir, ignore_errors=True)
    timed = windows[1:] or windows
    images = 5 * images_per_step(cfg) * len(timed)
    return images / sum(5 * images_per_step(cfg) / w.images_per_sec for w in timed)


def train_recipe(cfg: Config, steps: int) -> tuple[str, float]:
    """Train ``cfg`` for ``steps`` optimizer steps (one checkpoint, at the end); returns (checkpoint, seconds)."""
    from ddpmctl.engine import train
    from ddpmctl.events import Note, StepStats, TrainStarted

    every = max(1, steps // 10)

    def on_event(e: object) -> None:
        if isinstance(e, TrainStarted):
            log(f"training: {e.parameters / 1e6:.2f}M parameters on {e.device} ({e.precision}), {e.data}")
            for note in e.notes:
                log(f"  note: {note}")
        elif isinstance(e, Note):
            log(f"  note: {e.text}")
        elif isinstance(e, StepStats) and (e.step % every < cfg.logging.log_interval or e.step == e.total_steps):
            log(f"  step {e.step:>6}/{e.total_steps}  loss {e.loss:.4f}  lr {e.lr:.2e}  {e.images_per_sec:6.1f} img/s")

    cfg = apply_overrides(cfg, {"num_training_steps": steps, "evaluation_interval": steps, "num_keep_checkpoints": 1})
    t = time.perf_counter()
    result = train(cfg, on_event)
    return str(result.checkpoint), time.perf_counter() - t


def sample_images(checkpoint: str, folder: Path, num: int, sampler: str, steps: int | None, seed: int,
                  device: str, precision: str) -> torch.Tensor:
    """``num`` PNGs from the EMA weights into ``folder`` (plus samples.png), read back as uint8 (N, 3, 32, 32)."""
    from ddpmctl.inference import generate, load_model

    loaded = load_model(checkpoint, device=device, precision=precision)
    generate(loaded, folder, num, sampler=sampler, steps=steps, seed=seed, contact_sheet=True)
    return torch.from_numpy(quality_data.read_png_folder(folder))


def unique_name(out: Path, recipe: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name, i = f"{recipe}-{stamp}-{os.getpid()}", 1  # two runs may start in the same second
    while (out / "work" / name).exists() or (out / "samples" / name).exists():
        name, i = f"{recipe}-{stamp}-{i}", i + 1
    return name


def plan(args: argparse.Namespace, data: Path) -> dict:
    """Config, budget, sampler and sample count of a recipe run, checked before any minute is spent."""
    from ddpmctl.sampling import SAMPLERS

    sets = parse_sets(args.set)
    name = unique_name(args.out, args.recipe)
    cfg = build_config(args.recipe, sets, data, args.out, name, args.seed)
    sampler = args.sampler or cfg.sampling.sampler
    if sampler not in SAMPLERS:
        raise ConfigError(f"--sampler {sampler}: this ddpmctl has {', '.join(SAMPLERS)}")
    steps = args.steps if args.steps is not None else (QUICK["steps"] if args.quick else cfg.sampling.sampling_steps)
    num = args.num or (QUICK["num"] if args.quick else 1000)
    if num > args.heldout_images:
        raise ConfigError(f"--num {num}: the floor needs as many held-out images; use at most "
                          f"{args.heldout_images} (or raise --heldout-images)")
    minutes = args.minutes
    if minutes is None and args.images is None:
        if not args.quick:
            raise ConfigError("give a budget: --images K (images seen) or --minutes M (on this machine), or --quick")
        minutes = QUICK["minutes"]
    return {"cfg": cfg, "name": name, "options": {**RECIPES[args.recipe], **sets}, "sampler": sampler,
            "steps": steps, "num": num, "minutes": minutes}


def run_recipe(args: argparse.Namespace, p: dict, times: dict[str, float]) -> tuple[torch.Tensor, dict]:
    """Calibrate (for --minutes), train, sample; returns the samples and their part of the summary."""
    cfg, per_step = p["cfg"], images_per_step(p["cfg"])
    budget: dict = {"minutes": p["minutes"], "batch": per_step}
    if args.images is not None:
        steps_train = max(1, round(args.images / per_step))
    else:
        t = time.perf_counter()
        speed = calibrate(cfg)
        times["calibration"] = time.perf_counter() - t
        steps_train = max(1, round(p["minutes"] * 60 * speed / per_step))
        budget["calibrated_images_per_sec"] = speed
        log(f"calibration: {speed:.1f} img/s over {CALIBRATION_STEPS} steps ({times['calibration']:.1f} s): "
            f"{p['minutes']:g} min = {steps_train * per_step} images")
    budget.update(images=steps_train * per_step, steps=steps_train)
    log(f"recipe {args.recipe}: {json.dumps(p['options'])} over {PRESET.name}; budget {budget['images']} images = "
        f"{steps_train} steps of {per_step}" + (f" (~{p['minutes']:g} min)" if args.images is None else ""))
    if cfg.training.warmup_steps >= steps_train:
        log(f"  note: warmup_steps {cfg.training.warmup_steps} >= the budget's {steps_train} steps: the learning "
            "rate never reaches its peak")
    checkpoint, times["training"] = train_recipe(cfg, steps_train)
    budget.update(train_seconds=times["training"], images_per_sec=budget["images"] / times["training"])
    log(f"trained in {times['training']:.1f} s ({budget['images_per_sec']:.1f} img/s overall, start, final save and "
        f"grid included): {checkpoint}")
    t = time.perf_counter()
    folder = args.out / "samples" / p["name"]
    samples = sample_images(checkpoint, folder, p["num"], p["sampler"], p["steps"], args.seed, cfg.run.device,
                            args.sample_precision)
    times["sampling"] = time.perf_counter() - t
    log(f"sampled {p['num']} images ({p['sampler']}, {'all' if p['sampler'] == 'ddpm' else p['steps']} steps) in "
        f"{times['sampling']:.1f} s: {folder}")
    return samples, {"recipe": args.recipe, "options": p["options"], "budget": budget, "device": cfg.run.device,
                     "checkpoint": checkpoint,
                     "samples": {"folder": str(folder), "num": p["num"], "sampler": p["sampler"], "steps": p["steps"],
                                 "seed": args.seed, "precision": args.sample_precision}}


def run(args: argparse.Namespace) -> dict:
    """The whole benchmark for parsed ``args``; returns the JSON summary."""
    times: dict[str, float] = {}
    load_before = os.getloadavg()[0]
    log(f"machine: {os.cpu_count()} cores, load average {load_before:.1f}, torch threads {torch.get_num_threads()} "
        "(other work on the cores skews --minutes budgets and every timing)")
    sizes = {"train": args.train_images, "ref": args.heldout_images, "val": args.heldout_images}
    data = args.out / quality_data.folder_name(args.data_seed, sizes)
    p = plan(args, data) if args.score_only is None else None  # refuse bad options before minutes of work
    images, reference = prepare(args.out, args.data_seed, sizes, args.judge_epochs, times)
    summary: dict = {
        "data": {"root": str(images.root), "version": quality_data.VERSION, "seed": args.data_seed, "sizes": sizes},
        "judge": {"accuracy": reference.ref_accuracy, "digest": quality_judge.weights_digest(reference.judge),
                  "epochs": args.judge_epochs, "version": quality_judge.JUDGE_VERSION},
    }
    if p is None:
        samples = torch.from_numpy(quality_data.read_png_folder(args.score_only))
        if samples.shape[0] > args.heldout_images:
            log(f"{args.score_only} holds {samples.shape[0]} images: scoring the first {args.heldout_images} "
                "(the floor has no more held-out images)")
            samples = samples[:args.heldout_images]
        summary["samples"] = {"folder": str(args.score_only), "num": samples.shape[0]}
    else:
        samples, part = run_recipe(args, p, times)
        summary.update(part)
    t = time.perf_counter()
    rows = report(samples, images, reference, args.data_seed)
    times["scoring"] = time.perf_counter() - t
    summary.update(scores=rows["samples"], floor=rows["floor"], ceiling=rows["ceiling"], seconds=times,
                   load_average={"start": load_before, "end": os.getloadavg()[0]}, torch_threads=torch.get_num_threads())
    log("\ntime per phase: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()))
    return summary


def parser() -> argparse.ArgumentParser:
    recipes = "\n".join(f"  {k:<8} {json.dumps(v)}" for k, v in RECIPES.items())
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=f"recipes (ddpmctl options over {PRESET.name}):\n{recipes}")
    ap.add_argument("--recipe", default="demo", help="a named set of ddpmctl options (below)")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="add or override any ddpmctl option, e.g. --set prediction_type=epsilon (repeatable)")
    budget = ap.add_mutually_exclusive_group()
    budget.add_argument("--images", type=int, help="training budget in images seen (deterministic)")
    budget.add_argument("--minutes", type=float, help="training budget in minutes here (measured speed -> images)")
    ap.add_argument("--num", type=int, help="samples to score (default 1000; --quick 256)")
    ap.add_argument("--sampler", help="sampler (default: the config's, e.g. ddim for the demo preset)")
    ap.add_argument("--steps", type=int, help="sampling steps (default: the config's; --quick 20)")
    ap.add_argument("--sample-precision", default="auto", help="precision of sampling: auto (fp32 on CPUs), fp32, bf16")
    ap.add_argument("--seed", type=int, default=0, help="training and sampling seed")
    ap.add_argument("--quick", action="store_true", help="3 training minutes, 256 samples, 20 sampling steps")
    ap.add_argument("--score-only", type=Path, metavar="DIR", help="only score the PNGs in DIR (32 px)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "quality", help="data, judge, runs and samples")
    ap.add_argument("--data-seed", type=int, default=0, help="seed of the image set and of the judge")
    ap.add_argument("--train-images", type=int, default=quality_data.SPLITS["train"], help=argparse.SUPPRESS)
    ap.add_argument("--heldout-images", type=int, default=quality_data.SPLITS["ref"], help=argparse.SUPPRESS)
    ap.add_argument("--judge-epochs", type=int, default=quality_judge.EPOCHS, help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        summary = run(args)
    except DdpmctlError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
