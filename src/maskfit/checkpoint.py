"""Atomic checkpoints: weights in safetensors, everything needed to resume exactly beside them.

A checkpoint is a folder ``step_XXXXXXX`` holding
  model.safetensors, ema.safetensors   weights (fp32)
  optimizer.pt                         optimizer state
  state.pt                             step, RNG states, data-order state
  config.json                          the resolved run config
It is written to a temporary folder and renamed into place, and ``latest`` (a text file naming the
folder) is replaced atomically afterwards: a crash at any moment leaves the previous checkpoint intact.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _state_dict_for_safetensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage and non-contiguous tensors; weights are saved as plain copies.
    return {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    ema: Optional[torch.nn.Module],
    optimizer: Optional[torch.optim.Optimizer],
    extra_state: dict[str, Any],
    config: dict,
    keep_last: int = 3,
) -> Path:
    run_dir = Path(run_dir)
    ckpt_root = run_dir / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:07d}"
    tmp = Path(tempfile.mkdtemp(dir=ckpt_root, prefix=f".tmp_step_{step:07d}_"))
    save_file(_state_dict_for_safetensors(model), str(tmp / "model.safetensors"))
    if ema is not None:
        save_file(_state_dict_for_safetensors(ema), str(tmp / "ema.safetensors"))
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save({"step": step, "rng": rng_state(), **extra_state}, tmp / "state.pt")
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(ckpt_root / "latest", final.name)
    # Keep the newest few checkpoints.
    old = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir())[:-keep_last] if keep_last > 0 else []
    for p in old:
        shutil.rmtree(p, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if path.exists() else None


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint folder, or a run folder (its latest checkpoint)."""
    path = Path(path)
    if (path / "model.safetensors").exists():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"{path} is neither a checkpoint folder (with model.safetensors) nor a run with checkpoints")
    return latest


def load_weights(module: torch.nn.Module, file: Path) -> None:
    """Load safetensors weights; an architecture mismatch names the differing keys and shapes."""
    state = load_file(str(file))
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        detail = []
        if missing:
            detail.append(f"missing {missing[:5]}")
        if unexpected:
            detail.append(f"unexpected {unexpected[:5]}")
        if wrong:
            detail.append("shape " + ", ".join(f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in wrong[:5]))
        raise ValueError(
            f"checkpoint {file} was saved from another architecture ({'; '.join(detail)}); "
            "load it with the model config saved beside it (config.json)"
        )
    module.load_state_dict(state)


def load_state(ckpt: Path) -> dict[str, Any]:
    return torch.load(Path(ckpt) / "state.pt", map_location="cpu", weights_only=False)


def load_config_of(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / "config.json").read_text())
