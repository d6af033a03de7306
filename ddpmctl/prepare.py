"""Turn any folder of images into a verified training set: RGB, N x N PNGs, a manifest, a report, an optional
packed array (the layout of a prepared folder is in prepared.py).

The library never prints: progress goes through a callback, the result is a dataclass.
"""

from __future__ import annotations

import hashlib
import io
import os
import signal
import time
import warnings
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from .classes import class_folders, describe_classes, folder_labels
from .errors import DataError
from .files import atomic_path
from .host import cpu_cores
from .images import CROPS, IMAGE_EXTENSIONS, describe_error, find_images, is_small, load_square, open_image
from .prepared import (
    FORMAT,
    IMAGES_DIR,
    MANIFEST,
    PACK_FILE,
    REPORT,
    VERSION,
    pack_digest,
    read_manifest,
    write_manifest,
    write_pack,
)

SMALL_POLICIES = ("upscale", "skip")
SMALL_DONE = {"upscale": "upscaled", "skip": "skipped"}  # what each policy did, for the report

ProgressFn = Callable[[str, int, int], None]  # (phase: "scan" | "convert" | "pack", done, total; total 0 = unknown)


# ----------------------------------------------------------------------------- the worker


@dataclass(frozen=True)
class Settings:
    """What a prepared set depends on; a rerun with different settings into the same DST is refused."""

    size: int
    crop: str = "center"  # center: fill the square, cut the overflow; pad: keep the whole image, pad the sides
    small: str = "upscale"  # images smaller than size: upscale them, or skip them
    background: tuple[int, int, int] = (255, 255, 255)  # behind transparent pixels, and the padding colour


def _count(n: int, noun: str) -> str:
    """``1 image``, ``2 images``."""
    return f"{n} {noun if n == 1 else noun + 's'}"


def _left(n: int) -> str:
    return "was left as it is" if n == 1 else "were left as they are"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _process(job: tuple[str, str, str | None, Settings]) -> dict[str, Any]:
    """Convert one source into its output PNG (atomic write). Runs in a worker process; never raises."""
    src, out, known_sha, s = job
    result: dict[str, Any] = {"status": "rejected"}
    try:
        st = os.stat(src)
        result.update(bytes=st.st_size, mtime_ns=st.st_mtime_ns)
        if st.st_size == 0:
            return {**result, "reason": "empty file (0 bytes)"}
        with open(src, "rb") as f:
            data = f.read()
        sha = _sha256(data)
        result["sha256"] = sha
        if known_sha == sha and os.path.exists(out):
            return {**result, "status": "unchanged"}  # touched, not changed: keep the output
        with warnings.catch_warnings():  # Pillow's limit may also be checked while decoding: an error too
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = open_image(data)
            w, h = im.size
            result.update(width=w, height=h, small=is_small(w, h, s.size, s.crop))
            if result["small"] and s.small == "skip":
                im.close()
                return {**result, "status": "small_skipped"}
            rgb = load_square(im, s.size, s.crop, s.background)
        buf = io.BytesIO()
        # zlib's run-length strategy: about the size of the default on photos and flat art, much faster to
        # write and faster to decode (docs/performance.md), which is what training waits on.
        rgb.save(buf, format="PNG", compress_type=zlib.Z_RLE)
        png = buf.getvalue()
        with atomic_path(out) as tmp:
            tmp.write_bytes(png)
        return {**result, "status": "ok", "out_sha256": _sha256(png)}
    except Exception as exc:  # noqa: BLE001 - one bad file must never stop the run; the reason goes in the report
        return {**result, "status": "rejected", "reason": describe_error(exc)}


def _output_name(rel: str, taken: set[str]) -> str:
    """images/<rel path>.png; if that name is taken (a.jpg beside a.png) keep the source extension too."""
    stem = Path(rel).with_suffix("").as_posix()
    for candidate in (f"{IMAGES_DIR}/{stem}.png", f"{IMAGES_DIR}/{rel}.png"):
        if candidate.lower() not in taken:  # lower(): stay unique on case-insensitive file systems
            return candidate
    i = 2
    while f"{IMAGES_DIR}/{stem}_{i}.png".lower() in taken:
        i += 1
    return f"{IMAGES_DIR}/{stem}_{i}.png"


