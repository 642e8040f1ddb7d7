"""Tests for checkpoints.py: state_dicts loaded strictly, any checkpoint rebuilt into its network (this repository's,
the reference's, train_sd.py's), and the Diffusion a run was trained with."""
import json
import os

import pytest
import torch

import ddpm_conditional
import train_sd
from checkpoints import (REFERENCE_IMAGE_SIZE, class_names, describe, infer_conditioning, infer_network, is_text_run,
                         load_image_model, load_model, load_state_dict_strict, pixel_diffusion, read_checkpoint,
                         run_diffusion, strip_wrapper_prefixes)
from config import network_arch
from conftest import moved, tiny_conditional, write_dit_run
from latents import Latents, run_latents
from modules import DiT, DiT_text, UNet, UNet_conditional, UNet_text, build_network
from utils import UsageError, config_to_dict, save_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ----------------------------------------------------------------------------- checkpoint files
# ----------------------------------------------------------------------------- state_dicts
def test_strip_wrapper_prefixes_removes_compile_and_ddp_prefixes_in_either_order_only_at_the_front():
    assert strip_wrapper_prefixes("module._orig_mod.inc.x") == "inc.x"
    assert strip_wrapper_prefixes("_orig_mod.module.inc.x") == "inc.x"
    assert strip_wrapper_prefixes("inc.module.x") == "inc.module.x"


def test_load_state_dict_strict_mismatch_and_prefix():
    small = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    wide = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Linear(16, 2), torch.nn.ReLU())
    with pytest.raises(UsageError) as info:
        load_state_dict_strict(small, wide.state_dict(), what="ema checkpoint")
    message = str(info.value)
    assert "0.weight: (16, 4) in ema checkpoint vs (8, 4) in model" in message
    assert "--base_channels" in message and "\n" not in message

    extra = dict(small.state_dict(), **{"2.weight": torch.zeros(1)})
    with pytest.raises(UsageError, match="1 unexpected keys"):
        load_state_dict_strict(small, extra)

    source = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    compiled = {"_orig_mod." + k: v for k, v in source.state_dict().items()}
    load_state_dict_strict(small, compiled)
    assert torch.equal(small[0].weight, source[0].weight)
    ddp = {"module." + k: v * 2 for k, v in source.state_dict().items()}
    load_state_dict_strict(small, ddp)
    assert torch.equal(small[1].bias, source[1].bias * 2)


# ----------------------------------------------------------------------------- the network from the weights
def test_infer_network_conditional():
    arch = infer_network(tiny_conditional().state_dict())
    assert arch == {"backbone": "unet", "c_in": 3, "c_out": 3, "base_channels": 8, "time_dim": 256, "num_classes": 3,
                    "conditioning": "add", "attn_factors": (1, 2, 4, 8)}


def test_infer_network_unconditional_and_other_widths():
    arch = infer_network(UNet(c_in=1, c_out=1, time_dim=64, base_channels=16).state_dict())
    assert arch == {"backbone": "unet", "c_in": 1, "c_out": 1, "base_channels": 16, "time_dim": 64,
                    "num_classes": None, "conditioning": None, "attn_factors": (1, 2, 4, 8)}
    assert type(build_network(arch)) is UNet


@pytest.mark.parametrize("factors", [(2, 4, 8), (8,), (1, 4)])
def test_infer_network_reads_the_attention_blocks_left_out(factors):
    net = UNet_conditional(num_classes=3, base_channels=8, conditioning="xattn", attn_factors=factors)
    arch = infer_network(net.state_dict(), saved={"conditioning": "xattn"})
    assert arch["attn_factors"] == factors
    rebuilt = build_network(arch)
    load_state_dict_strict(rebuilt, net.state_dict())  # every weight has its place, and no place lacks one
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([5, 500]), torch.tensor([0, 2])
    assert torch.equal(rebuilt(x, t, y), net(x, t, y))


@pytest.mark.parametrize("conditioning", UNet_conditional.CONDITIONINGS)
def test_infer_conditioning_reads_each_mode_from_the_weights_only_it_has(conditioning):
    net = UNet_conditional(num_classes=3, base_channels=8, conditioning=conditioning)
    assert infer_conditioning(net.state_dict()) == conditioning


def test_load_model_gives_the_saved_weights(ref_cond):
    model, _, saved = load_model(ref_cond)
    assert isinstance(model, UNet_conditional) and not model.training and saved == {}
    assert not any(p.requires_grad for p in model.parameters())
    expected = tiny_conditional().state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module.", "module._orig_mod.", "_orig_mod.module."])
