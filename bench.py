"""Speed of the class-conditional U-Net: training, network evaluations, memory, 10x10 grids, % of matmul peak.

    python bench.py                                   # reference: 64 px, batch 8, base 64, 10 classes, fp32
    python bench.py --precision bf16 --out bench_bf16.json
    python bench.py --base_channels 8 --image_size 16 --batch 2 --steps 2 --warmup 1   # seconds, for tests
    python bench.py --data --image_size 32 --batch 128 --grid_samplers ''   # + the input pipeline: which one bounds?

Training is measured twice, side by side: as it is and with --gradient_checkpointing (each Down, Up and attention
block recomputed in the backward pass), each with its images/s and peak memory (--gradient_checkpointing false
skips the second).

Each measurement runs in a fresh subprocess (--isolate true), so its peak memory is its own: ru_maxrss is a
process-lifetime peak on the CPU; on CUDA it is torch.cuda.max_memory_allocated.

FLOPs are counted by torch.utils.flop_counter.FlopCounterMode (convolutions, matmuls and, through
`count_flops`, the CPU attention kernel): one training step is forward + backward, the optimizer is not
counted. "% of peak" divides the achieved FLOP/s by the best of a few large square matmuls in the same
precision, measured in the same run. On CUDA both run with TF32 on, as training does (--tf32 false: both in IEEE
float32; cuDNN's convolutions would otherwise use TF32 against an IEEE matmul peak); the table names the mode.

Grid times (num_classes x n_per_row images, guided, each sampler at its default steps) are estimated:
steps x (rows per step / measured network evaluations per second) + the sampler's own work, timed by a full
run with a network that costs nothing. --grid_full true times complete runs with the real network as well.
"""
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from config import parse_attn_factors
from data import data_on_device, get_dataset, make_dataloader
from diffusion import DEFAULT_STEPS, SAMPLERS, Diffusion
from modules import EMA, build_network
from utils import UsageError, arg, config_to_dict, count_flops, parse_config, pick_device, run_cli, use_tf32


# ----------------------------------------------------------------------------- configuration
@dataclass
class Config:
    base_channels: int = arg(64, "U-Net width; 64 is the reference network (23M parameters)")
    attn_factors: str = arg("1,2,4,8", "downsampling factors whose blocks have self-attention, as in the training "
                                       "scripts ('2,4,8': none at full resolution; the quick preset's)")
    num_classes: int = arg(10, "classes of the conditional network; the grid has one row per class")
    image_size: int = arg(64, "pixels, divisible by 8")
    batch: int = arg(8, "images per training step and per timed network evaluation")
    precision: str = arg("fp32", "fp32 | bf16 (torch.autocast; the matmul peak is measured in the same dtype)")
    tf32: bool = arg(True, "on CUDA, TF32 tensor cores for float32 matmuls and convolutions, as training uses them "
                           "(false: IEEE float32); network and peak are measured in the same mode")
    device: str = arg("auto", "auto (cuda if available, else cpu) | cpu | cuda")
    compile: bool = arg(False, "torch.compile the network before timing")
    gradient_checkpointing: bool = arg(True, "also measure training with gradient checkpointing (modules.UNet's "
                                             "enable_gradient_checkpointing), beside the plain training")
    warmup: int = arg(2, "untimed steps before each timing")
    steps: int = arg(5, "timed training steps, and timed network evaluations")
    peak_size: int = arg(4096, "n of the n x n matmul that measures the peak (2048 gave unstable peaks here)")
    peak_repeats: int = arg(8, "matmuls timed for the peak; the best counts")
    n_per_row: int = arg(10, "grid images per class: 10 gives the 10x10 grid", old_names=("grid_per_class",))
    cfg_scale: float = arg(3.0, "guidance of the grid; > 0 doubles the rows of every network call")
    grid_samplers: str = arg(",".join(SAMPLERS), "comma-separated samplers to time on the grid ('' for none)")
    grid_full: bool = arg(False, "also time complete grid runs with the real network (slow on a CPU)")
    data: bool = arg(False, "also measure the input pipeline's images/s on a CIFAR-like folder of 8-bit PNGs at "
                            "image_size (random flips), through the DataLoader and held on the device")
    data_workers: str = arg("0,2", "comma-separated DataLoader worker counts that --data measures")
    data_images: int = arg(2560, "images in --data's folder (written to a temporary folder, then deleted)")
    isolate: bool = arg(True, "run each measurement in a fresh subprocess, so each peak memory is its own")
    seed: int = arg(0, "seed of the inputs and of the grid noise")
    out: str = arg("bench.json", "JSON file of the results")

    def validate(self):
        """One readable error for each value the benchmark cannot use."""
        if self.precision not in ("fp32", "bf16"):
            raise UsageError(f"precision '{self.precision}' is unknown: use fp32 or bf16")
        if self.device.split(":")[0] not in ("auto", "cpu", "cuda"):
            raise UsageError(f"device '{self.device}' is not supported here: use auto, cpu or cuda")
        if self.image_size % 8:
            raise UsageError(f"image_size {self.image_size} is not divisible by 8: use 16, 32 or 64")
        for name in ("base_channels", "num_classes", "batch", "steps", "peak_size", "peak_repeats", "n_per_row"):
            if getattr(self, name) <= 0:
                raise UsageError(f"{name} {getattr(self, name)} must be positive")
        if self.warmup < 0 or self.cfg_scale < 0:
            raise UsageError(f"warmup {self.warmup} and cfg_scale {self.cfg_scale} must not be negative")
        parse_attn_factors(self.attn_factors)
        unknown = [s for s in grid_samplers(self) if s not in SAMPLERS]
        if unknown:
            raise UsageError(f"grid sampler '{unknown[0]}' is unknown: use some of {', '.join(SAMPLERS)}")
        try:
            workers = data_workers(self)
        except ValueError:
            raise UsageError(f"data_workers '{self.data_workers}' is not a list of counts: use e.g. 0,2,8") from None
        if any(w < 0 for w in workers) or self.data_images < 2 * self.batch:
            raise UsageError(f"data_workers {self.data_workers} / data_images {self.data_images}: use counts >= 0 and at "
                             f"least 2 batches of images, e.g. --data_images {2 * self.batch}")


