"""Class-conditional DDPM with classifier-free guidance, on CIFAR-10 by default.

    python ddpm_conditional.py                                   (CIFAR-10 at 64 px: a GPU job)
    python ddpm_conditional.py --config configs/quick_cpu.json   (built-in shapes at 16 px: minutes on a CPU)

Each row's label is dropped with probability p_uncond, so one network learns both eps(x_t, t, y) and
eps(x_t, t); the grids are sampled with guidance, lerp(eps_uncond, eps_cond, cfg_scale), from an EMA of the
weights as well as from the weights themselves. `--conditioning` picks how the label enters the network
(add, concat, xattn, adanorm: see modules.UNet_conditional). The diffusion math lives in ddpm.py.
"""
from dataclasses import dataclass

from utils import arg, run_cli


# ----------------------------------------------------------------------------- hyperparameters
@dataclass
class Config:
    run_name: str = arg("DDPM_conditional", "results/<run_name>/ and models/<run_name>/ hold this run's files")
    dataset: str = arg("cifar10", "cifar10 | imagefolder (one subfolder per class) | shapes (built in)")
    dataset_path: str = arg("./data", "folder of the dataset (cifar10 downloads here)")
    dataset_size: int | None = arg(None, "use only this many images (None: all)")
    holdout: int = arg(0, "images held out of training (drawn with the seed), on which evaluate.py --repaint "
                          "measures inpainting")
    augment: str | None = arg(None, "resize (+ centre crop) | flip (+ horizontal flips) | reference (its random crop); "
                                    "None: flip for cifar10, else resize")
    image_size: int = arg(64, "training resolution in pixels, divisible by 8 (by 8 times the VAE's factor with --vae)")
    vae: str = arg("none", "train in the latents of this frozen AutoencoderKL: a folder of train_vae.py "
                           "(models/<run>/vae) or a Hub id; none = pixel space")
    cache_latents: bool = arg(False, "encode the images once with the VAE, then train from the cache (fixes one "
                                     "augmentation per image)")
    cache_dir: str = arg("data/latent_cache", "folder of the latent caches, one file per cache key")
    channels: int | None = arg(None, "image channels: 1 (grey) | 3 (RGB); None: the data set's (1 for a folder of grey "
                                     "image files, such as the digits; else 3)")
    backbone: str = arg("unet", "the network: unet (the reference's U-Net) | dit (a Diffusion Transformer with "
                                "adaLN-Zero, Peebles & Xie 2023)")
    dit_size: str = arg("dit-s", "DiT depth, width and heads: dit-t | dit-xs (CPU sizes) | dit-s | dit-b (the "
                                 "paper's S and B)")
    patch_size: int = arg(2, "DiT patch size in pixels (latent pixels with --vae): 2 | 4 (tokens: side^2 / "
                                   "patch_size^2)")
    base_channels: int = arg(64, "U-Net width; 64 is the reference network (23M parameters)")
    attn_factors: str = arg("1,2,4,8", "self-attention after the U-Net blocks at these downsampling factors (1: full "
                                       "resolution, 8: the lowest); the reference: all four")
    dropout: float = arg(0.0, "dropout rate between the two convolutions of every U-Net block, in training")
    conditioning: str = arg("add", "how the label enters: add (the reference's) | concat | xattn | adanorm")
    batch_size: int = arg(14, "images per optimizer step")
    epochs: int = arg(300, "passes over the data set")
    max_steps: int | None = arg(None, "stop after this many optimizer steps, whatever the epochs")
    lr: float = arg(3e-4, "AdamW learning rate")
    noise_steps: int = arg(1000, "T, the number of diffusion steps")
    beta_start: float = arg(1e-4, "beta_1 of the linear schedule")
    beta_end: float = arg(0.02, "beta_T of the linear schedule")
    schedule: str = arg("linear", "noise schedule: linear (the DDPM paper's) | cosine (Nichol & Dhariwal 2021)")
    min_snr_gamma: float | None = arg(5.0, "Min-SNR-gamma loss weights (Hang et al. 2023): min(SNR_t, gamma) / SNR_t "
                                           "for epsilon, min(SNR_t, gamma) for sample, min(SNR_t, gamma) / "
                                           "(SNR_t + 1) for v_prediction; None: the plain DDPM loss of the reference")
    prediction_type: str = arg("epsilon", "what the network predicts: epsilon (the noise, DDPM) | v_prediction "
                                          "(v = sqrt(alpha_hat) eps - sqrt(1 - alpha_hat) x_0, Salimans & Ho 2022) | "
                                          "sample (x_0)")
    lr_warmup: int = arg(0, "optimizer steps of linear learning-rate warm-up from 0 (the DDPM paper: 5000)")
    lr_decay: str = arg("none", "learning rate after the warm-up: none (constant) | cosine (to 0 at max_steps, "
                                     "or at the last epoch)")
    p_uncond: float = arg(0.1, "probability of dropping each row's label, to learn the unconditional eps")
    cfg_scale: float = arg(3.0, "guidance scale of the grids: 0 = conditional only, >1 = stronger guidance")
    ema_beta: float = arg(0.995, "EMA decay per step")
    ema_start: int = arg(0, "steps during which the EMA model is a plain copy (the reference: 2000)")
    ema_warmup: bool = arg(True, "EMA decay min(ema_beta, (1 + n) / (10 + n)) at update n (false: the reference)")
    grad_clip: float | None = arg(1.0, "clip the gradient norm to this, as the DDPM paper (None: the reference)")
    clip_x0: bool | None = arg(None, "clip the predicted x_0 to [-1, 1] at each sampling step (None: in pixel space "
                                     "only, where it is true; false: the reference)")
    sampler: str = arg("dpm++", "sampler of the grids: ddpm | ddim | dpm++ | dpm++ode | euler_a")
    sample_steps: int | None = arg(None, "network steps of the grid sampler (None: its default)")
    eval_every: int | None = arg(None, "every this many steps, measure eval_samples EMA samples with evaluate.py's judge "
                                       "and plot the figures beside the loss (None: off)")
    eval_samples: int = arg(100, "samples per --eval_every measurement, balanced over the classes")
    n_per_class: int = arg(8, "images in each class row of the grids")
    log_every: int = arg(10, "save grids, loss plot and checkpoints every this many epochs")
    report_to: str = arg("tensorboard", "experiment tracking through Accelerate: none | tensorboard (offline, in "
                                        "results/<run_name>/logs) | wandb (offline unless logged in) | all")
    gradient_accumulation_steps: int = arg(1, "batches per optimizer step: batch_size x processes x this images")
    checkpoint_every: int = arg(500, "optimizer steps between checkpoints (training_state.pt for --resume)")
    keep_checkpoints: int = arg(2, "training states kept in models/<run_name>/checkpoints/, the newest included")
    max_nonfinite: int = arg(20, "stop after this many non-finite losses in a row (each update is skipped)")
    print_every: int = arg(10, "optimizer steps between reads of the loss from the device (progress bar, losses)")
    seed: int = arg(0, "seed of the data order, the noise and the grids")
    device: str = arg("auto", "auto (cuda, then mps, then cpu) | cuda | mps | cpu")
    mixed_precision: str | None = arg(None, "no | fp16 | bf16 (through Accelerate); None: the launcher's "
                                            "(accelerate launch --mixed_precision, accelerate config), else no")
    compile: bool = arg(False, "torch.compile the network")
    gradient_checkpointing: bool = arg(False, "recompute each Down, Up and attention block (DiT: each block) in "
                                              "the backward pass (torch.utils.checkpoint): less activation "
                                              "memory, more compute")
    channels_last: bool = arg(False, "channels_last memory format (slower on the CPU; unmeasured on a GPU: see the "
                                     "layout row of scripts/gpu_check.sh)")
    num_workers: int = arg(2, "DataLoader worker processes (with --data_on_device: only to read the data set once)")
    data_on_device: bool | None = arg(None, "hold the data set on the training device and index batches there, no "
                                            "DataLoader workers; None: when it takes at most a quarter of the free "
                                            "memory")


def main(argv=None):
    from training import train_images

    return train_images(Config, argv, conditional=True, description=__doc__)


if __name__ == "__main__":
    run_cli(main)
