"""compare.py on tiny runs: every variant trained and measured alike, the table, grids, curves and records."""
import json
import pathlib

import pytest
import torch
from PIL import Image

import compare
import evaluate
import training
from utils import UsageError

REPO = pathlib.Path(__file__).resolve().parents[1]
CONDITIONING = str(REPO / "configs" / "compare_conditioning.json")
BACKBONES = str(REPO / "configs" / "compare_backbones.json")
TINY = ["--preset", str(REPO / "configs" / "quick_cpu.json"), "--max_steps", "2", "--steps", "2",
        "--n_per_class", "2", "--device", "cpu", "--train_args",
        "--dataset_size 32 --base_channels 8 --batch_size 8 --sampler ddim --sample_steps 2 --num_workers 0"]


@pytest.fixture
def workdir(tmp_path, monkeypatch, one_thread):
    """Run in a fresh folder, on one thread (tests/conftest.py)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def fake_evaluate(monkeypatch):
    """Stands in for evaluate.main: figures set by the run's seed, and the arguments it was called with."""
    calls = []

    def main(argv):
        calls.append(argv)
        seed = int(argv[argv.index("--ckpt") + 1].split("_s")[-1].split("/")[0])
        return {"judge": {"heldout_accuracy": 0.99},
                "rows": [{"class_accuracy": 0.5 + 0.2 * seed, "judge_fd": 10.0 - 2.0 * seed}]}

    monkeypatch.setattr(evaluate, "main", main)
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
    assert len(fake_evaluate) == 4 and len({a[a.index("--ckpt") + 1] for a in fake_evaluate}) == 4
    assert len({tuple(a[a.index("--num_samples"):a.index("--out")]) for a in fake_evaluate}) == 1
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
    import sample
    from bench import count_flops

    rows = compare.main(TINY + ["--variants", BACKBONES, "--seeds", "0"])
    assert [row["variant"] for row in rows] == ["unet-add", "unet-adanorm", "dit-t-2"]
    for row in rows:
        model, arch, _ = sample.load_model(str(workdir / "models" / f"cmp_{row['variant']}_s0" / "ema_ckpt.pt"))
        x, t, y = torch.zeros(1, 3, 16, 16), torch.tensor([9]), torch.tensor([3])
        with torch.no_grad():
            flops = count_flops(lambda: model(x, t, y))
        assert row["gflops_per_image"] == pytest.approx(flops / 1e9, abs=1e-4) and flops > 0
        assert (arch.get("backbone") == "dit") == (row["variant"] == "dit-t-2")
    assert rows[2]["gflops_per_image"] > 10 * rows[0]["gflops_per_image"]  # dit-t beside the tiny U-Net (8 channels)
    table = (workdir / "results" / "compare" / "compare_backbones" / "table.md").read_text()
    assert "| parameters | GFLOPs per image |" in table
    assert f"| {rows[2]['gflops_per_image']:.3f} |" in table


def test_eval_every_records_each_runs_learning_curve_and_plots_it(workdir, fake_evaluate, monkeypatch, tmp_path):
    class Judge:
        heldout_accuracy = 1.0

    monkeypatch.setattr(training, "get_judge", lambda *args, **kwargs: Judge())
    monkeypatch.setattr(training, "offline_figures", lambda module, **kwargs: {"class_accuracy": 0.25, "judge_fd": 3.0})
    variants = tmp_path / "variants.json"
    variants.write_text(json.dumps({"plain": "", "cosine": "--schedule cosine --lr_warmup 2"}))
    compare.main(TINY + ["--variants", str(variants), "--eval_every", "1", "--eval_samples", "10"])
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
    argv = fake_evaluate[-1]
    assert argv[argv.index("--cfg_scale") + 1] == "5.0" and argv[argv.index("--judge_epochs") + 1] == "20"
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
    """Each variant's flags parse on top of the quick preset and pass the training script's checks."""
    import shlex

    import ddpm_conditional

    monkeypatch.chdir(REPO)  # the variants name config files relative to the repository
    for flags in compare.read_variants(str(variants), None).values():
        argv = ["--config", "configs/quick_cpu.json", *shlex.split(flags)]
        training.validate(training.parse_config(ddpm_conditional.Config, argv))
