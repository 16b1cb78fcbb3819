"""Nothing lost: diverging runs, signals, lost `latest` pointers, fresh starts into a run, partial and failed
checkpoint writes, and output paths that would only fail after the work (issue "Nothing lost, nothing
silently wrong", part "Losing work")."""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from maskfit import checkpoint as ckpt_io
from maskfit import train as train_module
from maskfit.cli import main
from maskfit.config import to_dict
from maskfit.divergence import BadStepCount, BadSteps, DivergenceError, clip_and_check
from maskfit.tokens import TokenBatch
from maskfit.train import build_training_run, run_patch_size, train, train_step
from tests.test_train import tiny_run

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (Path(run_dir) / "checkpoints").iterdir())


def _weights(folder: Path) -> dict:
    return {**{f"model:{k}": v for k, v in load_file(str(folder / "model.safetensors")).items()},
            **{f"ema:{k}": v for k, v in load_file(str(folder / "ema.safetensors")).items()}}


# ----------------------------------------------------------------------------------------------------
# Diverging runs: skipped steps, a clear stop, no non-finite checkpoint, no good checkpoint pruned
# ----------------------------------------------------------------------------------------------------


def _run_and_batches(tmp_path, fused: bool):
    from maskfit.data.pipeline import build_training_data

    cfg = tiny_run(tmp_path / "run")
    data = build_training_data(cfg, run_patch_size(cfg))
    run = build_training_run(cfg, data.channels)
    if fused:  # the CUDA path (found_inf + device-weighted EMA), on the CPU's fused AdamW
        run.optimizer = torch.optim.AdamW(run.model.parameters(), lr=cfg.optim.lr, eps=cfg.optim.eps, fused=True)
    assert bool(run.optimizer.defaults.get("fused")) == fused
    return run, [data.next_device_batch(s, run.device) for s in range(3)]


def _snapshot(run) -> dict:
    out = {f"model:{k}": v.clone() for k, v in run.model.state_dict().items()}
    out.update({f"ema:{k}": v.clone() for k, v in run.ema.state_dict().items()})
    for i, state in enumerate(run.optimizer.state.values()):
        out.update({f"opt{i}:{k}": v.clone() for k, v in state.items()})
    return out


@pytest.mark.parametrize("fused", [False, True], ids=["cpu-adamw-host-check", "fused-adamw-found-inf"])
def test_a_non_finite_step_changes_no_weight_optimizer_state_or_ema_and_is_counted(tmp_path, fused):
    run, batches = _run_and_batches(tmp_path, fused)
    train_step(run, batches[0], 0)  # optimizer state exists from here
    before = _snapshot(run)
    poisoned = TokenBatch(torch.full_like(batches[1].tokens, float("nan")), batches[1].y, batches[1].layout)
    loss, _, _ = train_step(run, poisoned, 1)
    assert not torch.isfinite(loss)
    after = _snapshot(run)
    assert after.keys() == before.keys()
    for k in before:  # bit for bit: weights, EMA, Adam moments and step counts
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0, equal_nan=False, msg=k)
    assert run.bad_steps.read() == BadStepCount(1, 1, 1)  # in a row, longest since the last read, total
    train_step(run, batches[2], 2)  # a finite step updates again and ends the streak
    assert not torch.equal(run.model.state_dict()["final_layer.linear.weight"], before["model:final_layer.linear.weight"])
    assert run.bad_steps.read() == BadStepCount(0, 1, 1)  # the streak seen at the last read was 1 long
    assert run.bad_steps.read() == BadStepCount(0, 0, 1)