MEASUREMENTS = ("peak", "train", "train_checkpointed", "forward", "grid", "ema", "data")
EXTRA_FLAGS = [("--only", {"choices": MEASUREMENTS, "default": None,
                           "help": "run this one measurement in this process and write its JSON to --out"})]


def grid_samplers(cfg):
    return [s.strip() for s in cfg.grid_samplers.split(",") if s.strip()]


def data_workers(cfg):
    return [int(w) for w in cfg.data_workers.split(",") if w.strip()]


def measurements(cfg):
    wanted = {"data": cfg.data, "train_checkpointed": cfg.gradient_checkpointing}
    return [name for name in MEASUREMENTS if wanted.get(name, True)]


def default_steps(sampler, noise_steps=1000):
    """Network calls of `sampler` at its default steps (ddpm: Alg. 2 over t = T-1..1)."""
    return DEFAULT_STEPS.get(sampler, noise_steps - 1)


# ----------------------------------------------------------------------------- helpers
def numeric_mode(cfg, device):
    """Set TF32 on CUDA as --tf32 says, for the network and the peak alike; returns the mode in words."""
    if device.type != "cuda":
        return cfg.precision
    use_tf32(cfg.tf32)
    fp32 = "TF32" if cfg.tf32 else "IEEE fp32"
    return f"{fp32}" if cfg.precision == "fp32" else f"{cfg.precision} autocast, other float32 ops in {fp32}"


def autocast_dtype(precision):
    return torch.bfloat16 if precision == "bf16" else None


