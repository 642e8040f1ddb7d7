"""The judges of sample quality: a learned class judge, distances in its feature space, FID and KID.

A judge is a small CNN (modules.JudgeNet) trained once on a data set's real images and cached in data/judges/; its
accuracy on held-out real images goes beside every figure, so a weak judge is visible. It names the class of a
sample (class accuracy), and its last hidden layer is the feature space of the offline Frechet distance (judge_fd,
not comparable with published FID). On the built-in shapes every shape comes in every colour, so the judge cannot
read the class from the colour, and the colour judge (data.classify_colors) reads the colour of text-to-image
samples. FID and KID go through torch-fidelity's Inception network. evaluate.py prints these figures for a
checkpoint; the training loop's --eval_every measures them during a run (`offline_figures`).
"""
import contextlib
import hashlib
import json
import os
import socket
import warnings
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from data import ShapesDataset, classify_colors, get_dataset
from modules import JudgeNet
from utils import atomic_save, load_checkpoint, to_uint8

# ----------------------------------------------------------------------------- the judge
JUDGE_VERSION = 2  # bump when the judge's network or training, or the built-in data, changes, so old cached
#                    judges are never read (2: shapes whose colour is independent of the class)
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # what torch-fidelity downloads to the torch hub


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


# ----------------------------------------------------------------------------- restorations
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
