"""training.py across processes and faults: 2 ranks on gloo, SIGKILL / SIGTERM and --resume, non-finite losses.
The runs are tiny (8 base channels, 16 px shapes) and use one thread each. (The run's files, failed checkpoint
writes included, are tested in tests/test_training.py's checkpoints section.)

Most runs go through a small launcher, written to tmp, that runs ddpm_conditional.py's real command line with
test instruments around `training.image_task`: it records which samples each rank trained on, the t and eps of
each of its noisings, how often each rank saved or drew a grid, and its final weights; it can send its own
process a signal at a given loss call; and with PER_SAMPLE_NOISE it draws each sample's t and eps from a
generator seeded by the sample's index, so that the loss of a batch does not depend on how the batch is split
over processes (see test_two_processes_match_one_process_with_twice_the_batch).
"""
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import checkpoints
import ddpm_conditional
from conftest import assert_same_state
from diffusion import Diffusion
from utils import UsageError, load_checkpoint

REPO = pathlib.Path(__file__).resolve().parents[1]
BASE = {"dataset": "shapes", "dataset_size": 32, "image_size": 16, "base_channels": 8, "batch_size": 8,
        "sampler": "ddim", "sample_steps": 2, "n_per_row": 1, "num_workers": 0, "device": "cpu",
        "print_every": 1, "run_name": "R"}

LAUNCHER = '''
import json, os, signal, sys
import torch
import training, utils, ddpm_conditional

ACTION = json.loads(os.environ.get("TEST_ACTION", "{}"))  # {"at_call": n, "signal": "SIGKILL"}
RANK = int(os.environ.get("RANK", "0"))
record = {"seen": [], "noise": [], "saves": 0, "grids": 0, "weights": None}
calls = [0]
image_task, save_run = training.image_task, training.save_run


class Indexed(torch.utils.data.Dataset):
    """The data set, with each item's index appended."""
    def __init__(self, base):
        self.base, self.classes = base, base.classes
    def __len__(self):
        return len(self.base)
    def __getitem__(self, i):
        return (*self.base[i], i)


def instrumented_task(cfg, accelerator, conditional):
    task = image_task(cfg, accelerator, conditional)
    task.dataset = Indexed(task.dataset)
    make_batch, loss, draw_grid, diffusion = task.make_batch, task.diffusion.loss, task.draw_grid, task.diffusion
    noise_images = diffusion.noise_images

    def indexed_batch(batch):
        images, labels, index = batch
        record["seen"].append(index.tolist())
        x_0, labels = make_batch((images, labels))
        return x_0, (labels, index)

    def instrumented_loss(model, x_0, conditioning):
        labels, index = conditioning
        calls[0] += 1
        if calls[0] == ACTION.get("at_call"):
            os.kill(os.getpid(), getattr(signal, ACTION["signal"]))
        if not os.environ.get("PER_SAMPLE_NOISE"):
            return loss(model, x_0, labels)
        generators = [torch.Generator().manual_seed(int(i)) for i in index]
        t = torch.cat([torch.randint(1, diffusion.noise_steps, (1,), generator=g) for g in generators])
        eps = torch.stack([torch.randn(x_0.shape[1:], generator=g) for g in generators])
        x_t, eps = diffusion.noise_images(x_0, t, eps)
        return torch.nn.functional.mse_loss(model(x_t, t, labels), eps)

    def recorded_noise(x_0, t, eps=None):
        x_t, eps = noise_images(x_0, t, eps)
        record["noise"].append((t.clone(), eps.clone()))
        return x_t, eps

    def counted_grid(module, path):
        record["grids"] += 1
        draw_grid(module, path)

    task.make_batch, task.diffusion.loss, task.draw_grid = indexed_batch, instrumented_loss, counted_grid
    diffusion.noise_images = recorded_noise
    record["net"] = task.net
    return task


def counted_save(*args, **kwargs):
    record["saves"] += 1
    save_run(*args, **kwargs)


training.image_task, training.save_run = instrumented_task, counted_save
utils.run_cli(ddpm_conditional.main, sys.argv[2:])
record["weights"] = record.pop("net").state_dict()
torch.save(record, os.path.join(sys.argv[1], f"rank{RANK}.pt"))
'''


def flags(**overrides):
    values = {**BASE, **overrides}
    return [item for key, value in values.items() for item in (f"--{key}", str(value))]


@pytest.fixture(scope="module")
def launcher(tmp_path_factory):
    path = tmp_path_factory.mktemp("launcher") / "launch.py"
    path.write_text(LAUNCHER)
    return path


