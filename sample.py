"""Generate images from any checkpoint of this repository or of the reference repository.

    python sample.py --ckpt models/R/ema_ckpt.pt --labels 0,1,2 --n_per_label 10 --cfg_scale 3 --out grid.png
    python sample.py --ckpt unconditional_ckpt.pt --n 16 --sampler ddpm   (the reference's 999-step Alg. 2)
    python sample.py --ckpt models/R/ema_ckpt.pt --inpaint photo.png --mask hole.png     (RePaint, any checkpoint)
    python sample.py --ckpt models/SR/ema_ckpt.pt --condition low_res.png    (ddpm_img2img.py: a folder works too)

The network is rebuilt from the state_dict itself: it is class-conditional iff it has a label embedding
(num_classes = its rows), its conditioning mode (add, concat, xattn, adanorm) is the saved config's and
matches the weights it has, and its widths come from `inc` and `outc`. A DiT (`backbone: dit` in the saved
config) takes its width, depth and classes from its weights and its patch size and heads from the config. The
schedule and image size come from the training config saved with the run (`config.json` beside the checkpoint,
or the "config" of a `training_state.pt`); the reference's released checkpoints have none and get its 64 px,
T = 1000, linear betas 1e-4..0.02. A run trained in a VAE's latents (--vae) samples latents and decodes
them through that VAE.

A ddpm_img2img.py checkpoint (its saved config has a `task`) is conditioned on an image: --condition gives it, a
file or a folder of them, as the task takes it: the low-resolution image (image_size / scale px), the image to fill
with --mask (inpaint), the grey image (colorize); one grid column per input, rows: input, then the outputs. Any
other pixel-space checkpoint inpaints by RePaint (ddpm.Diffusion, Lugmayr et al. 2022): --inpaint IMAGE --mask MASK,
white in the mask where to fill.
"""
import dataclasses
import json
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from data import GREY_MODES, read_mask
from ddpm import DEFAULT_STEPS, SAMPLERS, Diffusion
from ddpm_img2img import Degradation, condition_channels, inpaint_condition, save_rows
from latents import Latents, is_pixel_space, run_latents
from modules import DIT_SIZES, DiT, UNet, UNet_conditional
from utils import (UsageError, arg, load_checkpoint, load_rgb, load_state_dict_strict, parse_config, pick_device,
                   read_json_object, run_cli, save_images, save_individual, strip_wrapper_prefixes, to_uint8)


# ----------------------------------------------------------------------------- options
@dataclass
class Config:
    ckpt: str | None = arg(None, "checkpoint: ckpt.pt / ema_ckpt.pt / training_state.pt, or a reference state_dict")
    labels: str | None = arg(None, "comma-separated class ids, one grid row each, e.g. 0,1,2 (None: all classes)")
    n_per_label: int = arg(10, "images per label (conditional model): the width of each grid row")
    n: int = arg(16, "images in all (unconditional model)")
    cfg_scale: float = arg(3.0, "guidance: 0 = conditional only, 1 = same in one batch, >1 = stronger")
    out: str = arg("grid.png", "the grid, .png or .jpg; replaced atomically if it exists")
    save_individual: str | None = arg(None, "also write each image as DIR/<label>_<i>.png (label 0 if unconditional)")
    seed: int = arg(0, "seed of the noise: the same seed gives the same images")
    sampler: str | None = arg(None, "ddpm (999-step Alg. 2) | ddim | dpm++ | dpm++ode | euler_a; None: dpm++, or ddpm "
                                    "for --inpaint (RePaint runs in Alg. 2)")
    steps: int | None = arg(None, "network steps of the sampler (None: its default, 20 for dpm++; for --inpaint, "
                                  "RePaint's chain: all 999, or this many evenly spaced)")
    clip_x0: bool | None = arg(None, "clip the predicted x_0 to [-1, 1] at each step (None: the run's setting, "
                                     "else true; false: the reference's sampler)")
    image_size: int | None = arg(None, "pixels, divisible by 8 (None: the training size, or 64)")
    weights: str = arg("ema", "weights of a training_state.pt: ema | model (ema_ckpt.pt holds only the EMA's, ckpt.pt "
                              "only the model's)")
    device: str = arg("auto", "auto (cuda, then mps, then cpu) | cuda | mps | cpu")
    condition: str | None = arg(None, "ddpm_img2img.py checkpoint: the input image, or a folder of them: the "
                                      "low-resolution image (superres), the image to fill with --mask (inpaint), the "
                                      "grey image (colorize)")
    inpaint: str | None = arg(None, "RePaint with a ddpm.py / ddpm_conditional.py checkpoint: the image, or a folder "
                                    "of them, whose --mask region is filled")
    mask: str | None = arg(None, "the mask of --inpaint, or of --condition for an inpaint checkpoint: white where to "
                                 "fill, black where the image is kept")
    jump_length: int = arg(10, "RePaint: levels of each jump back up (Lugmayr et al. 2022: 10)")
    jump_n_sample: int = arg(10, "RePaint: times each stretch of jump_length levels is gone down (1: no resampling; "
                                 "the network runs about this many times as often)")
    reconstruction_guidance: float = arg(2.0, "RePaint: step zeta along the gradient that pulls the network's "
                                              "predicted known pixels to the given ones (MCG; 0: RePaint alone, "
                                              "without the network's backward pass)")
    n_per_input: int = arg(1, "--condition / --inpaint: outputs per input image, one grid row each")


