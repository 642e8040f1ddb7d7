"""Variants of ddpm_conditional.py trained and measured alike, side by side: a table, grids and learning curves.

    python compare.py --variants configs/compare_recipes.json --seeds 0,1,2 --eval_every 250   (the training recipe)
    python compare.py --variants configs/compare_conditioning.json --max_steps 300   (add, concat, xattn, adanorm)
    python compare.py --variants configs/compare_backbones.json --threads 1   (the U-Net beside DiT)
    python compare.py --variants configs/compare_conditioning.json --preset None --max_steps 30000 --seeds 0,1,2 \
        --num_samples 5000 --num_real 10000 --train_args "--image_size 32 --batch_size 128 --mixed_precision bf16"

A variants file is a JSON object {name: "ddpm_conditional.py flags"}. Every variant trains with the same
preset, budget and seeds; its flags are the only difference. evaluate.py then measures each run's EMA
weights with the same sampler, steps, guidance and noise seed: class accuracy by its learned judge and the
Frechet distance in the judge's feature space (not comparable with published FID). The table gives each
figure as mean +- sd over the seeds, with the parameters, the GFLOPs of one network evaluation of one image
(torch.utils.flop_counter; a guided sampling step makes two), the training seconds and throughputs.
--eval_every N also measures every run during training (its --eval_every) and plots class accuracy against
steps, one line per variant (mean over the seeds, the band from the lowest to the highest seed).
Written to out_dir (default results/compare/<variants file name>): table.md, table.json, <variant>.png (a
grid of the first seed's run, one row per class), curves.png with --eval_every, and runs/<run>.json (one
record per run; a record that exists is reused, so an interrupted comparison continues where it stopped, and one
trained alike but asked for other evaluation options, such as --judge_epochs, is measured again from its checkpoint).
"""
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from checkpoints import REFERENCE_IMAGE_SIZE, class_names, load_image_model, run_diffusion
from latents import run_latents
from utils import (UsageError, _atomic_write, arg, config_to_dict, count_flops, grid_labels, load_checkpoint,
                   old_names, parse_config, pick_device, read_json_object, run_cli, save_figure, save_images,
                   write_json)

