"""Quality figures of any checkpoint: class accuracy from a learned judge, FID and KID, and an offline distance.

    python evaluate.py --ckpt models/R/ema_ckpt.pt --num_samples 1000
    python evaluate.py --ckpt models/R/ema_ckpt.pt --cfg_scale 0,1,3,5 --steps 10,20,50     (one row each)
    python evaluate.py --ckpt models/R/ema_ckpt.pt --inception_weights weights-inception-2015-12-05-6726825d.pth
    python evaluate.py --ckpt models/SR/ema_ckpt.pt                 (a ddpm_img2img.py run: on its held-out images)
    python evaluate.py --ckpt models/R/ema_ckpt.pt --repaint true --masks lower      (RePaint, on held-out images)

Figures, one row per (cfg_scale, steps) combination:
  class_acc  fraction of the samples that the judge assigns to the class they were generated for (on the built-in
             shapes the class is the shape: every shape comes in every colour, so the judge cannot read it
             from the colour)
  judge_fd   Frechet distance between samples and real images in the judge's feature space; it runs offline on
             any data set and is NOT comparable with published FID
  fid, kid   Frechet and kernel Inception distances through torch-fidelity (needs the Inception weights)
The judge (judges.py) is a small CNN trained once on the real training images and cached in data/judges/; its
accuracy on held-out real images is printed beside the figures, so a weak judge is visible.

Image-to-image runs (ddpm_img2img.py) and --repaint are measured on the run's held-out images (its --holdout, which
it never trained on): each is degraded (the run's task; --masks for inpainting), restored, and compared with its
ground truth: PSNR and SSIM (torchmetrics), the judge's class accuracy against the image's true class (does the
output keep the identity of the input?) and judge_fd, one row per method: the ground truth itself, the baseline
without learning (bicubic upsampling; a blurred fill of the hole; the grey image), and the model at each
(cfg_scale, steps). A grid of the first images (input, output, ground truth, baseline) is written beside the figures.
"""
import dataclasses
import os
import time

import torch
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from checkpoints import describe, load_image_model, pixel_diffusion, run_diffusion
from config import Checkpoint, RePaint
from data import Masks, heldout_images
from degradations import Degradation, comparison_rows, save_rows
from diffusion import DEFAULT_STEPS, SAMPLERS
from judges import (INCEPTION_FILE, generate, get_judge, inception_figures, inception_unavailable, real_images,
                    restoration_figures, sample_figures)
from latents import run_latents
from utils import UsageError, arg, configclass, parse_config, pick_device, run_cli, save_figure, to_uint8, write_json


