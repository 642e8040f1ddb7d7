"""The first stage of latent diffusion, shared by every script: a frozen diffusers AutoencoderKL between pixels and
the scaled latents that the U-Nets learn.

train_vae.py makes such a VAE (models/<run_name>/vae); train_sd.py, ddpm.py and ddpm_conditional.py train in its
latents with `--vae PATH` (or a Hub id, such as Stability's VAE), and sample.py, evaluate.py and visualize.py
decode the samples of those runs. `--vae none` is pixel space: the same code, with the identity as the VAE.
"""
import hashlib
import json
import os

import torch

from data import cache_key, load_or_build_cache
from utils import UsageError, from_pretrained

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


# ----------------------------------------------------------------------------- the latent cache
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