REPO = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------- options
@dataclass
class Config:
    preset: str | None = arg("configs/quick_cpu.json", "ddpm_conditional.py config file every run starts from "
                             "(None: its defaults, CIFAR-10 at 64 px)")
    variants: str = arg("configs/compare_recipes.json", "JSON file {name: 'ddpm_conditional.py flags'} of the "
                        "variants to compare")
    only: str | None = arg(None, "compare only these variants of the file, comma-separated (None: all)")
    seeds: str = arg("0,1", "training seeds, comma-separated; figures are mean +- sd over them")
    max_steps: int | None = arg(None, "training budget of every run in optimizer steps (None: the preset's)")
    train_args: str = arg("", "more ddpm_conditional.py flags for every run, e.g. '--base_channels 16'")
    eval_every: int | None = arg(None, "measure every run each this many steps during training, for the learning "
                                       "curves (None: off)")
    eval_samples: int = arg(100, "samples of each --eval_every measurement")
    evaluate: bool = arg(True, "measure with evaluate.py (false: parameters, speeds and grids only)")
    num_samples: int = arg(200, "samples evaluate.py draws from each run, balanced over the classes")
    num_real: int = arg(2000, "real images for evaluate.py's judge and its reference statistics")
    judge_epochs: int | None = arg(None, "epochs of evaluate.py's judge (None: its default, 5; the 32 px digits "
                                         "need 20 for a judge above 0.98 on held-out images)")
    sampler: str = arg("dpm++", "sampler of the evaluation and the grids: ddpm | ddim | dpm++ | dpm++ode | euler_a")
    steps: int | None = arg(None, "network steps of that sampler (None: its default, 20 for dpm++)")
    cfg_scale: float = arg(3.0, "guidance of the evaluation and the grids")
    n_per_row: int = arg(8, "images in each class row of the grids", old_names=("n_per_class",))
    run_prefix: str = arg("cmp", "runs are models/<run_prefix>_<variant>_s<seed>/")
    out_dir: str | None = arg(None, "folder of the table, the grids and the run records "
                                    "(None: results/compare/<variants file name>)")
    overwrite: bool = arg(False, "retrain and re-measure runs that already have a record")
    device: str = arg("auto", "device of the evaluation and the grids (training uses the preset's)")
    threads: int | None = arg(None, "CPU threads of torch (None: its default); 1 is faster on a busy shared CPU")

    def validate(self):
        """One readable error for each option the comparison cannot use, the variants file's included."""
        read_variants(self.variants, self.only)
        seeds = parse_ints(self.seeds, "seeds")
        if len(set(seeds)) < len(seeds):
            raise UsageError("--seeds must not repeat an entry")
        if self.preset is not None and not os.path.isfile(self.preset):
            raise UsageError(f"preset '{self.preset}' not found: pass a ddpm_conditional.py config file, e.g. "
                             "configs/quick_cpu.json")
        for name in ("max_steps", "eval_every", "eval_samples", "num_samples", "num_real", "judge_epochs", "steps",
                     "n_per_row", "threads"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UsageError(f"{name} {value} must be positive")


# The options a run's record depends on. A record trained with other TRAINED_WITH options is not reused; one
# that differs only in how it was measured is measured again from its checkpoint, without retraining.
TRAINED_WITH = ("preset", "max_steps", "train_args", "eval_every", "eval_samples")
MEASURED_WITH = TRAINED_WITH + ("evaluate", "num_samples", "num_real", "sampler", "steps", "cfg_scale", "n_per_row")


def parse_ints(text, name):
    try:
        return [int(item) for item in text.split(",")]
    except ValueError:
        raise UsageError(f"--{name} '{text}' is not a comma-separated list of integers: e.g. --{name} 0,1") from None


def read_variants(path, only):
    """{name: flags} of the variants file, restricted to `only` (comma-separated names) when given."""
    if not os.path.isfile(path):
        raise UsageError(f"variants file '{path}' not found: pass --variants a JSON file such as "
                         "configs/compare_recipes.json")
    variants = read_json_object(path, "variants file")
    for name, flags in variants.items():
        if not re.fullmatch(r"[A-Za-z0-9_.+-]+", name) or not isinstance(flags, str):
            raise UsageError(f"variants file '{path}': entry {name!r} should map a name of letters, digits and "
                             "_ . + - to a string of ddpm_conditional.py flags")
    if only is not None:
        names = [name.strip() for name in only.split(",")]
        unknown = [name for name in names if name not in variants]
        if unknown:
            raise UsageError(f"--only: variant '{unknown[0]}' is not in {path}: use some of {', '.join(variants)}")
        if len(set(names)) < len(names):
            raise UsageError("--only must not repeat a variant")
        variants = {name: variants[name] for name in names}
    if not variants:
        raise UsageError(f"variants file '{path}' is empty: give it at least one {{name: flags}} entry")
    return variants


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
def run_script(script, argv, threads=None):
    """Run `python <script> <argv>` in this folder, as a user would (its output goes to the terminal); a failure is a
    UsageError. With `threads`, torch in it uses that many (OMP_NUM_THREADS)."""
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads is not None else {}))
    done = subprocess.run([sys.executable, os.path.join(REPO, script), *argv], env=env)
    if done.returncode:
        raise UsageError(f"{script} {' '.join(argv)} failed (exit {done.returncode}): its error is above")