def test_load_model_strips_compile_and_ddp_prefixes(prefix, tmp_path):
    state = {prefix + k: v for k, v in tiny_conditional().state_dict().items()}
    torch.save(state, tmp_path / "wrapped.pt")
    model, arch, _ = load_model(str(tmp_path / "wrapped.pt"))
    assert arch["num_classes"] == 3 and arch["base_channels"] == 8
    assert torch.equal(model.label_emb.weight, tiny_conditional().label_emb.weight)


def test_training_state_uses_ema_by_default(run_dir):
    path = str(run_dir / "training_state.pt")
    ema, _, saved = load_model(path)
    model, _, _ = load_model(path, weights="model")
    assert torch.equal(ema.inc.double_conv[0].weight, tiny_conditional(seed=2).inc.double_conv[0].weight)
    assert torch.equal(model.inc.double_conv[0].weight, tiny_conditional(seed=1).inc.double_conv[0].weight)
    assert saved["image_size"] == 24  # the config inside the file wins over config.json beside it
    with pytest.raises(UsageError, match="holds the EMA weights only: for the model's, pass ckpt.pt"):
        load_model(str(run_dir / "ema_ckpt.pt"), weights="model")  # not silently the EMA's


def test_read_checkpoint_reads_the_config_beside_a_state_without_one_and_names_missing_weights(run_dir):
    state = torch.load(run_dir / "training_state.pt", weights_only=True)
    del state["config"], state["ema"]
    torch.save(state, run_dir / "no_config.pt")
    state_dict, saved = read_checkpoint(str(run_dir / "no_config.pt"), weights="model")
    assert saved == json.loads((run_dir / "config.json").read_text())  # image_size 16, not the state's 24
    assert torch.equal(state_dict["inc.double_conv.0.weight"], tiny_conditional(seed=1).inc.double_conv[0].weight)
    with pytest.raises(UsageError, match="holds no 'ema' weights: use --weights model"):
        read_checkpoint(str(run_dir / "no_config.pt"))


@pytest.mark.parametrize("conditioning", UNet_conditional.CONDITIONINGS)
def test_each_conditioning_mode_loads_with_and_without_its_config(conditioning, tmp_path):
    torch.manual_seed(0)
    net = UNet_conditional(num_classes=3, base_channels=8, conditioning=conditioning, concat_channels=5,
                           context_tokens=2)
    (tmp_path / "bare").mkdir()
    torch.save(net.state_dict(), tmp_path / "bare" / "ema_ckpt.pt")  # no config beside it: read from the weights
    run = tmp_path / "models" / "R"
    run.mkdir(parents=True)
    torch.save(net.state_dict(), run / "ema_ckpt.pt")
    save_config(ddpm_conditional.Config(run_name="R", image_size=16, base_channels=8, conditioning=conditioning),
                str(run / "config.json"))
    for path in (tmp_path / "bare" / "ema_ckpt.pt", run / "ema_ckpt.pt"):
        model, arch, _ = load_model(str(path))
        assert type(model) is UNet_conditional and model.conditioning == conditioning
        assert (arch["c_in"], arch["num_classes"], arch["conditioning"]) == (3, 3, conditioning)
        x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([3, 700]), torch.tensor([2, -1])
        torch.testing.assert_close(model(x, t, y), net.eval()(x, t, y))


def test_a_config_naming_another_mode_than_the_weights_is_an_error(ref_cond):
    save_config(ddpm_conditional.Config(run_name="ref", conditioning="xattn"),
                os.path.join(os.path.dirname(ref_cond), "config.json"))
    with pytest.raises(UsageError) as info:
        load_model(ref_cond)
    assert "conditioned by 'add', but its saved config says 'xattn'" in str(info.value)
    assert "\n" not in str(info.value)


def test_a_dit_checkpoint_is_rebuilt_from_its_weights_and_saved_config(tmp_path):
    net, ckpt = write_dit_run(tmp_path)
    model, arch, saved = load_model(ckpt)
    assert type(model) is DiT and saved["backbone"] == "dit"
    assert {k: arch[k] for k in ("c_in", "c_out", "num_classes", "patch_size", "depth", "dim", "heads")} == \
        {"c_in": 3, "c_out": 3, "num_classes": 3, "patch_size": 4, "depth": 4, "dim": 64, "heads": 2}
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([3, 700]), torch.tensor([2, -1])
    torch.testing.assert_close(model(x, t, y), net(x, t, y))


