"""Tests for train_sd.py: the real code on a tiny random VAE and CLIP, built offline."""

import dataclasses
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data  # noqa: E402
import train_sd  # noqa: E402
from checkpoints import load_model, read_checkpoint, run_diffusion  # noqa: E402
from config import network_arch  # noqa: E402
from conftest import assert_same_state  # noqa: E402
from data import classify_colors  # noqa: E402
from diffusion import dropped_rows  # noqa: E402
from latents import load_latents, load_text_encoder  # noqa: E402
from modules import DoubleConv, UNet, build_network  # noqa: E402
from utils import UsageError, parse_config, run_cli  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "train_sd.py")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="session")
def tiny(tiny_sd_models):
    """The tiny random VAE and CLIP of tests/conftest.py."""
    return tiny_sd_models


def tiny_argv(tiny, run_name="run", **overrides):
    """Flags of a seconds-long run on shapes at 16 px (8 px latents) with the tiny models."""
    values = {"dataset": "shapes", "dataset_size": 32, "image_size": 16, "base_channels": 8, "batch_size": 8,
              "max_steps": 2, "n_per_row": 1, "sample_steps": 2, "num_workers": 0, "device": "cpu",
              "run_name": run_name, "cache_dir": "cache", **tiny, **overrides}
    return [item for key, value in values.items() for item in (f"--{key}", str(value))]


def tiny_cfg(tiny, **overrides):
    return parse_config(train_sd.Config, tiny_argv(tiny, **overrides))


def frozen(cfg, device="cpu"):
    """(Latents, TextEncoder) of a Config, loaded as text_task loads them."""
    return (load_latents(cfg.vae, device, cfg.mixed_precision, cfg.channels or 3),
            load_text_encoder(cfg.text_encoder, cfg.conditioning, device, cfg.mixed_precision))


def text_network(cfg, latents, text):
    """The network text_task builds for a Config: its arch on the latent channels, reading the text's states."""
    return build_network(network_arch(cfg, latents.channels, context_dim=text.dim))


# ----------------------------------------------------------------------------- stages and shapes

@pytest.mark.parametrize("conditioning, context_shape", [("cross_attention", (2, 16, 32)), ("add", (2, 32))])
def test_shapes_through_every_stage(tiny, conditioning, context_shape):
    """The tiny VAE's latents, the text's states (tests/test_latents.py tests both), the network and the diffusion
    of a Config."""
    cfg = tiny_cfg(tiny, conditioning=conditioning)
    latents, text = frozen(cfg)
    context = text(["a red circle", "a blue triangle"])
    assert context.shape == context_shape and not torch.allclose(context[0], context[1])
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    mean, std = latents.encode(images)
    assert mean.shape == std.shape == (2, 4, 8, 8) and latents.factor == 2
    net = text_network(cfg, latents, text)
    assert type(net).__name__ == "UNet_text" and net.conditioning == conditioning
    eps = net(mean, torch.tensor([1, 500]), context)
    assert eps.shape == (2, 4, 8, 8)
    assert latents.decode(mean).shape == (2, 3, 16, 16)
    diffusion = run_diffusion(cfg, latents, "cpu")
    assert (diffusion.image_size, diffusion.c_in) == (8, 4)


def test_pixel_space_and_image_size_check(tiny):
    cfg = tiny_cfg(tiny, vae="none")
    latents, _ = frozen(cfg)
    assert (latents.channels, latents.factor) == (3, 1)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    mean, std = latents.encode(images)
    assert torch.equal(mean, images) and not std.any() and torch.equal(latents.decode(mean), images)
    assert run_diffusion(cfg, latents, "cpu").image_size == 16  # pixel space: the images' own size
    vae_latents, _ = frozen(tiny_cfg(tiny))
    with pytest.raises(UsageError, match="not divisible by 16"):
        run_diffusion(tiny_cfg(tiny, image_size=24), vae_latents, "cpu")
    # clip_x0 None clips the predicted x_0 in pixel space only; a VAE's latents have no [-1, 1] range
    assert run_diffusion(cfg, latents, "cpu").clip_x0 is True
    assert run_diffusion(tiny_cfg(tiny), vae_latents, "cpu").clip_x0 is False
    assert run_diffusion(tiny_cfg(tiny, vae="none", clip_x0=False), latents, "cpu").clip_x0 is False


