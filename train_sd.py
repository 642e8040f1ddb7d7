"""Latent text-to-image: a small Stable Diffusion (U-Net or DiT with cross-attention on CLIP token states).

    python train_sd.py                              (CIFAR-10 captions at 128 px in SD's VAE latents: a GPU job)
    python train_sd.py --make_tiny_models data/tiny_sd && python train_sd.py --config configs/sd_quick_cpu.json
    python train_sd.py --sample --ckpt models/SD_text/ema_ckpt.pt --prompt "a photo of a cat" --out cat.png

A frozen VAE (diffusers' AutoencoderKL) maps images to latents, a frozen CLIP text encoder maps captions to
token states, and only the U-Net (or with `--backbone dit` the DiT) trains, with the DDPM loss of ddpm.py on the
scaled latents. Each caption is replaced by "" with probability p_uncond, so one network learns eps(x_t, t, text)
and eps(x_t, t, ""); sampling mixes the two with classifier-free guidance. `--vae none` trains in pixel space.
"""
import dataclasses
import os

import torch
from torch.utils.data import TensorDataset

from checkpoints import is_text_run, load_model, run_diffusion
from config import (Backbone, Channels, Conditional, Conditioning, Data, Latents, Network, Optimisation, Run, Sampling,
                    Schedule, network_arch)
from data import (COLOR_NAMES, SHAPE_NAMES, all_shape_captions, dataset_channels, default_prompts, get_caption_dataset,
                  normalize_caption, parse_shape_caption, without_captions)
from diffusion import broadcast, dropped_rows
from judges import attribute_figures, color_judge_accuracy, get_judge
from latents import (CaptionStates, draw_latents, latent_cache_path, load_latents, load_text_encoder, make_tiny_models,
                     open_cache, vae_digest)
from modules import UNet_text, build_network
from training import RUN_FLAGS, Task, train
from utils import (UsageError, arg, configclass, parse_config, pick_device, run_cli, save_images, save_individual,
                   saved_config)


# ----------------------------------------------------------------------------- hyperparameters
@configclass(Run, Data, Channels, Latents, Backbone, Network, Conditioning, Schedule, Optimisation, Conditional,
             Sampling)
class Config:
    text_encoder: str = arg("openai/clip-vit-large-patch14", "Hub id or folder holding CLIPTextModel + tokenizer")
    prompt: list[str] = arg([], "prompts of the grids and of --sample, one row each (repeat the flag)", resumable=True)
    holdout_prompts: list[str] = arg([], "captions never trained on: their items are left out of every epoch, so "
                                         "sampling them measures composition (repeat the flag)")
    run_name = "SD_text"
    dataset = "cifar10"
    image_size = 128
    vae = "stabilityai/sd-vae-ft-mse"
    conditioning = "cross_attention"
    batch_size = 64
    epochs = 50
    lr = 2e-4
    min_snr_gamma = None
    cfg_scale = 7.5
    log_every = 5

    def validate(self):
        if self.conditioning not in UNet_text.CONDITIONINGS:
            raise UsageError(f"conditioning '{self.conditioning}' is unknown: use cross_attention or add")


SD_FLAGS = RUN_FLAGS + [
    ("--sample", {"action": "store_true", "help": "generate from --ckpt instead of training; the sampling "
                                                  "fields not given keep the run's saved values"}),
    ("--ckpt", {"default": None, "help": "checkpoint for --sample: models/<run>/ema_ckpt.pt or training_state.pt"}),
    ("--out", {"default": None, "help": "grid file of --sample (default results/<run_name>/samples.png)"}),
    ("--make_tiny_models", {"default": None, "metavar": "DIR", "help": "write tiny random VAE and CLIP to DIR"}),
    ("--judge", {"action": "store_true", "help": "with --sample on a shapes run: print the colour, shape and prompt "
                                                 "accuracy of the samples, for the seen and the held-out prompts "
                                                 "(without --prompt: all 100 colour-shape pairs)"}),
    ("--save_individual", {"default": None, "metavar": "DIR", "help": "with --sample: also write each sample as "
                                                                      "DIR/<prompt index>_<i>.png"}),
]
SAMPLING_FIELDS = ("prompt", "cfg_scale", "sampler", "sample_steps", "n_per_row", "seed", "device", "clip_x0")


