"""Tests for evaluate.py: its figures, table, plot and errors on tiny checkpoints (the judges and the distances it
reports are tested in test_judges.py)."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import ddpm_conditional
import evaluate
import judges
import train_sd
from config import network_arch
from modules import DIT_SIZES, DiT, UNet, UNet_conditional, build_network
from utils import run_cli, save_config

FAST = ["--sampler", "ddim", "--steps", "2", "--num_real", "2000", "--judge_epochs", "4", "--device", "cpu"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ----------------------------------------------------------------------------- the CLI on a tiny checkpoint
@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """models/R (conditional) and models/U (unconditional) with configs, and bare/ckpt.pt without; one judge cache."""
    root = tmp_path_factory.mktemp("eval")
    for name, net in (("R", UNet_conditional(num_classes=10, base_channels=8)), ("U", UNet(base_channels=8))):
        (root / "models" / name).mkdir(parents=True)
        torch.save(net.state_dict(), root / "models" / name / "ema_ckpt.pt")
        cfg = ddpm_conditional.Config(run_name=name, dataset="shapes", image_size=16, base_channels=8, noise_steps=100)
        save_config(cfg, str(root / "models" / name / "config.json"))
    (root / "bare").mkdir()
    torch.save(UNet_conditional(num_classes=10, base_channels=8).state_dict(), root / "bare" / "ckpt.pt")
    depth, dim, heads = DIT_SIZES["dit-n"]
    (root / "models" / "D").mkdir(parents=True)
    torch.save(DiT(num_classes=10, patch_size=4, depth=depth, dim=dim, heads=heads).state_dict(),
               root / "models" / "D" / "ema_ckpt.pt")
    cfg = ddpm_conditional.Config(run_name="D", dataset="shapes", image_size=16, noise_steps=100, backbone="dit",
                                  dit_size="dit-n", patch_size=4)
    save_config(cfg, str(root / "models" / "D" / "config.json"))
    return root


@pytest.fixture
def offline(workdir, monkeypatch):
    """Run inside workdir, with no internet and an empty torch hub, whatever the machine has."""
    def no_network(*args, **kwargs):
        raise OSError("no network in this test")

    monkeypatch.chdir(workdir)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(workdir / "hub"))
    return workdir


ROW_FIELDS = {"sampler", "steps", "steps_run", "cfg_scale", "clip_x0", "num_samples", "seed", "class_accuracy",
              "judge_fd", "fid", "kid", "kid_std", "seconds"}


def test_metrics_json_holds_every_field_and_the_offline_figures(offline, capsys):
    metrics = evaluate.main(["--ckpt", "models/R/ema_ckpt.pt", "--num_samples", "10", "--cfg_scale", "3"] + FAST)
    written = json.loads((offline / "results" / "R" / "metrics.json").read_text())
    assert written == json.loads(json.dumps(metrics))
    assert written["dataset"] == "shapes" and written["image_size"] == 16
    assert written["judge"]["heldout_accuracy"] >= 0.9
    (row,) = written["rows"]
    assert set(row) == ROW_FIELDS
    assert row["sampler"] == "ddim" and row["steps"] == 2 and row["cfg_scale"] == 3 and row["num_samples"] == 10
    assert 0 <= row["class_accuracy"] <= 1 and row["judge_fd"] > 0 and row["seconds"] > 0
    out = capsys.readouterr().out
    assert "class_acc" in out and "held-out" in out and "not comparable with published FID" in out


def test_missing_inception_weights_is_one_line_and_offline_figures_still_run(offline, capsys):
    metrics = evaluate.main(["--ckpt", "models/R/ema_ckpt.pt", "--num_samples", "10"] + FAST)
    lines = [line for line in capsys.readouterr().out.splitlines() if "FID and KID skipped" in line]
    assert len(lines) == 1 and judges.INCEPTION_FILE in lines[0] and "--inception_weights" in lines[0]
    assert metrics["notes"] == [lines[0]]
    assert metrics["rows"][0]["fid"] is None and metrics["rows"][0]["judge_fd"] is not None


def test_sweep_writes_one_row_per_combination_and_the_plot(offline):
    metrics = evaluate.main(["--ckpt", "models/R/ema_ckpt.pt", "--num_samples", "10", "--out", "sweep/m.json",
                             "--inception", "false"] + FAST + ["--cfg_scale", "0,3", "--steps", "1,2"])
    rows = json.loads((offline / "sweep" / "m.json").read_text())["rows"]
    assert [(r["cfg_scale"], r["steps"]) for r in rows] == [(0, 1), (0, 2), (3, 1), (3, 2)]
    assert metrics["rows"] == rows
    assert (offline / "sweep" / "metrics.png").stat().st_size > 0


def test_clip_x0_defaults_to_the_runs_setting_and_the_flag_overrides_it(offline, monkeypatch):
    seen = []
    real_generate = evaluate.generate

    def spy(model, diffusion, *args, **kwargs):
        seen.append(diffusion.clip_x0)
        return real_generate(model, diffusion, *args, **kwargs)

    monkeypatch.setattr(evaluate, "generate", spy)
    base = ["--ckpt", "models/R/ema_ckpt.pt", "--num_samples", "10", "--inception", "false"] + FAST
    rows = [evaluate.main(base + flags)["rows"][0] for flags in ([], ["--clip_x0", "false"], ["--clip_x0", "true"])]
    assert seen == [True, False, True]  # the run's config says clip_x0 true (ddpm_conditional's default)
    assert [row["clip_x0"] for row in rows] == seen


def test_a_dit_checkpoint_is_measured_like_a_unet(offline, capsys):
    metrics = evaluate.main(["--ckpt", "models/D/ema_ckpt.pt", "--num_samples", "10", "--inception", "false"] + FAST)
    (row,) = metrics["rows"]
    assert 0 <= row["class_accuracy"] <= 1 and row["judge_fd"] > 0 and row["num_samples"] == 10
    assert metrics["run_name"] == "D" and (offline / "results" / "D" / "metrics.json").is_file()
    assert "conditional (10 classes) DiT dit-n/4 from models/D/ema_ckpt.pt" in capsys.readouterr().out


def test_unconditional_checkpoint_skips_accuracy_with_a_note(offline):
    metrics = evaluate.main(["--ckpt", "models/U/ema_ckpt.pt", "--num_samples", "4", "--inception", "false"] + FAST)
    (row,) = metrics["rows"]
    assert row["class_accuracy"] is None and row["judge_fd"] > 0 and row["cfg_scale"] is None
    assert any("class accuracy skipped" in note for note in metrics["notes"])


def test_a_latent_run_is_judged_on_its_decoded_samples(offline, latent_run, decoded):
    metrics = evaluate.main(["--ckpt", latent_run["ckpt"], "--num_samples", "10", "--inception", "false", "--out",
                             "latent/metrics.json"] + FAST)
    assert decoded == [(10, 4, 8, 8)]  # 8 px latents, decoded to the 16 px images the judge reads
    assert metrics["image_size"] == 16 and 0 <= metrics["rows"][0]["class_accuracy"] <= 1
    assert metrics["rows"][0]["clip_x0"] is False  # latents have no [-1, 1] range


@pytest.mark.parametrize("args, message", [
    (["--ckpt", "bare/ckpt.pt"], "--dataset"),
    (["--ckpt", "models/R/ema_ckpt.pt", "--num_samples", "5"], "--num_samples 10"),
    (["--ckpt", "models/R/ema_ckpt.pt", "--num_samples", "1"], "at least 2"),
    (["--ckpt", "models/R/ema_ckpt.pt", "--cfg_scale", "1,x"], "--cfg_scale"),
    (["--ckpt", "models/R/ema_ckpt.pt", "--inception_weights", "nowhere.pth"], "nowhere.pth"),
    (["--ckpt", "models/R/ema_ckpt.pt", "--num_real", "5"], "num_real 5"),
])
def test_bad_input_is_one_line_naming_the_fix(offline, args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(evaluate.main, ["--num_real", "500", "--judge_epochs", "3"] + args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_a_train_sd_checkpoint_is_refused_with_one_line_naming_train_sd(offline, capsys):
    cfg = train_sd.Config(run_name="S", dataset="shapes", image_size=16, base_channels=8, text_encoder="tiny/clip",
                          prompt=["a red circle"])
    torch.manual_seed(0)
    net = build_network(network_arch(cfg, 4, context_dim=32))
    (offline / "models" / "S").mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), offline / "models" / "S" / "ema_ckpt.pt")
    save_config(cfg, str(offline / "models" / "S" / "config.json"))
    with pytest.raises(SystemExit) as exit_info:
        run_cli(evaluate.main, ["--ckpt", "models/S/ema_ckpt.pt", "--num_samples", "10"] + FAST)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert "is a train_sd.py checkpoint" in err and "python train_sd.py --sample --ckpt models/S/ema_ckpt.pt" in err
    assert not (offline / "results" / "S").exists()


@pytest.fixture(scope="module")
def stand_in_inception(tmp_path_factory):
    """Random InceptionV3 weights in torch-fidelity's layout: the network is built without loading any weights.

    PyTorch's default initialisation shrinks the activations layer after layer, to features of about 1e-8 whose
    FID is about 1e-13 whatever the images; He initialisation keeps them of order 1, so the distances tell images
    apart.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    folder = tmp_path_factory.mktemp("inception")
    torch.save({}, folder / "empty.pth")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, state_dict: None)
        torch.manual_seed(0)
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                          feature_extractor_weights_path=str(folder / "empty.pth"))
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.save(net.state_dict(), folder / judges.INCEPTION_FILE)
    return str(folder / judges.INCEPTION_FILE)


