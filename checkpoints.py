"""Checkpoints: a run's files saved and restored, and any checkpoint rebuilt into its network and its Diffusion.

A training run keeps, in models/<run_name>/: training_state.pt (a dict: model, EMA, optimizer, step, epoch, RNG
states, config, losses; `save_run`, read back by `restore_run` for --resume), its last keep_checkpoints copies in
checkpoints/step_<step>.pt, the plain state_dicts ckpt.pt and ema_ckpt.pt as the reference repository names them,
and config.json. Every write is atomic. `load_model` is the one loader of a network: from any of these files, or
from the reference's released state_dicts, it rebuilds the network from the shapes of its weights and the saved
config (`infer_network`), with modules.build_network; `run_diffusion` gives the Diffusion it was trained with.
"""
import dataclasses
import json
import os
import shutil

import torch

from degradations import condition_channels
from diffusion import Diffusion
from latents import is_pixel_space, run_latents
from modules import DIT_SIZES, build_network
from utils import (UsageError, atomic_save, config_to_dict, diff_configs, load_checkpoint, read_json_object,
                   resumable_fields, rng_state, save_config, saved_config, set_rng_state)

STATE_FILE = "training_state.pt"  # model, EMA, optimizer, step, epoch, RNG states, config, losses
KEPT_DIR = "checkpoints"  # models/<run_name>/checkpoints/step_<step>.pt: the last keep_checkpoints states
REFERENCE_IMAGE_SIZE = 64  # the reference repository's, for its checkpoints, which have no saved config


class TrainingError(UsageError):
    """The run had to stop (non-finite losses, a checkpoint it could not write): one line, as a UsageError."""


# ----------------------------------------------------------------------------- state_dicts
def strip_wrapper_prefixes(key):
    """A state_dict key without torch.compile / DDP prefixes, in either order: 'module._orig_mod.inc.x' -> 'inc.x'."""
    while key.startswith(("_orig_mod.", "module.")):
        key = key.split(".", 1)[1]
    return key


def _listed(items, limit=5):
    """'a, b, c, ... (+n more)' for the first `limit` items."""
    more = f", ... (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def load_state_dict_strict(model, state_dict, what="checkpoint"):
    """Load `state_dict` strictly; on any key or shape mismatch raise one readable UsageError line."""
    target = getattr(model, "_orig_mod", model)
    if isinstance(target, torch.nn.parallel.DistributedDataParallel):
        target = target.module
    state_dict = {strip_wrapper_prefixes(k): v for k, v in state_dict.items()}
    expected = target.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k}: {tuple(state_dict[k].shape)} in {what} vs {tuple(v.shape)} in model"
              for k, v in expected.items()
              if k in state_dict and getattr(state_dict[k], "shape", None) != getattr(v, "shape", None)]
    problems = [f"{len(items)} {name} ({_listed(items)})"
                for name, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                    ("shape mismatches", shapes)) if items]
    if problems:
        raise UsageError(f"{what} does not fit the model: {'; '.join(problems)}; the checkpoint was made by "
                         "another architecture: check --base_channels / --num_classes / the script you used")
    return target.load_state_dict(state_dict, strict=True)


# ----------------------------------------------------------------------------- a training run's files
def run_dirs(cfg, resume, overwrite):
    """results/<run_name>/ and models/<run_name>/; refuses to clobber another run's checkpoints."""
    results_dir = os.path.join("results", cfg.run_name)
    models_dir = os.path.join("models", cfg.run_name)
    state_path = os.path.join(models_dir, STATE_FILE)
    has_run = any(os.path.exists(os.path.join(models_dir, f)) for f in (STATE_FILE, "ckpt.pt", "ema_ckpt.pt"))
    if resume and not os.path.exists(state_path):
        raise UsageError(f"--resume found no {state_path}: train without --resume first, or check --run_name")
    if has_run and not (resume or overwrite):
        raise UsageError(f"{models_dir}/ already holds a run: pass --resume to continue it, --overwrite to "
                         "replace it, or choose another --run_name")
    return results_dir, models_dir