class Runner(nn.Module):
    """The network under autocast (when dtype is set), returning float32 eps so that the loss and the
    samplers' math stay in float32, as the training loop and sampling do with mixed precision."""

    def __init__(self, net, dtype, device_type):
        super().__init__()
        self.net = net
        self.dtype = dtype
        self.device_type = device_type
        self.num_classes = net.num_classes

    def forward(self, x, t, y=None):
        with torch.autocast(self.device_type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            return self.net(x, t, y).float()


class ZeroEps(nn.Module):
    """A network that costs nothing (eps = 0): a full sampler run with it times the sampler's own work."""

    def __init__(self, num_classes):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x, t, y=None):
        return torch.zeros_like(x)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, device, warmup, repeats):
    """Seconds of each of `repeats` calls of fn, after `warmup` untimed calls; CUDA is synchronized."""
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def median(values):
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def peak_memory_mib(device):
    """This process's peak: ru_maxrss on the CPU (KiB on Linux, bytes on macOS), max allocated on CUDA."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(pick_device(name))


def build(cfg, device):
    """(network, its Runner (compiled if asked), Diffusion) for this config."""
    torch.manual_seed(cfg.seed)
    net = build_network({"backbone": "unet", "c_in": 3, "c_out": 3, "num_classes": cfg.num_classes,
                         "conditioning": "add", "base_channels": cfg.base_channels,
                         "attn_factors": parse_attn_factors(cfg.attn_factors)}).to(device)
    model = torch.compile(net) if cfg.compile else net
    runner = Runner(model, autocast_dtype(cfg.precision), device.type)
    diffusion = Diffusion(image_size=cfg.image_size, device=device)
    return net, runner, diffusion


def random_batch(cfg, device):
    generator = torch.Generator(device).manual_seed(cfg.seed)
    x_0 = torch.rand(cfg.batch, 3, cfg.image_size, cfg.image_size, generator=generator, device=device) * 2 - 1
    labels = torch.randint(0, cfg.num_classes, (cfg.batch,), generator=generator, device=device)
    return x_0, labels


# ----------------------------------------------------------------------------- measurements
def measure_peak(cfg, device):
    """Best FLOP/s of an n x n matmul in the benchmark's precision."""
    dtype = autocast_dtype(cfg.precision) or torch.float32
    a = torch.randn(cfg.peak_size, cfg.peak_size, device=device, dtype=dtype)
    b = torch.randn(cfg.peak_size, cfg.peak_size, device=device, dtype=dtype)
    seconds = time_calls(lambda: a @ b, device, 1, cfg.peak_repeats)
    return {"flops_per_s": 2 * cfg.peak_size**3 / min(seconds), "size": cfg.peak_size}