def test_the_check_covers_the_loss_the_gradient_and_the_clip_value():
    p = torch.nn.Parameter(torch.ones(3))
    finite = torch.tensor(1.0)
    for grad, max_norm, loss, ok in [
        (torch.ones(3), 1.0, finite, True),
        (torch.ones(3), 1.0, torch.tensor(float("inf")), False),  # loss
        (torch.tensor([1.0, float("inf"), 0.0]), 1.0, finite, False),  # gradient (the clip would make it NaN)
        (torch.ones(3), float("nan"), finite, False),  # optim.grad_clip=NaN: every clipped gradient is NaN
    ]:
        p.grad = grad.clone()
        norm, result = clip_and_check([p], max_norm, loss)
        assert bool(result) == ok, (grad, max_norm, loss)
    p.grad = torch.full((3,), 4.0)
    norm, _ = clip_and_check([p], 1.0, finite)  # clipped like clip_grad_norm_
    torch.testing.assert_close(norm, torch.tensor(48.0).sqrt())
    torch.testing.assert_close(p.grad.norm(), torch.tensor(1.0), atol=1e-5, rtol=0)


def test_the_longest_streak_between_reads_is_remembered():
    """On CUDA the counters are read at log lines: a streak that ended before one must still stop the run."""
    counter = BadSteps(torch.device("cpu"))
    for ok in (True, False, False, False, True, False):
        counter.record(torch.tensor(ok))
    assert counter.read() == BadStepCount(1, 3, 4)
    assert counter.read() == BadStepCount(1, 1, 4)


def test_a_diverging_run_stops_with_a_clear_error_and_keeps_the_checkpoints_before_it(tmp_path):
    run_dir = tmp_path / "run"
    train(tiny_run(run_dir, steps=6), progress=False)  # good checkpoints at steps 3 and 6
    good = _weights(run_dir / "checkpoints" / "step_0000006")
    diverging = tiny_run(run_dir, steps=40, optim={"lr": 1e30}, train={"max_bad_steps": 4})
    with pytest.raises(DivergenceError, match=r"4 steps in a row.*step_0000006.*optim\.lr \(now 1e\+30\)"):
        train(diverging, progress=False)
    # Checkpoints due at steps 9, 12, ... were not written (the steps before were not finite), so pruning
    # to the newest 3 did not push out the good ones.
    assert _names(run_dir) == ["latest", "step_0000003", "step_0000006"]
    assert ckpt_io.latest_checkpoint(run_dir).name == "step_0000006"
    for k, v in _weights(run_dir / "checkpoints" / "step_0000006").items():
        assert torch.equal(v, good[k]), k
    last = json.loads((run_dir / "log.jsonl").read_text().splitlines()[-1])
    assert last["skipped_steps"] == 4 and last["bad_steps_in_a_row"] == 4  # the count is logged


def test_weights_that_are_not_finite_are_never_written_as_latest(tmp_path):
    # optim.eps=0: the first update divides 0 by 0 for every weight behind an adaLN-zero gate (their
    # gradient is 0): step 1 itself is finite, its result is not.
    # The config refuses eps=0 now (test_faults_silently_wrong); set it after validation to reach the write guard.
    run_dir = tmp_path / "run"
    cfg = tiny_run(run_dir, steps=10, train={"ckpt_every": 1})
    cfg.optim.eps = 0.0
    with pytest.raises(ValueError, match=r"refusing to write checkpoint .*step_0000001: \d+ weight tensors hold NaN"):
        train(cfg, progress=False)
    assert _names(run_dir) == []
    # The same refusal after good checkpoints: they stay, and `latest` names the newest of them.
    model = torch.nn.Linear(2, 2)
    for step in (1, 2, 3):
        ckpt_io.save_checkpoint(tmp_path, step, model, model, None, {}, {})
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"step_0000004: 2 weight tensors hold NaN or inf \(first: "
                                         r"model.safetensors:weight, ema.safetensors:weight\)"):
        ckpt_io.save_checkpoint(tmp_path, 4, model, model, None, {}, {})
    assert _names(tmp_path) == ["latest", "step_0000001", "step_0000002", "step_0000003"]
    assert ckpt_io.latest_checkpoint(tmp_path).name == "step_0000003"


