"""Tests for judges.py: the learned judge and its cache, class accuracy, the Frechet distance, the colour judge,
FID and KID through torch-fidelity, the restoration figures, and the figures training's --eval_every logs."""
import contextlib
import hashlib
import json
import math
import os
import socket

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

import data
import ddpm_conditional
import evaluate
import judges
from modules import JudgeNet
from utils import load_checkpoint, run_cli, to_uint8

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def shapes():
    """2000 real shapes images at 16 px: uint8 (2000, 3, 16, 16) and shape labels (2000,)."""
    images, labels, classes = judges.real_images("shapes", None, 16, 2000)
    assert images.dtype == torch.uint8 and images.shape == (2000, 3, 16, 16) and classes == list(data.SHAPE_NAMES)
    return images, labels


@pytest.fixture(scope="module")
def judge():
    """The judge evaluate.py trains by default: 5000 real images, 5 epochs (a 2000-image, 4-epoch judge read one
    colour's shapes at 0.89 on an Intel Xeon, against >= 0.96 for the others)."""
    defaults = evaluate.Config()
    images, labels, _ = judges.real_images("shapes", None, 16, defaults.num_real)
    return judges.train_judge(images, labels, num_classes=10, epochs=defaults.judge_epochs)


@pytest.fixture(scope="module")
def fresh():
    """1000 shapes images the judge never saw (another seed): uint8 images, shapes and colours."""
    dataset = data.ShapesDataset(16, size=1000, seed=7)
    images = to_uint8(torch.stack([dataset[i][0] for i in range(1000)]))
    shapes, colors = (torch.tensor(column) for column in zip(*(dataset.attributes(i)[::-1] for i in range(1000))))
    return images, shapes, colors


def untrained_judge(images, num_classes=10):
    """A Judge of a random JudgeNet whose real statistics are those of `images` (uint8): for the figures' arithmetic,
    which does not need a judge that reads anything."""
    torch.manual_seed(0)
    judge = judges.Judge(JudgeNet(num_classes, channels=images.shape[1]).eval(), float("nan"), None, None, "")
    judge.real_mu, judge.real_sigma = judges.feature_statistics(judge.features(images))
    return judge


# ----------------------------------------------------------------------------- the judge
def test_the_judge_learns_held_out_shapes(judge):
    assert judge.heldout_accuracy >= 0.97  # 0.99 measured; the cached judge (5000 images, 5 epochs) has 1.000


def test_class_accuracy_is_high_for_true_labels_and_near_chance_for_shuffled(judge, fresh):
    images, labels, _ = fresh
    predicted = judge.predict(images)
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    assert judges.class_accuracy(predicted, labels) >= 0.95
    assert judges.class_accuracy(predicted, shuffled) <= 0.2  # chance is 0.1


def test_class_accuracy_is_the_fraction_of_rows_that_match():
    assert judges.class_accuracy(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 0, 0])) == 0.5
    assert judges.class_accuracy(torch.tensor([4, 4]), torch.tensor([4, 4])) == 1.0


def test_the_shape_judge_is_as_accurate_for_every_colour(judge, fresh):
    """Colour and shape are independent in the data, so the judge reads the shape whatever its colour."""
    images, shapes, colors = fresh
    right = judge.predict(images) == shapes
    per_color = [right[colors == c].float().mean().item() for c in range(10)]  # about 100 images each
    assert min(per_color) >= 0.9 and max(per_color) - min(per_color) <= 0.1, per_color


def test_a_judge_trained_on_shuffled_labels_is_at_chance(shapes):
    images, labels = shapes
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))]
    assert judges.train_judge(images, shuffled, num_classes=10, epochs=2).heldout_accuracy <= 0.2


def test_attribute_figures_count_colour_shape_and_both(judge, fresh):
    images, shapes, colors = fresh
    images, shapes, colors = images[:100], shapes[:100], colors[:100]
    right = judges.attribute_figures(judge, judges.to_float(images), colors, shapes)
    assert right["color_acc"] == 1.0 and right["shape_acc"] >= 0.95 and right["prompt_acc"] == right["shape_acc"]
    wrong_color = judges.attribute_figures(judge, judges.to_float(images), (colors + 1) % 10, shapes)
    assert wrong_color["color_acc"] == 0.0 and wrong_color["prompt_acc"] == 0.0
    assert wrong_color["shape_acc"] == right["shape_acc"] and right["n"] == 100
    assert judges.color_judge_accuracy(16, n=200) >= 0.98


