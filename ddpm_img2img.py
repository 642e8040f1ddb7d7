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
class accuracy on them. The conditions are degradations.py's; the diffusion math, guidance and the samplers live in
diffusion.py, the loop in training.py.
"""
import dataclasses

import torch

from checkpoints import run_diffusion
from config import Channels, ClassData, Conditional, Data, Network, Optimisation, Run, Sampling, Schedule, network_arch
from data import dataset_channels, run_datasets
from degradations import Degradation, check_task, comparison_rows, condition_channels, save_rows
from diffusion import dropped_rows
from latents import Latents
from modules import NULL_LABEL, build_network
from training import RUN_FLAGS, Task, train
from utils import arg, configclass, parse_config, run_cli


# ----------------------------------------------------------------------------- hyperparameters
@configclass(Run, Data, Channels, ClassData, Network, Schedule, Optimisation, Conditional, Sampling)
class Config:
    task: str = arg("superres", "what the condition is: superres | inpaint | colorize (see the docstring)")
    scale: int = arg(4, "superres: the downsampling factor (2 or 4); must divide image_size")
    downsample: str = arg("box", "superres: how the low-resolution image is made: box (mean of each block) | bicubic "
                                 "(antialiased)")
    masks: str = arg("halves", "inpaint: the holes drawn per image: boxes | halves | lower | strokes | a folder of "
                               "mask images (white: the hole)")
    class_conditional: bool = arg(False, "also condition on the class label (added to the time embedding)")
    run_name = "DDPM_img2img"
    dataset = "imagefolder"
    dataset_path = "./data/digits"
    holdout = 300
    image_size = 16
    base_channels = 32
    attn_factors = "2,4,8"
    batch_size = 64
    epochs = 1000
    lr = 2e-3
    cfg_scale = 0.0
    clip_x0 = True
    log_every = 1000
    report_to = "none"
    num_workers = 0

    def validate(self):
        check_task(self.task, self.scale, self.downsample, self.masks, self.image_size, self.channels)


# ----------------------------------------------------------------------------- the task of training.py
def img2img_task(cfg, accelerator):
    """The Task of training.train: held-out split, the conditioned U-Net, batches with their conditions, grids."""
    device = accelerator.device
    cfg = dataclasses.replace(cfg, channels=cfg.channels or dataset_channels(cfg.dataset, cfg.dataset_path))
    channels = cfg.channels
    check_task(cfg.task, cfg.scale, cfg.downsample, cfg.masks, cfg.image_size, channels)
    with accelerator.main_process_first():
        dataset, held, classes = run_datasets(cfg.dataset, cfg.dataset_path, cfg.image_size, cfg.seed,
                                              cfg.dataset_size, cfg.augment, channels, cfg.holdout)
    degradation = Degradation.from_settings(vars(cfg))
    num_classes = len(classes) if cfg.class_conditional else None
    net = build_network(network_arch(cfg, channels, num_classes, condition_channels(cfg.task, channels)))
    diffusion = run_diffusion(cfg, Latents(None, channels), device)

    # the grid: fixed held-out images (training images without a holdout), masks and noise
    shown = held if held is not None else dataset
    n = min(cfg.n_per_row, len(shown))
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
        drop = dropped_rows(len(x_0), cfg.p_uncond, x_0.device)  # the null condition: zeros (and no label)
        batch_cond = batch_cond.masked_fill(drop[:, None, None, None], 0.0)
        if num_classes is None:
            return x_0, {"cond": batch_cond}
        return x_0, {"labels": batch_labels.masked_fill(drop, NULL_LABEL), "cond": batch_cond}

    return Task(cfg, dataset, net, diffusion, make_batch, draw_grid, classes=classes if num_classes else None)


def main(argv=None):
    cfg, flags = parse_config(Config, argv, __doc__, extra=RUN_FLAGS)
    return train(cfg, flags, img2img_task)


if __name__ == "__main__":
    run_cli(main)