def test_prompt_figures_judge_colour_and_shape_for_seen_and_held_out_prompts(tiny, monkeypatch, capsys):
    class Judge:  # says "ring" (5) for the samples with a faint marker pixel in the corner, else "circle" (0)
        heldout_accuracy, path = 1.0, "judge.pt"

        def predict(self, images):
            return torch.where(images[:, 0, 0, 0] > 5, 5, 0)

    monkeypatch.setattr(train_sd, "get_judge", lambda *args, **kwargs: Judge())
    cfg = dataclasses.replace(tiny_cfg(tiny), prompt=["a red circle", "A cyan ring"], n_per_row=2,
                              holdout_prompts=["a cyan ring"])
    red, cyan = (torch.tensor(data.SHAPE_COLORS[c], dtype=torch.float32)[:, None, None] / 127.5 - 1 for c in (0, 5))
    images = -torch.ones(4, 3, 16, 16)
    images[:, :, 4:12, 4:12] = torch.stack([red, red, red, cyan])  # colours: red, red | red (wrong), cyan
    images[3, 0, 0, 0] = -0.9  # shapes: circle, circle | circle (wrong), ring
    requested = train_sd.judged_attributes(cfg)
    assert [r.tolist() for r in requested] == [[0, 0, 5, 5], [0, 0, 5, 5], [False, False, True, True]]
    figures = train_sd.prompt_figures(cfg, images, *requested, "cpu")
    assert figures["seen"] == {"color_acc": 1.0, "shape_acc": 1.0, "prompt_acc": 1.0, "n": 2}
    # held out: (red, circle) and (cyan, ring) asked for (cyan, ring): colour 1/2, shape 1/2, both 1/2
    assert figures["held-out"] == {"color_acc": 0.5, "shape_acc": 0.5, "prompt_acc": 0.5, "n": 2}
    assert figures["color_judge_accuracy"] >= 0.98 and figures["shape_judge_heldout_accuracy"] == 1.0
    out = capsys.readouterr().out
    assert "held-out" in out and "prompt_acc" in out and "judges on real images" in out
    with pytest.raises(UsageError, match="prompt 'a photo of a cat' names no colour and shape"):
        train_sd.judged_attributes(dataclasses.replace(cfg, prompt=["a photo of a cat", "a red circle"]))
    with pytest.raises(UsageError, match="--judge needs a run on the built-in shapes"):
        train_sd.judged_attributes(dataclasses.replace(cfg, dataset="cifar10"))


def test_held_out_prompts_never_occur_in_a_training_epoch(tiny, tmp_path, monkeypatch):
    """The demo preset's held-out pairs: every colour and every shape is held out twice, and no batch of the
    cache or of the uncached path (the frozen text encoder's input) holds one of them."""
    import json

    monkeypatch.chdir(tmp_path)
    preset = json.loads(open(os.path.join(ROOT, "configs", "sd_quick_cpu.json")).read())
    holdout = preset["holdout_prompts"]
    pairs = [data.parse_shape_caption(c) for c in holdout]
    assert len(set(pairs)) == 20 and None not in pairs
    for column in zip(*pairs):  # colours, then shapes
        assert sorted(column) == sorted(list(range(10)) * 2)
    flags = [item for c in holdout for item in ("--holdout_prompts", c)]
    train_sd.main(tiny_argv(tiny, "cached", vae="none", dataset_size=400, cache_latents=True) + flags)
    (cache_file,) = (tmp_path / "cache").iterdir()
    cache = torch.load(cache_file, weights_only=True)
    assert not set(cache["captions"]) & set(holdout) and len(cache["captions"]) > 50
    assert len(cache["caption_index"]) == 400 - sum(
        data.ShapesDataset(16, size=400).caption(i) in holdout for i in range(400))
    seen = []
    real_batch = train_sd.training_batch

    def recording(batch, *args):
        seen.extend(batch[1])
        return real_batch(batch, *args)

    monkeypatch.setattr(train_sd, "training_batch", recording)
    train_sd.main(tiny_argv(tiny, "uncached", vae="none", dataset_size=400, batch_size=40, max_steps=10) + flags)
    assert len(seen) == 400 and not set(seen) & set(holdout)


