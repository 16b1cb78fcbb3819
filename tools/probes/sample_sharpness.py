"""Probe: how much detail and contrast do a run's samples keep, checkpoint by checkpoint? (REPORT.md, decoder)

    PYTHONPATH=src python3 tools/probes/sample_sharpness.py ARCHIVE [ARCHIVE ...] [--size 64x64]
        [--real FOLDER] [--out FILE.jsonl]

ARCHIVE: a ``tools/study.sh run`` archive (``NAME_sSEED.tar.gz``) or an experiment folder; every
``eval/ID/step_N/id/samples/none/grid_HxW.png`` at the chosen size is read (the first 64 samples of the set,
as ``maskfit experiment`` saves them). A committed sheet (``study/sheets/NAME_sSEED.jpg``, with its ``.txt``)
gives the final checkpoint's first 8 samples at that size (eval id ``sheet``): JPEG at quality 92, and 8 samples
a run, so a rough reading, but one every run has, archived or not. Two numbers per grid
(``maskfit.evaluate.image_stats``, which every evaluation now also reports as ratios to its references):
``laplacian``, the energy of the finest detail (blurred samples score low, speckle noise high), and ``contrast``,
the per-image standard deviation (washed-out samples score low). This probe reads them from the grids of runs
made before the evaluation did.

``--real FOLDER`` scores real images the same way (256 files evenly spaced in sorted order, so every class
folder contributes, each resized to the size with bicubic filtering, no crop), the values a faithful sampler's
grids should sit near. The FD of the proxy says samples got worse; these two say in which direction (lost
detail, lost contrast, or added noise).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tarfile
from io import BytesIO
from pathlib import Path
from typing import Iterator, Tuple

import numpy as np
from PIL import Image

from maskfit.evaluate.image_stats import detail_and_contrast
from maskfit.sample import grid_cells
from maskfit.study_sheets import read_sheet, sheet_strip

GRID = re.compile(r"(?:^|/)eval/(?P<eval_id>[^/]+)/step_(?P<step>\d+)/id/samples/none/grid_(?P<h>\d+)x(?P<w>\d+)\.png$")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def grids_in(source: Path, size: Tuple[int, int]) -> Iterator[Tuple[str, int, Image.Image]]:
    """(eval id, step, grid) for every in-distribution, no-extrapolation grid of ``size`` in an archive or folder."""
    def wanted(name: str):
        match = GRID.search(name)
        if match and (int(match["h"]), int(match["w"])) == size:
            return match["eval_id"], int(match["step"])
        return None

    if source.suffix.lower() == ".jpg" and source.with_suffix(".txt").exists():  # a committed sample sheet
        step, order, sheet = read_sheet(source)
        if (*size, "none") in order:
            yield "sheet", step, sheet_strip(sheet, order, (*size, "none"))
        return
    if source.is_dir():
        for path in sorted(source.rglob("grid_*.png")):
            key = wanted(path.relative_to(source).as_posix())
            if key:
                yield key[0], key[1], Image.open(path).convert("RGB")
        return
    with tarfile.open(source) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            key = wanted(member.name)
            if key:
                yield key[0], key[1], Image.open(BytesIO(tar.extractfile(member).read())).convert("RGB")


def real_images(folder: Path, size: Tuple[int, int], count: int = 256) -> np.ndarray:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    files = files[:: max(1, len(files) // count)][:count]
    if not files:
        raise SystemExit(f"--real {folder}: no image files (one of {sorted(IMAGE_SUFFIXES)}) under it")
    h, w = size
    return np.stack([np.asarray(Image.open(f).convert("RGB").resize((w, h), Image.BICUBIC)) for f in files])


def parse_size(text: str) -> Tuple[int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if not match:
        raise argparse.ArgumentTypeError(f"--size {text!r}: give HEIGHTxWIDTH in pixels, e.g. 64x64")
    return int(match[1]), int(match[2])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="+", type=Path,
                        help="study archives (.tar.gz), experiment folders, or committed sheets (study/sheets/RUN.jpg)")
    parser.add_argument("--size", type=parse_size, default=(64, 64), help="HEIGHTxWIDTH of the grids to score")
    parser.add_argument("--real", type=Path, help="a folder of real images to score the same way")
    parser.add_argument("--out", type=Path, help="write one JSON line per grid here")
    args = parser.parse_args(argv)
    rows = []
    if args.real is not None:
        laplacian, contrast = detail_and_contrast(real_images(args.real, args.size))
        rows.append({"source": str(args.real), "eval_id": None, "step": None, "laplacian": laplacian,
                     "contrast": contrast})
    for source in args.sources:
        if not source.exists():
            raise SystemExit(f"{source}: no such archive or folder (tools/study.sh run writes NAME_sSEED.tar.gz)")
        found = 0
        for eval_id, step, grid in grids_in(source, args.size):
            laplacian, contrast = detail_and_contrast(grid_cells(grid, *args.size))
            rows.append({"source": source.name, "eval_id": eval_id, "step": step, "laplacian": laplacian,
                         "contrast": contrast})
            found += 1
        if not found:
            raise SystemExit(f"{source}: no eval/ID/step_N/id/samples/none/grid_{args.size[0]}x{args.size[1]}.png "
                             "in it (nor such a strip, for a sheet); pass --size of a grid the run sampled")
    for row in rows:
        print(f"{row['source']:<32} {str(row['eval_id']):<12} step {str(row['step']):>6}  "
              f"laplacian {row['laplacian']:.4f}  contrast {row['contrast']:.3f}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
