"""Latent text-to-image: a small Stable Diffusion (U-Net or DiT with cross-attention on CLIP token states).

    python train_sd.py                              (CIFAR-10 captions at 128 px in SD's VAE latents: a GPU job)
    python train_sd.py --make_tiny_models data/tiny_sd && python train_sd.py --config configs/sd_quick_cpu.json
    python train_sd.py --sample --ckpt models/SD_text/ema_ckpt.pt --prompt "a photo of a cat" --out cat.png

A frozen VAE (diffusers' AutoencoderKL) maps images to latents, a frozen CLIP text encoder maps captions to
token states, and only the U-Net (or with `--backbone dit` the DiT) trains, with the DDPM loss of ddpm.py on the
scaled latents. Each caption is replaced by "" with probability p_uncond, so one network learns eps(x_t, t, text)
and eps(x_t, t, ""); sampling mixes the two with classifier-free guidance. `--vae none` trains in pixel space.
"""
import dataclasses
import os
import warnings
from dataclasses import dataclass

import torch
from torch.utils.data import TensorDataset

from data import (COLOR_NAMES, SHAPE_NAMES, all_shape_captions, dataset_channels, default_prompts, get_caption_dataset,
                  normalize_caption, parse_shape_caption, without_captions)
from ddpm import Diffusion, broadcast
from latents import DTYPES, draw_latents, latent_cache_path, load_latents, open_cache, vae_digest
from modules import DiT_text, UNet_text
from training import RESUMABLE_FIELDS, RUN_FLAGS, Task, dit_size, parse_attn_factors, train, validate
from utils import (UsageError, arg, from_pretrained, load_checkpoint, load_state_dict_strict, parse_config,
                   pick_device, read_json_object, run_cli, save_images, save_individual, with_defaults)


