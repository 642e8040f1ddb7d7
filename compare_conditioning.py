"""Four ways to condition on the label, side by side: add, concat, xattn, adanorm (see modules.UNet_conditional).

    python compare_conditioning.py                      (quick CPU preset, 4 modes x 2 seeds)
    python compare_conditioning.py --preset none --max_steps 30000 --seeds 0,1,2 --num_samples 5000 \
        --num_real 10000 --train_args "--image_size 32 --batch_size 128 --mixed_precision bf16"  (CIFAR-10, GPU)

Every mode trains through ddpm_conditional.py with the same preset, budget and seeds (`--conditioning` is
the only flag that differs), then evaluate.py measures each run's EMA weights with the same sampler, steps,
guidance and noise seed: class accuracy by its learned judge and the Frechet distance in the judge's feature
space (not comparable with published FID). The table gives each figure as mean +- sd over the seeds, with
the parameters, the training throughput and the sampling throughput. Written to out_dir: table.md,
table.json, <mode>.png (a grid of the first seed's run, one row per class) and runs/<run>.json (one record
per run; a record that exists is reused, so an interrupted comparison continues where it stopped).
"""
import json
import os
import platform
import shlex
import statistics
import time
from dataclasses import dataclass

import torch

from modules import UNet_conditional
from utils import (UsageError, _atomic_write, arg, config_to_dict, load_checkpoint, parse_config, pick_device, run_cli,
                   save_images, write_json)


# ----------------------------------------------------------------------------- options
@dataclass
class Config:
    preset: str | None = arg("configs/quick_cpu.json", "ddpm_conditional.py config file every run starts from "
                             "(None: its defaults, CIFAR-10 at 64 px)")
    modes: str = arg("add,concat,xattn,adanorm", "conditioning modes to compare, comma-separated")
    seeds: str = arg("0,1", "training seeds, comma-separated; figures are mean +- sd over them")
    max_steps: int | None = arg(None, "training budget of every run in optimizer steps (None: the preset's)")
    train_args: str = arg("", "more ddpm_conditional.py flags for every run, e.g. '--base_channels 16'")
    evaluate: bool = arg(True, "measure with evaluate.py (false: parameters, speeds and grids only)")
    num_samples: int = arg(200, "samples evaluate.py draws from each run, balanced over the classes")
    num_real: int = arg(2000, "real images for evaluate.py's judge and its reference statistics")
    sampler: str = arg("dpm++", "sampler of the evaluation and the grids: ddpm | ddim | dpm++ | dpm++ode | euler_a")
    steps: int | None = arg(None, "network steps of that sampler (None: its default, 20 for dpm++)")
    cfg_scale: float = arg(3.0, "guidance of the evaluation and the grids")
    n_per_class: int = arg(8, "images in each class row of the grids")
    run_prefix: str = arg("cmp", "runs are models/<run_prefix>_<mode>_s<seed>/")
    out_dir: str = arg("results/compare_conditioning", "folder of the table, the grids and the run records")
    overwrite: bool = arg(False, "retrain and re-measure runs that already have a record")
    device: str = arg("auto", "device of the evaluation and the grids (training uses the preset's)")
    threads: int | None = arg(None, "CPU threads of torch (None: its default); 1 is faster on a busy shared CPU")


# The options a run's record depends on: a record measured with others is not reused.
MEASURED_WITH = ("preset", "max_steps", "train_args", "evaluate", "num_samples", "num_real", "sampler", "steps",
                 "cfg_scale", "n_per_class")


def parse_ints(text, name):
    try:
        return [int(item) for item in text.split(",")]
    except ValueError:
        raise UsageError(f"--{name} '{text}' is not a comma-separated list of integers: e.g. --{name} 0,1") from None


