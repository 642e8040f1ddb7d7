"""Tests for latents.py: loading and checking a VAE, its scaled latents, and the class-conditional scripts in them."""
import json
import os

import pytest
import torch

import ddpm_conditional
import latents
from conftest import write_tiny_vae
from utils import UsageError, load_checkpoint, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def class_argv(vae, run_name="run", **overrides):
    """ddpm_conditional.py flags of a seconds-long run on shapes at 16 px in the latents of `vae` (a value None
    leaves its flag out)."""
    values = {"vae": vae, "dataset": "shapes", "dataset_size": 40, "image_size": 16, "base_channels": 8,
              "noise_steps": 200, "batch_size": 8, "max_steps": 2, "n_per_class": 1, "sample_steps": 2,
              "num_workers": 0, "device": "cpu", "run_name": run_name, "cache_dir": "cache", **overrides}
    return [item for key, value in values.items() if value is not None for item in (f"--{key}", str(value))]


# ----------------------------------------------------------------------------- the scaled latents

def test_encode_applies_shift_then_scale_and_decode_inverts_it(tmp_path):
    vae = latents.load_vae(write_tiny_vae(tmp_path / "vae", scaling_factor=2.0, shift_factor=0.25))
    space = latents.Latents(vae)
    assert (space.channels, space.factor, space.scale, space.shift) == (4, 2, 2.0, 0.25)
    assert not any(p.requires_grad for p in vae.parameters()) and not vae.training
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    mean, std = space.encode(images)
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
    torch.testing.assert_close(mean, (posterior.mean - 0.25) * 2.0)
    torch.testing.assert_close(std, posterior.std * 2.0)
    with torch.no_grad():
        expected = vae.decode(posterior.mean).sample.clamp(-1, 1)
    torch.testing.assert_close(space.decode(mean), expected)
    assert space.latent_size(32) == 16 and space.clip_x0(None) is False and space.clip_x0(True) is True
    pixels = latents.Latents(None)
    assert (pixels.channels, pixels.factor, pixels.clip_x0(None)) == (3, 1, True)


def test_the_digest_changes_when_the_folder_is_retrained_in_place(tmp_path):
    folder = write_tiny_vae(tmp_path / "vae", seed=0)
    first = latents.vae_digest(folder)
    assert latents.vae_digest(folder) == first and latents.vae_digest("stabilityai/sd-vae-ft-mse") == \
        "stabilityai/sd-vae-ft-mse" and latents.vae_digest("none") is None
    write_tiny_vae(tmp_path / "vae", seed=1)
    assert latents.vae_digest(folder) != first


# ----------------------------------------------------------------------------- the class-conditional scripts

def test_class_conditional_training_in_latents_caches_each_image_once(tmp_path, monkeypatch, encoded):
    monkeypatch.chdir(tmp_path)
    vae = write_tiny_vae(tmp_path / "vae")
    done = ddpm_conditional.main(class_argv(vae, "cached", cache_latents="true"))
    assert done["step"] == 2 and sum(shape[0] for shape in encoded) == 40  # each image once, then the cache trains
    (cache_file,) = os.listdir("cache")
    cache = torch.load(os.path.join("cache", cache_file), weights_only=True)
    assert cache["mean"].shape == (40, 4, 8, 8) and cache["label"].tolist() == [i % 10 for i in range(40)]
    state = load_checkpoint("models/cached/training_state.pt")
    assert state["model"]["inc.double_conv.0.weight"].shape[1] == 4  # the U-Net takes the 4 latent channels
    assert state["vae_digest"] == latents.vae_digest(vae)
    encoded.clear()
    ddpm_conditional.main(class_argv(vae, "cached", cache_latents="true") + ["--overwrite"])
    assert encoded == []  # a hit: the VAE's encoder never ran
    ddpm_conditional.main(class_argv(vae, "uncached"))
    assert encoded == [(8, 3, 16, 16)] * 2  # without the cache, each batch of images is encoded


def test_the_unconditional_script_trains_and_samples_in_latents(tmp_path, monkeypatch, decoded):
    import ddpm
    import sample

    monkeypatch.chdir(tmp_path)
    vae = write_tiny_vae(tmp_path / "vae")
    ddpm.main(class_argv(vae, "uncond", n_per_class=None, n_samples=2))
    assert decoded == [(2, 4, 8, 8)] * 2  # the last epoch's grids of the weights and of the EMA
    images = sample.main(["--ckpt", "models/uncond/ema_ckpt.pt", "--n", "3", "--sampler", "ddim", "--steps", "2",
                          "--out", "grid.png", "--device", "cpu"])
    assert images.shape == (3, 3, 16, 16) and decoded[-1] == (3, 4, 8, 8)


