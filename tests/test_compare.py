"""compare.py on tiny runs: every variant trained and measured alike, the table, grids, curves and records."""
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from PIL import Image

import checkpoints
import compare
import config
import evaluate
import training
from utils import UsageError, count_flops

REPO = pathlib.Path(__file__).resolve().parents[1]
CONDITIONING = str(REPO / "configs" / "compare_conditioning.json")
BACKBONES = str(REPO / "configs" / "compare_backbones.json")
TINY = ["--preset", str(REPO / "configs" / "quick_cpu.json"), "--max_steps", "2", "--steps", "2",
        "--n_per_row", "2", "--device", "cpu", "--train_args",
        "--dataset_size 32 --base_channels 8 --batch_size 8 --sampler ddim --sample_steps 2 --num_workers 0"]


@pytest.fixture
def workdir(tmp_path, monkeypatch, one_thread):
    """Run in a fresh folder, on one thread (tests/conftest.py), as are the training runs, which compare.py starts
    as subprocesses (they inherit OMP_NUM_THREADS)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return tmp_path


# The options of the comparison that compare.evaluate_run hands to evaluate.py
EVALUATED_WITH = ("num_samples", "num_real", "sampler", "steps", "cfg_scale", "judge_epochs", "device", "threads")


@pytest.fixture
def fake_evaluate(monkeypatch):
    """Stands in for compare.evaluate_run (python evaluate.py): figures set by the run's seed, and what each call was
    asked to measure: the checkpoint, the figures file and the comparison's evaluation options."""
    calls = []

    def evaluate_run(cfg, ckpt, out):
        calls.append({"ckpt": ckpt, "out": out, **{key: getattr(cfg, key) for key in EVALUATED_WITH}})
        seed = int(ckpt.split("_s")[-1].split("/")[0])
        return {"class_accuracy": 0.5 + 0.2 * seed, "judge_fd": 10.0 - 2.0 * seed, "judge_heldout_accuracy": 0.99}

    monkeypatch.setattr(compare, "evaluate_run", evaluate_run)
    return calls


def test_every_variant_is_trained_and_measured_alike(workdir, fake_evaluate):
    rows = compare.main(TINY + ["--variants", CONDITIONING, "--only", "add,xattn", "--seeds", "0,1"])
    out = workdir / "results" / "compare" / "compare_conditioning"
    assert [row["variant"] for row in rows] == ["add", "xattn"]
    for row in rows:
        assert row["class_accuracy"] == pytest.approx(0.6)  # seeds 0 and 1: 0.5 and 0.7
        assert row["class_accuracy_sd"] == pytest.approx(0.2 / 2 ** 0.5)  # the sample sd of 0.5 and 0.7
        assert row["judge_fd"] == pytest.approx(9.0) and row["train_img_per_s"] > 0 and row["sample_img_per_s"] > 0
        assert row["train_seconds"] > 0
    assert rows[1]["parameters"] > rows[0]["parameters"]  # xattn's TransformerBlocks hold more weights
    # the same sampler, guidance, noise seed and sample count for every run
    assert len(fake_evaluate) == 4 and len({call["ckpt"] for call in fake_evaluate}) == 4
    assert len({tuple(value for key, value in call.items() if key not in ("ckpt", "out"))
                for call in fake_evaluate}) == 1
    for name in ("add", "xattn"):
        # one captioned row per class, 16 px images scaled to 64: 2 images + padding, 10 x (caption + row) + padding
        assert Image.open(out / f"{name}.png").size == (2 * 66 + 2, 10 * (14 + 66) + 2)
    for seed in (0, 1):
        config = json.loads((workdir / "models" / f"cmp_xattn_s{seed}" / "config.json").read_text())
        assert (config["conditioning"], config["seed"], config["max_steps"]) == ("xattn", seed, 2)
    table = (out / "table.md").read_text()
    assert "| add | 0.600 +- 0.141 | 9.00 +- 1.41 |" in table and "CPU: " in table
    summary = json.loads((out / "table.json").read_text())
    assert len(summary["runs"]) == 4 and summary["rows"][0]["variant"] == "add"
    assert not (out / "curves.png").exists()  # no --eval_every


