"""config.py: each field group's checks, the network a Config describes (network_arch), and the scripts' Configs
composed of the groups, with the defaults, old names and resumable fields of the code before the refactor."""
import dataclasses
import importlib
import json
import pathlib

import pytest

import config
import training
from checkpoints import infer_network
from data import dataset_channels
from degradations import condition_channels
from modules import DiT, DiT_text, UNet, UNet_conditional, UNet_text, build_network
from test_fixed_seed import FAMILIES
from utils import UsageError, config_to_dict, old_names, parse_config, resumable_fields

REPO = pathlib.Path(__file__).resolve().parents[1]
TRAINING = ("ddpm", "ddpm_conditional", "ddpm_img2img", "train_sd", "train_vae")
TOOLS = ("sample", "evaluate")  # the scripts with the Checkpoint and RePaint groups
GROUPS = (config.Run, config.Data, config.Channels, config.ClassData, config.Network, config.Backbone,
          config.Schedule, config.Optimisation, config.Sampling, config.Conditional, config.Evaluation,
          config.Checkpoint, config.RePaint)
NEEDED = {"ckpt": "models/run/ema_ckpt.pt"}  # the field without which no Config of a tool is valid


# ----------------------------------------------------------------------------- each group's checks
# (group, the values set, the words of the error that name the bad value)
BAD = [
    (config.Run, {"mixed_precision": "fp8"}, "mixed_precision 'fp8' is unknown"),
    (config.Run, {"report_to": "mlflow"}, "report_to 'mlflow' is unknown"),
    (config.Run, {"log_every": 0}, "log_every 0 must be positive"),
    (config.Run, {"checkpoint_every": 0}, "checkpoint_every 0 must be positive"),
    (config.Run, {"keep_checkpoints": -1}, "keep_checkpoints -1 must be positive"),
    (config.Run, {"max_nonfinite": 0}, "max_nonfinite 0 must be positive"),
    (config.Run, {"print_every": 0}, "print_every 0 must be positive"),
    (config.Data, {"image_size": 20}, "image_size 20 is not divisible by 8"),
    (config.Channels, {"channels": 2}, "channels 2 is not supported"),
    (config.ClassData, {"augment": "rotate"}, "augment 'rotate' is unknown"),
    (config.ClassData, {"holdout": -1}, "holdout -1 is negative"),
    (config.Network, {"attn_factors": "2,3"}, "attn_factors '2,3' is not a list of the U-Net's downsampling factors"),
    (config.Network, {"attn_factors": "x"}, "attn_factors 'x' is not a list"),
    (config.Network, {"attn_factors": ""}, "attn_factors '' is not a list"),
    (config.Network, {"base_channels": 0}, "base_channels 0 must be positive"),
    (config.Network, {"dropout": 1.0}, "dropout 1.0 is not a rate"),
    (config.Network, {"dropout": -0.1}, "dropout -0.1 is not a rate"),
    (config.Backbone, {"backbone": "vit"}, "backbone 'vit' is unknown"),
    (config.Backbone, {"backbone": "dit", "dit_size": "dit-q"}, "dit_size 'dit-q' is unknown"),
    (config.Backbone, {"backbone": "dit", "patch_size": 3}, "patch_size 3 is not allowed"),
    (config.Schedule, {"schedule": "sigmoid"}, "schedule 'sigmoid' is unknown"),
    (config.Schedule, {"prediction_type": "x0"}, "prediction_type 'x0' is unknown"),
    (config.Schedule, {"min_snr_gamma": 0.0}, "min_snr_gamma 0.0 must be positive"),
    (config.Schedule, {"noise_steps": 0}, "noise_steps 0 must be positive"),
    (config.Optimisation, {"lr_decay": "step"}, "lr_decay 'step' is unknown"),
    (config.Optimisation, {"lr_warmup": -5}, "lr_warmup -5 is negative"),
    (config.Optimisation, {"grad_clip": 0.0}, "grad_clip 0.0 must be positive"),
    (config.Optimisation, {"batch_size": 0}, "batch_size 0 must be positive"),
    (config.Optimisation, {"epochs": 0}, "epochs 0 must be positive"),
    (config.Optimisation, {"gradient_accumulation_steps": 0}, "gradient_accumulation_steps 0 must be positive"),
    (config.Sampling, {"sampler": "plms"}, "sampler 'plms' is unknown"),
    (config.Conditional, {"p_uncond": 1.5}, "p_uncond 1.5 is not a probability"),
    (config.Conditional, {"p_uncond": -0.1}, "p_uncond -0.1 is not a probability"),
    (config.Conditional, {"cfg_scale": -1.0}, "cfg_scale -1.0 is negative"),
    (config.Conditional, {"n_per_row": 0}, "n_per_row 0 must be positive"),
    (config.Evaluation, {"eval_every": 0}, "eval_every 0 / eval_samples 100"),
    (config.Evaluation, {"eval_every": 5, "eval_samples": 1}, "eval_every 5 / eval_samples 1"),
    (config.Checkpoint, {"ckpt": None}, "no checkpoint given: pass --ckpt"),
    (config.Checkpoint, {"weights": "both"}, "weights 'both' is unknown"),
    (config.Checkpoint, {"image_size": 20}, "image_size 20 is not divisible by 8"),
    (config.Checkpoint, {"image_size": -8}, "image_size -8 is not divisible by 8"),
    (config.RePaint, {"jump_length": 0}, "jump_length 0 and jump_n_sample 10 must be >= 1"),
    (config.RePaint, {"jump_n_sample": 0}, "jump_length 10 and jump_n_sample 0 must be >= 1"),
    (config.RePaint, {"reconstruction_guidance": -1.0}, "reconstruction_guidance -1.0 must be >= 0"),
    (config.RePaint, {"reconstruction_guidance": float("nan")}, "reconstruction_guidance nan must be >= 0"),
]


