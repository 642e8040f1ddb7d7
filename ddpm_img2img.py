"""Image-conditioned DDPM: super-resolution (SR3), inpainting (Palette) and colourisation, by concatenation.

    python ddpm_img2img.py --config configs/digits_superres.json     (digits 4 px -> 16 px, minutes on a CPU)
    python ddpm_img2img.py --task inpaint --masks strokes --dataset imagefolder --dataset_path DIR

The condition is made from each clean training image x_0 and concatenated to x_t as more input channels of the same
U-Net (modules.UNet_conditional with cond_channels; the class map of `ddpm_conditional.py --conditioning concat` goes
in by the same code):
  superres  x_0 downsampled by --scale (box: the mean of each scale x scale block; or bicubic, antialiased), then
            upsampled back by bicubic interpolation (SR3, Saharia et al. 2021): C more channels
  inpaint   x_0 with the hole set to 0 (mid grey), and the hole mask (Palette, Saharia et al. 2022): C + 1 channels;
            the masks come from --masks (boxes, halves, lower, strokes, or a folder of mask images)
  colorize  the grey (luma) of an RGB x_0: 1 channel
With probability p_uncond a row's condition is replaced by zeros (and its label by NULL_LABEL with
--class_conditional), so the network also learns the unconditional eps and classifier-free guidance works with the
same torch.lerp as the class labels (ddpm.Diffusion.predict); SR3 and Palette train without it (p_uncond 0).
`holdout` images are never trained on: the grids show them, and evaluate.py measures PSNR, SSIM and the judge's
class accuracy on them. The diffusion math, guidance and the samplers live in ddpm.py, the loop in training.py.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from data import CHANNELS, LUMA, MASKS, Masks, dataset_channels, run_datasets
from modules import NULL_LABEL
from utils import UsageError, arg, run_cli, save_images


# ----------------------------------------------------------------------------- hyperparameters
@dataclass
class Config:
    run_name: str = arg("DDPM_img2img", "results/<run_name>/ and models/<run_name>/ hold this run's files")
    task: str = arg("superres", "what the condition is: superres | inpaint | colorize (see the docstring)")
    scale: int = arg(4, "superres: the downsampling factor (2 or 4); must divide image_size")
    downsample: str = arg("box", "superres: how the low-resolution image is made: box (mean of each block) | bicubic "
                                 "(antialiased)")
    masks: str = arg("halves", "inpaint: the holes drawn per image: boxes | halves | lower | strokes | a folder of "
                               "mask images (white: the hole)")
    dataset: str = arg("imagefolder", "imagefolder (one subfolder per class) | shapes (built in) | cifar10")
    dataset_path: str = arg("./data/digits", "folder of the data set")
    dataset_size: int | None = arg(None, "use only this many images (None: all)")
    holdout: int = arg(300, "images held out of training (drawn with the seed): the grids show them and evaluate.py "
                            "measures on them")
    augment: str | None = arg(None, "resize (+ centre crop) | flip (+ horizontal flips) | reference; None: resize "
                                    "(flip for cifar10)")
    image_size: int = arg(16, "training resolution in pixels, divisible by 8")
    channels: int | None = arg(None, "image channels: 1 (grey) | 3 (RGB); None: the data set's")
    class_conditional: bool = arg(False, "also condition on the class label (added to the time embedding)")
    base_channels: int = arg(32, "U-Net width; 64 is the reference network")
    attn_factors: str = arg("2,4,8", "self-attention after the U-Net blocks at these downsampling factors (1: full "
                                     "resolution, 8: the lowest)")
    dropout: float = arg(0.0, "dropout rate between the two convolutions of every U-Net block, in training")
    batch_size: int = arg(64, "images per optimizer step")
    epochs: int = arg(1000, "passes over the data set")
    max_steps: int | None = arg(None, "stop after this many optimizer steps, whatever the epochs")
    lr: float = arg(2e-3, "AdamW learning rate")
    noise_steps: int = arg(1000, "T, the number of diffusion steps")
    beta_start: float = arg(1e-4, "beta_1 of the linear schedule")
    beta_end: float = arg(0.02, "beta_T of the linear schedule")
    schedule: str = arg("linear", "noise schedule: linear (the DDPM paper's) | cosine (Nichol & Dhariwal 2021)")
    min_snr_gamma: float | None = arg(5.0, "Min-SNR-gamma loss weights (Hang et al. 2023); None: the plain DDPM loss")
    prediction_type: str = arg("epsilon", "what the network predicts: epsilon | v_prediction | sample (x_0)")
    lr_warmup: int = arg(0, "optimizer steps of linear learning-rate warm-up from 0")
    lr_decay: str = arg("none", "learning rate after the warm-up: none (constant) | cosine (to 0 at max_steps)")
    p_uncond: float = arg(0.1, "probability of replacing a row's condition by zeros (and its label by none), to "
                               "learn the unconditional eps for guidance; 0: SR3's and Palette's training")
    cfg_scale: float = arg(0.0, "guidance scale of the grids: 0 = the conditional eps alone, >1 = stronger")
    ema_beta: float = arg(0.995, "EMA decay per step")
    ema_start: int = arg(0, "steps during which the EMA model is a plain copy")
    ema_warmup: bool = arg(True, "EMA decay min(ema_beta, (1 + n) / (10 + n)) at update n")
    grad_clip: float | None = arg(1.0, "clip the gradient norm to this (None: no clipping)")
    clip_x0: bool = arg(True, "clip the predicted x_0 to [-1, 1] at each sampling step")
    sampler: str = arg("dpm++", "sampler of the grids: ddpm | ddim | dpm++ | dpm++ode | euler_a")
    sample_steps: int | None = arg(None, "network steps of the grid sampler (None: its default)")
    n_samples: int = arg(8, "held-out images in each grid (one column each)")
    log_every: int = arg(1000, "save grids, loss plot and checkpoints every this many epochs")
    report_to: str = arg("none", "experiment tracking through Accelerate: none | tensorboard | wandb | all")
    gradient_accumulation_steps: int = arg(1, "batches per optimizer step")
    checkpoint_every: int = arg(500, "optimizer steps between checkpoints (training_state.pt for --resume)")
    keep_checkpoints: int = arg(2, "training states kept in models/<run_name>/checkpoints/")
    max_nonfinite: int = arg(20, "stop after this many non-finite losses in a row (each update is skipped)")
    print_every: int = arg(10, "optimizer steps between reads of the loss from the device")
    seed: int = arg(0, "seed of the data order, the held-out split, the noise, the masks and the grids")
    device: str = arg("auto", "auto (cuda, then mps, then cpu) | cuda | mps | cpu")
    mixed_precision: str | None = arg(None, "no | fp16 | bf16 (through Accelerate); None: the launcher's, else no")
    compile: bool = arg(False, "torch.compile the network")
    gradient_checkpointing: bool = arg(False, "recompute each Down, Up and attention block in the backward pass")
    channels_last: bool = arg(False, "channels_last memory format")
    num_workers: int = arg(0, "DataLoader worker processes")
    data_on_device: bool | None = arg(None, "hold the data set on the training device; None: when it fits easily")


# ----------------------------------------------------------------------------- the conditions
TASKS = ("superres", "inpaint", "colorize")
DOWNSAMPLES = ("box", "bicubic")


def condition_channels(task, channels):
    """The channels of the condition image of `task` on images of `channels` channels."""
    return {"superres": channels, "inpaint": channels + 1, "colorize": 1}[task]


def check_task(task, scale, downsample, masks, image_size, channels=None):
    """One readable error for each task setting that cannot work (channels None: not known yet)."""
    if task not in TASKS:
        raise UsageError(f"task '{task}' is unknown: use one of {', '.join(TASKS)}")
    if task == "superres":
        if scale < 2 or image_size % scale:
            raise UsageError(f"scale {scale} does not divide image_size {image_size} into a low-resolution image: "
                             "use a divisor of it, 2 or more, e.g. --scale 2 or 4")
        if downsample not in DOWNSAMPLES:
            raise UsageError(f"downsample '{downsample}' is unknown: use one of {', '.join(DOWNSAMPLES)}")
    if task == "inpaint" and masks not in MASKS:
        Masks(masks, image_size)  # a folder: read and checked here, so a bad one fails before training
    if task == "colorize" and channels == 1:
        raise UsageError("colorize needs RGB images, and these are grey: pass --channels 3 and a colour data set, "
                         "or choose --task superres or inpaint")


def grey(images):
    """RGB images (B, 3, H, W) in [-1, 1] -> their luma (B, 1, H, W) (ITU-R 601, as data.LUMA and PIL's 'L')."""
    weights = torch.as_tensor(LUMA, dtype=images.dtype, device=images.device)
    return torch.einsum("c,bchw->bhw", weights, images)[:, None]


def blurred_fill(images, holes, iterations=None):
    """The baseline of inpainting: each hole filled by diffusing the known pixels into it (a harmonic fill: the
    hole is replaced by the 3 x 3 mean of its neighbourhood `iterations` times, 4 S by default), known pixels kept."""
    known = 1 - holes
    start = (images * known).sum(dim=(2, 3), keepdim=True) / known.sum(dim=(2, 3), keepdim=True).clamp(min=1)
    filled = images * known + start * holes  # (B, C, H, W): the hole starts at the mean of the known pixels
    for _ in range(iterations or 4 * images.shape[-1]):
        blurred = F.avg_pool2d(F.pad(filled, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        filled = images * known + blurred * holes
    return filled


@dataclass
class Degradation:
    """What the condition of a task is, and how it is shown: built from a run's settings by `from_settings`.

    `condition(x_0, holes)` -> the condition image (B, cond_channels, H, W) of clean images in [-1, 1];
    `baseline(...)` -> what a method without learning makes of the input (bicubic upsampling, a blurred fill, or the
    grey image); `shown_input(...)` -> the input as a picture at full size.
    """
    task: str
    scale: int = 4
    downsample: str = "box"
    masks: Masks | None = None

    @classmethod
    def from_settings(cls, settings, masks=None):
        """The Degradation of a run's config (a dict); `masks` replaces the run's --masks."""
        task = settings["task"]
        spec = masks or settings.get("masks", "halves")
        return cls(task, settings.get("scale", 4), settings.get("downsample", "box"),
                   Masks(spec, settings["image_size"]) if task == "inpaint" else None)

    def low_res(self, images):
        """(B, C, S, S) -> (B, C, S / scale, S / scale)."""
        if self.downsample == "box":
            return F.avg_pool2d(images, self.scale)
        return F.interpolate(images, scale_factor=1 / self.scale, mode="bicubic", antialias=True,
                             align_corners=False).clamp(-1, 1)

    def upsample(self, low):
        """Bicubic upsampling by `scale`, clamped to the data range: SR3's condition, and the baseline."""
        return F.interpolate(low, scale_factor=self.scale, mode="bicubic", align_corners=False).clamp(-1, 1)

    def draw_holes(self, n, generator=None, device="cpu"):
        """(n, 1, S, S) hole masks of --masks (inpaint), or None."""
        return None if self.masks is None else self.masks.draw(n, generator).to(device)

    def condition(self, images, holes=None):
        """The condition image of clean images (B, C, S, S) in [-1, 1]; inpaint needs the holes (B, 1, S, S)."""
        if self.task == "superres":
            return self.upsample(self.low_res(images))
        if self.task == "inpaint":
            return inpaint_condition(images, holes)
        return grey(images)

    def baseline(self, cond, holes=None):
        """What the input gives without learning, from the condition: bicubic upsampling (superres: the condition
        itself), the blurred fill of the hole (inpaint), the grey image in every channel (colorize)."""
        if self.task == "superres":
            return cond
        if self.task == "inpaint":
            return blurred_fill(cond[:, :-1], holes)
        return cond.expand(-1, 3, -1, -1)

    def keep_known(self, outputs, cond):
        """The result of a task from the network's outputs: for inpaint the known pixels of the input with the output
        only in the hole (the mask is the condition's last channel), as Palette returns it; the outputs otherwise."""
        if self.task != "inpaint":
            return outputs
        return torch.lerp(cond[:, :-1].to(outputs), outputs, cond[:, -1:].to(outputs))  # the input is 0 in the hole

    def baseline_name(self):
        return {"superres": "bicubic", "inpaint": "blurred fill", "colorize": "grey"}[self.task]

    def shown_input(self, images, cond):
        """The input at full size: the low-resolution image by nearest neighbour, the masked image, the grey one."""
        if self.task == "superres":
            return F.interpolate(self.low_res(images), scale_factor=self.scale, mode="nearest")
        return cond[:, :-1] if self.task == "inpaint" else cond

    def input_name(self, image_size):
        if self.task == "superres":
            return f"input ({image_size // self.scale} px, {self.downsample})"
        return {"inpaint": "input (hole: grey)", "colorize": "input (grey)"}[self.task]


def inpaint_condition(images, holes):
    """Palette's condition: the image with the hole set to 0 (mid grey), and the hole mask: (B, C + 1, S, S)."""
    return torch.cat([images * (1 - holes), holes], dim=1)


def save_rows(rows, path):
    """One grid row per (caption, images (n, C, S, S) in [-1, 1]); grey rows are shown in every channel of RGB ones."""
    channels = max(images.shape[1] for _, images in rows)
    images = torch.cat([images.expand(-1, channels, -1, -1).float().cpu() for _, images in rows])
    save_images(images, path, nrow=rows[0][1].shape[0], captions=[caption for caption, _ in rows])


def comparison_rows(degradation, images, cond, holes, outputs, image_size):
    """The grid of a run: input, output, ground truth, and for super-resolution the bicubic baseline."""
    rows = [(degradation.input_name(image_size), degradation.shown_input(images, cond)), ("output", outputs),
            ("ground truth", images)]
    if degradation.task == "superres":
        rows.append(("bicubic", degradation.baseline(cond, holes)))
    return rows


# ----------------------------------------------------------------------------- the task of training.py
def img2img_task(cfg, accelerator):
    """The Task of training.train: held-out split, the conditioned U-Net, batches with their conditions, grids."""
    from ddpm import Diffusion
    from training import Task, build_model

    device = accelerator.device
    channels = cfg.channels or dataset_channels(cfg.dataset, cfg.dataset_path)
    check_task(cfg.task, cfg.scale, cfg.downsample, cfg.masks, cfg.image_size, channels)
    with accelerator.main_process_first():
        dataset, held, classes = run_datasets(cfg.dataset, cfg.dataset_path, cfg.image_size, cfg.seed,
                                              cfg.dataset_size, cfg.augment, channels, cfg.holdout)
    degradation = Degradation.from_settings({**vars(cfg), "channels": channels})
    num_classes = len(classes) if cfg.class_conditional else None
    net = build_model(cfg, num_classes, channels, cond_channels=condition_channels(cfg.task, channels))
    diffusion = Diffusion(cfg.noise_steps, cfg.beta_start, cfg.beta_end, cfg.image_size, c_in=channels, device=device,
                          clip_x0=cfg.clip_x0, schedule=cfg.schedule, min_snr_gamma=cfg.min_snr_gamma,
                          prediction_type=cfg.prediction_type)

    # the grid: fixed held-out images (training images without a holdout), masks and noise
    shown = held if held is not None else dataset
    n = min(cfg.n_samples, len(shown))
    images = torch.stack([shown[i][0] for i in range(n)]).to(device)
    labels = torch.tensor([shown[i][1] for i in range(n)], device=device) if num_classes else None
    holes = degradation.draw_holes(n, torch.Generator().manual_seed(cfg.seed), device)
    cond = degradation.condition(images, holes)

    def draw_grid(module, path):
        outputs = diffusion.sample_x0(module, n, labels, cfg.cfg_scale, sampler=cfg.sampler, steps=cfg.sample_steps,
                                      seed=cfg.seed, progress=False, cond=cond)
        outputs = degradation.keep_known(outputs, cond)
        save_rows(comparison_rows(degradation, images, cond, holes, outputs, cfg.image_size), path)

    def make_batch(batch):
        x_0, batch_labels = batch
        batch_cond = degradation.condition(x_0, degradation.draw_holes(len(x_0), device=x_0.device))
        drop = torch.rand(len(x_0), device=x_0.device) < cfg.p_uncond  # the null condition: zeros (and no label)
        batch_cond = batch_cond.masked_fill(drop[:, None, None, None], 0.0)
        if num_classes is None:
            return x_0, {"cond": batch_cond}
        return x_0, {"labels": batch_labels.masked_fill(drop, NULL_LABEL), "cond": batch_cond}

    return Task(dataset, net, diffusion, make_batch, draw_grid, None, classes if num_classes else None, channels)


def validate(cfg):
    """The task's settings, before the loop's own checks (training.validate)."""
    check_task(cfg.task, cfg.scale, cfg.downsample, cfg.masks, cfg.image_size, cfg.channels)
    if cfg.channels not in (None, *CHANNELS):
        raise UsageError(f"channels {cfg.channels} is not supported: use 1 (grey), 3 (RGB) or None (the data set's)")


def main(argv=None):
    from training import RUN_FLAGS, train
    from utils import parse_config

    cfg, flags = parse_config(Config, argv, __doc__, extra=RUN_FLAGS)
    validate(cfg)
    return train(cfg, flags, img2img_task)


if __name__ == "__main__":
    run_cli(main)