def measure_train(cfg, device, checkpointing=False):
    """Images/s of AdamW steps on Diffusion.loss, and the FLOPs of one forward + backward (with checkpointing: the
    recomputed forward passes of the blocks too)."""
    net, runner, diffusion = build(cfg, device)
    net.enable_gradient_checkpointing(checkpointing)
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-4)
    x_0, labels = random_batch(cfg, device)

    def step():
        loss = diffusion.loss(runner, x_0, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def forward_backward():
        diffusion.loss(Runner(net, runner.dtype, device.type), x_0, labels).backward()

    flops = count_flops(forward_backward)
    step_s = median(time_calls(step, device, cfg.warmup, cfg.steps))
    return {"images_per_s": cfg.batch / step_s, "step_s": step_s, "flops_per_step": flops,
            "flops_per_s": flops / step_s, "peak_mem_mib": peak_memory_mib(device)}


def measure_forward(cfg, device):
    """Network evaluations (images) per second: eval mode, no grad, `batch` rows.

    FLOPs are counted in train mode: same math, but PyTorch's eval-mode attention fast path is one fused op
    that FlopCounterMode does not see into.
    """
    net, runner, diffusion = build(cfg, device)
    x_0, labels = random_batch(cfg, device)
    t = diffusion.sample_timesteps(cfg.batch)
    with torch.no_grad():
        flops = count_flops(lambda: Runner(net, runner.dtype, device.type)(x_0, t, labels))
        runner.eval()
        call_s = median(time_calls(lambda: runner(x_0, t, labels), device, cfg.warmup, cfg.steps))
    return {"evals_per_s": cfg.batch / call_s, "call_s": call_s, "flops_per_call": flops,
            "flops_per_s": flops / call_s, "peak_mem_mib": peak_memory_mib(device)}


def measure_grid(cfg, device):
    """For each sampler: the seconds of a full grid run with a free network (the sampler's own work), and
    with --grid_full the seconds of a full run with the real network."""
    net, runner, diffusion = build(cfg, device)
    labels = torch.arange(cfg.num_classes, device=device).repeat_interleave(cfg.n_per_row)
    free = ZeroEps(cfg.num_classes)
    results = {}
    for sampler in grid_samplers(cfg):
        def run(model, sampler=sampler):
            diffusion.sample(model, labels.shape[0], labels, cfg.cfg_scale, sampler=sampler, seed=cfg.seed,
                             progress=False)
        results[sampler] = {"steps": default_steps(sampler, diffusion.noise_steps),
                            "overhead_s": time_calls(lambda: run(free), device, 0, 1)[0]}
        if cfg.grid_full:
            results[sampler]["measured_s"] = time_calls(lambda: run(runner), device, 0, 1)[0]
    return {"samplers": results, "images": int(labels.shape[0]), "peak_mem_mib": peak_memory_mib(device)}


def measure_ema(cfg, device):
    """Milliseconds of one EMA update of the network's weights (modules.EMA, as training calls it every step)."""
    net, _, _ = build(cfg, device)
    ema_net, ema = copy.deepcopy(net).requires_grad_(False), EMA(start_step=0)
    calls = median(time_calls(lambda: ema.step_ema(ema_net, net), device, cfg.warmup, 10 * cfg.steps))
    return {"ms_per_step": 1000 * calls, "tensors": len(list(net.parameters()))}


def write_folder(root, n, size, seed=0):
    """n CIFAR-like 8-bit PNGs of size x size in 10 class subfolders: smooth random colours with some noise."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
        pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-20, 21, (size, size, 3))
        folder = os.path.join(root, f"class_{i % 10}")
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(os.path.join(folder, f"{i:05d}.png"))


def images_per_s(loader, to_device, device, epochs=2):
    """Images/s that `loader` delivers on the device over `epochs` passes, after its first batch (worker start)."""
    count, start = 0, None
    for _ in range(epochs):
        for batch in loader:
            images = to_device(batch)[0]
            if start is None:
                sync(device)
                start = time.perf_counter()
            else:
                count += len(images)
    sync(device)
    return count / (time.perf_counter() - start)


def measure_data(cfg, device):
    """The input pipeline's images/s: the DataLoader (PIL decode, resize, crop, flip; pinned copy to the device)
    with each worker count, and the data set held on the device (index, decode, flip there; its one-time load)."""
    with tempfile.TemporaryDirectory() as root:
        write_folder(root, cfg.data_images, cfg.image_size, cfg.seed)
        dataset = get_dataset("imagefolder", root, cfg.image_size, augment="flip")
        pin = device.type == "cuda"
        dataloader = {}
        for workers in data_workers(cfg):
            loader = make_dataloader(dataset, cfg.batch, workers, seed=cfg.seed, pin_memory=pin)
            dataloader[str(workers)] = images_per_s(
                loader, lambda batch: [t.to(device, non_blocking=True) for t in batch], device)
            del loader  # stops its workers
        start = time.perf_counter()
        held, _ = data_on_device(dataset, device, wanted=True, num_workers=max(data_workers(cfg), default=0))
        sync(device)
        load_s = time.perf_counter() - start
        loader = make_dataloader(held, cfg.batch, 0, seed=cfg.seed, pin_memory=pin)
        on_device = images_per_s(loader, lambda indices: held.fetch(indices, seed=cfg.seed), device)
    return {"images": cfg.data_images, "image_size": cfg.image_size, "dataloader_images_per_s": dataloader,
            "on_device_images_per_s": on_device, "on_device_load_s": load_s, "on_device_mib": held.nbytes / 2**20}


def measure_train_checkpointed(cfg, device):
    return measure_train(cfg, device, checkpointing=True)


MEASURE = {"peak": measure_peak, "train": measure_train, "train_checkpointed": measure_train_checkpointed,
           "forward": measure_forward, "grid": measure_grid, "ema": measure_ema, "data": measure_data}


def run_isolated(name, cfg):
    """Run one measurement in a fresh Python process and return its JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        config_path, out_path = os.path.join(tmp, "config.json"), os.path.join(tmp, "out.json")
        with open(config_path, "w") as f:
            json.dump(config_to_dict(cfg), f)
        command = [sys.executable, os.path.abspath(__file__), "--config", config_path, "--only", name,
                   "--out", out_path]
        subprocess.run(command, check=True)
        with open(out_path) as f:
            return json.load(f)


# ----------------------------------------------------------------------------- report
def summarize(cfg, device, parts):
    """The results as one dict: fractions of peak and grid times filled in."""
    peak = parts["peak"]["flops_per_s"]
    for name in ("train", "train_checkpointed", "forward"):
        if name in parts:
            parts[name]["fraction_of_peak"] = parts[name]["flops_per_s"] / peak
    grid = parts["grid"]
    rows_per_step = grid["images"] * (2 if cfg.cfg_scale > 0 else 1)
    for entry in grid["samplers"].values():
        entry["network_s"] = entry["steps"] * rows_per_step / parts["forward"]["evals_per_s"]
        entry["estimated_s"] = entry["network_s"] + entry["overhead_s"]
    samplers = grid["samplers"]
    if "ddpm" in samplers and "dpm++" in samplers:
        grid["speedup_dpmpp_vs_ddpm"] = samplers["ddpm"]["estimated_s"] / samplers["dpm++"]["estimated_s"]
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"cpu, {torch.get_num_threads()} threads"
    measured = {k: parts[k] for k in ("train", "train_checkpointed", "forward", "grid", "ema", "data") if k in parts}
    return {"config": config_to_dict(cfg), "device": device_name, "torch": torch.__version__,
            "isolated": cfg.isolate, "matmul_peak": parts["peak"], **measured}


def format_seconds(seconds):
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.2f} s"