def case_id(case):
    group, values, _ = case
    return f"{group.__name__}-" + "-".join(f"{key}={value}" for key, value in values.items())


def valid(cls):
    """The values a Config of `cls` needs beside its defaults to be valid."""
    names = {field.name for field in dataclasses.fields(cls)}
    return {key: value for key, value in NEEDED.items() if key in names}


def test_every_group_is_covered_and_every_group_with_checks_is_listed():
    checked = {name for name in dir(config) if isinstance(getattr(config, name), type)
               and dataclasses.is_dataclass(getattr(config, name)) and "validate" in vars(getattr(config, name))}
    assert checked == {group.__name__ for group in GROUPS}
    assert {group for group, _, _ in BAD} == set(GROUPS)


@pytest.mark.parametrize("group", GROUPS, ids=lambda group: group.__name__)
def test_each_group_accepts_its_defaults(group):
    assert group(**valid(group)).validate() is None


@pytest.mark.parametrize("case", BAD, ids=case_id)
def test_each_group_refuses_each_bad_value_with_one_line_naming_it(case):
    group, values, words = case
    with pytest.raises(UsageError) as error:
        group(**{**valid(group), **values}).validate()
    message = str(error.value)
    assert words in message and "\n" not in message, message


def script_configs(group):
    """The Configs of the scripts that compose `group` (all its fields are theirs)."""
    names = {field.name for field in dataclasses.fields(group)}
    configs = [importlib.import_module(script).Config for script in TRAINING + TOOLS]
    return [cls for cls in configs if names <= {field.name for field in dataclasses.fields(cls)}]


@pytest.mark.parametrize("script", TRAINING + TOOLS)
def test_each_script_config_accepts_its_defaults(script):
    cls = importlib.import_module(script).Config
    assert isinstance(cls(**valid(cls)).validate(), cls)


@pytest.mark.parametrize("case", BAD, ids=case_id)
def test_each_script_config_runs_the_checks_of_each_of_its_groups(case):
    """A script's Config.validate (which parse_config runs) refuses the bad value of each group it composes."""
    group, values, words = case
    configs = script_configs(group)
    assert configs, f"no script composes {group.__name__}"
    for cls in configs:
        with pytest.raises(UsageError, match=words.replace("(", r"\(")) as error:
            cls(**{**valid(cls), **values}).validate()
        assert "\n" not in str(error.value)


# ----------------------------------------------------------------------------- network_arch
def parsed(script, *flags):
    return parse_config(importlib.import_module(script).Config, ["--base_channels", "8", "--image_size", "16",
                                                                 "--dataset", "shapes", *flags])


def rebuilt(net, cfg):
    """The arch that checkpoints.infer_network reads from the network's weights and the run's saved config."""
    return infer_network(net.state_dict(), "net", config_to_dict(cfg))


def assert_same_architecture(arch, net, cfg):
    """The network built from `arch` is the one a checkpoint of it rebuilds, weight for weight."""
    again = rebuilt(net, cfg)
    for key in ("backbone", "c_in", "c_out", "num_classes", "base_channels", "attn_factors", "cond_channels",
                "context_dim", "patch_size", "dit_size", "depth", "dim", "heads"):
        if key in arch:
            assert again.get(key, 0 if key == "cond_channels" else None) == arch[key], key
    if arch["num_classes"] is not None or arch.get("context_dim") is not None:
        assert again["conditioning"] == arch["conditioning"]
    shapes = {key: tuple(value.shape) for key, value in build_network(again).state_dict().items()}
    assert shapes == {key: tuple(value.shape) for key, value in net.state_dict().items()}