@pytest.mark.parametrize("config, message", [
    (None, "holds a DiT, but no saved config names its dit_size and patch_size: keep the run's config.json"),
    ({"backbone": "unet"}, "holds a dit, but its saved config says backbone 'unet'"),
    ({"dit_size": "dit-t"}, "holds a DiT of depth 4, width 64 and 48 numbers per patch, but its saved config says "
                            "dit-t (8 blocks of width 128) with patch_size 4"),
    ({"patch_size": 2}, "but its saved config says dit-n (4 blocks of width 64) with patch_size 2"),
])
def test_a_dit_checkpoint_whose_config_does_not_fit_is_one_line(config, message, tmp_path):
    _, ckpt = write_dit_run(tmp_path, **(config or {}))
    if config is None:
        os.remove(os.path.join(os.path.dirname(ckpt), "config.json"))
    with pytest.raises(UsageError) as info:
        load_model(ckpt)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_unet_checkpoint_whose_config_says_dit_is_one_line(ref_cond):
    save_config(ddpm_conditional.Config(run_name="ref", backbone="dit"), os.path.join(os.path.dirname(ref_cond),
                                                                                      "config.json"))
    with pytest.raises(UsageError) as info:
        load_model(ref_cond)
    assert "holds a unet, but its saved config says backbone 'dit'" in str(info.value)
    assert "\n" not in str(info.value)


def with_state(src, dst, change):
    state = torch.load(src, weights_only=True)
    change(state)
    torch.save(state, dst)
    return str(dst)


@pytest.mark.parametrize("make, message", [
    (lambda src, tmp: with_state(src, tmp / "extra.pt", lambda s: s.update({"extra.weight": torch.zeros(3)})),
     "1 unexpected keys (extra.weight)"),
    (lambda src, tmp: with_state(src, tmp / "shape.pt", lambda s: s.update({"sa1.mha.in_proj_weight":
                                                                              torch.zeros(3, 16)})),
     "1 shape mismatches (sa1.mha.in_proj_weight: (3, 16) in checkpoint"),
    (lambda src, tmp: with_state(src, tmp / "missing_key.pt", lambda s: s.pop("outc.bias")),
     "1 missing keys (outc.bias)"),
    (lambda src, tmp: torch.save({"a": 1}, tmp / "dict.pt") or str(tmp / "dict.pt"), "is not a model state_dict"),
    (lambda src, tmp: torch.save({"x": torch.zeros(2)}, tmp / "other.pt") or str(tmp / "other.pt"),
     "is not a U-Net of this repository or the reference (no U-Net weight 'inc.double_conv.0.weight')"),
], ids=["extra key", "mis-shaped key", "missing key", "not tensors", "other network"])
def test_a_checkpoint_that_is_no_network_of_ours_is_one_line_naming_it(make, message, ref_cond, tmp_path):
    path = make(ref_cond, tmp_path)
    with pytest.raises(UsageError) as info:
        load_model(path)
    assert message in str(info.value) and path in str(info.value) and "\n" not in str(info.value)


def test_the_reference_full_size_conditional_checkpoint_loads_as_the_reference_built_it(tmp_path):
    torch.manual_seed(0)
    reference = UNet_conditional(num_classes=10)  # the reference's widths: 23M parameters
    path = tmp_path / "ema_ckpt.pt"
    torch.save(reference.state_dict(), path)
    model, arch, saved = load_model(str(path))
    assert (arch["num_classes"], arch["base_channels"], arch["time_dim"], arch["conditioning"]) == (10, 64, 256, "add")
    assert type(model) is UNet_conditional and saved == {}
    x, t, y = torch.randn(1, 3, 16, 16), torch.tensor([500]), torch.tensor([7])
    assert torch.equal(model(x, t, y), reference.eval()(x, t, y))
    diffusion = run_diffusion(saved, run_latents(saved, arch["c_in"], "cpu"), "cpu")
    assert diffusion.image_size == REFERENCE_IMAGE_SIZE and diffusion.noise_steps == 1000