# ----------------------------------------------------------------------------- hyperparameters
@dataclass
class Config:
    run_name: str = arg("SD_text", "results/<run_name>/ and models/<run_name>/ hold this run's files")
    dataset: str = arg("cifar10", "cifar10 ('a photo of a <class>') | imagefolder (class subfolders) | "
                                  "captions (metadata.jsonl or <image>.txt) | shapes (built in)")
    dataset_path: str = arg("./data", "folder of the dataset (cifar10 downloads here)")
    dataset_size: int | None = arg(None, "use only this many images (None: all)")
    image_size: int = arg(128, "training resolution in pixels; the latents are image_size / VAE factor")
    channels: int | None = arg(None, "image channels: 1 (grey: repeated for an RGB VAE, its decoding averaged) | 3 "
                                     "(RGB); None: the data set's (1 for a folder of grey image files, else 3)")
    vae: str = arg("stabilityai/sd-vae-ft-mse", "frozen AutoencoderKL: Hub id, or a folder such as models/<run>/vae "
                                                "of train_vae.py; none = pixel space")
    text_encoder: str = arg("openai/clip-vit-large-patch14", "Hub id or folder holding CLIPTextModel + tokenizer")
    conditioning: str = arg("cross_attention", "cross_attention (token states) | add (pooled embedding)")
    cache_latents: bool = arg(False, "encode images and captions once, then train from the cache (no augmentation)")
    cache_dir: str = arg("data/latent_cache", "folder of the latent caches, one file per cache key")
    backbone: str = arg("unet", "the network: unet (the reference's U-Net) | dit (a Diffusion Transformer with "
                                "adaLN-Zero, Peebles & Xie 2023)")
    dit_size: str = arg("dit-s", "DiT depth, width and heads: dit-t | dit-xs (CPU sizes) | dit-s | dit-b (the "
                                 "paper's S and B)")
    patch_size: int = arg(2, "DiT patch size in latent pixels: 2 | 4 (tokens: latent size^2 / patch_size^2)")
    base_channels: int = arg(64, "U-Net width")
    attn_factors: str = arg("1,2,4,8", "attention (self and cross) after the U-Net blocks at these downsampling "
                                       "factors (1: full resolution, 8: the lowest)")
    batch_size: int = arg(64, "images per optimizer step")
    epochs: int = arg(50, "passes over the data set")
    max_steps: int | None = arg(None, "stop after this many optimizer steps, whatever the epochs")
    lr: float = arg(2e-4, "AdamW learning rate")
    noise_steps: int = arg(1000, "T, the number of diffusion steps")
    beta_start: float = arg(1e-4, "beta_1 of the linear schedule")
    beta_end: float = arg(0.02, "beta_T of the linear schedule")
    schedule: str = arg("linear", "noise schedule: linear (the DDPM paper's) | cosine (Nichol & Dhariwal 2021)")
    min_snr_gamma: float | None = arg(None, "Min-SNR-gamma loss weights (Hang et al. 2023; 5 in the paper): "
                                            "min(SNR_t, gamma) / SNR_t for epsilon, min(SNR_t, gamma) for sample, "
                                            "min(SNR_t, gamma) / (SNR_t + 1) for v_prediction; None: the plain DDPM loss")
    prediction_type: str = arg("epsilon", "what the U-Net predicts: epsilon (the noise) | v_prediction (v = "
                                          "sqrt(alpha_hat) eps - sqrt(1 - alpha_hat) x_0) | sample (x_0)")
    lr_warmup: int = arg(0, "optimizer steps of linear learning-rate warm-up from 0 (the DDPM paper: 5000)")
    lr_decay: str = arg("none", "learning rate after the warm-up: none (constant) | cosine (to 0 at max_steps, "
                                     "or at the last epoch)")
    p_uncond: float = arg(0.1, "probability of replacing each caption by '', to learn the unconditional eps")
    cfg_scale: float = arg(7.5, "guidance scale of the grids and --sample: 0 = conditional only")
    ema_beta: float = arg(0.995, "EMA decay per step")
    ema_start: int = arg(0, "steps during which the EMA model is a plain copy (the reference: 2000)")
    ema_warmup: bool = arg(True, "EMA decay min(ema_beta, (1 + n) / (10 + n)) at update n (false: the reference)")
    grad_clip: float | None = arg(1.0, "clip the gradient norm to this, as the DDPM paper (None: the reference)")
    clip_x0: bool | None = arg(None, "clip the predicted x_0 to [-1, 1] at each sampling step (None: only in pixel "
                                     "space, --vae none; a VAE's latents have no such range)")
    sampler: str = arg("dpm++", "sampler of the grids: ddpm | ddim | dpm++ | dpm++ode | euler_a")
    sample_steps: int | None = arg(None, "network steps of the sampler (None: its default)")
    prompt: list[str] = arg([], "prompts of the grids and of --sample, one row each (repeat the flag)")
    holdout_prompts: list[str] = arg([], "captions never trained on: their items are left out of every epoch, so "
                                         "sampling them measures composition (repeat the flag)")
    n_per_prompt: int = arg(8, "images in each prompt's row")
    log_every: int = arg(5, "save grids, loss plot and checkpoints every this many epochs")
    report_to: str = arg("tensorboard", "experiment tracking through Accelerate: none | tensorboard (offline, in "
                                        "results/<run_name>/logs) | wandb (offline unless logged in) | all")
    gradient_accumulation_steps: int = arg(1, "batches per optimizer step: batch_size x processes x this images")
    checkpoint_every: int = arg(500, "optimizer steps between checkpoints (training_state.pt for --resume)")
    keep_checkpoints: int = arg(2, "training states kept in models/<run_name>/checkpoints/, the newest included")
    max_nonfinite: int = arg(20, "stop after this many non-finite losses in a row (each update is skipped)")
    print_every: int = arg(10, "optimizer steps between reads of the loss from the device (progress bar, losses)")
    seed: int = arg(0, "seed of the data order, the noise and the grids")
    device: str = arg("auto", "auto (cuda, then mps, then cpu) | cuda | mps | cpu")
    compile: bool = arg(False, "torch.compile the U-Net")
    gradient_checkpointing: bool = arg(False, "recompute each Down, Up and attention block (DiT: each block) in "
                                              "the backward pass (torch.utils.checkpoint): less activation "
                                              "memory, more compute")
    mixed_precision: str | None = arg(None, "no | fp16 | bf16 (the U-Net through Accelerate; VAE and CLIP cast to "
                                            "it); None: the launcher's (accelerate launch / config), else no")
    num_workers: int = arg(2, "DataLoader worker processes (with --data_on_device: only to read the data set once)")
    data_on_device: bool | None = arg(None, "hold the data set on the training device and index batches there, no "
                                            "DataLoader workers; None: when it takes at most a quarter of the free "
                                            "memory")


