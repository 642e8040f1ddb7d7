"""Tests for visualize.py: each mode's picture from tiny checkpoints, what its cells show, and its errors."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import ddpm_conditional  # noqa: E402
import train_sd  # noqa: E402
import visualize  # noqa: E402
from config import network_arch  # noqa: E402
from diffusion import SAMPLERS  # noqa: E402
from latents import load_latents, load_text_encoder  # noqa: E402
from modules import DIT_SIZES, DiT, UNet, UNet_conditional, build_network  # noqa: E402
from utils import UsageError, parse_config, run_cli, save_config, to_uint8  # noqa: E402

FAST = ["--sampler", "ddim", "--steps", "3"]
CELL = round(visualize.CELL_INCHES * visualize.DPI)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def write_run(directory, make_net, **config):
    """models/R/{ema_ckpt.pt, ckpt.pt, config.json} of a tiny U-Net at 16 px with T = 200; returns ema_ckpt.pt."""
    directory.mkdir(parents=True)
    for seed, name in ((1, "ema_ckpt.pt"), (2, "ckpt.pt")):
        torch.manual_seed(seed)
        torch.save(make_net().state_dict(), directory / name)
    cfg = ddpm_conditional.Config(run_name="R", dataset="shapes", image_size=16, base_channels=8, noise_steps=200,
                                  **config)
    save_config(cfg, str(directory / "config.json"))
    return str(directory / "ema_ckpt.pt")


@pytest.fixture(scope="module")
def cond_ckpt(tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("cond") / "models" / "R",
                     lambda: UNet_conditional(num_classes=3, base_channels=8))


def moved_dit():
    """A dit-n/4 network with its zero-initialised weights moved, as after training, so that the class counts."""
    depth, dim, heads = DIT_SIZES["dit-n"]
    net = DiT(num_classes=3, patch_size=4, depth=depth, dim=dim, heads=heads)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    return net


@pytest.fixture(scope="module")
def dit_ckpt(tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("dit") / "models" / "R", moved_dit, backbone="dit", dit_size="dit-n",
                     patch_size=4)


@pytest.fixture(scope="module")
def uncond_ckpt(tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("uncond") / "models" / "R", lambda: UNet(base_channels=8))


@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory, tiny_sd_models):
    """A train_sd.py run on the tiny random VAE (factor 2, 4 latent channels) and CLIP: 16 px images, 8 px latents."""
    root = tmp_path_factory.mktemp("text")
    cfg = parse_config(train_sd.Config, ["--vae", tiny_sd_models["vae"], "--text_encoder",
                                         tiny_sd_models["text_encoder"], "--dataset", "shapes", "--image_size", "16",
                                         "--base_channels", "8", "--noise_steps", "200", "--prompt",
                                         "a photo of a red circle", "--run_name", "S"])
    latents = load_latents(cfg.vae, "cpu", cfg.mixed_precision, cfg.channels or 3)
    text = load_text_encoder(cfg.text_encoder, cfg.conditioning, "cpu", cfg.mixed_precision)
    torch.manual_seed(0)
    net = build_network(network_arch(cfg, latents.channels, context_dim=text.dim))
    run_dir = root / "models" / "S"
    run_dir.mkdir(parents=True)
    torch.save(net.state_dict(), run_dir / "ema_ckpt.pt")
    save_config(cfg, str(run_dir / "config.json"))
    return str(run_dir / "ema_ckpt.pt")


def options(argv):
    return parse_config(visualize.Config, argv)


def png(path):
    """(width, height), pixels (H, W, 3) of a PNG."""
    with Image.open(path) as image:
        return image.size, np.asarray(image.convert("RGB"))


def expected_size(rows, cols):
    return cols * CELL, rows * CELL + round(visualize.HEADER_INCHES * visualize.DPI)


def shown_image(figure, index, pixels, size):
    """The size x size image that axes `index` of the drawn figure shows, read from the PNG's pixels (H, W, 3) at
    the centre of each image pixel (the figure's display coordinates are the PNG's pixels, from the bottom)."""
    box = figure.axes[index].get_window_extent()
    columns = (box.x0 + (np.arange(size) + 0.5) * box.width / size).astype(int)
    rows = (pixels.shape[0] - (box.y1 - (np.arange(size) + 0.5) * box.height / size)).astype(int)
    return pixels[np.ix_(rows, columns)]


# ----------------------------------------------------------------------------- each mode writes its picture
@pytest.mark.parametrize("mode, argv, rows, cols", [
    ("noising", ["--n", "2", "--frames", "4"], 2, 4),  # x_0 and 3 timesteps
    ("trajectory", FAST + ["--frames", "3", "--label", "2", "--gif", "true"], 2, 4),  # 3 steps, then the result
    ("guidance", FAST + ["--scales", "1,3", "--n", "2", "--compare_raw", "true"], 4, 3),  # EMA and raw rows
])
def test_each_mode_writes_a_png_of_its_grid_size_with_content(cond_ckpt, tmp_path, monkeypatch, mode, argv, rows,
                                                               cols):
    drawn = []

    def recorded_draw(cells, *args):
        drawn.append((cells, real_draw(cells, *args)))
        return drawn[-1][1]

    real_draw = visualize.draw
    monkeypatch.setattr(visualize, "draw", recorded_draw)
    out = str(tmp_path / f"{mode}.png")
    assert visualize.main([mode, "--ckpt", cond_ckpt, "--out", out, "--device", "cpu", *argv]) == out
    size, pixels = png(out)
    assert size == expected_size(rows, cols)
    assert pixels.std() > 10 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50
    ((cells, figure),) = drawn
    assert len(cells) == rows and all(len(row) == cols for row in cells)
    image = to_uint8(cells[0][-1]).permute(1, 2, 0).numpy()  # the top right cell, (C, H, W) -> (H, W, C)
    assert image.std() > 10  # the cell holds an image
    np.testing.assert_array_equal(shown_image(figure, cols - 1, pixels, 16), image)
    if mode == "trajectory":  # --gif: one frame per step, x_t beside x0_pred, the last held for a second
        frames, durations = [], []
        with Image.open(tmp_path / "trajectory.gif") as gif:
            assert gif.size == (256, 128) and gif.n_frames == 3
            for index in range(gif.n_frames):
                gif.seek(index)
                frames.append(np.asarray(gif.convert("RGB")))
                durations.append(gif.info["duration"])
        assert durations == [100, 100, 1000]
        assert not np.array_equal(frames[0], frames[2]) and frames[0].std() > 10


def test_default_path_is_results_run_name_mode_and_noising_needs_no_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = visualize.main(["noising", "--n", "1", "--frames", "2", "--image_size", "16"])
    assert path == os.path.join("results", "visualize", "noising.png") and os.path.isfile(path)
    assert png(path)[0] == expected_size(1, 2)


# ----------------------------------------------------------------------------- what the cells show
def test_noising_rows_lose_the_image_as_t_grows_with_one_eps_per_row():
    cfg = options(["--mode", "noising", "--n", "3", "--frames", "6"])  # parse_config validates: noising needs no --ckpt
    cells, titles, names, title = visualize.noising(cfg, {"noise_steps": 200, "image_size": 16, "dataset": "shapes"},
                                                    "cpu")
    assert titles[0] == "x_0" and titles[1].startswith("t=40\n") and titles[-1].startswith("t=199\n")
    assert len(cells) == 3 and "T=200" in title
    for row in cells:
        errors = [(x_t - row[0]).pow(2).mean().item() for x_t in row[1:]]
        assert errors == sorted(errors) and errors[0] > 0


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_trajectory_of_every_sampler_shows_its_steps_and_timesteps(cond_ckpt, sampler):
    steps = [] if sampler == "ddpm" else ["--steps", "4"]  # ddpm: the hand-written Alg. 2, T-1 = 199 steps
    cfg = options(["--ckpt", cond_ckpt, "--sampler", sampler, "--frames", "3", "--device", "cpu", *steps])
    loaded = visualize.load(cfg, cfg.ckpt, "cpu")
    cells, titles, names, title = visualize.trajectory(cfg, loaded)
    n_steps = 199 if sampler == "ddpm" else 4
    assert titles[0] == f"step 1/{n_steps}\nt=199" and titles[-2].startswith(f"step {n_steps}/{n_steps}\nt=")
    assert titles[-1] == "result x_0" and len(titles) == 4 and names == ["x_t (net input)", "predicted x_0"]
    assert f"{n_steps} steps" in title and "class 0" in title
    assert cells[1][-1] is None and all(cell.shape == (3, 16, 16) for cell in cells[0])
    # x_T ~ N(0, I) in the DDPM convention, also for euler_a (whose own x_t is scaled by sigma_T, about 2.5 here),
    # shown clamped to [-1, 1]: about a third of N(0, I) saturates, about 70% of the sigma-scaled x_t would
    saturated = (cells[0][0].abs() >= 1).float().mean().item()
    assert 0.2 < saturated < 0.5


def test_guidance_columns_same_seed_scale_0_equals_1_and_3_differs(cond_ckpt):
    cfg = options(["--ckpt", cond_ckpt, "--scales", "0,1,3", "--n", "2", "--label", "1", *FAST])
    cells, titles, names, _ = visualize.guidance(cfg, visualize.load(cfg, cfg.ckpt, "cpu"))
    assert titles == ["unconditional", "scale 0", "scale 1", "scale 3"] and names == ["EMA, image 0", "EMA, image 1"]
    for uncond, scale_0, scale_1, scale_3 in cells:
        assert torch.allclose(scale_0, scale_1, atol=1e-5)
        assert not torch.allclose(scale_1, scale_3, atol=1e-3) and not torch.allclose(uncond, scale_1, atol=1e-3)
    assert not torch.allclose(cells[0][1], cells[1][1])  # two images, two noises


def test_a_dit_checkpoint_is_rebuilt_and_guided_like_a_unet(dit_ckpt, tmp_path):
    cfg = options(["--ckpt", dit_ckpt, "--scales", "0,1,3", "--n", "1", "--label", "2", *FAST])
    loaded = visualize.load(cfg, cfg.ckpt, "cpu")
    assert type(loaded.net) is DiT and loaded.saved["backbone"] == "dit"
    cells, titles, _, _ = visualize.guidance(cfg, loaded)
    ((uncond, scale_0, scale_1, scale_3),) = cells
    assert torch.allclose(scale_0, scale_1, atol=1e-5) and not torch.allclose(scale_1, scale_3, atol=1e-3)
    out = str(tmp_path / "trajectory.png")
    assert visualize.main(["trajectory", "--ckpt", dit_ckpt, "--frames", "2", "--out", out, *FAST]) == out
    assert png(out)[0] == expected_size(2, 3)


def test_text_checkpoint_trajectory_and_guidance_decode_latents_through_the_vae(text_ckpt, tmp_path):
    cfg = options(["--ckpt", text_ckpt, "--frames", "2", *FAST])
    loaded = visualize.load(cfg, cfg.ckpt, "cpu")
    assert loaded.diffusion.c_in == 4 and loaded.diffusion.image_size == 8  # the U-Net runs on latents
    cells, titles, _, title = visualize.trajectory(cfg, loaded)
    assert '"a photo of a red circle"' in title
    assert all(cell.shape == (3, 16, 16) for cell in cells[0] + cells[1][:-1])  # decoded pixels, not latents
    out = str(tmp_path / "guidance.png")
    visualize.main(["guidance", "--ckpt", text_ckpt, "--prompt", "a blue triangle", "--scales", "2", "--n", "1",
                    "--out", out, *FAST])
    assert png(out)[0] == expected_size(1, 2)


def test_a_latent_class_run_is_decoded_through_its_vae(latent_run, tmp_path):
    cfg = options(["--ckpt", latent_run["ckpt"], "--label", "1", "--frames", "2", *FAST])
    loaded = visualize.load(cfg, cfg.ckpt, "cpu")
    assert loaded.diffusion.c_in == 4 and loaded.diffusion.image_size == 8  # the U-Net runs on latents
    cells, _, _, title = visualize.trajectory(cfg, loaded)
    assert "class 1" in title
    assert all(cell.shape == (3, 16, 16) for cell in cells[0] + cells[1][:-1])  # decoded pixels, not latents
    out = str(tmp_path / "guidance.png")
    visualize.main(["guidance", "--ckpt", latent_run["ckpt"], "--label", "2", "--scales", "2", "--n", "1", "--out",
                    out, *FAST])
    assert png(out)[0] == expected_size(1, 2)


# ----------------------------------------------------------------------------- errors
def run_main(argv):
    """visualize.main through run_cli, as the command line runs it; returns the exit code (0 on success)."""
    try:
        run_cli(visualize.main, argv)
    except SystemExit as exc:
        return exc.code
    return 0


@pytest.mark.parametrize("argv, message", [
    (["zoom"], "mode 'zoom' is unknown"),
    (["--mode", "noise"], "mode 'noise' is unknown: use one of noising, trajectory, guidance"),
    (["trajectory"], "trajectory needs a checkpoint"),
    (["guidance", "--ckpt", "{cond}", "--scales", "1,x"], "--scales '1,x' is not a comma-separated list"),
    (["guidance", "--ckpt", "{cond}", "--scales", "-2"], "negative"),
    (["trajectory", "--ckpt", "{uncond}", "--label", "3"], "unconditional: drop --label"),
    (["trajectory", "--ckpt", "{cond}", "--label", "7"], "label 7 is outside the model's 3 classes"),
    (["trajectory", "--ckpt", "{cond}", "--prompt", "a cat"], "--prompt is for train_sd.py checkpoints"),
    (["guidance", "--ckpt", "{uncond}"], "guidance needs a conditional checkpoint"),
    (["noising", "--timesteps", "5,200", "--image_size", "16", "--ckpt", "{cond}"], "leaves 0..199"),
    (["trajectory", "--ckpt", "{cond}", "--sampler", "plms"], "sampler 'plms' is unknown"),
    (["trajectory", "--ckpt", "{cond}", "--out", "x.gif"], "use a .png file name"),
])
def test_bad_input_is_one_line_and_exit_2(cond_ckpt, uncond_ckpt, tmp_path, capsys, argv, message):
    argv = [item.format(cond=cond_ckpt, uncond=uncond_ckpt) for item in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "x.png")]
    assert run_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not os.path.exists(tmp_path / "x.png")


def test_a_text_checkpoint_takes_a_prompt_not_a_label(text_ckpt, tmp_path, capsys):
    out = tmp_path / "x.png"
    assert run_main(["trajectory", "--ckpt", text_ckpt, "--label", "1", "--out", str(out), *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert "this is a train_sd.py (text) checkpoint: drop --label and pass --prompt" in err
    assert len(err.splitlines()) == 1 and not out.exists()


def test_compare_raw_needs_ckpt_pt_beside(cond_ckpt, tmp_path, capsys):
    lone = tmp_path / "alone" / "ema_ckpt.pt"
    lone.parent.mkdir()
    lone.write_bytes(open(cond_ckpt, "rb").read())
    assert run_main(["guidance", "--ckpt", str(lone), "--compare_raw", "true", *FAST]) == 2
    assert "--compare_raw needs models/<run>/ema_ckpt.pt with ckpt.pt beside it" in capsys.readouterr().err


def test_cli_subprocess_writes_the_strip(tmp_path):
    script = os.path.join(REPO, "visualize.py")
    out = tmp_path / "strip.png"
    ok = subprocess.run([sys.executable, script, "noising", "--n", "1", "--frames", "3", "--image_size", "16",
                         "--out", str(out)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert f"saved {out}" in ok.stdout and png(out)[0] == expected_size(1, 3)


def test_trajectory_of_an_img2img_run_restores_its_held_out_input(img2img_runs, monkeypatch):
    monkeypatch.chdir(img2img_runs["root"])  # where the run's data and held-out split are rebuilt
    args = ["--ckpt", img2img_runs["superres"], "--frames", "3", "--cfg_scale", "0", *FAST]
    results = {}
    for image in (2, 3):
        cfg = options([*args, "--image", str(image)])
        results[image] = visualize.trajectory(cfg, visualize.load(cfg, cfg.ckpt, "cpu"))
    cells, titles, _, title = results[2]
    assert titles[0] == "input" and titles[-1] == "result x_0" and cells[1][0] is None
    assert "superres of held-out image 2" in title
    low = cells[0][0]  # the 4 px input shown at 16 px: constant on each 4 x 4 block
    torch.testing.assert_close(low, low[:, ::4, ::4].repeat_interleave(4, 1).repeat_interleave(4, 2))
    assert not torch.equal(cells[0][-1], results[3][0][0][-1])  # another input, another result from the same noise
    with pytest.raises(UsageError, match="--image 8: the run holds out 8 images; use 0..7"):
        cfg = options([*args, "--image", "8"])
        visualize.load(cfg, cfg.ckpt, "cpu")
