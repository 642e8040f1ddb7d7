"""Tests for utils.py: config parsing and composed configs, seeding, image files and grids, grid labels, torch files."""

import dataclasses
import json
import os
import sys
import typing

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import utils  # noqa: E402
from utils import UsageError  # noqa: E402


@dataclasses.dataclass
class DemoConfig:
    """A config with one field of every supported type."""

    lr: float = utils.arg(3e-4, "learning rate")
    epochs: int = utils.arg(5, "passes over the data")
    run_name: str = utils.arg("demo", "folder name under results/")
    use_ema: bool = utils.arg(True, "keep an EMA copy")
    prompt: list[str] = utils.arg(["a red circle"], "prompts for the sample grid")
    max_steps: int | None = utils.arg(None, "stop after this many steps")


# ----------------------------------------------------------------------------- configuration

def test_parse_config_defaults_and_overrides():
    assert utils.parse_config(DemoConfig, []) == DemoConfig()
    argv = ["--lr", "1", "--epochs", "7", "--run_name", "x", "--max_steps", "12"]
    cfg = utils.parse_config(DemoConfig, argv)
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert (cfg.epochs, cfg.run_name, cfg.max_steps) == (7, "x", 12)
    assert utils.parse_config(DemoConfig, ["--max_steps", "none"]).max_steps is None


@pytest.mark.parametrize("text, value", [("true", True), ("FALSE", False), ("1", True), ("0", False),
                                         ("Yes", True), ("no", False)])
def test_parse_config_bool_values(text, value):
    assert utils.parse_config(DemoConfig, ["--use_ema", text]).use_ema is value


def test_parse_config_bare_bool_flag_means_true():
    cfg = utils.parse_config(DemoConfig, ["--use_ema", "false"])
    assert cfg.use_ema is False
    assert utils.parse_config(DemoConfig, ["--use_ema"]).use_ema is True


def test_parse_config_list_is_repeatable_and_default_not_shared():
    cfg = utils.parse_config(DemoConfig, ["--prompt", "a", "--prompt", "b"])
    assert cfg.prompt == ["a", "b"]
    first, second = DemoConfig(), DemoConfig()
    first.prompt.append("x")
    assert second.prompt == ["a red circle"]


@pytest.mark.parametrize("argv, fragment", [(["--nope", "1"], "unrecognized arguments: --nope"),
                                             (["--epochs", "2.5"], "--epochs"),
                                             (["--lr", "fast"], "'fast'"),
                                             (["--use_ema", "maybe"], "'maybe'"),
                                             (["--e", "3"], "unrecognized")])
