"""The first stage of latent diffusion: a diffusers AutoencoderKL trained from scratch on your images.

    python train_vae.py --config configs/vae_shapes.json     (the built-in shapes at 32 px: minutes on a CPU)
    python train_sd.py --config configs/sd_shapes_latent.json     (then text-to-image in its latents)
    python ddpm_conditional.py --vae models/vae_shapes/vae ...     (or class-conditional latent diffusion)

The autoencoder is built from its config, never downloaded: f = 2^(blocks - 1) (3 blocks: a 32 px image becomes
8 x 8 x latent_channels). It trains with the one loop of training.py on the loss of `vae_loss`; then the training
images are encoded, the latent scale (scaling_factor = 1 / std of the posterior means, shift_factor = their mean)
is stored in its config, and it is saved with save_pretrained to models/<run_name>/vae, which every script loads
with --vae, as it loads Stability's VAE. Held-out PSNR and SSIM (torchmetrics) go to
results/<run_name>/vae_metrics.json, and originals above their reconstructions to reconstructions.png.
"""
import dataclasses
import functools
import os
import time

import torch
import torch.nn.functional as F

from checkpoints import load_state_dict_strict, read_checkpoint
from config import ClassData, Data, Optimisation, Run, positive
from data import get_dataset, holdout_split
from modules import Autoencoder, PatchDiscriminator
from training import RUN_FLAGS, Task, train
from utils import UsageError, arg, configclass, parse_config, pick_device, run_cli, save_images, write_json


# ----------------------------------------------------------------------------- hyperparameters
@configclass(Run, Data, ClassData, Optimisation)
class Config:
    block_out_channels: str = arg("32,64,64", "widths of the encoder's blocks, the decoder's reversed; f = 2^(blocks "
                                              "- 1): 3 blocks give f = 4")
    layers_per_block: int = arg(1, "ResNet layers in each block (the decoder has one more)")
    latent_channels: int = arg(4, "channels of the latents: a 32 px image becomes (latent_channels, 32/f, 32/f)")
    norm_num_groups: int = arg(4, "GroupNorm groups; must divide every width (one channel a group is instance norm, "
                                  "which loses the colour of flat regions)")
    loss: str = arg("l1", "reconstruction loss: l1 | mse, the mean over every pixel and channel of [-1, 1] images")
    kl_weight: float = arg(1e-4, "weight of KL(posterior || N(0, I)), the mean over every latent element (LDM's "
                                 "1e-6 weighs a sum over latents against a sum over pixels: 1e-6 * 3 f^2 / C here)")
    disc_start: int | None = arg(None, "train a PatchGAN discriminator with the hinge loss from this step on "
                                       "(None: no discriminator)")
    disc_weight: float = arg(0.5, "the generator's adversarial loss weight, times LDM's adaptive weight")
    disc_channels: int = arg(32, "width of the discriminator's first layer")
    disc_layers: int = arg(2, "stride-2 layers of the discriminator: patches of about 2^(layers + 2) px")
    scale_images: int = arg(5000, "training images encoded after training to measure the latents' scale",
                            resumable=True)
    shift: bool = arg(True, "store shift_factor = the mean of the posterior means (false: none, as in SD 1.x)",
                      resumable=True)
    export: str = arg("ema", "weights saved as models/<run_name>/vae: ema | model", resumable=True)
    run_name = "VAE"
    image_size = 32
    holdout = 200
    epochs = 1000
    max_steps = 3000
    lr = 1e-3
    lr_decay = "cosine"
    ema_beta = 0.999
    log_every = 5
    report_to = "none"

    def validate(self):
        widths = parse_widths(self.block_out_channels)
        factor = 2 ** (len(widths) - 1)
        if self.image_size % factor:
            raise UsageError(f"image_size {self.image_size} is not divisible by the VAE's factor {factor} "
                             f"({len(widths)} blocks): use a multiple of {factor}, or fewer blocks")
        if any(w % self.norm_num_groups for w in widths):
            raise UsageError(f"norm_num_groups {self.norm_num_groups} does not divide every width of "
                             f"block_out_channels {self.block_out_channels}: use a common divisor, e.g. 8")
        if self.loss not in LOSSES:
            raise UsageError(f"loss '{self.loss}' is unknown: use l1 or mse")
        if self.export not in ("ema", "model"):
            raise UsageError(f"export '{self.export}' is unknown: use ema or model")
        positive(self, "holdout", "scale_images", "latent_channels", "layers_per_block", "disc_channels",
                 "disc_layers")
        if self.kl_weight < 0 or self.disc_weight < 0:
            raise UsageError("kl_weight and disc_weight must be >= 0")