# ----------------------------------------------------------------------------- options
@configclass(Checkpoint, RePaint)
class Config:
    num_samples: int = arg(1000, "N, images generated for each row, balanced over the classes (50000 for paper FID)")
    sampler: str | None = arg(None, "ddpm (999-step Alg. 2) | ddim | dpm++ | dpm++ode | euler_a; None: dpm++, or "
                                    "ddpm for --repaint")
    steps: str = arg("default", "network steps of the sampler, or a list to sweep, e.g. 10,20,50 (default: "
                                "the sampler's own)")
    cfg_scale: str = arg("3", "guidance, or a list to sweep, e.g. 0,1,3,5 (ignored by an unconditional model)")
    batch_size: int = arg(250, "images per sampler batch")
    dataset: str | None = arg(None, "real images: cifar10 | imagefolder | shapes (None: the training config's)")
    dataset_path: str | None = arg(None, "folder of the data set (None: the training config's)")
    num_real: int = arg(5000, "real training images for the judge (80% to train, 20% held out) and the statistics")
    judge_epochs: int = arg(5, "epochs of the judge's training, done once per data set and resolution")
    inception: bool = arg(True, "compute FID and KID through torch-fidelity (false: offline figures only)")
    inception_weights: str | None = arg(None, "local Inception weights file for torch-fidelity, for machines "
                                              "without internet")
    out: str | None = arg(None, "metrics file, replaced atomically (None: results/<run_name>/metrics.json); "
                                "beside it metrics.png plots a sweep, or <out>_grid.png shows the restorations of an "
                                "image-conditioned run or --repaint")
    repaint: bool = arg(False, "measure RePaint inpainting (ddpm sampler) of the run's held-out images with --masks, "
                               "with a ddpm.py / ddpm_conditional.py checkpoint trained with --holdout")
    masks: str | None = arg(None, "inpainting: the holes of the held-out images: lower | halves | boxes | strokes | a "
                                  "folder (None: the run's --masks; lower with --repaint)")

    def validate(self):
        if self.sampler not in (None, *SAMPLERS):
            raise UsageError(f"sampler '{self.sampler}' is unknown: use one of {', '.join(SAMPLERS)}")
        if self.repaint and self.sampler not in (None, "ddpm"):
            raise UsageError(f"RePaint runs inside DDPM Alg. 2, not with --sampler {self.sampler}: pass --sampler "
                             "ddpm (or leave it out)")
        if any(s is not None and s <= 0 for s in parse_list(self.steps, int, "steps")):
            raise UsageError(f"--steps {self.steps} must be positive")
        if any(c is None or c < 0 for c in parse_list(self.cfg_scale, float, "cfg_scale")):
            raise UsageError(f"--cfg_scale {self.cfg_scale}: use numbers >= 0, e.g. 0,1,3")
        if self.num_samples < 2:
            raise UsageError(f"num_samples {self.num_samples} is too small: KID and the Frechet distances need at "
                             "least 2 samples (use 1000 or more for figures worth comparing)")
        for name in ("batch_size", "judge_epochs"):
            if getattr(self, name) <= 0:
                raise UsageError(f"{name} {getattr(self, name)} must be positive")
        if self.num_real < 10:
            raise UsageError(f"num_real {self.num_real} is too few real images to train and test the judge: use 1000 "
                             "or more")
        if self.inception_weights is not None and not os.path.isfile(self.inception_weights):
            raise UsageError(f"--inception_weights '{self.inception_weights}' not found: pass the path of "
                             f"{INCEPTION_FILE}")


def parse_list(text, parse, name):
    """'0,1, 3' -> [0.0, 1.0, 3.0] with `parse`; 'default' -> [None]."""
    try:
        return [None if item.strip().lower() in ("default", "none") else parse(item) for item in str(text).split(",")]
    except ValueError:
        raise UsageError(f"--{name} '{text}' is not a comma-separated list of numbers: e.g. --{name} 1,3,5") from None


# ----------------------------------------------------------------------------- the run
def resolve_data(cfg, saved):
    """(dataset, dataset_path) from the flags, else from the training config saved with the checkpoint."""
    dataset = cfg.dataset or saved.get("dataset")
    if dataset is None:
        raise UsageError(f"checkpoint '{cfg.ckpt}' has no saved training config (config.json beside it): pass "
                         "--dataset shapes|cifar10|imagefolder (with --dataset_path and --image_size as trained)")
    dataset_path = cfg.dataset_path if cfg.dataset_path is not None else saved.get("dataset_path", "./data")
    return dataset, dataset_path


def print_table(rows, judge):
    """One line per row: the settings and every figure ('-' where a figure was skipped)."""
    print(f"{'sampler':>8} {'steps':>7} {'cfg':>5} {'N':>6} {'class_acc':>9} {'judge_fd':>9} {'fid':>8} "
          f"{'kid':>9} {'seconds':>8}")
    for r in rows:
        print(f"{r['sampler']:>8} {str(r['steps'] or 'default'):>7} {shown(r['cfg_scale'], 'g'):>5} "
              f"{r['num_samples']:>6} {shown(r['class_accuracy'], '.3f'):>9} {shown(r['judge_fd'], '.3f'):>9} "
              f"{shown(r['fid'], '.2f'):>8} {shown(r['kid'], '.5f'):>9} {r['seconds']:>8.1f}")
    print(f"judge: {judge.heldout_accuracy:.3f} accuracy on held-out real images ({judge.path}); judge_fd is a "
          "Frechet distance in its feature space, not comparable with published FID")


