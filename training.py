"""The one training loop, shared by ddpm.py, ddpm_conditional.py and train_sd.py.

`train` reads top to bottom: data, noise, loss, step, EMA, log, save. What differs between the scripts (the
data set, the network, what a batch conditions on, how a grid is drawn) comes in as a `Task`, built by
`image_task` for the class scripts (in pixel space, or in a VAE's latents with --vae), by `train_sd.text_task`
for text-to-image, and by `train_vae.vae_task` for the first stage, which brings its own loss. Accelerate handles
the device, mixed precision and multi-GPU, so the same script runs under `python`, `accelerate launch` and
`torchrun`.
"""
import copy
import dataclasses
import datetime
import functools
import importlib.util
import json
import math
import netrc
import os
import signal
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from data import AUGMENTATIONS, CHANNELS, data_on_device, dataset_channels, make_dataloader, run_datasets
from ddpm import PREDICTION_TYPES, SAMPLERS, SCHEDULES, Diffusion
from evaluate import get_judge, offline_figures
from latents import draw_latents, latent_cache_path, load_latents, open_cache, vae_digest
from modules import DIT_SIZES, EMA, NULL_LABEL, PATCH_SIZES, DiT, UNet, UNet_conditional
from utils import (UsageError, atomic_save, config_to_dict, diff_configs, load_checkpoint, load_state_dict_strict,
                   parse_config, pick_device, plot_loss, rng_state, save_config, save_images, save_kept,
                   seed_everything, set_rng_state, use_tf32, with_defaults, write_json)

STATE_FILE = "training_state.pt"  # model, EMA, optimizer, step, epoch, RNG states, config, losses
KEPT_DIR = "checkpoints"  # models/<run_name>/checkpoints/step_<step>.pt: the last keep_checkpoints states
# Fields that may change between a run and its resumption; any other difference is refused.
RESUMABLE_FIELDS = ("epochs", "max_steps", "log_every", "num_workers", "device", "n_samples", "n_per_class",
                    "sampler", "sample_steps", "compile", "mixed_precision", "eval_every", "eval_samples",
                    "checkpoint_every", "keep_checkpoints", "max_nonfinite", "print_every", "clip_x0", "data_on_device",
                    "cache_latents", "cache_dir", "gradient_checkpointing", "report_to")
FIELDS_BEFORE = {"channels": 3}  # what the runs saved before a field existed had, where it is not the default
RUN_FLAGS = [
    ("--resume", {"action": "store_true", "help": f"continue from models/<run_name>/{STATE_FILE}"}),
    ("--overwrite", {"action": "store_true", "help": "start over even if models/<run_name>/ holds a run"}),
]


class TrainingError(UsageError):
    """The run had to stop (non-finite losses, a checkpoint it could not write): one line, as a UsageError."""


def validate(cfg):
    """One readable error for each value the run cannot use."""
    if cfg.image_size % 8:
        raise UsageError(f"image_size {cfg.image_size} is not divisible by 8: the U-Net halves it 3 times; "
                         "use 16, 32 or 64")
    if not 0.0 <= getattr(cfg, "p_uncond", 0.0) <= 1.0:
        raise UsageError(f"p_uncond {cfg.p_uncond} is not a probability: use a value in [0, 1], e.g. 0.1")
    if getattr(cfg, "cfg_scale", 0.0) < 0:
        raise UsageError(f"cfg_scale {cfg.cfg_scale} is negative: use 0 (no guidance) or e.g. 3")
    if getattr(cfg, "sampler", SAMPLERS[0]) not in SAMPLERS:  # train_vae.py has no sampler, schedule or U-Net
        raise UsageError(f"sampler '{cfg.sampler}' is unknown: use one of {', '.join(SAMPLERS)}")
    if cfg.mixed_precision not in (None, *PRECISIONS):
        raise UsageError(f"mixed_precision '{cfg.mixed_precision}' is unknown: use no, fp16 or bf16")
    if getattr(cfg, "eval_every", None) is not None and (cfg.eval_every <= 0 or cfg.eval_samples < 2):
        raise UsageError(f"eval_every {cfg.eval_every} / eval_samples {cfg.eval_samples}: use a positive --eval_every "
                         "(or None: off) and --eval_samples 2 or more, e.g. 100")
    trackers(getattr(cfg, "report_to", "none"))
    if getattr(cfg, "channels", None) not in (None, *CHANNELS):
        raise UsageError(f"channels {cfg.channels} is not supported: use 1 (grey), 3 (RGB) or None (the data set's)")
    if getattr(cfg, "augment", None) not in (None, *AUGMENTATIONS):
        raise UsageError(f"augment '{cfg.augment}' is unknown: use one of {', '.join(AUGMENTATIONS)}, or None")
    if getattr(cfg, "schedule", SCHEDULES[0]) not in SCHEDULES:
        raise UsageError(f"schedule '{cfg.schedule}' is unknown: use one of {', '.join(SCHEDULES)}")
    if getattr(cfg, "prediction_type", PREDICTION_TYPES[0]) not in PREDICTION_TYPES:
        raise UsageError(f"prediction_type '{cfg.prediction_type}' is unknown: use one of "
                         f"{', '.join(PREDICTION_TYPES)}")
    if not 0.0 <= getattr(cfg, "dropout", 0.0) < 1.0:
        raise UsageError(f"dropout {cfg.dropout} is not a rate: use a value in [0, 1), e.g. 0.1, or 0 for none")
    if getattr(cfg, "min_snr_gamma", None) is not None and cfg.min_snr_gamma <= 0:
        raise UsageError(f"min_snr_gamma {cfg.min_snr_gamma} must be positive: use e.g. 5, or None for the plain loss")
    if getattr(cfg, "lr_decay", "none") not in LR_DECAYS:
        raise UsageError(f"lr_decay '{cfg.lr_decay}' is unknown: use one of {', '.join(LR_DECAYS)}")
    if cfg.lr_warmup < 0:
        raise UsageError(f"lr_warmup {cfg.lr_warmup} is negative: use 0 (no warm-up) or a number of steps")
    if hasattr(cfg, "attn_factors"):
        parse_attn_factors(cfg.attn_factors)
    if getattr(cfg, "backbone", "unet") not in BACKBONES:
        raise UsageError(f"backbone '{cfg.backbone}' is unknown: use one of {', '.join(BACKBONES)}")
    if getattr(cfg, "backbone", "unet") == "dit":
        dit_size(cfg.dit_size)
        if cfg.patch_size not in PATCH_SIZES:
            raise UsageError(f"patch_size {cfg.patch_size} is not allowed: use "
                             f"{' or '.join(map(str, PATCH_SIZES))}")
    if cfg.grad_clip is not None and cfg.grad_clip <= 0:
        raise UsageError(f"grad_clip {cfg.grad_clip} must be positive: use e.g. 1.0, or None for no clipping")
    for name in ("batch_size", "epochs", "log_every", "base_channels", "noise_steps", "gradient_accumulation_steps",
                 "checkpoint_every", "keep_checkpoints", "max_nonfinite", "print_every"):
        if getattr(cfg, name, 1) <= 0:
            raise UsageError(f"{name} {getattr(cfg, name)} must be positive")
    if getattr(cfg, "holdout", 0) < 0:
        raise UsageError(f"holdout {cfg.holdout} is negative: use 0 (no held-out images) or e.g. 300")