def test_fid_and_kid_through_the_local_weights_flag(offline, stand_in_inception, monkeypatch):
    """evaluate.py's FID and KID, with the samples of its two rows (--steps 1,2) replaced: the real images themselves
    are at distance 0, uniform noise far from them."""
    real = judges.real_images("shapes", None, 16, 10)[0]  # the real images evaluate.main compares with
    noise = torch.randint(0, 256, real.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    # Noise first: an evaluate.py that compared the samples with themselves would cache the first row's statistics
    # under the real images' name, and a real first row would then hide that mistake from the noise row.
    samples = [noise, real]
    monkeypatch.setattr(evaluate, "generate", lambda *args, **kwargs: (samples.pop(0), None))
    metrics = evaluate.main(["--ckpt", "models/U/ema_ckpt.pt", "--num_samples", "10", "--num_real", "10",
                             "--judge_epochs", "1", "--steps", "1,2", "--device", "cpu",
                             "--inception_weights", stand_in_inception])
    assert not any("FID and KID skipped" in note for note in metrics["notes"])
    noise, real = metrics["rows"]  # measured: FID 60 and -1e-5, KID 0.179 and -0.005
    assert noise["fid"] > 1 and abs(real["fid"]) < 1e-3 * noise["fid"]
    assert noise["kid"] > 0.01 and abs(real["kid"]) < 0.1 * noise["kid"]  # KID of a set to itself is slightly < 0
    assert np.isfinite(real["kid_std"]) and np.isfinite(noise["kid_std"])
    assert list((offline / "data" / "fidelity_cache").iterdir())  # the real statistics, cached for the next run


def test_cli_subprocess_writes_metrics_and_exits_2_on_bad_input(workdir):
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "evaluate.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ok = subprocess.run([sys.executable, script, "--ckpt", "models/R/ema_ckpt.pt", "--num_samples", "10",
                         "--inception", "false", "--out", "cli/metrics.json"] + FAST,
                        cwd=workdir, capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    assert json.loads((workdir / "cli" / "metrics.json").read_text())["rows"][0]["num_samples"] == 10
    bad = subprocess.run([sys.executable, script, "--ckpt", "bare/ckpt.pt"], cwd=workdir, capture_output=True,
                         text=True, env=env)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "--dataset" in bad.stderr


