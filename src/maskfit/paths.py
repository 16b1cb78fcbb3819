"""Output paths checked before any work: a command must not train for an hour and then fail to save.

Each command calls :func:`check_output_file` / :func:`check_output_dir` on every path it will write,
first thing. A folder where a file is expected, a file where a folder is expected (or in the way of
one), and a location the user cannot write to are refused with one :class:`OutputPathError` (a
ValueError: the CLI prints it on one line) naming the option, the path and the fix. Nothing is created.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

PathLike = Union[str, os.PathLike]


class OutputPathError(ValueError):
    """An output path that cannot be written as asked."""


def check_output_file(path: PathLike, option: str, what: str = "file") -> Path:
    """``path`` can be written as a file: not a folder, its parent a folder (or creatable) we can write in."""
    path = Path(path)
    if path.is_dir():
        example = _EXAMPLE_NAMES.get(what)
        fix = f"give a file path, e.g. {path / example}" if example else "give another file path or move the folder away"
        raise OutputPathError(f"{option} {path} is a folder, but it names the {what} to write; {fix}")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputPathError(f"{option} {path}: the existing file is not writable; choose another path or fix its permissions")
    _check_parent_writable(path.parent, path, option)
    return path


def check_output_dir(path: PathLike, option: str, what: str = "output folder") -> Path:
    """``path`` can be used as a folder: an existing folder we can write in, or creatable where it is."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputPathError(
            f"{option} {path} is a file, but it names the {what}; give a folder path (or move the file away)"
        )
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise OutputPathError(f"{option} {path}: no permission to write in this folder; choose another one")
        return path
    _check_parent_writable(path.parent, path, option)
    return path


def _check_parent_writable(parent: Path, path: Path, option: str) -> None:
    """The nearest existing ancestor of ``path`` must be a folder we can write in (mkdir -p then works)."""
    ancestor = parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputPathError(
            f"{option} {path}: {ancestor} is a file, so no folder can be made there; choose a path whose "
            "parent folders are folders"
        )
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputPathError(
            f"{option} {path}: no permission to write in {ancestor}; choose a location you can write to"
        )


_EXAMPLE_NAMES = {"checkpoint file": "proxy.safetensors", "reference file": "reference.npz",
                  "JSON-lines file": "bench.jsonl"}