PRECISIONS = ("no", "fp16", "bf16")


def mixed_precision(cfg):
    """(precision, where it comes from): --mixed_precision when given, else the launcher's choice (`accelerate launch
    --mixed_precision` or `accelerate config` set ACCELERATE_MIXED_PRECISION, which Accelerate reads only when it
    is given no precision), else no."""
    if cfg.mixed_precision is not None:
        return cfg.mixed_precision, "--mixed_precision"
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if launcher is None:
        return "no", "the default"
    if launcher.lower() not in PRECISIONS:
        raise UsageError(f"the launcher's mixed precision '{launcher}' (ACCELERATE_MIXED_PRECISION) is not supported "
                         "here: pass --mixed_precision no, fp16 or bf16")
    return launcher.lower(), "the launcher"


# How long a process waits in a collective (a barrier, DDP's all-reduce) before NCCL gives up; its default, 10
# minutes, is shorter than the main process's solo work: the latent cache of a large data set, the judge, grids.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)


def claim_gpu(device):
    """--device cuda:N in a single process: make GPU N the current one, which a single-process Accelerator uses
    (it takes plain 'cuda'). Under a launcher each process takes the GPU of its local rank, so an index is refused."""
    if not device.startswith("cuda:"):
        return
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes > 1:
        raise UsageError(f"--device {device} with {processes} processes: each process uses the GPU of its local rank; "
                         "pass --device cuda and choose the GPUs with CUDA_VISIBLE_DEVICES")
    torch.cuda.set_device(int(device.split(":")[1]))


REPORT_TO = ("none", "tensorboard", "wandb", "all")
WANDB_PROJECT = "Diffusion-Models-pytorch"  # the wandb project of every run, unless WANDB_PROJECT says another


def trackers(report_to):
    """The tracker names of --report_to; an unknown value is a UsageError."""
    if report_to not in REPORT_TO:
        raise UsageError(f"report_to '{report_to}' is unknown: use one of {', '.join(REPORT_TO)}")
    return {"none": [], "all": ["tensorboard", "wandb"]}.get(report_to, [report_to])


def wandb_logged_in():
    """Whether `wandb login` (or WANDB_API_KEY) has given this machine a key: its ~/.netrc entry for the wandb host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def make_trackers(cfg, results_dir):
    """Accelerate's trackers of --report_to: TensorBoard writing to results/<run_name>/logs, wandb in the project
    WANDB_PROJECT (default Diffusion-Models-pytorch) under the run's name, offline unless logged in (or WANDB_MODE)."""
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    made = []
    for name in trackers(getattr(cfg, "report_to", "none")):
        if importlib.util.find_spec(name) is None:
            raise UsageError(f"--report_to {cfg.report_to} needs the {name} package: pip install {name} (or pass "
                             "--report_to none)")
        if name == "tensorboard":
            made.append(TensorBoardTracker("logs", results_dir))
        else:
            mode = os.environ.get("WANDB_MODE") or ("online" if wandb_logged_in() else "offline")
            made.append(WandBTracker(os.environ.get("WANDB_PROJECT", WANDB_PROJECT), name=cfg.run_name,
                                     dir=results_dir, mode=mode))
    return made