def format_table(result):
    """The results as a small plain-text table."""
    cfg, train, forward = result["config"], result["train"], result["forward"]
    lines = [f"{result['device']}, {result['mode']}, {cfg['image_size']} px, batch {cfg['batch']}, "
             f"base {cfg['base_channels']}, {cfg['num_classes']} classes",
             f"{'matmul peak':<26}{result['matmul_peak']['flops_per_s'] / 1e9:10.1f} GFLOP/s "
             f"({result['matmul_peak']['size']}^2)"]
    rows = [("training", train, "images_per_s"), ("training, checkpointed", result.get("train_checkpointed"),
                                                  "images_per_s"), ("network evaluations", forward, "evals_per_s")]
    for label, part, rate in rows:
        if part is not None:
            lines.append(f"{label:<26}{part[rate]:10.2f} img/s   {part['flops_per_s'] / 1e9:8.1f} GFLOP/s "
                         f"{100 * part['fraction_of_peak']:5.1f}% of peak   peak mem {part['peak_mem_mib']:.0f} MiB")
    if "train_checkpointed" in result:
        lines.append(checkpointing_line(train, result["train_checkpointed"]))
    grid = result["grid"]
    lines.append(f"grid of {grid['images']} images, cfg {cfg['cfg_scale']} (peak mem {grid['peak_mem_mib']:.0f} MiB):")
    for sampler, entry in grid["samplers"].items():
        measured = f"   measured {format_seconds(entry['measured_s'])}" if "measured_s" in entry else ""
        lines.append(f"  {sampler:<10}{entry['steps']:4d} steps {format_seconds(entry['estimated_s']):>10} "
                     f"(estimated){measured}")
    if "speedup_dpmpp_vs_ddpm" in grid:
        lines.append(f"  dpm++ vs ddpm: {grid['speedup_dpmpp_vs_ddpm']:.0f}x faster")
    ema = result["ema"]
    lines.append(f"{'EMA update':<26}{ema['ms_per_step']:10.2f} ms per step ({ema['tensors']} tensors)")
    if "data" in result:
        lines += format_data(result["data"], train["images_per_s"])
    return "\n".join(lines)


def checkpointing_line(plain, checkpointed):
    """Gradient checkpointing against plain training: peak memory and images/s, and their ratios."""
    return (f"  gradient checkpointing: peak mem {plain['peak_mem_mib']:.0f} -> {checkpointed['peak_mem_mib']:.0f} MiB "
            f"(x{checkpointed['peak_mem_mib'] / plain['peak_mem_mib']:.2f}), {plain['images_per_s']:.2f} -> "
            f"{checkpointed['images_per_s']:.2f} img/s (x{checkpointed['images_per_s'] / plain['images_per_s']:.2f})")


def format_data(data, training):
    """--data's lines: each pipeline's images/s and how many times the network's training images/s it is."""
    lines = [f"input pipeline, {data['images']} CIFAR-like 8-bit PNGs at {data['image_size']} px, random flips "
             f"(network training: {training:.2f} img/s):"]
    rows = [(f"DataLoader, {w} workers", rate) for w, rate in data["dataloader_images_per_s"].items()]
    rows.append(("held on the device", data["on_device_images_per_s"]))
    for label, rate in rows:
        lines.append(f"  {label:<24}{rate:10.0f} img/s = {rate / training:8.1f}x training")
    lines.append(f"  (held on the device: {data['on_device_mib']:.1f} MiB, loaded once in "
                 f"{data['on_device_load_s']:.1f} s)")
    return lines


def write_json(obj, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def main(argv=None):
    cfg, flags = parse_config(Config, argv, __doc__, extra=EXTRA_FLAGS)
    device = resolve_device(cfg.device)
    mode = numeric_mode(cfg, device)
    if flags.only is not None:
        write_json(MEASURE[flags.only](cfg, device), cfg.out)
        return None
    parts = {}
    for name in measurements(cfg):
        if device.type == "cuda":  # each measurement's own peak, also without --isolate
            torch.cuda.reset_peak_memory_stats(device)
        parts[name] = run_isolated(name, cfg) if cfg.isolate else MEASURE[name](cfg, device)
    result = {**summarize(cfg, device, parts), "mode": mode}
    print(format_table(result))
    write_json(result, cfg.out)
    return result


if __name__ == "__main__":
    run_cli(main)
