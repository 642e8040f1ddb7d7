"""The one training loop, shared by ddpm.py, ddpm_conditional.py and train_sd.py.

`train` reads top to bottom: data, noise, loss, step, EMA, log, save. What differs between the scripts (the
data set, the network, what a batch conditions on, how a grid is drawn) comes in as a `Task`, built by
`image_task` for the pixel-space scripts and by `train_sd.text_task` for text-to-image. Accelerate handles
the device, mixed precision and multi-GPU, so the same script runs under `python`, `accelerate launch` and
`torchrun`.
"""
import copy
import functools
import os
import random
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from data import AUGMENTATIONS, get_dataset, make_dataloader
from ddpm import SAMPLERS, Diffusion
from modules import EMA, NULL_LABEL, UNet, UNet_conditional
from utils import (UsageError, atomic_save, config_to_dict, diff_configs, load_checkpoint, load_state_dict_strict,
                   parse_config, pick_device, plot_loss, save_config, save_images, seed_everything)

STATE_FILE = "training_state.pt"  # model, EMA, optimizer, step, epoch, RNG states, config, losses
# Fields that may change between a run and its resumption; any other difference is refused.
RESUMABLE_FIELDS = ("epochs", "max_steps", "log_every", "num_workers", "device", "n_samples", "n_per_class",
                    "sampler", "sample_steps", "compile", "mixed_precision", "clip_x0")
RUN_FLAGS = [
    ("--resume", {"action": "store_true", "help": f"continue from models/<run_name>/{STATE_FILE}"}),
    ("--overwrite", {"action": "store_true", "help": "start over even if models/<run_name>/ holds a run"}),
]


def validate(cfg):
    """One readable error for each value the run cannot use."""
    if cfg.image_size % 8:
        raise UsageError(f"image_size {cfg.image_size} is not divisible by 8: the U-Net halves it 3 times; "
                         "use 16, 32 or 64")
    if not 0.0 <= getattr(cfg, "p_uncond", 0.0) <= 1.0:
        raise UsageError(f"p_uncond {cfg.p_uncond} is not a probability: use a value in [0, 1], e.g. 0.1")
    if getattr(cfg, "cfg_scale", 0.0) < 0:
        raise UsageError(f"cfg_scale {cfg.cfg_scale} is negative: use 0 (no guidance) or e.g. 3")
    if cfg.sampler not in SAMPLERS:
        raise UsageError(f"sampler '{cfg.sampler}' is unknown: use one of {', '.join(SAMPLERS)}")
    if cfg.mixed_precision not in ("no", "fp16", "bf16"):
        raise UsageError(f"mixed_precision '{cfg.mixed_precision}' is unknown: use no, fp16 or bf16")
    if getattr(cfg, "augment", None) not in (None, *AUGMENTATIONS):
        raise UsageError(f"augment '{cfg.augment}' is unknown: use one of {', '.join(AUGMENTATIONS)}, or None")
    if cfg.grad_clip is not None and cfg.grad_clip <= 0:
        raise UsageError(f"grad_clip {cfg.grad_clip} must be positive: use e.g. 1.0, or None for no clipping")
    for name in ("batch_size", "epochs", "log_every", "base_channels", "noise_steps"):
        if getattr(cfg, name) <= 0:
            raise UsageError(f"{name} {getattr(cfg, name)} must be positive")


def make_accelerator(cfg):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    device = pick_device(cfg.device)
    if cfg.mixed_precision == "fp16" and device == "cpu":
        raise UsageError("mixed_precision fp16 needs a GPU: use --mixed_precision bf16 on the CPU")
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 tensor cores for fp32 matmuls and convolutions
        torch.backends.cudnn.allow_tf32 = True
    return Accelerator(cpu=device == "cpu", mixed_precision=cfg.mixed_precision,
                       dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed))


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