def make_accelerator(cfg, results_dir=None):
    """The run's Accelerator: device, precision, accumulation, seeded data order, collective timeout, and the trackers
    of --report_to (which need `results_dir`)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs

    device = pick_device(cfg.device)
    precision, _ = mixed_precision(cfg)
    if precision == "fp16" and device == "cpu":
        raise UsageError("mixed_precision fp16 needs a GPU: use --mixed_precision bf16 on the CPU")
    on_gpu = device.startswith("cuda")
    if on_gpu:
        use_tf32(True)
        claim_gpu(device)
    # non_blocking: the copy of a (pinned) batch to the GPU does not wait for the GPU to finish its work
    return Accelerator(cpu=device == "cpu", mixed_precision=precision,
                       gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                       dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed,
                                                                 non_blocking=on_gpu),
                       kwargs_handlers=[InitProcessGroupKwargs(timeout=COLLECTIVE_TIMEOUT)],
                       log_with=(make_trackers(cfg, results_dir) if results_dir is not None else None) or None)


def run_dirs(cfg, resume, overwrite):
    """results/<run_name>/ and models/<run_name>/; refuses to clobber another run's checkpoints."""
    results_dir = os.path.join("results", cfg.run_name)
    models_dir = os.path.join("models", cfg.run_name)
    state_path = os.path.join(models_dir, STATE_FILE)
    has_run = any(os.path.exists(os.path.join(models_dir, f)) for f in (STATE_FILE, "ckpt.pt", "ema_ckpt.pt"))
    if resume and not os.path.exists(state_path):
        raise UsageError(f"--resume found no {state_path}: train without --resume first, or check --run_name")
    if has_run and not (resume or overwrite):
        raise UsageError(f"{models_dir}/ already holds a run: pass --resume to continue it, --overwrite to "
                         "replace it, or choose another --run_name")
    return results_dir, models_dir


def save_run(cfg, net, ema_net, ema, optimizer, progress, models_dir):
    """Plain state_dicts as the reference names them, and the full state for --resume; all atomic.

    `progress` holds step, epoch, batches_done (this process's batches of the epoch), batches_per_epoch,
    num_processes, losses, skipped and vae_digest (the Task's). A resumed run starts at the next epoch if `epoch`
    finished.
    A failed write is a TrainingError; the files written before stay whole.
    """
    epoch, batches_done = progress["epoch"], progress["batches_done"]
    if batches_done == progress["batches_per_epoch"]:
        epoch, batches_done = epoch + 1, 0
    state = {"model": net.state_dict(), "ema": ema_net.state_dict(), "ema_state": ema.state_dict(),
             "optimizer": optimizer.state_dict(), "step": progress["step"], "epoch": epoch,
             "batches_done": batches_done, "num_processes": progress["num_processes"], "losses": progress["losses"],
             "skipped": progress["skipped"], "vae_digest": progress["vae_digest"], "rng": rng_state(),
             "config": config_to_dict(cfg)}
    try:
        save_kept(state, os.path.join(models_dir, STATE_FILE), os.path.join(models_dir, KEPT_DIR),
                  f"step_{progress['step']:09d}.pt", cfg.keep_checkpoints)
        atomic_save(net.state_dict(), os.path.join(models_dir, "ckpt.pt"))
        atomic_save(ema_net.state_dict(), os.path.join(models_dir, "ema_ckpt.pt"))
        save_config(cfg, os.path.join(models_dir, "config.json"))
    except OSError as exc:
        raise TrainingError(f"could not write a checkpoint in {models_dir}/ at step {progress['step']} ({exc}): "
                            f"free disk space or fix the permissions, then --resume from the previous "
                            f"{STATE_FILE}, which is intact") from exc


