"""Every data set, the augmentation, the data loader, the held-out split, masks and the data set on the device.

Class data sets (shapes, imagefolder, cifar10) yield (image, int label); caption data sets yield (image,
caption string). Images are float (C, S, S) tensors in [-1, 1], C = 3 (RGB) or 1 (grey: --channels 1, the default
of a folder of grey image files: `dataset_channels`), and every data set has `caption(i)`, so
captions can be read without decoding an image. A run's held-out images (--holdout) are rebuilt from its saved config
(`saved_run_split`). `DeviceData` holds a data set that fits as tensors on the training device (--data_on_device),
so batches need no DataLoader workers. (The cache of a data set's latents is latents.py's.)
"""
import copy
import json
import math
import os
import warnings

import numpy as np
import torch
import torchvision
from torch.utils.data import DataLoader, Dataset, TensorDataset
from PIL import Image
from torchvision import transforms

from utils import UsageError, is_readable_image, load_rgb, short_reason

# ----------------------------------------------------------------------------- shapes data set

SHAPE_NAMES = ("circle", "square", "triangle", "diamond", "plus", "ring", "cross", "bar", "frame", "stripe")
SHAPE_PALETTE = (  # (colour name, RGB): drawn independently of the shape, so colour says nothing of the class
    ("red", (230, 30, 30)),
    ("green", (30, 200, 30)),
    ("blue", (40, 70, 255)),
    ("yellow", (240, 230, 30)),
    ("magenta", (230, 40, 230)),
    ("cyan", (30, 230, 230)),
    ("white", (245, 245, 245)),
    ("orange", (255, 140, 0)),
    ("brown", (140, 70, 40)),
    ("gray", (128, 128, 128)),
)
COLOR_NAMES = tuple(name for name, _ in SHAPE_PALETTE)
SHAPE_COLORS = tuple(rgb for _, rgb in SHAPE_PALETTE)


def _box(dx, dy):
    """Chebyshev distance from the centre: squares are its level sets."""
    return np.maximum(np.abs(dx), np.abs(dy))


def _bar(along, across, half_width):
    """A bar of length 2 along `along` and width 2 * half_width along `across`."""
    return (np.abs(along) <= 1) & (np.abs(across) <= half_width)


def _cross(dx, dy):
    """An X: the plus sign rotated by 45 degrees."""
    u, v = (dx + dy) / math.sqrt(2), (dx - dy) / math.sqrt(2)
    return _bar(u, v, 0.3) | _bar(v, u, 0.3)


# Each mask takes offsets from the centre in units of the radius; every shape fits in |dx|, |dy| <= 1.
_SHAPE_MASKS = {
    "circle": lambda dx, dy: np.hypot(dx, dy) <= 1,
    "square": lambda dx, dy: _box(dx, dy) <= 0.8,
    "triangle": lambda dx, dy: (dy <= 0.8) & (np.abs(dx) <= 0.95 * (dy + 0.8) / 1.6),  # apex up
    "diamond": lambda dx, dy: np.abs(dx) + np.abs(dy) <= 1,
    "plus": lambda dx, dy: _bar(dx, dy, 0.3) | _bar(dy, dx, 0.3),
    "ring": lambda dx, dy: (np.hypot(dx, dy) <= 1) & (np.hypot(dx, dy) >= 0.5),
    "cross": _cross,
    "bar": lambda dx, dy: _bar(dx, dy, 0.5),
    "frame": lambda dx, dy: (_box(dx, dy) <= 0.9) & (_box(dx, dy) >= 0.5),
    "stripe": lambda dx, dy: _bar(dy, dx, 0.5),
}