def test_the_backbones_compare_the_unet_and_dit_with_their_gflops_per_image(workdir, fake_evaluate):
    """configs/compare_backbones.json: the U-Net (add, adanorm) beside DiT; every row has the FLOPs of one network
    evaluation of one image, counted on the run's own checkpoint."""
    rows = compare.main(TINY + ["--variants", BACKBONES, "--seeds", "0"])
    assert [row["variant"] for row in rows] == ["unet-add", "unet-adanorm", "dit-t-2"]
    for row in rows:
        model, arch, _ = checkpoints.load_model(str(workdir / "models" / f"cmp_{row['variant']}_s0" / "ema_ckpt.pt"))
        x, t, y = torch.zeros(1, 3, 16, 16), torch.tensor([9]), torch.tensor([3])
        with torch.no_grad():
            flops = count_flops(lambda: model(x, t, y))
        assert row["gflops_per_image"] == pytest.approx(flops / 1e9, abs=1e-4) and flops > 0
        assert (arch.get("backbone") == "dit") == (row["variant"] == "dit-t-2")
    assert rows[2]["gflops_per_image"] > 10 * rows[0]["gflops_per_image"]  # dit-t beside the tiny U-Net (8 channels)
    table = (workdir / "results" / "compare" / "compare_backbones" / "table.md").read_text()
    assert "| parameters | GFLOPs per image |" in table
    assert f"| {rows[2]['gflops_per_image']:.3f} |" in table


# Runs ddpm_conditional.py with the judge of its --eval_every measurements faked, as compare.run_script runs the script
FAKE_JUDGE = """
import sys

sys.path[0] = {repo!r}  # the repository's modules, not this folder's
import training  # noqa: E402
from utils import run_cli  # noqa: E402


class Judge:
    heldout_accuracy = 1.0


training.get_judge = lambda *args, **kwargs: Judge()
training.offline_figures = lambda module, **kwargs: {{"class_accuracy": 0.25, "judge_fd": 3.0}}
import ddpm_conditional  # noqa: E402

run_cli(ddpm_conditional.main)
"""


def test_eval_every_records_each_runs_learning_curve_and_plots_it(workdir, fake_evaluate, monkeypatch, tmp_path):
    script = tmp_path / "fake_judge" / "ddpm_conditional.py"
    script.parent.mkdir()
    script.write_text(FAKE_JUDGE.format(repo=str(REPO)))
    run_script, trained = compare.run_script, []

    def with_the_fake_judge(name, argv, threads=None):
        trained.append(name)
        run_script(str(script), argv, threads)

    monkeypatch.setattr(compare, "run_script", with_the_fake_judge)
    variants = tmp_path / "variants.json"
    variants.write_text(json.dumps({"plain": "", "cosine": "--schedule cosine --lr_warmup 2"}))
    compare.main(TINY + ["--variants", str(variants), "--eval_every", "1", "--eval_samples", "10"])
    assert trained == ["ddpm_conditional.py"] * 4  # 2 variants, seeds 0 and 1
    out = workdir / "results" / "compare" / "variants"
    record = json.loads((out / "runs" / "cmp_cosine_s0.json").read_text())
    assert [point["step"] for point in record["curve"]] == [1, 2]
    assert record["curve"][0]["class_accuracy"] == 0.25 and record["curve"][1]["seconds"] > 0
    assert (record["config"]["schedule"], record["config"]["lr_warmup"]) == ("cosine", 2)
    assert Image.open(out / "curves.png").size[0] > 300


def test_records_are_reused_and_never_mixed_with_other_options(workdir, fake_evaluate, monkeypatch):
    args = TINY + ["--variants", CONDITIONING, "--only", "concat", "--seeds", "3"]
    compare.main(args)
    monkeypatch.setattr(compare, "train_run", lambda *a: pytest.fail("trained a measured run again"))
    rows = compare.main(args)
    assert rows[0]["class_accuracy"] == pytest.approx(1.1) and rows[0]["class_accuracy_sd"] == 0.0
    # other evaluation options: measured again from the checkpoint, not retrained, and the record says how
    calls = len(fake_evaluate)
    compare.main(args + ["--cfg_scale", "5", "--judge_epochs", "20"])
    assert len(fake_evaluate) == calls + 1
    call = fake_evaluate[-1]
    assert call["cfg_scale"] == 5.0 and call["judge_epochs"] == 20
    record = json.loads((workdir / "results" / "compare" / "compare_conditioning" / "runs" /
                         "cmp_concat_s3.json").read_text())
    assert record["options"]["cfg_scale"] == 5.0 and record["options"]["judge_epochs"] == 20
    assert record["steps"] > 0 and record["parameters"] > 0  # the training figures are kept
    # other training options: never mixed
    with pytest.raises(UsageError, match=r"trained with other options .* pass --overwrite"):
        compare.main(args + ["--max_steps", "1"])
    # measured again needs the checkpoint: without it, one line that names the fix, and the record stays
    (workdir / "models" / "cmp_concat_s3" / "ema_ckpt.pt").unlink()
    with pytest.raises(UsageError, match=r"its checkpoint .* is gone: pass --overwrite"):
        compare.main(args + ["--cfg_scale", "4"])
    assert json.loads((workdir / "results" / "compare" / "compare_conditioning" / "runs" /
                       "cmp_concat_s3.json").read_text())["options"]["cfg_scale"] == 5.0


