"""Which near-copies does the memorization report catch, in pixels, in the descriptor, and in either?

    nice .venv/bin/python benchmarks/memorization_descriptor.py [--train 1000] [--size 32]

For four synthetic families of images (the demo shapes; smooth colour fields; several shapes on such a
field; 1/f noise, whose spectrum is that of natural photographs), builds the report's reference from
--train images and prints the share of constructed "samples" that fall under the copy threshold: fresh
images from the same generator (should stay near the 5% floor) and copies of training images that were
mirrored, shifted, brightened, desaturated, channel-swapped (recoloured), noisy, blurred or several of
these. The settings of ddpmctl/descriptor.py were chosen from this table. Takes about a minute.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ddpmctl.data import pil_to_uint8  # noqa: E402
from ddpmctl.demo_data import draw_demo_image  # noqa: E402
from ddpmctl.memorization import SPACES, build_reference, check_samples  # noqa: E402


def u8(x: torch.Tensor) -> torch.Tensor:
    return x.round().clamp(0, 255).to(torch.uint8)


def demo(n: int, seed: int, s: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.stack([pil_to_uint8(draw_demo_image(rng, s)) for _ in range(n)])


def field(n: int, seed: int, s: int) -> torch.Tensor:
    """Smooth random colour fields (bicubic upsampled noise)."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.randn(n, 3, 6, 6, generator=g), size=s, mode="bicubic", align_corners=False)
    x = x + 0.3 * F.interpolate(torch.randn(n, 3, 12, 12, generator=g), size=s, mode="bicubic", align_corners=False)
    return u8((x.tanh() + 1) * 127.5)


def scene(n: int, seed: int, s: int) -> torch.Tensor:
    """Two to four shapes of random colours and sizes on a smooth random field: diverse, with edges."""
    rng, bg, out = np.random.default_rng(seed + 100), field(n, seed + 7, s), []
    for i in range(n):
        im = Image.fromarray(bg[i].permute(1, 2, 0).numpy()).resize((s * 4, s * 4))
        draw = ImageDraw.Draw(im)
        for _ in range(int(rng.integers(2, 5))):
            colour, r = tuple(int(v) for v in rng.integers(0, 256, 3)), s * 4 * rng.uniform(0.08, 0.25)
            cx, cy = s * 4 * rng.uniform(0.1, 0.9, 2)
            box = [cx - r, cy - r, cx + r, cy + r * rng.uniform(0.5, 1.5)]
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
        out.append(pil_to_uint8(im.resize((s, s), Image.Resampling.LANCZOS)))
    return torch.stack(out)


def pink(n: int, seed: int, s: int) -> torch.Tensor:
    """1/f amplitude spectrum with random phases: a luminance field plus weaker colour fields."""
    g = torch.Generator().manual_seed(seed + 500)
    amp = 1 / (torch.fft.fftfreq(s).view(-1, 1).square() + torch.fft.rfftfreq(s).view(1, -1).square()).sqrt().clamp_min(1 / s)

    def one(k: int) -> torch.Tensor:
        phase = torch.rand((n, k, s, s // 2 + 1), generator=g) * 2 * torch.pi
        x = torch.fft.irfft2(amp * torch.polar(torch.ones_like(phase), phase), s=(s, s))
        return x / x.flatten(1).std(1).view(-1, 1, 1, 1)

    return u8(127.5 + 45 * (one(1) + 0.4 * one(3)))


def shift(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    s = x.shape[-1]
    p = F.pad(x.float(), (3, 3, 3, 3), mode="replicate")
    return u8(p[..., 3 + dy:3 + dy + s, 3 + dx:3 + dx + s])


def noise(x: torch.Tensor, sigma: float) -> torch.Tensor:
    return u8(x.float() + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(0)))


def blur(x: torch.Tensor) -> torch.Tensor:
    k = torch.tensor([0.25, 0.5, 0.25])
    return u8(F.conv2d(F.pad(x.float(), (1, 1, 1, 1), mode="replicate"), (k[:, None] * k[None]).expand(3, 1, 3, 3),
                       groups=3))


def saturate(x: torch.Tensor, amount: float) -> torch.Tensor:
    f = x.float()
    mean = f.mean(1, keepdim=True)
    return u8(mean + (f - mean) * amount)


def cases(base: torch.Tensor, fresh: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "fresh": fresh, "mirror": base.flip(-1), "shift 1": shift(base, 1, 0), "shift 2,1": shift(base, 2, 1),
        "shift 3,2": shift(base, 3, -2), "bright": u8(base.float() * 0.85 + 20), "desat": saturate(base, 0.6),
        "swap rgb": base[:, [2, 0, 1]], "noise 8": noise(base, 8), "noise 16": noise(base, 16), "blur": blur(base),
        "mir+sh+br": u8(shift(base.flip(-1), 2, 1).float() * 0.9 + 15), "sh+bl+no": noise(blur(shift(base, 2, 0)), 5),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=1000, help="training images per family")
    ap.add_argument("--copies", type=int, default=300, help="training images copied for each kind of copy")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (two spin against each other on a busy "
                                                           "2-core machine: tests/conftest.py)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"share of samples under the copy threshold (5% of training images are, to their nearest other), "
          f"{args.train} training images of {args.size} px, mirror images included\n")
    for family in (demo, field, scene, pink):
        train = family(args.train, 0, args.size)
        ref = build_reference(train)
        table = {name: check_samples(imgs, ref) for name, imgs in
                 cases(train[:args.copies], family(args.copies, 1, args.size)).items()}
        print(f"{family.__name__:7s} {'':8s}" + "".join(f"{name:>10s}" for name in table))
        for space in SPACES:
            print(f"{'':7s} {space:8s}" + "".join(f"{100 * getattr(r, space).share:9.0f}%" for r in table.values()))
        print(f"{'':7s} {'either':8s}" + "".join(f"{100 * r.copy_share:9.0f}%" for r in table.values()), flush=True)


if __name__ == "__main__":
    main()