def test_the_unconditional_unet_of_ddpm():
    cfg = parsed("ddpm", "--attn_factors", "2,8", "--dropout", "0.1")
    arch = config.network_arch(cfg, 3)
    assert (arch["backbone"], arch["c_in"], arch["c_out"], arch["num_classes"]) == ("unet", 3, 3, None)
    assert (arch["base_channels"], arch["attn_factors"], arch["dropout"]) == (8, (2, 8), 0.1)
    net = build_network(arch)
    assert type(net) is UNet and net.inc.double_conv[0].weight.shape[:2] == (8, 3)
    assert_same_architecture(arch, net, cfg)


@pytest.mark.parametrize("conditioning", ["add", "concat", "xattn", "adanorm"])
def test_the_class_conditional_unet_of_each_mode(conditioning):
    cfg = parsed("ddpm_conditional", "--conditioning", conditioning, "--channels", "1")
    arch = config.network_arch(cfg, 1, num_classes=10)
    assert (arch["conditioning"], arch["num_classes"], arch["c_in"], arch["c_out"]) == (conditioning, 10, 1, 1)
    net = build_network(arch)
    assert type(net) is UNet_conditional and net.conditioning == conditioning
    assert_same_architecture(arch, net, cfg)


@pytest.mark.parametrize("task, class_conditional", [("superres", False), ("inpaint", False), ("colorize", True)])
def test_the_image_conditioned_unet_of_ddpm_img2img(task, class_conditional):
    cfg = parsed("ddpm_img2img", "--task", task, "--class_conditional", str(class_conditional), "--holdout", "8")
    cond_channels = condition_channels(task, 3)
    num_classes = 10 if class_conditional else None
    arch = config.network_arch(cfg, 3, num_classes=num_classes, cond_channels=cond_channels)
    assert (arch["cond_channels"], arch["num_classes"]) == (cond_channels, num_classes) and cond_channels > 0
    net = build_network(arch)
    assert type(net) is UNet_conditional
    assert net.inc.double_conv[0].weight.shape[1] == 3 + cond_channels  # x_t and the condition, concatenated
    assert_same_architecture(arch, net, cfg)


@pytest.mark.parametrize("conditioning", ["cross_attention", "add"])
def test_the_text_conditioned_unet_of_train_sd(conditioning):
    cfg = parsed("train_sd", "--vae", "none", "--conditioning", conditioning, "--text_encoder", "clip")
    arch = config.network_arch(cfg, 3, context_dim=32)
    assert (arch["context_dim"], arch["conditioning"], arch["num_classes"]) == (32, conditioning, None)
    net = build_network(arch)
    assert type(net) is UNet_text
    assert_same_architecture(arch, net, cfg)


@pytest.mark.parametrize("script, num_classes, context_dim, kind", [
    ("ddpm", None, None, DiT), ("ddpm_conditional", 10, None, DiT), ("train_sd", None, 32, DiT_text)])
def test_the_dit_of_each_script(script, num_classes, context_dim, kind):
    flags = ["--backbone", "dit", "--dit_size", "dit-n", "--patch_size", "4"]
    cfg = parsed(script, *flags, *(["--vae", "none", "--text_encoder", "clip"] if context_dim else []))
    arch = config.network_arch(cfg, 3, num_classes=num_classes, context_dim=context_dim)
    assert (arch["depth"], arch["dim"], arch["heads"]) == tuple(config.dit_size("dit-n").values())
    assert (arch["backbone"], arch["patch_size"], arch["dit_size"], arch["num_classes"]) == ("dit", 4, "dit-n",
                                                                                           num_classes)
    net = build_network(arch)
    assert type(net) is kind
    assert_same_architecture(arch, net, cfg)


def test_the_network_options_reach_the_network():
    cfg = parsed("ddpm_conditional", "--gradient_checkpointing", "true")
    net = build_network(config.network_arch(cfg, 3, num_classes=10))
    assert net.gradient_checkpointing
    assert not build_network(config.network_arch(parsed("ddpm_conditional"), 3, num_classes=10)).gradient_checkpointing


@pytest.mark.parametrize("changes, message", [
    ({"backbone": "dit", "dropout": 0.1}, r"^dropout is a U-Net option: drop --dropout, or use --backbone unet$"),
    ({"backbone": "dit", "conditioning": "xattn"}, r"^conditioning 'xattn' is a U-Net mode: DiT reads the label by "
                                                   r"adaLN-Zero; drop --conditioning, or use --backbone unet$"),
    ({"backbone": "dit", "conditioning": "adanorm"}, r"^conditioning 'adanorm' is a U-Net mode"),
    ({"conditioning": "film"}, r"^conditioning 'film' is unknown: use one of add, concat, xattn, adanorm$"),
])
def test_network_arch_refuses_what_the_network_cannot_be(changes, message):
    cfg = dataclasses.replace(parsed("ddpm_conditional"), **changes)
    with pytest.raises(UsageError, match=message):
        config.network_arch(cfg, 3, num_classes=10)