SD_FLAGS = RUN_FLAGS + [
    ("--sample", {"action": "store_true", "help": "generate from --ckpt instead of training; the sampling "
                                                  "fields not given keep the run's saved values"}),
    ("--ckpt", {"default": None, "help": "checkpoint for --sample: models/<run>/ema_ckpt.pt or training_state.pt"}),
    ("--out", {"default": None, "help": "grid file of --sample (default results/<run_name>/samples.png)"}),
    ("--make_tiny_models", {"default": None, "metavar": "DIR", "help": "write tiny random VAE and CLIP to DIR"}),
    ("--judge", {"action": "store_true", "help": "with --sample on a shapes run: print the colour, shape and prompt "
                                                 "accuracy of the samples, for the seen and the held-out prompts "
                                                 "(without --prompt: all 100 colour-shape pairs)"}),
    ("--save_individual", {"default": None, "metavar": "DIR", "help": "with --sample: also write each sample as "
                                                                      "DIR/<prompt index>_<i>.png"}),
]
SD_RESUMABLE = RESUMABLE_FIELDS + ("prompt", "cfg_scale", "n_per_prompt", "cache_latents", "cache_dir")
SAMPLING_FIELDS = ("prompt", "cfg_scale", "sampler", "sample_steps", "n_per_prompt", "seed", "device", "clip_x0")


# ----------------------------------------------------------------------------- frozen VAE and text encoder
class TextEncoder:
    """The frozen CLIP: prompts -> token states (B, L, D) for cross_attention, or pooled (B, D) for add."""

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


def load_frozen(cfg, device):
    """(Latents, TextEncoder), in eval mode, without gradients, in the training precision."""
    from transformers import CLIPTextModel, CLIPTokenizer

    latents = load_latents(cfg.vae, device, cfg.mixed_precision, cfg.channels or 3)
    tokenizer = from_pretrained(CLIPTokenizer, cfg.text_encoder)
    model = from_pretrained(CLIPTextModel, cfg.text_encoder, dtype=DTYPES[cfg.mixed_precision])
    return latents, TextEncoder(tokenizer, model.to(device).eval().requires_grad_(False), cfg.conditioning)


def check(cfg):
    """The settings only this script has; training.validate checks the others."""
    if cfg.conditioning not in UNet_text.CONDITIONINGS:
        raise UsageError(f"conditioning '{cfg.conditioning}' is unknown: use cross_attention or add")
    if cfg.n_per_prompt <= 0:
        raise UsageError(f"n_per_prompt {cfg.n_per_prompt} must be positive")


def build_network(cfg, latents, text):
    """The text-conditioned network of --backbone: UNet_text or DiT_text, on the VAE's latent channels."""
    if cfg.backbone == "dit":
        return DiT_text(c_in=latents.channels, c_out=latents.channels, patch_size=cfg.patch_size,
                        context_dim=text.dim, conditioning=cfg.conditioning, **dit_size(cfg.dit_size))
    return UNet_text(c_in=latents.channels, c_out=latents.channels, base_channels=cfg.base_channels,
                     context_dim=text.dim, conditioning=cfg.conditioning,
                     attn_factors=parse_attn_factors(cfg.attn_factors))


def make_diffusion(cfg, latents, device):
    """The DDPM of ddpm.py on latents of size image_size / factor, which the U-Net halves 3 times."""
    return Diffusion(cfg.noise_steps, cfg.beta_start, cfg.beta_end, latents.latent_size(cfg.image_size),
                     c_in=latents.channels, device=device, clip_x0=latents.clip_x0(cfg.clip_x0), schedule=cfg.schedule,
                     min_snr_gamma=cfg.min_snr_gamma, prediction_type=cfg.prediction_type)


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


# ----------------------------------------------------------------------------- data
def drop_mask(n, p_uncond, device=None):
    """Rows (n,) whose caption is replaced by the empty prompt, each with probability p_uncond."""
    return torch.rand(n, device=device) < p_uncond


def training_batch(batch, latents, text, contexts, null_context, p_uncond):
    """(x_0, context) of one batch: a latent sample from the posterior, and the text with captions dropped.

    Without a cache the batch is (images, captions) and both frozen networks run; with one it is
    (mean, std, caption index) and `contexts` holds each distinct caption's states.
    """
    if contexts is None:
        images, captions = batch
        drop = drop_mask(len(captions), p_uncond).tolist()
        mean, std = latents.encode(images)
        context = text(["" if d else c for c, d in zip(captions, drop)])
    else:
        mean, std, index = batch
        drop = drop_mask(len(index), p_uncond, index.device)
        context = contexts[index]
        context = torch.where(broadcast(drop, context), null_context, context)
    return draw_latents(mean, std), context