def train_run(cfg, flags, seed, run_name):
    """Train one variant and seed (python ddpm_conditional.py); returns the training seconds, steps, batch size, the
    resolved config and, with --eval_every, the learning curve [{"step", "seconds", "class_accuracy", ...}]."""
    argv = ["--config", cfg.preset] if cfg.preset is not None else []
    argv += shlex.split(cfg.train_args) + shlex.split(flags)
    argv += ["--seed", str(seed), "--run_name", run_name,
             "--n_per_row", "1"]  # the run's own grids: one image per class, to keep them out of the timing
    if cfg.max_steps is not None:
        argv += ["--max_steps", str(cfg.max_steps)]
    if cfg.eval_every is not None:
        argv += ["--eval_every", str(cfg.eval_every), "--eval_samples", str(cfg.eval_samples), "--sampler",
                 cfg.sampler, "--cfg_scale", str(cfg.cfg_scale)]
        argv += ["--sample_steps", str(cfg.steps)] if cfg.steps is not None else []
    argv += ["--overwrite"] if cfg.overwrite else []
    run_script("ddpm_conditional.py", argv, cfg.threads)
    results = os.path.join("results", run_name)
    done = read_json_object(os.path.join(results, "training.json"), "the run's summary")
    if done["stopped"]:  # a signal: the run is not the budget asked for, so it gets no record
        raise UsageError(f"run {run_name} was stopped by {done['stopped']} at step {done['step']}: run compare.py "
                         "again with --overwrite to train it in full")
    seconds = done["train_seconds"]  # without the --eval_every measurements
    config = read_json_object(os.path.join("models", run_name, "config.json"), "the run's config")
    curve = []
    if cfg.eval_every is not None:
        with open(os.path.join(results, "quality.json")) as f:
            curve = json.load(f)
    return {"train_seconds": round(seconds, 2), "steps": done["step"], "batch_size": config["batch_size"],
            "train_img_per_s": round(done["step"] * config["batch_size"] / seconds, 2), "config": config,
            "curve": curve}


def evaluate_run(cfg, ckpt, out):
    """evaluate.py's offline figures of one checkpoint (python evaluate.py): class accuracy and the judge-space
    distance."""
    argv = ["--ckpt", ckpt, "--num_samples", str(cfg.num_samples), "--num_real", str(cfg.num_real),
            "--sampler", cfg.sampler, "--cfg_scale", str(cfg.cfg_scale), "--seed", "0", "--inception", "false",
            "--device", cfg.device, "--out", out]
    if cfg.steps is not None:
        argv += ["--steps", str(cfg.steps)]
    if cfg.judge_epochs is not None:
        argv += ["--judge_epochs", str(cfg.judge_epochs)]
    run_script("evaluate.py", argv, cfg.threads)
    metrics = read_json_object(out, "evaluate.py's figures")
    row = metrics["rows"][0]
    return {"class_accuracy": row["class_accuracy"], "judge_fd": row["judge_fd"],
            "judge_heldout_accuracy": metrics["judge"]["heldout_accuracy"]}


def gflops_per_image(ckpt):
    """GFLOPs of one evaluation of the checkpoint's network on one image at its training size (its latents for a run
    with --vae; the VAE not counted), with a label when it is conditional (FlopCounterMode through
    utils.count_flops; a multiply-add counts 2)."""
    model, arch, saved = load_image_model(ckpt)
    latents = run_latents(saved, arch["c_in"], "cpu")
    size = latents.latent_size(saved.get("image_size", REFERENCE_IMAGE_SIZE))
    x, t = torch.zeros(1, arch["c_in"], size, size), torch.tensor([500])
    labels = () if arch["num_classes"] is None else (torch.tensor([0]),)
    with torch.no_grad():
        return round(count_flops(lambda: model(x, t, *labels)) / 1e9, 4)


def draw_grid(cfg, ckpt, path):
    """A grid of the run's EMA weights, one row per class, with the comparison's sampler; returns img/s."""
    device = pick_device(cfg.device)
    model, arch, saved = load_image_model(ckpt)
    latents = run_latents(saved, arch["c_in"], device)  # a run with --vae samples latents: decoded here
    diffusion = run_diffusion(saved, latents, device)
    labels = grid_labels(arch["num_classes"], cfg.n_per_row, device=device)
    start = time.perf_counter()
    x_0 = diffusion.sample_x0(model.to(device), len(labels), labels, cfg.cfg_scale, sampler=cfg.sampler,
                              steps=cfg.steps, seed=0, progress=False)
    images = latents.decode(x_0)
    seconds = time.perf_counter() - start
    save_images(images, path, nrow=cfg.n_per_row, captions=class_names(ckpt, arch["num_classes"]))
    return round(len(labels) / seconds, 2)


