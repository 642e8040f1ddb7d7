"""DDPM: the unconditional training script, and the name of the design's `Diffusion` (the math is diffusion.py's).

    python ddpm.py --dataset imagefolder --dataset_path path/to/images   (or --dataset shapes, or --config FILE)

`from ddpm import Diffusion` gives the noise schedule, the forward noising q(x_t | x_0), the training loss,
ancestral sampling (DDPM Algorithm 2), classifier-free guidance and RePaint inpainting, as in the reference
repository; the class lives in diffusion.py, beside the loop and the checkpoints that use it. This script trains an
unconditional network on a folder of images with the one loop of training.py and draws grids of its samples.
"""
from config import (Backbone, Channels, ClassData, Data, Evaluation, Latents, Network, Optimisation, Run, Sampling,
                    Schedule)
from diffusion import Diffusion  # noqa: F401  (the design's name: `from ddpm import Diffusion`)
from training import train_images
from utils import arg, configclass, run_cli


# ----------------------------------------------------------------------------- hyperparameters
@configclass(Run, Data, Channels, ClassData, Latents, Backbone, Network, Schedule, Optimisation, Sampling, Evaluation)
class Config:
    n_samples: int = arg(16, "images in each grid (of an unconditional model)", resumable=True)
    run_name = "DDPM_Unconditional"
    dataset = "imagefolder"
    dataset_path = "./data/landscapes"
    batch_size = 12
    epochs = 500
    sampler = "ddpm"


def main(argv=None):
    return train_images(Config, argv, conditional=False, description=__doc__)


if __name__ == "__main__":
    run_cli(main)