SHOWN = 12  # held-out images in each row of the reconstruction pictures


def parse_widths(text):
    """'32,64,64' -> (32, 64, 64); anything else is a UsageError."""
    try:
        widths = tuple(int(item) for item in str(text).split(","))
    except ValueError:
        widths = ()
    if not widths or min(widths) <= 0:
        raise UsageError(f"block_out_channels '{text}' is not a list of positive widths: use e.g. 32,64,64")
    return widths


# ----------------------------------------------------------------------------- the autoencoder and its loss
def build_autoencoder(cfg):
    """diffusers' AutoencoderKL from the Config (and the PatchGAN discriminator when disc_start is set)."""
    from diffusers import AutoencoderKL

    widths = parse_widths(cfg.block_out_channels)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(widths),
                        up_block_types=("UpDecoderBlock2D",) * len(widths), block_out_channels=widths,
                        layers_per_block=cfg.layers_per_block, latent_channels=cfg.latent_channels,
                        norm_num_groups=cfg.norm_num_groups, sample_size=cfg.image_size)
    discriminator = None
    if cfg.disc_start is not None:
        discriminator = PatchDiscriminator(cfg.disc_channels, cfg.disc_layers)
    return Autoencoder(vae, discriminator)


LOSSES = {"l1": F.l1_loss, "mse": F.mse_loss}