class ShapesDataset(Dataset):
    """Built-in data set: one shape on black, in a colour drawn independently of it; the class is the shape.

    Item i is drawn from a NumPy generator seeded with (seed, i), so it is deterministic and nothing is
    stored. Its label is the shape, i % 10 (`SHAPE_NAMES`); its colour is one of the ten named colours of
    `SHAPE_PALETTE`, uniform and independent of the shape, so no judge can name the class from the colour.
    Its caption is "a {colour} {shape}". Images are float (3, S, S) tensors in [-1, 1], or with channels=1 their
    luma (ITU-R 601: 0.299 R + 0.587 G + 0.114 B, as PIL's grey conversion), (1, S, S).
    """

    def __init__(self, image_size=32, size=5000, seed=0, channels=3):
        self.image_size = image_size
        self.size = size
        self.seed = seed
        self.channels = channels
        self.classes = list(SHAPE_NAMES)
        self.color_names = list(COLOR_NAMES)

    def __len__(self):
        return self.size

    def _check(self, index):
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} items")

    def attributes(self, index):
        """(colour index, shape index) of item `index`, without drawing it."""
        self._check(index)
        return int(np.random.default_rng([self.seed, index]).integers(len(SHAPE_PALETTE))), index % len(SHAPE_NAMES)

    def __getitem__(self, index):
        self._check(index)
        rng = np.random.default_rng([self.seed, index])
        color = int(rng.integers(len(SHAPE_PALETTE)))  # the first draw, as in attributes()
        label = index % len(SHAPE_NAMES)
        return self.render(label, color, rng), label

    def caption(self, index):
        """A sentence naming the colour and the shape, e.g. 'a red circle'."""
        return shape_caption(*self.attributes(index))

    def render(self, label, color, rng):
        """Draw shape `label` in palette colour `color` at 2x resolution, then average-pool 2x2 (anti-aliasing)."""
        size = self.image_size
        radius = rng.uniform(0.3, 0.45) * size
        cx, cy = rng.uniform(radius, size - radius, size=2)
        gain = rng.uniform(0.9, 1.1)
        coords = (np.arange(2 * size) + 0.5) / 2  # sub-pixel centres, in output pixels
        dx = (coords[None, :] - cx) / radius  # (1, 2S)
        dy = (coords[:, None] - cy) / radius  # (2S, 1)
        mask = _SHAPE_MASKS[SHAPE_NAMES[label]](dx, dy).astype(np.float32)  # (2S, 2S)
        coverage = mask.reshape(size, 2, size, 2).mean(axis=(1, 3))  # (2S, 2S) -> (S, S)
        rgb = np.clip(np.array(SHAPE_PALETTE[color][1], dtype=np.float32) * gain, 0, 255) / 255
        image = coverage[None, :, :] * rgb[:, None, None]  # (3, S, S) in [0, 1]
        if self.channels == 1:
            image = np.tensordot(LUMA, image, axes=1)[None]  # (3, S, S) -> (1, S, S)
        return torch.from_numpy(image * 2 - 1).float()


LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601 grey of RGB, PIL's convert("L")


def shape_caption(color, shape):
    """'a {colour} {shape}' of palette colour index `color` and shape index `shape`."""
    return f"a {COLOR_NAMES[color]} {SHAPE_NAMES[shape]}"


def parse_shape_caption(caption):
    """(colour index, shape index) of a caption 'a {colour} {shape}', or None if it names no pair."""
    words = caption.strip().lower().split()
    if len(words) != 3 or words[0] != "a" or words[1] not in COLOR_NAMES or words[2] not in SHAPE_NAMES:
        return None
    return COLOR_NAMES.index(words[1]), SHAPE_NAMES.index(words[2])


def all_shape_captions():
    """The 100 captions of the shapes data set, colour-major: 'a red circle', 'a red square', ..."""
    return [shape_caption(c, s) for c in range(len(COLOR_NAMES)) for s in range(len(SHAPE_NAMES))]


def classify_colors(images, colors=SHAPE_COLORS):
    """The colour judge of shapes images: the palette colour nearest to the colour of the shape's core.

    `images` is uint8 (N, 3, H, W) in 0..255 or float in [-1, 1]. The core is the pixels whose brightest
    channel reaches 70% of the image's bright level (the 98th percentile of that channel over the image), so
    the anti-aliased rim, which darkens thin shapes, does not pull white towards gray. An image whose bright
    level is under 25% of full scale (no foreground) gets -1.
    """
    if images.dtype == torch.uint8:
        pixels = images.float()
    else:
        pixels = (images.float().clamp(-1, 1) + 1) / 2 * 255
    brightness = pixels.amax(dim=1).flatten(1)  # (N, H * W)
    level = torch.quantile(brightness, 0.98, dim=1, keepdim=True)  # (N, 1)
    core = (brightness >= 0.7 * level).float()  # (N, H * W)
    mean = (pixels.flatten(2) * core[:, None]).sum(dim=2) / core.sum(dim=1, keepdim=True)  # (N, 3)
    palette = torch.tensor(colors, dtype=torch.float32, device=images.device)  # (K, 3), where the images are
    labels = torch.cdist(mean, palette).argmin(dim=1)
    return torch.where(level[:, 0] > 0.25 * 255, labels, torch.full_like(labels, -1))


# ----------------------------------------------------------------------------- file data sets