def test_judge_is_cached_and_reloaded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = judges.get_judge("shapes", None, 16, 500, 3)

    def train_again(*args, **kwargs):
        raise AssertionError("get_judge trained a judge that it had cached")

    monkeypatch.setattr(judges, "train_judge", train_again)
    again = judges.get_judge("shapes", None, 16, 500, 3)
    assert os.path.isfile(first.path) and again.path == first.path
    assert os.path.dirname(os.path.abspath(first.path)) == str(tmp_path / "data" / "judges")
    assert again.heldout_accuracy == first.heldout_accuracy
    np.testing.assert_allclose(again.real_mu, first.real_mu)
    images = judges.real_images("shapes", None, 16, 20, seed=5)[0]
    assert torch.equal(again.predict(images), first.predict(images))


def test_the_judge_path_names_its_settings_and_changes_with_each_of_them():
    base = {"dataset": "shapes", "dataset_path": None, "image_size": 16, "num_real": 500, "epochs": 3, "seed": 0,
            "root": "data/judges"}
    path = judges.judge_path(**base)
    assert os.path.dirname(path) == "data/judges" and os.path.basename(path).startswith("shapes-16px-500-")
    grey = judges.judge_path(**base, channels=1)
    assert os.path.basename(grey).startswith("shapes-16px-500-grey-") and grey != path
    assert judges.judge_path(**base, channels=3) == path  # RGB judges cached before channels existed keep their files
    for name, other in (("image_size", 32), ("num_real", 501), ("epochs", 4), ("seed", 1)):
        assert judges.judge_path(**{**base, name: other}) != path, name


# ----------------------------------------------------------------------------- the Frechet distance
def test_frechet_distance_of_gaussians_in_closed_form():
    mu, sigma = np.zeros(2), np.eye(2)
    assert judges.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)
    # ||(1, 0)||^2 + tr(I + 4I - 2 * 2I) = 1 + 2
    assert judges.frechet_distance(mu, sigma, np.array([1.0, 0.0]), 4 * np.eye(2)) == pytest.approx(3.0)


def test_frechet_distance_of_two_real_halves_is_small_and_grows_with_blur_and_noise(judge):
    images = judges.real_images("shapes", None, 16, 800, seed=3)[0]
    first, second = images[:400], images[400:]

    def distance(other):
        mu1, sigma1 = judges.feature_statistics(judge.features(first))
        mu2, sigma2 = judges.feature_statistics(judge.features(other))
        return judges.frechet_distance(mu1, sigma1, mu2, sigma2)

    blurred = TF.gaussian_blur(second, kernel_size=3, sigma=1.0)
    noise = torch.randn(second.shape, generator=torch.Generator().manual_seed(0))
    noised = to_uint8(judges.to_float(second) + 0.5 * noise)
    same, blur, noise = distance(second), distance(blurred), distance(noised)
    assert same < 0.25 * blur and same < 0.25 * noise, (same, blur, noise)