def test_a_dit_trains_on_the_latents_of_grey_images_and_sample_decodes_them_grey(tmp_path, monkeypatch, encoded,
                                                                                 decoded):
    """--backbone dit with --vae: the DiT's patches hold the 4 latent channels; grey images (--channels None on a
    folder of grey files) are repeated to the VAE's 3 input channels, cached with their own key, and sample.py
    rebuilds the DiT and averages the decoded images back to grey; compare.py counts the FLOPs on the latents."""
    import numpy as np
    from PIL import Image

    import compare
    import sample
    from bench import count_flops

    monkeypatch.chdir(tmp_path)
    for k in range(2):
        (tmp_path / "grey" / f"c{k}").mkdir(parents=True)
        for i in range(4):
            pixels = np.random.default_rng([k, i]).integers(0, 256, (16, 16), dtype=np.uint8)
            Image.fromarray(pixels, mode="L").save(tmp_path / "grey" / f"c{k}" / f"{i}.png")
    vae = write_tiny_vae(tmp_path / "vae")
    argv = class_argv(vae, "dit", dataset="imagefolder", dataset_path="grey", dataset_size=None, cache_latents="true",
                      backbone="dit", dit_size="dit-n", patch_size=2)
    ddpm_conditional.main(argv)
    assert encoded == [(8, 1, 16, 16)]  # the grey images, once, into the cache
    saved = json.loads((tmp_path / "models" / "dit" / "config.json").read_text())
    assert (saved["channels"], saved["backbone"]) == (1, "dit")
    weights = load_checkpoint("models/dit/ema_ckpt.pt")
    assert weights["patch_embed.weight"].shape[1] == 2 * 2 * 4  # patches of the 4 latent channels
    images = sample.main(["--ckpt", "models/dit/ema_ckpt.pt", "--n_per_label", "1", "--sampler", "ddim", "--steps",
                          "2", "--out", "grid.png", "--device", "cpu"])
    assert images.shape == (2, 1, 16, 16) and decoded[-1] == (2, 4, 8, 8)
    model, _, _ = sample.load_model("models/dit/ema_ckpt.pt")
    with torch.no_grad():  # the FLOPs of the network on its (4, 8, 8) latents, not on 16 px
        flops = count_flops(lambda: model(torch.zeros(1, 4, 8, 8), torch.tensor([500]), torch.tensor([0])))
    assert compare.gflops_per_image("models/dit/ema_ckpt.pt") == round(flops / 1e9, 4)
    ddpm_conditional.main(class_argv(vae, "rgb", dataset="imagefolder", dataset_path="grey", dataset_size=None,
                                     cache_latents="true", channels=3))
    assert len(os.listdir("cache")) == 2  # the RGB images of the same folder have a cache of their own


# ----------------------------------------------------------------------------- bad input: one line, exit 2

def fails(capsys, argv):
    """The one stderr line of ddpm_conditional.py's exit 2 on `argv`."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(ddpm_conditional.main, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    return err


def test_a_folder_that_is_not_a_diffusers_vae(tmp_path, monkeypatch, capsys):
    from diffusers import UNet2DModel

    monkeypatch.chdir(tmp_path)
    UNet2DModel(sample_size=8, block_out_channels=(8, 8), down_block_types=("DownBlock2D",) * 2,
                up_block_types=("UpBlock2D",) * 2, norm_num_groups=4, layers_per_block=1).save_pretrained("unet")
    os.makedirs("empty")
    for folder, found in (("unet", "its config.json is a UNet2DModel's"), ("empty", "it holds no config.json")):
        err = fails(capsys, class_argv(folder))
        assert f"--vae '{folder}' is not a diffusers VAE folder ({found}" in err and "train_vae.py" in err
    assert not os.path.exists("models/run")  # refused before training


def test_an_image_size_the_vae_and_the_unet_cannot_divide(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    vae = write_tiny_vae(tmp_path / "vae")
    err = fails(capsys, class_argv(vae, image_size=24))
    assert "image_size 24 is not divisible by 16: the VAE shrinks it 2x and the U-Net halves it 3 times" in err


def test_a_vae_without_a_scaling_factor_names_train_vae(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    vae = write_tiny_vae(tmp_path / "vae")
    config_file = os.path.join(vae, "config.json")
    with open(config_file) as f:
        config = json.load(f)
    del config["scaling_factor"]
    with open(config_file, "w") as f:
        json.dump(config, f)
    err = fails(capsys, class_argv(vae))
    assert "has no scaling_factor in its config.json" in err and "train_vae.py" in err


def test_resume_refuses_another_vae(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    vae = write_tiny_vae(tmp_path / "vae", seed=0)
    ddpm_conditional.main(class_argv(vae, max_steps=1))
    with pytest.raises(UsageError, match="different config: vae"):
        ddpm_conditional.main(class_argv(write_tiny_vae(tmp_path / "other"), max_steps=2) + ["--resume"])
    write_tiny_vae(tmp_path / "vae", seed=1)  # retrained into the same folder: the same --vae, other latents
    with pytest.raises(UsageError, match="--resume with another VAE: --vae .* is not the VAE this run began on"):
        ddpm_conditional.main(class_argv(vae, max_steps=2) + ["--resume"])
    write_tiny_vae(tmp_path / "vae", seed=0)
    assert ddpm_conditional.main(class_argv(vae, max_steps=2) + ["--resume"])["step"] == 2