def test_parse_config_bad_flags_exit_2(argv, fragment, capsys):
    with pytest.raises(SystemExit) as info:
        utils.parse_config(DemoConfig, argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert fragment in err
    assert err.strip().splitlines()[-1].count("error:") == 1


def test_help_lists_every_field_and_default(capsys):
    with pytest.raises(SystemExit) as info:
        utils.parse_config(DemoConfig, ["--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for field in dataclasses.fields(DemoConfig):
        assert f"--{field.name}" in out
    defaults = ("0.0003", "default: 5", "default: demo", "default: True", "a red circle", "default: None")
    for default in defaults:
        assert default in out
    assert "learning rate" in out


def test_config_file_applied_then_cli_wins(tmp_path):
    path = tmp_path / "over.json"
    path.write_text(json.dumps({"lr": 1, "epochs": 9, "prompt": ["p"]}))
    cfg = utils.parse_config(DemoConfig, ["--config", str(path), "--epochs", "3"])
    assert (cfg.lr, cfg.epochs, cfg.prompt) == (1.0, 3, ["p"])
    assert isinstance(cfg.lr, float)


def test_config_file_errors(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"lr": 0.1, "learning_rate": 0.1}))
    with pytest.raises(UsageError, match="learning_rate"):
        utils.parse_config(DemoConfig, ["--config", str(path)])
    path.write_text(json.dumps({"epochs": "many"}))
    with pytest.raises(UsageError, match="epochs"):
        utils.parse_config(DemoConfig, ["--config", str(path)])
    with pytest.raises(UsageError, match="not found"):
        utils.parse_config(DemoConfig, ["--config", str(tmp_path / "missing.json")])


def test_parse_config_extra_arguments():
    extra = [("--resume", {"action": "store_true", "help": "continue the run"})]
    cfg, ns = utils.parse_config(DemoConfig, ["--resume", "--epochs", "2"], extra=extra)
    assert cfg.epochs == 2 and ns.resume is True
    cfg, ns = utils.parse_config(DemoConfig, [], extra=extra)
    assert ns.resume is False and not hasattr(cfg, "resume")


def test_save_config_round_trip_and_diff(tmp_path):
    cfg = DemoConfig(lr=0.001, prompt=["a", "b"])
    path = tmp_path / "nested" / "config.json"
    utils.save_config(cfg, path)
    saved = json.loads(path.read_text())
    assert DemoConfig(**saved) == cfg
    assert not os.path.exists(str(path) + ".tmp")
    current = utils.config_to_dict(DemoConfig(lr=0.0003, epochs=9))
    lines = utils.diff_configs(saved, current, ignore=("epochs",))
    assert "lr: 0.001 (saved) != 0.0003 (now)" in lines
    assert not any(line.startswith("epochs") for line in lines)
    assert utils.diff_configs(saved, saved) == []


# ----------------------------------------------------------------------------- field metadata and composed configs

CHECKED = []  # the checks that validate() ran, in order


@dataclasses.dataclass
class Optim:
    """A group with a check."""

    lr: float = utils.arg(3e-4, "learning rate")
    epochs: int = utils.arg(5, "passes over the data", resumable=True)

    def validate(self):
        CHECKED.append("Optim")
        if self.lr <= 0:
            raise UsageError(f"lr {self.lr} must be positive")


@dataclasses.dataclass
class Colour:
    """A group without checks, with a field that runs saved before it existed did not have at its default."""

    channels: int | None = utils.arg(None, "image channels (None: the data set's)", absent=3)


@dataclasses.dataclass
class Grid:
    """A group with a renamed field."""

    n_per_row: int = utils.arg(8, "images in each grid row", resumable=True, old_names=("n_per_class", "n_samples"))
    prompt: list[str] = utils.arg(["a red circle"], "prompts of the grid")

    def validate(self):
        CHECKED.append("Grid")


@utils.configclass(Optim, Colour, Grid)
class Script:
    loss: str = utils.arg("l1", "l1 | mse")
    n_samples: int = utils.arg(16, "images of an unconditional grid")  # its own field, though an old name of n_per_row
    epochs = 50
    SCALE = 2  # a constant, no field

    def validate(self):
        CHECKED.append("Script")
        if self.loss not in ("l1", "mse"):
            raise UsageError(f"loss '{self.loss}' is unknown: use l1 or mse")

    def double_lr(self):
        return 2 * self.lr


def test_arg_keeps_the_help_and_the_field_options_in_its_metadata():
    assert dict(dataclasses.fields(DemoConfig)[0].metadata) == {
        "help": "learning rate", "resumable": False, "old_names": (), "absent": dataclasses.MISSING}
    field = utils.arg(8, "images per row", resumable=True, old_names=["n_per_class"], absent=3)
    assert field.default == 8
    assert dict(field.metadata) == {"help": "images per row", "resumable": True, "old_names": ("n_per_class",),
                                    "absent": 3}


def test_configclass_has_its_own_fields_then_each_groups_in_order():
    fields = dataclasses.fields(Script)
    assert [f.name for f in fields] == ["loss", "n_samples", "lr", "epochs", "channels", "n_per_row", "prompt"]
    cfg = Script()
    assert (cfg.loss, cfg.n_samples, cfg.lr, cfg.epochs, cfg.channels, cfg.n_per_row, cfg.prompt) == \
        ("l1", 16, 3e-4, 50, None, 8, ["a red circle"])
    assert Optim().epochs == 5  # `epochs = 50` set the Script's default, not the group's
    epochs = fields[3]
    assert epochs.metadata["help"] == "passes over the data" and epochs.metadata["resumable"]  # the group's field
    hints = typing.get_type_hints(Script)
    assert (hints["loss"], hints["lr"], hints["channels"], hints["prompt"]) == (str, float, int | None, list[str])
    cfg.prompt.append("x")
    assert Script().prompt == ["a red circle"]  # a list default is copied for every instance
    assert Script.SCALE == 2 and Script(lr=0.25).double_lr() == 0.5  # constants and methods stay


def test_configclass_refuses_a_name_that_is_no_field_and_a_group_field_declared_again():
    with pytest.raises(TypeError, match="Bad sets lr_decay, which is no field of its groups"):
        @utils.configclass(Optim, Grid)
        class Bad:
            lr_decay = "cosine"
    with pytest.raises(TypeError, match=r"Bad.lr is a field of Optim: set its default with `lr = value`"):
        @utils.configclass(Optim, Grid)
        class Bad:
            lr: float = utils.arg(1e-3, "another learning rate")


def test_validate_runs_the_groups_checks_in_order_then_the_classs_own():
    CHECKED.clear()
    cfg = Script()
    assert cfg.validate() is cfg
    assert CHECKED == ["Optim", "Grid", "Script"]  # Colour has no checks
    CHECKED.clear()
    with pytest.raises(UsageError, match="lr -1 must be positive"):
        Script(lr=-1).validate()
    assert CHECKED == ["Optim"]  # the first failing check ends it
    CHECKED.clear()
    with pytest.raises(UsageError, match="loss 'l2' is unknown"):
        Script(loss="l2").validate()
    assert CHECKED == ["Optim", "Grid", "Script"]

    @utils.configclass(Grid, Optim)
    class GroupsOnly:
        pass

    CHECKED.clear()
    GroupsOnly().validate()
    assert CHECKED == ["Grid", "Optim"]


def test_parse_config_runs_validate_on_the_parsed_values(tmp_path):
    CHECKED.clear()
    assert utils.parse_config(Script, ["--loss", "mse"]).loss == "mse"
    assert CHECKED == ["Optim", "Grid", "Script"]
    with pytest.raises(UsageError, match=r"lr -1.0 must be positive"):
        utils.parse_config(Script, ["--lr", "-1"])
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"loss": "l2"}))
    with pytest.raises(UsageError, match="loss 'l2' is unknown"):
        utils.parse_config(Script, ["--config", str(path)])