# The reference repository's settings, for checkpoints without a saved config.
REFERENCE_IMAGE_SIZE = 64
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def validate(cfg):
    """One readable error for each option the run cannot use, before any file is read."""
    if cfg.ckpt is None:
        raise UsageError("no checkpoint given: pass --ckpt models/<run>/ema_ckpt.pt (or a reference .pt file)")
    if cfg.cfg_scale < 0:
        raise UsageError(f"cfg_scale {cfg.cfg_scale} is negative: use 0 (no guidance) or a value > 0, e.g. 3")
    if cfg.sampler not in (None, *SAMPLERS):
        raise UsageError(f"sampler '{cfg.sampler}' is unknown: use one of {', '.join(SAMPLERS)}")
    if cfg.inpaint is not None:
        if cfg.mask is None:
            raise UsageError("--inpaint needs --mask MASK: a black-and-white image of the same size, white where to "
                             "fill")
        if cfg.sampler not in (None, "ddpm"):
            raise UsageError(f"RePaint runs inside DDPM Alg. 2, not with --sampler {cfg.sampler}: pass --sampler ddpm "
                             "(or leave it out)")
        if cfg.condition is not None:
            raise UsageError("--inpaint (RePaint, any checkpoint) and --condition (a ddpm_img2img.py checkpoint) "
                             "exclude each other: pass one")
    if cfg.mask is not None and cfg.inpaint is None and cfg.condition is None:
        raise UsageError("--mask goes with --inpaint IMAGE (RePaint) or --condition IMAGE (an inpaint checkpoint): "
                         "pass the image too")
    for name in ("n_per_label", "n", "steps", "jump_length", "jump_n_sample", "n_per_input"):
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            raise UsageError(f"{name} {value} must be positive")
    if not cfg.reconstruction_guidance >= 0:
        raise UsageError(f"reconstruction_guidance {cfg.reconstruction_guidance} must be >= 0 (0: RePaint alone)")
    if cfg.image_size is not None and (cfg.image_size <= 0 or cfg.image_size % 8):
        raise UsageError(f"image_size {cfg.image_size} is not divisible by 8: the U-Net halves it 3 times; "
                         "use e.g. 16, 32 or 64")
    if not cfg.out.lower().endswith(IMAGE_EXTENSIONS):
        raise UsageError(f"cannot save the grid as '{cfg.out}': use a .png or .jpg file name")
    if cfg.weights not in ("ema", "model"):
        raise UsageError(f"weights '{cfg.weights}' is unknown: use ema or model")


def parse_labels(text):
    """'0,1, 2' -> [0, 1, 2]; anything else is a UsageError."""
    try:
        labels = [int(item) for item in text.split(",")]
    except ValueError:
        raise UsageError(f"--labels '{text}' is not a comma-separated list of class ids: e.g. --labels 0,1,2") from None
    return labels


# ----------------------------------------------------------------------------- checkpoint -> network
def _is_state_dict(obj):
    return isinstance(obj, dict) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _config_beside(path):
    """The training config saved next to a checkpoint (models/<run>/config.json), or {} if there is none."""
    config_path = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
    if not os.path.isfile(config_path):
        return {}
    return read_json_object(config_path, "the config beside the checkpoint")


