"""Load a trained model from a checkpoint (its config travels inside) and generate images in batches."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import checkpoints, rundir
from .config import Config, complete_saved, from_dict
from .diffusion import Schedule
from .errors import CheckpointError, DdpmctlError
from .runtime import (
    Precision,
    build_model,
    classify_oom,
    generator_device,
    prepare_for_sampling,
    release_cached_memory,
    resolve_precision,
    select_device,
)
from .sampling import (
    DEFAULT_GUIDANCE,
    MAX_CLASS_ROWS,
    SampleResult,
    SamplingGraphs,
    progression_grid,
    sample,
    sampler_timesteps,
    sampling_network,
    save_png,
    tile,
)


@dataclass
class LoadedModel:
    model: nn.Module
    schedule: Schedule
    config: Config
    checkpoint: Path
    step: int
    ema: bool  # whether the EMA weights were loaded
    device: torch.device
    precision: Precision
    notes: list[str]
    graphs: SamplingGraphs | None = None  # CUDA: deterministic sampling loops replayed as CUDA graphs


def load_model(path: str | Path, device: str = "auto", use_ema: bool = True, precision: str = "auto",
               compile: bool = False, cuda_graph: bool = True) -> LoadedModel:
    """Rebuild the network from the checkpoint's own config and load its (EMA) weights.

    ``compile`` runs it through torch.compile (CUDA graphs on CUDA): slow first batch, faster afterwards.
    ``cuda_graph``: on CUDA, deterministic sampling loops replay as captured graphs (sampling.SamplingGraphs).
    """
    ckpt, notes = rundir.locate(path)
    meta = checkpoints.read_meta(ckpt)
    cfg = from_dict(complete_saved(meta.get("config", {})), source=f"{ckpt}/meta.json")
    dev = select_device(device)
    model = build_model(cfg)
    has_ema = (ckpt / checkpoints.EMA).is_file()
    if use_ema and not has_ema:
        notes.append(f"{ckpt.name} has no EMA weights; sampling with the raw weights")
    name = checkpoints.EMA if use_ema and has_ema else checkpoints.MODEL
    try:
        model.load_state_dict(checkpoints.load_weights(ckpt, name))
    except RuntimeError as exc:
        raise CheckpointError(f"{ckpt / name} does not match its config: {str(exc).splitlines()[0]}") from None
    schedule = Schedule(cfg.diffusion, dev)
    model = sampling_network(model.to(dev).eval().requires_grad_(False), schedule)
    model = prepare_for_sampling(model, dev, compile)
    prec = resolve_precision(precision, dev)
    return LoadedModel(model, schedule, cfg, ckpt, int(meta["step"]),
                       use_ema and has_ema, dev, prec, notes,
                       SamplingGraphs() if cuda_graph and dev.type == "cuda" else None)


@dataclass
class SampleProgress:
    """Where a batched sampling run stands; ``units`` are image-steps, so batch-size changes keep the bar honest."""

    units_done: int
    units_total: int
    images_done: int
    images_total: int
    batch_size: int
    note: str | None = None  # e.g. a batch size halved after running out of memory


@dataclass
class SampledBatch:
    start: int  # index of the first image of the batch
    images: torch.Tensor  # (B, 3, H, W) in [-1, 1], float32 on the CPU
    result: SampleResult = field(repr=False)


def image_seed(seed: int, index: int, stream: int) -> int:
    """The seed of image ``index``'s x_T (stream 0) or step noise (stream 1): independent of the batching."""
    return ((seed % (1 << 31)) * 1_000_003 + index) * 2 + stream


def initial_noise(seed: int, start: int, n: int, size: int) -> torch.Tensor:
    """x_T for images start..start+n-1, drawn on the CPU so it is the same on every device: (n, 3, size, size)."""
    gens = [torch.Generator(device="cpu").manual_seed(image_seed(seed, start + i, 0)) for i in range(n)]
    return torch.stack([torch.randn((3, size, size), generator=g) for g in gens])


def step_generators(seed: int, start: int, n: int, device: torch.device) -> list[torch.Generator]:
    """The per-step noise generators of images start..start+n-1, on runtime.generator_device (the CPU for MPS)."""
    where = generator_device(device)
    return [torch.Generator(device=where).manual_seed(image_seed(seed, start + i, 1)) for i in range(n)]