def plot_metrics(rows, path):
    """Class accuracy and the distances against the swept setting: x = cfg_scale (one line per steps) or steps."""
    cfg_values = sorted({r["cfg_scale"] for r in rows if r["cfg_scale"] is not None})
    by_cfg = len(cfg_values) > 1
    fig = Figure(figsize=(10, 4))
    panels = [("class_accuracy", "class accuracy (judge)"), ("judge_fd", "judge-space Frechet distance")]
    if any(r["fid"] is not None for r in rows):
        panels.append(("fid", "FID"))
    for i, (key, title) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        series = sorted({r["steps"] or 0 for r in rows}) if by_cfg else sorted({r["cfg_scale"] or 0 for r in rows})
        for value in series:
            if by_cfg:
                points = [(r["cfg_scale"], r[key]) for r in rows if (r["steps"] or 0) == value]
                label = f"{value or 'default'} steps"
            else:
                points = [(r["steps_run"], r[key]) for r in rows if (r["cfg_scale"] or 0) == value]
                label = f"cfg {value:g}"
            points = [(x, y) for x, y in points if y is not None]
            if points:
                ax.plot(*zip(*sorted(points)), marker="o", label=label)
        ax.set_xlabel("cfg_scale" if by_cfg else "sampler steps")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


# ----------------------------------------------------------------------------- image-to-image and RePaint
def shown(value, fmt):
    """A figure formatted for a table, or '-' where it was skipped."""
    return "-" if value is None else format(value, fmt)


def print_restoration_table(rows, judge, what):
    """One line per method: the settings and every figure."""
    print(f"{what}\n{'method':>14} {'sampler':>8} {'steps':>7} {'cfg':>5} {'N':>5} {'psnr':>7} {'ssim':>7} "
          f"{'class_acc':>9} {'judge_fd':>9} {'seconds':>8}")
    for r in rows:
        print(f"{r['method']:>14} {r['sampler'] or '-':>8} {str(r['steps_run'] or '-'):>7} "
              f"{shown(r['cfg_scale'], 'g'):>5} {r['num_samples']:>5} {shown(r['psnr'], '.2f'):>7} "
              f"{shown(r['ssim'], '.4f'):>7} {shown(r['class_accuracy'], '.3f'):>9} {shown(r['judge_fd'], '.3f'):>9} "
              f"{r['seconds']:>8.1f}")
    print(f"judge: {judge.heldout_accuracy:.3f} accuracy on held-out real images ({judge.path}); class_acc is against "
          "each image's true class")


def restoration_task(cfg, arch, saved):
    """The task of an image-to-image checkpoint (its saved `task`), or None for --repaint; wrong flags are refused."""
    task = saved.get("task") if arch.get("cond_channels") else None
    if task is not None and cfg.repaint:
        raise UsageError(f"this checkpoint is trained for {task}: drop --repaint (RePaint is for ddpm.py and "
                         "ddpm_conditional.py checkpoints)")
    if task is None and not cfg.repaint:
        raise UsageError("pass --repaint true to measure inpainting with this checkpoint")
    if (task or "inpaint") != "inpaint" and cfg.masks is not None:
        raise UsageError(f"--masks is for inpainting, and this checkpoint does {task}: drop --masks")
    return task


