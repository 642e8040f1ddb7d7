"""degradations.py: the condition of each image-to-image task, its baseline, what the result keeps, the settings each
task refuses, and the rows of a run's grid."""
import pytest
import torch
import torch.nn.functional as F

import degradations
from data import Masks
from degradations import (Degradation, blurred_fill, check_task, comparison_rows, condition_channels, grey,
                          inpaint_condition, save_rows)
from utils import UsageError


def halves():
    """(2, 1, 16, 16) holes: the lower half of each image."""
    holes = torch.zeros(2, 1, 16, 16)
    holes[:, :, 8:] = 1
    return holes


# ----------------------------------------------------------------------------- the conditions

def test_each_condition_has_the_channels_and_content_of_its_task():
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    superres = Degradation("superres", scale=4, downsample="box")
    cond = superres.condition(images)
    assert cond.shape == (2, condition_channels("superres", 3), 16, 16)  # SR3: 3 more channels, so 6 in all
    low = F.avg_pool2d(images, 4)  # (2, 3, 4, 4): each pixel the mean of a 4 x 4 block
    torch.testing.assert_close(cond, F.interpolate(low, scale_factor=4, mode="bicubic").clamp(-1, 1))
    assert superres.shown_input(images, cond).unique().numel() <= low.unique().numel()  # nearest: the 16 pixels
    holes = halves()
    inpaint = Degradation("inpaint").condition(images, holes)
    assert inpaint.shape == (2, condition_channels("inpaint", 3), 16, 16)  # Palette: 3 + 1 more channels, 7 in all
    assert (inpaint[:, :3, 8:] == 0).all() and torch.equal(inpaint[:, :3, :8], images[:, :, :8])
    assert torch.equal(inpaint[:, 3:], holes)
    grey_cond = Degradation("colorize").condition(images)
    torch.testing.assert_close(grey_cond[:, 0], 0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2])


def test_condition_channels_of_each_task_on_grey_and_rgb_images():
    """superres: the image's channels; inpaint: one more, the mask; colorize: the one grey channel."""
    assert [condition_channels(task, 3) for task in ("superres", "inpaint", "colorize")] == [3, 4, 1]
    assert [condition_channels(task, 1) for task in ("superres", "inpaint", "colorize")] == [1, 2, 1]
    for channels in (1, 3):  # the count is what the condition holds
        images = torch.rand(2, channels, 16, 16) * 2 - 1
        assert Degradation("superres").condition(images).shape[1] == condition_channels("superres", channels)
        assert Degradation("inpaint").condition(images, halves()).shape[1] == condition_channels("inpaint", channels)


def test_grey_is_the_luma_of_each_pixel():
    images = torch.rand(3, 3, 8, 8) * 2 - 1
    expected = 0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]
    out = grey(images)
    assert out.shape == (3, 1, 8, 8)
    torch.testing.assert_close(out[:, 0], expected)
    white = torch.ones(1, 3, 4, 4)
    torch.testing.assert_close(grey(white), torch.ones(1, 1, 4, 4))  # the weights sum to 1: white stays white


def test_the_low_resolution_image_is_the_block_mean_or_the_antialiased_bicubic():
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    box = Degradation("superres", scale=2, downsample="box").low_res(images)
    torch.testing.assert_close(box, images.unflatten(2, (8, 2)).unflatten(4, (8, 2)).mean(dim=(3, 5)))
    bicubic = Degradation("superres", scale=2, downsample="bicubic").low_res(images)
    expected = F.interpolate(images, scale_factor=0.5, mode="bicubic", antialias=True, align_corners=False)
    torch.testing.assert_close(bicubic, expected.clamp(-1, 1))
    assert bicubic.shape == box.shape == (2, 3, 8, 8) and not torch.allclose(bicubic, box)


def test_inpaint_condition_zeroes_the_hole_and_appends_the_mask():
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    holes = halves()
    cond = inpaint_condition(images, holes)
    assert torch.equal(cond, torch.cat([images * (1 - holes), holes], dim=1))