def iter_samples(
    loaded: LoadedModel,
    num: int,
    sampler: str = "ddpm",
    steps: int | None = None,
    eta: float = 0.0,
    seed: int = 0,
    batch_size: int = 64,
    record_first: bool = False,
    plot_freq_interval: int | None = None,
    max_frames: int = 24,
    on_progress: Callable[[SampleProgress], None] | None = None,
    labels: Sequence[int] | None = None,
    guidance: float | None = None,
) -> Iterator[SampledBatch]:
    """Yield ``num`` samples in batches of at most ``batch_size``, halving the batch if memory runs out.

    Image i's x_T and per-step noise come from (seed, i) alone, so the same seed gives the same images
    on the same device whatever the batch size (up to floating-point differences between batch shapes).
    With ``record_first`` the first batch also records progression frames. A class-conditional model draws
    image i of class ``labels[i]`` (default: the classes in turn, i mod their number) with classifier-free
    guidance ``guidance`` (default: DEFAULT_GUIDANCE).
    """
    if num < 1:
        return
    classes = len(loaded.config.model.class_names)
    if classes:
        labels = list(labels) if labels is not None else [i % classes for i in range(num)]
        guidance = DEFAULT_GUIDANCE if guidance is None else guidance
    elif labels is not None or guidance:
        raise ValueError("labels and guidance need a class-conditional model")
    size = loaded.config.model.img_size
    n_steps = len(sampler_timesteps(loaded.schedule.num_steps, sampler, steps))
    every = plot_freq_interval or loaded.config.sampling.plot_freq_interval
    total = num * n_steps
    done_units = 0
    start = 0
    bs = max(1, batch_size)
    note: str | None = None
    while start < num:
        n = min(bs, num - start)
        noise = initial_noise(seed, start, n, size).to(loaded.device)
        gens = step_generators(seed, start, n, loaded.device)

        def progress(i: int, _n: int, base: int = done_units, width: int = n, images: int = start, cur: int = bs) -> None:
            nonlocal note
            if on_progress is not None:
                on_progress(SampleProgress(base + i * width, total, images, num, cur, note))
                note = None

        try:
            batch_labels = None if not classes else torch.tensor(labels[start:start + n], device=loaded.device)
            result = sample(
                loaded.model, loaded.schedule, noise, sampler=sampler, steps=steps, eta=eta, generator=gens,
                record_every=every, max_frames=max_frames, record=record_first and start == 0,
                autocast=loaded.precision.autocast, callback=progress, graphs=loaded.graphs,
                labels=batch_labels, guidance=guidance or 0.0,
            )
            if loaded.graphs is not None and loaded.graphs.failed and loaded.graphs.failed not in loaded.notes:
                loaded.notes.append(loaded.graphs.failed)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled; the rest is re-raised
            if classify_oom(exc) is None:
                raise
            del noise, gens
            release_cached_memory(loaded.device)
            if n <= 1:
                raise DdpmctlError(f"out of memory on {loaded.device} even for one image; "
                                   "try --device cpu or a smaller --precision") from None
            bs = max(1, n // 2)
            note = f"out of memory at batch size {n}; continuing with --batch-size {bs}"
            if on_progress is not None:
                on_progress(SampleProgress(done_units, total, start, num, bs, note))
                note = None
            continue
        done_units += n * n_steps
        start += n
        yield SampledBatch(start - n, result.images, result)
    if on_progress is not None:
        on_progress(SampleProgress(total, total, num, num, bs))


OUTPUT_PATTERNS = ("sample_*.png", "samples.png", "progression.png")  # what generate writes


def earlier_outputs(out_dir: str | Path, force: bool = False) -> list[Path]:
    """The files of an earlier generate run in ``out_dir`` (to be replaced: only with ``force``).

    Raises DdpmctlError when ``out_dir`` is a file, or when it holds earlier samples and ``force`` is off,
    so new samples are never mixed with (or silently written over) old ones.
    """
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise DdpmctlError(f"--out {out} is a file; pass a folder for the PNG files")
    if not out.is_dir():
        return []
    found = sorted({p for pattern in OUTPUT_PATTERNS for p in out.glob(pattern) if p.is_file()})
    if found and not force:
        raise DdpmctlError(f"--out {out} already holds {len(found)} file(s) from an earlier run ({found[0].name}, ...); "
                           "pass another folder, or --force to replace them")
    return found


@dataclass
class GenerateResult:
    images: list[Path]  # sample_<i>.png, in order
    grid: Path | None = None  # progression.png
    sheet: Path | None = None  # samples.png
    notes: list[str] = field(default_factory=list)  # e.g. a batch size halved after running out of memory
    replaced: int = 0  # files of an earlier run deleted first (force)


def generate(
    loaded: LoadedModel,
    out_dir: str | Path,
    num: int,
    *,
    sampler: str = "ddpm",
    steps: int | None = None,
    eta: float = 0.0,
    seed: int = 0,
    batch_size: int = 64,
    grid: bool = False,
    show_x0: bool = False,
    plot_freq_interval: int | None = None,
    contact_sheet: bool = False,
    grid_rows: int = 8,
    force: bool = False,
    on_progress: Callable[[SampleProgress], None] | None = None,
    class_index: int | None = None,
    guidance: float | None = None,
) -> GenerateResult:
    """Write ``num`` PNGs (sample_00000.png, ...) into ``out_dir``, each atomically.

    ``grid`` adds progression.png (noise to image, a row per sample, at most ``grid_rows`` rows);
    ``contact_sheet`` adds samples.png, all images (up to 256) tiled in one picture. An ``out_dir`` that
    already holds such files is refused unless ``force``, which deletes them first.
    A class-conditional model draws class ``class_index``, or, when None, the classes in turn: both
    pictures then show one row per class (the first MAX_CLASS_ROWS of them in progression.png).
    ``guidance``: the classifier-free guidance scale (default: DEFAULT_GUIDANCE).
    """
    classes = len(loaded.config.model.class_names)
    per_class = classes > 0 and class_index is None
    labels = [class_index] * num if class_index is not None else [i % classes for i in range(num)] if classes else None
    out = Path(out_dir).expanduser()
    earlier = earlier_outputs(out, force)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DdpmctlError(f"cannot create --out {out}: {exc.strerror or exc}") from None
    for p in earlier:
        p.unlink(missing_ok=True)
    digits = max(5, len(str(num - 1)))
    res = GenerateResult(images=[], replaced=len(earlier))
    first: SampleResult | None = None
    sheet: list[torch.Tensor] = []

    def track(p: SampleProgress) -> None:
        if p.note:
            res.notes.append(p.note)
        if on_progress is not None:
            on_progress(p)

    for batch in iter_samples(loaded, num, sampler, steps, eta, seed, batch_size, record_first=grid,
                              plot_freq_interval=plot_freq_interval, on_progress=track, labels=labels,
                              guidance=guidance):
        if first is None:
            first = batch.result
        if contact_sheet and len(sheet) < 256:
            sheet.extend(batch.images[: 256 - len(sheet)])
        for i, img in enumerate(batch.images):
            res.images.append(save_png(img, out / f"sample_{batch.start + i:0{digits}d}.png"))
    if sheet and per_class:  # a row per class: image i is of class i mod classes, short rows padded white
        rows_of = [sheet[k::classes] for k in range(classes)]
        width = max(len(r) for r in rows_of)
        blank = torch.ones_like(sheet[0])
        res.sheet = save_png(tile(torch.stack([r[j] if j < len(r) else blank for r in rows_of for j in range(width)]),
                                  width), out / "samples.png")
    elif sheet:
        res.sheet = save_png(tile(torch.stack(sheet), math.ceil(math.sqrt(len(sheet)))), out / "samples.png")
    if grid and first is not None:
        rows = min(first.images.shape[0], min(classes, MAX_CLASS_ROWS) if per_class else grid_rows)
        first = SampleResult(first.images[:rows], [f[:rows] for f in first.frames],
                             [f[:rows] for f in first.frames_x0], first.frame_steps)
        res.grid = save_png(progression_grid(first, show_x0), out / "progression.png")
    return res
