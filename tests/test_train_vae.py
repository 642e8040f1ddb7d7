"""Tests for train_vae.py: the loss and its normalisation, the latent scale, the export that every script loads, the
learning test, and the run's errors."""
import json
import os

import pytest
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

import ddpm_conditional
import latents
import train_sd
import train_vae
from conftest import assert_same_state
from utils import UsageError, load_checkpoint, parse_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def vae_argv(run_name="vae", **overrides):
    """Flags of a seconds-long run on shapes at 16 px: a VAE of factor 2 (8 x 8 x 4 latents)."""
    values = {"dataset": "shapes", "dataset_size": 120, "holdout": 20, "image_size": 16, "block_out_channels": "8,16",
              "norm_num_groups": 4, "batch_size": 8, "max_steps": 3, "scale_images": 50, "num_workers": 0,
              "device": "cpu", "run_name": run_name, **overrides}
    return [item for key, value in values.items() for item in (f"--{key}", str(value))]


# ----------------------------------------------------------------------------- the loss and the scale

class Fixed(torch.nn.Module):
    """Returns x + offset as the reconstruction and a posterior N(mean, exp(logvar)) given by the test."""

    def __init__(self, offset, mean, logvar):
        super().__init__()
        self.offset, self.mean, self.logvar = offset, mean, logvar

    def forward(self, x):
        return x + self.offset, DiagonalGaussianDistribution(torch.cat([self.mean, self.logvar], dim=1)), None


@pytest.mark.parametrize("loss, reconstruction", [("l1", 0.5), ("mse", 0.25)])
def test_the_loss_is_per_pixel_reconstruction_plus_kl_weight_times_the_kl_per_latent_element(loss, reconstruction):
    cfg = parse_config(train_vae.Config, ["--loss", loss, "--kl_weight", "0.01"])
    mean, logvar = torch.full((2, 4, 3, 3), 2.0), torch.zeros(2, 4, 3, 3)  # KL per element 0.5 (mean^2 + 1 - 1 - 0)
    x = torch.rand(2, 3, 12, 12)
    value = train_vae.vae_loss(Fixed(0.5, mean, logvar), x, None, 0, cfg, last_layer=None)
    assert value.item() == pytest.approx(reconstruction + 0.01 * 2.0)
    bigger = train_vae.vae_loss(Fixed(0.5, torch.full((2, 4, 6, 6), 2.0), torch.zeros(2, 4, 6, 6)), x, None, 0, cfg,
                                last_layer=None)
    assert bigger.item() == pytest.approx(value.item())  # a mean over latent elements: 4x more of them, same KL


def test_the_scaling_factor_of_known_latents_is_one_over_their_std():
    torch.manual_seed(0)
    means = 2.7 * torch.randn(500, 4, 8, 8) + 0.6
    scale, shift = train_vae.latent_scale(means)
    assert scale == pytest.approx(1 / means.double().std().item(), rel=1e-9)
    assert shift == pytest.approx(means.double().mean().item(), rel=1e-9)
    assert scale == pytest.approx(1 / 2.7, rel=0.01) and train_vae.latent_scale(means, shift=False)[1] is None
    scaled = (means - shift) * scale
    assert scaled.std().item() == pytest.approx(1.0, abs=1e-4) and abs(scaled.mean().item()) < 1e-5


def test_worst_decile_is_the_mean_of_the_lowest_tenth():
    assert train_vae.worst_decile(torch.arange(100.0).flip(0)) == pytest.approx(4.5)
    assert train_vae.worst_decile(torch.tensor([3.0, 1.0])) == 1.0


