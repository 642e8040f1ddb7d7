"""ddpm.py, the unconditional training script: the design's `from ddpm import Diffusion`, its Config and its command
line. The DDPM math is diffusion.py's (tests/test_diffusion.py); its training runs are in tests/test_training.py."""
import dataclasses

import pytest

import ddpm
import diffusion
import utils
from config import Conditional
from utils import UsageError


def test_from_ddpm_import_diffusion_gives_the_diffusion_of_diffusion_py():
    from ddpm import Diffusion

    assert Diffusion is diffusion.Diffusion


def test_the_config_has_the_scripts_defaults_and_its_own_grid_size():
    """The defaults ddpm.py had before its fields moved into config.py's groups."""
    cfg = utils.parse_config(ddpm.Config, [])
    assert (cfg.run_name, cfg.dataset, cfg.dataset_path, cfg.batch_size, cfg.epochs, cfg.sampler, cfg.n_samples) == \
        ("DDPM_Unconditional", "imagefolder", "./data/landscapes", 12, 500, "ddpm", 16)
    fields = {field.name: field for field in dataclasses.fields(ddpm.Config)}
    assert fields["n_samples"].metadata["resumable"]
    assert not {field.name for field in dataclasses.fields(Conditional)} & set(fields)  # unconditional: no guidance
    assert utils.parse_config(ddpm.Config, ["--n_samples", "4"]).n_samples == 4


def test_help_shows_the_script_and_its_grid_flag(capsys):
    with pytest.raises(SystemExit) as info:
        ddpm.main(["--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "python ddpm.py --dataset imagefolder" in out
    assert "--n_samples" in out and "images in each grid" in out


def test_a_bad_value_is_refused_before_training(monkeypatch):
    monkeypatch.setattr("training.train", lambda *args, **kwargs: pytest.fail("training started"))
    with pytest.raises(UsageError, match="sampler 'plms' is unknown"):
        ddpm.main(["--sampler", "plms"])