def restore_run(cfg, models_dir, net, ema_net, ema, optimizer, num_processes=1, resumable=RESUMABLE_FIELDS,
                vae_digest=None):
    """Load models/<run_name>/training_state.pt into the run; returns the progress dict of `save_run`.

    A run may resume on another number of processes when the batches done so far split evenly over them, and only
    on the latents it began with: `vae_digest` (the Task's) must be the saved one.
    """
    state = load_checkpoint(os.path.join(models_dir, STATE_FILE))
    # a run saved before a field existed used its default, or for channels (default None: the data set's) RGB
    before = {key: value for key, value in FIELDS_BEFORE.items() if hasattr(cfg, key)}
    saved = with_defaults({**before, **state["config"]}, type(cfg))
    changed = diff_configs(saved, config_to_dict(cfg), ignore=resumable)
    if changed:
        raise UsageError(f"--resume with a different config: {'; '.join(changed)}; use the saved values "
                         f"({models_dir}/config.json) or start a new --run_name")
    if state.get("vae_digest", vae_digest) != vae_digest:  # a state saved before the digest existed: not checked
        raise UsageError(f"--resume with another VAE: --vae '{cfg.vae}' is not the VAE this run began on (digest "
                         f"{vae_digest}, saved {state['vae_digest']}), so its latents differ: resume with the VAE it "
                         "trained on (write a retrained VAE to a new train_vae.py --run_name), or start a new "
                         "--run_name")
    batches = state["batches_done"] * state.get("num_processes", 1)  # of all processes together
    if batches % num_processes:
        raise UsageError(f"--resume on {num_processes} processes: the run stopped after {batches} batches, which do "
                         f"not split evenly; resume on {state.get('num_processes', 1)} processes")
    load_state_dict_strict(net, state["model"])
    load_state_dict_strict(ema_net, state["ema"])
    ema.load_state_dict(state["ema_state"])
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    print(f"resumed {cfg.run_name} at step {state['step']}, epoch {state['epoch']}")
    return {"step": state["step"], "epoch": state["epoch"], "batches_done": batches // num_processes,
            "losses": list(state["losses"]), "skipped": state.get("skipped", 0)}


def epoch_batches(accelerator, dataloader, epoch, skip):
    """This epoch's batches with a progress bar, after the `skip` batches a resumed run already trained on."""
    dataloader.set_epoch(epoch)
    batches = accelerator.skip_first_batches(dataloader, skip) if skip else dataloader
    return tqdm(batches, desc=f"epoch {epoch}", disable=not accelerator.is_local_main_process)


def read_quality(path, step):
    """The --eval_every figures a resumed run logged up to its `step` (results/<run_name>/quality.json), or []."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [entry for entry in json.load(f) if entry["step"] <= step]


# ----------------------------------------------------------------------------- what each script trains
@dataclass
class Task:
    """What one script trains; the loop in `train` does the rest.

    make_batch maps a batch of the data set to (x_0, conditioning): the conditioning is dropped with
    probability p_uncond for guidance, or None for an unconditional model; a dict is passed to Diffusion.loss as
    keywords (ddpm_img2img.py: {"cond": images[, "labels": ids]}). draw_grid(module, path) saves a
    grid of `module`'s samples from fixed noise and conditioning. measure(module), if given, returns the
    offline quality figures of `module`'s samples (evaluate.offline_figures), for --eval_every. classes: the
    class names of a conditional model, saved as models/<run_name>/classes.json for sample.py's grid captions.
    channels: the images' channels the task resolved (--channels None: the data set's), saved in the run's config.
    loss(model, x_0, conditioning, step), if given, replaces the diffusion loss (train_vae.py's autoencoder has
    no diffusion). vae_digest: the VAE whose latents the run trains on (latents.vae_digest), saved in each
    checkpoint, so that --resume refuses another VAE.
    """
    dataset: torch.utils.data.Dataset
    net: torch.nn.Module
    diffusion: Diffusion | None
    make_batch: Callable
    draw_grid: Callable
    measure: Callable | None = None
    classes: list[str] | None = None
    channels: int = 3
    loss: Callable | None = None
    vae_digest: str | None = None

    def compute_loss(self, model, x_0, conditioning, step):
        """The loss of one batch: the task's own, else the DDPM loss of ddpm.py."""
        if self.loss is not None:
            return self.loss(model, x_0, conditioning, step)
        if isinstance(conditioning, dict):
            return self.diffusion.loss(model, x_0, **conditioning)
        return self.diffusion.loss(model, x_0, conditioning)


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


BACKBONES = ("unet", "dit")


def dit_size(name):
    """The DiT constructor's depth, dim and heads of a named size (modules.DIT_SIZES); another name is a UsageError."""
    if name not in DIT_SIZES:
        raise UsageError(f"dit_size '{name}' is unknown: use one of {', '.join(DIT_SIZES)}")
    depth, dim, heads = DIT_SIZES[name]
    return {"depth": depth, "dim": dim, "heads": heads}


def build_model(cfg, num_classes, channels=3, cond_channels=0):
    """The network of ddpm.py (num_classes None) or ddpm_conditional.py on images or latents of `channels`: its
    --backbone, class-conditional when num_classes is given; with cond_channels (ddpm_img2img.py) a U-Net that also
    reads a condition image of that many channels, concatenated to its input."""
    conditioning = getattr(cfg, "conditioning", "add")
    dropout = getattr(cfg, "dropout", 0.0)
    if getattr(cfg, "backbone", "unet") == "dit":
        if cond_channels:
            raise UsageError("an image condition is read by the U-Net: use --backbone unet")
        if conditioning != "add":
            raise UsageError(f"conditioning '{conditioning}' is a U-Net mode: DiT reads the label by adaLN-Zero; "
                             "drop --conditioning, or use --backbone unet")
        if dropout:
            raise UsageError("dropout is a U-Net option: drop --dropout, or use --backbone unet")
        return DiT(channels, channels, num_classes=num_classes, patch_size=cfg.patch_size, **dit_size(cfg.dit_size))
    attn_factors = parse_attn_factors(getattr(cfg, "attn_factors", "1,2,4,8"))
    if num_classes is None and not cond_channels:
        return UNet(channels, channels, base_channels=cfg.base_channels, attn_factors=attn_factors, dropout=dropout)
    if conditioning not in UNet_conditional.CONDITIONINGS:
        raise UsageError(f"conditioning '{conditioning}' is unknown: use one of "
                         f"{', '.join(UNet_conditional.CONDITIONINGS)}")
    return UNet_conditional(channels, channels, num_classes=num_classes, base_channels=cfg.base_channels,
                            conditioning=conditioning, attn_factors=attn_factors, cond_channels=cond_channels,
                            dropout=dropout)


