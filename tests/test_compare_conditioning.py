"""compare_conditioning.py on tiny runs: every mode trained and measured alike, the table, grids and records."""
import json
import pathlib

import pytest
from PIL import Image

import compare_conditioning
import evaluate
from utils import UsageError

REPO = pathlib.Path(__file__).resolve().parents[1]
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


def test_every_mode_is_trained_and_measured_alike(workdir, fake_evaluate):
    rows = compare_conditioning.main(TINY + ["--modes", "add,xattn", "--seeds", "0,1"])
    out = workdir / "results" / "compare_conditioning"
    assert [row["mode"] for row in rows] == ["add", "xattn"]
    for row in rows:
        assert row["class_accuracy"] == pytest.approx(0.6)  # seeds 0 and 1: 0.5 and 0.7
        assert row["class_accuracy_sd"] == pytest.approx(0.2 / 2 ** 0.5)  # the sample sd of 0.5 and 0.7
        assert row["judge_fd"] == pytest.approx(9.0) and row["train_img_per_s"] > 0 and row["sample_img_per_s"] > 0
    assert rows[1]["parameters"] > rows[0]["parameters"]  # xattn's TransformerBlocks hold more weights
    # the same sampler, guidance, noise seed and sample count for every run
    assert len(fake_evaluate) == 4 and len({a[a.index("--ckpt") + 1] for a in fake_evaluate}) == 4
    assert len({tuple(a[a.index("--num_samples"):a.index("--out")]) for a in fake_evaluate}) == 1
    for mode in ("add", "xattn"):
        assert Image.open(out / f"{mode}.png").size == (2 * 16 + 3 * 2, 10 * 16 + 11 * 2)  # one row per class
    for seed in (0, 1):
        config = json.loads((workdir / "models" / f"cmp_xattn_s{seed}" / "config.json").read_text())
        assert (config["conditioning"], config["seed"], config["max_steps"]) == ("xattn", seed, 2)
    table = (out / "table.md").read_text()
    assert "| add | 0.60 +- 0.14 | 9.00 +- 1.41 |" in table and "CPU: " in table
    summary = json.loads((out / "table.json").read_text())
    assert len(summary["runs"]) == 4 and summary["rows"][0]["mode"] == "add"


def test_records_are_reused_and_never_mixed_with_other_options(workdir, fake_evaluate, monkeypatch):
    compare_conditioning.main(TINY + ["--modes", "concat", "--seeds", "3"])
    monkeypatch.setattr(compare_conditioning, "train_run", lambda *a: pytest.fail("trained a measured run again"))
    rows = compare_conditioning.main(TINY + ["--modes", "concat", "--seeds", "3"])
    assert rows[0]["class_accuracy"] == pytest.approx(1.1) and rows[0]["class_accuracy_sd"] == 0.0
    with pytest.raises(UsageError, match=r"measured with other options .* pass --overwrite"):
        compare_conditioning.main(TINY + ["--modes", "concat", "--seeds", "3", "--cfg_scale", "5"])


@pytest.mark.parametrize("args, message", [
    (["--modes", "add,film"], r"mode 'film' is unknown: use some of add, concat, xattn, adanorm"),
    (["--seeds", "0,a"], r"--seeds '0,a' is not a comma-separated list of integers"),
    (["--modes", "add,add"], r"must not repeat"),
    (["--preset", "nothing.json"], r"preset 'nothing.json' not found"),
    (["--num_samples", "0"], r"num_samples 0 must be positive"),
])
def test_bad_options_are_one_readable_error(workdir, fake_evaluate, args, message):
    with pytest.raises(UsageError, match=message):
        compare_conditioning.main(TINY + args)
    assert not (workdir / "models").exists()
