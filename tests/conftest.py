"""Fixtures shared by several test files."""
import json
import os

import pytest
import torch

from modules import DIT_SIZES, DiT, UNet, UNet_conditional


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one thread: the tiny networks gain nothing from threads, and on busy shared cores
    each op's thread hand-off costs more. Use it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_sd_models(tmp_path_factory):
    """Paths of a tiny random AutoencoderKL (factor 2, 4 latent channels) and CLIP text encoder (D = 32, L = 16),
    written once per session by latents.make_tiny_models (about 10 s: its tokenizer's vocabulary is built merge by
    merge)."""
    from latents import make_tiny_models

    vae_dir, text_dir = make_tiny_models(str(tmp_path_factory.mktemp("tiny_models")))
    return {"vae": vae_dir, "text_encoder": text_dir}


def write_tiny_vae(path, seed=0, scaling_factor=1.5, shift_factor=0.1):
    """save_pretrained of a tiny random AutoencoderKL (factor 2, 4 latent channels) with its latent scale in the
    config, as train_vae.py writes one; returns the folder."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1,
                        norm_num_groups=4, sample_size=16)
    vae.register_to_config(scaling_factor=scaling_factor, shift_factor=shift_factor)
    vae.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="session")
def latent_run(tmp_path_factory):
    """A ddpm_conditional.py run of 2 steps in the latents of a tiny VAE: shapes at 16 px, latents (4, 8, 8), T = 200.
    Returns {"root": its working folder, "vae": the VAE folder, "ckpt": models/latent/ema_ckpt.pt}."""
    import ddpm_conditional

    root = tmp_path_factory.mktemp("latent_run")
    vae = write_tiny_vae(root / "vae")
    here = os.getcwd()
    os.chdir(root)
    try:
        ddpm_conditional.main(["--vae", vae, "--dataset", "shapes", "--dataset_size", "40", "--image_size", "16",
                               "--base_channels", "8", "--noise_steps", "200", "--batch_size", "8", "--max_steps",
                               "2", "--n_per_row", "1", "--sample_steps", "2", "--num_workers", "0", "--device",
                               "cpu", "--run_name", "latent"])
    finally:
        os.chdir(here)
    return {"root": str(root), "vae": vae, "ckpt": str(root / "models" / "latent" / "ema_ckpt.pt")}


def record_calls(monkeypatch, method):
    """Record the shape of the tensor that each call of latents.Latents.<method> gets; returns the list."""
    import latents

    shapes = []
    original = getattr(latents.Latents, method)

    def recorded(self, x):
        shapes.append(tuple(x.shape))
        return original(self, x)

    monkeypatch.setattr(latents.Latents, method, recorded)
    return shapes


@pytest.fixture
def decoded(monkeypatch):
    """The shapes of the latents that the VAE decodes into pixels while the test runs, in order."""
    return record_calls(monkeypatch, "decode")


@pytest.fixture
def encoded(monkeypatch):
    """The shapes of the image batches that the VAE encodes while the test runs, in order."""
    return record_calls(monkeypatch, "encode")


@pytest.fixture(scope="session")
def img2img_runs(tmp_path_factory):
    """Runs of 2 steps on 16 px shapes with 8 images held out, T = 50, in one working folder: ddpm_img2img.py
    superres (scale 4) and inpaint (strokes), and a ddpm.py model with --holdout for RePaint. Returns {"root": the
    folder, "superres", "inpaint", "uncond": their models/<run>/ema_ckpt.pt}."""
    import ddpm
    import ddpm_img2img

    root = tmp_path_factory.mktemp("img2img_runs")
    common = ["--dataset", "shapes", "--dataset_size", "40", "--holdout", "8", "--image_size", "16", "--base_channels",
              "8", "--batch_size", "8", "--max_steps", "2", "--noise_steps", "50", "--sampler", "ddim", "--sample_steps",
              "2", "--num_workers", "0", "--device", "cpu"]
    here = os.getcwd()
    os.chdir(root)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ddpm_img2img.main([*common, "--task", "superres", "--run_name", "superres", "--n_per_row", "3"])
        ddpm_img2img.main([*common, "--task", "inpaint", "--masks", "strokes", "--run_name", "inpaint", "--n_per_row",
                           "3"])
        ddpm.main([*common, "--run_name", "uncond", "--n_samples", "2", "--report_to", "none"])
    finally:
        os.chdir(here)
        torch.set_num_threads(threads)
    runs = {name: str(root / "models" / name / "ema_ckpt.pt") for name in ("superres", "inpaint", "uncond")}
    return {"root": str(root), **runs}


def tiny_conditional(seed=0):
    """A class-conditional U-Net of 3 classes, 8 channels wide, its weights drawn with `seed`."""
    torch.manual_seed(seed)
    return UNet_conditional(num_classes=3, base_channels=8)


def tiny_unconditional(seed=0):
    """An unconditional U-Net, 8 channels wide, its weights drawn with `seed`."""
    torch.manual_seed(seed)
    return UNet(base_channels=8)


def reference_checkpoint(path, net):
    """Write `net`'s raw state_dict to `path` (a new folder for it), as the reference's checkpoints are: no config
    beside it. Returns the path as a string."""
    path.parent.mkdir()
    torch.save(net.state_dict(), path)
    return str(path)


@pytest.fixture
def ref_cond(tmp_path):
    """A reference-style checkpoint of a conditional U-Net."""
    return reference_checkpoint(tmp_path / "ref" / "cond.pt", tiny_conditional())


@pytest.fixture
def ref_uncond(tmp_path):
    """A reference-style checkpoint of an unconditional U-Net."""
    return reference_checkpoint(tmp_path / "ref_uncond" / "uncond.pt", tiny_unconditional())


@pytest.fixture
def run_dir(tmp_path):
    """This repository's layout: models/R/{ckpt.pt, ema_ckpt.pt, training_state.pt, config.json, classes.json}."""
    import ddpm_conditional
    from utils import save_config

    models_dir = tmp_path / "models" / "R"
    models_dir.mkdir(parents=True)
    cfg = ddpm_conditional.Config(run_name="R", image_size=16, base_channels=8, noise_steps=200)
    net, ema_net = tiny_conditional(seed=1), tiny_conditional(seed=2)
    torch.save(net.state_dict(), models_dir / "ckpt.pt")
    torch.save(ema_net.state_dict(), models_dir / "ema_ckpt.pt")
    save_config(cfg, str(models_dir / "config.json"))
    (models_dir / "classes.json").write_text(json.dumps(["red circle", "green square", "blue triangle"]))
    state = {"model": net.state_dict(), "ema": ema_net.state_dict(), "step": 3, "epoch": 1,
             "config": {**vars(cfg), "image_size": 24}}
    torch.save(state, models_dir / "training_state.pt")
    return models_dir


