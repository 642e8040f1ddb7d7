"""The conditions of image-to-image diffusion: super-resolution (SR3), inpainting (Palette) and colourisation.

A `Degradation` makes the condition image of a clean image x_0 (the low-resolution image upsampled back, the image
with its hole and the hole's mask, the grey image), shows it, and gives the baseline that no learning makes of it
(bicubic upsampling, a blurred fill, the grey image). ddpm_img2img.py trains on these conditions; evaluate.py,
sample.py and visualize.py rebuild them from a run's saved config.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from data import LUMA, MASKS, Masks
from utils import UsageError, save_images

TASKS = ("superres", "inpaint", "colorize")
DOWNSAMPLES = ("box", "bicubic")


def condition_channels(task, channels):
    """The channels of the condition image of `task` on images of `channels` channels."""
    return {"superres": channels, "inpaint": channels + 1, "colorize": 1}[task]


def check_task(task, scale, downsample, masks, image_size, channels=None):
    """One readable error for each task setting that cannot work (channels None: not known yet)."""
    if task not in TASKS:
        raise UsageError(f"task '{task}' is unknown: use one of {', '.join(TASKS)}")
    if task == "superres":
        if scale < 2 or image_size % scale:
            raise UsageError(f"scale {scale} does not divide image_size {image_size} into a low-resolution image: "
                             "use a divisor of it, 2 or more, e.g. --scale 2 or 4")
        if downsample not in DOWNSAMPLES:
            raise UsageError(f"downsample '{downsample}' is unknown: use one of {', '.join(DOWNSAMPLES)}")
    if task == "inpaint" and masks not in MASKS:
        Masks(masks, image_size)  # a folder: read and checked here, so a bad one fails before training
    if task == "colorize" and channels == 1:
        raise UsageError("colorize needs RGB images, and these are grey: pass --channels 3 and a colour data set, "
                         "or choose --task superres or inpaint")


def grey(images):
    """RGB images (B, 3, H, W) in [-1, 1] -> their luma (B, 1, H, W) (ITU-R 601, as data.LUMA and PIL's 'L')."""
    weights = torch.as_tensor(LUMA, dtype=images.dtype, device=images.device)
    return torch.einsum("c,bchw->bhw", weights, images)[:, None]


def blurred_fill(images, holes, iterations=None):
    """The baseline of inpainting: each hole filled by diffusing the known pixels into it (a harmonic fill: the
    hole is replaced by the 3 x 3 mean of its neighbourhood `iterations` times, 4 S by default), known pixels kept."""
    known = 1 - holes
    start = (images * known).sum(dim=(2, 3), keepdim=True) / known.sum(dim=(2, 3), keepdim=True).clamp(min=1)
    filled = images * known + start * holes  # (B, C, H, W): the hole starts at the mean of the known pixels
    for _ in range(iterations or 4 * images.shape[-1]):
        blurred = F.avg_pool2d(F.pad(filled, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        filled = images * known + blurred * holes
    return filled


@dataclass
class Degradation:
    """What the condition of a task is, and how it is shown: built from a run's settings by `from_settings`.

    `condition(x_0, holes)` -> the condition image (B, cond_channels, H, W) of clean images in [-1, 1];
    `baseline(...)` -> what a method without learning makes of the input (bicubic upsampling, a blurred fill, or the
    grey image); `shown_input(...)` -> the input as a picture at full size.
    """
    task: str
    scale: int = 4
    downsample: str = "box"
    masks: Masks | None = None

    @classmethod
    def from_settings(cls, settings, masks=None):
        """The Degradation of a run's config (a dict); `masks` replaces the run's --masks."""
        task = settings["task"]
        spec = masks or settings.get("masks", "halves")
        return cls(task, settings.get("scale", 4), settings.get("downsample", "box"),
                   Masks(spec, settings["image_size"]) if task == "inpaint" else None)

    def low_res(self, images):
        """(B, C, S, S) -> (B, C, S / scale, S / scale)."""
        if self.downsample == "box":
            return F.avg_pool2d(images, self.scale)
        return F.interpolate(images, scale_factor=1 / self.scale, mode="bicubic", antialias=True,
                             align_corners=False).clamp(-1, 1)

    def upsample(self, low):
        """Bicubic upsampling by `scale`, clamped to the data range: SR3's condition, and the baseline."""
        return F.interpolate(low, scale_factor=self.scale, mode="bicubic", align_corners=False).clamp(-1, 1)

    def draw_holes(self, n, generator=None, device="cpu"):
        """(n, 1, S, S) hole masks of --masks (inpaint), or None."""
        return None if self.masks is None else self.masks.draw(n, generator).to(device)

    def condition(self, images, holes=None):
        """The condition image of clean images (B, C, S, S) in [-1, 1]; inpaint needs the holes (B, 1, S, S)."""
        if self.task == "superres":
            return self.upsample(self.low_res(images))
        if self.task == "inpaint":
            return inpaint_condition(images, holes)
        return grey(images)

    def baseline(self, cond, holes=None):
        """What the input gives without learning, from the condition: bicubic upsampling (superres: the condition
        itself), the blurred fill of the hole (inpaint), the grey image in every channel (colorize)."""
        if self.task == "superres":
            return cond
        if self.task == "inpaint":
            return blurred_fill(cond[:, :-1], holes)
        return cond.expand(-1, 3, -1, -1)

    def keep_known(self, outputs, cond):
        """The result of a task from the network's outputs: for inpaint the known pixels of the input with the output
        only in the hole (the mask is the condition's last channel), as Palette returns it; the outputs otherwise."""
        if self.task != "inpaint":
            return outputs
        return torch.lerp(cond[:, :-1].to(outputs), outputs, cond[:, -1:].to(outputs))  # the input is 0 in the hole

    def baseline_name(self):
        return {"superres": "bicubic", "inpaint": "blurred fill", "colorize": "grey"}[self.task]

    def shown_input(self, images, cond):
        """The input at full size: the low-resolution image by nearest neighbour, the masked image, the grey one."""
        if self.task == "superres":
            return F.interpolate(self.low_res(images), scale_factor=self.scale, mode="nearest")
        return cond[:, :-1] if self.task == "inpaint" else cond

    def input_name(self, image_size):
        if self.task == "superres":
            return f"input ({image_size // self.scale} px, {self.downsample})"
        return {"inpaint": "input (hole: grey)", "colorize": "input (grey)"}[self.task]


def inpaint_condition(images, holes):
    """Palette's condition: the image with the hole set to 0 (mid grey), and the hole mask: (B, C + 1, S, S)."""
    return torch.cat([images * (1 - holes), holes], dim=1)


def save_rows(rows, path):
    """One grid row per (caption, images (n, C, S, S) in [-1, 1]); grey rows are shown in every channel of RGB ones."""
    channels = max(images.shape[1] for _, images in rows)
    images = torch.cat([images.expand(-1, channels, -1, -1).float().cpu() for _, images in rows])
    save_images(images, path, nrow=rows[0][1].shape[0], captions=[caption for caption, _ in rows])


def comparison_rows(degradation, images, cond, holes, outputs, image_size):
    """The grid of a run: input, output, ground truth, and for super-resolution the bicubic baseline."""
    rows = [(degradation.input_name(image_size), degradation.shown_input(images, cond)), ("output", outputs),
            ("ground truth", images)]
    if degradation.task == "superres":
        rows.append(("bicubic", degradation.baseline(cond, holes)))
    return rows