# ----------------------------------------------------------------------------- a run and its export

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A 3-step run, its metrics and working folder."""
    root = tmp_path_factory.mktemp("vae_run")
    here = os.getcwd()
    os.chdir(root)
    try:
        metrics = train_vae.main(vae_argv())
    finally:
        os.chdir(here)
    return root, metrics


def test_the_export_holds_the_measured_scale_and_loads_as_stabilitys_vae_does(exported):
    root, metrics = exported
    folder = str(root / "models" / "vae" / "vae")
    vae = latents.load_vae(folder)  # the from_pretrained that train_sd.py runs on a Hub id
    assert type(vae).__name__ == "AutoencoderKL" and list(vae.config.block_out_channels) == [8, 16]
    assert vae.config.scaling_factor == metrics["scaling_factor"] == pytest.approx(1 / metrics["latent_std"])
    assert vae.config.shift_factor == metrics["shift_factor"] == pytest.approx(metrics["latent_mean"])
    assert metrics["heldout_scaled_std"] == pytest.approx(1.0, abs=0.3)  # unit std on images it did not measure
    with open(root / "results" / "vae" / "vae_metrics.json") as f:
        written = json.load(f)
    for key in ("psnr_mean", "psnr_worst_decile", "ssim_mean", "ssim_worst_decile", "latent_std", "scaling_factor",
                "shift_factor", "steps", "train_cpu_seconds"):
        assert written[key] == metrics[key]
    assert written["heldout_images"] == 20 and written["psnr_worst_decile"] <= written["psnr_mean"]
    assert written["latent_shape"] == [4, 8, 8] and written["steps"] == 3
    assert (root / "results" / "vae" / "reconstructions.png").is_file()
    assert load_checkpoint(str(root / "models" / "vae" / "training_state.pt"))["step"] == 3


def test_a_run_reports_to_no_tracker_by_default_and_saves_report_to_in_its_config(exported):
    """--report_to (every training script's): none by default for train_vae.py, so the run writes no logs/ folder."""
    root, metrics = exported
    assert train_vae.Config().report_to == "none"
    assert not (root / "results" / "vae" / "logs").exists()
    for folder in ("results", "models"):
        with open(root / folder / "vae" / "config.json") as f:
            assert json.load(f)["report_to"] == "none"
    assert metrics["config"]["report_to"] == "none"  # vae_metrics.json's copy of the config
    assert parse_config(train_vae.Config, vae_argv(report_to="tensorboard")).report_to == "tensorboard"
    with pytest.raises(UsageError, match="report_to 'csv' is unknown: use one of none, tensorboard, wandb, all"):
        parse_config(train_vae.Config, vae_argv(report_to="csv"))


def test_report_to_tensorboard_logs_the_loss_under_the_runs_results(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train_vae.main(vae_argv("logged", report_to="tensorboard", max_steps=2))
    logs = tmp_path / "results" / "logged" / "logs"
    assert any(name.startswith("events.out.tfevents") for _, _, files in os.walk(logs) for name in files)
    with open(tmp_path / "models" / "logged" / "config.json") as f:
        assert json.load(f)["report_to"] == "tensorboard"


def test_train_sd_and_ddpm_conditional_train_in_the_exported_latents(exported, tiny_sd_models, monkeypatch):
    root, _ = exported
    monkeypatch.chdir(root)
    folder = os.path.join("models", "vae", "vae")
    common = ["--dataset", "shapes", "--dataset_size", "32", "--image_size", "16", "--base_channels", "8",
              "--batch_size", "8", "--max_steps", "2", "--sample_steps", "2", "--num_workers", "0", "--device", "cpu",
              "--vae", folder, "--cache_latents", "true"]
    text = train_sd.main(common + ["--text_encoder", tiny_sd_models["text_encoder"], "--n_per_row", "1",
                                   "--run_name", "text"])
    classes = ddpm_conditional.main(common + ["--n_per_row", "1", "--run_name", "classes"])
    for done in (text, classes):
        assert done["step"] == 2 and not done["skipped"]
        state = load_checkpoint(os.path.join(done["models_dir"], "training_state.pt"))
        assert state["vae_digest"] == latents.vae_digest(folder)
        assert os.path.isfile(os.path.join(done["results_dir"], "0_ema.jpg"))  # the decoded grid
    cache = [torch.load(os.path.join("data", "latent_cache", f), weights_only=True)
             for f in sorted(os.listdir(os.path.join("data", "latent_cache")))]
    for entry in cache:  # both caches hold the exported VAE's scaled latents: about unit std
        assert entry["mean"].shape[1:] == (4, 8, 8) and 0.5 < entry["mean"].std().item() < 2.0


def test_a_non_finite_loss_is_skipped_and_counted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    real = train_vae.vae_loss

    def nan_at_step_1(model, x, conditioning, step, **kwargs):
        loss = real(model, x, conditioning, step, **kwargs)
        return loss * float("nan") if step == 1 else loss

    monkeypatch.setattr(train_vae, "vae_loss", nan_at_step_1)
    metrics = train_vae.main(vae_argv("nan"))
    assert metrics["steps"] == 3 and metrics["skipped_steps"] == 1
    state = load_checkpoint("models/nan/training_state.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_each_adversarial_loss_reaches_only_its_own_network():
    """Before disc_start the discriminator gets no gradient; from it on, it gets exactly its hinge loss's, while the
    generator's term moves the autoencoder."""
    cfg = parse_config(train_vae.Config, vae_argv(disc_start=5, disc_channels=8))
    torch.manual_seed(0)
    net = train_vae.build_autoencoder(cfg)
    x = torch.rand(4, 3, 16, 16) * 2 - 1

    def gradients(loss_of):
        net.zero_grad()
        torch.manual_seed(1)  # the same posterior sample each time
        loss_of(*net(x)).backward() if loss_of else train_vae.vae_loss(net, x, None, step, cfg, last_layer).backward()
        return {name: p.grad.clone() for name, p in net.named_parameters() if p.grad is not None}

    last_layer = net.vae.decoder.conv_out.weight
    step = 4
    before = gradients(None)
    step = 5
    after = gradients(None)
    hinge = gradients(lambda reconstruction, posterior, logits: 0.5 * (torch.relu(1 - logits["real"]).mean()
                                                                        + torch.relu(1 + logits["fake"]).mean()))
    discriminator = [name for name in after if name.startswith("discriminator.")]
    assert discriminator and all(not before[name].any() for name in discriminator)
    assert all(torch.allclose(after[name], hinge[name], atol=1e-6) for name in discriminator)
    assert any(after[name].abs().sum() > 0 for name in discriminator)
    assert not torch.allclose(after["vae.decoder.conv_out.weight"], before["vae.decoder.conv_out.weight"])


def test_the_adaptive_weight_is_computed_from_disc_start_on(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    weights = []
    real = train_vae.adaptive_weight

    def recorded(*args):
        weights.append(real(*args).item())
        return weights[-1]

    monkeypatch.setattr(train_vae, "adaptive_weight", recorded)
    metrics = train_vae.main(vae_argv("gan", disc_start=2, disc_channels=8, max_steps=4))
    assert len(weights) == 2 and all(0 < w <= 1e4 for w in weights)  # steps 2 and 3 (0-based), not 0 and 1
    assert metrics["steps"] == 4 and not metrics["skipped_steps"]


def test_a_resumed_run_trains_and_exports_as_one_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    whole = train_vae.main(vae_argv("whole", max_steps=4, lr_decay="none"))
    train_vae.main(vae_argv("parts", max_steps=2, lr_decay="none"))
    with pytest.raises(UsageError, match="different config: kl_weight"):
        train_vae.main(vae_argv("parts", max_steps=4, lr_decay="none", kl_weight=0.1) + ["--resume"])
    parts = train_vae.main(vae_argv("parts", max_steps=4, lr_decay="none") + ["--resume"])
    states = [load_checkpoint(f"models/{name}/training_state.pt") for name in ("whole", "parts")]
    assert len(states[0]["losses"]) == 4
    assert_same_state(states[1], states[0])  # losses, autoencoder, EMA and optimizer
    assert parts["scaling_factor"] == pytest.approx(whole["scaling_factor"], rel=1e-5)


def test_bad_settings_are_one_line_naming_the_fix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for overrides, message in (({"block_out_channels": "8,x"}, "not a list of positive widths"),
                               ({"image_size": 24, "block_out_channels": "8,8,8,8,8"}, "not divisible by the VAE's "
                                                                                      "factor 16"),
                               ({"norm_num_groups": 3}, "does not divide every width"),
                               ({"loss": "l2"}, "use l1 or mse"),
                               ({"holdout": 120}, "leaves none of the 120 images")):
        with pytest.raises(UsageError, match=message):
            train_vae.main(vae_argv("bad", **overrides))
    assert not os.path.exists("models/bad")


# ----------------------------------------------------------------------------- learning

def test_a_tiny_vae_learns_to_reconstruct_held_out_shapes(tmp_path, monkeypatch):
    """The held-out reconstruction error of a 16 px VAE falls to well under half its initial value in 200 steps."""
    monkeypatch.chdir(tmp_path)
    cfg = parse_config(train_vae.Config, vae_argv("learn", dataset_size=2200, holdout=200, max_steps=200, lr=0.002))
    train_set, held_out = train_vae.first_stage_data(cfg)
    images = train_vae.stack_images(held_out)
    torch.manual_seed(cfg.seed)  # the initial weights of the run
    before = (train_vae.reconstruct(train_vae.build_autoencoder(cfg).vae.eval(), images) - images).abs().mean()
    metrics = train_vae.main(vae_argv("learn", dataset_size=2200, holdout=200, max_steps=200, lr=0.002))
    vae = latents.load_vae(os.path.join("models", "learn", "vae"))
    after = (train_vae.reconstruct(vae, images) - images).abs().mean()
    print(f"held-out L1 {before:.4f} -> {after:.4f}; PSNR {metrics['psnr_mean']:.1f} dB")
    assert after < 0.4 * before
