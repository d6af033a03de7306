"""Classifier-free guidance scale w against class accuracy and diversity: the measurement behind
``sampling.DEFAULT_GUIDANCE`` (docs/classes.md).

    nice .venv/bin/python benchmarks/guidance_scale.py                      # a few minutes on 2 CPU cores
    nice .venv/bin/python benchmarks/guidance_scale.py --grid-out docs/images/classes_grid.png

Trains a small class-conditional model on the demo's shapes in class folders (discs/, squares/,
triangles/; ``make_demo_dataset(classes=3)``), then samples ``--per-class`` images of each class at each
w and prints, per w:

- accuracy: the share of samples a simple judge puts in the class asked for. The judge is a tiny CNN
  (three convolutions, 15k parameters) trained for a few seconds on half the real images' coverage maps
  (the shape cut out of its background, colour aside; blurred half the time, as samples are softer than
  the drawings); its accuracy on the other half is printed first. (A rule without training, how much of
  its bounding box a shape fills, judged 96% of the real images right but took the samples' soft-edged
  squares for discs.)
- FD: the Frechet distance between the samples and the real images of their class, in a plain feature
  space (each image average-pooled to 4 x 4 x 3 = 48 numbers), averaged over the classes: fidelity and
  diversity together, as FID is, without a network.
- std: the pixel standard deviation across the samples of a class (averaged), beside the real images':
  how much guidance narrows each class.

The run is kept in ``--work``: a rerun with the same options samples again without training. Prints a
table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ddpmctl import config as config_mod  # noqa: E402
from ddpmctl.demo_data import DEMO_CLASSES, make_demo_dataset  # noqa: E402
from ddpmctl.engine import train  # noqa: E402
from ddpmctl.images import find_images  # noqa: E402
from ddpmctl.inference import iter_samples, load_model  # noqa: E402
from ddpmctl.sampling import save_png, tile  # noqa: E402

SCALES = (0.0, 0.5, 1.0, 2.0, 3.0, 5.0)


def coverage(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, S, S) in [-1, 1] -> (N, 1, S, S) in [0, 1]: how much of each pixel the shape covers, colour aside
    (the brightest channel, from the background's level (the border's median) to the shape's)."""
    m = images.amax(1, keepdim=True)
    border = torch.cat([m[:, :, 0], m[:, :, -1], m[:, :, :, 0], m[:, :, :, -1]], 2)
    background = border.median(2).values[..., None, None]
    return ((m - background) / (m.amax((2, 3), keepdim=True) - background).clamp(min=0.1)).clamp(0, 1)


