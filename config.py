"""The Config field groups, each field declared once with its help text; and the network a Config describes.

A script's Config composes the groups it uses (utils.configclass) and states only its own fields and the defaults
that differ, as improved-diffusion's `model_and_diffusion_defaults()`:

    @configclass(Run, Data, Optimisation)
    class Config:
        lr = 1e-3                                   # a group's field, another default
        loss: str = arg("l1", "l1 | mse")           # the script's own field

Every group has `validate`, which turns each value it cannot use into one UsageError line naming the fix;
`parse_config` runs them all before anything is read or trained. `network_arch` reads the Network, Backbone and
Conditioning fields into the description that modules.build_network builds, as a checkpoint's weights do
(checkpoints.infer_network).
"""
from dataclasses import dataclass

from data import AUGMENTATIONS, CHANNELS
from diffusion import PREDICTION_TYPES, SAMPLERS, SCHEDULES
from modules import DIT_SIZES, PATCH_SIZES, UNet, UNet_conditional, UNet_text
from utils import UsageError, arg

PRECISIONS = ("no", "fp16", "bf16")
REPORT_TO = ("none", "tensorboard", "wandb", "all")
LR_DECAYS = ("none", "cosine")
BACKBONES = ("unet", "dit")


def positive(cfg, *names):
    """A UsageError for the first of the fields `names` of cfg that is not positive."""
    for name in names:
        if getattr(cfg, name) <= 0:
            raise UsageError(f"{name} {getattr(cfg, name)} must be positive")


# ----------------------------------------------------------------------------- the groups of the training scripts
@dataclass
class Run:
    """Where a run's files go, its seed and device, and how often it logs and saves (every training script)."""
    run_name: str = arg("run", "results/<run_name>/ and models/<run_name>/ hold this run's files")
    seed: int = arg(0, "seed of everything random in the run: the data order, the held-out split, the noise, the "
                       "masks and the grids")
    device: str = arg("auto", "auto (cuda, then mps, then cpu) | cuda | mps | cpu", resumable=True)
    mixed_precision: str | None = arg(None, "no | fp16 | bf16 (through Accelerate; the frozen networks are cast to "
                                            "it); None: the launcher's (accelerate launch --mixed_precision, "
                                            "accelerate config), else no", resumable=True)
    compile: bool = arg(False, "torch.compile the trained network", resumable=True)
    report_to: str = arg("tensorboard", "experiment tracking through Accelerate: none | tensorboard (offline, in "
                                        "results/<run_name>/logs) | wandb (offline unless logged in) | all",
                         resumable=True)
    log_every: int = arg(10, "save grids, loss plot and checkpoints every this many epochs", resumable=True)
    checkpoint_every: int = arg(500, "optimizer steps between checkpoints (training_state.pt for --resume)",
                                resumable=True)
    keep_checkpoints: int = arg(2, "training states kept in models/<run_name>/checkpoints/, the newest included",
                                resumable=True)
    max_nonfinite: int = arg(20, "stop after this many non-finite losses in a row (each update is skipped)",
                             resumable=True)
    print_every: int = arg(10, "optimizer steps between reads of the loss from the device (progress bar, losses)",
                           resumable=True)

    def validate(self):
        if self.mixed_precision not in (None, *PRECISIONS):
            raise UsageError(f"mixed_precision '{self.mixed_precision}' is unknown: use no, fp16 or bf16")
        if self.report_to not in REPORT_TO:
            raise UsageError(f"report_to '{self.report_to}' is unknown: use one of {', '.join(REPORT_TO)}")
        positive(self, "log_every", "checkpoint_every", "keep_checkpoints", "max_nonfinite", "print_every")


