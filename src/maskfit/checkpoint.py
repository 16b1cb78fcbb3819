"""Atomic checkpoints: weights in safetensors, everything needed to resume exactly beside them.

A checkpoint is a folder ``step_XXXXXXX`` holding
  model.safetensors, ema.safetensors   weights (fp32)
  optimizer.pt                         optimizer state
  state.pt                             step, RNG states, data-order state
  config.json                          the resolved run config
or, written sharded (train.checkpoint_format; FSDP's default), ``sharded/`` in place of the first three: a
``torch.distributed.checkpoint`` folder where every rank wrote its own shards of ``model``, ``ema`` and
``optimizer`` (no rank gathers the whole model); any number of processes reads it back, resharding as it loads.
It is written to a temporary folder and renamed into place, and ``latest`` (a text file naming the
folder) is replaced atomically afterwards: a crash at any moment leaves the previous checkpoint intact.
A missing, empty or dangling ``latest`` falls back to the newest complete folder; weights with NaN/inf are
never written; a failed write (e.g. a full disk) removes its temporary folder and says why.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import random
import re
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

# Every file of a checkpoint that ``maskfit train`` needs to resume (a sharded one: SHARDED_DIR and the last two).
RESUME_FILES = ("model.safetensors", "ema.safetensors", "optimizer.pt", "state.pt", "config.json")
SHARDED_DIR = "sharded"  # torch.distributed.checkpoint's folder in a sharded checkpoint


def process_umask() -> int:
    """The process umask, read without changing it where Linux shows it (os.umask can only set it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore at once
    os.umask(mask)
    return mask


def shared_mode(directory: bool = False) -> int:
    """The mode ``open``/``mkdir`` would give under the process umask: tempfile makes files 0600 and
    folders 0700, which a team sharing run folders cannot read."""
    return (0o777 if directory else 0o666) & ~process_umask()


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, shared_mode())  # mkstemp's 0600: follow the umask like every other tool
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _state_dict_for_safetensors(module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage and non-contiguous tensors; weights are saved as plain copies.
    # A dict is a state dict already gathered (maskfit.distributed.full_model_state: FSDP's shards).
    state = module if isinstance(module, dict) else module.state_dict()
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


def rng_state() -> dict[str, Any]:
    """Every global RNG as tensors, ints, floats, strings and tuples only: what ``torch.load(weights_only=True)``
    reads back (numpy's own state holds an ndarray, which it refuses)."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = {"bit_generator": str(name), "key": torch.from_numpy(key.astype(np.int64)),  # (624,) uint32 values
                   "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)}
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    saved = state["numpy"]
    if isinstance(saved, dict):
        saved = (saved["bit_generator"], saved["key"].numpy().astype(np.uint32), saved["pos"], saved["has_gauss"],
                 saved["gauss"])
    np.random.set_state(saved)  # else numpy's own tuple: checkpoints written before the plain format
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
    """Write ``checkpoints/step_XXXXXXX`` atomically, point ``latest`` at it, prune older ones.

    Refused (ValueError, nothing written) when the weights hold NaN/inf: a diverged model must never
    become ``latest`` nor push the last good checkpoints out. A failed write (a full disk, a torch
    "unexpected pos" short write, any OSError) removes the partial folder and raises
    :class:`CheckpointWriteError` naming the folder and its free space; the earlier checkpoints are intact.
    Pruning keeps the new checkpoint and the ``keep_last - 1`` newest below it, and never touches a folder
    of a higher step (not this run's history to judge).
    """
    run_dir = Path(run_dir)
    ckpt_root = run_dir / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:07d}"
    weights = {"model.safetensors": _state_dict_for_safetensors(model)}
    if ema is not None:
        weights["ema.safetensors"] = _state_dict_for_safetensors(ema)
    _check_finite_weights(weights, final)
    tmp = _make_tmp_folder(ckpt_root, step)
    try:
        for name, state in weights.items():
            save_file(state, str(tmp / name))
        if optimizer is not None:  # an optimizer, or its state dict gathered across ranks
            torch.save(optimizer if isinstance(optimizer, dict) else optimizer.state_dict(), tmp / "optimizer.pt")
        _finish_and_rename(tmp, final, step, extra_state, config)
    except BaseException as exc:  # Ctrl-C mid-write included: no partial folder stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, (OSError, RuntimeError, SafetensorError)):
            raise CheckpointWriteError(_write_error_message(exc, ckpt_root, final)) from exc
        raise
    _point_latest_and_prune(run_dir, final, step, keep_last)
    return final


def _make_tmp_folder(ckpt_root: Path, step: int) -> Path:
    """The temporary folder a checkpoint is written into (removed at start if a write never finished)."""
    tmp = Path(tempfile.mkdtemp(dir=ckpt_root, prefix=f"{TMP_PREFIX}{step:07d}_"))
    os.chmod(tmp, shared_mode(directory=True))  # mkdtemp's 0700 would survive the rename
    return tmp


def _finish_and_rename(tmp: Path, final: Path, step: int, extra_state: dict[str, Any], config: dict) -> None:
    """Write state.pt and config.json beside the weights in ``tmp``, open the files to the umask (safetensors
    writes 0600 whatever it is), and rename the folder into place."""
    torch.save({"step": step, "rng": rng_state(), **extra_state}, tmp / "state.pt")
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    for f in tmp.rglob("*"):
        os.chmod(f, shared_mode(directory=f.is_dir()))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def _point_latest_and_prune(run_dir: Path, final: Path, step: int, keep_last: int) -> None:
    """``latest`` names ``final``; keep it and the ``keep_last - 1`` newest below it (0: keep all)."""
    try:
        atomic_write_text(final.parent / "latest", final.name)
    except OSError as exc:
        raise CheckpointWriteError(
            f"checkpoint {final} was written but `latest` could not be updated ({exc}); the next start resumes "
            "from the newest complete checkpoint folder anyway"
        ) from exc
    if keep_last > 0:
        older = [p for p in complete_checkpoints(run_dir) if _step_of(p) < step]
        for p in older[: max(len(older) - (keep_last - 1), 0)]:
            shutil.rmtree(p, ignore_errors=True)


TMP_PREFIX = ".tmp_step_"  # save_checkpoint's temporary folders: .tmp_step_XXXXXXX_<random>
_STEP_DIR = re.compile(r"step_(\d+)")
_TMP_DIR = re.compile(re.escape(TMP_PREFIX) + r"\d{7}_")
# The files every checkpoint holds (optimizer.pt and ema.safetensors are optional: imported weights); a sharded
# checkpoint holds SHARDED_DIR/.metadata in place of model.safetensors.
REQUIRED_FILES = ("model.safetensors", "state.pt", "config.json")


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; the partial folder was removed, earlier checkpoints are intact."""


def _check_finite_weights(weights: dict[str, dict[str, torch.Tensor]], final: Path) -> None:
    floats = [(f, k, v) for f, state in weights.items() for k, v in state.items() if v.is_floating_point()]
    if not floats:
        return
    finite = torch.stack([torch.isfinite(v).all() for _, _, v in floats]).tolist()  # one sync per checkpoint
    bad = [f"{f}:{k}" for (f, k, _), ok in zip(floats, finite) if not ok]
    if bad:
        raise ValueError(
            f"refusing to write checkpoint {final}: {len(bad)} weight tensors hold NaN or inf (first: "
            f"{', '.join(bad[:3])}); the training diverged. The earlier checkpoints are kept and `latest` still "
            f"names the newest of them; lower optim.lr or check optim.eps / optim.grad_clip, then resume"
        )


def _write_error_message(exc: BaseException, ckpt_root: Path, final: Path) -> str:
    try:
        free = f"{shutil.disk_usage(ckpt_root).free / 2**30:.2f} GiB free there"
    except OSError:
        free = "free space unknown"
    text = str(exc)
    full = getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or any(
        s in text for s in ("unexpected pos", "No space left", "StorageFull", "os error 28", "Disk quota")
    )
    previous = latest_checkpoint(ckpt_root.parent)
    kept = (f"the earlier checkpoints are intact (latest: {previous.name})" if previous is not None
            else "no earlier checkpoint exists")
    if full:
        return (
            f"could not write checkpoint {final.name} into {ckpt_root}: the disk is full ({free}; the writer "
            f"said: {text.strip()[:200]}). The partial folder was removed and {kept}. Free some space or set "
            f"train.out_dir to another disk, then run the same command to resume"
        )
    return (
        f"could not write checkpoint {final.name} into {ckpt_root} ({free}): {text.strip()[:300]}. The partial "
        f"folder was removed and {kept}"
    )


def _step_of(folder: Path) -> int:
    return int(_STEP_DIR.fullmatch(folder.name).group(1))


def is_complete_checkpoint(folder: Path) -> bool:
    """A ``step_*`` folder holding every file a checkpoint always has, none of them empty."""
    if not (folder.is_dir() and _STEP_DIR.fullmatch(folder.name)):
        return False
    files = REQUIRED_FILES if not is_sharded(folder) else (f"{SHARDED_DIR}/.metadata", *REQUIRED_FILES[1:])
    return all((folder / f).is_file() and (folder / f).stat().st_size > 0 for f in files)


def is_sharded(folder: Path) -> bool:
    """A checkpoint written sharded (torch.distributed.checkpoint), not as one-process files."""
    return (Path(folder) / SHARDED_DIR / ".metadata").is_file()


def has_weights(folder: Path, name: str) -> bool:
    """Whether checkpoint ``folder`` holds the weights ``name`` ("model" or "ema"), in either format."""
    folder = Path(folder)
    if (folder / f"{name}.safetensors").is_file():
        return True
    return is_sharded(folder) and any(k.startswith(name + ".") for k in sharded_metadata(folder).state_dict_metadata)


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete checkpoint folders, oldest (lowest step) first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if is_complete_checkpoint(p)), key=_step_of)


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The checkpoint ``checkpoints/latest`` names; if it is missing, empty or names no complete
    checkpoint (a deleted pointer, a crash between the rename and the pointer), the newest complete one."""
    named = latest_pointer_target(run_dir)
    if named is not None:
        return named
    folders = complete_checkpoints(run_dir)
    return folders[-1] if folders else None


def latest_pointer_target(run_dir: Path) -> Optional[Path]:
    """The complete checkpoint folder ``checkpoints/latest`` names, or None."""
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    if not _STEP_DIR.fullmatch(name):
        return None
    path = pointer.parent / name
    return path if is_complete_checkpoint(path) else None


def holds_checkpoints(run_dir: Path) -> bool:
    """Whether the run folder holds any checkpoint folder or ``latest`` pointer (complete or not)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return False
    return any(p.name == "latest" or (_STEP_DIR.fullmatch(p.name) and p.is_dir()) for p in root.iterdir())


