"""The same flags with the same seed give the same run: every script family against figures recorded before a refactor.

Each family trains a tiny network for a few steps with a fixed seed, then the test compares its per-step losses, its
grids (16 x 16 block means of the saved pictures) and what the tools measure of its checkpoint with
tests/data/fixed_seed.json, which was written by the code at 01ba1a6, before the layout changed:

    python tests/test_fixed_seed.py --record      (only when a change of behaviour is meant; say so in the commit)

The saved configs of those runs are recorded too (tmp paths as <root>): a run saved before the refactor must load,
sample and resume with the code after it.
"""
import argparse
import contextlib
import json
import os
import pathlib
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import ddpm  # noqa: E402
import ddpm_conditional  # noqa: E402
import ddpm_img2img  # noqa: E402
import evaluate  # noqa: E402
import sample  # noqa: E402
import train_sd  # noqa: E402
import train_vae  # noqa: E402
import visualize  # noqa: E402
from conftest import write_tiny_vae  # noqa: E402
from utils import load_checkpoint  # noqa: E402

RECORD = REPO / "tests" / "data" / "fixed_seed.json"
STEPS = 3
COMMON = ["--dataset", "shapes", "--dataset_size", "40", "--image_size", "16", "--batch_size", "8", "--max_steps",
          str(STEPS), "--num_workers", "0", "--device", "cpu", "--seed", "0"]
UNET = ["--base_channels", "8", "--noise_steps", "50", "--sample_steps", "3"]
CLASSES = [*COMMON, *UNET, "--n_per_class", "1", "--report_to", "none", "--attn_factors", "2,8"]
TEXT = [*COMMON, "--noise_steps", "50", "--sample_steps", "3", "--n_per_prompt", "2", "--report_to", "none",
        "--base_channels", "8", "--prompt", "a red circle", "--prompt", "a blue square", "--cfg_scale", "3"]

# family: (script, flags); "<vae>" and "<text>" are the tiny models' folders
FAMILIES = {
    "ddpm": (ddpm, [*COMMON, *UNET, "--n_samples", "4", "--report_to", "none", "--sampler", "ddim", "--schedule",
                    "cosine", "--prediction_type", "v_prediction", "--holdout", "8", "--attn_factors", "2,8"]),
    "conditional_add": (ddpm_conditional, [*CLASSES, "--conditioning", "add"]),
    "conditional_concat": (ddpm_conditional, [*CLASSES, "--conditioning", "concat", "--lr_warmup", "2", "--lr_decay",
                                              "cosine", "--min_snr_gamma", "none"]),
    "conditional_xattn": (ddpm_conditional, [*CLASSES, "--conditioning", "xattn", "--prediction_type", "sample",
                                             "--sampler", "ddim"]),
    "conditional_adanorm": (ddpm_conditional, [*CLASSES, "--conditioning", "adanorm", "--dropout", "0.1",
                                               "--sampler", "euler_a"]),
    "conditional_dit": (ddpm_conditional, [*CLASSES, "--backbone", "dit", "--dit_size", "dit-n", "--patch_size", "4",
                                           "--schedule", "cosine", "--prediction_type", "v_prediction"]),
    "conditional_latent": (ddpm_conditional, [*CLASSES, "--vae", "<vae>", "--cache_latents", "true", "--cache_dir",
                                              "cache", "--sampler", "dpm++ode"]),
    "img2img_superres": (ddpm_img2img, [*COMMON, *UNET, "--task", "superres", "--holdout", "8", "--n_samples", "3",
                                        "--sampler", "ddim", "--downsample", "bicubic"]),
    "img2img_inpaint": (ddpm_img2img, [*COMMON, *UNET, "--task", "inpaint", "--masks", "strokes", "--holdout", "8",
                                       "--n_samples", "3", "--cfg_scale", "2"]),
    "img2img_colorize": (ddpm_img2img, [*COMMON, *UNET, "--task", "colorize", "--class_conditional", "true",
                                        "--holdout", "8", "--n_samples", "3", "--p_uncond", "0.5"]),
    "sd_pixels": (train_sd, [*TEXT, "--vae", "none", "--text_encoder", "<text>"]),
    "sd_latent": (train_sd, [*TEXT, "--vae", "<vae>", "--text_encoder", "<text>", "--prediction_type",
                             "v_prediction"]),
    "sd_dit_pooled": (train_sd, [*TEXT, "--vae", "<vae>", "--text_encoder", "<text>", "--backbone", "dit",
                                 "--dit_size", "dit-n", "--patch_size", "2", "--conditioning", "add"]),
    "vae": (train_vae, [*COMMON[:-2], "--image_size", "16", "--seed", "0", "--block_out_channels", "8,16",
                        "--norm_num_groups", "4", "--holdout", "8", "--scale_images", "16", "--disc_start", "1",
                        "--disc_channels", "8"]),
}