def read_checkpoint(path, weights="ema"):
    """(state_dict with plain key names, saved training config or {}) from any supported checkpoint file."""
    obj = load_checkpoint(path)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):  # training_state.pt
        if weights not in obj:
            raise UsageError(f"checkpoint '{path}' holds no '{weights}' weights: use --weights model")
        state_dict, saved = obj[weights], obj.get("config") or _config_beside(path)
    else:
        if weights == "model" and os.path.basename(path) == "ema_ckpt.pt":  # else --weights would be ignored
            raise UsageError(f"'{path}' holds the EMA weights only: for the model's, pass ckpt.pt beside it, or "
                             "training_state.pt with --weights model")
        state_dict, saved = obj, _config_beside(path)
    if not _is_state_dict(state_dict):
        raise UsageError(f"checkpoint '{path}' is not a model state_dict (a dict of tensors): pass ckpt.pt, "
                         "ema_ckpt.pt or training_state.pt")
    return {strip_wrapper_prefixes(k): v for k, v in state_dict.items()}, saved


def infer_conditioning(state_dict):
    """How a conditional U-Net reads its label, from the weights only that mode has (see UNet_conditional)."""
    if "label_map.weight" in state_dict:
        return "concat"
    if "label_tokens.weight" in state_dict:
        return "xattn"
    if "inc.modulation.1.weight" in state_dict:
        return "adanorm"
    return "add"


def infer_dit(state_dict, path, saved):
    """A DiT's constructor arguments: its width, depth, channels and classes from the shapes of its weights, its
    patch size and heads from the saved config's `patch_size` and `dit_size`, which must agree with the weights
    (a pixel-space DiT reads patches of the saved `channels`, RGB for a run saved before --channels; a latent run's
    reads its VAE's latent channels, which run_latents checks)."""
    size, patch = saved.get("dit_size"), saved.get("patch_size")
    if size not in DIT_SIZES or not isinstance(patch, int) or patch <= 0:
        raise UsageError(f"'{path}' holds a DiT, but no saved config names its dit_size and patch_size: keep the "
                         "run's config.json beside the checkpoint (or pass its training_state.pt)")
    depth, dim, heads = DIT_SIZES[size]
    embed = state_dict["patch_embed.weight"]  # (dim, patch * patch * c_in)
    blocks = {key.split(".")[1] for key in state_dict if key.startswith("blocks.")}
    per_patch = patch * patch
    channels = (saved.get("channels") or 3) if is_pixel_space(saved.get("vae")) else embed.shape[1] // per_patch
    if (len(blocks), embed.shape[0], embed.shape[1]) != (depth, dim, per_patch * channels):
        raise UsageError(f"'{path}' holds a DiT of depth {len(blocks)}, width {embed.shape[0]} and {embed.shape[1]} "
                         f"numbers per patch, but its saved config says {size} ({depth} blocks of width {dim}) "
                         f"with patch_size {patch} on {channels} channels: pass the checkpoint saved with that "
                         "config")
    arch = {"backbone": "dit", "c_in": embed.shape[1] // per_patch,
            "c_out": state_dict["out.weight"].shape[0] // per_patch, "num_classes": None,
            "conditioning": None, "dit_size": size, "patch_size": patch, "depth": depth, "dim": dim, "heads": heads,
            "time_dim": state_dict["time_mlp.0.weight"].shape[1]}
    if "class_emb.weight" in state_dict:  # (num_classes + 1, dim): the last row is the null class
        arch["num_classes"], arch["conditioning"] = state_dict["class_emb.weight"].shape[0] - 1, "add"
    return arch


