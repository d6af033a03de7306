"""`ddpmctl prepare` and the prepared / packed datasets: awkward inputs built here, nothing downloaded."""

from __future__ import annotations

import json
import os
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_args
from PIL import Image, ImageFile
from typer.testing import CliRunner

from ddpmctl.cli.main import app
from ddpmctl.data import BatchStream, ImageFolderDataset, PackedDataset, PreparedDataset, build_dataset
from ddpmctl.errors import DataError
from ddpmctl.prepare import MANIFEST, PACK_FILE, REPORT, prepare

N = 16
RED, BLUE = (255, 0, 0), (0, 0, 255)
runner = CliRunner()


def run(*args: object):
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def halves(w: int, h: int, left: tuple, right: tuple) -> Image.Image:
    im = Image.new("RGB", (w, h), left)
    im.paste(right, (w // 2, 0, w, h))
    return im


def bomb_png() -> bytes:
    """A tiny PNG whose header claims 100000 x 100000 pixels (far over Pillow's limit)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


GOOD = ["plain.jpg", "nested/deeper/UPPER.PNG", "rotated.jpg", "rgba.png", "palette.png", "anim.gif",
        "gray16.png", "cmyk.jpg", "gray.png", "scan.TIF", "old.BMP", "web.WebP", "small.png", "wide.jpg"]
BAD = {"trunc.jpg": "truncated", "trunc.png": "truncated", "empty.png": "empty file", "junk.jpg": "not an image",
       "bomb.png": "decompression bomb", "dangling.png": "unreadable"}


def make_messy_folder(src: Path) -> Path:
    """One file of every awkward kind the issue lists, plus a text file that must be ignored quietly."""
    (src / "nested" / "deeper").mkdir(parents=True)
    noise(40, 30).save(src / "plain.jpg", quality=95)
    noise(20, 20, seed=1).save(src / "nested" / "deeper" / "UPPER.PNG")
    # Stored 32 x 16, red left / blue right, EXIF orientation 6 (rotate 90 clockwise to display):
    # displayed 16 x 32 with red on top and blue at the bottom.
    exif = Image.Exif()
    exif[0x0112] = 6
    halves(32, 16, RED, BLUE).save(src / "rotated.jpg", quality=100, exif=exif)
    rgba = Image.new("RGBA", (32, 32), (0, 0, 0, 0))  # fully transparent black ...
    rgba.paste((255, 0, 0, 255), (0, 0, 16, 32))  # ... with an opaque red left half
    rgba.save(src / "rgba.png")
    pal = Image.new("P", (24, 24), 0)
    pal.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    pal.paste(1, (0, 0, 12, 24))  # green left half, index 0 (black) transparent
    pal.save(src / "palette.png", transparency=0)
    frames = [Image.new("RGB", (20, 20), RED), Image.new("RGB", (20, 20), BLUE)]
    frames[0].save(src / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (32, 1))  # 16-bit horizontal ramp, 64 x 32
    Image.fromarray(ramp).save(src / "gray16.png")
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(src / "cmyk.jpg", quality=95)  # red in CMYK
    Image.new("L", (20, 20), 100).save(src / "gray.png")
    noise(20, 20, seed=2).save(src / "scan.TIF")
    noise(20, 20, seed=3).save(src / "old.BMP")
    noise(20, 20, seed=4).save(src / "web.WebP")
    noise(8, 8, seed=5).save(src / "small.png")  # smaller than N: upscaled and counted
    halves(32, 16, RED, RED).save(src / "wide.jpg", quality=100)

    big = noise(64, 64, seed=6)
    big.save(src / "whole.jpg")
    big.save(src / "whole.png")
    (src / "trunc.jpg").write_bytes((src / "whole.jpg").read_bytes()[:1500])
    (src / "trunc.png").write_bytes((src / "whole.png").read_bytes()[:3000])
    (src / "whole.jpg").unlink()
    (src / "whole.png").unlink()
    (src / "empty.png").write_bytes(b"")
    (src / "junk.jpg").write_bytes(os.urandom(300))
    (src / "bomb.png").write_bytes(bomb_png())
    os.symlink(src / "no-such-file.png", src / "dangling.png")
    (src / "notes.txt").write_text("not an image, ignored quietly")
    return src


def out_of(dst: Path, rel: str) -> np.ndarray:
    manifest = json.loads((dst / MANIFEST).read_text())
    return np.asarray(Image.open(dst / manifest["images"][rel]["file"]))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """The messy folder prepared once with two worker processes (the parallel path)."""
    root = tmp_path_factory.mktemp("prep")
    src = make_messy_folder(root / "src")
    result = run("prepare", src, root / "dst", "--size", N, "--workers", 2)
    assert result.exit_code == 0, result.output
    return src, root / "dst", result.output


def test_every_good_image_becomes_rgb_n_by_n(prepared):
    src, dst, output = prepared
    manifest = json.loads((dst / MANIFEST).read_text())
    assert sorted(manifest["images"]) == sorted(GOOD)
    assert manifest["count"] == len(GOOD) and manifest["size"] == N
    for rel, entry in manifest["images"].items():
        with Image.open(dst / entry["file"]) as im:
            assert (im.mode, im.size) == ("RGB", (N, N)), rel
        assert len(entry["sha256"]) == 64 and entry["bytes"] == (src / rel).stat().st_size
    assert (dst / "images" / "nested" / "deeper" / "UPPER.png").is_file()  # sub-folders mirrored
    assert f"{len(GOOD)} images of {N}x{N}" in output
    assert "notes.txt" not in output and ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_bad_files_are_skipped_and_named_with_reasons(prepared):
    _, dst, output = prepared
    report = (dst / REPORT).read_text()
    assert f"{len(BAD)} files skipped" in output
    for name, reason in BAD.items():
        line = next(ln for ln in report.splitlines() if ln.strip().startswith(f"{name}:"))
        assert reason in line, line
        assert name in output
    assert "1 image smaller than 16px was upscaled (it may look soft)" in output and "small.png" in report


def test_exif_orientation_applied(prepared):
    _, dst, _ = prepared
    a = out_of(dst, "rotated.jpg").astype(int)
    # Right way up: the whole top row is red and the bottom row blue (sideways it would be red|blue).
    assert (a[0, :, 0] > 200).all() and (a[0, :, 2] < 60).all()
    assert (a[-1, :, 2] > 200).all() and (a[-1, :, 0] < 60).all()


def test_transparency_goes_onto_white_not_black(prepared):
    _, dst, _ = prepared
    a = out_of(dst, "rgba.png").astype(int)
    assert (a[:, 0] == RED).all() and (a[:, -1] == 255).all()
    p = out_of(dst, "palette.png").astype(int)
    assert (p[:, 0] == (0, 200, 0)).all() and (p[:, -1] == 255).all()


def test_first_gif_frame_cmyk_and_gray(prepared):
    _, dst, _ = prepared
    assert (out_of(dst, "anim.gif") == RED).all()
    c = out_of(dst, "cmyk.jpg").astype(int)
    assert (c[..., 0] > 220).all() and (c[..., 1:] < 40).all()
    g = out_of(dst, "gray.png")
    assert (g == 100).all()


def test_16_bit_ramp_stays_a_ramp(prepared):
    _, dst, _ = prepared
    row = out_of(dst, "gray16.png")[N // 2, :, 0].astype(int)
    # The centre half of a 0..255 ramp: rising all the way, neither clipped to white nor crushed.
    assert (np.diff(row) > 0).all()
    assert 50 < row[0] < 90 and 165 < row[-1] < 205


def test_pad_mode_keeps_the_whole_image(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    halves(32, 16, RED, RED).save(src / "wide.png")
    result = run("prepare", src, tmp_path / "dst", "--size", N, "--crop", "pad", "--background", "black", "--workers", 1)
    assert result.exit_code == 0, result.output
    a = out_of(tmp_path / "dst", "wide.png")
    assert (a[:4] == 0).all() and (a[-4:] == 0).all() and (a[4:12] == RED).all()


def test_rerun_only_processes_new_or_changed_files(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i in range(4):
        noise(24, 24, seed=i).save(src / "sub" / f"{i}.png")
    dst = tmp_path / "dst"
    first = prepare(src, dst, N, workers=1)
    assert (first.count, first.converted) == (4, 4)
    manifest = (dst / MANIFEST).read_text()
    stamps = {p: p.stat().st_mtime_ns for p in (dst / "images").rglob("*.png")}

    again = prepare(src, dst, N, workers=1)
    assert (again.count, again.converted, again.unchanged) == (4, 0, 4)
    assert (dst / MANIFEST).read_text() == manifest
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing rewritten

    os.utime(src / "sub" / "0.png", ns=(1, 1))  # touched, same content: hashed, not converted
    noise(24, 24, seed=9).save(src / "sub" / "1.png")  # changed content
    noise(24, 24, seed=10).save(src / "new.png")  # new file
    (src / "sub" / "3.png").unlink()  # gone: its output is removed
    third = prepare(src, dst, N, workers=1)
    assert (third.count, third.converted, third.unchanged, third.removed) == (4, 2, 2, 1)
    assert not (dst / "images" / "sub" / "3.png").exists()
    assert (out_of(dst, "sub/1.png") != np.asarray(noise(24, 24, seed=1).resize((N, N)))).any()


def test_different_size_into_same_dst_is_refused(prepared):
    src, dst, _ = prepared
    result = run("prepare", src, dst, "--size", 32)
    assert result.exit_code == 1
    assert "already holds images prepared at 16px, not 32px" in result.output


def test_missing_src_and_no_usable_image_exit_1_with_one_line(tmp_path):
    result = run("prepare", tmp_path / "nope", tmp_path / "dst", "--size", N)
    assert result.exit_code == 1
    assert "does not exist" in result.output and len(result.output.strip().splitlines()) == 1
    src = tmp_path / "junk"
    src.mkdir()
    (src / "a.png").write_bytes(b"not a png")
    result = run("prepare", src, tmp_path / "dst2", "--size", N)
    assert result.exit_code == 1
    assert "no usable image" in result.output and "report.txt" in result.output
    assert "a.png: not an image" in (tmp_path / "dst2" / REPORT).read_text()


def test_pillow_pixel_limit_is_kept(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    noise(40, 40).save(src / "big.png")
    noise(20, 20).save(src / "ok.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40 x 40 is over it; in-process (workers=1) only
    result = prepare(src, tmp_path / "dst", N, workers=1)
    assert result.count == 1 and result.rejected[0][0] == "big.png"
    assert "decompression bomb" in result.rejected[0][1]


def test_training_data_from_prepared_and_packed_folders(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(10):
        noise(20, 24, seed=i).save(src / f"{i}.jpg")
    dst = tmp_path / "dst"
    prepare(src, dst, N, workers=1)
    ds, desc = build_dataset(dst, N)
    assert isinstance(ds, PreparedDataset) and len(ds) == 10 and "--pack" in desc
    with pytest.raises(DataError, match="prepared at 16px but --img-size is 32"):
        build_dataset(dst, 32)

    result = run("prepare", src, dst, "--size", N, "--pack")
    assert result.exit_code == 0 and "packed array" in result.output
    packed, desc = build_dataset(dst, N)
    assert isinstance(packed, PackedDataset) and "memory-mapped" in desc
    assert np.load(dst / PACK_FILE, mmap_mode="r").shape == (10, 3, N, N)
    for i in range(10):
        assert packed[i].dtype == torch.uint8 and torch.equal(packed[i], ds[i])
    assert torch.equal(torch.stack(packed.__getitems__([3, 1])), torch.stack([ds[3], ds[1]]))
    batches = BatchStream(packed, batch_size=4, num_workers=0, pin_memory=False)
    assert [next(batches).shape for _ in range(3)] == [(4, 3, N, N), (4, 3, N, N), (2, 3, N, N)]
    direct, _ = build_dataset(dst / PACK_FILE, N)  # the .npy file itself works too
    assert len(direct) == 10
    with pytest.raises(DataError, match="holds 16px images but --img-size is 32"):
        build_dataset(dst / PACK_FILE, 32)

    noise(20, 24, seed=99).save(src / "0.jpg")  # a changed source: a plain rerun refreshes the pack
    prepare(src, dst, N, workers=1)
    packed, _ = build_dataset(dst, N)
    assert isinstance(packed, PackedDataset) and torch.equal(packed[0], build_dataset(dst, N)[0][0])
    prepare(src, dst, N, workers=1, pack=False)
    assert not (dst / PACK_FILE).exists() and isinstance(build_dataset(dst, N)[0], PreparedDataset)


def test_raw_folder_still_works_with_a_hint(tiny_images):
    ds, desc = build_dataset(tiny_images, 8)
    assert isinstance(ds, ImageFolderDataset) and "ddpmctl prepare" in desc
    assert ds[0].shape == (3, 8, 8) and ds[0].dtype == torch.uint8


def test_train_refuses_a_prepared_folder_of_another_size(tmp_path, tiny_images):
    dst = tmp_path / "dst"
    assert run("prepare", tiny_images, dst, "--size", N, "--pack", "--workers", 1).exit_code == 0
    # attention at 16 px: 8 is no stage of a 32 px model with two stages (config.validate refuses it)
    result = run("train", *tiny_args(dst, tmp_path, steps=2, img_size=32, attention_resolutions=16))
    assert result.exit_code == 1
    assert "prepared at 16px but --img-size is 32" in result.output


def test_same_stem_files_and_dst_inside_src(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (20, 20), RED).save(src / "a.jpg", quality=100)
    Image.new("RGB", (20, 20), BLUE).save(src / "a.png")
    dst = src / "prepared"  # inside SRC: its own outputs must not be scanned as sources
    assert prepare(src, dst, N, workers=1).count == 2
    again = prepare(src, dst, N, workers=1)
    assert (again.count, again.converted) == (2, 0)
    manifest = json.loads((dst / MANIFEST).read_text())
    assert {rel: e["file"] for rel, e in manifest["images"].items()} == {"a.jpg": "images/a.png",
                                                                          "a.png": "images/a.png.png"}
    assert (out_of(dst, "a.png") == BLUE).all() and (out_of(dst, "a.jpg").astype(int)[..., 0] > 240).all()


def test_another_src_into_the_same_dst_is_refused_unless_forced(tmp_path):
    a, b, dst = tmp_path / "a", tmp_path / "b", tmp_path / "dst"
    for folder, seed in ((a, 1), (b, 2)):
        folder.mkdir()
        noise(20, 20, seed=seed).save(folder / f"{folder.name}.png")
    prepare(a, dst, N, workers=1)
    before = sorted(p.name for p in (dst / "images").iterdir())
    result = run("prepare", b, dst, "--size", N, "--workers", 1)
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    text = " ".join(result.output.split())
    assert f"prepared from {a.resolve()}" in text and "--force" in text
    assert sorted(p.name for p in (dst / "images").iterdir()) == before == ["a.png"]
    result = run("prepare", b, dst, "--size", N, "--workers", 1, "--force")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (dst / "images").iterdir()) == ["b.png"]
    assert json.loads((dst / MANIFEST).read_text())["source"] == str(b.resolve())


def test_an_empty_or_unusable_src_deletes_nothing(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    for i in range(3):
        noise(20, 20, seed=i).save(src / f"{i}.png")
    prepare(src, dst, N, workers=1, pack=True)
    manifest = (dst / MANIFEST).read_bytes()
    outputs = sorted((dst / "images").iterdir())
    for f in src.iterdir():  # the drive is not mounted: the mount point is an empty folder
        f.unlink()
    with pytest.raises(DataError, match="no images found in .* the 3 images prepared in .* were left as they are"):
        prepare(src, dst, N, workers=1)
    (src / "0.png").write_bytes(b"garbage")  # only unusable files
    with pytest.raises(DataError, match="no usable image in .* the 3 images prepared in .* before were left"):
        prepare(src, dst, N, workers=1)
    assert sorted((dst / "images").iterdir()) == outputs and (dst / MANIFEST).read_bytes() == manifest
    assert isinstance(build_dataset(dst, N)[0], PackedDataset)


class FailsInWorker(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, idx: int) -> torch.Tensor:
        raise DataError(f"image {idx} is bad: run 'ddpmctl prepare' again")


def test_a_data_error_in_a_loader_worker_keeps_only_its_own_line():
    stream = BatchStream(FailsInWorker(), batch_size=2, num_workers=1, pin_memory=False)
    try:
        with pytest.raises(DataError) as err:
            next(stream)
    finally:
        stream.close()
    assert str(err.value) in ("image 0 is bad: run 'ddpmctl prepare' again", "image 1 is bad: run 'ddpmctl prepare' again")


def test_a_corrupted_prepared_png_is_a_one_line_error_even_from_a_worker(tmp_path, tiny_images):
    dst = tmp_path / "dst"
    prepare(tiny_images, dst, N, workers=1)
    broken = sorted((dst / "images").iterdir())[5]
    broken.write_bytes(broken.read_bytes()[:40])  # cut short inside the image data
    ds, _ = build_dataset(dst, N)
    with pytest.raises(DataError, match=f"prepared image {broken} is damaged .* run 'ddpmctl prepare' again"):
        ds[5]
    result = run("train", *tiny_args(dst, tmp_path, steps=2, num_workers=1, batch_size=64))
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("Error: ") and "Original Traceback" not in result.output
    text = " ".join(result.output.split())
    assert f"prepared image {broken} is damaged" in text and "'ddpmctl prepare' again" in text


# ----------------------------------------------------------------------------- colour profiles


def _s15(v: float) -> bytes:
    return struct.pack(">i", round(v * 65536))


def icc_rgb_profile(name: str, r: tuple, g: tuple, b: tuple, gamma: float = 2.2) -> bytes:
    """A minimal ICC v2 matrix/TRC display profile (primaries as D50 XYZ columns), built here: no files needed."""
    def xyz(x: float, y: float, z: float) -> bytes:
        return b"XYZ " + bytes(4) + _s15(x) + _s15(y) + _s15(z)

    curve = b"curv" + bytes(4) + struct.pack(">IH", 1, round(gamma * 256))
    text = name.encode() + b"\0"
    desc = b"desc" + bytes(4) + struct.pack(">I", len(text)) + text + bytes(8 + 3 + 67)
    tags = [(b"desc", desc), (b"wtpt", xyz(0.9642, 1.0, 0.8249)), (b"rXYZ", xyz(*r)), (b"gXYZ", xyz(*g)),
            (b"bXYZ", xyz(*b)), (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve)]
    offset = 128 + 4 + 12 * len(tags)
    table, data = b"", b""
    for sig, body in tags:
        body += bytes(-len(body) % 4)
        table += sig + struct.pack(">II", offset + len(data), len(body))
        data += body
    header = (struct.pack(">I", offset + len(data)) + bytes(4) + struct.pack(">I", 0x02100000) + b"mntrRGB XYZ "
              + bytes(12) + b"acsp" + bytes(28) + _s15(0.9642) + _s15(1.0) + _s15(0.8249) + bytes(48))
    return header + struct.pack(">I", len(tags)) + table + data


# Display P3 primaries, adapted to D50 (what a recent phone embeds in its photos).
P3 = icc_rgb_profile("Test Display P3", (0.5151, 0.2412, -0.0011), (0.2920, 0.6922, 0.0419), (0.1571, 0.0666, 0.7841))


def test_embedded_colour_profiles_are_converted_to_srgb():
    from PIL import ImageCms

    from ddpmctl.images import to_srgb

    orange = Image.new("RGB", (4, 4), (200, 100, 50))
    orange.info["icc_profile"] = P3
    r, g, b = to_srgb(orange).getpixel((0, 0))
    assert r > 210 and g < 97 and b < 35  # P3's orange is more saturated than the same numbers in sRGB
    grey = Image.new("RGBA", (4, 4), (128, 128, 128, 77))
    grey.info["icc_profile"] = P3
    out = to_srgb(grey)
    assert out.mode == "RGBA" and out.getpixel((0, 0))[3] == 77  # alpha kept
    assert max(out.getpixel((0, 0))[:3]) - min(out.getpixel((0, 0))[:3]) <= 1  # grey stays grey
    srgb = Image.new("RGB", (4, 4), (200, 100, 50))
    srgb.info["icc_profile"] = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    assert to_srgb(srgb) is srgb  # sRGB already: no transform at all
    broken = Image.new("RGB", (4, 4), (200, 100, 50))
    broken.info["icc_profile"] = b"not a profile"
    assert to_srgb(broken).getpixel((0, 0)) == (200, 100, 50)  # unreadable profile: pixels as stored


def test_prepare_converts_p3_photos_and_redoes_sets_made_before_colour_management(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    Image.new("RGB", (24, 24), (200, 100, 50)).save(src / "p3.png", icc_profile=P3)
    Image.new("RGB", (24, 24), (200, 100, 50)).save(src / "plain.png")
    first = prepare(src, dst, N, workers=1)
    assert first.converted == 2
    r, g, b = out_of(dst, "p3.png")[N // 2, N // 2]
    assert r > 210 and g < 97 and b < 35
    assert tuple(out_of(dst, "plain.png")[N // 2, N // 2]) == (200, 100, 50)  # no profile: taken as sRGB

    manifest = json.loads((dst / MANIFEST).read_text())
    manifest["version"] = 1  # as an older ddpmctl wrote it, before colour management
    (dst / MANIFEST).write_text(json.dumps(manifest))
    again = prepare(src, dst, N, workers=1)
    assert (again.converted, again.unchanged) == (2, 0)
    assert json.loads((dst / MANIFEST).read_text())["version"] == 2
    assert prepare(src, dst, N, workers=1).unchanged == 2


def test_stdout_holds_no_blank_line_and_an_error_nothing(tmp_path):
    # Not on a terminal the (transient) progress bar shows nothing: rich used to end it with a blank line on stdout.
    failed = run("prepare", tmp_path / "nope", tmp_path / "dst", "--size", N)
    assert failed.exit_code == 1 and failed.stdout == "", repr(failed.stdout)
    assert failed.stderr == f"Error: source folder {tmp_path / 'nope'} does not exist: pass the folder that holds your images\n"
    src = tmp_path / "src"
    src.mkdir()
    noise(N, N).save(src / "a.png")
    done = run("prepare", src, tmp_path / "out", "--size", N)
    assert done.exit_code == 0 and done.stdout.startswith("1 image of ") and "" not in done.stdout.splitlines()


def test_counts_and_the_report_read_right_for_one(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    noise(2 * N, 2 * N).save(src / "big.png")
    noise(N // 2, N // 2, seed=1).save(src / "small.png")
    (src / "junk.png").write_bytes(b"not a png")
    result = run("prepare", src, tmp_path / "dst", "--size", N, "--small", "skip", "--workers", 1)
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())  # rich wraps at 80 columns here
    assert text.startswith(f"1 image of {N}x{N} in ")
    assert re.search(r": 1 converted \(\d+/s on 1 process\), 0 unchanged, 0 removed "
                     rf"1 image smaller than {N}px was skipped \(--small skip\) 1 file skipped: junk.png", text), text
    report = (tmp_path / "dst" / REPORT).read_text().splitlines()
    assert report[2].endswith(", small images skipped, background (255, 255, 255)")
    assert report[3] == "prepared set: 1 image (1 converted now, 0 unchanged, 0 removed)"


def test_ctrl_c_keeps_what_was_converted_and_says_so_on_stderr(tmp_path, monkeypatch):
    from ddpmctl.cli import prepare as prepare_cli

    def ctrl_c(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_cli, "prepare", ctrl_c)
    result = run("prepare", tmp_path, tmp_path / "dst", "--size", N)
    assert (result.exit_code, result.stdout) == (130, "")
    assert result.stderr == "interrupted: the images converted so far are kept; run the same command again to continue\n"
