"""Reading training data straight from a folder of images."""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image

from ddpmctl.data import ImageFolderDataset
from ddpmctl.errors import DdpmctlWarning


def test_a_broken_file_is_skipped_with_one_warning_not_one_per_epoch(tmp_path: Path) -> None:
    Image.new("RGB", (12, 12), (200, 10, 10)).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"not a png")
    dataset = ImageFolderDataset(tmp_path, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _epoch in range(3):
            images = [dataset[i] for i in range(len(dataset))]
    assert [tuple(x.shape) for x in images] == [(3, 8, 8), (3, 8, 8)]  # b.png's place is taken by a.png
    assert [(w.category, str(w.message).split(" (")[0]) for w in caught] == [
        (DdpmctlWarning, f"skipping unreadable image {tmp_path / 'b.png'}")]


def test_the_cli_shows_it_as_one_warning_line(tmp_path: Path, tiny_images: Path) -> None:
    import shutil
    import subprocess
    import sys

    from conftest import tiny_args

    data = tmp_path / "data"
    shutil.copytree(tiny_images, data)
    (data / "broken.png").write_bytes(b"not a png")
    run = subprocess.run([sys.executable, "-m", "ddpmctl", "train", *tiny_args(data, tmp_path, steps=12)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stderr.splitlines() if "broken.png" in line]
    assert len(lines) == 1 and lines[0].startswith(f"warning: skipping unreadable image {data / 'broken.png'} ("), run.stderr
    assert "UserWarning" not in run.stderr and "DdpmctlWarning" not in run.stderr


def test_small_sources_are_counted_from_headers_of_a_sample(tmp_path: Path) -> None:
    from ddpmctl.data import upscale_note

    for i in range(30):  # every third picture is large enough for 24 px
        Image.new("RGB", (40, 30) if i % 3 == 0 else (20, 16), (i, 0, 0)).save(tmp_path / f"{i:02d}.png")
    dataset = ImageFolderDataset(tmp_path, 24)
    assert upscale_note(dataset, 24) == (
        f"20 of the 30 images in {tmp_path} are smaller than 24 px (most 16 px on the shorter side) and are upscaled "
        "on the fly, so samples may look soft: train at a smaller --img-size, or add larger images")
    # files 0, 3, 6, 9, 12, 16, 19, 22, 25, 29: spread over the folder, five of them small
    assert upscale_note(dataset, 24, sample=10).startswith("5 of 10 images checked (of 30) in ")
    assert upscale_note(ImageFolderDataset(tmp_path, 16), 16) is None  # none is smaller than 16 px
    for i in range(3, 30):  # 1 small picture of 30 is not "many"
        Image.new("RGB", (40, 30), (i, 0, 0)).save(tmp_path / f"{i:02d}.png")
    assert upscale_note(ImageFolderDataset(tmp_path, 24), 24) is None