def test_models_and_data_set_are_loaded_by_the_main_process_first(tiny, monkeypatch):
    """Every process loads the Hub's models and the data set, which download into the same files: main first."""
    from test_training import RecordingAccelerator

    accelerator, opened = RecordingAccelerator(), []
    for name in ("load_latents", "load_text_encoder", "get_caption_dataset"):
        def recording(*args, original=getattr(train_sd, name), **kwargs):
            opened.append(accelerator.inside)
            return original(*args, **kwargs)
        monkeypatch.setattr(train_sd, name, recording)
    train_sd.text_task(tiny_cfg(tiny), accelerator)
    assert opened == [True, True, True]


def test_dropout_reaches_every_block_of_the_text_unet(tiny):
    """--dropout (the Network group's) is the rate of every DoubleConv of the U-Net that text_task trains."""
    from test_training import RecordingAccelerator

    for rate in (0.0, 0.3):
        net = train_sd.text_task(tiny_cfg(tiny, dropout=rate), RecordingAccelerator()).net
        blocks = [block for block in net.modules() if isinstance(block, DoubleConv)]
        assert type(net).__name__ == "UNet_text" and len(blocks) > 10
        assert all(block.dropout == rate for block in blocks)


def test_a_dit_with_dropout_is_refused_with_one_line(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train_sd.main, tiny_argv(tiny, "dit", backbone="dit", dit_size="dit-n", dropout=0.1))
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()  # after the progress bars of loading the text encoder
    assert lines[-1] == "error: dropout is a U-Net option: drop --dropout, or use --backbone unet"
    assert sum("error" in line for line in lines) == 1
    assert not (tmp_path / "models").exists()  # refused before anything is written


def test_make_tiny_models_writes_to_the_folder_given_and_trains_nothing(monkeypatch, capsys):
    """`train_sd.py --make_tiny_models DIR` runs latents.make_tiny_models(DIR) (tests/test_latents.py tests what it
    writes) and returns."""
    calls = []
    monkeypatch.setattr(train_sd, "make_tiny_models", lambda folder: calls.append(folder) or ("V", "T"))
    monkeypatch.setattr(train_sd, "train", lambda *args: pytest.fail("--make_tiny_models trained"))
    assert train_sd.main(["--make_tiny_models", "some/dir"]) is None
    assert calls == ["some/dir"] and capsys.readouterr().out == "wrote V T\n"


# ----------------------------------------------------------------------------- caption dropout and guidance

def test_caption_dropout_rate_on_both_paths():
    torch.manual_seed(0)
    assert abs(dropped_rows(20000, 0.1).float().mean().item() - 0.1) < 0.01

    class FakeText:
        def __call__(self, captions):
            self.captions = captions
            return torch.tensor([[0.0] if c == "" else [1.0] for c in captions])

    class FakeLatents:
        def encode(self, images):
            return images, torch.zeros_like(images)

    text, images = FakeText(), torch.zeros(4000, 1)
    train_sd.training_batch((images, ["a red circle"] * 4000), FakeLatents(), text, None, None, 0.1)
    assert abs(text.captions.count("") / 4000 - 0.1) < 0.02
    contexts, null_context = torch.ones(3, 5, 2), torch.zeros(1, 5, 2)
    index = torch.randint(0, 3, (4000,))
    x_0, context = train_sd.training_batch((images, images, index), None, None, contexts, null_context, 0.1)
    dropped = (context == 0).all(dim=(1, 2))
    assert context.shape == (4000, 5, 2) and (context[~dropped] == 1).all()
    assert abs(dropped.float().mean().item() - 0.1) < 0.02 and torch.equal(x_0, images)


