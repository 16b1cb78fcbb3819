"""A smaller copy of an image folder, re-encoded as JPEG, for carrying to the GPU machine.

The device machine receives at most 64 MiB with the working tree and no ``../shared``: Imagenette's
``train-128`` holds 59 MiB of JPEG bytes (78 MB on disk), which leaves no room for the repository and the
proxy classifier. This writes every image again as a progressive JPEG with optimised Huffman tables at
``--quality`` (85 by default: about 48 MiB for train-128, 0.82x the bytes, mean absolute pixel change ~2.4
of 255), keeping each file's path relative to the root, so the project's held-out split
(:mod:`maskfit.data.split`, keyed by relative path) is the same in the copy. Training images and held-out
reference images come from the same copy, so every run and every reference sees the same pixels.

    python -m maskfit.data.reencode ../shared/data/imagenette/train-128 .carry/imagenette/train-128

``MANIFEST.json`` in the copy records the source, the quality, the bytes before and after and the pixel
difference measured over every image.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from maskfit.data.datasets import IMAGE_EXTENSIONS, load_rgb


def reencode_folder(src: Path, dst: Path, quality: int = 85, overwrite: bool = False) -> dict:
    """Write every image under ``src`` to the same relative path under ``dst`` (JPEG, ``quality``)."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise FileNotFoundError(f"source folder {src} does not exist")
    if not 1 <= quality <= 100:
        raise ValueError(f"--quality {quality} must lie in 1..100 (JPEG quality)")
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise FileExistsError(f"{dst} already holds files; pass --overwrite to write the copy again")
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"{src} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    bytes_in = bytes_out = 0
    max_diff, sum_diff = 0, 0.0
    for path in files:
        rel = path.relative_to(src)
        img = load_rgb(path)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality, optimize=True, progressive=True)
        out = dst / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(buf.getvalue())
        before = np.asarray(img, dtype=np.int16)
        after = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), dtype=np.int16)
        diff = np.abs(before - after)
        max_diff, sum_diff = max(max_diff, int(diff.max())), sum_diff + float(diff.mean())
        bytes_in += path.stat().st_size
        bytes_out += len(buf.getvalue())
    manifest = {
        "source": str(src), "images": len(files), "quality": quality, "progressive": True, "optimize": True,
        "bytes_source": bytes_in, "bytes_copy": bytes_out, "mib_copy": round(bytes_out / 2**20, 2),
        "pixel_abs_diff_max": max_diff, "pixel_abs_diff_mean": round(sum_diff / len(files), 4),
        "note": "file paths relative to the root are kept, so maskfit.data.split gives the same held-out split",
    }
    (dst / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m maskfit.data.reencode", description=__doc__.split("\n\n")[0])
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--quality", type=int, default=85)
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    try:
        print(json.dumps(reencode_folder(Path(args.src), Path(args.dst), args.quality, args.overwrite), indent=2))
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"reencode: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