def test_on_cuda_the_run_stops_at_the_first_log_line_after_the_limit(tmp_path, monkeypatch):
    """With the counters read at log lines only (CUDA), the stop comes within one log interval."""
    monkeypatch.setattr(train_module, "_reads_counters_every_step", lambda device: False)
    # lr=1e30: step 1 is finite (and wrecks the weights), steps 2, 3, 4 are the 3 bad ones; log line at 5.
    cfg = tiny_run(tmp_path / "run", steps=40, optim={"lr": 1e30},
                   train={"max_bad_steps": 3, "log_every": 5, "ckpt_every": 1000})
    with pytest.raises(DivergenceError, match=r"by step 5; 4 such steps skipped"):
        train(cfg, progress=False)
    monkeypatch.undo()  # off CUDA: exactly at the 3rd bad step
    with pytest.raises(DivergenceError, match=r"by step 4; 3 such steps skipped"):
        train(tiny_run(tmp_path / "exact", steps=40, optim={"lr": 1e30},
                       train={"max_bad_steps": 3, "log_every": 5, "ckpt_every": 1000}), progress=False)


def test_a_checkpoint_due_after_a_bad_step_waits_for_the_next_finite_one(tmp_path, monkeypatch):
    def poison_step_3(run, batch, step):  # the step that ends at step 3 sees a NaN batch
        if step == 2:
            batch = TokenBatch(torch.full_like(batch.tokens, float("nan")), batch.y, batch.layout, batch.mask)
        return train_step(run, batch, step)

    monkeypatch.setattr(train_module, "train_step", poison_step_3)
    result = train(tiny_run(tmp_path / "run", steps=6), progress=False)  # checkpoints due at 3 and 6
    assert result.step == 6 and result.skipped_steps == 1
    assert _names(tmp_path / "run") == ["latest", "step_0000004", "step_0000006"]
    assert ckpt_io.load_state(tmp_path / "run" / "checkpoints" / "step_0000006")["skipped_steps"] == 1
    logged = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["skipped_steps"], r["bad_steps_in_a_row"]) for r in logged] == [(2, 0, 0), (4, 1, 0), (6, 1, 0)]
    assert all(r["loss"] == r["loss"] for r in logged)  # the mean over the finite steps: no NaN


def test_pruning_never_deletes_the_checkpoint_it_just_wrote(tmp_path):
    """Older checkpoints go; folders of higher steps (another run's) and the new one stay."""
    model = torch.nn.Linear(2, 2)
    for step in (10, 20, 30):
        ckpt_io.save_checkpoint(tmp_path, step, model, model, None, {}, {})
    for step in (1, 2, 3, 4):
        ckpt_io.save_checkpoint(tmp_path, step, model, model, None, {}, {}, keep_last=2)
    assert _names(tmp_path) == ["latest", "step_0000003", "step_0000004", "step_0000010", "step_0000020",
                                "step_0000030"]
    assert ckpt_io.latest_checkpoint(tmp_path).name == "step_0000004"


# ----------------------------------------------------------------------------------------------------
# SIGTERM / Ctrl-C: a checkpoint at the next step boundary, a clean exit that says where it is
# ----------------------------------------------------------------------------------------------------


