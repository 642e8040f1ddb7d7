"""Generate images from any checkpoint of this repository or of the reference repository.

    python sample.py --ckpt models/R/ema_ckpt.pt --labels 0,1,2 --n_per_row 10 --cfg_scale 3 --out grid.png
    python sample.py --ckpt unconditional_ckpt.pt --n_samples 16 --sampler ddpm   (the reference's 999-step Alg. 2)
    python sample.py --ckpt models/R/ema_ckpt.pt --inpaint photo.png --mask hole.png     (RePaint, any checkpoint)
    python sample.py --ckpt models/SR/ema_ckpt.pt --condition low_res.png    (ddpm_img2img.py: a folder works too)

The network is rebuilt from the state_dict itself (checkpoints.load_model): it is class-conditional iff it has a label embedding
(num_classes = its rows), its conditioning mode (add, concat, xattn, adanorm) is the saved config's and
matches the weights it has, and its widths come from `inc` and `outc`. A DiT (`backbone: dit` in the saved
config) takes its width, depth and classes from its weights and its patch size and heads from the config. The
schedule and image size come from the training config saved with the run (`config.json` beside the checkpoint,
or the "config" of a `training_state.pt`); the reference's released checkpoints have none and get its 64 px,
T = 1000, linear betas 1e-4..0.02. A run trained in a VAE's latents (--vae) samples latents and decodes
them through that VAE.

A ddpm_img2img.py checkpoint (its saved config has a `task`) is conditioned on an image: --condition gives it, a
file or a folder of them, as the task takes it: the low-resolution image (image_size / scale px), the image to fill
with --mask (inpaint), the grey image (colorize); one grid column per input, rows: input, then the outputs. Any
other pixel-space checkpoint inpaints by RePaint (diffusion.Diffusion, Lugmayr et al. 2022): --inpaint IMAGE --mask MASK,
white in the mask where to fill.
"""
import dataclasses
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from checkpoints import class_names, describe, load_image_model, pixel_diffusion, run_diffusion
from config import Checkpoint, RePaint
from data import GREY_MODES, read_mask
from degradations import Degradation, inpaint_condition, save_rows
from diffusion import DEFAULT_STEPS, SAMPLERS
from latents import run_latents
from utils import (UsageError, arg, configclass, grid_labels, load_rgb, parse_config, pick_device, run_cli,
                   save_images, save_individual, to_uint8)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