# ----------------------------------------------------------------------------- image-to-image and RePaint figures
RESTORE = ["--num_samples", "6", "--num_real", "200", "--judge_epochs", "1", "--device", "cpu"]


@pytest.fixture
def in_runs(img2img_runs, monkeypatch):
    """The working folder of conftest's img2img_runs, where their configs' data and judges live."""
    monkeypatch.chdir(img2img_runs["root"])
    return img2img_runs


def test_superres_is_measured_on_held_out_images_beside_bicubic_and_the_ground_truth(in_runs, tmp_path):
    out = tmp_path / "sr.json"
    metrics = evaluate.main(["--ckpt", in_runs["superres"], "--cfg_scale", "0,3", "--sampler", "ddim", "--steps",
                             "2", "--out", str(out), *RESTORE])
    rows = metrics["rows"]
    assert [(r["method"], r["cfg_scale"]) for r in rows] == [("ground truth", None), ("bicubic", None),
                                                             ("diffusion", 0.0), ("diffusion", 3.0)]
    assert rows[0]["psnr"] is None and all(r["num_samples"] == 6 for r in rows)
    assert rows[1]["psnr"] > 10 and 0 < rows[1]["ssim"] < 1 and 0 <= rows[1]["class_accuracy"] <= 1
    assert rows[2]["psnr"] != rows[3]["psnr"]  # guidance changes the outputs
    assert json.loads(out.read_text())["task"] == "superres" and (tmp_path / "sr_grid.png").is_file()
    # the held-out images are the run's: never among those it trained on
    saved = json.loads(open(os.path.join(os.path.dirname(in_runs["superres"]), "config.json")).read())
    train, held, _ = data.run_datasets("shapes", None, 16, saved["seed"], saved["dataset_size"], holdout=8)
    images, _ = data.heldout_images(saved, 6, 3)
    assert torch.equal(images[0], held[0][0]) and not set(held.indices) & set(train.indices)