def validate(cfg):
    """The modes and seeds as lists; one readable error for each option the comparison cannot use."""
    modes = [mode.strip() for mode in cfg.modes.split(",")]
    for mode in modes:
        if mode not in UNet_conditional.CONDITIONINGS:
            raise UsageError(f"mode '{mode}' is unknown: use some of {', '.join(UNet_conditional.CONDITIONINGS)}")
    seeds = parse_ints(cfg.seeds, "seeds")
    if len(set(modes)) < len(modes) or len(set(seeds)) < len(seeds):
        raise UsageError("--modes and --seeds must not repeat an entry")
    if cfg.preset is not None and not os.path.isfile(cfg.preset):
        raise UsageError(f"preset '{cfg.preset}' not found: pass a ddpm_conditional.py config file, e.g. "
                         "configs/quick_cpu.json")
    for name in ("max_steps", "num_samples", "num_real", "steps", "n_per_class", "threads"):
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            raise UsageError(f"{name} {value} must be positive")
    return modes, seeds


def write_text(path, text):
    _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def cpu_name():
    """The CPU model as lscpu names it (from /proc/cpuinfo), or what platform knows."""
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


# ----------------------------------------------------------------------------- one run: train, measure
def train_run(cfg, mode, seed, run_name):
    """Train one mode and seed; returns the training seconds, steps, batch size and the resolved config."""
    import ddpm_conditional

    argv = ["--config", cfg.preset] if cfg.preset is not None else []
    argv += ["--conditioning", mode, "--seed", str(seed), "--run_name", run_name,
             "--n_per_class", "1"]  # the run's own grids: one image per class, to keep them out of the timing
    if cfg.max_steps is not None:
        argv += ["--max_steps", str(cfg.max_steps)]
    argv += shlex.split(cfg.train_args) + (["--overwrite"] if cfg.overwrite else [])
    start = time.perf_counter()
    done = ddpm_conditional.main(argv)
    seconds = time.perf_counter() - start
    with open(os.path.join(done["models_dir"], "config.json")) as f:
        config = json.load(f)
    return {"train_seconds": round(seconds, 2), "steps": done["step"], "batch_size": config["batch_size"],
            "train_img_per_s": round(done["step"] * config["batch_size"] / seconds, 2), "config": config}


def evaluate_run(cfg, ckpt, out):
    """evaluate.py's offline figures of one checkpoint: class accuracy and the judge-space distance."""
    import evaluate

    argv = ["--ckpt", ckpt, "--num_samples", str(cfg.num_samples), "--num_real", str(cfg.num_real),
            "--sampler", cfg.sampler, "--cfg_scale", str(cfg.cfg_scale), "--seed", "0", "--inception", "false",
            "--device", cfg.device, "--out", out]
    if cfg.steps is not None:
        argv += ["--steps", str(cfg.steps)]
    metrics = evaluate.main(argv)
    row = metrics["rows"][0]
    return {"class_accuracy": row["class_accuracy"], "judge_fd": row["judge_fd"],
            "judge_heldout_accuracy": metrics["judge"]["heldout_accuracy"]}


def draw_grid(cfg, ckpt, path):
    """A grid of the run's EMA weights, one row per class, with the comparison's sampler; returns img/s."""
    import sample

    device = pick_device(cfg.device)
    model, arch, saved = sample.load_model(ckpt)
    diffusion = sample.make_diffusion(sample.Config(ckpt=ckpt), saved, arch["c_in"], device)
    labels = torch.arange(arch["num_classes"], device=device).repeat_interleave(cfg.n_per_class)
    start = time.perf_counter()
    images = diffusion.sample(model.to(device), len(labels), labels, cfg.cfg_scale, sampler=cfg.sampler,
                              steps=cfg.steps, seed=0, progress=False)
    seconds = time.perf_counter() - start
    save_images(images, path, nrow=cfg.n_per_class)
    return round(len(labels) / seconds, 2)