# ----------------------------------------------------------------------------- the whole run


@dataclass
class PrepareResult:
    """What a prepare run did; ``count`` is the size of the training set now in ``dst``."""

    dst: Path
    settings: Settings
    count: int = 0  # images in the prepared set
    converted: int = 0  # new or changed sources converted in this run
    unchanged: int = 0  # sources already prepared and unchanged
    removed: int = 0  # outputs deleted because their source is gone
    small: list[str] = field(default_factory=list)  # sources smaller than size (upscaled or skipped, see settings.small)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (source, reason) of files that could not be used
    classes: str = ""  # "2 classes: discs (30), squares (32)" when SRC's folders are classes (--classes auto)
    pack: Path | None = None  # the packed array, if there is one
    pack_written: bool = False  # True if this run (re)wrote it
    report: Path | None = None
    seconds: float = 0.0


def _check_settings(manifest: dict[str, Any], s: Settings, dst: Path) -> None:
    if manifest["size"] != s.size:
        raise DataError(
            f"{dst} already holds images prepared at {manifest['size']}px, not {s.size}px: pass --size "
            f"{manifest['size']} to update it, or prepare {s.size}px images into another folder"
        )
    for key, flag in (("crop", "--crop"), ("small", "--small")):
        if manifest.get(key) != getattr(s, key):
            raise DataError(f"{dst} was prepared with {flag} {manifest.get(key)}, not {getattr(s, key)}: pass "
                            f"{flag} {manifest.get(key)}, or use another folder")
    if tuple(manifest.get("background", ())) != s.background:
        raise DataError(f"{dst} was prepared with --background {','.join(map(str, manifest['background']))}: "
                        "pass the same colour, or use another folder")