def restore(cfg, model, diffusion, task, degradation, images, holes, cond, given, cfg_scale, steps):
    """The restorations (N, C, S, S) on the CPU of the degraded images: the conditioned network's outputs with the
    known pixels kept (task), or RePaint's fill of the holes (task None), in batches from one seeded generator."""
    device = diffusion.device
    generator = torch.Generator(device).manual_seed(cfg.seed)
    outputs = []
    for first in tqdm(range(0, len(images), cfg.batch_size), desc=f"{cfg.sampler} cfg {cfg_scale}"):
        rows = slice(first, first + cfg.batch_size)
        extra = ({"cond": cond[rows].to(device)} if task is not None else
                 {"known_image": images[rows].to(device), "known_mask": (1 - holes[rows]).to(device),
                  "jump_length": cfg.jump_length, "jump_n_sample": cfg.jump_n_sample,
                  "reconstruction_guidance": cfg.reconstruction_guidance})
        y = None if given is None else given[rows].to(device)
        x_0 = diffusion.sample_x0(model, len(images[rows]), y, cfg_scale, sampler=cfg.sampler, steps=steps,
                                  generator=generator, progress=False, **extra)
        outputs.append((x_0 if task is None else degradation.keep_known(x_0, extra["cond"])).cpu())
    return torch.cat(outputs)


def evaluate_restoration(cfg, model, arch, saved, device):
    """A ddpm_img2img.py run, or --repaint: degrade the run's held-out images, restore them, measure each method."""
    task = restoration_task(cfg, arch, saved)
    diffusion = pixel_diffusion(saved, arch, device, "image-to-image figures and RePaint", cfg.image_size, cfg.clip_x0)
    size, channels = diffusion.image_size, arch["c_out"]
    if size != saved.get("image_size"):
        raise UsageError(f"--image_size {size}: the held-out images are measured at the run's {saved['image_size']} "
                         "px; drop --image_size")
    images, labels = heldout_images(saved, cfg.num_samples, channels)
    degradation = (Degradation.from_settings(saved, cfg.masks) if task is not None else
                   Degradation("inpaint", masks=Masks(cfg.masks or "lower", size)))
    holes = degradation.draw_holes(len(images), torch.Generator().manual_seed(cfg.seed))
    cond = degradation.condition(images, holes)
    baseline = degradation.baseline(cond, holes)
    judge = get_judge(saved["dataset"], saved.get("dataset_path"), size, cfg.num_real, cfg.judge_epochs,
                      device=device, channels=channels)
    num_classes = arch["num_classes"]
    if num_classes is not None and judge.net.head.out_features != num_classes:
        raise UsageError(f"the checkpoint has {num_classes} classes but the judge of {saved['dataset']} has "
                         f"{judge.net.head.out_features}: check the run's dataset_path")
    truth = to_uint8(images)
    none = {"sampler": None, "steps": None, "steps_run": None, "cfg_scale": None, "num_samples": len(images),
            "seed": cfg.seed, "seconds": 0.0}
    rows = [{"method": "ground truth", **none, **restoration_figures(judge, truth, truth, labels)},
            {"method": degradation.baseline_name(), **none,
             **restoration_figures(judge, to_uint8(baseline), truth, labels)}]
    # a class-conditional run is given each image's true class (training drew the condition with the label)
    given = labels if num_classes is not None and task is not None else None
    cfg_scales = parse_list(cfg.cfg_scale, float, "cfg_scale") if task is not None or given is not None else [0.0]
    repaint = {"jump_length": cfg.jump_length, "jump_n_sample": cfg.jump_n_sample,
               "reconstruction_guidance": cfg.reconstruction_guidance} if task is None else {}
    model.to(device)
    shown = None
    for cfg_scale in cfg_scales:
        for steps in parse_list(cfg.steps, int, "steps"):
            start = time.perf_counter()
            outputs = restore(cfg, model, diffusion, task, degradation, images, holes, cond, given, cfg_scale, steps)
            shown = outputs if shown is None else shown
            steps_run = steps or DEFAULT_STEPS.get(cfg.sampler, diffusion.noise_steps - 1)
            rows.append({"method": "repaint" if task is None else "diffusion", "sampler": cfg.sampler, "steps": steps,
                         "steps_run": steps_run, "cfg_scale": cfg_scale, "num_samples": len(images), "seed": cfg.seed,
                         **repaint, **restoration_figures(judge, to_uint8(outputs), truth, labels),
                         "seconds": round(time.perf_counter() - start, 2)})
    grid_rows = comparison_rows(degradation, images[:8], cond[:8], holes[:8] if holes is not None else None,
                                shown[:8], size)
    if degradation.task != "superres":
        grid_rows.append((degradation.baseline_name(), baseline[:8]))
    notes = ["held-out images of the run, never trained on; the judge trained on 80% of num_real real images, which "
             "may include some of them", *(["the network is given each image's true class"] if given is not None
                                           else [])]
    return write_restoration(cfg, arch, saved, task, degradation, judge, rows, grid_rows, notes, len(images), size)