def measure(cfg, mode, seed, first_seed):
    """Train, count, time and evaluate one run; its record is saved under out_dir/runs/ and reused."""
    run_name = f"{cfg.run_prefix}_{mode}_s{seed}"
    record_path = os.path.join(cfg.out_dir, "runs", f"{run_name}.json")
    options = {key: getattr(cfg, key) for key in MEASURED_WITH}
    if os.path.isfile(record_path) and not cfg.overwrite:
        with open(record_path) as f:
            record = json.load(f)
        if record.get("options") != options:
            raise UsageError(f"{record_path} was measured with other options ({record.get('options')}): pass "
                             "--overwrite to measure again, or another --run_prefix and --out_dir")
        print(f"{run_name}: reusing {record_path}")
        return record
    record = {"mode": mode, "seed": seed, "run_name": run_name, "options": options,
              **train_run(cfg, mode, seed, run_name)}
    ckpt = os.path.join("models", run_name, "ema_ckpt.pt")
    state = load_checkpoint(ckpt)
    record["parameters"] = sum(v.numel() for v in state.values())
    if seed == first_seed:
        record["sample_img_per_s"] = draw_grid(cfg, ckpt, os.path.join(cfg.out_dir, f"{mode}.png"))
    if cfg.evaluate:
        record.update(evaluate_run(cfg, ckpt, os.path.join(cfg.out_dir, "runs", f"{run_name}_metrics.json")))
    write_json(record, record_path)
    return record


# ----------------------------------------------------------------------------- the table
def mean_sd(values):
    """(mean, sample sd) of the values that are not None; (None, None) if there are none."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(records, modes):
    """One row per mode: mean and sd over its seeds of each figure."""
    rows = []
    for mode in modes:
        runs = [r for r in records if r["mode"] == mode]
        row = {"mode": mode, "seeds": [r["seed"] for r in runs], "parameters": runs[0]["parameters"],
               "sample_img_per_s": next((r["sample_img_per_s"] for r in runs if "sample_img_per_s" in r), None)}
        for key in ("class_accuracy", "judge_fd", "train_img_per_s"):
            row[key], row[key + "_sd"] = mean_sd([r.get(key) for r in runs])
        rows.append(row)
    return rows


def markdown_table(rows):
    def cell(row, key, digits):
        if row[key] is None:
            return "-"
        return f"{row[key]:.{digits}f} +- {row[key + '_sd']:.{digits}f}"

    lines = ["| mode | class accuracy | judge-space FD | parameters | train img/s | sample img/s |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        sample_rate = "-" if row["sample_img_per_s"] is None else f"{row['sample_img_per_s']:.1f}"
        lines.append(f"| {row['mode']} | {cell(row, 'class_accuracy', 2)} | {cell(row, 'judge_fd', 2)} | "
                     f"{row['parameters'] / 1e6:.2f}M | {cell(row, 'train_img_per_s', 1)} | {sample_rate} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    """Train and measure every (mode, seed), then write table.md, table.json and the grids; returns the rows."""
    cfg = parse_config(Config, argv, description=__doc__)
    modes, seeds = validate(cfg)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    os.makedirs(os.path.join(cfg.out_dir, "runs"), exist_ok=True)
    records = [measure(cfg, mode, seed, seeds[0]) for mode in modes for seed in seeds]
    rows = summarize(records, modes)
    table = markdown_table(rows)
    steps = f"{cfg.steps} steps" if cfg.steps else "its default steps"
    measured = f"{cfg.num_samples} samples per run by evaluate.py" if cfg.evaluate else "not evaluated"
    note = (f"{len(seeds)} seeds ({cfg.seeds}) per mode, mean +- sd; {records[0]['steps']} steps of batch "
            f"{records[0]['batch_size']} from {cfg.preset}; {cfg.sampler} with {steps} at cfg_scale {cfg.cfg_scale}; "
            f"{measured}; train img/s counts the whole run (data set, two 10-image grids, checkpoints); "
            f"CPU: {cpu_name()}, torch threads: {torch.get_num_threads()}\n")
    write_text(os.path.join(cfg.out_dir, "table.md"), table + "\n" + note)
    summary = {"config": config_to_dict(cfg), "cpu": cpu_name(), "threads": torch.get_num_threads(), "rows": rows,
               "runs": records}
    write_json(summary, os.path.join(cfg.out_dir, "table.json"))
    print(table + "\n" + note + f"saved {cfg.out_dir}/table.md, table.json and {len(modes)} grids")
    return rows


if __name__ == "__main__":
    run_cli(main)
