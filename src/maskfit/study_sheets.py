"""One sample sheet per study run, from the archive a device command brings back.

    python -m maskfit.study_sheets RUN.tar.gz ... --out study/sheets

``tools/study.sh run`` archives each experiment's sample grids (``NAME_sSEED.tar.gz``, 9-13 MB, too large to
commit). A sheet keeps what a reader needs to judge the samples: the first row of each grid of the run's
final checkpoint (8 samples), one strip per (resolution, RoPE method) in the protocol's order (in distribution first, then
out of distribution), stacked on a white page, saved as a JPEG at quality 92 (a PNG of these noisy
samples is ~3 MB a run, and the repository travels to the GPU machine whole). The strips carry no text (no font is assumed); the order is
:func:`sheet_order`, and :mod:`maskfit.study_report` writes it under each sheet it links.

The extra evaluations of the final checkpoint (``--also-cfg``, ``--raw-final``, ``--also-attn-scale``,
``--also-subset-sampling``: the same weights under another setting, at a few sizes) get a second sheet,
``RUN.extras.jpg``, one strip per (evaluation, size, method), its order in ``RUN.extras.txt`` with each strip's
eval id; :mod:`maskfit.study_report` names each id's setting from the result lines.
"""
from __future__ import annotations

import argparse
import re
import sys
import tarfile
from io import BytesIO
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from PIL import Image

GRID_PATH = re.compile(r"^(?P<run>[^/]+)/eval/(?P<eval_id>[^/]+)/step_(?P<step>\d+)/(?:id|ood)/samples/(?P<method>[^/]+)/grid_(?P<h>\d+)x(?P<w>\d+)\.png$")
ROWS_PER_STRIP = 1
JPEG_QUALITY = 92
GAP = 6  # white pixels between strips


def sheet_order(keys: Sequence[Tuple[int, int, str]]) -> List[Tuple[int, int, str]]:
    """(H, W, method) strips: in-distribution sizes (at most 64*64 pixels) before out-of-distribution ones, each
    by area, then width, then method with "none" first."""
    return sorted(keys, key=lambda k: (k[0] * k[1] > 4096, k[0] * k[1], k[1], k[2] != "none", k[2]))


Grids = Dict[Tuple[int, int, str], Image.Image]  # (H, W, method) -> a sampling run's grid


def read_final_grids(archive: Path) -> Tuple[str, int, str, Grids]:
    """(run, step, eval id, {(H, W, method): grid}) of the archive's last checkpoint (the run's final one), under
    its main evaluation: the eval id with the most grids there. The extra evaluations (``--also-cfg``,
    ``--raw-final``, ``--also-attn-scale``) sample the same checkpoint at a few sizes under other settings, and
    their grids must not stand in for the main one's (sheets written before 2026-12-02's third session could take
    a 64x64 strip from one of them)."""
    run, step, by_eval = read_final_evaluations(archive)
    eval_id = main_evaluation(by_eval)
    return run, step, eval_id, by_eval[eval_id]


def main_evaluation(by_eval: Dict[str, Grids]) -> str:
    """The main evaluation's id: the one with the most grids (ties: the smallest id)."""
    return min(by_eval, key=lambda e: (-len(by_eval[e]), e))


def read_final_evaluations(archive: Path) -> Tuple[str, int, Dict[str, Grids]]:
    """(run, step, {eval id: {(H, W, method): grid}}) of the archive's last checkpoint, every evaluation of it."""
    found: Dict[Tuple[int, str], Dict[Tuple[int, int, str], str]] = {}
    run = None
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            m = GRID_PATH.match(member.name)
            if m and member.isfile():
                run = m["run"]
                found.setdefault((int(m["step"]), m["eval_id"]), {})[(int(m["h"]), int(m["w"]), m["method"])] = member.name
        if not found:
            raise ValueError(
                f"{archive} holds no sample grids (RUN/eval/ID/step_N/(id|ood)/samples/METHOD/grid_HxW.png); pass an "
                "archive written by tools/study.sh run"
            )
        step = max(s for s, _ in found)
        by_eval: Dict[str, Grids] = {}
        for (s, eval_id), names in found.items():
            if s != step:
                continue
            for key, name in names.items():
                with tar.extractfile(name) as f:
                    by_eval.setdefault(eval_id, {})[key] = Image.open(BytesIO(f.read())).convert("RGB")
    return run, step, by_eval


def top_rows(grid: Image.Image, height: int, rows: int = ROWS_PER_STRIP) -> Image.Image:
    """The first ``rows`` rows of a grid of ``height``-pixel images with 2-pixel borders (save_grid's layout)."""
    pad = 2
    return grid.crop((0, 0, grid.width, min(grid.height, pad + rows * (height + pad))))


