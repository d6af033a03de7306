"""What to train in H hours on this machine (``ddpmctl doctor --hours H``), and the recipe every suggestion uses.

The question a user brings to ``doctor`` is not "how long would the default model take" but "what gives me the
best pictures in the hours I have". The answer here comes from two measurements:

* the speed of each image size x width on this machine (the doctor's table: measured or extrapolated), so
  the images a model sees in H hours are ``images/s * 3600 * H``;
* how many training images a model needs before its samples stop improving quickly (the knee of the
  quality-vs-images curve of ``benchmarks/quality_sweep.py``, docs/quality.md): a model that sees fewer
  has not learned its data's shapes yet, however large it is.

The plan is the largest image size (up to the asked one), then the widest network, that reaches the knee in
the time given, trained with :data:`RECIPE` for exactly as many steps as fit.
"""

from __future__ import annotations

import shlex

from .doctor_report import Cell, HoursPlan
from .memfit import recommend

# The recipe that won the side-by-side benchmark (docs/quality.md): the demo and Mac presets use it too
# (tests/test_budget.py checks they agree). ddpmctl options, as `train` spells them. Cosine + v-prediction
# (Salimans & Ho) with Min-SNR-5 weights (Hang et al. 2023) and 8 GroupNorm groups in every layer; the EMA is
# EDM's half-life, which its ramp holds at 5% of the images seen for any run under 10M images. The learning
# rate is EDM's for its 56M-parameter CIFAR-10 net: 2e-3 measured 5% lower FD on the 1.1M-parameter benchmark
# net (the demo keeps it), but plans train nets up to 50x larger.
RECIPE: dict[str, str] = {
    "beta-schedule": "cosine",
    "prediction-type": "v",
    "loss-weighting": "min_snr",
    "norm-groups": "8",
    "learning-rate": "1e-3",
    "ema-halflife-images": "500000",
}
# Training images at the knee of the quality-vs-images curve (docs/quality.md: on the 32 px benchmark FD fell 17%
# from 34k to 69k images and 7% more to 137k). A floor: larger and more varied images need more.
IMAGES_FOR_GOOD_SAMPLES = 70_000


def warmup_for(num_training_steps: int) -> int:
    """Learning-rate warmup for a run of this length: a tenth of it, between 10 and 1,000 steps."""
    return max(10, min(1000, num_training_steps // 10))


def recipe_options(num_training_steps: int) -> list[str]:
    """:data:`RECIPE` and a warmup that suits the run's length, as command-line words."""
    words = [w for key, value in RECIPE.items() for w in (f"--{key}", value)]
    return words + ["--warmup-steps", str(warmup_for(num_training_steps))]


def _usable(cell: Cell) -> tuple[int, float, bool] | None:
    """(largest batch, images/s, checkpointing) for a cell that fits at all, without checkpointing if it can."""
    if cell.max_batch and cell.images_per_sec:
        return cell.max_batch, cell.images_per_sec, False
    if cell.max_batch_checkpointing and cell.images_per_sec_checkpointing:
        return cell.max_batch_checkpointing, cell.images_per_sec_checkpointing, True
    return None


def plan_hours(table: list[Cell], hours: float, max_img_size: int, effective_batch: int,
               config_file: str | None = None) -> HoursPlan | None:
    """The model to train in ``hours`` from the doctor's ``table``; None when no cell fits at all."""
    seconds = hours * 3600
    options = [(c, *u) for c in table if c.img_size <= max_img_size and (u := _usable(c))]
    if not options:
        return None
    enough = [o for o in options if o[2] * seconds >= IMAGES_FOR_GOOD_SAMPLES]
    if enough:  # the largest size, then the widest network (more parameters learn more per image), that gets there
        cell, max_batch, ips, ckpt = max(enough, key=lambda o: (o[0].img_size, o[0].parameters))
        why = (f"the largest size and width that see {IMAGES_FOR_GOOD_SAMPLES:,} training images (where samples "
               f"stop improving quickly on the quality benchmark) in {hours:g} h")
    else:  # nothing gets there: the model that sees the most images
        cell, max_batch, ips, ckpt = max(options, key=lambda o: o[2])
        why = (f"no model here sees {IMAGES_FOR_GOOD_SAMPLES:,} training images in {hours:g} h; this one sees the "
               f"most: expect rough samples, or give it more hours")
    batch, accum = recommend(max_batch, effective_batch)
    steps = max(1, int(ips * seconds / (batch * accum)))
    words = ["ddpmctl", "train"] + (["--config", config_file] if config_file else [])
    words += ["--img-size", str(cell.img_size), "--starting-channels", str(cell.starting_channels),
              "--batch-size", str(batch), "--gradient-accumulation-steps", str(accum),
              "--num-training-steps", str(steps)] + (["--gradient-checkpointing"] if ckpt else [])
    words += recipe_options(steps)
    return HoursPlan(hours, cell.img_size, cell.starting_channels, batch, accum, ckpt, ips, steps,
                     steps * batch * accum, bool(enough), shlex.join(words), why)