@dataclass
class Data:
    """The data set and how it is read (every training script)."""
    dataset: str = arg("shapes", "cifar10 | imagefolder (one subfolder per class) | shapes (built in); train_sd.py "
                                 "also captions (metadata.jsonl or <image>.txt), and captions a class 'a photo of a "
                                 "<class>'")
    dataset_path: str = arg("./data", "folder of the data set (cifar10 downloads here)")
    dataset_size: int | None = arg(None, "use only this many images, the held-out ones included (None: all; 5000 "
                                         "shapes)")
    image_size: int = arg(64, "training resolution in pixels, divisible by 8 (by 8 times the VAE's factor with "
                              "--vae)")
    num_workers: int = arg(2, "DataLoader worker processes (with --data_on_device: only to read the data set once)",
                           resumable=True)
    data_on_device: bool | None = arg(None, "hold the data set on the training device and index batches there, no "
                                            "DataLoader workers; None: when it takes at most a quarter of the free "
                                            "memory", resumable=True)

    def validate(self):
        if self.image_size % 8:
            raise UsageError(f"image_size {self.image_size} is not divisible by 8: the U-Net halves it 3 times; "
                             "use 16, 32 or 64")


@dataclass
class Channels:
    """The channels of the images a diffusion model learns (every script but train_vae.py, whose VAE is RGB)."""
    channels: int | None = arg(None, "image channels: 1 (grey; through an RGB VAE repeated, its decoding averaged) | "
                                     "3 (RGB); None: the data set's (1 for a folder of grey image files, such as the "
                                     "digits; else 3)", absent=3)

    def validate(self):
        if self.channels not in (None, *CHANNELS):
            raise UsageError(f"channels {self.channels} is not supported: use 1 (grey), 3 (RGB) or None (the data "
                             "set's)")


@dataclass
class ClassData:
    """The options of the class data sets (shapes, imagefolder, cifar10): the held-out split and augmentation."""
    holdout: int = arg(0, "images held out of training (drawn with the seed), never trained on: evaluate.py measures "
                          "on them (inpainting with --repaint, image-to-image restorations, the VAE's reconstructions)")
    augment: str | None = arg(None, "resize (+ centre crop) | flip (+ horizontal flips) | reference (its random "
                                    "crop); None: flip for cifar10, else resize")

    def validate(self):
        if self.augment not in (None, *AUGMENTATIONS):
            raise UsageError(f"augment '{self.augment}' is unknown: use one of {', '.join(AUGMENTATIONS)}, or None")
        if self.holdout < 0:
            raise UsageError(f"holdout {self.holdout} is negative: use 0 (no held-out images) or e.g. 300")


@dataclass
class Latents:
    """Training in the latents of a frozen VAE (latents.py), and the cache of those latents."""
    vae: str = arg("none", "train in the latents of this frozen AutoencoderKL: a folder of train_vae.py "
                           "(models/<run>/vae) or a Hub id; none = pixel space")
    cache_latents: bool = arg(False, "encode the images (and captions) once with the frozen networks, then train "
                                     "from the cache (it fixes one augmentation per image)", resumable=True)
    cache_dir: str = arg("data/latent_cache", "folder of the latent caches, one file per cache key", resumable=True)


@dataclass
class Network:
    """The U-Net's size and training options (modules.UNet; DiT's are the Backbone group's)."""
    base_channels: int = arg(64, "U-Net width; 64 is the reference network (23M parameters)")
    attn_factors: str = arg("1,2,4,8", "attention (self, and cross with text) after the U-Net blocks at these "
                                       "downsampling factors (1: full resolution, 8: the lowest); the reference: all "
                                       "four")
    dropout: float = arg(0.0, "dropout rate between the two convolutions of every U-Net block, in training")
    gradient_checkpointing: bool = arg(False, "recompute each Down, Up and attention block (DiT: each block) in "
                                              "the backward pass (torch.utils.checkpoint): less activation "
                                              "memory, more compute", resumable=True)
    channels_last: bool = arg(False, "channels_last memory format (slower on the CPU; unmeasured on a GPU: see the "
                                     "layout row of scripts/gpu_check.sh)")

    def validate(self):
        parse_attn_factors(self.attn_factors)
        positive(self, "base_channels")
        if not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"dropout {self.dropout} is not a rate: use a value in [0, 1), e.g. 0.1, or 0 for none")