def prepare(src: str | Path, dst: str | Path, size: int, *, crop: str = "center", small: str = "upscale",
            background: tuple[int, int, int] = (255, 255, 255), workers: int | None = None, pack: bool | None = None,
            force: bool = False, classes: str = "auto", on_progress: ProgressFn | None = None) -> PrepareResult:
    """Convert every image under ``src`` into ``dst`` (only new or changed ones on a rerun); see the module doc.

    ``pack``: True writes the packed array, False removes it, None keeps one up to date if it exists.
    Outputs whose source is gone from ``src`` are deleted, so a ``dst`` prepared from another folder is
    refused unless ``force``; and when ``src`` yields no usable image, nothing in ``dst`` is deleted.
    ``classes``: "auto" records SRC's first-level folders as classes in the manifest when every image sits
    in one of two or more (classes.class_folders); "none" records none.
    Raises DataError for a missing ``src``, changed settings, another source, or when no usable image was found.
    """
    started = time.perf_counter()
    progress = on_progress or (lambda phase, done, total: None)
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if crop not in CROPS:
        raise DataError(f"--crop must be one of {', '.join(CROPS)}, not {crop!r}")
    if small not in SMALL_POLICIES:
        raise DataError(f"--small must be one of {', '.join(SMALL_POLICIES)}, not {small!r}")
    if classes not in ("auto", "none"):
        raise DataError(f"--classes must be auto or none, not {classes!r}")
    if size < 1:
        raise DataError(f"--size must be a positive number of pixels, not {size}")
    if not src.exists():
        raise DataError(f"source folder {src} does not exist: pass the folder that holds your images")
    if not src.is_dir():
        raise DataError(f"{src} is not a folder: pass the folder that holds your images")
    if dst.exists() and not dst.is_dir():
        raise DataError(f"{dst} is a file: pass a folder (it is created if missing)")
    if dst.resolve() == src.resolve():
        raise DataError("SRC and DST are the same folder: prepare into a new folder")
    settings = Settings(size, crop, small, tuple(background))  # type: ignore[arg-type]
    old = read_manifest(dst)
    if old is not None:
        _check_settings(old, settings, dst)
    old_images: dict[str, dict[str, Any]] = dict(old["images"]) if old else {}
    redo_all = old is not None and old.get("version", 1) < VERSION  # made before colour management: convert again
    recorded = old.get("source") if old else None
    if old_images and recorded and recorded != str(src.resolve()) and not force:
        raise DataError(f"{dst} holds images prepared from {recorded}, not from {src.resolve()}: prepare into "
                        f"another DST, or pass --force to replace them with the images of {src}")

    progress("scan", 0, 0)
    sources = find_images(src, exclude=dst)
    rels = [p.relative_to(src).as_posix() for p in sources]
    progress("scan", len(sources), len(sources))
    names = class_folders(rels) if classes == "auto" else ()
    if not sources and old_images:  # an empty SRC (a drive that is not mounted?) must not wipe the prepared set
        raise DataError(f"no images found in {src} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}, "
                        f"recursively); the {_count(len(old_images), 'image')} prepared in {dst} {_left(len(old_images))}")
    result = PrepareResult(dst=dst, settings=settings)

    # Sources whose size and mtime are unchanged, and whose output still exists, need no work at all;
    # the others are hashed by the workers, which skip the decode if the content turns out unchanged.
    images: dict[str, dict[str, Any]] = {}
    jobs: list[tuple[str, str, str | None, Settings]] = []
    job_rels: list[str] = []
    taken = {e["file"].lower() for e in old_images.values()}
    for path, rel in zip(sources, rels, strict=True):
        entry = old_images.get(rel)
        if entry is not None:
            try:
                st = path.stat()
            except OSError:
                st = None
            if st is not None and st.st_size == entry["bytes"] and st.st_mtime_ns == entry["mtime_ns"] \
                    and (dst / entry["file"]).is_file() and not redo_all:
                images[rel] = entry
                continue
            out = entry["file"]
        else:
            out = _output_name(rel, taken)
            taken.add(out.lower())
        jobs.append((str(path), str(dst / out), entry["sha256"] if entry and not redo_all else None, settings))
        job_rels.append(rel)

    dst.mkdir(parents=True, exist_ok=True)
    result.unchanged = len(images)
    done_before = len(images)
    progress("convert", done_before, len(sources))
    last_save = time.monotonic()

    def manifest_now() -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "size": size, "crop": crop, "small": small,
                "background": list(settings.background), "source": str(src.resolve()),
                "count": len(images), "classes": list(names), "images": {k: images[k] for k in sorted(images)},
                "pack": old.get("pack") if old else None}

    stale: list[Path] = []  # outputs of sources that became unusable
    try:
        for i, (rel, job, res) in enumerate(zip(job_rels, jobs, _run(jobs, workers), strict=True), start=1):
            status = res.pop("status")
            out_rel = Path(job[1]).relative_to(dst).as_posix()
            if status == "unchanged":
                images[rel] = {**old_images[rel], "bytes": res["bytes"], "mtime_ns": res["mtime_ns"]}
                result.unchanged += 1
            elif status == "ok":
                images[rel] = {"file": out_rel, **{k: res[k] for k in ("sha256", "bytes", "mtime_ns", "width", "height",
                                                                       "small", "out_sha256")}}
                result.converted += 1
            else:
                if status == "small_skipped":
                    result.small.append(rel)
                else:
                    result.rejected.append((rel, res["reason"]))
                stale.append(dst / out_rel)  # a source that became unusable must not leave its old output behind
            progress("convert", done_before + i, len(sources))
            if time.monotonic() - last_save > 60:  # an interrupted long run keeps what it finished
                write_manifest(dst / MANIFEST, manifest_now())
                last_save = time.monotonic()
    finally:
        # The prepared set mirrors SRC: outputs of sources that are gone or unusable are deleted, but only if
        # SRC yielded usable images at all; otherwise DST (and its manifest) stay as they were.
        keep_old = not images and old is not None
        if not keep_old:
            seen = set(rels)
            for path in stale:
                _remove(path)
            for rel, entry in old_images.items():
                if rel not in seen:
                    _remove(dst / entry["file"])
                    result.removed += 1
            write_manifest(dst / MANIFEST, manifest_now())

    result.small = sorted(set(result.small) | {rel for rel, e in images.items() if e.get("small")})
    result.count = len(images)
    if names and images:
        result.classes = describe_classes(names, folder_labels(sorted(images), names))
    manifest = manifest_now()
    manifest["rejected"] = [{"source": rel, "reason": reason} for rel, reason in result.rejected]
    if result.count:
        _update_pack(dst, manifest, pack, result, progress)
    if not keep_old:
        write_manifest(dst / MANIFEST, manifest)
    result.report = dst / REPORT
    result.report.write_text(format_report(src, result))
    result.seconds = time.perf_counter() - started
    if result.count == 0:
        why = (f"{_count(len(result.rejected), 'file')} could not be read, {len(result.small)} skipped as smaller "
               f"than {size}px" if sources else f"looked for {', '.join(sorted(IMAGE_EXTENSIONS))}, recursively")
        kept = (f"; the {_count(len(old_images), 'image')} prepared in {dst} before {_left(len(old_images))}"
                if keep_old and old_images else "")
        raise DataError(f"no usable image in {src} ({why}); details in {result.report}{kept}")
    return result