def save_kept(obj, path, kept_dir, name, keep):
    """atomic_save `obj` as kept_dir/name, make `path` the same file, then delete all but the newest `keep` files
    of kept_dir (names sort by age). Any failure leaves the previous `path` whole."""
    kept = os.path.join(kept_dir, name)
    atomic_save(obj, kept)
    tmp = os.fspath(path) + ".tmp"
    if os.path.exists(tmp):
        os.remove(tmp)
    try:
        try:
            os.link(kept, tmp)  # a second name for the same file: no second copy on disk
        except OSError:  # file systems without hard links
            shutil.copyfile(kept, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    for old in sorted(f for f in os.listdir(kept_dir) if f.endswith(".pt"))[:-keep]:
        os.remove(os.path.join(kept_dir, old))


def save_run(cfg, net, ema_net, ema, optimizer, progress, models_dir):
    """Plain state_dicts as the reference names them, and the full state for --resume; all atomic.

    `progress` holds step, epoch, batches_done (this process's batches of the epoch), batches_per_epoch,
    num_processes, losses, skipped and vae_digest (the Task's). A resumed run starts at the next epoch if `epoch`
    finished.
    A failed write is a TrainingError; the files written before stay whole.
    """
    epoch, batches_done = progress["epoch"], progress["batches_done"]
    if batches_done == progress["batches_per_epoch"]:
        epoch, batches_done = epoch + 1, 0
    state = {"model": net.state_dict(), "ema": ema_net.state_dict(), "ema_state": ema.state_dict(),
             "optimizer": optimizer.state_dict(), "step": progress["step"], "epoch": epoch,
             "batches_done": batches_done, "num_processes": progress["num_processes"], "losses": progress["losses"],
             "skipped": progress["skipped"], "vae_digest": progress["vae_digest"], "rng": rng_state(),
             "config": config_to_dict(cfg)}
    try:
        save_kept(state, os.path.join(models_dir, STATE_FILE), os.path.join(models_dir, KEPT_DIR),
                  f"step_{progress['step']:09d}.pt", cfg.keep_checkpoints)
        atomic_save(net.state_dict(), os.path.join(models_dir, "ckpt.pt"))
        atomic_save(ema_net.state_dict(), os.path.join(models_dir, "ema_ckpt.pt"))
        save_config(cfg, os.path.join(models_dir, "config.json"))
    except OSError as exc:
        raise TrainingError(f"could not write a checkpoint in {models_dir}/ at step {progress['step']} ({exc}): "
                            f"free disk space or fix the permissions, then --resume from the previous "
                            f"{STATE_FILE}, which is intact") from exc


def restore_run(cfg, models_dir, net, ema_net, ema, optimizer, num_processes=1, vae_digest=None):
    """Load models/<run_name>/training_state.pt into the run; returns the progress dict of `save_run`.

    The saved config must be this one but for its resumable fields (utils.arg): a config saved before a field existed
    or was renamed is read as today's (utils.saved_config). A run may resume on another number of processes when the
    batches done so far split evenly over them, and only on the latents it began with: `vae_digest` (the Task's)
    must be the saved one.
    """
    state = load_checkpoint(os.path.join(models_dir, STATE_FILE))
    saved = saved_config(state["config"], type(cfg))
    changed = diff_configs(saved, config_to_dict(cfg), ignore=resumable_fields(type(cfg)))
    if changed:
        raise UsageError(f"--resume with a different config: {'; '.join(changed)}; use the saved values "
                         f"({models_dir}/config.json) or start a new --run_name")
    if state.get("vae_digest", vae_digest) != vae_digest:  # a state saved before the digest existed: not checked
        raise UsageError(f"--resume with another VAE: --vae '{cfg.vae}' is not the VAE this run began on (digest "
                         f"{vae_digest}, saved {state['vae_digest']}), so its latents differ: resume with the VAE it "
                         "trained on (write a retrained VAE to a new train_vae.py --run_name), or start a new "
                         "--run_name")
    batches = state["batches_done"] * state.get("num_processes", 1)  # of all processes together
    if batches % num_processes:
        raise UsageError(f"--resume on {num_processes} processes: the run stopped after {batches} batches, which do "
                         f"not split evenly; resume on {state.get('num_processes', 1)} processes")
    load_state_dict_strict(net, state["model"])
    load_state_dict_strict(ema_net, state["ema"])
    ema.load_state_dict(state["ema_state"])
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    print(f"resumed {cfg.run_name} at step {state['step']}, epoch {state['epoch']}")
    return {"step": state["step"], "epoch": state["epoch"], "batches_done": batches // num_processes,
            "losses": list(state["losses"]), "skipped": state.get("skipped", 0)}


# ----------------------------------------------------------------------------- any checkpoint -> its network
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


def is_text_run(saved):
    """Whether a saved config is train_sd.py's (a network conditioned on a text encoder's states)."""
    return "text_encoder" in saved and "prompt" in saved


def infer_conditioning(state_dict):
    """How a conditional U-Net reads its label, from the weights only that mode has (see UNet_conditional)."""
    if "label_map.weight" in state_dict:
        return "concat"
    if "label_tokens.weight" in state_dict:
        return "xattn"
    if "inc.modulation.1.weight" in state_dict:
        return "adanorm"
    return "add"


def infer_text(state_dict, path):
    """(conditioning, context_dim) of a text-conditioned network: a pooled embedding through text_proj (add), else
    token states through the cross-attentions, whose key projections take the text encoder's width (packed into
    in_proj_weight by nn.MultiheadAttention where that width is the attention's own)."""
    if "text_proj.weight" in state_dict:
        return "add", state_dict["text_proj.weight"].shape[1]
    for suffix in ("cross_attn.mha.k_proj_weight", "cross_attn.mha.in_proj_weight"):
        keys = [k for k in state_dict if k.endswith(suffix)]
        if keys:
            return "cross_attention", state_dict[keys[0]].shape[1]
    raise UsageError(f"'{path}' does not fit a train_sd.py network: it has no text_proj or cross-attention weights, "
                     "but its saved config is a train_sd.py run's: pass the checkpoint saved with that config")


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
    if is_text_run(saved):
        arch["conditioning"], arch["context_dim"] = infer_text(state_dict, path)
    elif "class_emb.weight" in state_dict:  # (num_classes + 1, dim): the last row is the null class
        arch["num_classes"], arch["conditioning"] = state_dict["class_emb.weight"].shape[0] - 1, "add"
    return arch


def infer_unet_conditioning(state_dict, arch, path, saved):
    """The U-Net's label or text conditioning, and its image condition's channels, into `arch`."""
    time_dim = arch["time_dim"]
    conditioning = infer_conditioning(state_dict)
    if is_text_run(saved):
        conditioning, arch["context_dim"] = infer_text(state_dict, path)
    wanted = saved.get("conditioning", conditioning)
    if wanted != conditioning:
        raise UsageError(f"'{path}' holds a U-Net conditioned by '{conditioning}', but its saved config says "
                         f"'{wanted}': pass the checkpoint saved with that config")
    if is_text_run(saved):
        arch["conditioning"] = conditioning
    elif conditioning == "concat":  # label_map: (num_classes, concat_channels), concatenated to the input
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


def infer_network(state_dict, path="checkpoint", saved=None):
    """The network's architecture (modules.build_network), read from the shapes of its weights.

    The backbone is the saved config's `backbone` (a DiT: see infer_dit), and must be the one the weights hold.
    The U-Net's conditioning mode is the saved training config's `conditioning`; a checkpoint without one (the
    reference's) is read from its weights, which gives "add" for the reference's. A config that names
    another mode than the weights hold is an error. A train_sd.py run's network reads text of the width its weights
    take.
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
    arch = {"backbone": "unet", "c_in": inc.shape[1], "c_out": state_dict["outc.weight"].shape[0],
            "base_channels": inc.shape[0], "time_dim": state_dict["down1.emb_layer.1.weight"].shape[1],
            "num_classes": None, "conditioning": None}
    infer_unet_conditioning(state_dict, arch, path, saved)
    # An attention block left out (UNet's attn_factors) has no weights: factor 1 is sa6, 2 sa1/sa5, 4 sa2/sa4, 8 sa3.
    blocks = {1: "sa6", 2: "sa1", 4: "sa2", 8: "sa3"}
    arch["attn_factors"] = tuple(f for f, block in blocks.items() if any(k.startswith(block + ".") for k in state_dict))
    return arch


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
    """(network with the checkpoint's weights, in eval mode, its arch dict, the saved training config or {})."""
    state_dict, saved = read_checkpoint(path, weights)
    arch = infer_network(state_dict, path, saved)
    model = build_network(arch)
    load_state_dict_strict(model, state_dict, what=f"checkpoint '{path}'")
    return model.eval().requires_grad_(False), arch, saved


def load_image_model(path, weights="ema"):
    """load_model for the tools that sample images from classes or images (sample.py, evaluate.py, compare.py): a
    train_sd.py checkpoint, which reads text, is a UsageError that names its own sampler."""
    model, arch, saved = load_model(path, weights)
    if is_text_run(saved):
        raise UsageError(f"'{path}' is a train_sd.py checkpoint, which reads text: sample it with python train_sd.py "
                         f"--sample --ckpt {path} --prompt \"...\" (add --judge to measure it on the shapes)")
    return model, arch, saved


# ----------------------------------------------------------------------------- a run's Diffusion
def run_diffusion(settings, latents, device, image_size=None, clip_x0=None):
    """The Diffusion of a run (a Config, or a saved config dict: the fields it lacks take the reference's values), at
    image_size pixels (None: the run's, else the reference's 64) in the run's latents (latents.Latents; pixel space
    for a VAE of None). clip_x0 None: the run's setting (else true), in pixel space only (latents.clip_x0)."""
    if not isinstance(settings, dict):
        settings = dataclasses.asdict(settings)
    image_size = image_size or settings.get("image_size", REFERENCE_IMAGE_SIZE)
    if not isinstance(image_size, int) or image_size <= 0 or image_size % 8:
        raise UsageError(f"the saved image_size {image_size!r} is not divisible by 8: pass --image_size 64")
    clip_x0 = latents.clip_x0(settings.get("clip_x0", True) if clip_x0 is None else clip_x0)
    return Diffusion.from_settings(settings, latents.latent_size(image_size), latents.channels, device, clip_x0)


def pixel_diffusion(saved, arch, device, what, image_size=None, clip_x0=None):
    """The run's Diffusion (run_diffusion) where images are what it samples; a run in a VAE's latents is a
    UsageError naming `what` needs pixels."""
    latents = run_latents(saved, arch["c_in"], device)
    if latents.vae is not None:
        raise UsageError(f"{what} work in pixel space, and this run trains in a VAE's latents: use a pixel-space "
                         "checkpoint")
    return run_diffusion(saved, latents, device, image_size, clip_x0)