def test_an_old_name_parses_as_a_flag_with_a_note(capsys):
    assert utils.old_names(Script) == {"n_per_class": "n_per_row"}  # n_samples is a field of Script's own
    cfg, flags = utils.parse_config(Script, ["--n_per_class", "3"], extra=[])
    assert cfg.n_per_row == 3 and cfg.n_samples == 16 and flags.given == {"n_per_row"}
    assert capsys.readouterr().err == "note: --n_per_class is now --n_per_row; the old name still works\n"
    cfg = utils.parse_config(Script, ["--n_samples", "4"])
    assert (cfg.n_samples, cfg.n_per_row) == (4, 8)
    assert capsys.readouterr().err == ""
    with pytest.raises(SystemExit) as info:
        utils.parse_config(Script, ["--n_per_class", "many"])
    assert info.value.code == 2 and "'many'" in capsys.readouterr().err


def test_an_old_name_parses_as_a_config_file_key_with_a_note(tmp_path, capsys):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"n_per_class": 5}))
    assert utils.parse_config(Script, ["--config", str(path)]).n_per_row == 5
    assert capsys.readouterr().err == \
        f"note: config file '{path}': n_per_class is now n_per_row; the old name still works\n"
    path.write_text(json.dumps({"n_per_class": "many"}))
    with pytest.raises(UsageError, match="n_per_row should be int, got 'many'"):
        utils.parse_config(Script, ["--config", str(path)])


def test_help_lists_the_new_names_and_not_the_old_ones(capsys):
    with pytest.raises(SystemExit) as info:
        utils.parse_config(Script, ["--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for field in dataclasses.fields(Script):
        assert f"--{field.name}" in out
    assert "images in each grid row (default: 8)" in out
    assert "--n_per_class" not in out


def test_saved_config_reads_old_names_and_fills_the_fields_a_run_did_not_have():
    saved = {"n_per_class": 4, "lr": 0.1, "loss": "mse"}  # a run saved before the rename and before `channels`
    assert utils.saved_config(saved, Script) == {"n_per_row": 4, "lr": 0.1, "loss": "mse", "n_samples": 16,
                                                 "epochs": 50, "channels": 3, "prompt": ["a red circle"]}
    assert saved == {"n_per_class": 4, "lr": 0.1, "loss": "mse"}  # the saved dict is left as it was
    with_channels = utils.saved_config({"channels": None, "n_per_row": 2}, Script)
    assert (with_channels["channels"], with_channels["n_per_row"]) == (None, 2)  # a value the run had is kept
    assert Script(**utils.saved_config({}, Script)) == Script(channels=3)


def test_resumable_fields_are_those_marked_resumable():
    assert utils.resumable_fields(Script) == {"epochs", "n_per_row"}
    assert utils.resumable_fields(DemoConfig) == set()


# ----------------------------------------------------------------------------- grid labels

def test_grid_labels_are_each_label_n_per_row_times_one_row_each():
    labels = utils.grid_labels(3, 2)
    assert labels.dtype == torch.long and labels.tolist() == [0, 0, 1, 1, 2, 2]  # every class by default
    assert utils.grid_labels(5, 3, labels=[4, 1]).tolist() == [4, 4, 4, 1, 1, 1]  # the given labels, in their order
    assert utils.grid_labels(2, 1, device="meta").device.type == "meta"


@pytest.mark.parametrize("label", [5, -1])
def test_a_grid_label_outside_the_classes_is_a_usage_error(label):
    with pytest.raises(UsageError, match=rf"label {label} is outside the model's 5 classes: use 0\.\.4"):
        utils.grid_labels(5, 2, labels=[0, label])


# ----------------------------------------------------------------------------- seeding, device, CLI

def test_seed_everything_repeats_random_streams():
    utils.seed_everything(3)
    first = (np.random.rand(), torch.rand(2))
    utils.seed_everything(3)
    second = (np.random.rand(), torch.rand(2))
    assert first[0] == second[0] and torch.equal(first[1], second[1])


def test_pick_device():
    assert utils.pick_device("cpu") == "cpu"
    assert utils.pick_device("auto") in ("cpu", "cuda", "mps")
    with pytest.raises(UsageError, match="unknown device"):
        utils.pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="--device cpu"):
            utils.pick_device("cuda")


def fake_gpus(monkeypatch, count):
    """Make torch report `count` GPUs without touching CUDA; returns the (index, state) of each set_rng_state."""
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((device, state)))
    return restored