# ----------------------------------------------------------------------------- options
@configclass(Checkpoint, RePaint)
class Config:
    labels: str | None = arg(None, "comma-separated class ids, one grid row each, e.g. 0,1,2 (None: all classes)")
    n_per_row: int = arg(10, "images per label (conditional model): the width of each grid row",
                         old_names=("n_per_label",))
    n_samples: int = arg(16, "images in all (unconditional model)", old_names=("n",))
    cfg_scale: float = arg(3.0, "guidance: 0 = conditional only, 1 = same in one batch, >1 = stronger")
    out: str = arg("grid.png", "the grid, .png or .jpg; replaced atomically if it exists")
    save_individual: str | None = arg(None, "also write each image as DIR/<label>_<i>.png (label 0 if unconditional)")
    sampler: str | None = arg(None, "ddpm (999-step Alg. 2) | ddim | dpm++ | dpm++ode | euler_a; None: dpm++, or ddpm "
                                    "for --inpaint (RePaint runs in Alg. 2)")
    steps: int | None = arg(None, "network steps of the sampler (None: its default, 20 for dpm++; for --inpaint, "
                                  "RePaint's chain: all 999, or this many evenly spaced)")
    condition: str | None = arg(None, "ddpm_img2img.py checkpoint: the input image, or a folder of them: the "
                                      "low-resolution image (superres), the image to fill with --mask (inpaint), the "
                                      "grey image (colorize)")
    inpaint: str | None = arg(None, "RePaint with a ddpm.py / ddpm_conditional.py checkpoint: the image, or a folder "
                                    "of them, whose --mask region is filled")
    mask: str | None = arg(None, "the mask of --inpaint, or of --condition for an inpaint checkpoint: white where to "
                                 "fill, black where the image is kept")
    n_per_input: int = arg(1, "--condition / --inpaint: outputs per input image, one grid row each")

    def validate(self):
        if self.cfg_scale < 0:
            raise UsageError(f"cfg_scale {self.cfg_scale} is negative: use 0 (no guidance) or a value > 0, e.g. 3")
        if self.sampler not in (None, *SAMPLERS):
            raise UsageError(f"sampler '{self.sampler}' is unknown: use one of {', '.join(SAMPLERS)}")
        if self.inpaint is not None:
            if self.mask is None:
                raise UsageError("--inpaint needs --mask MASK: a black-and-white image of the same size, white where "
                                 "to fill")
            if self.sampler not in (None, "ddpm"):
                raise UsageError(f"RePaint runs inside DDPM Alg. 2, not with --sampler {self.sampler}: pass --sampler "
                                 "ddpm (or leave it out)")
            if self.condition is not None:
                raise UsageError("--inpaint (RePaint, any checkpoint) and --condition (a ddpm_img2img.py checkpoint) "
                                 "exclude each other: pass one")
        if self.mask is not None and self.inpaint is None and self.condition is None:
            raise UsageError("--mask goes with --inpaint IMAGE (RePaint) or --condition IMAGE (an inpaint checkpoint): "
                             "pass the image too")
        for name in ("n_per_row", "n_samples", "steps", "n_per_input"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UsageError(f"{name} {value} must be positive")
        if not self.out.lower().endswith(IMAGE_EXTENSIONS):
            raise UsageError(f"cannot save the grid as '{self.out}': use a .png or .jpg file name")


def parse_labels(text):
    """'0,1, 2' -> [0, 1, 2]; anything else is a UsageError."""
    try:
        labels = [int(item) for item in text.split(",")]
    except ValueError:
        raise UsageError(f"--labels '{text}' is not a comma-separated list of class ids: e.g. --labels 0,1,2") from None
    return labels


# ----------------------------------------------------------------------------- image inputs: conditions, RePaint
def read_inputs(path, size, channels, what):
    """(file names, images (K, channels, size, size) in [-1, 1]) of an image file or a folder of image files, each of
    which must be size x size pixels, grey for channels 1 and colour for 3; anything else is a UsageError."""
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise UsageError(f"{what} folder '{path}' holds no .png or .jpg images: put the input images in it")
    elif os.path.isfile(path):
        files = [path]
    else:
        raise UsageError(f"{what} '{path}' not found: pass an image file or a folder of them")
    images = []
    for file in files:
        try:
            with Image.open(file) as image:
                width, height, grey = image.width, image.height, image.mode in GREY_MODES
        except OSError:
            raise UsageError(f"{what} '{file}' is not a readable image: pass a .png or .jpg file") from None
        if (width, height) != (size, size):
            raise UsageError(f"{what} '{file}' is {width}x{height} pixels, but this checkpoint takes {size}x{size}: "
                             f"resize it to {size}x{size}")
        if grey != (channels == 1):
            kind, wanted, mode = ("grey", "RGB", "RGB") if grey else ("RGB", "grey", "L")
            raise UsageError(f"{what} '{file}' is {kind}, but this checkpoint takes {wanted} images ({channels} "
                             f"channel{'s' if channels > 1 else ''}): convert it, e.g. "
                             f"Image.open(path).convert('{mode}')")
        pixels = load_rgb(file).convert("L" if channels == 1 else "RGB")
        array = np.asarray(pixels, dtype=np.float32).reshape(size, size, channels)
        images.append(torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1)  # (S, S, C) -> (C, S, S)
    return [os.path.basename(f) for f in files], torch.stack(images)


def input_labels(cfg, num_classes, count, required):
    """The class ids of `count` inputs (count,): --labels gives one for all or one per input; None without
    --labels unless `required` (a class-conditional ddpm_img2img.py run, which never saw a condition without one)."""
    if num_classes is None:
        if cfg.labels is not None:
            raise UsageError("this checkpoint has no classes: drop --labels")
        return None
    if cfg.labels is None:
        if required:
            raise UsageError(f"this checkpoint reads the class beside the image: pass --labels with one class id "
                             f"(0..{num_classes - 1}) for all inputs, or one per input")
        return None
    labels = parse_labels(cfg.labels)
    if len(labels) not in (1, count) or not all(0 <= k < num_classes for k in labels):
        raise UsageError(f"--labels {cfg.labels}: give one class id in 0..{num_classes - 1} for all {count} inputs, "
                         "or one per input")
    return torch.tensor(labels * count if len(labels) == 1 else labels)


def sample_from_images(cfg, model, arch, saved, device):
    """--condition (a ddpm_img2img.py checkpoint) or --inpaint (RePaint): one grid column per input image, rows: the
    input, then n_per_input outputs (and bicubic for super-resolution). Returns the uint8 outputs."""
    task = saved.get("task") if arch.get("cond_channels") else None
    if task is not None and cfg.condition is None:
        raise UsageError(f"this checkpoint is conditioned on a {task} image: pass --condition IMAGE (or a folder of "
                         "them)" + (" with --mask MASK" if task == "inpaint" else ""))
    if task is None and cfg.condition is not None:
        raise UsageError("--condition is for ddpm_img2img.py checkpoints, and this one reads no image: to fill a "
                         "region with it, pass --inpaint IMAGE --mask MASK (RePaint)")
    if task is not None and cfg.inpaint is not None:
        raise UsageError(f"this checkpoint is conditioned on a {task} image: pass it with --condition, not --inpaint")
    if (task == "inpaint") != (cfg.mask is not None) and cfg.inpaint is None:
        raise UsageError("an inpaint checkpoint needs --mask MASK beside --condition" if task == "inpaint" else
                         f"this {task} checkpoint takes no mask: drop --mask")
    diffusion = pixel_diffusion(saved, arch, device, "--inpaint and --condition", cfg.image_size, cfg.clip_x0)
    size, channels = diffusion.image_size, arch["c_out"]
    degradation = Degradation.from_settings({**saved, "image_size": size}) if task is not None else None
    holes = read_mask(cfg.mask, size)[None] if cfg.mask is not None else None  # (1, 1, S, S): 1 where to fill
    extra = {}
    if task == "superres":
        names, low = read_inputs(cfg.condition, size // degradation.scale, channels, "--condition image")
        cond = degradation.upsample(low)
        shown = [(f"input ({size // degradation.scale} px)", F.interpolate(low, scale_factor=degradation.scale)),
                 ("bicubic", cond)]
    elif task is not None:
        names, images = read_inputs(cfg.condition, size, 1 if task == "colorize" else channels, "--condition image")
        cond = images if task == "colorize" else inpaint_condition(images, holes.expand(len(images), -1, -1, -1))
        shown = [("input", cond[:, :channels])]
    else:
        names, images = read_inputs(cfg.inpaint, size, channels, "--inpaint image")
        cond = None
        shown = [("input (hole: grey)", images * (1 - holes))]
        extra = {"known_image": images.repeat(cfg.n_per_input, 1, 1, 1).to(device), "known_mask": (1 - holes).to(device),
                 "jump_length": cfg.jump_length, "jump_n_sample": cfg.jump_n_sample,
                 "reconstruction_guidance": cfg.reconstruction_guidance}
    count, n = len(names), len(names) * cfg.n_per_input
    labels = input_labels(cfg, arch["num_classes"], count, required=task is not None)
    labels = None if labels is None else labels.repeat(cfg.n_per_input).to(device)
    if cond is not None:
        extra["cond"] = cond.repeat(cfg.n_per_input, 1, 1, 1).to(device)
    cfg_scale = cfg.cfg_scale if labels is not None or task is not None else 0.0
    steps = cfg.steps or DEFAULT_STEPS.get(cfg.sampler, diffusion.noise_steps - 1)
    how = (f"RePaint over {steps} steps (jump_length {cfg.jump_length}, jump_n_sample {cfg.jump_n_sample}, "
           f"reconstruction_guidance {cfg.reconstruction_guidance:g})"
           if cfg.inpaint else
           f"{cfg.sampler} with {steps} steps, cfg_scale {cfg_scale:g}")
    print(f"{task or 'RePaint'} with {describe(arch)} from {cfg.ckpt}: {count} input(s) x {cfg.n_per_input} at "
          f"{size} px, {how}, on {device}")
    model.to(device)
    x_0 = diffusion.sample_x0(model, n, labels, cfg_scale, sampler=cfg.sampler, steps=cfg.steps, seed=cfg.seed,
                              **extra)
    if degradation is not None:  # inpaint: the known pixels of the input, the output in the hole
        x_0 = degradation.keep_known(x_0, extra["cond"])
    outputs = to_uint8(x_0).cpu()
    rows = shown[:1] + [(f"output {r + 1}" if cfg.n_per_input > 1 else "output", outputs[r * count:(r + 1) * count])
                        for r in range(cfg.n_per_input)] + shown[1:]
    save_rows([(caption, images.float() / 127.5 - 1 if images.dtype == torch.uint8 else images)
               for caption, images in rows], cfg.out)
    print(f"saved {cfg.out} (columns: {', '.join(names)})")
    if cfg.save_individual:
        save_individual(outputs, list(range(count)) * cfg.n_per_input, cfg.save_individual)
        print(f"saved {n} images in {cfg.save_individual}/ as <input index>_<i>.png")
    return outputs


def main(argv=None):
    """Load the checkpoint, sample, and write the grid (and the single images); returns the uint8 images."""
    cfg = parse_config(Config, argv, description=__doc__)
    cfg = dataclasses.replace(cfg, sampler=cfg.sampler or ("ddpm" if cfg.inpaint else "dpm++"))
    device = pick_device(cfg.device)
    model, arch, saved = load_image_model(cfg.ckpt, cfg.weights)
    if arch.get("cond_channels") or cfg.condition is not None or cfg.inpaint is not None:
        return sample_from_images(cfg, model, arch, saved, device)
    if arch["num_classes"] is None and cfg.labels is not None:
        raise UsageError("this checkpoint is unconditional: drop --labels (and use --n_samples for the image count)")
    labels = None
    if arch["num_classes"] is not None:
        chosen = parse_labels(cfg.labels) if cfg.labels is not None else None
        labels = grid_labels(arch["num_classes"], cfg.n_per_row, chosen)
    latents = run_latents(saved, arch["c_in"], device)
    diffusion = run_diffusion(saved, latents, device, cfg.image_size, cfg.clip_x0)
    n = cfg.n_samples if labels is None else labels.shape[0]
    kind = "unconditional"
    if labels is not None:
        kind = f"conditional ({arch['num_classes']} classes, {arch['conditioning']})"
    steps = cfg.steps or DEFAULT_STEPS.get(cfg.sampler, diffusion.noise_steps - 1)
    space = "" if latents.vae is None else f" ({diffusion.image_size} px latents of --vae {saved['vae']})"
    print(f"{kind} {describe(arch)}, from {cfg.ckpt}: {n} images at {diffusion.image_size * latents.factor} px"
          f"{space}, {cfg.sampler} with {steps} steps, on {device}")

    model.to(device)
    labels = None if labels is None else labels.to(device)
    cfg_scale = cfg.cfg_scale if labels is not None else 0.0
    x_0 = diffusion.sample_x0(model, n, labels, cfg_scale, sampler=cfg.sampler, steps=cfg.steps, seed=cfg.seed)
    images = to_uint8(latents.decode(x_0))
    if labels is None:
        save_images(images, cfg.out)
    else:
        names = class_names(cfg.ckpt, arch["num_classes"])
        row_classes = labels[::cfg.n_per_row].tolist()
        save_images(images, cfg.out, nrow=cfg.n_per_row, captions=[names[k] for k in row_classes])
    print(f"saved {cfg.out}")
    if cfg.save_individual:
        row_labels = labels.tolist() if labels is not None else [0] * n
        save_individual(images, row_labels, cfg.save_individual)
        print(f"saved {n} images in {cfg.save_individual}/")
    return images


if __name__ == "__main__":
    run_cli(main)