def _run(jobs: list[tuple[str, str, str | None, Settings]], workers: int | None) -> Iterable[dict[str, Any]]:
    """Results of ``_process`` in job order, over ``workers`` processes (1: in this process)."""
    workers = max(1, min(workers or cpu_cores(), len(jobs)))
    if workers == 1:
        yield from map(_process, jobs)
        return
    chunk = max(1, min(32, len(jobs) // (workers * 8)))
    pool = ProcessPoolExecutor(max_workers=workers, initializer=_ignore_sigint)
    try:
        yield from pool.map(_process, jobs, chunksize=chunk)
    finally:  # also on Ctrl-C in the caller: drop the queued work instead of finishing it
        pool.shutdown(wait=True, cancel_futures=True)


def _ignore_sigint() -> None:
    """Workers leave Ctrl-C to the main process, which saves the manifest and stops the pool."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _update_pack(dst: Path, manifest: dict[str, Any], pack: bool | None, result: PrepareResult,
                 progress: ProgressFn) -> None:
    """Write, refresh or delete DST/packed.npy so that it always matches the manifest (or is absent)."""
    path = dst / PACK_FILE
    existing = manifest.get("pack")
    if pack is False or (pack is None and not existing):
        if path.exists():
            _remove(path)
        manifest["pack"] = None
        return
    digest = pack_digest(manifest)
    if existing and existing.get("digest") == digest and path.is_file():
        result.pack = path
        return
    count = write_pack(dst, manifest, lambda done, total: progress("pack", done, total))
    manifest["pack"] = {"file": PACK_FILE, "count": count, "digest": digest}
    result.pack, result.pack_written = path, True


def format_report(src: Path, r: PrepareResult) -> str:
    """The text of DST/report.txt."""
    s = r.settings
    lines = [
        "ddpmctl prepare report",
        f"source: {src}",
        f"settings: size {s.size}px, crop {s.crop}, small images {SMALL_DONE[s.small]}, background {s.background}",
        f"prepared set: {_count(r.count, 'image')} ({r.converted} converted now, {r.unchanged} unchanged, "
        f"{r.removed} removed)",
        f"packed array: {r.pack.name if r.pack else 'none'}",
        "",
        f"smaller than {s.size}px ({SMALL_DONE[s.small]}): {len(r.small)}",
        *(f"  {rel}" for rel in r.small),
        "",
        f"skipped, could not be used: {len(r.rejected)}",
        *(f"  {rel}: {reason}" for rel, reason in r.rejected),
    ]
    return "\n".join(lines) + "\n"