def adaptive_weight(reconstruction_loss, generator_loss, last_layer):
    """LDM's balance of the adversarial loss: ||grad of the reconstruction loss|| / ||grad of the generator's
    loss||, both at the decoder's last layer, clamped to [0, 1e4] (Esser et al. 2021, eq. 7)."""
    rec_grad = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)[0]
    gen_grad = torch.autograd.grad(generator_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (gen_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


def vae_loss(model, x, conditioning, step, cfg, last_layer):
    """reconstruction + kl_weight * KL (+ the adversarial losses from disc_start on).

    Normalisation: the reconstruction loss (L1 or MSE) is the mean over every pixel and channel of images in
    [-1, 1]; the KL of the posterior N(mean, std^2) from N(0, I) is the mean over every latent element
    (diffusers' DiagonalGaussianDistribution.kl() sums over the latent, so divided by C h w), and over the batch.
    With the discriminator: its hinge loss, 0.5 (E relu(1 - D(x)) + E relu(1 + D(x_rec))), and the autoencoder's
    -E D(x_rec) times disc_weight times `adaptive_weight`; each reaches only its own network (see
    modules.Autoencoder). A loss that is not finite is skipped by the loop like a diffusion loss.
    """
    reconstruction, posterior, logits = model(x)
    rec = LOSSES[cfg.loss](reconstruction.float(), x.float())
    kl = posterior.kl().float().mean() / posterior.mean[0].numel()
    loss = rec + cfg.kl_weight * kl
    if logits is None:
        return loss
    on = float(step >= cfg.disc_start)  # before disc_start both adversarial terms weigh 0, as in LDM
    d_loss = 0.5 * (F.relu(1.0 - logits["real"]).mean() + F.relu(1.0 + logits["fake"]).mean())
    g_loss = -logits["generator"].mean()
    weight = cfg.disc_weight * adaptive_weight(rec, g_loss, last_layer) if on else 0.0
    return loss + on * (weight * g_loss + d_loss)


# ----------------------------------------------------------------------------- data and pictures
def first_stage_data(cfg):
    """(training images, held-out images): `holdout` images drawn with the seed are never trained on."""
    dataset = get_dataset(cfg.dataset, cfg.dataset_path, cfg.image_size, seed=cfg.seed, size=cfg.dataset_size,
                          augment=cfg.augment)
    if cfg.holdout >= len(dataset):
        raise UsageError(f"holdout {cfg.holdout} leaves none of the {len(dataset)} images to train on: use a smaller "
                         "--holdout or a larger --dataset_size")
    return holdout_split(dataset, cfg.holdout, cfg.seed)


def stack_images(dataset, limit=None):
    """The first `limit` images of a data set (all with None) as one (N, 3, S, S) tensor."""
    count = len(dataset) if limit is None else min(limit, len(dataset))
    return torch.stack([dataset[i][0] for i in range(count)])


@torch.no_grad()
def reconstruct(vae, images, batch_size=250):
    """Images in [-1, 1] -> the decoded posterior means, in [-1, 1], on the CPU."""
    out = []
    for batch in images.split(batch_size):
        posterior = vae.encode(batch.to(vae.device, vae.dtype)).latent_dist
        out.append(vae.decode(posterior.mean).sample.float().clamp(-1, 1).cpu())
    return torch.cat(out)


def save_reconstructions(vae, images, path, worst=None):
    """Originals above their reconstructions (and, given `worst` indices, the worst ones likewise), one row each."""
    rows, captions = [], []
    for name, chosen in (("held-out", images[:SHOWN]), ("worst", None if worst is None else images[worst[:SHOWN]])):
        if chosen is None:
            continue
        rows += [chosen, reconstruct(vae, chosen)]
        captions += [f"{name} originals", "their reconstructions"]
    save_images(torch.cat(rows), path, nrow=len(rows[0]), captions=captions)


# ----------------------------------------------------------------------------- the latent scale and the figures
def latent_scale(means, shift=True):
    """(scaling_factor, shift_factor) that make the posterior means (N, C, h, w) zero-mean with unit std over all
    elements: 1 / std, and the mean (None without `shift`, as in SD 1.x, whose latents are scaled only)."""
    means = means.double()
    return float(1.0 / means.std()), float(means.mean()) if shift else None


@torch.no_grad()
def posterior_means(vae, images, batch_size=250):
    """The unscaled posterior means (N, C, h, w) of images in [-1, 1], on the CPU."""
    return torch.cat([vae.encode(batch.to(vae.device, vae.dtype)).latent_dist.mean.float().cpu()
                      for batch in images.split(batch_size)])


def worst_decile(values):
    """The mean of the lowest tenth of `values` (at least one): how the hardest images fare."""
    ordered = values.sort().values
    return float(ordered[:max(1, len(ordered) // 10)].mean())


def reconstruction_figures(vae, images):
    """PSNR (dB) and SSIM of the reconstructions of images in [-1, 1], per image, through torchmetrics, on [0, 1]."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    target = (images.float() + 1) / 2
    predicted = (reconstruct(vae, images) + 1) / 2
    psnr = peak_signal_noise_ratio(predicted, target, data_range=1.0, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(predicted, target, data_range=1.0, reduction="none")
    return psnr, ssim


def export(cfg, models_dir, results_dir, train_set, held_out, device):
    """Load the trained weights, store the latent scale in the VAE's config, save it, and measure it."""
    net = build_autoencoder(cfg)
    weights = "ema_ckpt.pt" if cfg.export == "ema" else "ckpt.pt"
    load_state_dict_strict(net, read_checkpoint(os.path.join(models_dir, weights))[0])
    vae = net.vae.to(device).eval().requires_grad_(False)
    means = posterior_means(vae, stack_images(train_set, cfg.scale_images))
    scale, shift = latent_scale(means, cfg.shift)
    vae.register_to_config(scaling_factor=scale, shift_factor=shift)
    vae_dir = os.path.join(models_dir, "vae")
    vae.save_pretrained(vae_dir)

    images = stack_images(held_out)
    psnr, ssim = reconstruction_figures(vae, images)
    scaled = (posterior_means(vae, images) - (shift or 0.0)) * scale
    picture = os.path.join(results_dir, "reconstructions.png")
    save_reconstructions(vae, images, picture, worst=psnr.argsort())
    metrics = {"vae": vae_dir, "weights": cfg.export, "heldout_images": len(images),
               "psnr_mean": float(psnr.mean()), "psnr_worst_decile": worst_decile(psnr),
               "ssim_mean": float(ssim.mean()), "ssim_worst_decile": worst_decile(ssim),
               "latent_shape": list(means.shape[1:]), "scale_images": len(means),
               "latent_std": float(means.std()), "latent_mean": float(means.mean()),
               "latent_channel_std": means.transpose(0, 1).flatten(1).std(dim=1).tolist(),
               "scaling_factor": scale, "shift_factor": shift,
               "heldout_scaled_std": float(scaled.std()), "heldout_scaled_mean": float(scaled.mean()),
               "parameters": sum(p.numel() for p in vae.parameters()),
               "worst_decile_note": "the mean over the lowest tenth of the held-out images"}
    print(f"latents {tuple(means.shape[1:])} of {len(means)} training images: std {metrics['latent_std']:.4f}, mean "
          f"{metrics['latent_mean']:.4f} before scaling -> scaling_factor {scale:.5f}, shift_factor "
          f"{'none' if shift is None else f'{shift:.5f}'}; held out, scaled: std {metrics['heldout_scaled_std']:.3f}")
    print(f"held-out reconstructions ({len(images)} images): PSNR {metrics['psnr_mean']:.2f} dB (worst decile "
          f"{metrics['psnr_worst_decile']:.2f}), SSIM {metrics['ssim_mean']:.4f} (worst decile "
          f"{metrics['ssim_worst_decile']:.4f}); saved {vae_dir}/ and {picture}")
    return metrics


# ----------------------------------------------------------------------------- training
def vae_task(cfg, accelerator):
    """What training.train trains here: the autoencoder on images, with `vae_loss` instead of a diffusion loss."""
    with accelerator.main_process_first():  # one process downloads (CIFAR-10); the others then read its files
        train_set, held_out = first_stage_data(cfg)
    net = build_autoencoder(cfg)
    shown = stack_images(held_out, SHOWN)

    def make_batch(batch):
        return batch[0], None

    def draw_grid(module, path):
        save_reconstructions(module.vae, shown, path)

    loss = functools.partial(vae_loss, cfg=cfg, last_layer=net.vae.decoder.conv_out.weight)
    return Task(cfg, train_set, net, None, make_batch, draw_grid, loss=loss)


def main(argv=None):
    from accelerate import PartialState

    cfg, flags = parse_config(Config, argv, __doc__, extra=RUN_FLAGS)
    start = time.perf_counter()
    run = train(cfg, flags, vae_task)
    if run["stopped"]:  # not the run asked for: no VAE is exported from it
        print("the VAE is exported when the run ends: continue it with --resume")
        return run
    if not PartialState().is_main_process:  # under a launcher the main process exports
        return run
    metrics = export(cfg, run["models_dir"], run["results_dir"], *first_stage_data(cfg), pick_device(cfg.device))
    metrics.update({"steps": run["step"], "skipped_steps": run["skipped"],
                    "train_seconds": round(run["train_seconds"], 1),
                    "train_cpu_seconds": round(run["train_cpu_seconds"], 1),
                    "wall_seconds": round(time.perf_counter() - start, 1),
                    "config": dataclasses.asdict(cfg)})
    write_json(metrics, os.path.join(run["results_dir"], "vae_metrics.json"))
    return metrics


if __name__ == "__main__":
    run_cli(main)