def test_parse_attn_factors_and_dit_size():
    assert config.parse_attn_factors("1,2,4,8") == (1, 2, 4, 8) and config.parse_attn_factors("8") == (8,)
    for text in ("2,3", "", "x", "2,,4"):
        with pytest.raises(UsageError, match="is not a list of the U-Net's downsampling factors"):
            config.parse_attn_factors(text)
    assert config.dit_size("dit-s") == {"depth": 12, "dim": 384, "heads": 6}  # the paper's DiT-S
    with pytest.raises(UsageError, match="dit_size 'dit-q' is unknown"):
        config.dit_size("dit-q")


# ----------------------------------------------------------------------------- the Configs before and after
# The fields each training script gained in the refactor (the layout map), with the values the runs before had
NEW_FIELDS = {"train_sd": {"dropout": 0.0, "channels_last": False}, "train_vae": {"report_to": "none"}}


@pytest.fixture(scope="module")
def recorded():
    with open(REPO / "tests" / "data" / "fixed_seed.json") as f:
        return json.load(f)["runs"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_training_script_has_the_defaults_of_the_code_before_the_refactor(family, recorded, monkeypatch):
    """tests/data/fixed_seed.json holds the config each family's run saved before the refactor: the same flags (under
    their old names) parse today into that config, field for field, so the fields no flag set have the old
    defaults. The run resolves channels None to the data set's and mixed_precision None to "no"."""
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    script, flags = FAMILIES[family]
    places = {"<vae>": "<root>/tiny_vae", "<text>": "<root>/tiny_sd/text_encoder"}  # as the record writes them
    cfg, _ = parse_config(script.Config, [places.get(f, f) for f in flags] + ["--run_name", family], extra=[])
    now = config_to_dict(cfg)
    if "channels" in now:
        now["channels"] = cfg.channels or dataset_channels(cfg.dataset, cfg.dataset_path)
    now["mixed_precision"] = training.mixed_precision(cfg)[0]
    renamed = old_names(script.Config)
    before = {renamed.get(key, key): value for key, value in recorded[family]["config"].items()}
    new = NEW_FIELDS.get(script.__name__, {})
    assert set(now) - set(before) == set(new) and set(before) <= set(now)
    assert {key: now[key] for key in new} == new
    assert {key: now[key] for key in before} == before


def test_every_training_script_is_among_the_recorded_families():
    assert {script.__name__ for script, _ in FAMILIES.values()} == set(TRAINING)


# RESUMABLE_FIELDS of training.py, SD_RESUMABLE of train_sd.py and VAE_RESUMABLE of train_vae.py before the refactor
# (01ba1a6), in the old names
RESUMABLE_BEFORE = ("epochs", "max_steps", "log_every", "num_workers", "device", "n_samples", "n_per_class", "sampler",
                    "sample_steps", "compile", "mixed_precision", "eval_every", "eval_samples", "checkpoint_every",
                    "keep_checkpoints", "max_nonfinite", "print_every", "clip_x0", "data_on_device", "cache_latents",
                    "cache_dir", "gradient_checkpointing", "report_to")
SD_RESUMABLE_BEFORE = RESUMABLE_BEFORE + ("prompt", "cfg_scale", "n_per_prompt", "cache_latents", "cache_dir")
VAE_RESUMABLE_BEFORE = ("epochs", "max_steps", "log_every", "num_workers", "device", "compile", "mixed_precision",
                        "checkpoint_every", "keep_checkpoints", "max_nonfinite", "print_every", "data_on_device",
                        "scale_images", "shift", "export")


@pytest.mark.parametrize("script, before", [("ddpm", RESUMABLE_BEFORE), ("ddpm_conditional", RESUMABLE_BEFORE),
                                            ("ddpm_img2img", RESUMABLE_BEFORE), ("train_sd", SD_RESUMABLE_BEFORE),
                                            ("train_vae", VAE_RESUMABLE_BEFORE)])
def test_the_resumable_fields_are_those_before_the_refactor_and_cfg_scale(script, before):
    """The fields --resume lets change, now field metadata (utils.arg), are the old lists' (in the new names, where
    the script has them), cfg_scale in every script that has it, and report_to, the field train_vae.py gained."""
    cls = importlib.import_module(script).Config
    names = {field.name for field in dataclasses.fields(cls)}
    renamed = old_names(cls)
    expected = {renamed.get(name, name) for name in before} & names
    expected |= {"cfg_scale"} & names
    expected |= {"report_to"} & set(NEW_FIELDS.get(script, ()))
    assert resumable_fields(cls) == expected