def block_means(path, block=16):
    """The picture at `path` as the means of its block x block tiles (rounded to 0.1): a small, faithful digest."""
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    height, width = (pixels.shape[0] // block) * block, (pixels.shape[1] // block) * block
    tiles = pixels[:height, :width].reshape(height // block, block, width // block, block, 3).mean(axis=(1, 3))
    return np.round(tiles, 1).tolist()


def uint8_text(images):
    """uint8 images as a hex string, one byte a value."""
    return images.to(torch.uint8).flatten().numpy().tobytes().hex()


def uint8_values(text):
    return np.frombuffer(bytes.fromhex(text), dtype=np.uint8).astype(np.int64)


def relative(root, value):
    """A saved config's value with the tmp folder `root` written as <root>."""
    if isinstance(value, str):
        return value.replace(str(root), "<root>")
    if isinstance(value, list):
        return [relative(root, v) for v in value]
    return value


@contextlib.contextmanager
def inside(folder):
    here = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(here)


def train(name, root, models):
    """Train family `name` in `root`; returns its record: losses, grids, saved config."""
    script, flags = FAMILIES[name]
    flags = [models.get(f, f) for f in flags]
    with inside(root):
        script.main([*flags, "--run_name", name])
    state = load_checkpoint(str(root / "models" / name / "training_state.pt"))
    results = root / "results" / name
    grids = {f.name: block_means(f) for f in sorted(results.iterdir())
             if f.suffix in (".jpg", ".png") and f.name != "loss.png"}  # the losses are compared as numbers
    with open(root / "models" / name / "config.json") as f:
        saved = json.load(f)
    return {"losses": [float(v) for v in state["losses"]], "grids": grids,
            "config": {key: relative(root, value) for key, value in saved.items()}}


def tools(root):
    """What sample.py, evaluate.py, visualize.py and train_sd.py --sample make of the runs' checkpoints."""
    ckpt = {name: str(root / "models" / name / "ema_ckpt.pt") for name in FAMILIES}
    out = {}
    with inside(root):
        out["sample_conditional"] = uint8_text(sample.main(
            ["--ckpt", ckpt["conditional_add"], "--labels", "0,3", "--n_per_label", "2", "--steps", "3", "--device",
             "cpu", "--out", "s1.png"]))
        out["sample_dit"] = uint8_text(sample.main(
            ["--ckpt", ckpt["conditional_dit"], "--labels", "1", "--n_per_label", "2", "--steps", "3", "--sampler",
             "ddim", "--device", "cpu", "--out", "s2.png"]))
        out["sample_latent"] = uint8_text(sample.main(
            ["--ckpt", ckpt["conditional_latent"], "--labels", "2", "--n_per_label", "2", "--steps", "3", "--device",
             "cpu", "--out", "s3.png"]))
        out["sample_unconditional"] = uint8_text(sample.main(
            ["--ckpt", ckpt["ddpm"], "--n", "2", "--steps", "3", "--device", "cpu", "--out", "s4.png"]))
        figures = evaluate.main(["--ckpt", ckpt["conditional_add"], "--num_samples", "20", "--num_real", "300",
                                 "--judge_epochs", "3", "--inception", "false", "--steps", "3", "--cfg_scale", "0,3",
                                 "--device", "cpu", "--out", "e1.json"])
        out["evaluate_conditional"] = [[r["class_accuracy"], r["judge_fd"]] for r in figures["rows"]]
        figures = evaluate.main(["--ckpt", ckpt["img2img_superres"], "--num_samples", "8", "--num_real", "300",
                                 "--judge_epochs", "3", "--steps", "3", "--cfg_scale", "0", "--sampler", "ddim",
                                 "--device", "cpu", "--out", "e2.json"])
        out["evaluate_superres"] = [[r["psnr"], r["class_accuracy"], r["judge_fd"]] for r in figures["rows"]]
        figures = evaluate.main(["--ckpt", ckpt["ddpm"], "--repaint", "true", "--num_samples", "4", "--num_real",
                                 "300", "--judge_epochs", "3", "--steps", "4", "--jump_length", "2",
                                 "--jump_n_sample", "2", "--device", "cpu", "--out", "e3.json"])
        out["evaluate_repaint"] = [[r["psnr"], r["class_accuracy"], r["judge_fd"]] for r in figures["rows"]]
        visualize.main(["trajectory", "--ckpt", ckpt["sd_latent"], "--steps", "3", "--frames", "2", "--device", "cpu",
                        "--out", "v1.png"])
        visualize.main(["guidance", "--ckpt", ckpt["conditional_xattn"], "--steps", "3", "--n", "1", "--scales",
                        "1,3", "--device", "cpu", "--out", "v2.png"])
        visualize.main(["trajectory", "--ckpt", ckpt["img2img_inpaint"], "--steps", "3", "--frames", "2", "--device",
                        "cpu", "--out", "v3.png"])
        out["visualize"] = {name: block_means(root / name) for name in ("v1.png", "v2.png", "v3.png")}
        train_sd.main(["--sample", "--ckpt", ckpt["sd_pixels"], "--prompt", "a green ring", "--n_per_prompt", "2",
                       "--out", "t1.png"])
        out["visualize"]["t1.png"] = block_means(root / "t1.png")
    with open(root / "results" / "vae" / "vae_metrics.json") as f:
        metrics = json.load(f)
    out["vae_metrics"] = [metrics[k] for k in ("psnr_mean", "ssim_mean", "scaling_factor", "shift_factor")]
    return out


def make_runs(root):
    """Every family trained in `root`, then the tools; returns the whole record."""
    models = {"<vae>": write_tiny_vae(root / "tiny_vae")}
    with inside(root):
        train_sd.main(["--make_tiny_models", "tiny_sd"])
    models["<text>"] = str(root / "tiny_sd" / "text_encoder")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = {name: train(name, root, models) for name in FAMILIES}
        return {"runs": runs, "tools": tools(root)}
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fixed_seed")
    return root, make_runs(root)


@pytest.fixture(scope="module")
def recorded():
    with open(RECORD) as f:
        return json.load(f)


def close(a, b, rtol, atol):
    return np.allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), rtol=rtol, atol=atol, equal_nan=True)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_losses_and_grids_are_the_recorded_ones(runs, recorded, name):
    _, now = runs
    run, before = now["runs"][name], recorded["runs"][name]
    assert len(run["losses"]) == STEPS
    assert close(run["losses"], before["losses"], 1e-4, 1e-6), (run["losses"], before["losses"])
    assert sorted(run["grids"]) == sorted(before["grids"])
    for picture, tiles in run["grids"].items():
        difference = np.abs(np.asarray(tiles) - np.asarray(before["grids"][picture]))
        assert difference.max() <= 2.0, f"{name}: {picture} differs by up to {difference.max():.2f} of 255"