def train_judge(real: dict[int, torch.Tensor], steps: int = 600) -> tuple[nn.Module, float]:
    """A tiny CNN telling the shapes apart on their coverage maps, trained on half the real images (blurred half
    the time: samples are softer than the drawings); returns it and its accuracy on the other half."""
    torch.manual_seed(0)
    x = torch.cat([coverage(real[k]) for k in sorted(real)])
    y = torch.cat([torch.full((len(real[k]),), k) for k in sorted(real)])
    order = torch.randperm(len(x))
    train_idx, test_idx = order[: len(x) // 2], order[len(x) // 2:]
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                        nn.ReLU(), nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(32, len(real)))
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    blur = torch.full((1, 1, 3, 3), 1 / 9)
    for _ in range(steps):
        idx = train_idx[torch.randint(len(train_idx), (128,))]
        batch = torch.where(torch.rand(len(idx), 1, 1, 1) < 0.5, F.conv2d(x[idx], blur, padding=1), x[idx])
        loss = F.cross_entropy(net(batch), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        return net, (net(x[test_idx]).argmax(1) == y[test_idx]).float().mean().item()


def features(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, S, S) -> (N, 48) float64: each image average-pooled to 4 x 4."""
    return F.adaptive_avg_pool2d(images.float(), 4).flatten(1).double()


def frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets: |mu_a - mu_b|^2 + Tr(A + B - 2 (A B)^(1/2))."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    vals, vecs = torch.linalg.eigh(cov_a)
    root_a = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()  # Tr (A B)^(1/2)
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


def real_images(root: Path, name: str) -> torch.Tensor:
    files = find_images(root / name)
    return torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in files]
                       ).float() / 127.5 - 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "guidance")
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--num-images", type=int, default=3000)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--per-class", type=int, default=128)
    p.add_argument("--sampling-steps", type=int, default=25)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--grid-out", type=Path, help="write a per-class grid (8 samples a row, at the default w) here")
    p.add_argument("--grid-scale", type=int, default=4, help="upscale the grid by this (nearest neighbour)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from ddpmctl.sampling import DEFAULT_GUIDANCE

    data = make_demo_dataset(args.work / "data", args.num_images, args.size, seed=0, classes=3)
    opts = {
        "experiment_name": f"shapes{args.size}_{args.steps}", "path_to_data": str(data),
        "working_directory": str(args.work / "working"), "generated_directory": str(args.work / "generated"),
        "device": "cpu", "seed": 0, "img_size": args.size, "starting_channels": 32, "norm_groups": 8,
        "channel_multipliers": "1,2,2", "attention_resolutions": str(args.size // 4), "num_heads": 4,
        "num_diffusion_timesteps": 1000, "beta_schedule": "cosine", "prediction_type": "v",
        "num_training_steps": args.steps, "batch_size": 32, "learning_rate": 2e-3, "warmup_steps": 100,
        "ema_decay": 0.999, "evaluation_interval": args.steps, "num_workers": 0, "sampler": "ddim",
        "sampling_steps": 25, "log_interval": 50, "num_keep_checkpoints": 1,
    }
    cfg = config_mod.resolve(None, opts)
    started = time.perf_counter()
    if not (cfg.run_dir / f"checkpoint_{args.steps}").is_dir():
        train(cfg)
    train_s = time.perf_counter() - started
    loaded = load_model(cfg.run_dir, device="cpu")
    names = loaded.config.model.class_names
    assert names == DEMO_CLASSES, names

    real = {k: real_images(data, n) for k, n in enumerate(names)}
    judge, judged = train_judge(real)
    real_std = float(np.mean([real[k].std(0).mean().item() for k in real]))
    print(f"{len(names)} classes of {args.size}px shapes, {sum(len(v) for v in real.values())} real images; "
          f"{args.steps} training steps ({train_s:.0f} s, 0 if reused); the judge on the real images: "
          f"{judged:.1%} right (held out); real per-class pixel std {real_std:.3f}")
    print(f"{'w':>4} {'accuracy':>9} {'FD':>8} {'std':>7} {'seconds':>8}")
    rows, grids = [], {}
    for w in SCALES:
        t0 = time.perf_counter()
        acc, fds, stds = [], [], []
        for k in range(len(names)):
            labels = [k] * args.per_class
            x = torch.cat([b.images for b in iter_samples(loaded, args.per_class, "dpmpp2m", args.sampling_steps,
                                                          seed=k, labels=labels, guidance=w)])
            with torch.no_grad():
                acc.append((judge(coverage(x)).argmax(1) == k).float().mean().item())
            fds.append(frechet(features(x), features(real[k])))
            stds.append(x.std(0).mean().item())
            grids.setdefault(w, []).append(x[:8])
        row = {"w": w, "accuracy": float(np.mean(acc)), "fd": float(np.mean(fds)), "std": float(np.mean(stds)),
               "per_class_accuracy": dict(zip(names, acc, strict=True)), "seconds": time.perf_counter() - t0}
        rows.append(row)
        print(f"{w:>4g} {row['accuracy']:>9.1%} {row['fd']:>8.4f} {row['std']:>7.3f} {row['seconds']:>8.0f}", flush=True)
    if args.grid_out is not None:
        w = DEFAULT_GUIDANCE if DEFAULT_GUIDANCE in grids else SCALES[0]
        grid = tile(torch.cat(grids[w]), 8)
        grid = F.interpolate(grid[None], scale_factor=args.grid_scale, mode="nearest")[0]
        save_png(grid, args.grid_out)
        print(f"grid of {len(names)} classes x 8 samples at w {w:g}: {args.grid_out}")
    print(json.dumps({"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                      "size": args.size, "steps": args.steps, "per_class": args.per_class,
                      "judge_on_real": judged, "real_std": real_std, "rows": rows}))


if __name__ == "__main__":
    main()