def cache_path(cfg, dataset):
    return latent_cache_path(cfg, dataset, cfg.channels, text_encoder=cfg.text_encoder, conditioning=cfg.conditioning,
                             holdout=sorted(normalize_caption(c) for c in cfg.holdout_prompts))


# ----------------------------------------------------------------------------- grids
def sample_grid(cfg, diffusion, net, latents, text, prompts, path):
    """n_per_prompt images per prompt, one row each, guided by the empty prompt in one batched pass."""
    context = text(prompts).repeat_interleave(cfg.n_per_prompt, dim=0)  # (P, ...) -> (P * n, ...)
    null_context = text([""]).expand_as(context)
    x_0 = diffusion.sample_x0(net, len(context), context, cfg.cfg_scale, null_labels=null_context,
                              sampler=cfg.sampler, steps=cfg.sample_steps, seed=cfg.seed)
    images = latents.decode(x_0)
    save_images(images, path, nrow=cfg.n_per_prompt, captions=list(prompts))
    return images


# ----------------------------------------------------------------------------- training
def text_task(cfg, accelerator):
    """What training.train trains here: captions through the frozen VAE and CLIP, or through their cache."""
    device = accelerator.device
    cfg = dataclasses.replace(cfg, channels=cfg.channels or dataset_channels(cfg.dataset, cfg.dataset_path))
    with accelerator.main_process_first():  # one process downloads (the Hub's models, CIFAR-10); the others read them
        latents, text = load_frozen(cfg, device)
        dataset = get_caption_dataset(cfg.dataset, cfg.dataset_path, cfg.image_size, seed=cfg.seed,
                                      size=cfg.dataset_size, channels=cfg.channels)
    diffusion = make_diffusion(cfg, latents, device)
    dataset = without_captions(dataset, cfg.holdout_prompts)  # the held-out prompts never occur in an epoch
    if cfg.holdout_prompts:
        accelerator.print(f"{len(cfg.holdout_prompts)} held-out prompts: training on the other {len(dataset)} items")
    prompts = cfg.prompt or default_prompts(dataset)
    null_context = text([""])
    contexts = None
    if cfg.cache_latents:
        cache = open_cache(accelerator, cache_path(cfg, dataset), dataset, latents, text, cfg.batch_size,
                           cfg.num_workers)
        contexts = cache["contexts"].to(device)
        dataset = TensorDataset(cache["mean"], cache["std"], cache["caption_index"])

    caption_states = CaptionStates(text)  # without the cache, each distinct caption is encoded once

    def make_batch(batch):
        return training_batch(batch, latents, caption_states, contexts, null_context, cfg.p_uncond)

    def draw_grid(module, path):
        sample_grid(cfg, diffusion, module, latents, text, prompts, path)

    return Task(dataset, build_network(cfg, latents, text), diffusion, make_batch, draw_grid, channels=cfg.channels,
                vae_digest=vae_digest(cfg.vae))


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


# ----------------------------------------------------------------------------- sampling
def saved_run(ckpt):
    """(weights, saved Config) of a checkpoint: training_state.pt holds both, ema_ckpt.pt has config.json beside."""
    weights = load_checkpoint(ckpt)
    if "ema" in weights and "config" in weights:
        weights, saved = weights["ema"], weights["config"]
    else:
        config_file = os.path.join(os.path.dirname(ckpt), "config.json")
        if not os.path.isfile(config_file):
            raise UsageError(f"no config.json beside '{ckpt}': pass a checkpoint from models/<run_name>/ of "
                             "train_sd.py")
        saved = read_json_object(config_file, "the config beside the checkpoint")
    saved = with_defaults(saved, Config)  # a run saved before a field existed used its default
    names = {field.name for field in dataclasses.fields(Config)}
    if set(saved) != names:
        raise UsageError(f"the config of '{ckpt}' was not written by train_sd.py (keys differ: "
                         f"{sorted(set(saved) ^ names)[:4]}): pass a train_sd.py checkpoint")
    return weights, Config(**saved)