def measure(cfg, name, flags, seed, first_seed):
    """Train, count, time and evaluate one run; its record is saved under out_dir/runs/ and reused."""
    run_name = f"{cfg.run_prefix}_{name}_s{seed}"
    record_path = os.path.join(cfg.out_dir, "runs", f"{run_name}.json")
    ckpt = os.path.join("models", run_name, "ema_ckpt.pt")
    options = {"flags": flags, **{key: getattr(cfg, key) for key in MEASURED_WITH}}
    if cfg.judge_epochs is not None:  # recorded only when given: the records measured before the option stay valid
        options["judge_epochs"] = cfg.judge_epochs
    if os.path.isfile(record_path) and not cfg.overwrite:
        with open(record_path) as f:
            record = json.load(f)
        renamed = old_names(Config)  # records written before a field was renamed
        saved = {renamed.get(key, key): value for key, value in (record.get("options") or {}).items()}
        if saved == options:
            print(f"{run_name}: reusing {record_path}")
            if "gflops_per_image" not in record and os.path.isfile(ckpt):  # a record written before the column
                record["gflops_per_image"] = gflops_per_image(ckpt)
                write_json(record, record_path)
            return record
        if any(saved.get(key) != options[key] for key in ("flags",) + TRAINED_WITH):
            raise UsageError(f"{record_path} was trained with other options ({saved}): pass --overwrite to train "
                             "again, or another --run_prefix and --out_dir")
        if not os.path.isfile(ckpt):
            raise UsageError(f"{record_path} asks to be measured again, but its checkpoint {ckpt} is gone: pass "
                             "--overwrite to train it again")
        print(f"{run_name}: trained alike, measuring {ckpt} again with the new evaluation options")
        record = {key: value for key, value in record.items()
                  if key not in ("class_accuracy", "judge_fd", "judge_heldout_accuracy")}
        record["options"] = options
    else:
        record = {"variant": name, "seed": seed, "run_name": run_name, "options": options,
                  **train_run(cfg, flags, seed, run_name)}
        state = load_checkpoint(ckpt)
        record["parameters"] = sum(v.numel() for v in state.values())
        record["gflops_per_image"] = gflops_per_image(ckpt)
    if seed == first_seed:
        record["sample_img_per_s"] = draw_grid(cfg, ckpt, os.path.join(cfg.out_dir, f"{name}.png"))
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


def summarize(records, names):
    """One row per variant: mean and sd over its seeds of each figure."""
    rows = []
    for name in names:
        runs = [r for r in records if r["variant"] == name]
        row = {"variant": name, "seeds": [r["seed"] for r in runs], "parameters": runs[0]["parameters"],
               "gflops_per_image": runs[0].get("gflops_per_image"),
               "sample_img_per_s": next((r["sample_img_per_s"] for r in runs if "sample_img_per_s" in r), None)}
        for key in ("class_accuracy", "judge_fd", "train_seconds", "train_img_per_s"):
            row[key], row[key + "_sd"] = mean_sd([r.get(key) for r in runs])
        rows.append(row)
    return rows