@dataclass
class Backbone:
    """The U-Net, or the Diffusion Transformer beside it (modules.DiT)."""
    backbone: str = arg("unet", "the network: unet (the reference's U-Net) | dit (a Diffusion Transformer with "
                                "adaLN-Zero, Peebles & Xie 2023)")
    dit_size: str = arg("dit-s", "DiT depth, width and heads: dit-t | dit-xs (CPU sizes) | dit-s | dit-b (the "
                                 "paper's S and B)")
    patch_size: int = arg(2, "DiT patch size in pixels (latent pixels with --vae): 2 | 4 (tokens: side^2 / "
                             "patch_size^2)")

    def validate(self):
        if self.backbone not in BACKBONES:
            raise UsageError(f"backbone '{self.backbone}' is unknown: use one of {', '.join(BACKBONES)}")
        if self.backbone == "dit":
            dit_size(self.dit_size)
            if self.patch_size not in PATCH_SIZES:
                raise UsageError(f"patch_size {self.patch_size} is not allowed: use "
                                 f"{' or '.join(map(str, PATCH_SIZES))}")


@dataclass
class Schedule:
    """The diffusion: its noise schedule, the network's target and the loss weights (diffusion.Diffusion)."""
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

    def validate(self):
        if self.schedule not in SCHEDULES:
            raise UsageError(f"schedule '{self.schedule}' is unknown: use one of {', '.join(SCHEDULES)}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise UsageError(f"prediction_type '{self.prediction_type}' is unknown: use one of "
                             f"{', '.join(PREDICTION_TYPES)}")
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0:
            raise UsageError(f"min_snr_gamma {self.min_snr_gamma} must be positive: use e.g. 5, or None for the "
                             "plain loss")
        positive(self, "noise_steps")


@dataclass
class Optimisation:
    """The batch, the budget, AdamW's learning rate and its schedule, the EMA and gradient clipping (every training
    script)."""
    batch_size: int = arg(16, "images per optimizer step")
    epochs: int = arg(100, "passes over the data set", resumable=True)
    max_steps: int | None = arg(None, "stop after this many optimizer steps, whatever the epochs", resumable=True)
    lr: float = arg(3e-4, "AdamW learning rate")
    lr_warmup: int = arg(0, "optimizer steps of linear learning-rate warm-up from 0 (the DDPM paper: 5000)")
    lr_decay: str = arg("none", "learning rate after the warm-up: none (constant) | cosine (to 0 at max_steps, or at "
                                "the last epoch)")
    ema_beta: float = arg(0.995, "EMA decay per step")
    ema_start: int = arg(0, "steps during which the EMA model is a plain copy (the reference: 2000)")
    ema_warmup: bool = arg(True, "EMA decay min(ema_beta, (1 + n) / (10 + n)) at update n (false: the reference)")
    grad_clip: float | None = arg(1.0, "clip the gradient norm to this, as the DDPM paper (None: the reference)")
    gradient_accumulation_steps: int = arg(1, "batches per optimizer step: batch_size x processes x this images")

    def validate(self):
        if self.lr_decay not in LR_DECAYS:
            raise UsageError(f"lr_decay '{self.lr_decay}' is unknown: use one of {', '.join(LR_DECAYS)}")
        if self.lr_warmup < 0:
            raise UsageError(f"lr_warmup {self.lr_warmup} is negative: use 0 (no warm-up) or a number of steps")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise UsageError(f"grad_clip {self.grad_clip} must be positive: use e.g. 1.0, or None for no clipping")
        positive(self, "batch_size", "epochs", "gradient_accumulation_steps")


@dataclass
class Sampling:
    """How the grids of a run are sampled."""
    sampler: str = arg("dpm++", "sampler of the grids: ddpm | ddim | dpm++ | dpm++ode | euler_a", resumable=True)
    sample_steps: int | None = arg(None, "network steps of the grid sampler (None: its default)", resumable=True)
    clip_x0: bool | None = arg(None, "clip the predicted x_0 to [-1, 1] at each sampling step (None: in pixel space "
                                     "only, where it is true; a VAE's latents have no such range; false: the "
                                     "reference)", resumable=True)

    def validate(self):
        if self.sampler not in SAMPLERS:
            raise UsageError(f"sampler '{self.sampler}' is unknown: use one of {', '.join(SAMPLERS)}")