class ClassDataset(Dataset):
    """Wraps a torchvision class data set (CIFAR10, ImageFolder) to add `caption(index)`.

    With `size`, only a random subset of `size` items (drawn with `seed`) is kept. `augment` names the mode of
    `augmentation` that the base's transform applies at `image_size`.
    """

    def __init__(self, base, size=None, seed=0, image_size=None, augment=None, channels=3):
        self.base, self.image_size, self.augment, self.channels = base, image_size, augment, channels
        self.classes = list(base.classes)
        self.indices = list(range(len(base)))
        if size is not None and size < len(base):
            self.indices = np.random.default_rng(seed).permutation(len(base))[:size].tolist()

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, index):
        image, label = self.base[self.indices[index]]
        return image, int(label)

    def caption(self, index):
        """'a photo of a <class>', with underscores as spaces."""
        label = self.base.targets[self.indices[index]]
        return f"a photo of a {self.classes[label].replace('_', ' ')}"


AUGMENTATIONS = ("resize", "flip", "reference")
CHANNELS = (1, 3)  # grey or RGB
GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")  # PIL modes of grey image files


def augmentation(image_size, mode="resize", channels=3):
    """PIL image -> (C, S, S) tensor in [-1, 1]: RGB, or its grey (PIL's ITU-R 601 luma) with channels=1.

    resize: short side to S, then the centre S x S crop: the data distribution as it is. flip: the same, plus a
    random horizontal flip, for data whose classes keep their meaning in a mirror (CIFAR-10, as in the DDPM
    paper; not digits or text). reference: the reference repository's 64 px crop scaled to S (resize to 5/4 S,
    RandomResizedCrop of 80-100% of the area and aspect 3/4..4/3), which zooms and stretches what is learned.
    """
    if mode not in AUGMENTATIONS:
        raise UsageError(f"augment '{mode}' is unknown: use one of {', '.join(AUGMENTATIONS)}")
    if mode == "reference":
        geometry = [transforms.Resize(round(image_size * 80 / 64)),
                    transforms.RandomResizedCrop(image_size, scale=(0.8, 1.0))]
    else:
        geometry = [transforms.Resize(image_size), transforms.CenterCrop(image_size)]
        if mode == "flip":
            geometry.append(transforms.RandomHorizontalFlip())
    grey = [transforms.Grayscale(1)] if channels == 1 else []
    return transforms.Compose([*geometry, *grey, transforms.ToTensor(),
                               transforms.Normalize((0.5,) * channels, (0.5,) * channels)])