def _start_training(tmp_path: Path, name: str, workers: int) -> tuple[subprocess.Popen, Path]:
    run_dir = tmp_path / name
    cfg = tiny_run(run_dir, steps=10**6, train={"log_every": 1, "ckpt_every": 10**6},
                   data={"num_workers": workers})
    config = tmp_path / f"{name}.json"
    config.write_text(json.dumps(to_dict(cfg)))
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.Popen([sys.executable, "-m", "maskfit.cli", "train", str(config), "--quiet"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    return proc, run_dir


def _wait_for_steps(proc, run_dir: Path, steps: int, timeout: float = 60.0) -> None:
    log, t0 = run_dir / "log.jsonl", time.time()
    while not (log.exists() and len(log.read_text().splitlines()) >= steps):
        if proc.poll() is not None or time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"training did not start: {proc.communicate()}")
        time.sleep(0.05)


def test_sigterm_and_ctrl_c_write_a_checkpoint_and_exit_cleanly(tmp_path):
    """Real processes, real signals, each to the trainer's whole process group, loader worker included:
    SIGTERM as a scheduler preempting a job (SLURM signals every process), SIGINT as Ctrl-C in a terminal.
    Both run at once to keep the test short."""
    term, term_dir = _start_training(tmp_path, "term", workers=1)
    intr, intr_dir = _start_training(tmp_path, "intr", workers=1)
    _wait_for_steps(term, term_dir, 2)
    os.killpg(term.pid, signal.SIGTERM)
    _wait_for_steps(intr, intr_dir, 2)
    os.killpg(intr.pid, signal.SIGINT)
    for proc, run_dir, sig, code in ((term, term_dir, "SIGTERM", 143), (intr, intr_dir, "SIGINT", 130)):
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == code, (sig, proc.returncode, err)
        assert "Traceback" not in err, err
        step = json.loads(out.strip().splitlines()[-1])["step"]
        assert step >= 2
        latest = ckpt_io.latest_checkpoint(run_dir)
        assert latest.name == f"step_{step:07d}"
        assert ckpt_io.load_state(latest)["step"] == step
        assert f"stopped by {sig} at step {step}; checkpoint: {latest}" in err, err


# ----------------------------------------------------------------------------------------------------
# `latest` lost, fresh starts into a run
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["deleted", "empty", "dangling"])
def test_a_lost_latest_pointer_resumes_from_the_newest_complete_checkpoint(tmp_path, damage, capsys):
    run_dir = tmp_path / "run"
    train(tiny_run(run_dir, steps=6), progress=False)
    pointer = run_dir / "checkpoints" / "latest"
    if damage == "deleted":
        pointer.unlink()
    else:
        pointer.write_text("" if damage == "empty" else "step_0000099")
    (run_dir / "checkpoints" / "step_0000007").mkdir()  # an incomplete folder is not a checkpoint
    assert ckpt_io.latest_checkpoint(run_dir).name == "step_0000006"
    result = train(tiny_run(run_dir, steps=9), progress=False, stop_after=1)
    assert result.step == 7  # resumed at 6, not restarted at 0
    assert "resuming from step_0000006, the newest complete one" in capsys.readouterr().err


def test_checkpoint_folders_none_of_them_complete_are_not_overwritten_by_a_start_at_0(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step_0000005").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_0000005" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"holds checkpoint folders but none is complete .*--fresh-into-existing"):
        train(tiny_run(run_dir, steps=3), progress=False)
    assert _names(run_dir) == ["step_0000005"]


def test_a_fresh_start_into_a_run_is_refused_and_changes_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    train(tiny_run(run_dir, steps=6), progress=False)
    def run_files():  # the folder lock (maskfit.locks) records each holder: it is no file of the run
        return {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.name != ".maskfit.lock"}

    before = run_files()
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps(to_dict(tiny_run(run_dir, steps=3))))
    assert main(["train", str(config), "--no-resume", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{run_dir} already holds a run (latest checkpoint: step_0000006)" in err
    assert "--fresh-into-existing" in err
    assert run_files() == before


def test_fresh_into_existing_moves_the_old_run_aside_and_deletes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    train(tiny_run(run_dir, steps=6), progress=False)
    old = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*")
           if p.is_file() and p.name != ".maskfit.lock"}  # the folder's lock stays with the folder
    result = train(tiny_run(run_dir, steps=3), resume=False, fresh_into_existing=True, progress=False)
    assert result.step == 3
    assert _names(run_dir) == ["latest", "step_0000003"]  # the new run's own, not pruned by the old ones
    (aside,) = run_dir.glob("previous_run_*")
    moved = {p.relative_to(aside): p.read_bytes() for p in aside.rglob("*") if p.is_file()}
    assert moved == old  # every file of the old run, byte for byte
    assert ckpt_io.latest_checkpoint(aside).name == "step_0000006"  # still a usable run folder


# ----------------------------------------------------------------------------------------------------
# Partial checkpoint writes and full disks
# ----------------------------------------------------------------------------------------------------


def test_leftover_partial_checkpoints_are_removed_on_start(tmp_path, capsys):
    run_dir = tmp_path / "run"
    train(tiny_run(run_dir, steps=3), progress=False)
    ckpts = run_dir / "checkpoints"
    partial = ckpts / ".tmp_step_0000006_k2j4x9"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"x" * 1000)
    others = [ckpts / ".tmp_stepper", ckpts / "notes.tmp_step_0000006_a"]  # not ours: left alone
    others[0].mkdir()
    others[1].write_text("keep")
    train(tiny_run(run_dir, steps=4), progress=False)
    assert not partial.exists()
    assert all(p.exists() for p in others)
    assert f"removed {partial}" in capsys.readouterr().err