@dataclass
class Conditional:
    """A conditional model: its condition dropped in training for guidance, its grids one row per condition."""
    p_uncond: float = arg(0.1, "probability of dropping each row's condition (its label, caption or condition image) "
                               "in training, so one network also learns the unconditional prediction that guidance "
                               "needs; 0: no guidance (SR3's and Palette's training)")
    cfg_scale: float = arg(3.0, "guidance scale of the grids: 0 = the conditional prediction alone, >1 = stronger",
                           resumable=True)
    n_per_row: int = arg(8, "images in each grid row: per class, per prompt or per held-out input",
                         resumable=True, old_names=("n_per_class", "n_per_prompt", "n_per_label", "n_samples"))

    def validate(self):
        if not 0.0 <= self.p_uncond <= 1.0:
            raise UsageError(f"p_uncond {self.p_uncond} is not a probability: use a value in [0, 1], e.g. 0.1")
        if self.cfg_scale < 0:
            raise UsageError(f"cfg_scale {self.cfg_scale} is negative: use 0 (no guidance) or e.g. 3")
        positive(self, "n_per_row")


@dataclass
class Conditioning:
    """How the condition enters the network."""
    conditioning: str = arg("add", "how the condition enters the network: a class label by add (the reference's) | "
                                   "concat | xattn | adanorm (modules.UNet_conditional); a text by cross_attention "
                                   "(its token states) | add (its pooled embedding) (modules.UNet_text)")


@dataclass
class Evaluation:
    """Quality measured during training by evaluate.py's judge (judges.py), beside the loss."""
    eval_every: int | None = arg(None, "every this many steps, measure eval_samples EMA samples with evaluate.py's "
                                       "judge and plot the figures beside the loss (None: off)", resumable=True)
    eval_samples: int = arg(100, "samples per --eval_every measurement, balanced over the classes", resumable=True)

    def validate(self):
        if self.eval_every is not None and (self.eval_every <= 0 or self.eval_samples < 2):
            raise UsageError(f"eval_every {self.eval_every} / eval_samples {self.eval_samples}: use a positive "
                             "--eval_every (or None: off) and --eval_samples 2 or more, e.g. 100")


# ----------------------------------------------------------------------------- the groups of the tools
@dataclass
class Checkpoint:
    """The checkpoint a tool reads (sample.py, evaluate.py), and where it runs."""
    ckpt: str | None = arg(None, "checkpoint: models/<run>/ema_ckpt.pt, ckpt.pt or training_state.pt, or a reference "
                                 "state_dict")
    weights: str = arg("ema", "weights of a training_state.pt: ema | model (ema_ckpt.pt holds only the EMA's, ckpt.pt "
                              "only the model's)")
    clip_x0: bool | None = arg(None, "clip the predicted x_0 to [-1, 1] at each step (None: the run's setting, else "
                                     "true; false: the reference's sampler)")
    image_size: int | None = arg(None, "pixels, divisible by 8 (None: the training size, or the reference's 64)")
    seed: int = arg(0, "seed of the noise: the same seed gives the same samples")
    device: str = arg("auto", "auto (cuda, then mps, then cpu) | cuda | mps | cpu")

    def validate(self):
        if self.ckpt is None:
            raise UsageError("no checkpoint given: pass --ckpt models/<run>/ema_ckpt.pt (or a reference .pt file)")
        if self.weights not in ("ema", "model"):
            raise UsageError(f"weights '{self.weights}' is unknown: use ema or model")
        if self.image_size is not None and (self.image_size <= 0 or self.image_size % 8):
            raise UsageError(f"image_size {self.image_size} is not divisible by 8: the U-Net halves it 3 times; "
                             "use e.g. 16, 32 or 64")


