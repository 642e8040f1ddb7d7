"""Class-conditional DDPM with classifier-free guidance, on CIFAR-10 by default.

    python ddpm_conditional.py                                   (CIFAR-10 at 64 px: a GPU job)
    python ddpm_conditional.py --config configs/quick_cpu.json   (built-in shapes at 16 px: minutes on a CPU)

Each row's label is dropped with probability p_uncond, so one network learns both eps(x_t, t, y) and
eps(x_t, t); the grids are sampled with guidance, lerp(eps_uncond, eps_cond, cfg_scale), from an EMA of the
weights as well as from the weights themselves. `--conditioning` picks how the label enters the network
(add, concat, xattn, adanorm: see modules.UNet_conditional). The diffusion math lives in diffusion.py, the loop and
this script's Task (training.image_task) in training.py.
"""
from config import (Backbone, Channels, ClassData, Conditional, Conditioning, Data, Evaluation, Latents, Network,
                    Optimisation, Run, Sampling, Schedule)
from training import train_images
from utils import configclass, run_cli


# ----------------------------------------------------------------------------- hyperparameters
@configclass(Run, Data, Channels, ClassData, Latents, Backbone, Network, Conditioning, Schedule, Optimisation,
             Conditional, Sampling, Evaluation)
class Config:
    run_name = "DDPM_conditional"
    dataset = "cifar10"
    batch_size = 14
    epochs = 300


def main(argv=None):
    return train_images(Config, argv, conditional=True, description=__doc__)


if __name__ == "__main__":
    run_cli(main)
