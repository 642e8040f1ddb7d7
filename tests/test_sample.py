"""Tests for sample.py: the grid it writes from any checkpoint (rebuilt by checkpoints.load_model, tested in
test_checkpoints.py), its image inputs, its flags, and its errors."""

import math
import os
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import ddpm_conditional  # noqa: E402
import sample  # noqa: E402
import train_sd  # noqa: E402
from config import network_arch  # noqa: E402
from conftest import write_dit_run  # noqa: E402
from diffusion import Diffusion  # noqa: E402
from modules import UNet_conditional, build_network  # noqa: E402
from utils import parse_config, run_cli, save_config  # noqa: E402

FAST = ["--sampler", "ddim", "--steps", "2"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def grid_size(rows, cols, size, captioned=True, padding=2):
    """(width, height) of utils.save_images' grid of rows x cols images of size x size pixels.

    Images are shown at 64 px or more (an integer nearest-neighbour factor); a conditional grid has a 14 px
    caption strip above each row. Without captions make_grid returns a single image as it is, without padding.
    """
    shown = size * math.ceil(64 / size)
    if rows * cols == 1 and not captioned:
        return shown, shown
    return (cols * shown + (cols + 1) * padding,
            rows * shown + (rows + 1) * padding + (14 * rows if captioned else 0))


def run_main(argv):
    """sample.main through run_cli, as the command line runs it; returns the exit code (0 on success)."""
    try:
        run_cli(sample.main, argv)
    except SystemExit as exc:
        return exc.code
    return 0


def image_size_of(path):
    with Image.open(path) as image:
        return image.size


# ----------------------------------------------------------------------------- the sampler and each kind of network
def test_defaults_passed_to_the_sampler(ref_cond, ref_uncond, tmp_path, monkeypatch):
    calls = []

    def fake_sample_x0(self, model, n, labels, cfg_scale, **kwargs):
        calls.append((n, labels, cfg_scale, kwargs))
        return torch.zeros(n, self.c_in, self.image_size, self.image_size)

    monkeypatch.setattr(Diffusion, "sample_x0", fake_sample_x0)  # what sample.main calls, then decodes
    sample.main(["--ckpt", ref_cond, "--out", str(tmp_path / "c.png")])
    n, labels, cfg_scale, kwargs = calls[-1]
    assert n == 30 and labels.tolist() == [0] * 10 + [1] * 10 + [2] * 10 and cfg_scale == 3.0
    assert kwargs == {"sampler": "dpm++", "steps": None, "seed": 0}
    assert image_size_of(tmp_path / "c.png") == grid_size(3, 10, 64)
    sample.main(["--ckpt", ref_uncond, "--n_samples", "5", "--out", str(tmp_path / "u.png"), "--sampler", "ddpm"])
    n, labels, cfg_scale, kwargs = calls[-1]
    assert (n, labels, cfg_scale, kwargs["sampler"]) == (5, None, 0.0, "ddpm")


@pytest.mark.parametrize("conditioning", UNet_conditional.CONDITIONINGS)
def test_each_conditioning_mode_samples_its_grid(conditioning, tmp_path):
    torch.manual_seed(0)
    net = UNet_conditional(num_classes=3, base_channels=8, conditioning=conditioning, concat_channels=5,
                           context_tokens=2)
    run = tmp_path / "models" / "R"
    run.mkdir(parents=True)
    torch.save(net.state_dict(), run / "ema_ckpt.pt")
    save_config(ddpm_conditional.Config(run_name="R", image_size=16, base_channels=8, conditioning=conditioning),
                str(run / "config.json"))
    images = sample.main(["--ckpt", str(run / "ema_ckpt.pt"), "--n_per_row", "1", "--cfg_scale", "3",
                          "--out", str(tmp_path / "grid.png"), *FAST])
    assert images.shape == (3, 3, 16, 16)


def test_a_config_naming_another_mode_than_the_weights_is_an_error(ref_cond, tmp_path, capsys):
    save_config(ddpm_conditional.Config(run_name="ref", conditioning="xattn"),
                os.path.join(os.path.dirname(ref_cond), "config.json"))
    assert run_main(["--ckpt", ref_cond, "--out", str(tmp_path / "grid.png"), *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert "conditioned by 'add', but its saved config says 'xattn'" in err and "\n" not in err


def test_a_dit_checkpoint_samples_a_grid_at_its_saved_size(tmp_path):
    _, ckpt = write_dit_run(tmp_path)
    images = sample.main(["--ckpt", ckpt, "--n_per_row", "2", "--out", str(tmp_path / "grid.png"), *FAST])
    assert images.shape == (6, 3, 16, 16) and image_size_of(tmp_path / "grid.png") == grid_size(3, 2, 16)


def test_a_dit_checkpoint_without_its_config_exits_2_with_one_line(tmp_path, capsys):
    _, ckpt = write_dit_run(tmp_path)
    os.remove(os.path.join(os.path.dirname(ckpt), "config.json"))
    assert run_main(["--ckpt", ckpt, "--out", str(tmp_path / "grid.png"), *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds a DiT, but no saved config names its dit_size and patch_size" in err and "\n" not in err


def test_a_train_sd_checkpoint_is_refused_with_one_line_naming_train_sd(tmp_path, capsys):
    cfg = train_sd.Config(run_name="S", image_size=16, base_channels=8, text_encoder="tiny/clip",
                          prompt=["a red circle"])
    torch.manual_seed(0)
    net = build_network(network_arch(cfg, 4, context_dim=32))
    run = tmp_path / "models" / "S"
    run.mkdir(parents=True)
    torch.save(net.state_dict(), run / "ema_ckpt.pt")
    save_config(cfg, str(run / "config.json"))
    out = tmp_path / "grid.png"
    assert run_main(["--ckpt", str(run / "ema_ckpt.pt"), "--out", str(out), *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and not out.exists()
    assert "is a train_sd.py checkpoint" in err and f"python train_sd.py --sample --ckpt {run / 'ema_ckpt.pt'}" in err


# ----------------------------------------------------------------------------- grids and files
def test_grid_has_one_row_per_label(ref_cond, tmp_path):
    out = tmp_path / "grid.png"
    images = sample.main(["--ckpt", ref_cond, "--labels", "0,1,2", "--n_per_row", "2", "--image_size", "16",
                          "--out", str(out), *FAST])
    assert images.shape == (6, 3, 16, 16) and images.dtype == torch.uint8
    assert image_size_of(out) == grid_size(3, 2, 16)  # width 2*64+3*2, height 3*(14+64)+4*2


def test_repo_layout_uses_saved_image_size(run_dir, tmp_path):
    out = tmp_path / "grid.jpg"
    sample.main(["--ckpt", str(run_dir / "ema_ckpt.pt"), "--n_per_row", "1", "--out", str(out), *FAST])
    assert image_size_of(out) == grid_size(3, 1, 16)  # all 3 classes, at the saved 16 px
    sample.main(["--ckpt", str(run_dir / "training_state.pt"), "--labels", "2", "--n_per_row", "1",
                 "--out", str(out), *FAST])
    assert image_size_of(out) == grid_size(1, 1, 24)


def test_unconditional_grid(ref_uncond, tmp_path):
    out = tmp_path / "grid.png"
    images = sample.main(["--ckpt", ref_uncond, "--n_samples", "4", "--image_size", "16", "--out", str(out), *FAST])
    assert images.shape == (4, 3, 16, 16)
    assert image_size_of(out) == grid_size(2, 2, 16, captioned=False)


def test_save_individual_names_label_and_index(ref_cond, tmp_path):
    folder = tmp_path / "single"
    sample.main(["--ckpt", ref_cond, "--labels", "2,0", "--n_per_row", "2", "--image_size", "16",
                 "--out", str(tmp_path / "grid.png"), "--save_individual", str(folder), *FAST])
    assert sorted(os.listdir(folder)) == ["0_0.png", "0_1.png", "2_0.png", "2_1.png"]
    assert image_size_of(folder / "2_1.png") == (16, 16)


def test_same_seed_same_grid(ref_cond, tmp_path):
    def grid(seed, name):
        out = tmp_path / name
        sample.main(["--ckpt", ref_cond, "--labels", "1", "--n_per_row", "2", "--image_size", "16",
                     "--seed", str(seed), "--out", str(out), *FAST])
        return out.read_bytes()

    first = grid(0, "a.png")
    assert grid(0, "b.png") == first
    assert grid(1, "c.png") != first


def test_existing_out_is_replaced(ref_cond, tmp_path):
    out = tmp_path / "grid.png"
    out.write_bytes(b"old")
    sample.main(["--ckpt", ref_cond, "--labels", "0", "--n_per_row", "1", "--image_size", "16",
                 "--out", str(out), *FAST])
    assert image_size_of(out) == grid_size(1, 1, 16)
    assert not (tmp_path / "grid.png.tmp").exists()


def test_reference_full_size_conditional_checkpoint(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "ema_ckpt.pt"
    torch.save(UNet_conditional(num_classes=10).state_dict(), path)  # the reference's widths: 23M parameters
    out = tmp_path / "grid.png"
    images = sample.main(["--ckpt", str(path), "--image_size", "16", "--sampler", "ddim", "--steps", "1",
                          "--n_per_row", "1", "--labels", "0", "--out", str(out)])
    assert images.shape == (1, 3, 16, 16)
    assert image_size_of(out) == grid_size(1, 1, 16)


# ----------------------------------------------------------------------------- errors
def truncated(src, dst):
    with open(src, "rb") as f:
        data = f.read()
    dst.write_bytes(data[: len(data) // 2])
    return str(dst)


def with_state(src, dst, change):
    state = torch.load(src, weights_only=True)
    change(state)
    torch.save(state, dst)
    return str(dst)


def add_extra_key(state):
    state["extra.weight"] = torch.zeros(3)


def misshape_key(state):
    state["sa1.mha.in_proj_weight"] = torch.zeros(3, 16)


BAD_INPUTS = {
    "label outside": (["--labels", "0,5"], "label 5 is outside the model's 3 classes: use 0..2"),
    "negative label": (["--labels", "-1"], "label -1 is outside the model's 3 classes"),
    "labels not ints": (["--labels", "0,a"], "is not a comma-separated list of class ids"),
    "cfg_scale": (["--cfg_scale", "-1"], "cfg_scale -1.0 is negative"),
    "image_size": (["--image_size", "12"], "image_size 12 is not divisible by 8"),
    "sampler": (["--sampler", "plms"], "sampler 'plms' is unknown"),
    "out format": (["--out", "grid.gif"], "use a .png or .jpg file name"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_options_exit_2_with_one_line(name, ref_cond, tmp_path, capsys):
    flags, message = BAD_INPUTS[name]
    out = tmp_path / "grid.png"
    argv = ["--ckpt", ref_cond, "--image_size", "16", "--out", str(out), *FAST, *flags]
    assert run_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err
    assert not out.exists()


@pytest.mark.parametrize("make, message", [
    (lambda src, tmp: truncated(src, tmp / "cut.pt"), "is not a readable PyTorch checkpoint"),
    (lambda src, tmp: (tmp / "notes.txt").write_text("not weights\n") and str(tmp / "notes.txt"),
     "is not a readable PyTorch checkpoint"),
    (lambda src, tmp: with_state(src, tmp / "extra.pt", add_extra_key), "1 unexpected keys (extra.weight)"),
    (lambda src, tmp: with_state(src, tmp / "shape.pt", misshape_key), "1 shape mismatches (sa1.mha.in_proj_weight"),
    (lambda src, tmp: str(tmp / "missing.pt"), "not found"),
    (lambda src, tmp: torch.save({"a": 1}, tmp / "dict.pt") or str(tmp / "dict.pt"), "is not a model state_dict"),
    (lambda src, tmp: torch.save({"x": torch.zeros(2)}, tmp / "other.pt") or str(tmp / "other.pt"),
     "is not a U-Net"),
], ids=["truncated", "text file", "extra key", "mis-shaped key", "missing file", "not tensors", "other network"])
def test_bad_checkpoints_exit_2_with_one_line(make, message, ref_cond, tmp_path, capsys):
    path = make(ref_cond, tmp_path)
    assert run_main(["--ckpt", path, "--out", str(tmp_path / "grid.png"), *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err


def test_labels_for_unconditional_model_is_an_error(ref_uncond, tmp_path, capsys):
    assert run_main(["--ckpt", ref_uncond, "--labels", "0", "--out", str(tmp_path / "g.png")]) == 2
    assert "this checkpoint is unconditional: drop --labels" in capsys.readouterr().err


def test_missing_ckpt_flag_and_unknown_flag(capsys):
    assert run_main([]) == 2
    assert "no checkpoint given: pass --ckpt" in capsys.readouterr().err
    assert run_main(["--ckpt", "x.pt", "--cfg", "3"]) == 2
    assert "unrecognized arguments: --cfg 3" in capsys.readouterr().err


def test_help_lists_defaults(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_config(sample.Config, ["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "(default: grid.png)" in text and "(default: 10)" in text
    assert "None: dpm++, or ddpm for --inpaint" in " ".join(text.split())  # the sampler's default, which RePaint needs


@pytest.mark.parametrize("ckpt, old, new, value", [("ref_cond", "--n_per_label", "--n_per_row", "2"),
                                                   ("ref_uncond", "--n", "--n_samples", "3")])
def test_the_old_flag_names_still_parse_to_the_same_images_with_a_one_line_note(ckpt, old, new, value, tmp_path,
                                                                                 capsys, request):
    argv = ["--ckpt", request.getfixturevalue(ckpt), "--image_size", "16", *FAST]
    renamed = sample.main([*argv, new, value, "--out", str(tmp_path / "new.png")])
    assert not [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    kept = sample.main([*argv, old, value, "--out", str(tmp_path / "old.png")])
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert notes == [f"note: {old} is now {new}; the old name still works"]
    assert len(kept) == len(renamed) and torch.equal(kept, renamed)
    assert (tmp_path / "old.png").read_bytes() == (tmp_path / "new.png").read_bytes()


# ----------------------------------------------------------------------------- the command line
def test_a_latent_run_samples_latents_and_decodes_them_through_its_vae(latent_run, tmp_path, decoded):
    out = tmp_path / "grid.png"
    images = sample.main(["--ckpt", latent_run["ckpt"], "--labels", "0,1", "--n_per_row", "2", "--out", str(out),
                          "--device", "cpu", *FAST])
    assert decoded == [(4, 4, 8, 8)]  # the U-Net sampled 8 px latents of 4 channels; the VAE made them pixels
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.uint8
    assert image_size_of(out) == grid_size(2, 2, 16)


def run_script(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "sample.py", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          check=False, timeout=300)


def test_cli_writes_grid_and_single_images(run_dir, tmp_path):
    out, folder = tmp_path / "out" / "grid.png", tmp_path / "single"
    result = run_script("--ckpt", str(run_dir / "ema_ckpt.pt"), "--labels", "0,1", "--n_per_row", "2",
                        "--cfg_scale", "3", "--seed", "0", "--device", "cpu", "--out", str(out),
                        "--save_individual", str(folder), *FAST)
    assert result.returncode == 0, result.stderr
    assert image_size_of(out) == grid_size(2, 2, 16)
    assert sorted(os.listdir(folder)) == ["0_0.png", "0_1.png", "1_0.png", "1_1.png"]


def test_cli_bad_label_exits_2(run_dir, tmp_path):
    out = tmp_path / "grid.png"
    result = run_script("--ckpt", str(run_dir / "ema_ckpt.pt"), "--labels", "12", "--out", str(out))
    assert result.returncode == 2
    assert result.stderr.strip() == "error: label 12 is outside the model's 3 classes: use 0..2"
    assert not out.exists()


# ----------------------------------------------------------------------------- image inputs: --condition, --inpaint
def write_png(path, pixels):
    """Save uint8 pixels (H, W) as grey or (H, W, 3) as RGB; returns the path as a string."""
    Image.fromarray(pixels.numpy() if torch.is_tensor(pixels) else pixels).save(path)
    return str(path)


def half_mask(path, size=16):
    """White (to fill) lower half."""
    pixels = torch.zeros(size, size, dtype=torch.uint8)
    pixels[size // 2:] = 255
    return write_png(path, pixels)


def rgb(size, seed=0):
    return torch.randint(0, 256, (size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_superres_samples_one_column_per_input_of_a_folder(img2img_runs, tmp_path):
    folder = tmp_path / "low"
    folder.mkdir()
    for i in range(2):
        write_png(folder / f"{i}.png", rgb(4, i))  # 16 px / scale 4
    out = tmp_path / "sr.png"
    images = sample.main(["--ckpt", img2img_runs["superres"], "--condition", str(folder), "--n_per_input", "2",
                          "--out", str(out), *FAST])
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.uint8
    assert image_size_of(out) == grid_size(4, 2, 16)  # input, output 1, output 2, bicubic


def test_an_inpaint_checkpoint_takes_the_image_and_its_mask(img2img_runs, tmp_path):
    image = write_png(tmp_path / "image.png", rgb(16))
    images = sample.main(["--ckpt", img2img_runs["inpaint"], "--condition", image, "--mask",
                          half_mask(tmp_path / "mask.png"), "--out", str(tmp_path / "grid.png"), *FAST])
    assert images.shape == (1, 3, 16, 16)


def test_repaint_keeps_the_known_pixels_of_the_image_and_fills_the_hole(img2img_runs, tmp_path):
    pixels = rgb(16)
    image = write_png(tmp_path / "image.png", pixels)
    images = sample.main(["--ckpt", img2img_runs["uncond"], "--inpaint", image, "--mask",
                          half_mask(tmp_path / "mask.png"), "--jump_length", "5", "--jump_n_sample", "2",
                          "--n_per_input", "2", "--out", str(tmp_path / "grid.png")])
    assert images.shape == (2, 3, 16, 16)
    assert torch.equal(images[:, :, :8], pixels.permute(2, 0, 1)[None, :, :8].expand(2, -1, -1, -1))
    assert not torch.equal(images[0, :, 8:], images[1, :, 8:])  # two completions of the hole


@pytest.mark.parametrize("run, args, message", [
    ("superres", ["--condition", "{rgb16}"], r"--condition image '.*rgb16.png' is 16x16 pixels, but this checkpoint "
                                              r"takes 4x4: resize it to 4x4"),
    ("superres", ["--condition", "{grey4}"], r"--condition image '.*grey4.png' is grey, but this checkpoint takes RGB "
                                              r"images \(3 channels\): convert it"),
    ("superres", [], r"this checkpoint is conditioned on a superres image: pass --condition IMAGE"),
    ("inpaint", ["--condition", "{rgb16}"], r"an inpaint checkpoint needs --mask MASK beside --condition"),
    ("uncond", ["--inpaint", "{rgb16}"], r"--inpaint needs --mask MASK: a black-and-white image"),
    ("uncond", ["--inpaint", "{rgb16}", "--mask", "{mask}", "--sampler", "dpm++"],
     r"RePaint runs inside DDPM Alg. 2, not with --sampler dpm\+\+: pass --sampler ddpm"),
    ("uncond", ["--inpaint", "{rgb16}", "--mask", "{mask}", "--reconstruction_guidance", "-2"],
     r"reconstruction_guidance -2.0 must be >= 0 \(0: RePaint alone\)"),
    ("uncond", ["--inpaint", "{rgb16}", "--mask", "{grey_mask}"], r"mask '.*grey_mask.png' is not binary"),
    ("uncond", ["--inpaint", "{rgb16}", "--mask", "{empty_mask}"], r"mask '.*empty_mask.png' is empty"),
    ("uncond", ["--inpaint", "{rgb16}", "--mask", "{full_mask}"], r"mask '.*full_mask.png' covers every pixel"),
    ("uncond", ["--condition", "{rgb16}"], r"--condition is for ddpm_img2img.py checkpoints, and this one reads no "
                                            r"image: .* --inpaint IMAGE --mask MASK"),
])
def test_bad_image_input_is_one_line_naming_the_fix_and_exit_2(img2img_runs, tmp_path, capsys, run, args, message):
    files = {"rgb16": write_png(tmp_path / "rgb16.png", rgb(16)),
             "grey4": write_png(tmp_path / "grey4.png", rgb(4)[:, :, 0]),
             "mask": half_mask(tmp_path / "mask.png"),
             "grey_mask": write_png(tmp_path / "grey_mask.png", torch.full((16, 16), 128, dtype=torch.uint8)),
             "empty_mask": write_png(tmp_path / "empty_mask.png", torch.zeros(16, 16, dtype=torch.uint8)),
             "full_mask": write_png(tmp_path / "full_mask.png", torch.full((16, 16), 255, dtype=torch.uint8))}
    out = tmp_path / "grid.png"
    code = run_main(["--ckpt", img2img_runs[run], *[a.format(**files) for a in args], "--out", str(out)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and not out.exists()
    assert re.search(message, lines[0]), lines[0]