class Counting(torch.nn.Module):
    """Wraps a network and records the batch size of each forward call."""

    def __init__(self, net):
        super().__init__()
        self.net, self.rows = net, []

    def forward(self, x, t, context):
        self.rows.append(x.shape[0])
        return self.net(x, t, context)


def test_guidance_is_one_batched_pass_with_the_empty_prompt(tiny, tmp_path):
    cfg = tiny_cfg(tiny, n_per_row=3, sample_steps=4, cfg_scale=7.5)
    latents, text = frozen(cfg)
    torch.manual_seed(0)
    net = Counting(text_network(cfg, latents, text)).eval()
    diffusion = run_diffusion(cfg, latents, "cpu")
    prompts = ["a red circle", "a blue triangle"]
    images = train_sd.sample_grid(cfg, diffusion, net, latents, text, prompts, str(tmp_path / "grid.png"))
    assert images.shape == (6, 3, 16, 16) and os.path.isfile(tmp_path / "grid.png")
    assert net.rows == [12] * 4  # one pass of 2 x 6 rows per step

    context = text(prompts).repeat_interleave(3, dim=0)
    null_context = text([""]).expand_as(context)
    x_t, t = torch.randn(6, 4, 8, 8), torch.full((6,), 300)
    net.rows.clear()
    with torch.no_grad():
        guided = diffusion.predict_eps(net, x_t, t, context, null_context, cfg_scale=7.5)
        eps_cond, eps_uncond = net(x_t, t, context), net(x_t, t, null_context)
    assert net.rows == [12, 6, 6]
    torch.testing.assert_close(guided, torch.lerp(eps_uncond, eps_cond, 7.5), atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- runs: cache, resume, CLI

def test_cache_hit_skips_the_vae_and_any_change_re_encodes(tiny, tmp_path, monkeypatch, encoded):
    monkeypatch.chdir(tmp_path)
    train_sd.main(tiny_argv(tiny, "cached", cache_latents=True))
    assert sum(shape[0] for shape in encoded) == 32 and len(os.listdir("cache")) == 1  # each image once, then the cache
    cache = torch.load(os.path.join("cache", os.listdir("cache")[0]), weights_only=True)
    distinct = len({data.ShapesDataset(16, size=32).caption(i) for i in range(32)})  # each caption stored once
    assert cache["mean"].shape == (32, 4, 8, 8) and len(cache["captions"]) == distinct < 32
    assert cache["contexts"].shape == (distinct, 16, 32) and cache["caption_index"].shape == (32,)
    encoded.clear()
    train_sd.main(tiny_argv(tiny, "cached", cache_latents=True) + ["--overwrite"])
    assert encoded == [] and len(os.listdir("cache")) == 1  # hit: the VAE encoder never ran
    train_sd.main(tiny_argv(tiny, "cached32", cache_latents=True, image_size=32))
    assert sum(shape[0] for shape in encoded) == 32 and len(os.listdir("cache")) == 2  # new image_size: re-encoded

    cfg = tiny_cfg(tiny, cache_latents=True)
    dataset = data.get_caption_dataset("shapes", "", 16, size=32)
    keys = {train_sd.cache_path(c, dataset) for c in
            (cfg, tiny_cfg(tiny, vae=tiny["vae"] + "_copy"), tiny_cfg(tiny, conditioning="add"),
             tiny_cfg(tiny, seed=1), tiny_cfg(tiny, cache_latents=True),
             tiny_cfg(tiny, holdout_prompts=["a red circle"]))}
    assert len(keys) == 5


@pytest.mark.parametrize("cache_latents", ["true", "false"])
def test_data_on_the_device_trains_exactly_as_the_dataloader(tiny, tmp_path, monkeypatch, cache_latents):
    """The latent cache (the preset sd_quick_cpu) or the captioned images, held on the device: the same losses.
    (Each run builds its own cache: building draws from the global RNG before the U-Net is initialised.)"""
    monkeypatch.chdir(tmp_path)
    losses = [train_sd.main(tiny_argv(tiny, f"on_{on}", cache_latents=cache_latents, max_steps=3, data_on_device=on,
                                      cache_dir=f"cache_{on}"))["losses"] for on in ("false", "true")]
    assert losses[0] == losses[1] and len(losses[0]) == 3


def test_resume_continues_step_and_optimizer(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = train_sd.main(tiny_argv(tiny, "resumed", max_steps=2))
    state_2 = torch.load("models/resumed/training_state.pt", weights_only=True)
    assert first["step"] == 2 and state_2["step"] == 2
    with pytest.raises(UsageError, match="already holds a run"):
        train_sd.main(tiny_argv(tiny, "resumed", max_steps=4))
    with pytest.raises(UsageError, match="different config: lr"):
        train_sd.main(tiny_argv(tiny, "resumed", max_steps=4, lr=1e-3) + ["--resume"])
    second = train_sd.main(tiny_argv(tiny, "resumed", max_steps=4) + ["--resume"])
    state_4 = torch.load("models/resumed/training_state.pt", weights_only=True)
    assert second["step"] == 4 and state_4["step"] == 4
    assert second["losses"][:2] == state_2["losses"] and len(second["losses"]) == 4
    adam_steps = {float(s["step"]) for s in state_4["optimizer"]["state"].values()}
    assert adam_steps == {4.0}  # AdamW's moments carried on from step 2
    assert state_4["ema_state"]["step"] == 4
    train_sd.main(tiny_argv(tiny, "whole", max_steps=4))
    assert_same_state(state_4, torch.load("models/whole/training_state.pt", weights_only=True))


def run_script(args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300, check=False)


def test_cli_trains_then_samples_a_captioned_grid(tiny, tmp_path):
    done = run_script(tiny_argv(tiny, "cli", conditioning="add"), tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ("ckpt.pt", "ema_ckpt.pt", "training_state.pt", "config.json"):
        assert (tmp_path / "models" / "cli" / name).is_file()
    for name in ("0.jpg", "0_ema.jpg", "loss.png", "config.json"):
        assert (tmp_path / "results" / "cli" / name).is_file()
    args = ["--sample", "--ckpt", "models/cli/ema_ckpt.pt", "--prompt", "a red circle", "--prompt",
            "a blue triangle", "--cfg_scale", "7.5", "--n_per_row", "2", "--sample_steps", "2", "--out", "grid.png"]
    done = run_script(args, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    with Image.open(tmp_path / "grid.png") as grid:
        pixels = np.asarray(grid.convert("L"))
    strip, row = 14, 66  # each prompt's caption strip, then its row: top padding and 2 images of 16 px shown at 64
    assert pixels.shape == (2 * (strip + row) + 2, 2 * 66 + 2)
    for top in (0, strip + row):
        assert (pixels[top:top + strip] < 128).any() and (pixels[top:top + strip] == 255).mean() > 0.5  # dark text
        assert (pixels[top + strip:top + strip + 2] == 0).all()  # the row's black top padding


@pytest.mark.parametrize("conditioning", ["cross_attention", "add"])
def test_backbone_dit_trains_on_latents_and_samples_from_its_checkpoint(tiny, tmp_path, monkeypatch, conditioning):
    """--backbone dit: DiT_text on the tiny VAE's 8 px latents (patch size 2: 16 tokens), through the one loop;
    --sample rebuilds it from the saved config, and the prompt reaches the prediction."""
    from modules import DiT_text

    monkeypatch.chdir(tmp_path)
    train_sd.main(tiny_argv(tiny, "dit", backbone="dit", dit_size="dit-n", patch_size=2, conditioning=conditioning,
                            max_steps=2))
    loaded, arch, saved = load_model("models/dit/ema_ckpt.pt")
    cfg = train_sd.run_config("models/dit/ema_ckpt.pt", saved)
    assert (cfg.backbone, cfg.dit_size, cfg.patch_size) == ("dit", "dit-n", 2)
    assert type(loaded) is DiT_text and arch["context_dim"] == 32 and arch["conditioning"] == conditioning
    latents, text = frozen(cfg)
    net = text_network(cfg, latents, text)
    assert type(net) is DiT_text and net.conditioning == conditioning
    assert (net.patch_embed.in_features, net.out.out_features) == (2 * 2 * 4, 2 * 2 * 4)  # 4 latent channels
    net.load_state_dict(loaded.state_dict())  # strict: the network the saved Config builds holds the weights
    with torch.no_grad():
        for p in net.parameters():  # move the zero-initialised weights, as a longer run would
            if not p.any():
                p.normal_(0, 0.1)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 700])
    context = text(["a red circle", "a red circle"])
    with torch.no_grad():
        assert not torch.allclose(net(x, t, context), net(x, t, text(["a blue square", "a blue square"])))
    images = train_sd.main(["--sample", "--ckpt", "models/dit/ema_ckpt.pt", "--prompt", "a red circle",
                            "--n_per_row", "2", "--sample_steps", "2", "--out", "grid.png"])
    assert images == "grid.png" and (tmp_path / "grid.png").is_file()


def test_sample_keeps_the_runs_sampling_fields_unless_given(tiny, tmp_path, monkeypatch):
    """--sample without --cfg_scale guides as the run was set to, not at the field's default (7.5)."""
    monkeypatch.chdir(tmp_path)
    train_sd.main(tiny_argv(tiny, "keep", max_steps=1, cfg_scale=2.5, sampler="ddim", prompt="a red circle"))
    used = []
    monkeypatch.setattr(train_sd, "sample_grid", lambda cfg, *args: used.append(cfg) or torch.zeros(1, 3, 16, 16))
    train_sd.main(["--sample", "--ckpt", "models/keep/ema_ckpt.pt"])
    train_sd.main(["--sample", "--ckpt", "models/keep/ema_ckpt.pt", "--cfg_scale", "6", "--prompt", "a blue ring"])
    assert [(c.cfg_scale, c.sampler, c.prompt) for c in used] == [(2.5, "ddim", ["a red circle"]),
                                                                   (6.0, "ddim", ["a blue ring"])]


# ----------------------------------------------------------------------------- bad inputs

def test_sample_errors(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    train_sd.main(tiny_argv(tiny, "arch", max_steps=1))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train_sd.main, ["--sample", "--ckpt", "models/arch/ema_ckpt.pt"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: --sample needs at least one --prompt")
    with pytest.raises(UsageError, match="checkpoint 'models/none.pt' not found"):
        train_sd.main(["--sample", "--ckpt", "models/none.pt", "--prompt", "a red circle"])
    out = train_sd.main(["--sample", "--ckpt", "models/arch/training_state.pt", "--prompt", "a red circle",
                         "--n_per_row", "1", "--sample_steps", "1"])
    assert out == os.path.join("results", "arch", "samples.png") and os.path.isfile(out)
    torch.save(UNet(base_channels=8).state_dict(), "models/arch/ema_ckpt.pt")  # no text weights
    with pytest.raises(UsageError, match=r"'models/arch/ema_ckpt\.pt' does not fit a train_sd\.py network: it has no "
                                         r"text_proj or cross-attention weights"):
        train_sd.main(["--sample", "--ckpt", "models/arch/ema_ckpt.pt", "--prompt", "a red circle"])


def test_a_config_saved_before_the_new_fields_still_loads(tmp_path, capsys):
    """config.json of a run saved before a Config field existed reads as if the run used its default; one saved (or
    a --config file) under the old name n_per_prompt reads as n_per_row; another script's config is refused."""
    import json

    ckpt = str(tmp_path / "ema_ckpt.pt")

    def run_config_of(saved):
        (tmp_path / "config.json").write_text(json.dumps(saved))
        return train_sd.run_config(ckpt, read_checkpoint(ckpt)[1])  # the config beside the checkpoint

    saved = dataclasses.asdict(train_sd.Config(run_name="old"))
    for name in ("gradient_accumulation_steps", "checkpoint_every", "keep_checkpoints", "max_nonfinite", "print_every",
                 "dropout", "channels_last"):
        del saved[name]
    torch.save({"w": torch.zeros(1)}, ckpt)
    cfg = run_config_of(saved)
    assert cfg.run_name == "old" and cfg.checkpoint_every == train_sd.Config().checkpoint_every
    assert (cfg.dropout, cfg.channels_last) == (train_sd.Config().dropout, train_sd.Config().channels_last)
    renamed = {**{key: value for key, value in saved.items() if key != "n_per_row"}, "n_per_prompt": 5}
    cfg = run_config_of(renamed)  # saved before n_per_prompt became n_per_row
    assert cfg.n_per_row == 5 and cfg.run_name == "old"
    (tmp_path / "preset.json").write_text(json.dumps({"n_per_prompt": 3, "cfg_scale": 2.0}))
    capsys.readouterr()
    cfg = parse_config(train_sd.Config, ["--config", str(tmp_path / "preset.json")])
    assert (cfg.n_per_row, cfg.cfg_scale) == (3, 2.0)
    assert "n_per_prompt is now n_per_row; the old name still works" in capsys.readouterr().err
    with pytest.raises(UsageError, match=r"was not written by train_sd.py \(keys differ: \['task'\]\)"):
        run_config_of({**saved, "task": "superres"})  # ddpm_img2img.py's field
    without_text = {key: value for key, value in saved.items() if key != "text_encoder"}
    with pytest.raises(UsageError, match=r"was not written by train_sd.py \(it names no text_encoder and prompt\)"):
        run_config_of(without_text)


# ----------------------------------------------------------------------------- learning

def test_learns_the_prompted_colour(tiny, tmp_path, monkeypatch):
    """Pixel space at 8 px with the tiny random CLIP: the colour word of the prompt must win far above chance (0.1).

    Colour and shape are independent in the data, so the colour can only come from reading the colour word. The
    shape is not asserted here: at 8 px and 600 steps it stays near chance; configs/sd_quick_cpu.json measures it
    (README). About 2 minutes on 2 busy CPU cores; measured 0.81 (100 samples, seed 0).
    """
    monkeypatch.chdir(tmp_path)
    overrides = {"vae": "none", "image_size": 8, "dataset_size": 2000, "base_channels": 16, "batch_size": 32,
                 "max_steps": 600, "lr": 2e-3, "ema_beta": 0.99, "min_snr_gamma": 5.0, "log_every": 1000,
                 "epochs": 1000, "cache_latents": True, "cfg_scale": 3.0}
    start = time.time()
    train_sd.main(tiny_argv(tiny, "learn", **overrides))
    seconds = time.time() - start
    cfg = tiny_cfg(tiny, **{**overrides, "n_per_row": 10, "sample_steps": 20})
    latents, text = frozen(cfg)
    net = text_network(cfg, latents, text)
    net.load_state_dict(torch.load("models/learn/ema_ckpt.pt", weights_only=True))
    prompts = [data.shape_caption(c, (3 * c) % 10) for c in range(10)]  # every colour once
    diffusion = run_diffusion(cfg, latents, "cpu")
    images = train_sd.sample_grid(cfg, diffusion, net, latents, text, prompts, "learned.png")
    expected = torch.arange(10).repeat_interleave(10)
    accuracy = (classify_colors(images) == expected).float().mean().item()
    print(f"learning test: {seconds:.0f} s of training, colour accuracy {accuracy:.2f} (chance 0.1)")
    assert accuracy >= 0.5