@dataclass
class RePaint:
    """RePaint's resampling (Lugmayr et al. 2022) and reconstruction guidance (MCG), diffusion.Diffusion.sample_x0."""
    jump_length: int = arg(10, "RePaint: levels of each jump back up (Lugmayr et al. 2022: 10)")
    jump_n_sample: int = arg(10, "RePaint: times each stretch of jump_length levels is gone down (1: no resampling; "
                                 "the network runs about this many times as often)")
    reconstruction_guidance: float = arg(2.0, "RePaint: step zeta along the gradient that pulls the network's "
                                              "predicted known pixels to the given ones (MCG; 0: RePaint alone, "
                                              "without the network's backward pass)")

    def validate(self):
        if self.jump_length < 1 or self.jump_n_sample < 1:
            raise UsageError(f"jump_length {self.jump_length} and jump_n_sample {self.jump_n_sample} must be >= 1 "
                             "(1 and 1: no resampling)")
        if not self.reconstruction_guidance >= 0:
            raise UsageError(f"reconstruction_guidance {self.reconstruction_guidance} must be >= 0 (0: RePaint "
                             "alone)")


# ----------------------------------------------------------------------------- the network of a Config
def parse_attn_factors(text):
    """'2,4,8' -> (2, 4, 8): the U-Net's attn_factors; anything else is a UsageError."""
    try:
        factors = tuple(int(item) for item in str(text).split(","))
    except ValueError:
        factors = ()
    if not factors or set(factors) - set(UNet.ATTN_FACTORS):
        raise UsageError(f"attn_factors '{text}' is not a list of the U-Net's downsampling factors: use some of "
                         f"{','.join(map(str, UNet.ATTN_FACTORS))}, e.g. 2,4,8")
    return factors


def dit_size(name):
    """The DiT constructor's depth, dim and heads of a named size (modules.DIT_SIZES); another name is a UsageError."""
    if name not in DIT_SIZES:
        raise UsageError(f"dit_size '{name}' is unknown: use one of {', '.join(DIT_SIZES)}")
    depth, dim, heads = DIT_SIZES[name]
    return {"depth": depth, "dim": dim, "heads": heads}


def network_arch(cfg, channels, num_classes=None, cond_channels=0, context_dim=None):
    """What modules.build_network builds for a Config (its Network fields, and its Backbone and Conditioning
    fields where it has them), on images or latents of `channels`: class-conditional with num_classes, reading a
    condition image of cond_channels channels concatenated to its input (ddpm_img2img.py), or text-conditioned with
    the text encoder's context_dim (train_sd.py)."""
    backbone = getattr(cfg, "backbone", "unet")  # ddpm_img2img.py has no Backbone group: its image is a U-Net's input
    conditioning = getattr(cfg, "conditioning", "add")
    arch = {"backbone": backbone, "c_in": channels, "c_out": channels, "num_classes": num_classes,
            "conditioning": conditioning, "gradient_checkpointing": cfg.gradient_checkpointing,
            "channels_last": cfg.channels_last}
    text = context_dim is not None
    allowed = UNet_text.CONDITIONINGS if text else UNet_conditional.CONDITIONINGS
    if conditioning not in allowed:
        raise UsageError(f"conditioning '{conditioning}' is unknown: use one of {', '.join(allowed)}")
    if text:
        arch["context_dim"] = context_dim
    if backbone == "dit":
        if conditioning != "add" and not text:
            raise UsageError(f"conditioning '{conditioning}' is a U-Net mode: DiT reads the label by adaLN-Zero; "
                             "drop --conditioning, or use --backbone unet")
        if cfg.dropout:
            raise UsageError("dropout is a U-Net option: drop --dropout, or use --backbone unet")
        return {**arch, "patch_size": cfg.patch_size, "dit_size": cfg.dit_size, **dit_size(cfg.dit_size)}
    return {**arch, "base_channels": cfg.base_channels, "attn_factors": parse_attn_factors(cfg.attn_factors),
            "dropout": cfg.dropout, "cond_channels": cond_channels}
