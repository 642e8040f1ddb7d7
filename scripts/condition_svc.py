"""How much of the class the condition of an image-to-image run holds by itself, as read by an SVC.

The SVC is fitted on the conditions of the run's training images and names the class of its held-out ones from
their conditions alone.

    python scripts/condition_svc.py --run_config results/digits_superres/config.json    (the 4 x 4 inputs)
    python scripts/condition_svc.py --run_config results/digits_inpaint/config.json     (the upper halves)

A reference for evaluate.py's class accuracy of the outputs: how much of the identity a standard classifier reads
from the input alone (a diffusion model's outputs may read better or worse). The run's saved config gives the task,
the data set and the held-out split (its seed and --holdout), so the images are the ones evaluate.py measures on.
"""
import os
import sys
from dataclasses import dataclass

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data import dataset_channels, saved_run_split  # noqa: E402  (after the path)
from degradations import Degradation  # noqa: E402
from utils import UsageError, arg, parse_config, read_json_object, run_cli  # noqa: E402


@dataclass
class Config:
    run_config: str = arg(None, "the config.json of a ddpm_img2img.py run (results/<run_name>/config.json)")
    masks: str | None = arg(None, "inpainting holes (None: the run's --masks), as evaluate.py's --masks")
    svc_c: float | None = arg(None, "the SVC's C (RBF kernel, gamma 'scale'); None: the best of 1, 10, 100, 1000 by "
                                    "5-fold cross-validation on the training images")
    seed: int = arg(0, "the draw of random holes, as evaluate.py's --seed")


def conditions(dataset, degradation, generator):
    """(the conditions of every image of `dataset` flattened to (n, features), the labels (n,))."""
    items = [dataset[i] for i in range(len(dataset))]  # each image read from disk once
    images = torch.stack([image for image, _ in items])
    labels = torch.tensor([label for _, label in items])
    holes = degradation.draw_holes(len(images), generator)
    return degradation.condition(images, holes).flatten(1).numpy(), labels.numpy()


def condition_accuracy(settings, masks=None, svc_c=None, seed=0):
    """(the fraction of the run's held-out images whose class the SVC names from the condition alone, its C, the
    number of training and of held-out images)."""
    try:
        from sklearn.model_selection import GridSearchCV
        from sklearn.svm import SVC
    except ImportError:
        raise UsageError("this check needs scikit-learn: pip install scikit-learn") from None
    if not settings.get("task"):
        raise UsageError("this config has no task: give the config.json of a ddpm_img2img.py run")
    channels = settings.get("channels") or dataset_channels(settings["dataset"], settings.get("dataset_path"))
    train, held = saved_run_split(settings, channels)
    degradation = Degradation.from_settings(settings, masks)
    x_held, y_held = conditions(held, degradation, torch.Generator().manual_seed(seed))  # evaluate.py's holes
    x_train, y_train = conditions(train, degradation, torch.Generator().manual_seed(seed + 1))
    if svc_c is None:
        search = GridSearchCV(SVC(gamma="scale"), {"C": [1.0, 10.0, 100.0, 1000.0]}, cv=5).fit(x_train, y_train)
        svc, svc_c = search.best_estimator_, search.best_params_["C"]
    else:
        svc = SVC(C=svc_c, gamma="scale").fit(x_train, y_train)
    return float((svc.predict(x_held) == y_held).mean()), svc_c, len(y_train), len(y_held)


def main(argv=None):
    cfg = parse_config(Config, argv, description=__doc__)
    if not cfg.run_config or not os.path.isfile(cfg.run_config):
        raise UsageError(f"--run_config {cfg.run_config}: no such file; give results/<run_name>/config.json of a "
                         "ddpm_img2img.py run")
    settings = read_json_object(cfg.run_config, "--run_config")
    accuracy, svc_c, n_train, n_held = condition_accuracy(settings, cfg.masks, cfg.svc_c, cfg.seed)
    print(f"{settings['task']} ({cfg.run_config}): an SVC (C {svc_c:g}) fitted on the conditions of {n_train} training "
          f"images names the class of {accuracy:.3f} of the {n_held} held-out ones")
    return accuracy


if __name__ == "__main__":
    run_cli(main)