@pytest.mark.parametrize("failure", ["enospc", "unexpected-pos", "safetensors"])
def test_a_full_disk_is_named_and_the_earlier_checkpoints_stay(tmp_path, monkeypatch, failure):
    model = torch.nn.Linear(3, 3)
    opt = torch.optim.AdamW(model.parameters())
    ckpt_io.save_checkpoint(tmp_path, 1, model, model, opt, {}, {})

    def raiser(*args, **kwargs):
        if failure == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device")
        if failure == "unexpected-pos":  # what torch.save says when its write stops short
            raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 205952 vs 205844")
        from safetensors import SafetensorError

        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')

    if failure == "safetensors":
        monkeypatch.setattr(ckpt_io, "save_file", raiser)
    else:
        monkeypatch.setattr(ckpt_io.torch, "save", raiser)
    with pytest.raises(ckpt_io.CheckpointWriteError) as info:
        ckpt_io.save_checkpoint(tmp_path, 2, model, model, opt, {}, {})
    message = str(info.value)
    assert f"could not write checkpoint step_0000002 into {tmp_path / 'checkpoints'}: the disk is full (" in message
    assert "GiB free there" in message and "latest: step_0000001" in message
    monkeypatch.undo()
    assert _names(tmp_path) == ["latest", "step_0000001"]  # no partial folder, nothing else touched
    assert ckpt_io.latest_checkpoint(tmp_path).name == "step_0000001"