def rng_state():
    """The RNG states as plain lists and tensors, which weights_only loading accepts."""
    _, np_key, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [np_key.tolist(), np_pos, np_has_gauss, np_gauss],
             "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np_key, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state(("MT19937", np.array(np_key, dtype=np.uint32), np_pos, np_has_gauss, np_gauss))
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_run(cfg, net, ema_net, ema, optimizer, step, epoch, batches_done, batches_per_epoch, losses, models_dir):
    """Plain state_dicts as the reference names them, and the full state for --resume; all atomic.

    A resumed run starts at the next epoch if `epoch` finished, else after this epoch's `batches_done`.
    """
    if batches_done == batches_per_epoch:
        epoch, batches_done = epoch + 1, 0
    atomic_save(net.state_dict(), os.path.join(models_dir, "ckpt.pt"))
    atomic_save(ema_net.state_dict(), os.path.join(models_dir, "ema_ckpt.pt"))
    save_config(cfg, os.path.join(models_dir, "config.json"))
    state = {"model": net.state_dict(), "ema": ema_net.state_dict(), "ema_state": ema.state_dict(),
             "optimizer": optimizer.state_dict(), "step": step, "epoch": epoch, "batches_done": batches_done,
             "losses": losses, "rng": rng_state(), "config": config_to_dict(cfg)}
    atomic_save(state, os.path.join(models_dir, STATE_FILE))


def restore_run(cfg, models_dir, net, ema_net, ema, optimizer, resumable=RESUMABLE_FIELDS):
    """Load models/<run_name>/training_state.pt into the run; returns (step, epoch, batches_done, losses)."""
    state = load_checkpoint(os.path.join(models_dir, STATE_FILE))
    changed = diff_configs(state["config"], config_to_dict(cfg), ignore=resumable)
    if changed:
        raise UsageError(f"--resume with a different config: {'; '.join(changed)}; use the saved values "
                         f"({models_dir}/config.json) or start a new --run_name")
    load_state_dict_strict(net, state["model"])
    load_state_dict_strict(ema_net, state["ema"])
    ema.load_state_dict(state["ema_state"])
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    print(f"resumed {cfg.run_name} at step {state['step']}, epoch {state['epoch']}")
    return state["step"], state["epoch"], state["batches_done"], list(state["losses"])


def epoch_batches(accelerator, dataloader, epoch, skip):
    """This epoch's batches with a progress bar, after the `skip` batches a resumed run already trained on."""
    dataloader.set_epoch(epoch)
    batches = accelerator.skip_first_batches(dataloader, skip) if skip else dataloader
    return tqdm(batches, desc=f"epoch {epoch}", disable=not accelerator.is_local_main_process)


# ----------------------------------------------------------------------------- what each script trains
@dataclass
class Task:
    """What one script trains; the loop in `train` does the rest.

    make_batch maps a batch of the data set to (x_0, conditioning): the conditioning is dropped with
    probability p_uncond for guidance, or None for an unconditional model. draw_grid(module, path) saves a
    grid of `module`'s samples from fixed noise and conditioning.
    """
    dataset: torch.utils.data.Dataset
    net: torch.nn.Module
    diffusion: Diffusion
    make_batch: Callable
    draw_grid: Callable


def build_model(cfg, num_classes):
    if num_classes is None:
        return UNet(base_channels=cfg.base_channels)
    return UNet_conditional(num_classes=num_classes, base_channels=cfg.base_channels)


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
    """ddpm.py and ddpm_conditional.py: a class data set in pixel space, with or without its labels."""
    device = accelerator.device
    if device.type == "cpu" and cfg.max_steps is None and cfg.base_channels >= 64 and cfg.image_size >= 32:
        warnings.warn("this full-size config takes days on the CPU: try --config configs/quick_cpu.json "
                      "(shapes at 16 px, a few minutes)", stacklevel=2)
    dataset = get_dataset(cfg.dataset, cfg.dataset_path, cfg.image_size, seed=cfg.seed, size=cfg.dataset_size,
                          augment=cfg.augment)
    num_classes = len(dataset.classes) if conditional else None
    diffusion = Diffusion(cfg.noise_steps, cfg.beta_start, cfg.beta_end, cfg.image_size, device=device,
                          clip_x0=cfg.clip_x0)
    labels = grid_labels(cfg, num_classes, device)
    n = cfg.n_samples if labels is None else labels.shape[0]

    def draw_grid(module, path):
        images = diffusion.sample(module, n, labels, getattr(cfg, "cfg_scale", 0.0), sampler=cfg.sampler,
                                  steps=cfg.sample_steps, seed=cfg.seed)
        save_images(images, path, nrow=cfg.n_per_class if labels is not None else None)

    if conditional:
        make_batch = functools.partial(drop_labels, p_uncond=cfg.p_uncond)
    else:
        def make_batch(batch):
            return batch[0], None
    return Task(dataset, build_model(cfg, num_classes), diffusion, make_batch, draw_grid)