def launch(launcher, cwd, args, processes=1, action=None, per_sample_noise=False):
    """Run the launcher in `cwd` (1 process, or `processes` through torchrun); returns (completed, records)."""
    out = pathlib.Path(cwd) / "ranks"
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TEST_ACTION": json.dumps(action or {})}
    if per_sample_noise:
        env["PER_SAMPLE_NOISE"] = "1"
    command = [sys.executable, str(launcher), str(out), *args]
    if processes > 1:  # --standalone: a rendezvous on a free local port
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   *command[1:]]
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    records = [torch.load(p, weights_only=False) for p in sorted(out.glob("rank*.pt"))]
    for p in out.glob("rank*.pt"):
        p.unlink()
    return done, records


# ----------------------------------------------------------------------------- 2 processes
def test_two_processes_match_one_process_with_twice_the_batch(launcher, tmp_path):
    """2 ranks at batch 8 against 1 process at batch 16 and 1 process at batch 8 x 2 accumulated.

    The seedable sampler gives the same sample order whatever the number of processes, and each sample's
    t and eps depend on its index only (PER_SAMPLE_NOISE), so the three runs see the same 16 samples with the
    same noise at each step: the mean of the two ranks' losses is the 16-sample loss, and the averaged
    gradients are its gradient. What remains are floating-point differences of the batch split (and gloo's
    sum), which Adam carries to the later steps; the initial weights are the same (seed, then DDP's broadcast).
    """
    common = dict(max_steps=3, p_uncond=0.0, checkpoint_every=2)  # 2 steps per epoch: step 3 is in epoch 1
    runs = {}
    for name, processes, extra in [("one", 1, {"batch_size": 16}), ("two", 2, {}),
                                   ("accumulated", 1, {"gradient_accumulation_steps": 2})]:
        cwd = tmp_path / name
        done, records = launch(launcher, cwd, flags(**common, **extra), processes, per_sample_noise=True)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = (cwd, done, records)
    cwd, done, (rank0, rank1) = runs["two"]
    assert "2 process(es) on cpu: batch 8 per device x 2 x 1 accumulated = 16 images per optimizer step" in done.stdout
    assert done.stdout.count("config: {") == 1 and done.stdout.count("done: 3 steps") == 1

    for name, tensor in rank0["weights"].items():
        assert torch.equal(tensor, rank1["weights"][name]), name
    one_seen = runs["one"][2][0]["seen"]
    assert len(rank0["seen"]) == len(rank1["seen"]) == len(one_seen) == 3
    for step, (seen0, seen1, seen) in enumerate(zip(rank0["seen"], rank1["seen"], one_seen)):
        assert not set(seen0) & set(seen1), f"step {step}: the ranks share samples"
        assert sorted(seen0 + seen1) == sorted(seen), f"step {step}: not the 16 samples of 1 process"

    assert (rank0["saves"], rank0["grids"], rank1["saves"], rank1["grids"]) == (2, 2, 0, 0)
    models, results = cwd / "models" / "R", cwd / "results" / "R"
    assert sorted(os.listdir(models)) == ["checkpoints", "ckpt.pt", "classes.json", "config.json", "ema_ckpt.pt",
                                         "training_state.pt"]
    assert sorted(os.listdir(models / "checkpoints")) == ["step_000000002.pt", "step_000000003.pt"]
    assert sorted(os.listdir(results)) == ["1.jpg", "1_ema.jpg", "config.json", "logs", "loss.png", "training.json"]
    events = [name for name in os.listdir(results / "logs") if name.startswith("events.out.tfevents")]
    assert len(events) == 1  # TensorBoard: the main process's only

    losses = {name: load_checkpoint(run[0] / "models" / "R" / "training_state.pt")["losses"]
              for name, run in runs.items()}
    print("losses per step:", {name: [f"{v:.7f}" for v in values] for name, values in losses.items()})
    for name in ("two", "accumulated"):
        differences = [abs(a - b) / b for a, b in zip(losses[name], losses["one"], strict=True)]
        print(f"{name} vs one process at batch 16: largest relative loss difference {max(differences):.2e}")
        assert max(differences) < 1e-5  # measured: 9e-8, float32 rounding