def test_a_failed_checkpoint_write_is_one_line_from_the_cli(tmp_path, monkeypatch, capsys):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_io, "save_file", full)
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps(to_dict(tiny_run(tmp_path / "run", steps=3))))
    assert main(["train", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the disk is full" in err and "no earlier checkpoint exists" in err


# ----------------------------------------------------------------------------------------------------
# Output paths checked before the work
# ----------------------------------------------------------------------------------------------------


@pytest.fixture
def paths(tmp_path):
    folder = tmp_path / "a_folder"
    folder.mkdir()
    file = tmp_path / "a_file"
    file.write_text("x")
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps(to_dict(tiny_run(tmp_path / "run"))))
    return folder, file, config


# (case, argv, expected message); {F} a file, {D} a folder, {C} a run config, {M} a missing input: the output
# check must come before the input's own error. Each argv would otherwise start real work.
OUTPUT_CASES = [
    ("train-classifier --out DIR", "train-classifier --data {M} --out {D}", "--out {D} is a folder"),
    ("train-classifier --reference-out DIR", "train-classifier --data {M} --out {D}/p.safetensors --reference-out {D}",
     "--reference-out {D} is a folder"),
    ("train-classifier --out under a file", "train-classifier --data {M} --out {F}/sub/p.safetensors",
     "{F} is a file, so no folder can be made there"),
    ("sample --out FILE", "sample {M} --out {F}", "--out {F} is a file"),
    ("prepare --out FILE", "prepare {C} --out {F}", "--out {F} is a file"),
    ("eval --out FILE", "eval {M} --reference {M} --out {F}", "--out {F} is a file"),
    ("eval report file is a folder", "eval {M} --reference {M} --out {D} --stem r", "--out/--stem {D}/r.json is a folder"),
    ("bench --out DIR", "bench --out {D} --models FiT-tiny --modes packed --device cpu --no-compile --steps 1 "
                        "--warmup 0", "--out {D} is a folder"),
    ("import-published --out FILE", "import-published {M} --preset FiT-tiny --out {F}", "--out {F} is a file"),
    ("train out_dir is a file", "train {C} --set train.out_dir={F}", "train.out_dir {F} is a file"),
]


@pytest.mark.parametrize("argv,expected", [c[1:] for c in OUTPUT_CASES], ids=[c[0] for c in OUTPUT_CASES])
def test_every_output_path_is_checked_before_any_work(paths, capsys, argv, expected):
    folder, file, config = paths
    (folder / "r.json").mkdir()  # a report file that is a folder
    names = {"F": file, "D": folder, "C": config, "M": folder.parent / "missing"}
    assert main([a.format(**names) for a in argv.split()]) == 2
    err = capsys.readouterr().err
    assert expected.format(**names) in err, (argv, err)
    assert err.count("\n") == 1, err


def test_sweep_checks_its_output_before_sampling(tmp_path, paths, capsys):
    _, file, _ = paths
    run_dir = tmp_path / "run"
    train(tiny_run(run_dir, steps=1), progress=False)
    reference = tmp_path / "ref.npz"
    reference.write_bytes(b"")
    assert main(["sweep", str(run_dir), "--reference", str(reference), "--out", str(file)]) == 2
    assert f"--out {file} is a file" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_output_folder_is_refused(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert main(["train-classifier", "--data", str(tmp_path), "--out", str(locked / "p.safetensors")]) == 2
        assert f"no permission to write in {locked}" in capsys.readouterr().err
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize("batching", ["images", "tokens"])
def test_a_script_that_leaves_the_endless_loader_open_still_exits(tmp_path, batching):
    """The workers ignore SIGTERM (interrupt.ignore_stop_signals_in_worker), so multiprocessing's exit hook
    (terminate, then join) would wait on them for ever; the open stream is closed first (close_at_exit)."""
    data = {"source": "synthetic", "num_images": 32, "num_classes": 4, "token_budget": 64, "autoencoder": "identity",
            "layout": "packed", "batching": batching, "num_workers": 2}
    train_cfg = {"out_dir": str(tmp_path / "run"), "steps": 10, "device": "cpu"}
    if batching == "tokens":
        data["tokens_per_step"] = 256
    else:
        train_cfg["batch_size"] = 4
    script = f"""
import torch
from maskfit.config import config_from_dict
from maskfit.data.pipeline import build_training_data
cfg = config_from_dict({{"model": {{"preset": "FiT-tiny", "attention": "dense", "overrides": {{"patch_size": 4, "num_classes": 4}}}},
                        "data": {data!r}, "mask": {{"keep_ratio": 0.5}}, "train": {train_cfg!r}}})
data = build_training_data(cfg, 4)
for step in range(2):
    data.next_device_batch(step, torch.device("cpu"))
print("two batches", flush=True)
"""
    env = {**os.environ, "PYTHONPATH": SRC}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "two batches" in done.stdout


@pytest.mark.parametrize("flip_at_read", range(1, 8))
def test_a_signal_landing_anywhere_in_a_step_still_ends_with_a_checkpoint_of_the_last_step(tmp_path, monkeypatch,
                                                                                          flip_at_read):
    """The signal flag turns on at the n-th time the loop reads it, whichever read that is. (It once ended
    the loop in the loop's own condition when it landed between the post-step read and that check: exit
    code 143 and no checkpoint; the SIGTERM test above caught it under load, 1 run in many.)"""

    class LateSignal(train_module.StopSignals):
        reads = 0

        @property
        def requested(self) -> bool:
            LateSignal.reads += 1
            if LateSignal.reads >= flip_at_read and self.signum is None:
                self.signum = int(signal.SIGTERM)
            return self.signum is not None

    monkeypatch.setattr(train_module, "StopSignals", LateSignal)
    cfg = tiny_run(tmp_path / "run", steps=50, train={"log_every": 100, "ckpt_every": 1000})
    result = train(cfg)
    assert 1 <= result.step < 50
    latest = ckpt_io.latest_checkpoint(tmp_path / "run")
    assert latest is not None and latest.name == f"step_{result.step:07d}"
    assert result.checkpoint == latest and "stopped by SIGTERM" in result.stop_message