def markdown_table(rows):
    def cell(row, key, digits):
        if row[key] is None:
            return "-"
        return f"{row[key]:.{digits}f} +- {row[key + '_sd']:.{digits}f}"

    def plain(value, digits):
        return "-" if value is None else f"{value:.{digits}f}"

    lines = ["| variant | class accuracy | judge-space FD | parameters | GFLOPs per image | train seconds | "
             "train img/s | sample img/s |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        sample_rate = plain(row["sample_img_per_s"], 1)
        lines.append(f"| {row['variant']} | {cell(row, 'class_accuracy', 3)} | {cell(row, 'judge_fd', 2)} | "
                     f"{row['parameters'] / 1e6:.2f}M | {plain(row['gflops_per_image'], 3)} | "
                     f"{cell(row, 'train_seconds', 0)} | "
                     f"{cell(row, 'train_img_per_s', 1)} | {sample_rate} |")
    return "\n".join(lines) + "\n"


def plot_curves(records, names, path):
    """Class accuracy against training steps, one line per variant: the mean over its seeds, and a band from the
    lowest to the highest seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in names:
        curves = [r["curve"] for r in records if r["variant"] == name and r.get("curve")]
        steps = sorted(set.intersection(*(set(p["step"] for p in curve) for curve in curves))) if curves else []
        if not steps:
            continue
        by_step = [[next(p["class_accuracy"] for p in curve if p["step"] == step) for curve in curves]
                   for step in steps]
        line, = ax.plot(steps, [statistics.fmean(values) for values in by_step], marker="o", label=name)
        ax.fill_between(steps, [min(v) for v in by_step], [max(v) for v in by_step], color=line.get_color(),
                        alpha=0.15)
    ax.set_xlabel("training step")
    ax.set_ylabel("class accuracy (EMA samples)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv=None):
    """Train and measure every (mode, seed), then write table.md, table.json and the grids; returns the rows."""
    cfg = parse_config(Config, argv, description=__doc__)
    variants, seeds = read_variants(cfg.variants, cfg.only), parse_ints(cfg.seeds, "seeds")
    if cfg.out_dir is None:
        cfg.out_dir = os.path.join("results", "compare", os.path.splitext(os.path.basename(cfg.variants))[0])
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    os.makedirs(os.path.join(cfg.out_dir, "runs"), exist_ok=True)
    records = [measure(cfg, name, flags, seed, seeds[0]) for name, flags in variants.items() for seed in seeds]
    rows = summarize(records, list(variants))
    if cfg.eval_every is not None:
        plot_curves(records, list(variants), os.path.join(cfg.out_dir, "curves.png"))
    table = markdown_table(rows)
    steps = f"{cfg.steps} steps" if cfg.steps else "its default steps"
    measured = f"{cfg.num_samples} samples per run by evaluate.py" if cfg.evaluate else "not evaluated"
    budgets = {name: sorted({r["steps"] for r in records if r["variant"] == name}) for name in variants}
    if len({tuple(b) for b in budgets.values()}) == 1:
        budget = f"{records[0]['steps']} steps"
    else:  # a variant's flags set its own --max_steps
        budget = "steps " + ", ".join(f"{name} {'/'.join(map(str, b))}" for name, b in budgets.items())
    judge = f" (judge trained {cfg.judge_epochs} epochs)" if cfg.judge_epochs is not None else ""
    note = (f"{len(seeds)} seeds ({cfg.seeds}) per variant, mean +- sd; {budget} of batch "
            f"{records[0]['batch_size']} from {cfg.preset}; {cfg.sampler} with {steps} at cfg_scale {cfg.cfg_scale}; "
            f"{measured}{judge}; train seconds and img/s count the whole run (data set, two 10-image grids, "
            f"checkpoints) but not its --eval_every measurements; "
            f"CPU: {cpu_name()}, torch threads: {torch.get_num_threads()}\n")
    write_text(os.path.join(cfg.out_dir, "table.md"), table + "\n" + note)
    summary = {"config": config_to_dict(cfg), "cpu": cpu_name(), "threads": torch.get_num_threads(), "rows": rows,
               "runs": records}
    write_json(summary, os.path.join(cfg.out_dir, "table.json"))
    print(table + "\n" + note + f"saved {cfg.out_dir}/table.md, table.json and {len(variants)} grids")
    return rows


if __name__ == "__main__":
    run_cli(main)