def test_from_settings_reads_a_runs_config_and_masks_replace_its_masks():
    superres = Degradation.from_settings({"task": "superres", "scale": 2, "downsample": "bicubic", "image_size": 16})
    assert (superres.task, superres.scale, superres.downsample, superres.masks) == ("superres", 2, "bicubic", None)
    old = Degradation.from_settings({"task": "superres", "image_size": 16})  # a config without them: the defaults
    assert (old.scale, old.downsample) == (Degradation.scale, Degradation.downsample)
    inpaint = Degradation.from_settings({"task": "inpaint", "masks": "lower", "image_size": 16})
    assert isinstance(inpaint.masks, Masks) and (inpaint.masks.draw(3)[:, :, 8:] == 1).all()
    assert (inpaint.masks.draw(3)[:, :, :8] == 0).all()
    replaced = Degradation.from_settings({"task": "inpaint", "masks": "lower", "image_size": 16}, masks="halves")
    drawn = replaced.draw_holes(200, torch.Generator().manual_seed(0))
    assert not (drawn[:, :, 8:] == 1).all()  # halves: not always the lower one
    assert superres.draw_holes(4) is None


# ----------------------------------------------------------------------------- baselines and results

def test_each_baseline_is_what_the_input_gives_without_learning():
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    superres = Degradation("superres", scale=4)
    cond = superres.condition(images)
    assert torch.equal(superres.baseline(cond), cond)  # bicubic upsampling: the condition itself
    holes = halves()
    inpaint = Degradation("inpaint")
    cond = inpaint.condition(images, holes)
    torch.testing.assert_close(inpaint.baseline(cond, holes), blurred_fill(images * (1 - holes), holes))
    colorize = Degradation("colorize")
    cond = colorize.condition(images)
    baseline = colorize.baseline(cond)
    assert baseline.shape == (2, 3, 16, 16) and all(torch.equal(baseline[:, c], cond[:, 0]) for c in range(3))
    assert [Degradation(t).baseline_name() for t in ("superres", "inpaint", "colorize")] == ["bicubic",
                                                                                             "blurred fill", "grey"]


def test_inpainting_keeps_the_known_pixels_and_takes_the_output_only_in_the_hole():
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    outputs = torch.rand(2, 3, 16, 16) * 2 - 1
    holes = halves()
    inpaint = Degradation("inpaint")
    result = inpaint.keep_known(outputs, inpaint.condition(images, holes))
    assert torch.equal(result[:, :, :8], images[:, :, :8]) and torch.equal(result[:, :, 8:], outputs[:, :, 8:])
    superres = Degradation("superres")
    assert torch.equal(superres.keep_known(outputs, superres.condition(images)), outputs)  # nothing is known there
    colorize = Degradation("colorize")
    assert torch.equal(colorize.keep_known(outputs, colorize.condition(images)), outputs)


def test_the_blurred_fill_keeps_the_known_pixels_and_fills_the_hole_from_them():
    images = torch.full((1, 1, 8, 8), -1.0)
    images[:, :, :, :4] = 1.0  # left white, right black
    holes = torch.zeros(1, 1, 8, 8)
    holes[:, :, 2:6, 2:6] = 1
    filled = blurred_fill(images, holes)
    assert torch.equal(filled * (1 - holes), images * (1 - holes))
    row = filled[0, 0, 4, 2:6]  # across the hole: from the white side to the black one
    assert (row[:-1] > row[1:]).all() and row[0] > 0 > row[-1]