# ----------------------------------------------------------------------------- names and words
def test_grid_rows_are_captioned_with_the_runs_class_names(run_dir, ref_cond):
    """classes.json beside a training run's checkpoints (or one folder up); "class k" for the reference's."""
    assert class_names(str(run_dir / "ema_ckpt.pt"), 3) == ["red circle", "green square", "blue triangle"]
    step_ckpt = run_dir / "checkpoints" / "step.pt"
    assert class_names(str(step_ckpt), 3)[2] == "blue triangle"
    assert class_names(str(run_dir / "ema_ckpt.pt"), 4) == [f"class {k}" for k in range(4)]  # no match
    assert class_names(ref_cond, 3) == ["class 0", "class 1", "class 2"]


def test_describe_names_the_backbone_its_size_and_its_condition_image():
    assert describe(infer_network(tiny_conditional().state_dict())) == "U-Net, base_channels 8"
    net = UNet_conditional(num_classes=None, base_channels=8, cond_channels=3, c_in=3, c_out=3)
    arch = infer_network(net.state_dict(), saved={"task": "superres"})
    assert arch["cond_channels"] == 3
    assert describe(arch) == "U-Net, base_channels 8, reading a 3-channel condition image"
    assert describe({"backbone": "dit", "dit_size": "dit-n", "patch_size": 4}) == "DiT dit-n/4"


# ----------------------------------------------------------------------------- train_sd.py's networks
def text_config(**fields):
    """A train_sd.py Config of a 16 px run in 4-channel latents with a text encoder of its own."""
    options = {"run_name": "S", "image_size": 16, "base_channels": 8, "dit_size": "dit-n", "patch_size": 4,
               "text_encoder": "tiny/clip", "prompt": ["a red circle"], **fields}
    return train_sd.Config(**options)


def write_text_run(root, context_dim, **fields):
    """models/S/{ema_ckpt.pt, config.json} of the network train_sd.py builds for text states of width context_dim,
    its zero-initialised weights moved; returns (network, ckpt)."""
    cfg = text_config(**fields)
    torch.manual_seed(0)
    net = moved(build_network(network_arch(cfg, 4, context_dim=context_dim))).eval()
    run = root / "models" / "S"
    run.mkdir(parents=True)
    torch.save(net.state_dict(), run / "ema_ckpt.pt")
    save_config(cfg, str(run / "config.json"))
    return net, str(run / "ema_ckpt.pt")


@pytest.mark.parametrize("backbone, conditioning, context_dim, kind", [
    ("unet", "cross_attention", 32, UNet_text),
    ("unet", "add", 32, UNet_text),
    ("dit", "cross_attention", 32, DiT_text),
    ("dit", "add", 32, DiT_text),
    ("dit", "cross_attention", 64, DiT_text),  # as wide as its blocks (dit-b with CLIP-L: 768 both)
])
def test_a_train_sd_network_round_trips_through_load_model(tmp_path, backbone, conditioning, context_dim, kind):
    net, ckpt = write_text_run(tmp_path, context_dim, backbone=backbone, conditioning=conditioning)
    model, arch, saved = load_model(ckpt)
    assert type(model) is kind and is_text_run(saved)
    assert (arch["backbone"], arch["conditioning"], arch["context_dim"], arch["c_in"]) == \
        (backbone, conditioning, context_dim, 4)
    expected = net.state_dict()
    assert model.state_dict().keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    generator = torch.Generator().manual_seed(1)
    context_shape = (2, 5, context_dim) if conditioning == "cross_attention" else (2, context_dim)
    x, context = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(context_shape, generator=generator)
    t = torch.tensor([3, 700])
    assert torch.equal(model(x, t, context), net(x, t, context))


def test_a_train_sd_config_naming_another_conditioning_than_the_weights_is_an_error(tmp_path):
    _, ckpt = write_text_run(tmp_path, 32, conditioning="add")
    save_config(text_config(conditioning="cross_attention"), os.path.join(os.path.dirname(ckpt), "config.json"))
    with pytest.raises(UsageError, match="conditioned by 'add', but its saved config says 'cross_attention'"):
        load_model(ckpt)


def test_load_image_model_refuses_a_train_sd_checkpoint_naming_its_sampler(tmp_path, ref_cond):
    _, ckpt = write_text_run(tmp_path, 32)
    with pytest.raises(UsageError) as info:
        load_image_model(ckpt)
    message = str(info.value)
    assert "is a train_sd.py checkpoint" in message and f"python train_sd.py --sample --ckpt {ckpt}" in message
    assert "\n" not in message
    model, arch, saved = load_image_model(ref_cond)
    assert type(model) is UNet_conditional and arch == infer_network(tiny_conditional().state_dict()) and saved == {}