# ----------------------------------------------------------------------------- restorations
def test_restoration_figures_compare_outputs_with_targets_and_skip_psnr_for_the_targets_themselves():
    targets = torch.randint(0, 200, (256, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    judge = untrained_judge(targets)
    labels = judge.predict(targets)
    same = judges.restoration_figures(judge, targets, targets, labels)
    assert same["psnr"] is None and same["ssim"] is None and same["class_accuracy"] == 1.0
    assert abs(same["judge_fd"]) < 1e-3 * np.trace(judge.real_sigma)  # the real statistics are the targets'
    brighter = targets + 51  # every pixel 0.2 brighter in [0, 1]: MSE 0.04
    figures = judges.restoration_figures(judge, brighter, targets, labels)
    assert figures["psnr"] == pytest.approx(10 * math.log10(1 / 0.2 ** 2), rel=1e-4)
    assert 0 < figures["ssim"] < 1
    assert figures["class_accuracy"] == judges.class_accuracy(judge.predict(brighter), labels)
    assert figures["judge_fd"] > 0


# ----------------------------------------------------------------------------- FID and KID (torch-fidelity)
def test_fid_runs_on_the_gpu_that_device_names(monkeypatch):
    """torch-fidelity takes cuda=True and uses the current GPU, so --device cuda:1 must make GPU 1 current."""
    import torch_fidelity

    current, calls = [None], []

    @contextlib.contextmanager
    def select(device):
        previous, current[0] = current[0], device.index
        yield
        current[0] = previous

    def calculate_metrics(**kwargs):
        calls.append((kwargs["cuda"], current[0]))
        return {"frechet_inception_distance": 1.0, "kernel_inception_distance_mean": 0.1,
                "kernel_inception_distance_std": 0.01}

    monkeypatch.setattr(torch.cuda, "device", select)
    monkeypatch.setattr(torch_fidelity, "calculate_metrics", calculate_metrics)
    images = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    for device in ("cuda:1", "cpu"):
        assert judges.inception_figures(images, images, "real", None, device)["fid"] == 1.0
    assert calls == [(True, 1), (False, None)]


def test_grey_images_reach_inception_as_three_equal_channels():
    grey = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    rgb = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    assert torch.equal(judges.Uint8Images(grey)[1], grey[1].repeat(3, 1, 1))
    assert torch.equal(judges.Uint8Images(rgb)[1], rgb[1])
    assert len(judges.Uint8Images(grey)) == 2


def test_inception_is_unavailable_only_offline_without_weights(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("no network in this test")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    reason = judges.inception_unavailable(None)
    assert reason.startswith("FID and KID skipped") and judges.INCEPTION_FILE in reason
    assert "--inception_weights" in reason and "\n" not in reason
    assert judges.inception_unavailable(str(tmp_path / "any.pth")) is None  # a weights file given
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / judges.INCEPTION_FILE).write_bytes(b"weights")
    assert judges.inception_unavailable(None) is None  # downloaded before


def test_file_digest_is_the_start_of_the_files_sha256(tmp_path):
    content = os.urandom(3 << 20)  # more than one block of the digest's reads
    (tmp_path / "weights.pth").write_bytes(content)
    assert judges.file_digest(str(tmp_path / "weights.pth")) == hashlib.sha256(content).hexdigest()[:12]


# ----------------------------------------------------------------------------- the figures of training's --eval_every
def test_training_eval_every_logs_the_offline_figures_beside_the_loss(tmp_path, monkeypatch):
    """And measuring leaves training's random stream alone: the losses equal those of a run without it."""
    monkeypatch.chdir(tmp_path)
    tiny = ["--dataset", "shapes", "--dataset_size", "200", "--image_size", "16", "--base_channels", "8",
            "--batch_size", "8", "--max_steps", "2", "--sampler", "ddim", "--sample_steps", "2", "--n_per_row", "1",
            "--num_workers", "0", "--device", "cpu"]
    ddpm_conditional.main(tiny + ["--run_name", "Q", "--eval_every", "1", "--eval_samples", "10"])
    ddpm_conditional.main(tiny + ["--run_name", "plain"])
    losses = [load_checkpoint(tmp_path / "models" / name / "training_state.pt")["losses"] for name in ("Q", "plain")]
    assert losses[0] == losses[1]
    quality = json.loads((tmp_path / "results" / "Q" / "quality.json").read_text())
    assert [q["step"] for q in quality] == [1, 2]
    assert all(0 <= q["class_accuracy"] <= 1 and q["judge_fd"] > 0 for q in quality)
    assert (tmp_path / "results" / "Q" / "loss.png").is_file()
    assert any((tmp_path / "data" / "judges").iterdir())


@pytest.mark.parametrize("args, message", [
    (["--eval_every", "0"], "--eval_every"),
    (["--eval_every", "1", "--eval_samples", "5"], "--eval_samples 10"),
])
def test_training_eval_flags_bad_input_is_one_line(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(ddpm_conditional.main, ["--dataset", "shapes", "--dataset_size", "32", "--image_size", "16",
                                        "--device", "cpu", "--num_workers", "0"] + args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