@pytest.mark.parametrize("args, message", [
    (["--only", "add,film"], r"variant 'film' is not in .*compare_conditioning.json: use some of add, concat"),
    (["--seeds", "0,a"], r"--seeds '0,a' is not a comma-separated list of integers"),
    (["--only", "add,add"], r"must not repeat"),
    (["--variants", "nothing.json"], r"variants file 'nothing.json' not found"),
    (["--preset", "nothing.json"], r"preset 'nothing.json' not found"),
    (["--num_samples", "0"], r"num_samples 0 must be positive"),
])
def test_bad_options_are_one_readable_error(workdir, fake_evaluate, args, message):
    with pytest.raises(UsageError, match=message):
        compare.main(TINY + ["--variants", CONDITIONING] + args)
    assert not (workdir / "models").exists()


@pytest.mark.parametrize("variants", sorted((REPO / "configs").glob("compare_*.json")), ids=lambda path: path.stem)
def test_every_variant_of_every_variants_file_is_a_valid_run(variants, monkeypatch):
    """Each variant's flags parse on top of the quick preset and pass the training script's checks, those of the
    network it describes included."""
    import shlex

    import ddpm_conditional

    monkeypatch.chdir(REPO)  # the variants name config files relative to the repository
    for flags in compare.read_variants(str(variants), None).values():
        argv = ["--config", "configs/quick_cpu.json", *shlex.split(flags)]
        cfg = training.parse_config(ddpm_conditional.Config, argv).validate()
        config.network_arch(cfg, cfg.channels or 3, num_classes=10)


# ----------------------------------------------------------------------------- the subprocesses
def test_evaluate_run_measures_with_evaluate_py_and_reads_its_figures(tmp_path, monkeypatch):
    """compare.evaluate_run runs evaluate.py with the comparison's evaluation options, which evaluate.py accepts, and
    returns the figures of the file it wrote."""
    calls = []

    def run_script(script, argv, threads=None):
        calls.append((script, argv, threads))
        metrics = {"judge": {"heldout_accuracy": 0.97}, "rows": [{"class_accuracy": 0.4, "judge_fd": 7.5}]}
        pathlib.Path(argv[argv.index("--out") + 1]).write_text(json.dumps(metrics))

    monkeypatch.setattr(compare, "run_script", run_script)
    cfg = compare.parse_config(compare.Config, [
        "--preset", str(REPO / "configs" / "quick_cpu.json"), "--variants", CONDITIONING, "--num_samples", "30",
        "--num_real", "40", "--sampler", "ddim", "--steps", "3", "--cfg_scale", "5", "--judge_epochs", "20",
        "--device", "cpu", "--threads", "1"])
    out = str(tmp_path / "metrics.json")
    figures = compare.evaluate_run(cfg, "models/cmp_add_s0/ema_ckpt.pt", out)
    assert figures == {"class_accuracy": 0.4, "judge_fd": 7.5, "judge_heldout_accuracy": 0.97}
    (script, argv, threads), = calls
    assert (script, threads) == ("evaluate.py", 1)
    measured = evaluate.parse_config(evaluate.Config, argv)  # evaluate.py's own command line takes it
    assert (measured.ckpt, measured.num_samples, measured.num_real, measured.sampler) == (
        "models/cmp_add_s0/ema_ckpt.pt", 30, 40, "ddim")
    assert (measured.steps, measured.cfg_scale, measured.judge_epochs, measured.device) == ("3", "5.0", 20, "cpu")
    assert (measured.seed, measured.inception, measured.out) == (0, False, out)


def test_run_script_runs_python_on_the_script_with_the_threads_and_a_failure_is_one_line(monkeypatch):
    seen, returncode = [], [0]

    def run(command, env):
        seen.append((command, env))
        return subprocess.CompletedProcess(command, returncode[0])

    monkeypatch.setattr(subprocess, "run", run)
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    compare.run_script("ddpm_conditional.py", ["--max_steps", "2"], threads=3)
    compare.run_script("evaluate.py", ["--ckpt", "x.pt"])
    (command, env), (command_2, env_2) = seen
    assert command == [sys.executable, os.path.join(compare.REPO, "ddpm_conditional.py"), "--max_steps", "2"]
    assert env["OMP_NUM_THREADS"] == "3" and env_2["OMP_NUM_THREADS"] == "7"  # without threads: inherited
    assert command_2 == [sys.executable, os.path.join(compare.REPO, "evaluate.py"), "--ckpt", "x.pt"]
    returncode[0] = 2
    with pytest.raises(UsageError, match=r"^evaluate.py --ckpt x.pt failed \(exit 2\): its error is above$"):
        compare.run_script("evaluate.py", ["--ckpt", "x.pt"])