def make_sheet(grids: Grids) -> Tuple[Image.Image, List[Tuple[int, int, str]]]:
    order = sheet_order(list(grids))
    return stack_strips([top_rows(grids[k], k[0]) for k in order]), order


def stack_strips(strips: Sequence[Image.Image]) -> Image.Image:
    """Strips one below the other, GAP white pixels apart, on a white page as wide as the widest."""
    sheet = Image.new("RGB", (max(s.width for s in strips), sum(s.height for s in strips) + GAP * (len(strips) - 1)),
                      "white")
    y = 0
    for strip in strips:
        sheet.paste(strip, (0, y))
        y += strip.height + GAP
    return sheet


GRID_COLUMNS = 8  # sampling_run's grids: 8 samples a row
SHEET_ORDER = re.compile(r"^step (?P<step>\d+)(?: \(eval (?P<eval_id>\w+)\))?; strips top to bottom: (?P<strips>.+)$")


def read_sheet(path: Path) -> Tuple[int, List[Tuple[int, int, str]], Image.Image]:
    """(step, strips' (H, W, method) in order, sheet) of a sheet written by :func:`write_sheet` (RUN.jpg and RUN.txt)."""
    text = path.with_suffix(".txt").read_text().strip()
    match = SHEET_ORDER.match(text)
    if not match:
        raise ValueError(f"{path.with_suffix('.txt')}: not a sheet's strip order (\"step N; strips top to bottom: ...\")")
    order = []
    for item in match["strips"].split(","):
        size, method = item.split()
        h, w = size.split("x")
        order.append((int(h), int(w), method))
    return int(match["step"]), order, Image.open(path).convert("RGB")


def sheet_strip(sheet: Image.Image, order: Sequence[Tuple[int, int, str]], key: Tuple[int, int, str]) -> Image.Image:
    """The strip of ``key`` (the first row of its grid, borders included) cut back out of a sheet laid out by
    :func:`make_sheet` in ``order``: what ``grid_cells`` reads as a grid of one row."""
    y = 0
    for k in order:
        height = 2 + ROWS_PER_STRIP * (k[0] + 2)
        if k == key:
            return sheet.crop((0, y, min(sheet.width, 2 + GRID_COLUMNS * (k[1] + 2)), y + height))
        y += height + GAP
    strips = ", ".join(f"{h}x{w} {m}" for h, w, m in order)
    raise KeyError(f"no {key[0]}x{key[1]} {key[2]} strip on this sheet; it has {strips}")


EXTRAS = ".extras"  # RUN.extras.jpg / RUN.extras.txt: the final checkpoint's extra evaluations


def write_sheet(archive: Path, out: Path) -> Path:
    run, step, by_eval = read_final_evaluations(archive)
    eval_id = main_evaluation(by_eval)
    sheet, order = make_sheet(by_eval[eval_id])
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{run}.jpg"
    sheet.save(path, quality=JPEG_QUALITY, optimize=True)
    (out / f"{run}.txt").write_text(
        f"step {step} (eval {eval_id}); strips top to bottom: " + ", ".join(f"{h}x{w} {m}" for h, w, m in order) + "\n"
    )
    extras = [(e, k) for e in sorted(by_eval) if e != eval_id for k in sheet_order(list(by_eval[e]))]
    extras_jpg, extras_txt = out / f"{run}{EXTRAS}.jpg", out / f"{run}{EXTRAS}.txt"
    if extras:
        stack_strips([top_rows(by_eval[e][k], k[0]) for e, k in extras]).save(extras_jpg, quality=JPEG_QUALITY,
                                                                              optimize=True)
        extras_txt.write_text(f"step {step}; strips top to bottom: "
                              + ", ".join(f"{h}x{w} {m} (eval {e})" for e, (h, w, m) in extras) + "\n")
    else:  # a rewritten sheet must not keep another archive's extras beside it
        extras_jpg.unlink(missing_ok=True)
        extras_txt.unlink(missing_ok=True)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m maskfit.study_sheets", description=__doc__.split("\n\n")[0])
    p.add_argument("archives", nargs="+", help="NAME_sSEED.tar.gz from tools/study.sh run")
    p.add_argument("--out", default="study/sheets", help="folder for RUN.jpg and RUN.txt (the strips' order)")
    args = p.parse_args(argv)
    for archive in args.archives:
        try:
            print(write_sheet(Path(archive), Path(args.out)))
        except (ValueError, OSError, tarfile.TarError) as exc:
            print(f"study_sheets: error: {archive}: {exc}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