def remove_partial_checkpoints(run_dir: Path) -> list[Path]:
    """Delete the temporary folders of interrupted checkpoint writes (ours only: ``.tmp_step_XXXXXXX_*``).

    Each is a whole checkpoint's worth of bytes that no one will read; on a full disk they keep it full.
    """
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    removed = [p for p in root.iterdir() if p.is_dir() and _TMP_DIR.match(p.name)]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


RUN_FILES = ("checkpoints", "log.jsonl", "tb", "config.json")  # what `maskfit train` writes into a run folder


def set_aside_run(run_dir: Path) -> Optional[Path]:
    """Move a run folder's training files into ``run_dir/previous_run_<UTC time>/`` (nothing is deleted).

    For a fresh start into a folder that holds a run: the new run then has its own ``checkpoints``
    (pruning and ``latest`` see only its own steps) and the old one stays usable at the new place.
    """
    run_dir = Path(run_dir)
    present = [run_dir / name for name in RUN_FILES if (run_dir / name).exists()]
    if not present:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target = run_dir / f"previous_run_{stamp}"
    n = 1
    while target.exists():
        n += 1
        target = run_dir / f"previous_run_{stamp}_{n}"
    target.mkdir()
    for path in present:
        os.replace(path, target / path.name)
    return target


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint folder, or a run folder (its latest checkpoint)."""
    path = Path(path)
    if (path / "model.safetensors").exists() or is_sharded(path):
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"{path} is neither a checkpoint folder (with model.safetensors) nor a run with checkpoints")
    return latest


def older_complete_checkpoints(ckpt: Path) -> list[Path]:
    """The checkpoints of ``ckpt``'s run older than it with every file a resume needs, newest first."""
    ckpt = Path(ckpt)
    resumable = lambda p: (is_complete_checkpoint(p) and is_sharded(p)) or all((p / f).is_file() for f in RESUME_FILES)
    return sorted((p for p in ckpt.parent.glob("step_*") if p.is_dir() and p.name < ckpt.name and resumable(p)),
                  reverse=True)