def write_restoration(cfg, arch, saved, task, degradation, judge, rows, grid_rows, notes, count, size):
    """Print the table of a restoration run, save the grid of its first images and write its figures as JSON."""
    run_name = saved.get("run_name") or os.path.basename(os.path.dirname(os.path.abspath(cfg.ckpt)))
    out = cfg.out or os.path.join("results", run_name, "repaint.json" if task is None else "metrics.json")
    masks = None if degradation.masks is None else degradation.masks.spec
    what = (f"{task or 'RePaint inpainting'} of {count} held-out {saved['dataset']} images at {size} px"
            f"{'' if masks is None else ', masks ' + masks} with {describe(arch)} from {cfg.ckpt}")
    print_restoration_table(rows, judge, what)
    picture = os.path.splitext(out)[0] + "_grid.png"  # not metrics.png: that name is the sweep plot of class runs
    save_rows(grid_rows, picture)
    metrics = {"checkpoint": cfg.ckpt, "run_name": run_name, "task": task or "repaint", "dataset": saved["dataset"],
               "image_size": size, "masks": masks,
               "judge": {"path": judge.path, "heldout_accuracy": judge.heldout_accuracy, "num_real": cfg.num_real},
               "notes": notes, "config": dataclasses.asdict(cfg), "rows": rows}
    write_json(metrics, out)
    print(f"saved {out} and {picture} (input, output at the first cfg_scale and steps, ground truth, baseline)")
    return metrics


