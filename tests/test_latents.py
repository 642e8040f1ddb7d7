"""Tests for latents.py: loading and checking a VAE, its scaled latents, the CLIP text encoder and the states of
each caption, the latent cache, the tiny offline models, and the class-conditional scripts in latents."""
import json
import os
import warnings

import pytest
import torch

import data
import ddpm_conditional
import latents
from checkpoints import load_model
from conftest import write_tiny_vae
from utils import UsageError, load_checkpoint, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def class_argv(vae, run_name="run", **overrides):
    """ddpm_conditional.py flags of a seconds-long run on shapes at 16 px in the latents of `vae` (a value None
    leaves its flag out)."""
    values = {"vae": vae, "dataset": "shapes", "dataset_size": 40, "image_size": 16, "base_channels": 8,
              "noise_steps": 200, "batch_size": 8, "max_steps": 2, "n_per_row": 1, "sample_steps": 2,
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


def test_grey_images_through_an_rgb_vae_and_in_pixel_space(tiny_sd_models):
    """Grey images are repeated to the VAE's 3 input channels and its decodings averaged back to grey."""
    space = latents.load_latents(tiny_sd_models["vae"], "cpu", None, 1)
    grey = torch.rand(2, 1, 16, 16) * 2 - 1
    mean, _ = space.encode(grey)
    torch.testing.assert_close(mean, space.encode(grey.repeat(1, 3, 1, 1))[0])
    decoded = space.decode(mean)
    assert decoded.shape == (2, 1, 16, 16)
    with torch.no_grad():
        rgb = space.vae.decode(mean / space.scale + space.shift).sample  # (2, 3, 16, 16)
    torch.testing.assert_close(decoded, rgb.mean(dim=1, keepdim=True).clamp(-1, 1))
    pixels = latents.load_latents("none", "cpu", None, 1)
    assert pixels.channels == 1 and pixels.decode(grey).shape == (2, 1, 16, 16)


# ----------------------------------------------------------------------------- the text encoder

@pytest.mark.parametrize("conditioning, context_shape", [("cross_attention", (2, 16, 32)), ("add", (2, 32))])
def test_the_text_encoder_is_frozen_and_gives_token_states_or_the_pooled_embedding(tiny_sd_models, conditioning,
                                                                                   context_shape):
    text = latents.load_text_encoder(tiny_sd_models["text_encoder"], conditioning, "cpu")
    assert not text.model.training and not any(p.requires_grad for p in text.model.parameters())
    assert text.dim == 32 and text.conditioning == conditioning
    ids = text.tokenize(["a red circle", ""])
    assert ids.shape == (2, 16) and ids[1, 1] == text.tokenizer.eos_token_id
    context = text(["a red circle", "a blue triangle"])
    assert context.shape == context_shape and not torch.allclose(context[0], context[1])
    with torch.no_grad():
        out = text.model(input_ids=ids[:1])
    expected = out.last_hidden_state if conditioning == "cross_attention" else out.pooler_output
    torch.testing.assert_close(text(["a red circle"]), expected)


def test_the_text_encoder_runs_in_the_training_precision_and_gives_float32_states(tiny_sd_models):
    text = latents.load_text_encoder(tiny_sd_models["text_encoder"], "cross_attention", "cpu", "bf16")
    assert next(text.model.parameters()).dtype == torch.bfloat16
    assert text(["a red circle"]).dtype == torch.float32
    plain = latents.load_text_encoder(tiny_sd_models["text_encoder"], "cross_attention", "cpu", "no")
    assert next(plain.model.parameters()).dtype == torch.float32


def test_too_long_prompt_is_truncated_with_a_warning(tiny_sd_models):
    text = latents.load_text_encoder(tiny_sd_models["text_encoder"], "cross_attention")
    with pytest.warns(UserWarning, match="truncated"):
        ids = text.tokenize(["a red circle and a blue triangle " * 5])
    assert ids.shape == (1, 16) and ids[0, -1] == text.tokenizer.eos_token_id
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        text.tokenize(["a red circle"])


def test_each_distinct_caption_is_encoded_once():
    class CountingText:
        def __init__(self):
            self.encoded = []

        def __call__(self, captions):
            self.encoded += captions
            return torch.tensor([[float(len(c)), float(c.count("a"))] for c in captions])

    text = CountingText()
    states = latents.CaptionStates(text, limit=3)
    first = states(["a red circle", "", "a red circle", "a blue bar"])
    assert text.encoded == ["a red circle", "", "a blue bar"]
    assert torch.equal(first, CountingText()(["a red circle", "", "a red circle", "a blue bar"]))
    again = states(["a blue bar", "", "a gray plus", "a gray plus"])  # beyond the limit of 3: encoded, not kept
    assert text.encoded[3:] == ["a gray plus"] and again.shape == (4, 2)
    states(["a gray plus"])
    assert text.encoded[4:] == ["a gray plus"]


def test_unloadable_models_are_one_line_errors(tiny_sd_models, monkeypatch):
    """Offline, a missing model fails at once: no connection is tried, and no loader is retried (a missing local
    folder is refused before any loader runs)."""
    import socket

    import huggingface_hub.constants
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    connections, loads = [], []

    def no_network(*args, **kwargs):
        connections.append(args)
        raise OSError("no network in this test")

    def counted(cls):
        load = cls.from_pretrained

        def from_pretrained(name, *args, **kwargs):
            loads.append((cls.__name__, name))
            return load(name, *args, **kwargs)
        return from_pretrained

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    for cls in (AutoencoderKL, CLIPTokenizer, CLIPTextModel):
        monkeypatch.setattr(cls, "from_pretrained", counted(cls))

    def load_fails(load):
        loads.clear()
        with pytest.raises(UsageError, match="could not load .*downloaded once with internet access") as info:
            load()
        assert "\n" not in str(info.value) and connections == []
        return loads

    assert load_fails(lambda: latents.load_latents("./no/such/vae", "cpu")) == []
    tried = load_fails(lambda: latents.load_text_encoder("nobody-xyz/no-such-clip", "cross_attention", "cpu"))
    assert ("CLIPTextModel", "nobody-xyz/no-such-clip") in tried and len(set(tried)) == len(tried), tried


# ----------------------------------------------------------------------------- the tiny offline models

def test_the_tiny_models_are_a_factor_2_vae_and_a_clip_that_reads_each_caption_word_as_one_token(tiny_sd_models):
    """make_tiny_models (tests/conftest.py runs it once a session): a random AutoencoderKL of factor 2 with 4 latent
    channels, and a CLIP of width 32 over 16 tokens whose vocabulary holds each word of the shapes captions."""
    space = latents.load_latents(tiny_sd_models["vae"], "cpu")
    assert (space.channels, space.factor) == (4, 2) and list(space.vae.config.block_out_channels) == [8, 16]
    assert not space.vae.training and not any(p.requires_grad for p in space.vae.parameters())
    text = latents.load_text_encoder(tiny_sd_models["text_encoder"], "cross_attention")
    assert (text.dim, text.tokenizer.model_max_length) == (32, 16)
    captions = data.all_shape_captions() + [f"a photo of a {name}" for name in data.SHAPE_NAMES]
    for caption in captions:
        assert len(text.tokenizer.tokenize(caption)) == len(caption.split()), caption
    states = text(captions).flatten(1)
    assert torch.cdist(states, states).add(torch.eye(len(captions))).min() > 0  # distinct captions, distinct states


# ----------------------------------------------------------------------------- the latent cache

def test_the_cache_key_changes_with_every_field_and_the_cache_version(monkeypatch):
    fields = {"vae": "v", "image_size": 16, "seed": 0, "holdout": ["a red circle"]}
    key = latents.cache_key(**fields)
    assert key == latents.cache_key(**dict(reversed(fields.items()))) and len(key) == 16  # not the order given
    changed = [latents.cache_key(**{**fields, name: value}) for name, value in
               (("vae", "w"), ("image_size", 32), ("seed", 1), ("holdout", []))]
    assert len({key, *changed, latents.cache_key(**fields, channels=1)}) == 6
    monkeypatch.setattr(latents, "CACHE_VERSION", latents.CACHE_VERSION + 1)
    assert latents.cache_key(**fields) != key  # a new layout: old files are never read


def fake_encoders(log):
    """(encode_images, encode_prompts) that record their inputs: mean 2 x, std 0.5; a caption's state is its
    length and its count of 'a'."""
    def encode_images(images):
        log.append(len(images))
        return 2 * images, torch.full_like(images, 0.5)

    def encode_prompts(captions):
        log.append(list(captions))
        return torch.tensor([[float(len(c)), float(c.count("a"))] for c in captions])

    return encode_images, encode_prompts


def captioned(n=7):
    """n items (image (1, 2, 2) filled with i, caption): three captions, repeating."""
    names = ["a red circle", "a blue bar", "a gray plus"]
    return [(torch.full((1, 2, 2), float(i)), names[i % 3]) for i in range(n)]


def test_build_cache_encodes_every_image_once_and_each_distinct_caption_once():
    log = []
    encode_images, encode_prompts = fake_encoders(log)
    items = captioned()
    cache = latents.build_cache(items, encode_images, encode_prompts, batch_size=2)
    encoded = list(log)
    images = torch.stack([image for image, _ in items])
    assert torch.equal(cache["mean"], 2 * images) and torch.equal(cache["std"], torch.full_like(images, 0.5))
    assert cache["captions"] == ["a red circle", "a blue bar", "a gray plus"]  # in the order first seen
    assert cache["caption_index"].dtype == torch.long
    assert [cache["captions"][i] for i in cache["caption_index"]] == [caption for _, caption in items]
    assert torch.equal(cache["contexts"], fake_encoders([])[1](cache["captions"]))
    assert [entry for entry in encoded if isinstance(entry, int)] == [2, 2, 2, 1]  # the images in batches of 2
    assert [entry for entry in encoded if isinstance(entry, list)] == [cache["captions"][:2], cache["captions"][2:]]
    labelled = latents.build_cache([(image, i % 4) for i, (image, _) in enumerate(items)], encode_images, None, 3)
    assert set(labelled) == {"mean", "std", "label"} and labelled["label"].dtype == torch.long
    assert labelled["label"].tolist() == [i % 4 for i in range(7)] and torch.equal(labelled["mean"], 2 * images)


def test_the_cache_is_built_once_then_read_and_an_unreadable_file_is_rebuilt(tmp_path):
    log = []
    encode_images, encode_prompts = fake_encoders(log)
    path = str(tmp_path / "cache.pt")
    built, hit = latents.load_or_build_cache(path, captioned(), encode_images, encode_prompts, 4)
    assert not hit and os.path.isfile(path) and log
    log.clear()
    read, hit = latents.load_or_build_cache(path, captioned(), encode_images, encode_prompts, 4)
    assert hit and log == []  # nothing encoded
    assert read["captions"] == built["captions"] and all(torch.equal(read[k], built[k]) for k in
                                                         ("mean", "std", "contexts", "caption_index"))
    with open(path, "wb") as f:
        f.write(b"not a checkpoint")
    with pytest.warns(UserWarning, match="re-encoding the unreadable latent cache"):
        rebuilt, hit = latents.load_or_build_cache(path, captioned(), encode_images, encode_prompts, 4)
    assert not hit and log and torch.equal(rebuilt["mean"], built["mean"])
    assert torch.equal(load_checkpoint(path)["mean"], built["mean"])  # written again, whole


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
    ddpm.main(class_argv(vae, "uncond", n_per_row=None, n_samples=2))
    assert decoded == [(2, 4, 8, 8)] * 2  # the last epoch's grids of the weights and of the EMA
    images = sample.main(["--ckpt", "models/uncond/ema_ckpt.pt", "--n_samples", "3", "--sampler", "ddim", "--steps",
                          "2", "--out", "grid.png", "--device", "cpu"])
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
    from utils import count_flops

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
    images = sample.main(["--ckpt", "models/dit/ema_ckpt.pt", "--n_per_row", "1", "--sampler", "ddim", "--steps",
                          "2", "--out", "grid.png", "--device", "cpu"])
    assert images.shape == (2, 1, 16, 16) and decoded[-1] == (2, 4, 8, 8)
    model, _, _ = load_model("models/dit/ema_ckpt.pt")
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