def test_each_rank_draws_its_own_noise_through_the_real_loss(launcher, tmp_path):
    """Without PER_SAMPLE_NOISE the ranks run Diffusion.loss itself (Min-SNR, the default), after
    torch.manual_seed(noise_seed(..., process_index)): the two ranks draw different t and eps at every step."""
    done, (rank0, rank1) = launch(launcher, tmp_path, flags(max_steps=2, checkpoint_every=2), processes=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(rank0["noise"]) == len(rank1["noise"]) == 2
    for step, ((t0, eps0), (t1, eps1)) in enumerate(zip(rank0["noise"], rank1["noise"])):
        assert not torch.equal(t0, t1), f"step {step}: both ranks drew the same t"
        assert not torch.equal(eps0, eps1), f"step {step}: both ranks drew the same eps"


# ----------------------------------------------------------------------------- SIGKILL, SIGTERM and --resume
RESUME_RUN = dict(max_steps=8, checkpoint_every=3)  # 4 steps per epoch: checkpoints at 3, 6 and 8 (the end)


@pytest.fixture(scope="module")
def uninterrupted(launcher, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("uninterrupted")
    done, (record,) = launch(launcher, cwd, flags(**RESUME_RUN))
    assert done.returncode == 0, done.stderr[-3000:]
    return cwd, record


@pytest.mark.parametrize("signal_name, code, stop_step", [("SIGKILL", -9, 3), ("SIGTERM", 0, 5)])
def test_a_killed_run_resumes_exactly(launcher, tmp_path, uninterrupted, signal_name, code, stop_step):
    """SIGKILL in the middle of step 5 leaves the checkpoint of step 3; SIGTERM there saves step 5 and exits 0.

    Either way --resume continues the step counter and trains on the same batches with the same noise,
    optimizer and RNG state: its losses and final weights equal those of the uninterrupted run.
    """
    stopped, _ = launch(launcher, tmp_path, flags(**RESUME_RUN), action={"at_call": 5, "signal": signal_name})
    assert stopped.returncode == code, stopped.stderr[-3000:]
    if signal_name == "SIGTERM":
        assert "stopped by SIGTERM at step 5: saved models/R/training_state.pt; continue with --resume" in stopped.stdout
        summary = json.loads((tmp_path / "results" / "R" / "training.json").read_text())  # what compare.py reads
        assert (summary["step"], summary["stopped"]) == (5, "SIGTERM")
    state = load_checkpoint(tmp_path / "models" / "R" / "training_state.pt")
    assert state["step"] == stop_step and len(state["losses"]) == stop_step

    resumed, (record,) = launch(launcher, tmp_path, flags(**RESUME_RUN) + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed R at step {stop_step}, epoch {stop_step // 4}" in resumed.stdout
    expected_dir, expected = uninterrupted
    final = load_checkpoint(tmp_path / "models" / "R" / "training_state.pt")
    reference = load_checkpoint(expected_dir / "models" / "R" / "training_state.pt")
    assert final["step"] == 8 and final["optimizer"]["state"][0]["step"].item() == 8
    assert_same_state(final, reference)  # the losses, model, EMA and optimizer of the uninterrupted run
    assert record["seen"] == expected["seen"][stop_step:]
    for name, tensor in record["weights"].items():
        assert torch.equal(tensor, expected["weights"][name]), name


# ----------------------------------------------------------------------------- guards
@pytest.fixture
def workdir(tmp_path, monkeypatch, one_thread):
    """Run in a fresh folder, on one thread (tests/conftest.py)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def nan_at(monkeypatch, calls):
    """Make Diffusion.loss non-finite at the given calls (1-based)."""
    loss, count = Diffusion.loss, [0]

    def patched(self, *args, **kwargs):
        count[0] += 1
        value = loss(self, *args, **kwargs)
        return value * float("nan") if count[0] in calls else value

    monkeypatch.setattr(Diffusion, "loss", patched)


def test_a_non_finite_loss_skips_its_update_and_is_counted(workdir, monkeypatch, capsys):
    nan_at(monkeypatch, {2})
    ddpm_conditional.main(flags(max_steps=4))
    state = load_checkpoint(workdir / "models" / "R" / "training_state.pt")
    assert state["step"] == 4 and state["skipped"] == 1
    assert math.isnan(state["losses"][1]) and all(math.isfinite(v) for i, v in enumerate(state["losses"]) if i != 1)
    assert state["optimizer"]["state"][0]["step"].item() == 3  # AdamW did not count the skipped step
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert "done: 4 steps (1 skipped: non-finite loss)" in capsys.readouterr().out


def test_non_finite_losses_in_a_row_stop_the_run_and_keep_the_last_checkpoint(workdir, monkeypatch):
    nan_at(monkeypatch, set(range(3, 100)))
    with pytest.raises(checkpoints.TrainingError, match=r"not finite for 3 steps in a row \(up to step 5\)"):
        ddpm_conditional.main(flags(max_steps=8, checkpoint_every=2, max_nonfinite=3))
    state = load_checkpoint(workdir / "models" / "R" / "training_state.pt")
    assert state["step"] == 4 and state["skipped"] == 2  # saved at step 4, after 2 skipped updates
    assert all(torch.isfinite(v).all() for v in state["model"].values())


@pytest.mark.parametrize("name", ["checkpoint_every", "keep_checkpoints", "max_nonfinite", "print_every",
                                  "gradient_accumulation_steps"])
def test_the_new_counts_must_be_positive(workdir, name):
    with pytest.raises(UsageError, match=f"{name} 0 must be positive"):
        ddpm_conditional.main(flags(**{name: 0}))
