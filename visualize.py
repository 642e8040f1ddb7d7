"""Pictures of the diffusion process: forward noising, one reverse trajectory, a guidance sweep.

    python visualize.py noising --dataset shapes --image_size 64                 (no checkpoint needed)
    python visualize.py trajectory --ckpt models/R/ema_ckpt.pt --label 3 --sampler ddim --steps 50
    python visualize.py guidance --ckpt models/R/ema_ckpt.pt --label 3 --scales 1,3,5,7.5 --compare_raw true

The mode is the first argument (or --mode MODE). Each mode writes one labelled PNG, by default
results/<run_name>/<mode>.png (run_name from the checkpoint's config):
  noising     x_0 and x_t ~ q(x_t | x_0) at a few t, one row per data set image, the same eps along a row;
  trajectory  one reverse run: the network's input x_t (top row) and the x_0 it predicts (bottom row) at a
              few of the sampler's steps, then the result; every sampler works, and the latents of a run with a
              VAE (train_sd.py, or --vae of ddpm*.py) are decoded through it (pass --prompt to train_sd.py's); a
              ddpm_img2img.py run is conditioned on its held-out image --image (the first column shows the input);
  guidance    the same seeds and label under each guidance scale, one column per scale, after an
              unconditional column; --compare_raw adds the raw weights (ckpt.pt) below the EMA.
"""
import math
import os
import sys
import textwrap
from dataclasses import dataclass

import torch
from matplotlib.figure import Figure

from checkpoints import is_text_run, load_model, read_checkpoint, run_diffusion
from data import dataset_channels, get_dataset, heldout_images
from degradations import Degradation
from diffusion import SAMPLERS, Diffusion
from latents import load_text_encoder, run_latents
from modules import NULL_LABEL
from utils import UsageError, arg, parse_config, pick_device, run_cli, save_figure, save_gif, to_uint8