def moved(net):
    """The network with its zero-initialised weights (DiT's adaLN-Zero, its output layer) moved, as after training,
    so that every input counts in its output."""
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    return net


def write_dit_run(root, num_classes=3, **config):
    """models/D/{ema_ckpt.pt, config.json} of a dit-n/4 network with moved adaLN weights, as after training."""
    import ddpm_conditional
    from utils import save_config

    torch.manual_seed(0)
    depth, dim, heads = DIT_SIZES["dit-n"]
    net = moved(DiT(num_classes=num_classes, patch_size=4, depth=depth, dim=dim, heads=heads))
    run = root / "models" / "D"
    run.mkdir(parents=True)
    torch.save(net.state_dict(), run / "ema_ckpt.pt")
    options = {"run_name": "D", "image_size": 16, "backbone": "dit", "dit_size": "dit-n", "patch_size": 4, **config}
    save_config(ddpm_conditional.Config(**options), str(run / "config.json"))
    return net.eval(), str(run / "ema_ckpt.pt")


def assert_same_state(state, reference):
    """Two training_state.pt dicts hold the same run: its step and losses, the model's and the EMA's weights, the EMA's
    count of updates, and AdamW's moments and step counts (a resume that restored the model alone passes a check of
    the model alone)."""
    assert state["step"] == reference["step"] and state["losses"] == reference["losses"]
    for part in ("model", "ema"):
        assert state[part].keys() == reference[part].keys()
        for key, tensor in state[part].items():
            assert torch.equal(tensor, reference[part][key]), f"{part} {key} differs"
    assert state["ema_state"] == reference["ema_state"]
    moments, expected = state["optimizer"]["state"], reference["optimizer"]["state"]
    assert moments.keys() == expected.keys() and len(moments) > 0
    for index, entries in moments.items():
        for name, value in entries.items():
            assert torch.equal(value, expected[index][name]), f"optimizer state {index} {name} differs"