def test_a_state_saved_with_more_gpus_restores_the_visible_ones(monkeypatch):
    """A run saved on 2 GPUs resumes under CUDA_VISIBLE_DEVICES=0: only GPU 0's state is restored, nothing indexes
    a GPU that is not there (torch.cuda.set_rng_state_all would: IndexError in default_generators)."""
    state = utils.rng_state()
    saved = [torch.full((8,), 1, dtype=torch.uint8), torch.full((8,), 2, dtype=torch.uint8)]
    restored = fake_gpus(monkeypatch, 1)
    utils.set_rng_state({**state, "cuda": saved})
    assert [(device, s[0].item()) for device, s in restored] == [(0, 1)]
    restored = fake_gpus(monkeypatch, 4)
    utils.set_rng_state({**state, "cuda": saved})
    assert [(device, s[0].item()) for device, s in restored] == [(0, 1), (1, 2)]


def test_pick_device_refuses_a_gpu_index_that_is_not_visible(monkeypatch):
    fake_gpus(monkeypatch, 2)
    assert utils.pick_device("cuda:1") == "cuda:1"
    with pytest.raises(UsageError, match=r"'cuda:2' does not exist: 2 GPU\(s\) are visible; use cuda:0 to cuda:1"):
        utils.pick_device("cuda:2")
    with pytest.raises(UsageError, match="unknown device 'cuda:x'"):
        utils.pick_device("cuda:x")


def test_run_cli_prints_one_line_and_exits_2(capsys):
    def main(argv):
        raise UsageError("something is wrong\nwith two lines: fix it")

    with pytest.raises(SystemExit) as info:
        utils.run_cli(main, [])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: something is wrong with two lines: fix it\n"


def test_run_cli_passes_argv():
    seen = []
    utils.run_cli(seen.append, ["--x"])
    assert seen == [["--x"]]


# ----------------------------------------------------------------------------- images and plots

def test_load_rgb_scales_16_bit_grey(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)).save(path)
    image = utils.load_rgb(path)
    assert image.mode == "RGB" and np.asarray(image).min() == 255


def test_to_uint8():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0])
    assert utils.to_uint8(x).tolist() == [0, 0, 128, 255, 255]


@pytest.mark.parametrize("name", ["grid.png", "grid.jpg"])
def test_save_images_grid_size(tmp_path, name):
    images = torch.rand(4, 3, 8, 8) * 2 - 1
    path = tmp_path / "sub" / name
    utils.save_images(images, path, min_size=1)
    with Image.open(path) as image:
        assert image.size == (22, 22) and image.mode == "RGB"
    assert os.listdir(tmp_path / "sub") == [name]


def test_save_images_keeps_pixels(tmp_path):
    images = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    utils.save_images(images, tmp_path / "row.png", nrow=3, min_size=1)
    array = np.asarray(Image.open(tmp_path / "row.png"))
    assert array.shape == (12, 32, 3)
    assert np.array_equal(array[2:10, 2:10], images[0].permute(1, 2, 0).numpy())


def test_small_images_are_scaled_up_by_nearest_neighbour(tmp_path):
    """16 px images are repeated 4 x 4 (64 px); each grid pixel is one source pixel."""
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    utils.save_images(images, tmp_path / "big.png", nrow=2)
    array = np.asarray(Image.open(tmp_path / "big.png"))
    assert array.shape == (68, 134, 3)
    expected = images[1].permute(1, 2, 0).numpy().repeat(4, axis=0).repeat(4, axis=1)
    assert np.array_equal(array[2:66, 68:132], expected)
    assert utils.upscale(torch.zeros(1, 1, 64, 64, dtype=torch.uint8)).shape == (1, 1, 64, 64)  # large enough
    assert utils.upscale(torch.zeros(1, 1, 24, 24, dtype=torch.uint8)).shape == (1, 1, 72, 72)  # k = 3