def infer_network(state_dict, path="checkpoint", saved=None):
    """The network's constructor arguments, read from the shapes of its weights.

    The backbone is the saved config's `backbone` (a DiT: see infer_dit), and must be the one the weights hold.
    The U-Net's conditioning mode is the saved training config's `conditioning`; a checkpoint without one (the
    reference's) is read from its weights, which gives "add" for the reference's. A config that names
    another mode than the weights hold is an error.
    """
    saved = saved or {}
    backbone = "dit" if "patch_embed.weight" in state_dict else "unet"
    if saved.get("backbone", backbone) != backbone:
        raise UsageError(f"'{path}' holds a {backbone}, but its saved config says backbone '{saved['backbone']}': "
                         "pass the checkpoint saved with that config")
    if backbone == "dit":
        return infer_dit(state_dict, path, saved)
    for key in ("inc.double_conv.0.weight", "outc.weight", "down1.emb_layer.1.weight"):
        if key not in state_dict or state_dict[key].dim() < 2:
            raise UsageError(f"'{path}' is not a U-Net of this repository or the reference (no U-Net weight "
                             f"'{key}'): pass a ddpm.py / ddpm_conditional.py checkpoint")
    inc = state_dict["inc.double_conv.0.weight"]  # (base_channels, c_in, 3, 3)
    time_dim = state_dict["down1.emb_layer.1.weight"].shape[1]
    arch = {"c_in": inc.shape[1], "c_out": state_dict["outc.weight"].shape[0], "base_channels": inc.shape[0],
            "time_dim": time_dim, "num_classes": None, "conditioning": None}
    conditioning = infer_conditioning(state_dict)
    wanted = saved.get("conditioning", conditioning)
    if wanted != conditioning:
        raise UsageError(f"'{path}' holds a U-Net conditioned by '{conditioning}', but its saved config says "
                         f"'{wanted}': pass the checkpoint saved with that config")
    if conditioning == "concat":  # label_map: (num_classes, concat_channels), concatenated to the input
        label_map = state_dict["label_map.weight"]
        arch["num_classes"], arch["concat_channels"] = label_map.shape
        arch["c_in"] -= label_map.shape[1]
    elif conditioning == "xattn":  # label_tokens: (num_classes + 1, context_tokens * time_dim)
        label_tokens = state_dict["label_tokens.weight"]
        arch["num_classes"], arch["context_tokens"] = label_tokens.shape[0] - 1, label_tokens.shape[1] // time_dim
    elif "label_emb.weight" in state_dict:  # add, adanorm: (num_classes, time_dim)
        arch["num_classes"], arch["time_dim"] = state_dict["label_emb.weight"].shape
    if arch["num_classes"] is not None:
        arch["conditioning"] = conditioning
    if saved.get("task") is not None:  # ddpm_img2img.py: the condition image's channels follow those of x_t
        arch["cond_channels"] = arch["c_in"] - arch["c_out"]
        expected = condition_channels(saved["task"], arch["c_out"])
        if arch["cond_channels"] != expected:
            raise UsageError(f"'{path}' reads {arch['cond_channels']} condition channels, but its saved task "
                             f"'{saved['task']}' on {arch['c_out']}-channel images takes {expected}: pass the "
                             "checkpoint saved with that config")
        arch["c_in"] = arch["c_out"]
    # An attention block left out (UNet's attn_factors) has no weights: factor 1 is sa6, 2 sa1/sa5, 4 sa2/sa4, 8 sa3.
    blocks = {1: "sa6", 2: "sa1", 4: "sa2", 8: "sa3"}
    arch["attn_factors"] = tuple(f for f, block in blocks.items() if any(k.startswith(block + ".") for k in state_dict))
    return arch


def build_network(arch):
    """DiT for a DiT's arch; else UNet_conditional (in the checkpoint's conditioning mode) when it has classes, else
    UNet."""
    if arch.get("backbone") == "dit":
        return DiT(arch["c_in"], arch["c_out"], arch["num_classes"], arch["patch_size"], arch["depth"], arch["dim"],
                   arch["heads"], arch["time_dim"])
    if arch["num_classes"] is None and not arch.get("cond_channels"):
        return UNet(arch["c_in"], arch["c_out"], arch["time_dim"], arch["base_channels"],
                    attn_factors=arch["attn_factors"])
    options = {key: arch[key] for key in ("concat_channels", "context_tokens", "cond_channels") if key in arch}
    return UNet_conditional(arch["c_in"], arch["c_out"], arch["time_dim"], arch["num_classes"], arch["base_channels"],
                            arch["conditioning"] or "add", attn_factors=arch["attn_factors"], **options)


def describe(arch):
    """The network of an arch dict in words, e.g. "U-Net, base_channels 32" or "DiT dit-t/2"."""
    if arch.get("backbone") == "dit":
        return f"DiT {arch['dit_size']}/{arch['patch_size']}"
    reads = f", reading a {arch['cond_channels']}-channel condition image" if arch.get("cond_channels") else ""
    return f"U-Net, base_channels {arch['base_channels']}{reads}"