# ----------------------------------------------------------------------------- data
def training_batch(batch, latents, text, contexts, null_context, p_uncond):
    """(x_0, context) of one batch: a latent sample from the posterior, and the text with captions dropped.

    Without a cache the batch is (images, captions) and both frozen networks run; with one it is
    (mean, std, caption index) and `contexts` holds each distinct caption's states.
    """
    if contexts is None:
        images, captions = batch
        drop = dropped_rows(len(captions), p_uncond).tolist()
        mean, std = latents.encode(images)
        context = text(["" if d else c for c, d in zip(captions, drop)])
    else:
        mean, std, index = batch
        drop = dropped_rows(len(index), p_uncond, index.device)
        context = contexts[index]
        context = torch.where(broadcast(drop, context), null_context, context)
    return draw_latents(mean, std), context


def cache_path(cfg, dataset):
    return latent_cache_path(cfg, dataset, cfg.channels, text_encoder=cfg.text_encoder, conditioning=cfg.conditioning,
                             holdout=sorted(normalize_caption(c) for c in cfg.holdout_prompts))


# ----------------------------------------------------------------------------- grids
def sample_grid(cfg, diffusion, net, latents, text, prompts, path):
    """n_per_row images per prompt, one row each, guided by the empty prompt in one batched pass."""
    context = text(prompts).repeat_interleave(cfg.n_per_row, dim=0)  # (P, ...) -> (P * n, ...)
    null_context = text([""]).expand_as(context)
    x_0 = diffusion.sample_x0(net, len(context), context, cfg.cfg_scale, null_labels=null_context,
                              sampler=cfg.sampler, steps=cfg.sample_steps, seed=cfg.seed)
    images = latents.decode(x_0)
    save_images(images, path, nrow=cfg.n_per_row, captions=list(prompts))
    return images


# ----------------------------------------------------------------------------- training
def text_task(cfg, accelerator):
    """What training.train trains here: captions through the frozen VAE and CLIP, or through their cache."""
    device = accelerator.device
    cfg = dataclasses.replace(cfg, channels=cfg.channels or dataset_channels(cfg.dataset, cfg.dataset_path))
    with accelerator.main_process_first():  # one process downloads (the Hub's models, CIFAR-10); the others read them
        latents = load_latents(cfg.vae, device, cfg.mixed_precision, cfg.channels)
        text = load_text_encoder(cfg.text_encoder, cfg.conditioning, device, cfg.mixed_precision)
        dataset = get_caption_dataset(cfg.dataset, cfg.dataset_path, cfg.image_size, seed=cfg.seed,
                                      size=cfg.dataset_size, channels=cfg.channels)
    diffusion = run_diffusion(cfg, latents, device)
    dataset = without_captions(dataset, cfg.holdout_prompts)  # the held-out prompts never occur in an epoch
    if cfg.holdout_prompts:
        accelerator.print(f"{len(cfg.holdout_prompts)} held-out prompts: training on the other {len(dataset)} items")
    prompts = cfg.prompt or default_prompts(dataset)
    null_context = text([""])
    contexts = None
    if cfg.cache_latents:
        cache = open_cache(accelerator, cache_path(cfg, dataset), dataset, latents, text, cfg.batch_size,
                           cfg.num_workers)
        contexts = cache["contexts"].to(device)
        dataset = TensorDataset(cache["mean"], cache["std"], cache["caption_index"])

    caption_states = CaptionStates(text)  # without the cache, each distinct caption is encoded once

    def make_batch(batch):
        return training_batch(batch, latents, caption_states, contexts, null_context, cfg.p_uncond)

    def draw_grid(module, path):
        sample_grid(cfg, diffusion, module, latents, text, prompts, path)

    net = build_network(network_arch(cfg, latents.channels, context_dim=text.dim))
    return Task(cfg, dataset, net, diffusion, make_batch, draw_grid, vae_digest=vae_digest(cfg.vae))


# ----------------------------------------------------------------------------- sampling
def run_config(ckpt, saved):
    """The Config of a train_sd.py run from its saved config (utils.saved_config: older runs read as today's)."""
    if not is_text_run(saved):
        raise UsageError(f"the config of '{ckpt}' was not written by train_sd.py (it names no text_encoder and "
                         "prompt): pass a train_sd.py checkpoint")
    saved = saved_config(saved, Config)
    names = {field.name for field in dataclasses.fields(Config)}
    if set(saved) != names:
        raise UsageError(f"the config of '{ckpt}' was not written by train_sd.py (keys differ: "
                         f"{sorted(set(saved) ^ names)[:4]}): pass a train_sd.py checkpoint")
    return Config(**saved)