def test_the_blurred_fill_starts_at_the_mean_of_the_known_pixels():
    """The hole starts at the mean of the known pixels of each image and channel; one iteration is one 3 x 3 mean
    of that start in the hole."""
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    holes = torch.zeros(2, 1, 8, 8)
    holes[:, :, 2:5, 3:7] = 1
    known = (1 - holes).bool().expand_as(images)
    filled = blurred_fill(images, holes, iterations=1)
    means = torch.stack([images[b, c][known[b, c]].mean() for b in range(2) for c in range(3)]).view(2, 3, 1, 1)
    begun = images * (1 - holes) + means * holes
    blurred = F.avg_pool2d(F.pad(begun, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    torch.testing.assert_close(filled, images * (1 - holes) + blurred * holes)


def test_the_shown_input_and_its_name_for_each_task():
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    superres = Degradation("superres", scale=4, downsample="bicubic")
    cond = superres.condition(images)
    shown = superres.shown_input(images, cond)
    assert torch.equal(shown, F.interpolate(superres.low_res(images), scale_factor=4, mode="nearest"))
    assert superres.input_name(16) == "input (4 px, bicubic)"
    inpaint = Degradation("inpaint")
    cond = inpaint.condition(images, halves())
    assert torch.equal(inpaint.shown_input(images, cond), cond[:, :3])  # the masked image, without its mask
    colorize = Degradation("colorize")
    cond = colorize.condition(images)
    assert torch.equal(colorize.shown_input(images, cond), cond)
    assert (inpaint.input_name(16), colorize.input_name(16)) == ("input (hole: grey)", "input (grey)")


# ----------------------------------------------------------------------------- the settings each task refuses

@pytest.mark.parametrize("settings, message", [
    (("superres", 3, "box", "halves", 16), "scale 3 does not divide image_size 16 into a low-resolution image: use a "
                                           "divisor of it, 2 or more, e.g. --scale 2 or 4"),
    (("superres", 1, "box", "halves", 16), "scale 1 does not divide image_size 16"),
    (("deblur", 4, "box", "halves", 16), "task 'deblur' is unknown: use one of superres, inpaint, colorize"),
    (("superres", 4, "nearest", "halves", 16), "downsample 'nearest' is unknown: use one of box, bicubic"),
    (("inpaint", 4, "box", "blobs", 16), "masks 'blobs' is neither one of boxes, halves, lower, strokes nor a"),
])
def test_check_task_refuses_each_setting_that_cannot_work(settings, message):
    with pytest.raises(UsageError, match=message):
        check_task(*settings)


def test_check_task_accepts_what_each_task_can_use_and_refuses_grey_colourisation():
    check_task("superres", 2, "bicubic", "nonsense", 16)  # masks matter to inpaint only
    check_task("superres", 16, "box", "halves", 16)
    check_task("inpaint", 3, "nearest", "strokes", 16)  # scale and downsample matter to superres only
    check_task("colorize", 3, "box", "halves", 16, channels=3)
    check_task("colorize", 3, "box", "halves", 16, channels=None)  # the channels not known yet
    with pytest.raises(UsageError, match="colorize needs RGB images, and these are grey: pass --channels 3"):
        check_task("colorize", 4, "box", "halves", 16, channels=1)


# ----------------------------------------------------------------------------- the grid of a run

def test_comparison_rows_are_input_output_ground_truth_and_bicubic_for_superres():
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    outputs = torch.rand(3, 3, 16, 16) * 2 - 1
    superres = Degradation("superres", scale=4)
    cond = superres.condition(images)
    rows = comparison_rows(superres, images, cond, None, outputs, 16)
    assert [caption for caption, _ in rows] == ["input (4 px, box)", "output", "ground truth", "bicubic"]
    for (_, got), expected in zip(rows, (superres.shown_input(images, cond), outputs, images, cond)):
        assert torch.equal(got, expected)
    holes = torch.zeros(3, 1, 16, 16)
    holes[:, :, 8:] = 1
    inpaint = Degradation("inpaint")
    cond = inpaint.condition(images, holes)
    rows = comparison_rows(inpaint, images, cond, holes, outputs, 16)
    assert [caption for caption, _ in rows] == ["input (hole: grey)", "output", "ground truth"]
    assert torch.equal(rows[0][1], cond[:, :3])


def test_save_rows_is_one_grid_row_each_with_grey_rows_in_every_channel(monkeypatch):
    saved = {}

    def recorded(images, path, nrow=None, captions=None):
        saved.update(images=images, path=path, nrow=nrow, captions=captions)

    monkeypatch.setattr(degradations, "save_images", recorded)
    colour, grey_row = torch.rand(2, 3, 8, 8) * 2 - 1, torch.rand(2, 1, 8, 8) * 2 - 1
    save_rows([("input (grey)", grey_row), ("output", colour)], "grid.png")
    assert (saved["path"], saved["nrow"], saved["captions"]) == ("grid.png", 2, ["input (grey)", "output"])
    assert torch.equal(saved["images"], torch.cat([grey_row.expand(-1, 3, -1, -1), colour]))
    grey_only = torch.rand(3, 1, 8, 8)
    save_rows([("a", grey_only), ("b", grey_only)], "grey.png")
    assert saved["images"].shape == (6, 1, 8, 8) and saved["nrow"] == 3  # all grey: grey images


def test_save_rows_writes_a_captioned_grid_of_the_rows(tmp_path):
    """16 px images scaled to 64 px (+ 2 px padding), each row below its 14 px caption strip."""
    from PIL import Image

    rows = [("input", torch.rand(3, 1, 16, 16) * 2 - 1), ("output", torch.rand(3, 3, 16, 16) * 2 - 1)]
    save_rows(rows, str(tmp_path / "grid.png"))
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size == (3 * 66 + 2, 2 * (66 + 14) + 2)