def _short_reason(err: BaseException) -> str:
    """The informative line of a loader's error: torch wraps the unpickler's in paragraphs of advice."""
    text = str(err).strip()
    found = re.search(r"^\s*((?:Unsupported|Trying to load)[^\n]*)", text, re.MULTILINE)
    line = found.group(1) if found else (text.splitlines()[0] if text else type(err).__name__)
    line = line.split(". ")[0]
    return line if len(line) <= 200 else line[:200] + "..."


def unreadable_file_error(file: Path, err: BaseException) -> ValueError:
    """One error for a checkpoint file that cannot be read: the file, why, and the older checkpoints to use."""
    file = Path(file)
    ckpt = file.parent
    older = older_complete_checkpoints(ckpt)
    try:
        reason = "0 bytes" if file.stat().st_size == 0 else f"{type(err).__name__}: {_short_reason(err)}"
    except OSError:
        reason = f"{type(err).__name__}: {_short_reason(err)}"
    if older:
        latest = ckpt.parent / "latest"
        fix = (f"older complete checkpoints of this run: {', '.join(p.name for p in older[:5])}; to resume from "
               f"{older[0].name}, delete {ckpt} and write {older[0].name} into {latest}")
    else:
        fix = f"no older complete checkpoint is beside it in {ckpt.parent}; restore {file.name} from a copy"
    return ValueError(f"checkpoint file {file} cannot be read ({reason}): it is corrupt, truncated or not written by "
                      f"maskfit; {fix}")