def test_save_images_with_captions_writes_each_above_its_row(tmp_path):
    images = torch.full((6, 3, 16, 16), 255, dtype=torch.uint8)  # white images: only the text and padding differ
    path = tmp_path / "captioned.png"
    utils.save_images(images, path, nrow=3, captions=["a red circle", "a blue triangle"])
    array = np.asarray(Image.open(path).convert("L"))
    strip, row = 14, 66  # caption strip, then the row's top padding and its 64 px images
    assert array.shape == (2 * (strip + row) + 2, 3 * 66 + 2)
    for top in (0, strip + row):
        assert (array[top:top + strip] < 128).any()  # dark text on the white strip
        assert (array[top + strip:top + strip + 2] == 0).all()  # the row's black top padding follows
        assert (array[top + strip + 2:top + strip + row, 2:66] == 255).all()  # then the first image, untouched
    assert (array[-2:] == 0).all()
    with pytest.raises(ValueError):
        utils.save_images(images, path, nrow=3, captions=["only one"])


def test_save_figure_is_figsize_times_dpi_and_leaves_no_temp_file(tmp_path):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3, 2))
    fig.add_subplot(1, 1, 1).plot([0, 1], [1, 0])
    utils.save_figure(fig, tmp_path / "plot.png", dpi=50)
    with Image.open(tmp_path / "plot.png") as image:
        assert image.format == "PNG" and image.size == (150, 100)
    assert os.listdir(tmp_path) == ["plot.png"]


def test_save_gif_keeps_every_frame_and_holds_the_last(tmp_path):
    frames = torch.zeros(3, 3, 8, 8, dtype=torch.uint8)
    frames[1, 0], frames[2, 1] = 255, 255  # black, red, green
    utils.save_gif(frames, tmp_path / "a.gif", seconds_per_frame=0.2)
    with Image.open(tmp_path / "a.gif") as gif:
        colours, durations = [], []
        for index in range(gif.n_frames):
            gif.seek(index)
            colours.append(tuple(gif.convert("RGB").getpixel((4, 4))))
            durations.append(gif.info["duration"])
    assert colours == [(0, 0, 0), (255, 0, 0), (0, 255, 0)] and durations == [200, 200, 1000]


def test_save_individual_names(tmp_path):
    images = torch.rand(5, 3, 8, 8) * 2 - 1
    paths = utils.save_individual(images, torch.tensor([3, 1, 3, 3, 1]), tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out")) == ["1_0.png", "1_1.png", "3_0.png", "3_1.png", "3_2.png"]
    assert len(paths) == 5
    assert Image.open(paths[0]).size == (8, 8)


def test_plot_loss_writes_png(tmp_path):
    path = tmp_path / "plots" / "loss.png"
    utils.plot_loss(list(np.linspace(1.0, 0.05, 300)), path, smooth=20)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 100
    utils.plot_loss([], tmp_path / "empty.png")
    assert os.path.getsize(tmp_path / "empty.png") > 0


# ----------------------------------------------------------------------------- torch files

def test_atomic_save_failure_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    utils.atomic_save({"step": 1, "w": torch.ones(3)}, path)

    def broken_save(obj, f):
        f.write(b"PK\x03\x04 partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        utils.atomic_save({"step": 2}, path)
    monkeypatch.undo()
    assert utils.load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        utils.load_checkpoint(tmp_path / "missing.pt")
    path = tmp_path / "half.pt"
    utils.atomic_save({"w": torch.randn(64, 64)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UsageError, match="not a readable PyTorch checkpoint") as info:
        utils.load_checkpoint(path)
    assert "\n" not in str(info.value)
    text = tmp_path / "notes.pt"
    text.write_text("hello, I am not a checkpoint")
    with pytest.raises(UsageError, match="truncated or another format"):
        utils.load_checkpoint(text)


@dataclasses.dataclass
class _Pickled:
    """A class that weights_only loading refuses."""

    value: int = 1


def test_load_checkpoint_names_a_refused_object(tmp_path):
    path = tmp_path / "object.pt"
    torch.save({"config": _Pickled()}, path)
    with pytest.raises(UsageError, match="_Pickled object, which weights_only loading refuses"):
        utils.load_checkpoint(path)
