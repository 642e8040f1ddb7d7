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
The judge is a small CNN trained once on the real training images and cached in data/judges/; its accuracy on
held-out real images is printed beside the figures, so a weak judge is visible.

Image-to-image runs (ddpm_img2img.py) and --repaint are measured on the run's held-out images (its --holdout, which
it never trained on): each is degraded (the run's task; --masks for inpainting), restored, and compared with its
ground truth: PSNR and SSIM (torchmetrics), the judge's class accuracy against the image's true class (does the
output keep the identity of the input?) and judge_fd, one row per method: the ground truth itself, the baseline
without learning (bicubic upsampling; a blurred fill of the hole; the grey image), and the model at each
(cfg_scale, steps). A grid of the first images (input, output, ground truth, baseline) is written beside the figures.
"""
import contextlib
import dataclasses
import hashlib
import json
import os
import socket
import time
import warnings
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from data import Masks, ShapesDataset, classify_colors, get_dataset, saved_run_split
from ddpm import DEFAULT_STEPS, SAMPLERS
from ddpm_img2img import Degradation, comparison_rows, save_rows
from latents import run_latents
from modules import JudgeNet
from sample import describe, load_model, make_diffusion, pixel_diffusion
from utils import (UsageError, arg, atomic_save, load_checkpoint, parse_config, pick_device, run_cli, save_figure,
                   to_uint8, write_json)


# ----------------------------------------------------------------------------- options
@dataclass
class Config:
    ckpt: str | None = arg(None, "checkpoint: models/<run>/ema_ckpt.pt, ckpt.pt or training_state.pt")
    num_samples: int = arg(1000, "N, images generated for each row, balanced over the classes (50000 for paper FID)")
    sampler: str | None = arg(None, "ddpm (999-step Alg. 2) | ddim | dpm++ | dpm++ode | euler_a; None: dpm++, or "
                                    "ddpm for --repaint")
    steps: str = arg("default", "network steps of the sampler, or a list to sweep, e.g. 10,20,50 (default: "
                                "the sampler's own)")
    cfg_scale: str = arg("3", "guidance, or a list to sweep, e.g. 0,1,3,5 (ignored by an unconditional model)")
    clip_x0: bool | None = arg(None, "clip the predicted x_0 to [-1, 1] at each step (None: the run's setting)")
    seed: int = arg(0, "seed of the noise: the same seed gives the same samples")
    batch_size: int = arg(250, "images per sampler batch")
    dataset: str | None = arg(None, "real images: cifar10 | imagefolder | shapes (None: the training config's)")
    dataset_path: str | None = arg(None, "folder of the data set (None: the training config's)")
    image_size: int | None = arg(None, "pixels, divisible by 8 (None: the training size)")
    num_real: int = arg(5000, "real training images for the judge (80% to train, 20% held out) and the statistics")
    judge_epochs: int = arg(5, "epochs of the judge's training, done once per data set and resolution")
    inception: bool = arg(True, "compute FID and KID through torch-fidelity (false: offline figures only)")
    inception_weights: str | None = arg(None, "local Inception weights file for torch-fidelity, for machines "
                                              "without internet")
    out: str | None = arg(None, "metrics file, replaced atomically (None: results/<run_name>/metrics.json); "
                                "beside it metrics.png plots a sweep, or <out>_grid.png shows the restorations of an "
                                "image-conditioned run or --repaint")
    weights: str = arg("ema", "weights of a training_state.pt: ema | model (ema_ckpt.pt holds only the EMA's, "
                              "ckpt.pt only the model's)")
    device: str = arg("auto", "auto (cuda, then mps, then cpu) | cuda | mps | cpu")
    repaint: bool = arg(False, "measure RePaint inpainting (ddpm sampler) of the run's held-out images with --masks, "
                               "with a ddpm.py / ddpm_conditional.py checkpoint trained with --holdout")
    masks: str | None = arg(None, "inpainting: the holes of the held-out images: lower | halves | boxes | strokes | a "
                                  "folder (None: the run's --masks; lower with --repaint)")
    jump_length: int = arg(10, "--repaint: levels of each jump back up (Lugmayr et al. 2022: 10)")
    jump_n_sample: int = arg(10, "--repaint: times each stretch is gone down (1: no resampling)")
    reconstruction_guidance: float = arg(2.0, "--repaint: step zeta of the gradient that pulls the predicted known "
                                              "pixels to the given ones (MCG; 0: RePaint alone)")


JUDGE_VERSION = 2  # bump when the judge's network or training, or the built-in data, changes, so old cached
#                    judges are never read (2: shapes whose colour is independent of the class)
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # what torch-fidelity downloads to the torch hub


def parse_list(text, parse, name):
    """'0,1, 3' -> [0.0, 1.0, 3.0] with `parse`; 'default' -> [None]."""
    try:
        return [None if item.strip().lower() in ("default", "none") else parse(item) for item in str(text).split(",")]
    except ValueError:
        raise UsageError(f"--{name} '{text}' is not a comma-separated list of numbers: e.g. --{name} 1,3,5") from None


def validate(cfg):
    """One readable error for each option the run cannot use, before any file is read."""
    if cfg.ckpt is None:
        raise UsageError("no checkpoint given: pass --ckpt models/<run>/ema_ckpt.pt")
    if cfg.sampler not in (None, *SAMPLERS):
        raise UsageError(f"sampler '{cfg.sampler}' is unknown: use one of {', '.join(SAMPLERS)}")
    if cfg.repaint and cfg.sampler not in (None, "ddpm"):
        raise UsageError(f"RePaint runs inside DDPM Alg. 2, not with --sampler {cfg.sampler}: pass --sampler ddpm (or "
                         "leave it out)")
    if cfg.jump_length < 1 or cfg.jump_n_sample < 1:
        raise UsageError(f"jump_length {cfg.jump_length} and jump_n_sample {cfg.jump_n_sample} must be >= 1 (1 and 1: "
                         "no resampling)")
    if not cfg.reconstruction_guidance >= 0:
        raise UsageError(f"reconstruction_guidance {cfg.reconstruction_guidance} must be >= 0 (0: RePaint alone)")
    if any(s is not None and s <= 0 for s in parse_list(cfg.steps, int, "steps")):
        raise UsageError(f"--steps {cfg.steps} must be positive")
    if any(c is None or c < 0 for c in parse_list(cfg.cfg_scale, float, "cfg_scale")):
        raise UsageError(f"--cfg_scale {cfg.cfg_scale}: use numbers >= 0, e.g. 0,1,3")
    if cfg.num_samples < 2:
        raise UsageError(f"num_samples {cfg.num_samples} is too small: KID and the Frechet distances need at "
                         "least 2 samples (use 1000 or more for figures worth comparing)")
    for name in ("batch_size", "judge_epochs"):
        if getattr(cfg, name) <= 0:
            raise UsageError(f"{name} {getattr(cfg, name)} must be positive")
    if cfg.num_real < 10:
        raise UsageError(f"num_real {cfg.num_real} is too few real images to train and test the judge: use 1000 "
                         "or more")
    if cfg.weights not in ("ema", "model"):
        raise UsageError(f"weights '{cfg.weights}' is unknown: use ema or model")
    if cfg.inception_weights is not None and not os.path.isfile(cfg.inception_weights):
        raise UsageError(f"--inception_weights '{cfg.inception_weights}' not found: pass the path of {INCEPTION_FILE}")


# ----------------------------------------------------------------------------- the judge
@dataclass
class Judge:
    """A trained JudgeNet, its accuracy on held-out real images, and the real images' feature statistics."""
    net: JudgeNet
    heldout_accuracy: float
    real_mu: np.ndarray  # (D,)
    real_sigma: np.ndarray  # (D, D)
    path: str

    @torch.no_grad()
    def features(self, images, batch_size=500):
        """uint8 images (N, C, S, S) -> float64 features (N, D), in batches."""
        device = next(self.net.parameters()).device
        out = [self.net.features(to_float(images[i:i + batch_size]).to(device)).double().cpu()
               for i in range(0, len(images), batch_size)]
        return torch.cat(out).numpy()

    def predict(self, images, batch_size=500):
        """uint8 images (N, C, S, S) -> class ids (N,)."""
        features = torch.from_numpy(self.features(images, batch_size)).float()
        return self.net.head(features.to(next(self.net.parameters()).device)).argmax(dim=1).cpu()


def to_float(images):
    """uint8 (N, C, H, W) in 0..255 -> float in [-1, 1]."""
    return images.float() / 127.5 - 1.0


def real_images(dataset, dataset_path, image_size, num_real, seed=0, channels=3):
    """(uint8 images (n, C, S, S), labels (n,), class names) of up to num_real training images, drawn with `seed`."""
    # "resize": the real images as they are, without random flips or crops
    data = get_dataset(dataset, dataset_path, image_size, seed=seed, train=True, size=num_real, augment="resize",
                       channels=channels)
    loader = torch.utils.data.DataLoader(data, batch_size=500, shuffle=False, num_workers=0)
    images, labels = [], []
    for x, y in tqdm(loader, desc="real images", leave=False):
        images.append(to_uint8(x))
        labels.append(torch.as_tensor(y))
    return torch.cat(images), torch.cat(labels), list(data.classes)


def judge_path(dataset, dataset_path, image_size, num_real, epochs, seed, root, channels=3):
    """data/judges/<dataset>-<S>px-<num_real>-<hash of every setting>.pt (a grey judge: ...-grey-<hash>.pt)"""
    key = {"dataset": dataset, "path": None if dataset == "shapes" else os.path.abspath(dataset_path or ""),
           "image_size": image_size, "num_real": num_real, "epochs": epochs, "seed": seed, "version": JUDGE_VERSION}
    if channels != 3:  # the RGB judges cached before channels existed keep their files
        key["channels"] = channels
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    grey = "-grey" if channels == 1 else ""
    return os.path.join(root, f"{dataset}-{image_size}px-{num_real}{grey}-{digest}.pt")


def train_judge(images, labels, num_classes, epochs, seed=0, device="cpu", batch_size=64):
    """A JudgeNet trained on 80% of (images, labels), and its accuracy on the held-out 20%."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=generator)
    n_train = max(1, int(0.8 * len(images)))
    train_idx, held_idx = order[:n_train], order[n_train:]
    torch.manual_seed(seed)
    net = JudgeNet(num_classes, channels=images.shape[1]).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    net.train()
    for _ in tqdm(range(epochs), desc="training the judge", leave=False):
        for batch in torch.randperm(n_train, generator=generator).split(batch_size):
            idx = train_idx[batch]
            loss = F.cross_entropy(net(to_float(images[idx]).to(device)), labels[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    net.eval().requires_grad_(False)
    judge = Judge(net, float("nan"), None, None, "")
    if len(held_idx):
        judge.heldout_accuracy = class_accuracy(judge.predict(images[held_idx]), labels[held_idx])
    return judge


def get_judge(dataset, dataset_path, image_size, num_real=5000, epochs=5, seed=0, device="cpu", root="data/judges",
              channels=3):
    """The judge of a data set at a resolution and channel count: loaded from `root`, or trained on its real images
    (grey with channels=1) and saved there."""
    path = judge_path(dataset, dataset_path, image_size, num_real, epochs, seed, root, channels)
    if os.path.isfile(path):
        state = load_checkpoint(path)
        net = JudgeNet(state["num_classes"], channels=state.get("channels", 3))
        net.load_state_dict(state["net"])
        net.eval().requires_grad_(False).to(device)
        return Judge(net, state["heldout_accuracy"], state["real_mu"].numpy(), state["real_sigma"].numpy(), path)
    with torch.random.fork_rng(devices=[]):  # leaves the caller's random stream (e.g. a training run's) as it was
        images, labels, classes = real_images(dataset, dataset_path, image_size, num_real, seed, channels)
        print(f"training the judge on {len(images)} real {dataset} images at {image_size} px (once; cached in "
              f"{root}/)")
        judge = train_judge(images, labels, len(classes), epochs, seed, device)
    judge.real_mu, judge.real_sigma = feature_statistics(judge.features(images))
    judge.path = path
    atomic_save({"net": judge.net.state_dict(), "num_classes": len(classes), "channels": channels,
                 "heldout_accuracy": judge.heldout_accuracy,
                 "real_mu": torch.from_numpy(judge.real_mu), "real_sigma": torch.from_numpy(judge.real_sigma)}, path)
    return judge


# ----------------------------------------------------------------------------- figures
def class_accuracy(predicted, requested):
    """Fraction of rows whose predicted class is the requested one."""
    return float((predicted.cpu() == requested.cpu()).float().mean())


def feature_statistics(features):
    """Mean (D,) and covariance (D, D) of features (N, D), in float64."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)): the Frechet distance of two Gaussians.

    This is FID's formula (Heusel et al. 2017); the figure depends on the feature space it is applied in.
    """
    diff = mu1 - mu2
    with warnings.catch_warnings():  # fewer samples than dimensions make the product singular: expected
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(len(mu1)) * 1e-6
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean.real))


def generate(model, diffusion, num_classes, n, cfg_scale, sampler, steps, seed, batch_size=250, progress=True,
             decode=None):
    """n uint8 samples (n, C, S, S) and the labels they were asked for (n,) (None if unconditional).

    Labels cycle through the classes (0, 1, .., K-1, 0, ..), so every class gets n // K or n // K + 1 samples.
    The noise of every batch comes from one generator seeded with `seed`. decode: latents -> pixels in [-1, 1]
    (latents.Latents.decode) for a run in a VAE's latents; None in pixel space.
    """
    labels = None if num_classes is None else torch.arange(n) % num_classes
    generator = torch.Generator(diffusion.device).manual_seed(seed)
    out = []
    with tqdm(total=n, desc=f"{sampler} cfg {cfg_scale} steps {steps or 'default'}", unit="img",
              disable=not progress) as bar:
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            y = None if labels is None else labels[start:start + b].to(diffusion.device)
            x_0 = diffusion.sample_x0(model, b, y, cfg_scale, sampler=sampler, steps=steps, generator=generator,
                                      progress=False)
            out.append(to_uint8(x_0 if decode is None else decode(x_0)).cpu())
            bar.update(b)
    return torch.cat(out), labels


def sample_figures(judge, samples, labels):
    """The offline figures of uint8 samples: class accuracy (None without labels) and the judge-space distance."""
    features = judge.features(samples)
    accuracy = None
    if labels is not None:
        head = judge.net.head
        logits = head(torch.from_numpy(features).float().to(next(head.parameters()).device))
        accuracy = class_accuracy(logits.argmax(dim=1), labels)
    mu, sigma = feature_statistics(features)
    return {"class_accuracy": accuracy, "judge_fd": frechet_distance(mu, sigma, judge.real_mu, judge.real_sigma)}


def offline_figures(model, diffusion, judge, num_classes, n, cfg_scale=3.0, sampler="dpm++", steps=None, seed=0,
                    batch_size=250, decode=None):
    """Class accuracy and judge-space Frechet distance of n fresh samples; what training's --eval_every logs."""
    samples, labels = generate(model, diffusion, num_classes, n, cfg_scale, sampler, steps, seed, batch_size,
                               progress=False, decode=decode)
    return sample_figures(judge, samples, labels)


# ----------------------------------------------------------------------------- judges by attribute (shapes)
def color_judge_accuracy(image_size, n=1000, seed=12345):
    """The colour judge's (data.classify_colors) accuracy on n real shapes images, drawn with their own seed."""
    data = ShapesDataset(image_size, size=n, seed=seed)
    images = torch.stack([data[i][0] for i in range(n)])
    colors = torch.tensor([data.attributes(i)[0] for i in range(n)])
    return class_accuracy(classify_colors(images), colors)


def attribute_figures(shape_judge, images, colors, shapes):
    """color_acc, shape_acc and prompt_acc (both right) of images (N, 3, S, S), uint8 or float in [-1, 1], asked for
    (colors, shapes) (N,).

    The colour is read by data.classify_colors, the shape by the learned judge of the shapes data set, whose
    training images have every colour with every shape, so it cannot read the shape from the colour.
    """
    color_ok = classify_colors(images).cpu() == colors.cpu()
    shape_ok = shape_judge.predict(images if images.dtype == torch.uint8 else to_uint8(images)) == shapes.cpu()
    return {"color_acc": float(color_ok.float().mean()), "shape_acc": float(shape_ok.float().mean()),
            "prompt_acc": float((color_ok & shape_ok).float().mean()), "n": len(images)}


# ----------------------------------------------------------------------------- FID and KID (torch-fidelity)
class Uint8Images(Dataset):
    """uint8 images (N, 3, H, W) as the Dataset of tensors that torch-fidelity reads; grey images (N, 1, H, W) are
    repeated to 3 channels, as Inception needs."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        image = self.images[index]
        return image.expand(3, -1, -1) if image.shape[0] == 1 else image


def inception_unavailable(weights_path):
    """None when FID and KID can run, else the one-line reason; never waits more than a few seconds."""
    if weights_path is not None:
        return None
    hub_file = os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_FILE)
    if os.path.isfile(hub_file):
        return None
    try:
        socket.create_connection(("github.com", 443), timeout=3).close()
    except OSError:
        return (f"FID and KID skipped: torch-fidelity needs {INCEPTION_FILE} (in {os.path.dirname(hub_file)}/ or "
                f"given by --inception_weights PATH) and cannot download it here")
    return None


def file_digest(path):
    """The first 12 hex digits of a file's SHA-256."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def inception_figures(samples, real, real_name, weights_path, device, cache_root="data/fidelity_cache"):
    """FID and KID of uint8 samples against uint8 real images; the real statistics are cached under `real_name`.

    torch-fidelity takes only cuda=True/False and then uses the current GPU: cuda:N is made the current one.
    """
    import torch_fidelity

    weights_tag = "default" if weights_path is None else file_digest(weights_path)
    cuda = device.startswith("cuda")
    with torch.cuda.device(torch.device(device)) if cuda else contextlib.nullcontext():
        metrics = torch_fidelity.calculate_metrics(
            input1=Uint8Images(samples), input2=Uint8Images(real), input2_cache_name=f"{real_name}-{weights_tag}",
            cache_root=cache_root, fid=True, kid=True, kid_subset_size=min(1000, len(samples), len(real)),
            feature_extractor_weights_path=weights_path, cuda=cuda, save_cpu_ram=True, verbose=False)
    return {"fid": metrics["frechet_inception_distance"], "kid": metrics["kernel_inception_distance_mean"],
            "kid_std": metrics["kernel_inception_distance_std"]}


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
def restoration_figures(judge, outputs, targets, labels):
    """PSNR (dB) and SSIM of uint8 outputs against uint8 targets (None when they are the targets), the judge's class
    accuracy against the true labels, and judge_fd."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    figures = sample_figures(judge, outputs, labels)
    if torch.equal(outputs, targets):
        return {"psnr": None, "ssim": None, **figures}
    predicted, target = outputs.float() / 255, targets.float() / 255  # [0, 1]
    psnr = peak_signal_noise_ratio(predicted, target, data_range=1.0, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(predicted, target, data_range=1.0, reduction="none")
    return {"psnr": float(psnr.mean()), "ssim": float(ssim.mean()), **figures}


def heldout_images(saved, n, channels):
    """(images (n, C, S, S) in [-1, 1], labels (n,)) of the first n held-out images of a run, as it split them."""
    _, held = saved_run_split(saved, channels)
    items = [held[i] for i in range(min(n, len(held)))]
    return torch.stack([image for image, _ in items]), torch.tensor([label for _, label in items])


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


def evaluate_restoration(cfg, model, arch, saved, device):
    """A ddpm_img2img.py run, or --repaint: degrade the run's held-out images, restore them, measure each method."""
    task = saved.get("task") if arch.get("cond_channels") else None
    if task is not None and cfg.repaint:
        raise UsageError(f"this checkpoint is trained for {task}: drop --repaint (RePaint is for ddpm.py and "
                         "ddpm_conditional.py checkpoints)")
    if task is None and not cfg.repaint:
        raise UsageError("pass --repaint true to measure inpainting with this checkpoint")
    if (task or "inpaint") != "inpaint" and cfg.masks is not None:
        raise UsageError(f"--masks is for inpainting, and this checkpoint does {task}: drop --masks")
    diffusion = pixel_diffusion(cfg, saved, arch, device, "image-to-image figures and RePaint")
    size, channels = diffusion.img_size, arch["c_out"]
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
    steps_list = parse_list(cfg.steps, int, "steps")
    model.to(device)
    shown = None
    for cfg_scale in cfg_scales:
        for steps in steps_list:
            start = time.perf_counter()
            generator = torch.Generator(device).manual_seed(cfg.seed)
            outputs = []
            for first in tqdm(range(0, len(images), cfg.batch_size), desc=f"{cfg.sampler} cfg {cfg_scale}"):
                rows_b = slice(first, first + cfg.batch_size)
                b = len(images[rows_b])
                extra = ({"cond": cond[rows_b].to(device)} if task is not None else
                         {"known_image": images[rows_b].to(device), "known_mask": (1 - holes[rows_b]).to(device),
                          "jump_length": cfg.jump_length, "jump_n_sample": cfg.jump_n_sample,
                          "reconstruction_guidance": cfg.reconstruction_guidance})
                y = None if given is None else given[rows_b].to(device)
                x_0 = diffusion.sample_x0(model, b, y, cfg_scale, sampler=cfg.sampler, steps=steps,
                                          generator=generator, progress=False, **extra)
                outputs.append((x_0 if task is None else degradation.keep_known(x_0, extra["cond"])).cpu())
            outputs = torch.cat(outputs)
            shown = outputs if shown is None else shown
            steps_run = steps or DEFAULT_STEPS.get(cfg.sampler, diffusion.noise_steps - 1)
            rows.append({"method": "repaint" if task is None else "diffusion", "sampler": cfg.sampler, "steps": steps,
                         "steps_run": steps_run, "cfg_scale": cfg_scale, "num_samples": len(images), "seed": cfg.seed,
                         **({"jump_length": cfg.jump_length, "jump_n_sample": cfg.jump_n_sample,
                             "reconstruction_guidance": cfg.reconstruction_guidance} if task is None
                            else {}),
                         **restoration_figures(judge, to_uint8(outputs), truth, labels),
                         "seconds": round(time.perf_counter() - start, 2)})
    run_name = saved.get("run_name") or os.path.basename(os.path.dirname(os.path.abspath(cfg.ckpt)))
    out = cfg.out or os.path.join("results", run_name, "repaint.json" if task is None else "metrics.json")
    what = (f"{task or 'RePaint inpainting'} of {len(images)} held-out {saved['dataset']} images at {size} px"
            f"{'' if degradation.masks is None else ', masks ' + degradation.masks.spec} with {describe(arch)} "
            f"from {cfg.ckpt}")
    print_restoration_table(rows, judge, what)
    first = slice(0, 8)
    grid_rows = comparison_rows(degradation, images[first], cond[first], holes[first] if holes is not None else None,
                                shown[first], size)
    if degradation.task != "superres":
        grid_rows.append((degradation.baseline_name(), baseline[first]))
    picture = os.path.splitext(out)[0] + "_grid.png"  # not metrics.png: that name is the sweep plot of class runs
    save_rows(grid_rows, picture)
    metrics = {"checkpoint": cfg.ckpt, "run_name": run_name, "task": task or "repaint", "dataset": saved["dataset"],
               "image_size": size, "masks": None if degradation.masks is None else degradation.masks.spec,
               "judge": {"path": judge.path, "heldout_accuracy": judge.heldout_accuracy, "num_real": cfg.num_real},
               "notes": ["held-out images of the run, never trained on; the judge trained on 80% of num_real real "
                         "images, which may include some of them",
                         *(["the network is given each image's true class"] if given is not None else [])],
               "config": dataclasses.asdict(cfg), "rows": rows}
    write_json(metrics, out)
    print(f"saved {out} and {picture} (input, output at the first cfg_scale and steps, ground truth, baseline)")
    return metrics


def main(argv=None):
    """Sample every (cfg_scale, steps) combination, measure it, print the table, write metrics.json and .png."""
    cfg = parse_config(Config, argv, description=__doc__)
    validate(cfg)
    cfg = dataclasses.replace(cfg, sampler=cfg.sampler or ("ddpm" if cfg.repaint else "dpm++"))
    device = pick_device(cfg.device)
    model, arch, saved = load_model(cfg.ckpt, cfg.weights)
    if cfg.repaint or arch.get("cond_channels"):
        return evaluate_restoration(cfg, model, arch, saved, device)
    if cfg.masks is not None:
        raise UsageError("--masks is for inpainting: pass --repaint true, or an inpaint checkpoint of ddpm_img2img.py")
    dataset, dataset_path = resolve_data(cfg, saved)
    latents = run_latents(saved, arch["c_in"], device)
    diffusion = make_diffusion(cfg, saved, arch["c_in"], device, latents)
    image_size = diffusion.img_size * latents.factor  # of the decoded samples, which the judge reads
    num_classes = arch["num_classes"]
    if num_classes is not None and cfg.num_samples < num_classes:
        raise UsageError(f"num_samples {cfg.num_samples} is smaller than the model's {num_classes} classes: pass "
                         f"--num_samples {num_classes} or more, so every class is sampled")
    run_name = saved.get("run_name") or os.path.basename(os.path.dirname(os.path.abspath(cfg.ckpt)))
    out = cfg.out or os.path.join("results", run_name, "metrics.json")
    cfg_scales = parse_list(cfg.cfg_scale, float, "cfg_scale") if num_classes is not None else [None]
    steps_list = parse_list(cfg.steps, int, "steps")

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
    for cfg_scale in cfg_scales:
        for steps in steps_list:
            start = time.perf_counter()
            samples, labels = generate(model, diffusion, num_classes, cfg.num_samples, cfg_scale or 0.0, cfg.sampler,
                                       steps, cfg.seed, cfg.batch_size, decode=latents.decode)
            steps_run = steps or DEFAULT_STEPS.get(cfg.sampler, diffusion.noise_steps - 1)
            row = {"sampler": cfg.sampler, "steps": steps, "steps_run": steps_run, "cfg_scale": cfg_scale,
                   "clip_x0": diffusion.clip_x0, "num_samples": cfg.num_samples, "seed": cfg.seed,
                   **sample_figures(judge, samples, labels), "fid": None, "kid": None, "kid_std": None}
            if skip is None:
                try:
                    row.update(inception_figures(samples, real, real_name,
                                                 cfg.inception_weights, device))
                except OSError as exc:  # a download that fails after all
                    skip = (f"FID and KID skipped: torch-fidelity could not get {INCEPTION_FILE} ({exc}); pass "
                            "--inception_weights PATH")
            row["seconds"] = round(time.perf_counter() - start, 2)
            rows.append(row)
    if skip is not None:
        notes.append(skip)
        print(skip)

    print_table(rows, judge)
    metrics = {"checkpoint": cfg.ckpt, "run_name": run_name, "dataset": dataset, "image_size": image_size,
               "judge": {"path": judge.path, "heldout_accuracy": judge.heldout_accuracy, "num_real": cfg.num_real},
               "judge_fd_note": "Frechet distance in the judge's feature space; not comparable with published FID",
               "config": dataclasses.asdict(cfg), "notes": notes, "rows": rows}
    write_json(metrics, out)
    plot_path = os.path.join(os.path.dirname(out) or ".", "metrics.png")
    plot_metrics(rows, plot_path)
    print(f"saved {out} and {plot_path}")
    return metrics


if __name__ == "__main__":
    run_cli(main)
