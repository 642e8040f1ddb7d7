"""The frozen networks of latent diffusion: the VAE between pixels and scaled latents, the CLIP text encoder, and
the cache of what they make of a data set.

A frozen diffusers AutoencoderKL maps images to the scaled latents that the networks learn: train_vae.py makes such
a VAE (models/<run_name>/vae); train_sd.py, ddpm.py and ddpm_conditional.py train in its latents with `--vae PATH`
(or a Hub id, such as Stability's VAE), and sample.py, evaluate.py and visualize.py decode the samples of those
runs. `--vae none` is pixel space: the same code, with the identity as the VAE. train_sd.py's captions go through a
frozen CLIP text encoder. With --cache_latents both run once per image and caption (`open_cache`).
`make_tiny_models` writes a tiny random VAE and CLIP for tests and offline demos.
"""
import hashlib
import json
import os
import warnings

import torch
from torch.utils.data import DataLoader

from data import COLOR_NAMES, SHAPE_NAMES
from utils import UsageError, atomic_save, from_pretrained, load_checkpoint

CACHE_VERSION = 2  # bump when the cache's layout changes, so old files are never read

PIXEL_SPACE = "none"
DTYPES = {"no": torch.float32, None: torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # None: not resolved
VAE_FIX = ("pass the vae/ folder that train_vae.py writes (models/<run_name>/vae), a Hub id such as "
           "stabilityai/sd-vae-ft-mse, or none for pixel space")


def is_pixel_space(name):
    return name is None or str(name).strip().lower() == PIXEL_SPACE


def _local_folder(name):
    """The folder `name` names on this machine, or None when it is a Hub id."""
    path = os.path.expanduser(name)
    return path if os.path.isdir(path) or name.startswith((".", "/", "~")) else None


def check_vae_folder(name):
    """A local --vae must be a folder of save_pretrained of an AutoencoderKL: diffusers would load any other model's
    folder (a U-Net's, a text encoder's) as a VAE with random weights, and say so only in a warning."""
    folder = _local_folder(name)
    if folder is None or not os.path.isdir(folder):  # from_pretrained says that a folder is missing
        return
    config_file = os.path.join(folder, "config.json")
    if not os.path.isfile(config_file):
        found = "it holds no config.json"
    else:
        try:
            with open(config_file, encoding="utf-8") as f:
                kind = json.load(f).get("_class_name")
        except (OSError, ValueError, AttributeError):
            kind = None
        if kind == "AutoencoderKL":
            return
        found = f"its config.json is a {kind}'s" if kind else "its config.json is no diffusers model's"
    raise UsageError(f"--vae '{name}' is not a diffusers VAE folder ({found}, not an AutoencoderKL's): {VAE_FIX}")


def load_vae(name, device="cpu", dtype=torch.float32):
    """The AutoencoderKL `name` (Hub id or local folder), frozen: eval mode, no gradients; None for pixel space."""
    from diffusers import AutoencoderKL

    if is_pixel_space(name):
        return None
    check_vae_folder(name)
    vae = from_pretrained(AutoencoderKL, name, torch_dtype=dtype)
    if "scaling_factor" in (vae.config.get("_use_default_values") or ()):  # diffusers filled in 0.18215, SD's
        raise UsageError(f"--vae '{name}' has no scaling_factor in its config.json, so the scale of its latents is "
                         "unknown: train the VAE with train_vae.py, which measures the scale and stores it")
    return vae.to(device).eval().requires_grad_(False)


def vae_digest(name):
    """What identifies the VAE `name`: a hash of a local folder's config and weights (a VAE retrained into the same
    folder gets another), else the Hub id; None for pixel space."""
    if is_pixel_space(name):
        return None
    folder = _local_folder(name)
    if folder is None or not os.path.isdir(folder):
        return name
    digest = hashlib.sha256()
    for file in sorted(os.listdir(folder)):
        if file == "config.json" or file.endswith((".safetensors", ".bin")):
            digest.update(file.encode())
            with open(os.path.join(folder, file), "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()[:16]


class Latents:
    """The frozen VAE: pixels in [-1, 1] <-> scaled latents (z - shift_factor) * scaling_factor. With vae=None it
    is pixel space (the identity).

    image_channels: the images' channels. Grey images (1) are repeated to the VAE's input channels for encoding, and
    its decoded images averaged back to grey.
    """

    def __init__(self, vae, image_channels=3):
        self.vae = vae
        self.image_channels = image_channels
        self.channels = image_channels if vae is None else vae.config.latent_channels
        self.factor = 1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)
        self.scale = 1.0 if vae is None else vae.config.scaling_factor
        self.shift = 0.0 if vae is None else (getattr(vae.config, "shift_factor", None) or 0.0)

    def latent_size(self, image_size):
        """The side of the latents of image_size px images; a UsageError unless the U-Net can halve it 3 times."""
        if image_size % (8 * self.factor):
            multiple = 8 * self.factor
            raise UsageError(f"image_size {image_size} is not divisible by {multiple}: the VAE shrinks it "
                             f"{self.factor}x and the U-Net halves it 3 times; use a multiple of {multiple}")
        return image_size // self.factor

    def clip_x0(self, wanted):
        """Whether samplers clip the predicted x_0 to [-1, 1]: `wanted`, or when None, in pixel space only (a VAE's
        latents have no such range)."""
        return self.vae is None if wanted is None else wanted

    @torch.no_grad()
    def encode(self, images):
        """(B, image_channels, H, W) -> mean and std of the scaled posterior, (B, C, H/f, W/f) float32."""
        if self.vae is None:
            return images.float(), torch.zeros_like(images, dtype=torch.float32)
        images = images.expand(-1, self.vae.config.in_channels, -1, -1) if images.shape[1] == 1 else images
        dist = self.vae.encode(images.to(self.vae.device, self.vae.dtype)).latent_dist
        return (dist.mean.float() - self.shift) * self.scale, dist.std.float() * self.scale

    @torch.no_grad()
    def decode(self, latents):
        """Scaled latents (B, C, h, w) -> pixels (B, image_channels, h*f, w*f) in [-1, 1]."""
        if self.vae is not None:
            latents = self.vae.decode((latents / self.scale + self.shift).to(self.vae.dtype)).sample
            if self.image_channels == 1:
                latents = latents.mean(dim=1, keepdim=True)  # (B, 3, H, W) -> (B, 1, H, W)
        return latents.float().clamp(-1, 1)


def load_latents(name, device="cpu", mixed_precision=None, image_channels=3):
    """Latents of the VAE `name` ('none': pixel space), in the training precision, for images of image_channels."""
    return Latents(load_vae(name, device, DTYPES[mixed_precision]), image_channels)


def draw_latents(mean, std):
    """x_0 ~ N(mean, std^2): a draw from the VAE's posterior, what latent diffusion trains on (LDM)."""
    return mean + std * torch.randn_like(mean)


def run_latents(saved, c_in, device):
    """The Latents of a saved run config (its `vae`; pixel space for runs without one), checked against the
    network's input channels `c_in`. The images are c_in's in pixel space, else the saved `channels` (RGB for a
    run saved before --channels)."""
    name = saved.get("vae", PIXEL_SPACE)
    latents = load_latents(name, device, image_channels=c_in if is_pixel_space(name) else saved.get("channels") or 3)
    if latents.channels != c_in:
        raise UsageError(f"the run's VAE '{saved.get('vae')}' has {latents.channels} latent channels but its U-Net "
                         f"takes {c_in}: pass a checkpoint of a run trained on that VAE")
    return latents


# ----------------------------------------------------------------------------- the text encoder
class TextEncoder:
    """The frozen CLIP text encoder of train_sd.py: prompts -> token states (B, L, D) for cross_attention, or the pooled
    embedding (B, D) for add."""

    def __init__(self, tokenizer, model, conditioning):
        self.tokenizer, self.model, self.conditioning = tokenizer, model, conditioning
        self.dim = model.config.hidden_size

    def tokenize(self, prompts):
        """Token ids (B, model_max_length), padded; longer prompts are cut, with a warning."""
        limit = self.tokenizer.model_max_length
        too_long = [p for p, ids in zip(prompts, self.tokenizer(list(prompts)).input_ids) if len(ids) > limit]
        if too_long:
            warnings.warn(f"{len(too_long)} prompt(s) longer than the text encoder's {limit} tokens are truncated, "
                          f"e.g. '{too_long[0][:60]}...'", stacklevel=3)
        return self.tokenizer(list(prompts), padding="max_length", max_length=limit, truncation=True,
                              return_tensors="pt").input_ids

    @torch.no_grad()
    def __call__(self, prompts):
        out = self.model(input_ids=self.tokenize(prompts).to(self.model.device))
        states = out.last_hidden_state if self.conditioning == "cross_attention" else out.pooler_output
        return states.float()


def load_text_encoder(name, conditioning, device="cpu", mixed_precision=None):
    """The frozen TextEncoder of `name` (a Hub id, or a folder holding CLIPTextModel and its tokenizer): eval mode, no
    gradients, in the training precision; its states for `conditioning` (cross_attention: tokens, add: pooled)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = from_pretrained(CLIPTokenizer, name)
    model = from_pretrained(CLIPTextModel, name, dtype=DTYPES[mixed_precision])
    return TextEncoder(tokenizer, model.to(device).eval().requires_grad_(False), conditioning)



class CaptionStates:
    """The text encoder, remembering the states of each caption it encodes (up to `limit` captions), so that a batch
    encodes only the captions it is the first to hold: CIFAR-10 has 10, and the tokenizer is slow.

    Called with B captions, it returns the (B, ...) states that `text` would, in one encoder call for the new ones.
    """

    def __init__(self, text, limit=1024):
        self.text, self.limit, self.states = text, limit, {}  # CLIP-L: 1024 captions' states take 240 MB

    def __call__(self, captions):
        new = [c for c in dict.fromkeys(captions) if c not in self.states]
        encoded = dict(zip(new, self.text(new))) if new else {}  # the new captions' states, one row each
        for caption in new[:max(0, self.limit - len(self.states))]:
            self.states[caption] = encoded[caption]
        return torch.stack([encoded[c] if c in encoded else self.states[c] for c in captions])


# ----------------------------------------------------------------------------- the latent cache
def cache_key(**fields):
    """A short hash of everything the cached tensors depend on; any change gives another key."""
    text = json.dumps({"version": CACHE_VERSION, **fields}, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@torch.no_grad()
def build_cache(dataset, encode_images, encode_prompts, batch_size, num_workers=0):
    """Encode every image once (posterior mean and std) and every distinct caption once.

    Returns {"mean", "std": (N, C, h, w) float32, "caption_index": (N,) long into "captions" (U strings),
    "contexts": (U, ...) text states}. Captions are stored once each: CIFAR-10 has 10 for 50000 images.
    With encode_prompts None the data set's items are (image, class label), and the labels are stored as "label".
    """
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    means, stds, captions = [], [], []
    for images, batch_captions in loader:
        mean, std = encode_images(images)
        means.append(mean.cpu())
        stds.append(std.cpu())
        captions += list(batch_captions)
    if encode_prompts is None:
        return {"mean": torch.cat(means), "std": torch.cat(stds), "label": torch.as_tensor(captions, dtype=torch.long)}
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


def latent_cache_path(cfg, dataset, channels=3, **fields):
    """cfg.cache_dir/<key>.pt, the latent cache of `dataset` through cfg.vae. The key hashes the VAE (its digest too,
    so a VAE retrained into the same folder is encoded anew), the images and their `channels`, the precision, and
    `fields`: whatever else the cache depends on (the text encoder of train_sd.py, the augmentation of a class data
    set)."""
    grey = {"channels": channels} if channels != 3 else {}  # RGB caches keep their keys
    key = cache_key(vae=cfg.vae, vae_digest=vae_digest(cfg.vae), image_size=cfg.image_size, dataset=cfg.dataset,
                    dataset_path=os.path.abspath(cfg.dataset_path), dataset_size=len(dataset), seed=cfg.seed,
                    precision=cfg.mixed_precision, **grey, **fields)
    return os.path.join(cfg.cache_dir, f"{key}.pt")


def open_cache(accelerator, path, dataset, latents, encode_prompts, batch_size, num_workers=0):
    """The latent cache at `path`, read, or built by the main process (data.build_cache) while the others wait."""
    with accelerator.main_process_first():  # one process encodes, the others read its file
        cache, hit = load_or_build_cache(path, dataset, latents.encode, encode_prompts, batch_size, num_workers)
    accelerator.print(f"latent cache {path}: {'read' if hit else 'written'}")
    return cache


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

    torch.manual_seed(0)
    words = sorted({"a", "photo", "of", *COLOR_NAMES, *SHAPE_NAMES})
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