def measure_samples(cfg, model, arch, saved, device):
    """A class or unconditional checkpoint: sample every (cfg_scale, steps) combination, measure it, print the
    table, write metrics.json and its plot."""
    if cfg.masks is not None:
        raise UsageError("--masks is for inpainting: pass --repaint true, or an inpaint checkpoint of ddpm_img2img.py")
    dataset, dataset_path = resolve_data(cfg, saved)
    latents = run_latents(saved, arch["c_in"], device)
    diffusion = run_diffusion(saved, latents, device, cfg.image_size, cfg.clip_x0)
    image_size = diffusion.image_size * latents.factor  # of the decoded samples, which the judge reads
    num_classes = arch["num_classes"]
    if num_classes is not None and cfg.num_samples < num_classes:
        raise UsageError(f"num_samples {cfg.num_samples} is smaller than the model's {num_classes} classes: pass "
                         f"--num_samples {num_classes} or more, so every class is sampled")
    judge = get_judge(dataset, dataset_path, image_size, cfg.num_real, cfg.judge_epochs, device=device,
                      channels=latents.image_channels)
    if num_classes is not None and judge.net.head.out_features != num_classes:
        raise UsageError(f"the checkpoint has {num_classes} classes but {dataset} has {judge.net.head.out_features}: "
                         "pass the --dataset (and --dataset_path) it was trained on")
    notes = []
    if num_classes is None:
        notes.append("unconditional checkpoint: class accuracy skipped (no requested classes); distances computed")
    skip = "FID and KID off (--inception false)" if not cfg.inception else inception_unavailable(cfg.inception_weights)
    real, real_name = None, os.path.splitext(os.path.basename(judge.path))[0]  # names data set, size, images
    if skip is None:
        real, _, _ = real_images(dataset, dataset_path, image_size, cfg.num_real, channels=latents.image_channels)
    kind = "unconditional" if num_classes is None else f"conditional ({num_classes} classes)"
    space = "" if latents.vae is None else f", decoded from the latents of --vae {saved['vae']}"
    print(f"{kind} {describe(arch)} from {cfg.ckpt}; {dataset} at {image_size} px{space}; N = {cfg.num_samples} "
          f"per row on {device}")
    model.to(device)
    rows = []
    for cfg_scale in parse_list(cfg.cfg_scale, float, "cfg_scale") if num_classes is not None else [None]:
        for steps in parse_list(cfg.steps, int, "steps"):
            start = time.perf_counter()
            samples, labels = generate(model, diffusion, num_classes, cfg.num_samples, cfg_scale or 0.0, cfg.sampler,
                                       steps, cfg.seed, cfg.batch_size, decode=latents.decode)
            steps_run = steps or DEFAULT_STEPS.get(cfg.sampler, diffusion.noise_steps - 1)
            row = {"sampler": cfg.sampler, "steps": steps, "steps_run": steps_run, "cfg_scale": cfg_scale,
                   "clip_x0": diffusion.clip_x0, "num_samples": cfg.num_samples, "seed": cfg.seed,
                   **sample_figures(judge, samples, labels), "fid": None, "kid": None, "kid_std": None}
            if skip is None:
                try:
                    row.update(inception_figures(samples, real, real_name, cfg.inception_weights, device))
                except OSError as exc:  # a download that fails after all
                    skip = (f"FID and KID skipped: torch-fidelity could not get {INCEPTION_FILE} ({exc}); pass "
                            "--inception_weights PATH")
            row["seconds"] = round(time.perf_counter() - start, 2)
            rows.append(row)
    if skip is not None:
        notes.append(skip)
        print(skip)
    return write_metrics(cfg, saved, dataset, image_size, judge, rows, notes)


def write_metrics(cfg, saved, dataset, image_size, judge, rows, notes):
    """Print the table of a class or unconditional checkpoint, and write metrics.json and the sweep's plot."""
    print_table(rows, judge)
    run_name = saved.get("run_name") or os.path.basename(os.path.dirname(os.path.abspath(cfg.ckpt)))
    out = cfg.out or os.path.join("results", run_name, "metrics.json")
    metrics = {"checkpoint": cfg.ckpt, "run_name": run_name, "dataset": dataset, "image_size": image_size,
               "judge": {"path": judge.path, "heldout_accuracy": judge.heldout_accuracy, "num_real": cfg.num_real},
               "judge_fd_note": "Frechet distance in the judge's feature space; not comparable with published FID",
               "config": dataclasses.asdict(cfg), "notes": notes, "rows": rows}
    write_json(metrics, out)
    plot_path = os.path.join(os.path.dirname(out) or ".", "metrics.png")
    plot_metrics(rows, plot_path)
    print(f"saved {out} and {plot_path}")
    return metrics


def main(argv=None):
    """Load the checkpoint, measure its samples (or its restorations of held-out images), write the figures."""
    cfg = parse_config(Config, argv, description=__doc__)
    cfg = dataclasses.replace(cfg, sampler=cfg.sampler or ("ddpm" if cfg.repaint else "dpm++"))
    device = pick_device(cfg.device)
    model, arch, saved = load_image_model(cfg.ckpt, cfg.weights)
    if cfg.repaint or arch.get("cond_channels"):
        return evaluate_restoration(cfg, model, arch, saved, device)
    return measure_samples(cfg, model, arch, saved, device)


if __name__ == "__main__":
    run_cli(main)