def grid_labels(cfg, num_classes, device):
    """Fixed labels of the grids: one row per class, or None for the unconditional model."""
    if num_classes is None:
        return None
    return torch.arange(num_classes, device=device).repeat_interleave(cfg.n_per_class)


def drop_labels(batch, p_uncond):
    """(images, labels) with each row's label replaced by NULL_LABEL with probability p_uncond (CFG training)."""
    images, labels = batch
    drop = torch.rand(labels.shape, device=labels.device) < p_uncond
    return images, labels.masked_fill(drop, NULL_LABEL)


def image_task(cfg, accelerator, conditional):
    """ddpm.py and ddpm_conditional.py: a class data set, with or without its labels, in pixel space or in the
    latents of a frozen VAE (--vae, the code path of train_sd.py), encoded per batch or once (--cache_latents)."""
    device = accelerator.device
    if device.type == "cpu" and cfg.max_steps is None and cfg.base_channels >= 64 and cfg.image_size >= 32:
        warnings.warn("this full-size config takes days on the CPU: try --config configs/quick_cpu.json "
                      "(shapes at 16 px, a few minutes)", stacklevel=2)
    channels = cfg.channels or dataset_channels(cfg.dataset, cfg.dataset_path)
    with accelerator.main_process_first():  # one process downloads (CIFAR-10, a Hub VAE); the others then read them
        latents = load_latents(cfg.vae, device, cfg.mixed_precision, image_channels=channels)
        # --holdout: images never trained on, for evaluate.py --repaint (data.run_datasets rebuilds them)
        dataset, _, classes = run_datasets(cfg.dataset, cfg.dataset_path, cfg.image_size, cfg.seed, cfg.dataset_size,
                                           cfg.augment, channels, getattr(cfg, "holdout", 0))
    num_classes = len(classes) if conditional else None
    diffusion = Diffusion(cfg.noise_steps, cfg.beta_start, cfg.beta_end, latents.latent_size(cfg.image_size),
                          c_in=latents.channels, device=device, clip_x0=latents.clip_x0(cfg.clip_x0),
                          schedule=cfg.schedule, min_snr_gamma=cfg.min_snr_gamma, prediction_type=cfg.prediction_type)
    labels = grid_labels(cfg, num_classes, device)
    n = cfg.n_samples if labels is None else labels.shape[0]

    def draw_grid(module, path):
        x_0 = diffusion.sample_x0(module, n, labels, getattr(cfg, "cfg_scale", 0.0), sampler=cfg.sampler,
                                  steps=cfg.sample_steps, seed=cfg.seed)
        if labels is None:
            save_images(latents.decode(x_0), path)
        else:
            save_images(latents.decode(x_0), path, nrow=cfg.n_per_class, captions=classes)

    if cfg.eval_every and num_classes is not None and cfg.eval_samples < num_classes:
        raise UsageError(f"eval_samples {cfg.eval_samples} is smaller than the {num_classes} classes: pass "
                         f"--eval_samples {num_classes} or more")
    measure = None
    if cfg.eval_every and accelerator.is_main_process:  # one process trains and caches the judge
        judge = get_judge(cfg.dataset, cfg.dataset_path, cfg.image_size, num_real=min(5000, len(dataset)),
                          device=device, channels=channels)
        print(f"--eval_every {cfg.eval_every}: judge accuracy on held-out real images {judge.heldout_accuracy:.3f}")
        measure = functools.partial(offline_figures, diffusion=diffusion, judge=judge, num_classes=num_classes,
                                    n=cfg.eval_samples, cfg_scale=getattr(cfg, "cfg_scale", 0.0),
                                    sampler=cfg.sampler, steps=cfg.sample_steps, seed=cfg.seed,
                                    decode=latents.decode)

    if cfg.cache_latents:  # batches of (posterior mean, std, label)
        held_out = {"holdout": cfg.holdout} if getattr(cfg, "holdout", 0) else {}  # caches without one keep their keys
        path = latent_cache_path(cfg, dataset, channels, augment=cfg.augment, **held_out)
        cache = open_cache(accelerator, path, dataset, latents, None, cfg.batch_size, cfg.num_workers)
        dataset = TensorDataset(cache["mean"], cache["std"], cache["label"])

    def x_0_and_labels(batch):
        if cfg.cache_latents:
            mean, std, batch_labels = batch
            return draw_latents(mean, std), batch_labels
        images, batch_labels = batch
        if latents.vae is None:
            return images, batch_labels
        return draw_latents(*latents.encode(images)), batch_labels

    if conditional:
        def make_batch(batch):
            return drop_labels(x_0_and_labels(batch), cfg.p_uncond)
    else:
        def make_batch(batch):
            return x_0_and_labels(batch)[0], None
    return Task(dataset, build_model(cfg, num_classes, latents.channels), diffusion, make_batch, draw_grid, measure,
                classes if conditional else None, channels, vae_digest=vae_digest(cfg.vae))