# ----------------------------------------------------------------------------- the loop
def train(cfg, flags, make_task, resumable=RESUMABLE_FIELDS):
    """Train `make_task(cfg, accelerator)`'s network; returns the step, epoch, losses and the run's folders."""
    validate(cfg)
    results_dir, models_dir = run_dirs(cfg, flags.resume, flags.overwrite)
    accelerator = make_accelerator(cfg)
    device = accelerator.device
    seed_everything(cfg.seed)

    task = make_task(cfg, accelerator)
    dataloader = make_dataloader(task.dataset, cfg.batch_size, cfg.num_workers, seed=cfg.seed,
                                 pin_memory=device.type == "cuda")
    net = task.net
    if getattr(cfg, "channels_last", False):
        net = net.to(memory_format=torch.channels_last)
    ema_net = copy.deepcopy(net).requires_grad_(False).to(device)
    ema = EMA(cfg.ema_beta, cfg.ema_start, cfg.ema_warmup)
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr)

    step, start_epoch, skip_batches, losses = 0, 0, 0, []
    if flags.resume:
        step, start_epoch, skip_batches, losses = restore_run(cfg, models_dir, net, ema_net, ema, optimizer,
                                                              resumable)
    model = torch.compile(net) if getattr(cfg, "compile", False) else net
    model, optimizer, dataloader = accelerator.prepare(model, optimizer, dataloader)

    os.makedirs(results_dir, exist_ok=True)
    if accelerator.is_main_process:
        save_config(cfg, os.path.join(results_dir, "config.json"))
        accelerator.print(f"config: {config_to_dict(cfg)}")
    epoch = start_epoch
    for epoch in range(start_epoch, cfg.epochs):
        batches_done = skip_batches if epoch == start_epoch else 0
        pbar = epoch_batches(accelerator, dataloader, epoch, batches_done)
        for batch in pbar:
            x_0, conditioning = task.make_batch(batch)
            loss = task.diffusion.loss(model, x_0, conditioning)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            if cfg.grad_clip is not None:
                accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            ema.step_ema(ema_net, net)
            step += 1
            batches_done += 1
            losses.append(loss.item())
            pbar.set_postfix(loss=f"{losses[-1]:.4f}", step=step)
            if cfg.max_steps is not None and step >= cfg.max_steps:
                break
        last = epoch == cfg.epochs - 1 or (cfg.max_steps is not None and step >= cfg.max_steps)
        if accelerator.is_main_process and (last or (epoch + 1) % cfg.log_every == 0):
            for suffix, module in (("", net), ("_ema", ema_net)):
                task.draw_grid(module, os.path.join(results_dir, f"{epoch}{suffix}.jpg"))
            plot_loss(losses, os.path.join(results_dir, "loss.png"))
            save_run(cfg, net, ema_net, ema, optimizer, step, epoch, batches_done, len(dataloader), losses, models_dir)
        if last:
            break
    accelerator.print(f"done: {step} steps; grids in {results_dir}/, checkpoints in {models_dir}/")
    return {"step": step, "epoch": epoch, "losses": losses, "results_dir": results_dir, "models_dir": models_dir}


def train_images(config_cls, argv=None, conditional=True, description=None):
    """The command line of ddpm.py (conditional=False) and ddpm_conditional.py."""
    cfg, flags = parse_config(config_cls, argv, description, extra=RUN_FLAGS)
    return train(cfg, flags, functools.partial(image_task, conditional=conditional))