# ----------------------------------------------------------------------------- options
@dataclass
class Config:
    mode: str = arg("trajectory", "noising | trajectory | guidance (or give the mode first, without --mode)")
    ckpt: str | None = arg(None, "checkpoint of ddpm.py, ddpm_conditional.py or train_sd.py (not needed by noising)")
    label: int | None = arg(None, "class id of a conditional checkpoint (None: class 0)")
    image: int = arg(0, "ddpm_img2img.py checkpoint: the index of the held-out image whose condition is sampled")
    prompt: str | None = arg(None, "prompt of a train_sd.py checkpoint (None: its first grid prompt)")
    cfg_scale: float = arg(3.0, "guidance scale of the trajectory: 0 = conditional only, >1 = stronger")
    scales: str = arg("1,3,5,7.5", "guidance mode: comma-separated scales, one column each (0 samples as 1)")
    compare_raw: bool = arg(False, "guidance mode: also sample ckpt.pt (the raw weights) beside the EMA")
    n: int = arg(4, "rows: data set images (noising) or seeds (guidance)")
    frames: int = arg(8, "columns of the noising strip and of the trajectory")
    gif: bool = arg(False, "trajectory: also write the PNG's name with .gif, x_t beside the predicted x_0 per step")
    timesteps: str | None = arg(None, "noising: comma-separated t (None: `frames - 1` evenly spaced up to T-1)")
    sampler: str = arg("dpm++", "ddpm (999-step Alg. 2) | ddim | dpm++ | dpm++ode | euler_a")
    steps: int | None = arg(None, "network steps of the sampler (None: its default, 20 for dpm++)")
    seed: int = arg(0, "seed of the noise (and the first data set image of noising)")
    dataset: str | None = arg(None, "noising: shapes | imagefolder | cifar10 (None: the checkpoint's, or shapes)")
    dataset_path: str | None = arg(None, "folder of the data set (None: the checkpoint's, or ./data)")
    image_size: int | None = arg(None, "pixels, divisible by 8 (None: the checkpoint's, or 64)")
    run_name: str | None = arg(None, "results/<run_name>/ gets the picture (None: the checkpoint's, or visualize)")
    out: str | None = arg(None, "the PNG (None: results/<run_name>/<mode>.png); replaced atomically if it exists")
    device: str = arg("auto", "auto (cuda, then mps, then cpu) | cuda | mps | cpu")

    def validate(self):
        """One readable error for each option the run cannot use, before any file is read."""
        if self.mode not in MODES:
            raise UsageError(f"mode '{self.mode}' is unknown: use one of {', '.join(MODES)}")
        if self.mode != "noising" and self.ckpt is None:
            raise UsageError(f"{self.mode} needs a checkpoint: pass --ckpt models/<run>/ema_ckpt.pt")
        if self.sampler not in SAMPLERS:
            raise UsageError(f"sampler '{self.sampler}' is unknown: use one of {', '.join(SAMPLERS)}")
        if self.cfg_scale < 0:
            raise UsageError(f"cfg_scale {self.cfg_scale} is negative: use 0 (no guidance) or a value > 0, e.g. 3")
        for name in ("n", "steps"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UsageError(f"{name} {value} must be positive")
        if self.frames < 2:
            raise UsageError(f"frames {self.frames} is too few: use at least 2 (the first and the last)")
        if self.image_size is not None and (self.image_size <= 0 or self.image_size % 8):
            raise UsageError(f"image_size {self.image_size} is not divisible by 8: use e.g. 16, 32 or 64")
        if self.out is not None and not self.out.lower().endswith(".png"):
            raise UsageError(f"cannot save the picture as '{self.out}': use a .png file name")
        parse_scales(self.scales)


MODES = ("noising", "trajectory", "guidance")
CELL_INCHES, HEADER_INCHES, DPI = 1.1, 0.8, 100  # a 1.1 x 1.1 inch cell per image, below a title strip


def parse_scales(text):
    """'1, 3,7.5' -> [1.0, 3.0, 7.5]; anything else (or a negative scale) is a UsageError."""
    try:
        scales = [float(item) for item in text.split(",")]
    except ValueError:
        raise UsageError(f"--scales '{text}' is not a comma-separated list of numbers: "
                         "e.g. --scales 1,3,5,7.5") from None
    if any(scale < 0 or not math.isfinite(scale) for scale in scales):
        raise UsageError(f"--scales '{text}' has a negative or infinite scale: use values >= 0")
    return scales


# ----------------------------------------------------------------------------- checkpoint -> sampler
@dataclass
class Loaded:
    """A checkpoint ready to sample: `net(x_t, t[, cond])`, its Diffusion, and `decode` (model space -> pixels)."""
    net: torch.nn.Module
    diffusion: Diffusion
    decode: object
    cond: torch.Tensor | None  # the conditioning of one image: a class id (1,), token states (1, ...), or None
    null_cond: torch.Tensor | None
    caption: str  # what the conditioning is, for the title
    saved: dict
    image_cond: torch.Tensor | None = None  # the condition image (1, C_cond, H, W) of a ddpm_img2img.py run
    shown_input: torch.Tensor | None = None  # that input as a picture (C, H, W)


def load_text_run(cfg, path, net, arch, saved, device):
    """A train_sd.py checkpoint: its network on latents (or pixels), the frozen VAE to decode them, CLIP for the
    prompt."""
    if cfg.label is not None:
        raise UsageError("this is a train_sd.py (text) checkpoint: drop --label and pass --prompt \"...\"")
    latents = run_latents(saved, arch["c_in"], device)
    text = load_text_encoder(saved["text_encoder"], saved["conditioning"], device)
    prompt = cfg.prompt or (saved["prompt"][0] if saved["prompt"] else None)
    if prompt is None:
        raise UsageError("this train_sd.py checkpoint needs a prompt: pass --prompt \"a photo of a red circle\"")
    cond = text([prompt])  # (1, L, D) or (1, D)
    return Loaded(net.to(device), run_diffusion(saved, latents, device), latents.decode, cond, text([""]),
                  f'"{prompt}"', saved)


def load(cfg, path, device):
    """Any checkpoint of this repository as a Loaded, with the conditioning that --label / --prompt ask for."""
    net, arch, saved = load_model(path)
    if is_text_run(saved):
        return load_text_run(cfg, path, net, arch, saved, device)
    if cfg.prompt is not None:
        raise UsageError("--prompt is for train_sd.py checkpoints: this is a U-Net checkpoint; use --label")
    latents = run_latents(saved, arch["c_in"], device)
    diffusion = run_diffusion(saved, latents, device, cfg.image_size)
    num_classes = arch["num_classes"]
    if arch.get("cond_channels"):
        return load_img2img(cfg, Loaded(net.to(device), diffusion, latents.decode, None, None, "", saved), arch)
    if num_classes is None:
        if cfg.label is not None:
            raise UsageError("this checkpoint is unconditional: drop --label")
        return Loaded(net.to(device), diffusion, latents.decode, None, None, "unconditional", saved)
    label = 0 if cfg.label is None else cfg.label
    if not 0 <= label < num_classes:
        raise UsageError(f"label {label} is outside the model's {num_classes} classes: use 0..{num_classes - 1}")
    cond = torch.tensor([label], device=device)  # (1,)
    null_cond = torch.full_like(cond, NULL_LABEL)
    return Loaded(net.to(device), diffusion, latents.decode, cond, null_cond, f"class {label}", saved)


def load_img2img(cfg, loaded, arch):
    """A ddpm_img2img.py checkpoint, conditioned on the degraded held-out image --image (with its true class if the
    run reads classes): the trajectory of its restoration."""
    saved, device = loaded.saved, loaded.diffusion.device
    if cfg.label is not None:
        raise UsageError("this ddpm_img2img.py checkpoint is conditioned on a held-out image: pass --image N, not "
                         "--label")
    images, labels = heldout_images(saved, cfg.image + 1, arch["c_out"])
    if cfg.image >= len(images):
        raise UsageError(f"--image {cfg.image}: the run holds out {len(images)} images; use 0..{len(images) - 1}")
    degradation = Degradation.from_settings(saved)
    image = images[cfg.image:cfg.image + 1]  # (1, C, H, W)
    holes = degradation.draw_holes(1, torch.Generator().manual_seed(cfg.seed))
    loaded.image_cond = degradation.condition(image, holes).to(device)
    loaded.shown_input = degradation.shown_input(image, loaded.image_cond.cpu())[0]
    if arch["num_classes"] is not None:
        loaded.cond = labels[cfg.image:cfg.image + 1].to(device)
        loaded.null_cond = torch.full_like(loaded.cond, NULL_LABEL)
    loaded.caption = f"{saved['task']} of held-out image {cfg.image}"
    return loaded


def generate(loaded, n, cfg_scale, cfg, callback=None, cond=None):
    """n images from seed cfg.seed (pixels in [-1, 1]); `cond` overrides the loaded conditioning."""
    cond = loaded.cond if cond is None else cond
    labels = None if cond is None else cond.expand(n, *cond.shape[1:])
    null = None if cond is None else loaded.null_cond.expand(n, *cond.shape[1:])
    image = None if loaded.image_cond is None else loaded.image_cond.expand(n, -1, -1, -1)
    guided = cond is not None or image is not None
    x_0 = loaded.diffusion.sample_x0(loaded.net, n, labels, cfg_scale if guided else 0.0, null_labels=null,
                                     sampler=cfg.sampler, steps=cfg.steps, seed=cfg.seed, progress=False,
                                     callback=callback, cond=image)
    return loaded.decode(x_0)


# ----------------------------------------------------------------------------- the figure
def draw(cells, column_titles, row_names, title, path):
    """Save a grid of images as a PNG: cells[r][c] is a (C, H, W) tensor in [-1, 1], or None (an empty cell).

    Each column has its caption above the first row, each row its name at the left. The PNG is
    cols * CELL_INCHES * DPI pixels wide and (rows * CELL_INCHES + HEADER_INCHES) * DPI high.
    """
    rows, cols = len(cells), len(cells[0])
    fig = Figure(figsize=(cols * CELL_INCHES, rows * CELL_INCHES + HEADER_INCHES), dpi=DPI)
    fig.suptitle(textwrap.fill(title, width=max(40, round(cols * CELL_INCHES * 14))), fontsize=8)
    for r, row in enumerate(cells):
        for c, image in enumerate(row):
            ax = fig.add_subplot(rows, cols, r * cols + c + 1)
            ax.set_xticks([])
            ax.set_yticks([])
            if image is None:
                ax.set_frame_on(False)  # an empty cell that keeps its row's name
            else:
                pixels = to_uint8(image.detach().float().cpu()).permute(1, 2, 0).numpy()  # (C, H, W) -> (H, W, C)
                ax.imshow(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels, cmap="gray", interpolation="nearest")
            if r == 0:
                ax.set_title(column_titles[c], fontsize=7)
            if c == 0:
                ax.set_ylabel(row_names[r], fontsize=7)
    height = rows * CELL_INCHES + HEADER_INCHES
    fig.subplots_adjust(left=0.25 / cols, right=0.99, bottom=0.02, top=1 - HEADER_INCHES / height, wspace=0.08,
                        hspace=0.35)
    save_figure(fig, path, dpi=DPI)
    return fig


# ----------------------------------------------------------------------------- the three modes
def noising_timesteps(cfg, noise_steps):
    """The t of the strip: --timesteps, or frames - 1 of them evenly spaced up to T-1."""
    if cfg.timesteps is None:
        return [round(k * (noise_steps - 1) / (cfg.frames - 1)) for k in range(1, cfg.frames)]
    try:
        timesteps = [int(item) for item in cfg.timesteps.split(",")]
    except ValueError:
        raise UsageError(f"--timesteps '{cfg.timesteps}' is not a comma-separated list of integers: "
                         "e.g. --timesteps 50,200,999") from None
    if any(not 0 <= t < noise_steps for t in timesteps):
        raise UsageError(f"--timesteps '{cfg.timesteps}' leaves 0..{noise_steps - 1}, the schedule's range")
    return timesteps


def noising(cfg, saved, device):
    """x_0, then x_t = sqrt(alpha_hat_t) x_0 + sqrt(1 - alpha_hat_t) eps at each t, one eps per row."""
    dataset_name = cfg.dataset or saved.get("dataset", "shapes")
    image_size = cfg.image_size or saved.get("image_size", 64)
    dataset_path = cfg.dataset_path or saved.get("dataset_path", "./data")
    channels = saved.get("channels") or dataset_channels(dataset_name, dataset_path)
    dataset = get_dataset(dataset_name, dataset_path, image_size, seed=cfg.seed, train=True, size=None,
                          channels=channels)
    diffusion = Diffusion.from_settings(saved, image_size, device=device)
    timesteps = noising_timesteps(cfg, diffusion.noise_steps)
    generator = torch.Generator().manual_seed(cfg.seed)
    cells = []
    for index in range(min(cfg.n, len(dataset))):
        x_0 = dataset[index][0].to(device)  # (C, H, W)
        eps = torch.randn(x_0.shape, generator=generator).to(device)
        t = torch.tensor(timesteps, device=device)
        x_t, _ = diffusion.noise_images(x_0.expand(len(t), *x_0.shape), t, eps.expand(len(t), *x_0.shape))
        cells.append([x_0, *x_t])
    signal = diffusion.alpha_hat[timesteps].sqrt().tolist()
    titles = ["x_0", *[f"t={t}\nsqrt(a_hat)={s:.2f}" for t, s in zip(timesteps, signal, strict=True)]]
    betas = f"{diffusion.beta[0].item():.2g}..{diffusion.beta[-1].item():.3g}"
    title = (f"forward noising q(x_t | x_0), T={diffusion.noise_steps}, {diffusion.schedule} betas {betas}; "
             "the same eps along each row")
    return cells, titles, [f"{dataset_name} {i}" for i in range(len(cells))], title


def trajectory_gif(states, decode, path, frames=60, size=128):
    """x_t beside the predicted x_0, at up to `frames` evenly spaced steps, each image scaled to size x size."""
    shown = sorted({round(k * (len(states) - 1) / (frames - 1)) for k in range(frames)})
    pairs = [torch.cat([decode(states[i][1]), decode(states[i][2])], dim=3) for i in shown]  # (1, C, H, 2W) each
    pairs = torch.nn.functional.interpolate(torch.cat(pairs).float().cpu(), size=(size, 2 * size), mode="nearest")
    save_gif(pairs, path)


def trajectory(cfg, loaded, gif_path=None):
    """x_t and the predicted x_0 at `frames` of the sampler's steps (the first and last included), then x_0."""
    states = []  # (t, x_t, x0_pred) of each step, in order

    def record(step_index, t, x_t, x0_pred):
        states.append((t, x_t.clone(), x0_pred.clone()))

    x_0 = generate(loaded, 1, cfg.cfg_scale, cfg, callback=record)
    if gif_path is not None:
        trajectory_gif(states, loaded.decode, gif_path)
    shown = sorted({round(k * (len(states) - 1) / (cfg.frames - 1)) for k in range(cfg.frames)})
    x_t_row = [loaded.decode(states[i][1])[0] for i in shown] + [x_0[0]]
    x0_row = [loaded.decode(states[i][2])[0] for i in shown] + [None]
    titles = [f"step {i + 1}/{len(states)}\nt={states[i][0]}" for i in shown] + ["result x_0"]
    if loaded.shown_input is not None:  # a ddpm_img2img.py run: its input first
        x_t_row, x0_row, titles = [loaded.shown_input, *x_t_row], [None, *x0_row], ["input", *titles]
    scale = f", cfg_scale {cfg.cfg_scale:g}" if loaded.cond is not None or loaded.image_cond is not None else ""
    title = f"{cfg.sampler}, {len(states)} steps, {loaded.caption}{scale}, seed {cfg.seed}"
    return [x_t_row, x0_row], titles, ["x_t (net input)", "predicted x_0"], title


def guidance(cfg, loaded, raw=None):
    """The same seeds and conditioning under each scale, after the unconditional samples; raw below the EMA."""
    if loaded.cond is None:
        raise UsageError("guidance needs a conditional checkpoint (ddpm_conditional.py or train_sd.py); the guidance "
                         "of a ddpm_img2img.py run is measured by evaluate.py --cfg_scale 0,1,3")
    scales = parse_scales(cfg.scales)
    cells, names = [], []
    for weights_name, model in (("EMA", loaded), ("raw", raw)):
        if model is None:
            continue
        columns = [generate(model, cfg.n, 0.0, cfg, cond=model.null_cond)]
        columns += [generate(model, cfg.n, scale, cfg) for scale in scales]
        cells += [[column[i] for column in columns] for i in range(cfg.n)]
        names += [f"{weights_name}, image {i}" for i in range(cfg.n)]
    titles = ["unconditional", *[f"scale {scale:g}" for scale in scales]]
    title = (f"guidance: lerp(eps_uncond, eps_cond, scale), {loaded.caption}, {cfg.sampler}, seed {cfg.seed} "
             "(0 and 1: the conditional eps alone)")
    return cells, titles, names, title


def raw_weights_path(path):
    """ckpt.pt, the raw weights saved beside an ema_ckpt.pt."""
    raw = os.path.join(os.path.dirname(path), "ckpt.pt")
    if os.path.basename(path) != "ema_ckpt.pt" or not os.path.isfile(raw):
        raise UsageError(f"--compare_raw needs models/<run>/ema_ckpt.pt with ckpt.pt beside it: got '{path}'")
    return raw


def main(argv=None):
    """Parse the options (the mode may come first), draw the mode's picture, and return the PNG's path."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):
        argv = ["--mode", *argv]
    cfg = parse_config(Config, argv, description=__doc__)
    device = pick_device(cfg.device)
    if cfg.mode == "noising":
        loaded, saved = None, read_checkpoint(cfg.ckpt)[1] if cfg.ckpt else {}
    else:
        loaded = load(cfg, cfg.ckpt, device)
        saved = loaded.saved
    run_name = cfg.run_name or saved.get("run_name", "visualize")
    path = cfg.out or os.path.join("results", run_name, f"{cfg.mode}.png")
    if cfg.mode == "noising":
        figure = noising(cfg, saved, device)
    elif cfg.mode == "trajectory":
        gif_path = os.path.splitext(path)[0] + ".gif" if cfg.gif else None
        figure = trajectory(cfg, loaded, gif_path)
        if gif_path:
            print(f"saved {gif_path}")
    else:
        raw = load(cfg, raw_weights_path(cfg.ckpt), device) if cfg.compare_raw else None
        figure = guidance(cfg, loaded, raw)
    draw(*figure, path)
    print(f"saved {path}")
    return path


if __name__ == "__main__":
    run_cli(main)
