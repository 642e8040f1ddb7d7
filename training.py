"""The one training loop, shared by every training script: data, noise, loss, step, EMA, log, save.

`train` reads top to bottom: it starts the run (`start_run`), trains each epoch (`train_epoch`, one optimizer step
at a time in `train_step`), and after each epoch draws the grids and saves (`end_epoch`). What differs between the
scripts (the data set, the network, what a batch conditions on, how a grid is drawn) comes in as a `Task`:
`image_task` is ddpm.py's and ddpm_conditional.py's (in pixel space, or in a VAE's latents with --vae);
ddpm_img2img.py, train_sd.py and train_vae.py (whose autoencoder brings its own loss) build their own. The run's
files are checkpoints.py's. Accelerate handles the device, mixed precision and multi-GPU, so the same script runs
under `python`, `accelerate launch` and `torchrun`.
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

from checkpoints import STATE_FILE, TrainingError, restore_run, run_diffusion, run_dirs, save_run
from config import PRECISIONS, network_arch
from data import data_on_device, dataset_channels, make_dataloader, run_datasets
from diffusion import Diffusion, dropped_rows
from judges import get_judge, offline_figures
from latents import draw_latents, latent_cache_path, load_latents, open_cache, vae_digest
from modules import EMA, NULL_LABEL, build_network
from utils import (UsageError, config_to_dict, grid_labels, parse_config, pick_device, plot_loss, save_config,
                   save_images, seed_everything, use_tf32, write_json)

RUN_FLAGS = [
    ("--resume", {"action": "store_true", "help": f"continue from models/<run_name>/{STATE_FILE}"}),
    ("--overwrite", {"action": "store_true", "help": "start over even if models/<run_name>/ holds a run"}),
]


# ----------------------------------------------------------------------------- what each script trains
@dataclass
class Task:
    """What one script trains; the loop in `train` does the rest.

    config: the run's Config as the task resolved it (--channels None becomes the data set's), saved with the run.
    make_batch maps a batch of the data set to (x_0, conditioning): the conditioning is dropped with probability
    p_uncond for guidance, or None for an unconditional model; a dict is passed to Diffusion.loss as keywords
    (ddpm_img2img.py: {"cond": images[, "labels": ids]}). draw_grid(module, path) saves a grid of `module`'s samples
    from fixed noise and conditioning. measure(module), if given, returns the offline quality figures of `module`'s
    samples (judges.offline_figures), every measure_every steps (--eval_every). classes: the class names of a
    conditional model, saved as models/<run_name>/classes.json for sample.py's grid captions. loss(model, x_0,
    conditioning, step), if given, replaces the diffusion loss (train_vae.py's autoencoder has no diffusion).
    vae_digest: the VAE whose latents the run trains on (latents.vae_digest), saved in each checkpoint, so that
    --resume refuses another VAE.
    """
    config: object
    dataset: torch.utils.data.Dataset
    net: torch.nn.Module
    diffusion: Diffusion | None
    make_batch: Callable
    draw_grid: Callable
    measure: Callable | None = None
    measure_every: int | None = None
    classes: list[str] | None = None
    loss: Callable | None = None
    vae_digest: str | None = None

    def compute_loss(self, model, x_0, conditioning, step):
        """The loss of one batch: the task's own, else the DDPM loss of diffusion.py."""
        if self.loss is not None:
            return self.loss(model, x_0, conditioning, step)
        if isinstance(conditioning, dict):
            return self.diffusion.loss(model, x_0, **conditioning)
        return self.diffusion.loss(model, x_0, conditioning)


# ----------------------------------------------------------------------------- the loop
@dataclass
class Run:
    """A run in progress: what `start_run` set up, and the progress the loop makes."""
    cfg: object
    task: Task
    accelerator: object
    net: torch.nn.Module  # the network as built; `model` is it prepared (compiled, wrapped for DDP)
    model: torch.nn.Module
    ema_net: torch.nn.Module
    ema: EMA
    adamw: torch.optim.Optimizer  # `optimizer` is it prepared by Accelerate
    optimizer: object
    dataloader: object
    held: object  # the data set on the device (data.DeviceData), or None
    log: "LossLog"
    results_dir: str
    models_dir: str
    step: int
    resumed_at: int  # the step this invocation started from
    start_epoch: int
    batches_done: int  # of the first epoch, by a run that stopped in its middle
    total_steps: int  # where a cosine learning rate ends
    quality: list
    measuring: float = 0.0  # seconds spent in --eval_every measurements


def train(cfg, flags, make_task):
    """Train `make_task(cfg, accelerator)`'s network; returns the step, epoch, losses and the run's folders.

    Under `accelerate launch` or `torchrun` each process trains on its own shard of every epoch and the
    gradients are averaged; EMA, grids and checkpoints are the main process's, and the others wait for it.
    """
    cfg.validate()
    results_dir, models_dir = run_dirs(cfg, flags.resume, flags.overwrite)
    accelerator = make_accelerator(cfg, results_dir)
    run = start_run(cfg, flags.resume, make_task, accelerator, results_dir, models_dir)
    cfg, epoch, stopped = run.cfg, run.start_epoch, None
    start, cpu_start = time.perf_counter(), time.process_time()  # CPU time: what a busy shared machine cannot inflate
    with StopRequest() as stop, Tracking(accelerator, cfg, run.step) as tracking:
        for epoch in range(run.start_epoch, cfg.epochs):
            stopped = train_epoch(run, epoch, stop, start)
            if stopped:
                accelerator.print(f"stopped by {stopped} at step {run.step}: saved {models_dir}/{STATE_FILE}; "
                                  "continue with --resume")
                break
            if end_epoch(run, epoch, tracking):
                break
    seconds, cpu_seconds = time.perf_counter() - start - run.measuring, time.process_time() - cpu_start
    accelerator.print(f"done: {run.step} steps ({run.log.skipped} skipped: {run.log.reason}), "
                      f"{run.step - run.resumed_at} of them in {seconds:.1f} s ({cpu_seconds:.1f} s of CPU); "
                      f"grids in {results_dir}/, checkpoints in {models_dir}/")
    done = {"step": run.step, "epoch": epoch, "skipped": run.log.skipped, "stopped": stopped,
            "train_seconds": seconds, "train_cpu_seconds": cpu_seconds}
    if accelerator.is_main_process:
        write_json(done, os.path.join(results_dir, "training.json"))  # what compare.py reads of a run
    return {**done, "losses": run.log.losses, "results_dir": results_dir, "models_dir": models_dir,
            "quality": run.quality}


def start_run(cfg, resume, make_task, accelerator, results_dir, models_dir):
    """The task, its data loader, network, EMA and optimizer, restored from the last checkpoint with --resume; the
    resolved config written to results/<run_name>/config.json."""
    precision_source = mixed_precision(cfg)[1]
    cfg = dataclasses.replace(cfg, mixed_precision=accelerator.mixed_precision)  # the config saved says what ran
    device = accelerator.device
    seed_everything(cfg.seed)  # the same initial weights on every process
    task = make_task(cfg, accelerator)
    cfg = task.config  # as the task resolved it, as with the precision
    # --data_on_device: the DataLoader yields batches of indices, in the order it would yield the data set's
    held, data_note = data_on_device(task.dataset, device, cfg.data_on_device, cfg.num_workers)
    dataloader = make_dataloader(task.dataset if held is None else held, cfg.batch_size,
                                 cfg.num_workers if held is None else 0, seed=cfg.seed,
                                 pin_memory=device.type == "cuda")
    net = task.net
    ema_net = copy.deepcopy(net).requires_grad_(False).to(device)
    ema = EMA(cfg.ema_beta, cfg.ema_start, cfg.ema_warmup)
    adamw = torch.optim.AdamW(net.parameters(), lr=cfg.lr, fused=True)  # fused: can skip a step on the device
    progress = {"step": 0, "epoch": 0, "batches_done": 0, "losses": [], "skipped": 0}
    if resume:
        progress = restore_run(cfg, models_dir, net, ema_net, ema, adamw, accelerator.num_processes, task.vae_digest)
    quality_path = os.path.join(results_dir, "quality.json")  # --eval_every: [{"step", "seconds", ...figures}]
    quality = read_quality(quality_path, progress["step"]) if resume else []
    model = torch.compile(net) if cfg.compile else net
    model, optimizer = accelerator.prepare(model, adamw)
    dataloader = accelerator.prepare_data_loader(dataloader, device_placement=held is None)  # indices stay on the host
    announce(cfg, task, accelerator, results_dir, models_dir, precision_source, data_note)
    steps_per_epoch = len(dataloader) // cfg.gradient_accumulation_steps
    total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch  # the cosine's end

    def report(n, loss, grad_norm, skipped):  # optimizer step n, counted from the run's start: the same on --resume
        lr = learning_rate(cfg.lr, n - 1, cfg.lr_warmup, cfg.lr_decay, total_steps)
        accelerator.log({"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
                         "train/skipped_steps": skipped}, step=n)

    log = LossLog(accelerator, progress["losses"], progress["skipped"], cfg.max_nonfinite,
                  fp16=cfg.mixed_precision == "fp16", report=report)
    return Run(cfg, task, accelerator, net, model, ema_net, ema, adamw, optimizer, dataloader, held, log, results_dir,
               models_dir, progress["step"], progress["step"], progress["epoch"], progress["batches_done"], total_steps,
               quality)


def announce(cfg, task, accelerator, results_dir, models_dir, precision_source, data_note):
    """Write the resolved config (and the class names) of a starting run, and print what it trains with."""
    os.makedirs(results_dir, exist_ok=True)
    if accelerator.is_main_process:
        save_config(cfg, os.path.join(results_dir, "config.json"))
        if task.classes is not None:
            os.makedirs(models_dir, exist_ok=True)
            write_json(task.classes, os.path.join(models_dir, "classes.json"))
        accelerator.print(f"config: {config_to_dict(cfg)}")
    n = accelerator.num_processes
    accelerator.print(f"{n} process(es) on {accelerator.device.type}: batch {cfg.batch_size} per device x {n} x "
                      f"{cfg.gradient_accumulation_steps} accumulated = "
                      f"{cfg.batch_size * n * cfg.gradient_accumulation_steps} images per optimizer step; lr {cfg.lr}; "
                      f"mixed precision {cfg.mixed_precision} ({precision_source})")
    accelerator.print(data_note)


def train_epoch(run, epoch, stop, start):
    """One epoch of optimizer steps (after the batches a resumed run already trained on), with the checkpoints and
    --eval_every measurements that fall in it; returns what stopped it early (a signal), else None."""
    cfg, accelerator = run.cfg, run.accelerator
    batches_done = run.batches_done if epoch == run.start_epoch else 0
    pbar = epoch_batches(accelerator, run.dataloader, epoch, batches_done)
    for batch in pbar:
        loss, grad_norm, skip = train_step(run, batch, epoch, batches_done)
        batches_done += 1
        run.log.add(loss)
        if not accelerator.sync_gradients:
            continue
        run.log.end_step(skip, grad_norm)
        if accelerator.is_main_process:
            run.ema.step_ema(run.ema_net, run.net)
        run.step += 1
        stopped = None
        if run.step % cfg.print_every == 0 or run.step % cfg.checkpoint_every == 0:
            stopped = (stop.signal or "a signal to another process") if run.log.read(stop.signal) else None
            pbar.set_postfix(loss=f"{run.log.losses[-1]:.4f}", step=run.step, skipped=run.log.skipped)
        if stopped or run.step % cfg.checkpoint_every == 0:
            save(run, epoch, batches_done)
        if run.task.measure_every and run.step % run.task.measure_every == 0:
            measure(run, start)
        if stopped:
            return stopped
        if cfg.max_steps is not None and run.step >= cfg.max_steps:
            break
    run.batches_done = batches_done  # of this epoch, for the save at its end
    return None


def train_step(run, batch, epoch, batches_done):
    """One batch forward and backward; at the end of an accumulation, the optimizer step, which is skipped when the
    gradient is not finite. Returns (loss, gradient norm, skipped: 1.0 or 0.0), the last two None mid-accumulation."""
    cfg, accelerator, grad_norm, skip = run.cfg, run.accelerator, None, None
    with accelerator.accumulate(run.model):
        seed = noise_seed(cfg.seed, epoch, batches_done, accelerator.process_index)
        if run.held is not None:  # a batch of indices; its random flips are drawn from another seed
            batch = run.held.fetch(batch, seed + 1)
        torch.manual_seed(seed)
        x_0, conditioning = run.task.make_batch(batch)
        loss = run.task.compute_loss(run.model, x_0, conditioning, run.step)
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            grad_norm = gradient_norm(accelerator, run.model, cfg.grad_clip)
            skip = (~torch.isfinite(grad_norm)).float()
            run.adamw.found_inf = skip  # fused AdamW leaves weights and moments as they are when 1
            for group in run.adamw.param_groups:
                group["lr"] = learning_rate(cfg.lr, run.step, cfg.lr_warmup, cfg.lr_decay, run.total_steps)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm, skip


def end_epoch(run, epoch, tracking):
    """After an epoch: its grids and loss plot every log_every epochs and at the end, then the checkpoint; True when
    the run is done (the last epoch, or max_steps)."""
    cfg, accelerator = run.cfg, run.accelerator
    last = epoch == cfg.epochs - 1 or (cfg.max_steps is not None and run.step >= cfg.max_steps)
    run.log.read()
    if accelerator.is_main_process and (last or (epoch + 1) % cfg.log_every == 0):
        for suffix, module in (("", run.net), ("_ema", run.ema_net)):
            path = os.path.join(run.results_dir, f"{epoch}{suffix}.jpg")
            run.task.draw_grid(module, path)
            tracking.image(f"samples{suffix}", path, run.step)
        plot_loss(run.log.losses, os.path.join(run.results_dir, "loss.png"), quality=run.quality)
    if last or (epoch + 1) % cfg.log_every == 0:
        save(run, epoch, run.batches_done)
    return last


def save(run, epoch, batches_done):
    """The run's checkpoint (checkpoints.save_run), by the main process, while the others wait."""
    if run.accelerator.is_main_process:
        save_run(run.cfg, run.net, run.ema_net, run.ema, run.adamw, {
            "step": run.step, "epoch": epoch, "batches_done": batches_done,
            "batches_per_epoch": len(run.dataloader), "num_processes": run.accelerator.num_processes,
            "losses": run.log.losses, "skipped": run.log.skipped, "vae_digest": run.task.vae_digest}, run.models_dir)
    run.accelerator.wait_for_everyone()


def measure(run, start):
    """--eval_every: the quality figures of the EMA weights at this step, logged and appended to quality.json; the
    seconds they take are not training time."""
    if run.task.measure is not None:  # set on the main process only
        measure_start = time.perf_counter()
        figures = run.task.measure(run.ema_net)
        seconds = round(measure_start - start - run.measuring, 1)
        run.measuring += time.perf_counter() - measure_start
        run.quality.append({"step": run.step, "seconds": seconds, **figures})
        run.accelerator.log({f"eval/{key}": value for key, value in figures.items() if value is not None},
                            step=run.step)
        write_json(run.quality, os.path.join(run.results_dir, "quality.json"))
    run.accelerator.wait_for_everyone()


# ----------------------------------------------------------------------------- the task of ddpm.py, ddpm_conditional.py
def drop_labels(labels, p_uncond):
    """Class ids (B,) with each row's label replaced by NULL_LABEL with probability p_uncond (CFG training)."""
    return labels.masked_fill(dropped_rows(len(labels), p_uncond, labels.device), NULL_LABEL)


def image_task(cfg, accelerator, conditional):
    """ddpm.py and ddpm_conditional.py: a class data set, with or without its labels, in pixel space or in the
    latents of a frozen VAE (--vae, the code path of train_sd.py), encoded per batch or once (--cache_latents)."""
    device = accelerator.device
    if device.type == "cpu" and cfg.max_steps is None and cfg.base_channels >= 64 and cfg.image_size >= 32:
        warnings.warn("this full-size config takes days on the CPU: try --config configs/quick_cpu.json "
                      "(shapes at 16 px, a few minutes)", stacklevel=2)
    cfg = dataclasses.replace(cfg, channels=cfg.channels or dataset_channels(cfg.dataset, cfg.dataset_path))
    with accelerator.main_process_first():  # one process downloads (CIFAR-10, a Hub VAE); the others then read them
        latents = load_latents(cfg.vae, device, cfg.mixed_precision, image_channels=cfg.channels)
        # --holdout: images never trained on, for evaluate.py --repaint (data.saved_run_split rebuilds them)
        dataset, _, classes = run_datasets(cfg.dataset, cfg.dataset_path, cfg.image_size, cfg.seed, cfg.dataset_size,
                                           cfg.augment, cfg.channels, cfg.holdout)
    num_classes = len(classes) if conditional else None
    diffusion = run_diffusion(cfg, latents, device)
    cfg_scale = cfg.cfg_scale if conditional else 0.0
    draw_grid = image_grid(cfg, diffusion, latents, classes if conditional else None, device)
    measure = None
    if cfg.eval_every and num_classes is not None and cfg.eval_samples < num_classes:
        raise UsageError(f"eval_samples {cfg.eval_samples} is smaller than the {num_classes} classes: pass "
                         f"--eval_samples {num_classes} or more")
    if cfg.eval_every and accelerator.is_main_process:  # one process trains and caches the judge
        judge = get_judge(cfg.dataset, cfg.dataset_path, cfg.image_size, num_real=min(5000, len(dataset)),
                          device=device, channels=cfg.channels)
        print(f"--eval_every {cfg.eval_every}: judge accuracy on held-out real images {judge.heldout_accuracy:.3f}")
        measure = functools.partial(offline_figures, diffusion=diffusion, judge=judge, num_classes=num_classes,
                                    n=cfg.eval_samples, cfg_scale=cfg_scale, sampler=cfg.sampler,
                                    steps=cfg.sample_steps, seed=cfg.seed, decode=latents.decode)
    if cfg.cache_latents:  # batches of (posterior mean, std, label)
        held_out = {"holdout": cfg.holdout} if cfg.holdout else {}  # caches without one keep their keys
        path = latent_cache_path(cfg, dataset, cfg.channels, augment=cfg.augment, **held_out)
        cache = open_cache(accelerator, path, dataset, latents, None, cfg.batch_size, cfg.num_workers)
        dataset = TensorDataset(cache["mean"], cache["std"], cache["label"])

    def make_batch(batch):
        if cfg.cache_latents:
            mean, std, labels = batch
            x_0 = draw_latents(mean, std)
        else:
            x_0, labels = batch
            x_0 = x_0 if latents.vae is None else draw_latents(*latents.encode(x_0))
        return x_0, drop_labels(labels, cfg.p_uncond) if conditional else None

    net = build_network(network_arch(cfg, latents.channels, num_classes))
    return Task(cfg, dataset, net, diffusion, make_batch, draw_grid, measure, cfg.eval_every,
                classes if conditional else None, vae_digest=vae_digest(cfg.vae))


def image_grid(cfg, diffusion, latents, classes, device):
    """draw_grid of image_task: one row of n_per_row images per class, guided (classes None: n_samples images of
    the unconditional model), from fixed noise."""
    labels = None if classes is None else grid_labels(len(classes), cfg.n_per_row, device=device)
    n = cfg.n_samples if labels is None else labels.shape[0]
    cfg_scale = 0.0 if labels is None else cfg.cfg_scale

    def draw_grid(module, path):
        x_0 = diffusion.sample_x0(module, n, labels, cfg_scale, sampler=cfg.sampler, steps=cfg.sample_steps,
                                  seed=cfg.seed)
        if labels is None:
            save_images(latents.decode(x_0), path)
        else:
            save_images(latents.decode(x_0), path, nrow=cfg.n_per_row, captions=classes)

    return draw_grid


def train_images(config_cls, argv=None, conditional=True, description=None):
    """The command line of ddpm.py (conditional=False) and ddpm_conditional.py."""
    cfg, flags = parse_config(config_cls, argv, description, extra=RUN_FLAGS)
    return train(cfg, flags, functools.partial(image_task, conditional=conditional))


# ----------------------------------------------------------------------------- devices, precision, trackers
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


WANDB_PROJECT = "Diffusion-Models-pytorch"  # the wandb project of every run, unless WANDB_PROJECT says another


def trackers(report_to):
    """The tracker names of --report_to (config.REPORT_TO)."""
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
    for name in trackers(cfg.report_to):
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


# ----------------------------------------------------------------------------- the loop's bookkeeping
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