def dataset_channels(name, path, limit=500):
    """The channels of a data set where it is clear from its files: 1 for a folder (imagefolder, captions) whose image
    files are all grey (PIL modes L, I, I;16, F, ...; up to `limit` of them, evenly spread, are opened, headers only),
    else 3: shapes, CIFAR-10, colour folders, grey pictures stored as RGB, and folders that do not exist yet."""
    if name not in ("imagefolder", "captions") or not path or not os.path.isdir(path):
        return 3
    files = sorted(os.path.join(root, f) for root, _, names in os.walk(path) for f in names
                   if f.lower().endswith(torchvision.datasets.folder.IMG_EXTENSIONS))
    modes = set()
    for file in files[::max(1, len(files) // limit)]:
        try:
            with Image.open(file) as image:
                modes.add(image.mode)
        except OSError:
            continue
    return 1 if modes and modes <= set(GREY_MODES) else 3


def _image_folder(path, transform):
    """An ImageFolder over one subfolder per class, skipping unreadable files with one warning."""
    if not path:
        raise UsageError("--dataset imagefolder needs --dataset_path DIR: a folder with one subfolder "
                         "per class")
    if not os.path.isdir(path):
        raise UsageError(f"dataset folder '{path}' does not exist: pass --dataset_path to a folder with "
                         "one subfolder per class, or use --dataset shapes")
    entries = [e for e in os.listdir(path) if not e.startswith(".")]
    if not entries:
        raise UsageError(f"dataset folder '{path}' is empty: put images in one subfolder per class")
    if not any(os.path.isdir(os.path.join(path, e)) for e in entries):
        raise UsageError(f"dataset folder '{path}' has no class subfolders: put images in one subfolder "
                         "per class")
    skipped = []

    def is_valid(file_path):
        ok = is_readable_image(file_path)
        if not ok:
            skipped.append(file_path)
        return ok

    folder = torchvision.datasets.ImageFolder(
        path, transform=transform, loader=load_rgb, is_valid_file=is_valid, allow_empty=True)
    if skipped:
        warnings.warn(f"skipped {len(skipped)} files in '{path}' that are not readable images "
                      f"(e.g. '{skipped[0]}')", stacklevel=3)
    if len(folder) == 0:
        raise UsageError(f"dataset folder '{path}' has no readable images: put .png/.jpg files in "
                         "one subfolder per class")
    return folder


def write_digits_folder(path):
    """scikit-learn's 1,797 handwritten digits (8x8, grey, white ink on black) as an image folder for
    `--dataset imagefolder`: path/<digit>/<index>.png. Real data that nobody here drew, small enough for a CPU;
    needs `pip install scikit-learn` (the digits ship inside it). Returns the number of images written."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UsageError("the digits folder comes from scikit-learn: pip install scikit-learn") from None

    if os.path.isdir(path) and os.listdir(path):
        raise UsageError(f"'{path}' is not empty: pass a new folder, or delete it first")
    digits = load_digits()
    for index, (image, label) in enumerate(zip(digits.images, digits.target)):
        folder = os.path.join(path, str(label))
        os.makedirs(folder, exist_ok=True)
        pixels = np.round(image * (255 / 16)).astype(np.uint8)  # values 0..16 -> 0..255
        Image.fromarray(pixels, mode="L").save(os.path.join(folder, f"{index:04d}.png"))
    return len(digits.images)


def _cifar10(path, train, transform):
    """CIFAR-10 from torchvision, downloading it once; a failed download is a UsageError."""
    root = path or "./data"
    try:
        base = torchvision.datasets.CIFAR10(root=root, train=train, download=True, transform=transform)
    except Exception as exc:
        raise UsageError(f"could not download CIFAR-10 to {root} ({short_reason(exc, 80)}): run once with "
                         "internet access, or use --dataset shapes (built in) or --dataset imagefolder "
                         "--dataset_path DIR") from exc
    return base


def get_dataset(name, path, image_size, seed=0, train=True, size=None, augment=None, channels=3):
    """A data set of ((C, S, S) image in [-1, 1], int label) with `classes` and `caption(i)`; C = `channels`.

    `name` is cifar10, imagefolder or shapes. `augment` is a mode of `augmentation` for the file data sets
    (None: flip for cifar10, resize for imagefolder, which may hold digits or text); shapes are never augmented.
    `size` sets the number of shapes items (default 5000) and keeps a seeded random subset of the file data
    sets. `shapes` has no split: `train` is ignored.
    """
    if image_size <= 0 or image_size % 8 != 0:
        raise UsageError(f"image_size {image_size} is not divisible by 8: the U-Net halves it 3 times; "
                         "use 16, 32 or 64")
    if name == "shapes":
        return ShapesDataset(image_size=image_size, size=5000 if size is None else size, seed=seed, channels=channels)
    if channels not in CHANNELS:
        raise UsageError(f"channels {channels} is not supported: use 1 (grey) or 3 (RGB)")
    if name == "cifar10":
        augment = augment or "flip"
        base = _cifar10(path, train, augmentation(image_size, augment, channels))
        return ClassDataset(base, size, seed, image_size, augment, channels)
    if name == "imagefolder":
        augment = augment or "resize"
        base = _image_folder(path, augmentation(image_size, augment, channels))
        return ClassDataset(base, size, seed, image_size, augment, channels)
    raise UsageError(f"unknown dataset '{name}': choose cifar10, imagefolder or shapes")


def make_dataloader(dataset, batch_size, num_workers=0, shuffle=True, seed=0, pin_memory=False,
                    drop_last=True):
    """A DataLoader whose shuffling is seeded; refuses a data set smaller than one full batch."""
    if drop_last and len(dataset) < batch_size:
        raise UsageError(f"the data set has {len(dataset)} images, fewer than batch_size {batch_size}, so "
                         "no full batch exists: lower --batch_size or add images")
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=drop_last, generator=generator,
                      persistent_workers=num_workers > 0)



# ----------------------------------------------------------------------------- caption data sets

def _folder_images(path):
    """Image files under `path` (recursive), as sorted paths relative to it."""
    found = []
    for root, _, files in os.walk(path):
        found += [os.path.relpath(os.path.join(root, f), path) for f in files
                  if f.lower().endswith(torchvision.datasets.folder.IMG_EXTENSIONS)]
    return sorted(found)


def _read_metadata(path):
    """(file name, caption) pairs from metadata.jsonl, one JSON object per line (HF imagefolder)."""
    metadata = os.path.join(path, "metadata.jsonl")
    pairs = []
    with open(metadata, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                pairs.append((str(item["file_name"]), str(item["text"])))
            except (ValueError, KeyError, TypeError) as exc:
                raise UsageError(f"{metadata} line {number} is not a JSON object with \"file_name\" and \"text\" "
                                 f"({type(exc).__name__}: {exc}): fix or delete that line") from exc
    for name, _ in pairs:
        if not os.path.isfile(os.path.join(path, name)):
            raise UsageError(f"{metadata} names '{name}', which is not in {path}: fix the file_name or add it")
    return pairs


def _read_caption_files(path):
    """(file name, caption) pairs from a `<name>.txt` caption file beside each image."""
    pairs = []
    for name in _folder_images(path):
        caption_file = os.path.splitext(os.path.join(path, name))[0] + ".txt"
        if not os.path.isfile(caption_file):
            raise UsageError(f"image '{name}' in {path} has no caption file {os.path.basename(caption_file)}: "
                             "add one, or list every image in a metadata.jsonl")
        with open(caption_file, encoding="utf-8") as f:
            pairs.append((name, " ".join(f.read().split())))
    return pairs


class CaptionFolder(Dataset):
    """A folder of images with captions: a metadata.jsonl ({"file_name": ..., "text": ...} per line, as in
    Hugging Face's imagefolder), or else a `.txt` caption file beside each image."""

    def __init__(self, path, image_size, size=None, channels=3):
        if not path or not os.path.isdir(path):
            raise UsageError(f"caption folder '{path}' does not exist: pass --dataset_path to a folder of images "
                             "with captions")
        if os.path.isfile(os.path.join(path, "metadata.jsonl")):
            self.items = _read_metadata(path)
        else:
            self.items = _read_caption_files(path)
        if not self.items:
            raise UsageError(f"caption folder '{path}' holds no images: add .png/.jpg files with captions")
        self.items = self.items[:size]  # the first `size` in file order (all with None)
        self.path = path
        self.transform = augmentation(image_size, channels=channels)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        name, caption = self.items[index]
        return self.transform(load_rgb(os.path.join(self.path, name))), caption

    def caption(self, index):
        return self.items[index][1]


class Captioned(Dataset):
    """A get_dataset data set (shapes, cifar10, imagefolder) with its caption instead of its label."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        return self.base[index][0], self.base.caption(index)

    def caption(self, index):
        return self.base.caption(index)


def normalize_caption(caption):
    """Lower case, single spaces: the form in which captions are compared."""
    return " ".join(str(caption).lower().split())


class CaptionSubset(Dataset):
    """The items `indices` of a data set, with their captions: a caption data set without its held-out prompts, or
    the two parts of `holdout_split`."""

    def __init__(self, base, indices):
        self.base, self.indices = base, list(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, index):
        return self.base[self.indices[index]]

    def caption(self, index):
        return self.base.caption(self.indices[index])


def without_captions(dataset, holdout):
    """The items of a caption data set whose caption is none of `holdout`: prompts never trained on, to measure
    whether a text-conditioned model composes words it saw only apart. A held-out caption that no item has is a
    UsageError (a typo would hold out nothing)."""
    if not holdout:
        return dataset
    held = {normalize_caption(c) for c in holdout}
    captions = [normalize_caption(dataset.caption(i)) for i in range(len(dataset))]
    missing = sorted(held - set(captions))
    if missing:
        raise UsageError(f"holdout prompt '{missing[0]}' is no caption of the data set: fix it or remove it from "
                         "--holdout_prompts")
    return CaptionSubset(dataset, [i for i, c in enumerate(captions) if c not in held])


def holdout_split(dataset, n, seed=0):
    """(the rest, n held-out items) of a data set, the held-out ones drawn with `seed`: train_vae.py measures its
    reconstructions on images it never trained on."""
    order = np.random.default_rng(seed).permutation(len(dataset)).tolist()  # held-out in random order: mixed classes
    return CaptionSubset(dataset, sorted(order[n:])), CaptionSubset(dataset, order[:n])


def run_datasets(name, path, image_size, seed=0, size=None, augment=None, channels=3, holdout=0):
    """(the images a run trains on, the `holdout` images it never sees, or None, the class names): `get_dataset`, then
    `holdout_split` with the run's seed, so that evaluate.py rebuilds the same held-out images from the saved config."""
    dataset = get_dataset(name, path, image_size, seed=seed, size=size, augment=augment, channels=channels)
    if not holdout:
        return dataset, None, list(dataset.classes)
    if not 0 < holdout < len(dataset):
        raise UsageError(f"holdout {holdout} leaves none of the {len(dataset)} images to train on: use a smaller "
                         "--holdout (or 0)")
    train, held = holdout_split(dataset, holdout, seed)
    return train, held, list(dataset.classes)


def saved_run_split(saved, channels):
    """(training images, held-out images) of a run, rebuilt by `run_datasets` from its saved config (a dict), as it
    split them; a UsageError when the run held nothing out."""
    holdout = saved.get("holdout") or 0
    if not holdout:
        raise UsageError("this run held no images out of training (holdout 0), so there is nothing unseen to measure "
                         "on: train it with --holdout 300 (or another count)")
    train, held, _ = run_datasets(saved["dataset"], saved.get("dataset_path"), saved["image_size"], saved.get("seed", 0),
                                  saved.get("dataset_size"), "resize", channels, holdout)
    return train, held


def heldout_images(saved, n, channels):
    """(images (n, C, S, S) in [-1, 1], labels (n,)) of the first n held-out images of a run, as it split them."""
    _, held = saved_run_split(saved, channels)
    items = [held[i] for i in range(min(n, len(held)))]
    return torch.stack([image for image, _ in items]), torch.tensor([label for _, label in items])


def get_caption_dataset(name, path, image_size, seed=0, size=None, channels=3):
    """Items (image (C, S, S) in [-1, 1], caption). `name`: shapes | cifar10 | imagefolder | captions."""
    if name == "captions":
        return CaptionFolder(path, image_size, size, channels)
    if name not in ("shapes", "cifar10", "imagefolder"):
        raise UsageError(f"unknown dataset '{name}': choose shapes, cifar10, imagefolder or captions")
    return Captioned(get_dataset(name, path, image_size, seed=seed, size=size, channels=channels))


def default_prompts(dataset, limit=10, scan=1000):
    """The first `limit` distinct captions among the first `scan` items: the grids' fixed prompts."""
    prompts = []
    for i in range(min(scan, len(dataset))):
        caption = dataset.caption(i)
        if caption and caption not in prompts:
            prompts.append(caption)
            if len(prompts) == limit:
                break
    return prompts


# ----------------------------------------------------------------------------- inpainting masks

MASKS = ("boxes", "halves", "lower", "strokes")  # or a folder of mask images


class Masks:
    """Inpainting masks of size x size, (n, 1, S, S) float, 1 in the hole (the pixels to fill), 0 where the image is
    known; as files, white is the hole and black is known.

    `spec` is one of MASKS or a folder of mask images: boxes (one rectangle, each side a quarter to three quarters
    of the image), halves (the top, bottom, left or right half), lower (the lower half, always), strokes (free-form:
    one to three brush strokes of a few segments, as Palette's and LaMa's masks), or a folder whose images are
    drawn uniformly (each resized to S x S, nearest neighbour, and checked by `check_mask`). `draw(n, generator)`
    draws from the torch generator (None: the global one), on the CPU.
    """

    def __init__(self, spec, size):
        self.spec, self.size = spec, size
        self.files = None
        if spec not in MASKS:
            if not os.path.isdir(spec):
                raise UsageError(f"masks '{spec}' is neither one of {', '.join(MASKS)} nor a folder: pass one of them, "
                                 "or a folder of black-and-white mask images (white: the hole)")
            paths = [os.path.join(spec, name) for name in _folder_images(spec)]
            if not paths:
                raise UsageError(f"mask folder '{spec}' holds no .png or .jpg images: add mask images (white: the "
                                 "hole)")
            self.files = torch.stack([read_mask(path, size) for path in paths])  # (M, 1, S, S)

    def draw(self, n, generator=None):
        size = self.size
        if self.files is not None:
            return self.files[torch.randint(len(self.files), (n,), generator=generator)]
        if self.spec == "lower":
            holes = torch.zeros(n, 1, size, size)
            holes[:, :, size // 2:] = 1
            return holes
        if self.spec == "halves":
            rows = torch.arange(size).view(1, size, 1)  # (1, S, 1)
            cols = torch.arange(size).view(1, 1, size)  # (1, 1, S)
            halves = torch.stack([(rows < size // 2).expand(1, size, size), (rows >= size // 2).expand(1, size, size),
                                  (cols < size // 2).expand(1, size, size), (cols >= size // 2).expand(1, size, size)])
            return halves[torch.randint(4, (n,), generator=generator)].float()  # (4, 1, S, S) -> (n, 1, S, S)
        if self.spec == "boxes":
            holes = torch.zeros(n, 1, size, size)
            sides = torch.randint(max(1, size // 4), 3 * size // 4 + 1, (n, 2), generator=generator)  # (height, width)
            for hole, (height, width) in zip(holes, sides.tolist()):
                top = int(torch.randint(size - height + 1, (1,), generator=generator))
                left = int(torch.randint(size - width + 1, (1,), generator=generator))
                hole[:, top:top + height, left:left + width] = 1
            return holes
        return torch.stack([self._strokes(generator) for _ in range(n)])

    def _strokes(self, generator):
        """One free-form mask: 1 to 3 strokes of 2 to 4 segments, each `size` / 8 pixels wide (at least 1)."""
        from PIL import ImageDraw

        size = self.size
        canvas = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(canvas)
        width = max(1, size // 8)
        for _ in range(int(torch.randint(1, 4, (1,), generator=generator))):
            points = [tuple((torch.rand(2, generator=generator) * size).tolist())]
            for _ in range(int(torch.randint(2, 5, (1,), generator=generator))):
                angle = float(torch.rand(1, generator=generator)) * 2 * math.pi
                length = (0.2 + 0.3 * float(torch.rand(1, generator=generator))) * size
                x, y = points[-1]
                points.append((min(max(x + length * math.cos(angle), 0), size - 1),
                               min(max(y + length * math.sin(angle), 0), size - 1)))
            draw.line(points, fill=255, width=width, joint="curve")
        hole = torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255)[None]  # (1, S, S)
        if hole.sum() == 0 or hole.sum() == hole.numel():  # too short to cover a pixel, or covering all: a centre dot
            hole = torch.zeros_like(hole)
            hole[:, size // 2, size // 2] = 1
        return hole


def check_mask(values, name):
    """A UsageError unless the uint8 mask `values` is binary (only 0 and 255), marks a hole and leaves pixels known."""
    levels = torch.unique(values)
    if not set(levels.tolist()) <= {0, 255}:
        raise UsageError(f"mask '{name}' is not binary: it has {len(levels)} grey levels; save it with only black "
                         "(known) and white (to fill) pixels, e.g. as a 1-bit or 8-bit PNG without smoothing")
    if not (values == 255).any():
        raise UsageError(f"mask '{name}' is empty: no pixel is white, so there is nothing to fill; paint the region "
                         "to fill white")
    if (values == 255).all():
        raise UsageError(f"mask '{name}' covers every pixel: nothing of the image is known; leave the known region "
                         "black")


def read_mask(path, size):
    """A mask file as a hole mask (1, S, S) float (1: to fill), checked by `check_mask`, resized by nearest neighbour."""
    if not is_readable_image(path):
        raise UsageError(f"mask '{path}' is not a readable image: pass a .png or .jpg file (white: the hole)")
    with Image.open(path) as image:
        grey = image.convert("L")
    check_mask(torch.from_numpy(np.asarray(grey).copy()), path)
    grey = grey.resize((size, size), Image.NEAREST)
    return torch.from_numpy(np.asarray(grey, dtype=np.float32) / 255)[None]


# ----------------------------------------------------------------------------- the data set on the device

def without_random_augmentation(dataset):
    """(the data set with its random augmentation taken out, whether that was a random horizontal flip), or (None,
    False) when it cannot be (the reference's random crops). A flip commutes with ToTensor and Normalize, so
    DeviceData draws it on the device instead."""
    if isinstance(dataset, ClassDataset) and dataset.augment in ("flip", "reference"):
        if dataset.augment == "reference":
            return None, False
        fixed = copy.copy(dataset)
        fixed.base = copy.copy(dataset.base)
        fixed.base.transform = augmentation(dataset.image_size, "resize", dataset.channels)
        return fixed, True
    if isinstance(dataset, (Captioned, CaptionSubset)):
        base, flips = without_random_augmentation(dataset.base)
        if base is None:
            return None, False
        fixed = copy.copy(dataset)
        fixed.base = base
        return fixed, flips
    return dataset, False


def decode_pixels(pixels):
    """uint8 pixels -> float32 in [-1, 1] by the very operations of ToTensor and Normalize(0.5, 0.5): the same bits."""
    return pixels.float().div(255).sub(0.5).div(0.5)


def as_pixels(images):
    """Float images as uint8 pixels when decode_pixels gives them back bit for bit (8-bit files), else None."""
    if not images.is_floating_point() or images.dim() != 4:
        return None
    pixels = ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return pixels if torch.equal(decode_pixels(pixels), images) else None


def _item_bytes(item):
    """Bytes that one item takes in DeviceData: 8-bit images as uint8, other tensors as they are, ints as int64."""
    total = 0
    for value in item:
        if torch.is_tensor(value):
            pixels = as_pixels(value[None])
            total += value.numel() * (1 if pixels is not None else value.element_size())
        elif isinstance(value, int):
            total += 8
    return total


def estimated_bytes(dataset):
    """What `DeviceData.load(dataset)` will take on the device, from its first item."""
    if isinstance(dataset, TensorDataset):
        return sum(t.numel() * t.element_size() for t in dataset.tensors)
    return len(dataset) * _item_bytes(dataset[0])


class DeviceData(Dataset):
    """A data set held on one device as tensors, whose batches are indexed there: no DataLoader workers.

    Its items are their own indices, so a DataLoader over it, prepared by Accelerate like the data set's own (seeded
    order, shards per process, skipped batches on --resume), yields the very batches of indices that the data set's
    would have yielded; `fetch` turns one into the batch. Images that are 8-bit pixels (files through ToTensor and
    Normalize) are stored as uint8, 4x smaller, and decoded to the same float32 values. With `flips`, each image is
    mirrored with probability 1/2, drawn on the device from the seed `fetch` is given. Captions stay on the host.
    """

    def __init__(self, fields, device, flips=False):
        self.fields, self.device, self.flips = fields, torch.device(device), flips  # tensors on device, or str lists
        self.generator = torch.Generator(self.device) if flips else None

    @classmethod
    @torch.no_grad()
    def load(cls, dataset, device, flips=False, num_workers=0, batch_size=500):
        """Read every item of a deterministic data set once (through a DataLoader with `num_workers`)."""
        if isinstance(dataset, TensorDataset):  # contiguous as the DataLoader's batches are: randn_like follows layouts
            return cls([t.to(device).contiguous() for t in dataset.tensors], device, flips)
        columns = None
        for batch in DataLoader(dataset, batch_size=batch_size, num_workers=num_workers):
            columns = columns or [[] for _ in batch]
            for column, values in zip(columns, batch):
                column.append(values)
        fields = []
        for column in columns:
            if not torch.is_tensor(column[0]):
                fields.append([value for values in column for value in values])  # captions
                continue
            pixels = [as_pixels(values) for values in column]
            if all(p is not None for p in pixels):
                column = pixels
            fields.append(torch.cat(column).to(device))
        return cls(fields, device, flips)

    def __len__(self):
        return len(self.fields[0])

    def __getitem__(self, index):
        return index

    @property
    def nbytes(self):
        return sum(f.numel() * f.element_size() for f in self.fields if torch.is_tensor(f))

    def fetch(self, indices, seed):
        """The batch of the (host) `indices`, as the data set's DataLoader gives it, on the device."""
        on_device = indices.to(self.device, non_blocking=True)
        batch = []
        for field in self.fields:
            if not torch.is_tensor(field):
                batch.append([field[i] for i in indices.tolist()])
                continue
            values = field[on_device]
            batch.append(decode_pixels(values) if values.dtype == torch.uint8 else values)
        if self.flips:
            self.generator.manual_seed(seed)
            flip = torch.rand(len(indices), generator=self.generator, device=self.device) < 0.5
            batch[0] = torch.where(flip.view(-1, 1, 1, 1), batch[0].flip(-1), batch[0])
        return batch


def free_memory(device):
    """Bytes free on `device`: the GPU's for cuda, the host's otherwise (8 GiB where the system does not say)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def data_on_device(dataset, device, wanted=None, num_workers=0):
    """(DeviceData, or None for the DataLoader, and a line saying which and why, for the start of the run).

    wanted None: on the device when the data set takes at most a quarter of the device's free memory and its
    augmentation can be drawn there; True: on the device in any case (a UsageError where it cannot); False: never.
    """
    device = torch.device(device)
    loader = f"data: a DataLoader with {num_workers} worker processes"
    if wanted is False:
        return None, f"{loader} (--data_on_device false)"
    fixed, flips = without_random_augmentation(dataset)
    if fixed is None:
        if wanted:
            raise UsageError("--data_on_device true cannot draw the reference's random crops on the device: use "
                             "--augment flip or resize, or --data_on_device false")
        return None, f"{loader}: the reference's random crops (--augment reference) are drawn there"
    needed, budget = estimated_bytes(fixed), free_memory(device) // 4
    if wanted is None and needed > budget:
        return None, (f"{loader}: the data set needs {needed / 2**30:.1f} GiB, more than a quarter of the free "
                      f"memory on {device} ({budget / 2**30:.1f} GiB); --data_on_device true holds it there anyway")
    held = DeviceData.load(fixed, device, flips, num_workers)
    kinds = ", ".join(str(f.dtype).replace("torch.", "") if torch.is_tensor(f) else "captions" for f in held.fields)
    return held, (f"data: {len(held)} items held on {device} ({held.nbytes / 2**20:.0f} MiB: {kinds}"
                  f"{'; flips drawn there' if flips else ''}), batches indexed there without DataLoader workers "
                  f"(--data_on_device {str(wanted).lower()}; false: the DataLoader)")