def test_is_text_run_needs_a_text_encoder_and_prompts():
    text = config_to_dict(text_config())
    assert is_text_run(text)
    assert not is_text_run(config_to_dict(ddpm_conditional.Config()))
    assert not is_text_run({})
    assert not is_text_run({k: v for k, v in text.items() if k != "text_encoder"})
    assert not is_text_run({k: v for k, v in text.items() if k != "prompt"})


# ----------------------------------------------------------------------------- a run's Diffusion
def test_schedule_comes_from_saved_config_or_reference_defaults(run_dir):
    _, _, saved = load_model(str(run_dir / "ema_ckpt.pt"))
    pixels = Latents(None, 3)
    diffusion = run_diffusion(saved, pixels, "cpu")
    assert (diffusion.noise_steps, diffusion.image_size, diffusion.c_in) == (200, 16, 3)
    reference = run_diffusion({}, pixels, "cpu")
    assert (reference.noise_steps, reference.image_size) == (1000, 64)
    assert reference.beta[0].item() == pytest.approx(1e-4) and reference.beta[-1].item() == pytest.approx(0.02)
    override = run_diffusion(saved, pixels, "cpu", image_size=32)
    assert override.image_size == 32


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_prediction_type_comes_from_the_saved_config_and_old_configs_predict_eps(run_dir, prediction_type):
    config = json.loads((run_dir / "config.json").read_text())
    old = {key: value for key, value in config.items() if key != "prediction_type"}  # written before the field
    assert run_diffusion(old, Latents(None, 3), "cpu").prediction_type == "epsilon"
    saved = {**config, "prediction_type": prediction_type}
    assert run_diffusion(saved, Latents(None, 3), "cpu").prediction_type == prediction_type


def test_a_config_and_its_saved_dict_give_the_same_diffusion():
    cfg = ddpm_conditional.Config(image_size=16, noise_steps=300, schedule="cosine", prediction_type="v_prediction")
    from_config = run_diffusion(cfg, Latents(None, 3), "cpu")
    from_dict = run_diffusion(config_to_dict(cfg), Latents(None, 3), "cpu")
    for diffusion in (from_config, from_dict):
        assert (diffusion.noise_steps, diffusion.image_size, diffusion.schedule, diffusion.prediction_type) == \
            (300, 16, "cosine", "v_prediction")
    assert torch.equal(from_config.beta, from_dict.beta)


@pytest.mark.parametrize("saved_clip, flag, expected", [(None, None, True), (False, None, False), (True, None, True),
                                                         (False, True, True), (True, False, False)])
def test_clip_x0_is_the_flag_else_the_runs_setting_else_true_in_pixel_space(saved_clip, flag, expected):
    saved = {"image_size": 16, "clip_x0": saved_clip}
    assert run_diffusion(saved, Latents(None, 3), "cpu", clip_x0=flag).clip_x0 is expected


def test_a_saved_image_size_not_divisible_by_8_is_one_line():
    with pytest.raises(UsageError, match=r"the saved image_size 12 is not divisible by 8: pass --image_size 64"):
        run_diffusion({"image_size": 12}, Latents(None, 3), "cpu")


def test_a_latent_runs_diffusion_is_in_its_vae_latents_without_clipping(latent_run):
    _, arch, saved = load_model(latent_run["ckpt"])
    latents = run_latents(saved, arch["c_in"], "cpu")
    diffusion = run_diffusion(saved, latents, "cpu")
    assert (diffusion.image_size, diffusion.c_in, diffusion.noise_steps) == (8, 4, 200)  # 16 px through factor 2
    assert diffusion.clip_x0 is False  # latents have no [-1, 1] range
    with pytest.raises(UsageError, match="RePaint work in pixel space, and this run trains in a VAE's latents"):
        pixel_diffusion(saved, arch, "cpu", "RePaint")


def test_pixel_diffusion_is_the_runs_diffusion_in_pixel_space(run_dir):
    _, arch, saved = load_model(str(run_dir / "ema_ckpt.pt"))
    diffusion = pixel_diffusion(saved, arch, "cpu", "RePaint", image_size=32, clip_x0=False)
    assert (diffusion.image_size, diffusion.c_in, diffusion.noise_steps, diffusion.clip_x0) == (32, 3, 200, False)
