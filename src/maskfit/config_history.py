"""A run folder's config over time: ``config.json`` holds the current one, ``config_history.jsonl`` every change.

A resumed run may legitimately change settings (more steps, another learning rate); overwriting
``config.json`` alone would leave the checkpoints of the earlier steps described by settings they were
not trained with. Each change is appended as one JSON line: the step it took effect at and, per dotted
key, the value before and after.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from maskfit.config import RunConfig, save_config, to_dict

HISTORY_NAME = "config_history.jsonl"


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as {"section.key": value}; lists (tuples saved as JSON) stay values."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else key))
    return out


def config_changes(old: dict, new: dict) -> dict[str, dict[str, Any]]:
    """{dotted key: {"from": old value, "to": new value}} for every key that differs (absent = None)."""
    a, b = _flat(old), _flat(new)
    return {k: {"from": a.get(k), "to": b.get(k)} for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def save_run_config(run_dir: Path, cfg: RunConfig, step: int) -> dict[str, dict[str, Any]]:
    """Write ``run_dir/config.json``; when it held another config, first append the change to the history.

    Returns the changes (empty for a new run or an unchanged config).
    """
    path = run_dir / "config.json"
    new = json.loads(json.dumps(to_dict(cfg)))  # tuples -> lists, as saved
    changes = {}
    if path.is_file():
        changes = config_changes(json.loads(path.read_text()), new)
    if changes:
        entry = {"step": step, "time": time.strftime("%Y-%m-%d %H:%M:%S"), "changes": changes}
        with open(run_dir / HISTORY_NAME, "a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
    save_config(cfg, path)
    return changes


def describe_changes(changes: dict[str, dict[str, Any]]) -> str:
    return ", ".join(f"{k} {v['from']!r} -> {v['to']!r}" for k, v in changes.items())