def sample(cfg, flags):
    if not flags.ckpt:
        raise UsageError("--sample needs --ckpt models/<run_name>/ema_ckpt.pt")
    weights, saved = saved_run(flags.ckpt)
    # each sampling field that the command line or a --config sets wins; the others keep the run's values
    run_cfg = dataclasses.replace(saved, **{name: getattr(cfg, name) for name in SAMPLING_FIELDS
                                            if name in flags.given})
    if "prompt" not in flags.given and flags.judge and saved.dataset == "shapes":
        run_cfg = dataclasses.replace(run_cfg, prompt=all_shape_captions())  # every colour-shape pair
    if not run_cfg.prompt:
        raise UsageError('--sample needs at least one --prompt "..." (repeat the flag for more rows)')
    validate(run_cfg)
    check(run_cfg)
    if flags.judge:
        requested = judged_attributes(run_cfg)  # a prompt the judges cannot read fails before sampling
    device = torch.device(pick_device(run_cfg.device))
    latents, text = load_frozen(dataclasses.replace(run_cfg, mixed_precision="no"), device)
    net = build_network(run_cfg, latents, text)
    load_state_dict_strict(net, weights)
    net.to(device)
    out = flags.out or os.path.join("results", run_cfg.run_name, "samples.png")
    images = sample_grid(run_cfg, make_diffusion(run_cfg, latents, device), net, latents, text, run_cfg.prompt, out)
    print(f"saved {len(run_cfg.prompt)} x {run_cfg.n_per_prompt} samples to {out}")
    if flags.save_individual:
        rows = torch.arange(len(run_cfg.prompt)).repeat_interleave(run_cfg.n_per_prompt)
        save_individual(images, rows, flags.save_individual)
        print(f"saved {len(images)} images as {flags.save_individual}/<prompt index>_<i>.png")
    if flags.judge:
        return prompt_figures(run_cfg, images, *requested, device)
    return out


def judged_attributes(cfg):
    """(colour ids, shape ids, held out?) of the grid's samples, rows of n_per_prompt following cfg.prompt."""
    if cfg.dataset != "shapes":
        raise UsageError(f"--judge needs a run on the built-in shapes (this one trained on {cfg.dataset})")
    held = {normalize_caption(c) for c in cfg.holdout_prompts}
    colors, shapes, heldout = [], [], []
    for prompt in cfg.prompt:
        pair = parse_shape_caption(prompt)
        if pair is None:
            raise UsageError(f"--judge: prompt '{prompt}' names no colour and shape of the shapes data set: use e.g. "
                             f"'a {COLOR_NAMES[0]} {SHAPE_NAMES[0]}'")
        colors += [pair[0]] * cfg.n_per_prompt
        shapes += [pair[1]] * cfg.n_per_prompt
        heldout += [normalize_caption(prompt) in held] * cfg.n_per_prompt
    return torch.tensor(colors), torch.tensor(shapes), torch.tensor(heldout)


def prompt_figures(cfg, images, colors, shapes, heldout, device):
    """Colour, shape and prompt accuracy of the samples, for the seen prompts and for the held-out ones.

    The shape is read by evaluate.py's learned judge of the shapes data set, the colour by the colour judge
    (data.classify_colors); each one's accuracy on real images is printed beside the figures.
    """
    from evaluate import attribute_figures, color_judge_accuracy, get_judge

    shape_judge = get_judge("shapes", cfg.dataset_path, cfg.image_size, device=device)
    color_judge = color_judge_accuracy(cfg.image_size)
    figures = {"shape_judge_heldout_accuracy": shape_judge.heldout_accuracy, "color_judge_accuracy": color_judge}
    print(f"{'prompts':>9} {'samples':>7} {'color_acc':>9} {'shape_acc':>9} {'prompt_acc':>10}")
    for name, rows in (("seen", ~heldout), ("held-out", heldout)):
        if rows.any():
            figures[name] = attribute_figures(shape_judge, images[rows], colors[rows], shapes[rows])
            f = figures[name]
            print(f"{name:>9} {f['n']:>7} {f['color_acc']:>9.3f} {f['shape_acc']:>9.3f} {f['prompt_acc']:>10.3f}")
    print(f"judges on real images: shape {shape_judge.heldout_accuracy:.3f} (held out, {shape_judge.path}), "
          f"colour {color_judge:.3f}; chance 0.1 for colour and shape, 0.01 for both")
    return figures


def main(argv=None):
    cfg, flags = parse_config(Config, argv, __doc__, extra=SD_FLAGS)
    if flags.make_tiny_models:
        print("wrote", *make_tiny_models(flags.make_tiny_models))
        return None
    if flags.sample:
        return sample(cfg, flags)
    check(cfg)
    return train(cfg, flags, text_task, resumable=SD_RESUMABLE)


if __name__ == "__main__":
    run_cli(main)
