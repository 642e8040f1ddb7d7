"""scripts/condition_svc.py: the SVC reads the condition of a run's task, not the image, on the run's own split."""
import importlib.util
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from utils import UsageError

REPO = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("condition_svc", REPO / "scripts" / "condition_svc.py")
condition_svc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(condition_svc)


def write_folder(root, rows):
    """Two classes of 16 px grey images, 40 each: a bright 4 x 4 square on faint noise, in the left half of `rows`
    for class a and in the right half for class b (its column and row within them drawn at random)."""
    rng = np.random.default_rng(0)
    for label, columns in (("a", range(0, 5)), ("b", range(8, 13))):
        (root / label).mkdir(parents=True)
        for i in range(40):
            image = rng.integers(0, 40, (16, 16)).astype(np.uint8)
            top, left = rng.choice(rows), rng.choice(columns)
            image[top:top + 4, left:left + 4] = 255
            Image.fromarray(image, "L").save(root / label / f"{i}.png")
    return root


def run_config(tmp_path, folder, **settings):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"task": "inpaint", "masks": "lower", "dataset": "imagefolder",
                                "dataset_path": str(folder), "image_size": 16, "holdout": 20, "seed": 0,
                                **settings}))
    return str(path)


def test_the_class_is_named_from_what_the_condition_shows_and_not_from_what_it_hides(tmp_path):
    upper = run_config(tmp_path, write_folder(tmp_path / "upper", range(0, 4)), masks="halves")
    assert condition_svc.main(["--run_config", upper, "--masks", "lower"]) == 1.0  # the square is in the known half
    lower = run_config(tmp_path, write_folder(tmp_path / "lower", range(8, 12)))
    assert condition_svc.main(["--run_config", lower]) <= 0.8  # in the hole: 20 guesses between two classes
    assert condition_svc.main(["--run_config", run_config(tmp_path, tmp_path / "lower", task="superres")]) == 1.0


def test_a_config_that_is_not_an_image_to_image_run_is_one_readable_error(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        condition_svc.main(["--run_config", str(tmp_path / "missing.json")])
    folder = write_folder(tmp_path / "upper", range(0, 4))
    with pytest.raises(UsageError, match="no task"):
        condition_svc.main(["--run_config", run_config(tmp_path, folder, task=None)])
    with pytest.raises(UsageError, match="holdout 0"):
        condition_svc.main(["--run_config", run_config(tmp_path, folder, holdout=0)])