def test_repaint_is_measured_on_held_out_images_with_the_lower_half_masked(in_runs, tmp_path):
    out = tmp_path / "repaint.json"
    metrics = evaluate.main(["--ckpt", in_runs["uncond"], "--repaint", "true", "--jump_length", "5",
                             "--jump_n_sample", "1", "--out", str(out), *RESTORE])
    assert metrics["masks"] == "lower"
    rows = {r["method"]: r for r in metrics["rows"]}
    assert set(rows) == {"ground truth", "blurred fill", "repaint"} and rows["repaint"]["sampler"] == "ddpm"
    assert rows["repaint"]["jump_n_sample"] == 1 and rows["repaint"]["psnr"] > 0
    assert rows["repaint"]["reconstruction_guidance"] == 2.0  # the default: RePaint with MCG's gradient step


@pytest.mark.parametrize("run, args, message", [
    ("superres", ["--repaint", "true"], "this checkpoint is trained for superres: drop --repaint"),
    ("superres", ["--masks", "lower"], "--masks is for inpainting, and this checkpoint does superres: drop --masks"),
    ("uncond", ["--repaint", "true", "--sampler", "ddim"], "RePaint runs inside DDPM Alg. 2, not with --sampler ddim"),
    ("uncond", ["--masks", "lower"], "--masks is for inpainting: pass --repaint true"),
    ("uncond", ["--repaint", "true", "--reconstruction_guidance", "-1"], "reconstruction_guidance -1.0 must be >= 0"),
])
def test_bad_restoration_input_is_one_line(in_runs, capsys, run, args, message):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(evaluate.main, ["--ckpt", in_runs[run], *args, *RESTORE])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_repaint_needs_a_run_with_held_out_images(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "R").mkdir(parents=True)
    torch.save(UNet(base_channels=8).state_dict(), tmp_path / "models" / "R" / "ema_ckpt.pt")
    save_config(ddpm_conditional.Config(dataset="shapes", image_size=16, base_channels=8),
                str(tmp_path / "models" / "R" / "config.json"))
    with pytest.raises(SystemExit):
        run_cli(evaluate.main, ["--ckpt", "models/R/ema_ckpt.pt", "--repaint", "true", *RESTORE])
    assert "held no images out of training (holdout 0)" in capsys.readouterr().err