def sample(cfg, flags):
    if not flags.ckpt:
        raise UsageError("--sample needs --ckpt models/<run_name>/ema_ckpt.pt")
    net, arch, saved = load_model(flags.ckpt)
    # each sampling field that the command line or a --config sets wins; the others keep the run's values
    run_cfg = dataclasses.replace(run_config(flags.ckpt, saved),
                                  **{name: getattr(cfg, name) for name in SAMPLING_FIELDS if name in flags.given})
    if "prompt" not in flags.given and flags.judge and run_cfg.dataset == "shapes":
        run_cfg = dataclasses.replace(run_cfg, prompt=all_shape_captions())  # every colour-shape pair
    if not run_cfg.prompt:
        raise UsageError('--sample needs at least one --prompt "..." (repeat the flag for more rows)')
    run_cfg.validate()
    if flags.judge:
        requested = judged_attributes(run_cfg)  # a prompt the judges cannot read fails before sampling
    device = torch.device(pick_device(run_cfg.device))
    latents = load_latents(run_cfg.vae, device, image_channels=run_cfg.channels or 3)
    text = load_text_encoder(run_cfg.text_encoder, run_cfg.conditioning, device)
    if text.dim != arch["context_dim"]:
        raise UsageError(f"the text encoder '{run_cfg.text_encoder}' gives states of width {text.dim}, but the "
                         f"network of '{flags.ckpt}' reads {arch['context_dim']}: its run's text encoder is another")
    out = flags.out or os.path.join("results", run_cfg.run_name, "samples.png")
    images = sample_grid(run_cfg, run_diffusion(run_cfg, latents, device), net.to(device), latents, text,
                         run_cfg.prompt, out)
    print(f"saved {len(run_cfg.prompt)} x {run_cfg.n_per_row} samples to {out}")
    if flags.save_individual:
        rows = torch.arange(len(run_cfg.prompt)).repeat_interleave(run_cfg.n_per_row)
        save_individual(images, rows, flags.save_individual)
        print(f"saved {len(images)} images as {flags.save_individual}/<prompt index>_<i>.png")
    if flags.judge:
        return prompt_figures(run_cfg, images, *requested, device)
    return out


def judged_attributes(cfg):
    """(colour ids, shape ids, held out?) of the grid's samples, rows of n_per_row following cfg.prompt."""
    if cfg.dataset != "shapes":
        raise UsageError(f"--judge needs a run on the built-in shapes (this one trained on {cfg.dataset})")
    held = {normalize_caption(c) for c in cfg.holdout_prompts}
    colors, shapes, heldout = [], [], []
    for prompt in cfg.prompt:
        pair = parse_shape_caption(prompt)
        if pair is None:
            raise UsageError(f"--judge: prompt '{prompt}' names no colour and shape of the shapes data set: use e.g. "
                             f"'a {COLOR_NAMES[0]} {SHAPE_NAMES[0]}'")
        colors += [pair[0]] * cfg.n_per_row
        shapes += [pair[1]] * cfg.n_per_row
        heldout += [normalize_caption(prompt) in held] * cfg.n_per_row
    return torch.tensor(colors), torch.tensor(shapes), torch.tensor(heldout)


def prompt_figures(cfg, images, colors, shapes, heldout, device):
    """Colour, shape and prompt accuracy of the samples, for the seen prompts and for the held-out ones.

    The shape is read by judges.py's learned judge of the shapes data set, the colour by the colour judge
    (data.classify_colors); each one's accuracy on real images is printed beside the figures.
    """
    shape_judge = get_judge("shapes", cfg.dataset_path, cfg.image_size, device=device)
    color_judge = color_judge_accuracy(cfg.image_size)
    figures = {"shape_judge_heldout_accuracy": shape_judge.heldout_accuracy, "color_judge_accuracy": color_judge}
    print(f"{'prompts':>9} {'samples':>7} {'color_acc':>9} {'shape_acc':>9} {'prompt_acc':>10}")
    for name, rows in (("seen", ~heldout), ("held-out", heldout)):
        if rows.any():
            figures[name] = attribute_figures(shape_judge, images[rows], colors[rows], shapes[rows])
            f = figures[name]
            print(f"{name:>9} {f['n']:>7} {f['color_acc']:>9.3f} {f['shape_acc']:>9.3f} {f['prompt_acc']:>10.3f}")
    print(f"judges on real images: shape {shape_judge.heldout_accuracy:.3f} (held out, {shape_judge.path}), "
          f"colour {color_judge:.3f}; chance 0.1 for colour and shape, 0.01 for both")
    return figures


def main(argv=None):
    cfg, flags = parse_config(Config, argv, __doc__, extra=SD_FLAGS)
    if flags.make_tiny_models:
        print("wrote", *make_tiny_models(flags.make_tiny_models))
        return None
    if flags.sample:
        return sample(cfg, flags)
    return train(cfg, flags, text_task)


if __name__ == "__main__":
    run_cli(main)