def class_names(ckpt, num_classes):
    """The run's class names (models/<run>/classes.json beside the checkpoint, or one folder up for the step
    checkpoints), or "class k" when it has none or they do not match the network."""
    folder = os.path.dirname(os.path.abspath(ckpt))
    for path in (os.path.join(folder, "classes.json"), os.path.join(os.path.dirname(folder), "classes.json")):
        if os.path.isfile(path):
            with open(path) as f:
                names = json.load(f)
            if isinstance(names, list) and len(names) == num_classes:
                return [str(name) for name in names]
    return [f"class {k}" for k in range(num_classes)]


def load_model(path, weights="ema"):
    """(network with the checkpoint's weights, its arch dict, the saved training config or {})."""
    state_dict, saved = read_checkpoint(path, weights)
    arch = infer_network(state_dict, path, saved)
    model = build_network(arch)
    load_state_dict_strict(model, state_dict, what=f"checkpoint '{path}'")
    return model.eval().requires_grad_(False), arch, saved


def make_diffusion(cfg, saved, c_in, device, latents=Latents(None)):
    """The schedule of the training run (or the reference's), at --image_size if given, on the run's latents."""
    image_size = cfg.image_size or saved.get("image_size", REFERENCE_IMAGE_SIZE)
    if not isinstance(image_size, int) or image_size <= 0 or image_size % 8:
        raise UsageError(f"the saved image_size {image_size!r} is not divisible by 8: pass --image_size 64")
    clip_x0 = getattr(cfg, "clip_x0", None)  # visualize.py calls this with a config without the field
    clip_x0 = latents.clip_x0(saved.get("clip_x0", True) if clip_x0 is None else clip_x0)
    return Diffusion.from_settings(saved, latents.latent_size(image_size), c_in, device, clip_x0=clip_x0)


# ----------------------------------------------------------------------------- sampling
def grid_labels(cfg, num_classes):
    """Class ids, one run of n_per_label per grid row; None for an unconditional model."""
    if num_classes is None:
        if cfg.labels is not None:
            raise UsageError("this checkpoint is unconditional: drop --labels (and use --n for the image count)")
        return None
    labels = parse_labels(cfg.labels) if cfg.labels is not None else list(range(num_classes))
    for label in labels:
        if not 0 <= label < num_classes:
            raise UsageError(f"label {label} is outside the model's {num_classes} classes: use 0..{num_classes - 1}")
    return torch.tensor(labels, dtype=torch.long).repeat_interleave(cfg.n_per_label)  # (L,) -> (L * n_per_label,)


# ----------------------------------------------------------------------------- image inputs: conditions, RePaint
def pixel_diffusion(cfg, saved, arch, device, what):
    """The run's Diffusion (make_diffusion) where images are what it samples; a run in a VAE's latents is a
    UsageError naming `what` needs pixels."""
    if run_latents(saved, arch["c_in"], device).vae is not None:
        raise UsageError(f"{what} work in pixel space, and this run trains in a VAE's latents: use a pixel-space "
                         "checkpoint")
    return make_diffusion(cfg, saved, arch["c_in"], device)


def read_inputs(path, size, channels, what):
    """(file names, images (K, channels, size, size) in [-1, 1]) of an image file or a folder of image files, each of
    which must be size x size pixels, grey for channels 1 and colour for 3; anything else is a UsageError."""
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise UsageError(f"{what} folder '{path}' holds no .png or .jpg images: put the input images in it")
    elif os.path.isfile(path):
        files = [path]
    else:
        raise UsageError(f"{what} '{path}' not found: pass an image file or a folder of them")
    images = []
    for file in files:
        try:
            with Image.open(file) as image:
                width, height, grey = image.width, image.height, image.mode in GREY_MODES
        except OSError:
            raise UsageError(f"{what} '{file}' is not a readable image: pass a .png or .jpg file") from None
        if (width, height) != (size, size):
            raise UsageError(f"{what} '{file}' is {width}x{height} pixels, but this checkpoint takes {size}x{size}: "
                             f"resize it to {size}x{size}")
        if grey != (channels == 1):
            kind, wanted, mode = ("grey", "RGB", "RGB") if grey else ("RGB", "grey", "L")
            raise UsageError(f"{what} '{file}' is {kind}, but this checkpoint takes {wanted} images ({channels} "
                             f"channel{'s' if channels > 1 else ''}): convert it, e.g. "
                             f"Image.open(path).convert('{mode}')")
        pixels = load_rgb(file).convert("L" if channels == 1 else "RGB")
        array = np.asarray(pixels, dtype=np.float32).reshape(size, size, channels)
        images.append(torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1)  # (S, S, C) -> (C, S, S)
    return [os.path.basename(f) for f in files], torch.stack(images)