# ----------------------------------------------------------------------------- the loop's bookkeeping
def noise_seed(seed, epoch, batch, rank):
    """The seed of one batch's noise (t, eps, dropped labels): a resumed run draws what the first run drew."""
    return int(np.random.SeedSequence([seed, epoch, batch, rank]).generate_state(1)[0])


class StopRequest:
    """SIGINT and SIGTERM (a cluster's pre-emption) set `signal`; the loop then saves and returns."""

    def __init__(self):
        self.signal = None
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python handles signals there only
            for number in (signal.SIGINT, signal.SIGTERM):
                self.previous[number] = signal.signal(number, self.request)
        return self

    def request(self, number, frame):
        if self.signal == "SIGINT" and number == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signal = signal.Signals(number).name

    def __exit__(self, *exc_info):
        for number, handler in self.previous.items():
            signal.signal(number, handler)


class LossLog:
    """Each optimizer step's loss, gradient norm and whether its update was skipped, kept on the device until `read`.

    `add` and `end_step` never wait for the device; `read` moves what is pending to the host in one
    transfer, averaged over the processes, appends one loss per step to `losses`, and hands each step to
    `report(step, loss, grad_norm, skipped)` when given (skipped: the steps skipped so far).
    """

    def __init__(self, accelerator, losses, skipped, max_nonfinite, fp16=False, report=None):
        self.accelerator, self.losses, self.skipped, self.max_nonfinite = accelerator, losses, skipped, max_nonfinite
        self.report = report
        self.micro, self.pending, self.in_a_row = [], [], 0
        # fp16: GradScaler starts at a loss scale of 2^16 and halves it after each step whose gradients overflow,
        # so the first steps of a run are skipped as a rule; they are overflow, not a loss that is not finite
        self.fp16 = fp16
        self.reason = "fp16 overflow" if fp16 else "non-finite loss"

    def add(self, loss):
        self.micro.append(loss.detach().float())

    def end_step(self, skip, grad_norm=None):
        grad_norm = torch.full_like(skip, float("nan")) if grad_norm is None else grad_norm
        self.pending.append(torch.stack([torch.stack(self.micro).mean(), skip.float(), grad_norm.float()]))
        self.micro = []

    def read(self, stop_signal=None):
        """Move the pending values to `losses`; True if any process got a stop signal. A TrainingError after
        `max_nonfinite` skipped steps in a row."""
        if self.pending:
            values = self.accelerator.reduce(torch.stack(self.pending), "mean").tolist()  # (steps, 3)
            self.pending = []
            for loss, skip, grad_norm in values:
                self.losses.append(loss)
                self.skipped += skip > 0.5
                self.in_a_row = self.in_a_row + 1 if skip > 0.5 else 0
                if self.report is not None:
                    self.report(len(self.losses), loss, grad_norm, self.skipped)
                if self.in_a_row >= self.max_nonfinite:
                    what = (f"the fp16 gradients overflowed for {self.in_a_row} steps in a row, although GradScaler "
                            "halved the loss scale after each" if self.fp16 else
                            f"the loss was not finite for {self.in_a_row} steps in a row")
                    raise TrainingError(f"{what} (up to step {len(self.losses)}); their updates were skipped and the "
                                        "last checkpoint is intact: --resume with a lower --lr, or --mixed_precision "
                                        "bf16 / no")
        stop = torch.tensor(float(stop_signal is not None), device=self.accelerator.device)
        return self.accelerator.reduce(stop, "sum").item() > 0


class Tracking:
    """--report_to through Accelerate's trackers, started on entry and finished on exit, on the main process only.

    Every value is logged at its optimizer step (1 = the first), so a resumed run continues the curves at the step
    it resumes from; TensorBoard hides what a stopped run had logged after that step (SummaryWriter's purge_step).
    """

    def __init__(self, accelerator, cfg, step):
        self.accelerator, self.cfg, self.step = accelerator, cfg, step

    def __enter__(self):
        for tracker in self.accelerator.log_with:
            if tracker.name == "tensorboard" and self.step:
                tracker.init_kwargs["purge_step"] = self.step + 1  # passed to SummaryWriter
        config = {key: ", ".join(map(str, value)) if isinstance(value, list) else value
                  for key, value in config_to_dict(self.cfg).items()}  # trackers take numbers, strings, None
        self.accelerator.init_trackers(self.cfg.run_name, config=config)
        return self

    def image(self, tag, path, step):
        """The grid file `path`, as it was saved, under `tag` at `step`."""
        if not self.accelerator.trackers:
            return
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))  # (H, W, 3) uint8
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({tag: pixels[None]}, step=step, dataformats="NHWC")
                tracker.writer.flush()
            else:
                tracker.log_images({tag: [pixels]}, step=step)

    def __exit__(self, *exc_info):
        for tracker in self.accelerator.trackers:
            tracker.finish()


