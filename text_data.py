"""Captioned images for train_sd.py: the data sets, the latent cache, and tiny offline models.

Every data set here yields (image in [-1, 1], caption string) and has `caption(i)`, so the captions can be
read without decoding any image. The latent cache stores what the frozen VAE and text encoder make of a
data set, so training can skip both networks.
"""
import hashlib
import json
import os
import warnings

import torch
import torchvision
from torch.utils.data import DataLoader, Dataset

from utils import UsageError, augmentation, atomic_save, get_dataset, load_checkpoint, load_rgb

CACHE_VERSION = 1  # bump when the cache's layout changes, so old files are never read


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

    def __init__(self, path, image_size, size=None):
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
        self.transform = augmentation(image_size)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        name, caption = self.items[index]
        return self.transform(load_rgb(os.path.join(self.path, name))), caption

    def caption(self, index):
        return self.items[index][1]


class Captioned(Dataset):
    """A utils.get_dataset data set (shapes, cifar10, imagefolder) with its caption instead of its label."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        return self.base[index][0], self.base.caption(index)

    def caption(self, index):
        return self.base.caption(index)


def get_caption_dataset(name, path, image_size, seed=0, size=None):
    """Items (image (3, S, S) in [-1, 1], caption). `name`: shapes | cifar10 | imagefolder | captions."""
    if name == "captions":
        return CaptionFolder(path, image_size, size)
    if name not in ("shapes", "cifar10", "imagefolder"):
        raise UsageError(f"unknown dataset '{name}': choose shapes, cifar10, imagefolder or captions")
    return Captioned(get_dataset(name, path, image_size, seed=seed, size=size))


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


# ----------------------------------------------------------------------------- latent cache

def cache_key(**fields):
    """A short hash of everything the cached tensors depend on; any change gives another key."""
    text = json.dumps({"version": CACHE_VERSION, **fields}, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@torch.no_grad()
def build_cache(dataset, encode_images, encode_prompts, batch_size, num_workers=0):
    """Encode every image once (posterior mean and std) and every distinct caption once.

    Returns {"mean", "std": (N, C, h, w) float32, "caption_index": (N,) long into "captions" (U strings),
    "contexts": (U, ...) text states}. Captions are stored once each: CIFAR-10 has 10 for 50000 images.
    """
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    means, stds, captions = [], [], []
    for images, batch_captions in loader:
        mean, std = encode_images(images)
        means.append(mean.cpu())
        stds.append(std.cpu())
        captions += list(batch_captions)
    distinct = list(dict.fromkeys(captions))
    position = {caption: i for i, caption in enumerate(distinct)}
    contexts = torch.cat([encode_prompts(distinct[i:i + batch_size]).cpu()
                          for i in range(0, len(distinct), batch_size)])
    return {"mean": torch.cat(means), "std": torch.cat(stds), "captions": distinct, "contexts": contexts,
            "caption_index": torch.tensor([position[c] for c in captions], dtype=torch.long)}


def load_or_build_cache(path, dataset, encode_images, encode_prompts, batch_size, num_workers=0):
    """Read the cache at `path` (weights_only), or build it and write it atomically. Returns (cache, hit)."""
    if os.path.isfile(path):
        try:
            return load_checkpoint(path), True
        except UsageError as exc:
            warnings.warn(f"re-encoding the unreadable latent cache {path}: {exc}", stacklevel=2)
    cache = build_cache(dataset, encode_images, encode_prompts, batch_size, num_workers)
    atomic_save(cache, path)
    return cache, False


# ----------------------------------------------------------------------------- tiny offline models

def _tiny_vocab(words):
    """A CLIP BPE vocabulary of letters and digits, with merges until each word is one token."""
    from transformers import CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in [c for c in letters] + [c + "</w>" for c in letters]:
        vocab[token] = len(vocab)
    merges = []
    for _ in range(10 * len(words)):
        tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
        split = [tokenizer.tokenize(w) for w in words]
        unmerged = [tokens for tokens in split if len(tokens) > 1]
        if not unmerged:
            return tokenizer
        pair = tuple(unmerged[0][:2])
        merges.append(pair)
        vocab.setdefault(pair[0] + pair[1], len(vocab))
    raise RuntimeError("the tiny vocabulary did not converge")


def make_tiny_models(directory, vae_channels=(8, 16), hidden_size=32, max_length=16):
    """Write a tiny random AutoencoderKL to DIR/vae and a tiny CLIP text encoder with its tokenizer (words of
    the shapes captions) to DIR/text_encoder. For tests and offline demos: the VAE is untrained, so it does
    not reconstruct; the text encoder is random but gives distinct embeddings to distinct captions."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from utils import SHAPE_CLASSES

    torch.manual_seed(0)
    words = sorted({w for color, _, shape in SHAPE_CLASSES for w in ("a", color, shape, "photo", "of")})
    tokenizer = _tiny_vocab(words)
    tokenizer.model_max_length = max_length
    config = CLIPTextConfig(hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=2 * hidden_size, vocab_size=len(tokenizer),
                            max_position_embeddings=max_length, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    text_dir = os.path.join(directory, "text_encoder")
    CLIPTextModel(config).save_pretrained(text_dir)
    tokenizer.save_pretrained(text_dir)
    blocks = len(vae_channels)
    vae = AutoencoderKL(block_out_channels=tuple(vae_channels), down_block_types=("DownEncoderBlock2D",) * blocks,
                        up_block_types=("UpDecoderBlock2D",) * blocks, latent_channels=4, layers_per_block=1,
                        norm_num_groups=min(4, vae_channels[0]), sample_size=16)
    vae.save_pretrained(os.path.join(directory, "vae"))
    return os.path.join(directory, "vae"), text_dir