def input_labels(cfg, num_classes, count, required):
    """The class ids of `count` inputs (count,): --labels gives one for all or one per input; None without
    --labels unless `required` (a class-conditional ddpm_img2img.py run, which never saw a condition without one)."""
    if num_classes is None:
        if cfg.labels is not None:
            raise UsageError("this checkpoint has no classes: drop --labels")
        return None
    if cfg.labels is None:
        if required:
            raise UsageError(f"this checkpoint reads the class beside the image: pass --labels with one class id "
                             f"(0..{num_classes - 1}) for all inputs, or one per input")
        return None
    labels = parse_labels(cfg.labels)
    if len(labels) not in (1, count) or not all(0 <= k < num_classes for k in labels):
        raise UsageError(f"--labels {cfg.labels}: give one class id in 0..{num_classes - 1} for all {count} inputs, "
                         "or one per input")
    return torch.tensor(labels * count if len(labels) == 1 else labels)


def sample_from_images(cfg, model, arch, saved, device):
    """--condition (a ddpm_img2img.py checkpoint) or --inpaint (RePaint): one grid column per input image, rows: the
    input, then n_per_input outputs (and bicubic for super-resolution). Returns the uint8 outputs."""
    task = saved.get("task") if arch.get("cond_channels") else None
    if task is not None and cfg.condition is None:
        raise UsageError(f"this checkpoint is conditioned on a {task} image: pass --condition IMAGE (or a folder of "
                         "them)" + (" with --mask MASK" if task == "inpaint" else ""))
    if task is None and cfg.condition is not None:
        raise UsageError("--condition is for ddpm_img2img.py checkpoints, and this one reads no image: to fill a "
                         "region with it, pass --inpaint IMAGE --mask MASK (RePaint)")
    if task is not None and cfg.inpaint is not None:
        raise UsageError(f"this checkpoint is conditioned on a {task} image: pass it with --condition, not --inpaint")
    if (task == "inpaint") != (cfg.mask is not None) and cfg.inpaint is None:
        raise UsageError("an inpaint checkpoint needs --mask MASK beside --condition" if task == "inpaint" else
                         f"this {task} checkpoint takes no mask: drop --mask")
    diffusion = pixel_diffusion(cfg, saved, arch, device, "--inpaint and --condition")
    size, channels = diffusion.img_size, arch["c_out"]
    degradation = Degradation.from_settings({**saved, "image_size": size}) if task is not None else None
    holes = read_mask(cfg.mask, size)[None] if cfg.mask is not None else None  # (1, 1, S, S): 1 where to fill
    extra = {}
    if task == "superres":
        names, low = read_inputs(cfg.condition, size // degradation.scale, channels, "--condition image")
        cond = degradation.upsample(low)
        shown = [(f"input ({size // degradation.scale} px)", F.interpolate(low, scale_factor=degradation.scale)),
                 ("bicubic", cond)]
    elif task is not None:
        names, images = read_inputs(cfg.condition, size, 1 if task == "colorize" else channels, "--condition image")
        cond = images if task == "colorize" else inpaint_condition(images, holes.expand(len(images), -1, -1, -1))
        shown = [("input", cond[:, :channels])]
    else:
        names, images = read_inputs(cfg.inpaint, size, channels, "--inpaint image")
        cond = None
        shown = [("input (hole: grey)", images * (1 - holes))]
        extra = {"known_image": images.repeat(cfg.n_per_input, 1, 1, 1).to(device), "known_mask": (1 - holes).to(device),
                 "jump_length": cfg.jump_length, "jump_n_sample": cfg.jump_n_sample,
                 "reconstruction_guidance": cfg.reconstruction_guidance}
    count, n = len(names), len(names) * cfg.n_per_input
    labels = input_labels(cfg, arch["num_classes"], count, required=task is not None)
    labels = None if labels is None else labels.repeat(cfg.n_per_input).to(device)
    if cond is not None:
        extra["cond"] = cond.repeat(cfg.n_per_input, 1, 1, 1).to(device)
    cfg_scale = cfg.cfg_scale if labels is not None or task is not None else 0.0
    steps = cfg.steps or DEFAULT_STEPS.get(cfg.sampler, diffusion.noise_steps - 1)
    how = (f"RePaint over {steps} steps (jump_length {cfg.jump_length}, jump_n_sample {cfg.jump_n_sample}, "
           f"reconstruction_guidance {cfg.reconstruction_guidance:g})"
           if cfg.inpaint else
           f"{cfg.sampler} with {steps} steps, cfg_scale {cfg_scale:g}")
    print(f"{task or 'RePaint'} with {describe(arch)} from {cfg.ckpt}: {count} input(s) x {cfg.n_per_input} at "
          f"{size} px, {how}, on {device}")
    model.to(device)
    x_0 = diffusion.sample_x0(model, n, labels, cfg_scale, sampler=cfg.sampler, steps=cfg.steps, seed=cfg.seed,
                              **extra)
    if degradation is not None:  # inpaint: the known pixels of the input, the output in the hole
        x_0 = degradation.keep_known(x_0, extra["cond"])
    outputs = to_uint8(x_0).cpu()
    rows = shown[:1] + [(f"output {r + 1}" if cfg.n_per_input > 1 else "output", outputs[r * count:(r + 1) * count])
                        for r in range(cfg.n_per_input)] + shown[1:]
    save_rows([(caption, images.float() / 127.5 - 1 if images.dtype == torch.uint8 else images)
               for caption, images in rows], cfg.out)
    print(f"saved {cfg.out} (columns: {', '.join(names)})")
    if cfg.save_individual:
        save_individual(outputs, list(range(count)) * cfg.n_per_input, cfg.save_individual)
        print(f"saved {n} images in {cfg.save_individual}/ as <input index>_<i>.png")
    return outputs


def main(argv=None):
    """Load the checkpoint, sample, and write the grid (and the single images); returns the uint8 images."""
    cfg = parse_config(Config, argv, description=__doc__)
    validate(cfg)
    cfg = dataclasses.replace(cfg, sampler=cfg.sampler or ("ddpm" if cfg.inpaint else "dpm++"))
    device = pick_device(cfg.device)
    model, arch, saved = load_model(cfg.ckpt, cfg.weights)
    if arch.get("cond_channels") or cfg.condition is not None or cfg.inpaint is not None:
        return sample_from_images(cfg, model, arch, saved, device)
    labels = grid_labels(cfg, arch["num_classes"])
    latents = run_latents(saved, arch["c_in"], device)
    diffusion = make_diffusion(cfg, saved, arch["c_in"], device, latents)
    n = cfg.n if labels is None else labels.shape[0]
    kind = "unconditional"
    if labels is not None:
        kind = f"conditional ({arch['num_classes']} classes, {arch['conditioning']})"
    steps = cfg.steps or DEFAULT_STEPS.get(cfg.sampler, diffusion.noise_steps - 1)
    space = "" if latents.vae is None else f" ({diffusion.img_size} px latents of --vae {saved['vae']})"
    print(f"{kind} {describe(arch)}, from {cfg.ckpt}: {n} images at {diffusion.img_size * latents.factor} px{space}, "
          f"{cfg.sampler} with {steps} steps, on {device}")

    model.to(device)
    labels = None if labels is None else labels.to(device)
    cfg_scale = cfg.cfg_scale if labels is not None else 0.0
    x_0 = diffusion.sample_x0(model, n, labels, cfg_scale, sampler=cfg.sampler, steps=cfg.steps, seed=cfg.seed)
    images = to_uint8(latents.decode(x_0))
    if labels is None:
        save_images(images, cfg.out)
    else:
        names = class_names(cfg.ckpt, arch["num_classes"])
        row_classes = labels[::cfg.n_per_label].tolist()
        save_images(images, cfg.out, nrow=cfg.n_per_label, captions=[names[k] for k in row_classes])
    print(f"saved {cfg.out}")
    if cfg.save_individual:
        row_labels = labels.tolist() if labels is not None else [0] * n
        save_individual(images, row_labels, cfg.save_individual)
        print(f"saved {n} images in {cfg.save_individual}/")
    return images


if __name__ == "__main__":
    run_cli(main)