def _numpy_globals() -> list:
    """numpy's array rebuild, under both module names: what checkpoints written before :func:`rng_state`
    went plain hold (numpy's RNG key). It builds arrays of plain values only, nothing callable."""
    reconstruct = np.core.multiarray._reconstruct if not hasattr(np, "_core") else np._core.multiarray._reconstruct
    return [reconstruct, (reconstruct, "numpy.core.multiarray._reconstruct"),
            (reconstruct, "numpy._core.multiarray._reconstruct"), np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def torch_load_safe(file: Path, map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)``: tensors and plain values only, so a crafted file cannot run code
    (a pickle may name any function to call on load). Refusals and corrupt files name the file."""
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint file {file} is missing; the checkpoint is incomplete")
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        names = sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(err))))
        if names:
            raise ValueError(
                f"refusing to load {file}: it names Python objects other than tensors and plain values "
                f"({', '.join(names)}), and unpickling them could run any code; maskfit never writes such objects, "
                "so the file was made or changed by something else: check who can write to this run folder, and "
                "resume from a checkpoint you trust"
            ) from None
        # Anything else the restricted unpickler refuses (an unknown opcode: garbage, or a pickle that is not
        # ours) was not executed either; it is simply not a readable checkpoint file.
        raise unreadable_file_error(file, err) from None
    except (RuntimeError, EOFError, ValueError, OSError) as err:
        raise unreadable_file_error(file, err) from err


def load_optimizer_state(ckpt: Path, map_location: Any = "cpu") -> dict:
    return torch_load_safe(Path(ckpt) / "optimizer.pt", map_location)


def load_weights(module: torch.nn.Module, file: Path) -> None:
    """Load safetensors weights (or, where ``file`` is a sharded checkpoint's ``model.safetensors`` or
    ``ema.safetensors``, the same weights from its shards); an architecture mismatch names the differing keys
    and shapes."""
    file = Path(file)
    name = file.name.removesuffix(".safetensors")
    if not file.is_file() and name in ("model", "ema") and is_sharded(file.parent):
        state = read_sharded_weights(file.parent, name)
    elif not file.is_file():
        raise FileNotFoundError(f"checkpoint file {file} is missing; the checkpoint is incomplete")
    else:
        try:
            state = load_file(str(file))
        except (SafetensorError, OSError, ValueError) as err:
            raise unreadable_file_error(file, err) from err
    own = module.state_dict()
    upgrade = getattr(module, "upgrade_state_dict", None)  # the model's own reading of weights saved by older code
    if upgrade is not None:
        state = upgrade(state)
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
    return torch_load_safe(Path(ckpt) / "state.pt")


def load_config_of(ckpt: Path) -> dict:
    file = Path(ckpt) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint file {file} is missing; the checkpoint is incomplete")
    try:
        config = json.loads(file.read_text())
    except (ValueError, OSError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise unreadable_file_error(file, err) from err
    if not isinstance(config, dict):
        raise unreadable_file_error(file, ValueError(f"holds a {type(config).__name__}, not a JSON object"))
    return config


# ----------------------------------------------------------------------------------------------------
# Sharded checkpoints (torch.distributed.checkpoint)
# ----------------------------------------------------------------------------------------------------


# What torch.distributed.checkpoint's .metadata pickle may name: its own metadata records, torch's sizes, dtypes
# and layouts, and paths. Anything else is refused before it is unpickled (torch itself reads the file with
# plain pickle.load, which would call whatever the file names).
_METADATA_MODULES = ("torch.distributed.checkpoint.metadata",)
_METADATA_GLOBALS = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
                     ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
                     ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if module in _METADATA_MODULES or (module, name) in _METADATA_GLOBALS or dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"GLOBAL {module}.{name} is not torch.distributed.checkpoint metadata")


def sharded_metadata(folder: Path):
    """A sharded checkpoint's metadata, read with :class:`_MetadataUnpickler`, and checked to hold tensors
    only: our writer stores nothing else there, and torch would unpickle any other entry without
    restriction (``torch.load(weights_only=False)``). Call it before torch.distributed.checkpoint reads the
    folder."""
    from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

    file = Path(folder) / SHARDED_DIR / ".metadata"
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint file {file} is missing; the checkpoint is incomplete")
    try:
        with open(file, "rb") as f:
            meta = _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as err:
        if "GLOBAL" in str(err):
            raise ValueError(
                f"refusing to load {file}: {err}, and unpickling it could run any code; maskfit never writes "
                "such objects, so the file was made or changed by something else: check who can write to this "
                "run folder, and resume from a checkpoint you trust"
            ) from None
        raise unreadable_file_error(file, err) from None
    except (OSError, EOFError, ValueError, AttributeError, TypeError) as err:
        raise unreadable_file_error(file, err) from err
    if not isinstance(meta, Metadata):
        raise unreadable_file_error(file, ValueError(f"holds a {type(meta).__name__}, not checkpoint metadata"))
    other = sorted(k for k, m in meta.state_dict_metadata.items() if not isinstance(m, TensorStorageMetadata))
    if other:
        raise ValueError(
            f"refusing to load {file.parent}: it stores {len(other)} entries that are not tensors (first: "
            f"{other[:3]}), which torch would unpickle without restriction; maskfit writes tensors only there "
            "(the optimizer's hyperparameters go to state.pt), so the folder was not written by maskfit"
        )
    return meta


def read_sharded_weights(folder: Path, name: str) -> dict[str, torch.Tensor]:
    """The whole fp32 state dict ``name`` ("model" or "ema") of a sharded checkpoint, read by this process
    alone (no collective: any process, inside a process group or not, may call it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    prefix = name + "."
    meta = sharded_metadata(folder).state_dict_metadata
    template = {k[len(prefix):]: torch.empty(m.size, dtype=m.properties.dtype)
                for k, m in meta.items() if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)}
    if not template:
        raise FileNotFoundError(f"{Path(folder) / SHARDED_DIR} holds no {name!r} weights; the checkpoint is incomplete")
    with one_process_quietly():
        dcp.load({name: template}, checkpoint_id=str(Path(folder) / SHARDED_DIR), no_dist=True)
    return template


@contextlib.contextmanager
def one_process_quietly():
    """torch.distributed.checkpoint warns on every one-process (no_dist) call that it assumes one process,
    which is what we asked for; the warning would otherwise print at every checkpoint of a one-process run."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def save_sharded_checkpoint(run_dir: Path, step: int, states: dict[str, dict], extra_state: dict[str, Any],
                            config: dict, parallel, keep_last: int = 3) -> Path:
    """:func:`save_checkpoint` for sharded state: every rank calls it with its own shards.

    ``states``: {"model": ..., "ema": ..., "optimizer": ...} as torch.distributed.checkpoint's
    get_model_state_dict / get_optimizer_state_dict return them (DTensor shards under FSDP), tensors only
    (:func:`sharded_metadata` refuses anything else on reading: plain values go into ``extra_state``).
    The same promises:
    non-finite weights are refused before anything is written (on every rank, with the same message), the
    folder is written under a temporary name (rank 0 makes it, every rank writes its shards into it) and
    renamed into place by rank 0 once every rank has written, then ``latest`` and pruning as usual.
    ``parallel``: the run's :class:`maskfit.distributed.Parallel` (rank, barrier, object gather, finite flag).
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from maskfit.distributed import local_tensor

    run_dir = Path(run_dir)
    ckpt_root = run_dir / "checkpoints"
    final = ckpt_root / f"step_{step:07d}"
    weights = [local_tensor(v) for key in ("model", "ema") for v in states[key].values() if v.is_floating_point()]
    finite = torch.stack([torch.isfinite(w).all() for w in weights]).all() if weights else torch.tensor(True)
    if not bool(parallel.all_finite(finite)):
        _check_finite_weights({f"{k} (this rank's shards)": {n: local_tensor(v) for n, v in states[k].items()}
                               for k in ("model", "ema")}, final)
        raise ValueError(f"refusing to write checkpoint {final}: another rank's shards hold NaN or inf; the "
                         "training diverged. The earlier checkpoints are kept; lower optim.lr, then resume")
    tmp = None
    if parallel.is_main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        tmp = _make_tmp_folder(ckpt_root, step)
    tmp = Path(parallel.gather_objects(str(tmp) if tmp else None)[0])
    try:
        with one_process_quietly():
            dcp.save(states, checkpoint_id=str(tmp / SHARDED_DIR), no_dist=not dist.is_initialized())
        parallel.barrier()  # every rank's shards are on disk before rank 0 finishes the folder
        if parallel.is_main:
            _finish_and_rename(tmp, final, step, extra_state, config)
    except BaseException as exc:  # Ctrl-C mid-write included: no partial folder stays behind
        from torch.distributed.checkpoint.api import CheckpointException  # every rank's errors, on every rank

        if parallel.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, (OSError, RuntimeError, CheckpointException)):
            raise CheckpointWriteError(_write_error_message(exc, ckpt_root, final)) from exc
        raise
    if parallel.is_main:
        _point_latest_and_prune(run_dir, final, step, keep_last)
    parallel.barrier()
    return final