def test_tools_measure_the_recorded_figures(runs, recorded):
    _, now = runs
    tools_now, before = now["tools"], recorded["tools"]
    assert sorted(tools_now) == sorted(before)
    for key in ("sample_conditional", "sample_dit", "sample_latent", "sample_unconditional"):
        difference = np.abs(uint8_values(tools_now[key]) - uint8_values(before[key]))
        assert difference.max() <= 2, f"{key}: up to {difference.max()} of 255 apart"
    for key in ("evaluate_conditional", "evaluate_superres", "evaluate_repaint", "vae_metrics"):
        assert close(np.asarray(tools_now[key], dtype=np.float64), np.asarray(before[key], dtype=np.float64),
                     1e-3, 1e-4), (key, tools_now[key], before[key])
    for picture, tiles in tools_now["visualize"].items():
        assert np.abs(np.asarray(tiles) - np.asarray(before["visualize"][picture])).max() <= 2.0, picture


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--record", action="store_true", help=f"write {RECORD.relative_to(REPO)}")
    parser.add_argument("--keep", default=None, help="also copy the runs' folders here (for checks by hand)")
    args = parser.parse_args()
    root = pathlib.Path(args.keep or "/tmp/fixed_seed_runs").resolve()
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    record = make_runs(root)
    text = json.dumps(record, indent=None, separators=(",", ":"))
    if args.record:
        RECORD.write_text(text + "\n")
        print(f"wrote {RECORD} ({len(text) // 1024} KiB); runs in {root}")
    else:
        print(f"runs in {root}; --record writes {RECORD}")


if __name__ == "__main__":
    main()