LR_DECAYS = ("none", "cosine")


def learning_rate(lr, step, warmup, decay="none", total=None):
    """The learning rate of optimizer step `step` (0-based): rising linearly to lr over `warmup` steps, then lr
    (decay "none"), or from there down to 0 at step `total` along half a cosine (decay "cosine", as in nanoGPT)."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    if decay == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return lr * 0.5 * (1 + math.cos(math.pi * progress))
    return lr


def gradient_norm(accelerator, model, grad_clip):
    """The total gradient norm (after averaging over processes, so all agree), computed once: clipped to grad_clip
    through Accelerate (which unscales fp16 gradients first) when it is set, as the DDPM paper does."""
    if grad_clip is not None:
        return accelerator.clip_grad_norm_(model.parameters(), grad_clip)
    return torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])


# ----------------------------------------------------------------------------- the loop
def train(cfg, flags, make_task, resumable=RESUMABLE_FIELDS):
    """Train `make_task(cfg, accelerator)`'s network; returns the step, epoch, losses and the run's folders.

    Under `accelerate launch` or `torchrun` each process trains on its own shard of every epoch and the
    gradients are averaged; EMA, grids and checkpoints are the main process's, and the others wait for it.
    """
    validate(cfg)
    results_dir, models_dir = run_dirs(cfg, flags.resume, flags.overwrite)
    accelerator = make_accelerator(cfg, results_dir)
    precision_source = mixed_precision(cfg)[1]
    cfg = dataclasses.replace(cfg, mixed_precision=accelerator.mixed_precision)  # the config saved says what ran
    device = accelerator.device
    seed_everything(cfg.seed)  # the same initial weights on every process

    task = make_task(cfg, accelerator)
    if hasattr(cfg, "channels"):
        cfg = dataclasses.replace(cfg, channels=task.channels)  # the config saved says what ran, as with the precision
    # --data_on_device: the DataLoader yields batches of indices, in the order it would yield the data set's
    held, data_note = data_on_device(task.dataset, device, cfg.data_on_device, cfg.num_workers)
    dataloader = make_dataloader(task.dataset if held is None else held, cfg.batch_size,
                                 cfg.num_workers if held is None else 0, seed=cfg.seed,
                                 pin_memory=device.type == "cuda")
    net = task.net
    if getattr(cfg, "gradient_checkpointing", False):
        net.enable_gradient_checkpointing()
    if getattr(cfg, "channels_last", False):
        net = net.to(memory_format=torch.channels_last)
    ema_net = copy.deepcopy(net).requires_grad_(False).to(device)
    ema = EMA(cfg.ema_beta, cfg.ema_start, cfg.ema_warmup)
    adamw = torch.optim.AdamW(net.parameters(), lr=cfg.lr, fused=True)  # fused: can skip a step on the device

    run = {"step": 0, "epoch": 0, "batches_done": 0, "losses": [], "skipped": 0}
    if flags.resume:
        run = restore_run(cfg, models_dir, net, ema_net, ema, adamw, accelerator.num_processes, resumable,
                          task.vae_digest)
    quality_path = os.path.join(results_dir, "quality.json")  # --eval_every: [{"step", "seconds", ...figures}]
    quality = read_quality(quality_path, run["step"]) if flags.resume else []
    model = torch.compile(net) if getattr(cfg, "compile", False) else net
    model, optimizer = accelerator.prepare(model, adamw)
    dataloader = accelerator.prepare_data_loader(dataloader, device_placement=held is None)  # indices stay on the host

    os.makedirs(results_dir, exist_ok=True)
    if accelerator.is_main_process:
        save_config(cfg, os.path.join(results_dir, "config.json"))
        if task.classes is not None:
            os.makedirs(models_dir, exist_ok=True)
            write_json(task.classes, os.path.join(models_dir, "classes.json"))
        accelerator.print(f"config: {config_to_dict(cfg)}")
    n = accelerator.num_processes
    accelerator.print(f"{n} process(es) on {device.type}: batch {cfg.batch_size} per device x {n} x "
                      f"{cfg.gradient_accumulation_steps} accumulated = "
                      f"{cfg.batch_size * n * cfg.gradient_accumulation_steps} images per optimizer step; lr {cfg.lr}; "
                      f"mixed precision {cfg.mixed_precision} ({precision_source})")
    accelerator.print(data_note)
    step, start_epoch, losses = run["step"], run["epoch"], run["losses"]
    decay = getattr(cfg, "lr_decay", "none")
    steps_per_epoch = len(dataloader) // cfg.gradient_accumulation_steps
    total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch  # the cosine's end
    tracking = Tracking(accelerator, cfg, step)

    def report(n, loss, grad_norm, skipped):  # optimizer step n, counted from the run's start: the same on --resume
        lr = learning_rate(cfg.lr, n - 1, cfg.lr_warmup, decay, total_steps)
        accelerator.log({"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
                         "train/skipped_steps": skipped}, step=n)

    log = LossLog(accelerator, losses, run["skipped"], cfg.max_nonfinite, fp16=cfg.mixed_precision == "fp16",
                  report=report)

    def save(epoch, batches_done):
        if accelerator.is_main_process:
            save_run(cfg, net, ema_net, ema, adamw, {
                "step": step, "epoch": epoch, "batches_done": batches_done, "batches_per_epoch": len(dataloader),
                "num_processes": n, "losses": losses, "skipped": log.skipped, "vae_digest": task.vae_digest},
                models_dir)
        accelerator.wait_for_everyone()

    epoch, stopped = start_epoch, None
    start, measuring = time.perf_counter(), 0.0  # train_seconds: the run's wall-clock time less --eval_every's
    cpu_start = time.process_time()  # this process's CPU time, all threads: what a busy shared machine cannot inflate
    with StopRequest() as stop, tracking:
        for epoch in range(start_epoch, cfg.epochs):
            batches_done = run["batches_done"] if epoch == start_epoch else 0
            pbar = epoch_batches(accelerator, dataloader, epoch, batches_done)
            for batch in pbar:
                with accelerator.accumulate(model):
                    seed = noise_seed(cfg.seed, epoch, batches_done, accelerator.process_index)
                    if held is not None:  # a batch of indices; its random flips are drawn from another seed
                        batch = held.fetch(batch, seed + 1)
                    torch.manual_seed(seed)
                    x_0, conditioning = task.make_batch(batch)
                    loss = task.compute_loss(model, x_0, conditioning, step)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        grad_norm = gradient_norm(accelerator, model, cfg.grad_clip)
                        skip = (~torch.isfinite(grad_norm)).float()
                        adamw.found_inf = skip  # fused AdamW leaves weights and moments as they are when 1
                        for group in adamw.param_groups:
                            group["lr"] = learning_rate(cfg.lr, step, cfg.lr_warmup, decay, total_steps)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                batches_done += 1
                log.add(loss)
                if not accelerator.sync_gradients:
                    continue
                log.end_step(skip, grad_norm)
                if accelerator.is_main_process:
                    ema.step_ema(ema_net, net)
                step += 1
                if step % cfg.print_every == 0 or step % cfg.checkpoint_every == 0:
                    stopped = (stop.signal or "a signal to another process") if log.read(stop.signal) else None
                    pbar.set_postfix(loss=f"{losses[-1]:.4f}", step=step, skipped=log.skipped)
                if stopped or step % cfg.checkpoint_every == 0:
                    save(epoch, batches_done)
                if getattr(cfg, "eval_every", None) and step % cfg.eval_every == 0:
                    if task.measure is not None:  # set on the main process only
                        measure_start = time.perf_counter()
                        figures = task.measure(ema_net)
                        seconds = round(measure_start - start - measuring, 1)
                        measuring += time.perf_counter() - measure_start
                        quality.append({"step": step, "seconds": seconds, **figures})
                        accelerator.log({f"eval/{key}": value for key, value in figures.items() if value is not None},
                                        step=step)
                        write_json(quality, quality_path)
                    accelerator.wait_for_everyone()
                if stopped or (cfg.max_steps is not None and step >= cfg.max_steps):
                    break
            if stopped:
                accelerator.print(f"stopped by {stopped} at step {step}: saved {models_dir}/"
                                  f"{STATE_FILE}; continue with --resume")
                break
            last = epoch == cfg.epochs - 1 or (cfg.max_steps is not None and step >= cfg.max_steps)
            log.read()
            if accelerator.is_main_process and (last or (epoch + 1) % cfg.log_every == 0):
                for suffix, module in (("", net), ("_ema", ema_net)):
                    task.draw_grid(module, os.path.join(results_dir, f"{epoch}{suffix}.jpg"))
                    tracking.image(f"samples{suffix}", os.path.join(results_dir, f"{epoch}{suffix}.jpg"), step)
                plot_loss(losses, os.path.join(results_dir, "loss.png"), quality=quality)
            if last or (epoch + 1) % cfg.log_every == 0:
                save(epoch, batches_done)
            if last:
                break
    seconds, cpu_seconds = time.perf_counter() - start - measuring, time.process_time() - cpu_start
    accelerator.print(f"done: {step} steps ({log.skipped} skipped: {log.reason}), {step - run['step']} of them in "
                      f"{seconds:.1f} s ({cpu_seconds:.1f} s of CPU); grids in {results_dir}/, checkpoints in "
                      f"{models_dir}/")
    return {"step": step, "epoch": epoch, "losses": losses, "skipped": log.skipped, "stopped": stopped,
            "results_dir": results_dir, "models_dir": models_dir, "quality": quality, "train_seconds": seconds,
            "train_cpu_seconds": cpu_seconds}


def train_images(config_cls, argv=None, conditional=True, description=None):
    """The command line of ddpm.py (conditional=False) and ddpm_conditional.py."""
    cfg, flags = parse_config(config_cls, argv, description, extra=RUN_FLAGS)
    return train(cfg, flags, functools.partial(image_task, conditional=conditional))
