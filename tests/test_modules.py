"""The networks: reference layout and outputs, any image size, per-row null labels, attention, EMA, build_network."""
import copy
import math
import pathlib
import re

import pytest
import torch
import torch.nn.functional as F

from checkpoints import infer_network
from conftest import moved
from diffusion import Diffusion
from modules import (DIT_SIZES, EMA, NULL_LABEL, PATCH_SIZES, CrossAttention, DiT, DiT_text, DoubleConv, NoAttention,
                     SelfAttention, UNet, UNet_conditional, UNet_text, build_network, patchify, position_embedding_2d,
                     timestep_encoding, unpatchify)
from utils import count_flops

REFERENCE_LAYOUT = pathlib.Path(__file__).parent / "data" / "reference_state_dict.txt"


def reference_layout():
    """{section title: {key: shape}} read from the recorded reference state_dict layout."""
    sections, current = {}, None
    for line in REFERENCE_LAYOUT.read_text().splitlines():
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        elif "\t" in line:
            key, shape = line.split("\t")
            current[key] = tuple(int(d) for d in re.findall(r"\d+", shape))
    return sections


def deterministic_weights(model):
    """The weights of the reference test vector: a sine of the flat index, phase set by the name."""
    state = {}
    for name, tensor in model.state_dict().items():
        k = sum(ord(c) for c in name) % 97
        v = torch.sin(torch.arange(tensor.numel(), dtype=torch.float64) * 0.7 + k).float().reshape(tensor.shape)
        if tensor.dim() >= 2:
            state[name] = v / math.sqrt(tensor[0].numel())
        elif name.endswith("weight"):
            state[name] = 1 + 0.1 * v
        else:
            state[name] = 0.1 * v
    model.load_state_dict(state, strict=True)
    return model.eval()


def test_state_dicts_match_the_reference_layout_and_load_strictly():
    layout = reference_layout()
    for model, title in [(UNet(), "UNet"), (UNet_conditional(num_classes=10), "UNet_conditional num_classes=10")]:
        expected = layout[title]
        got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert got == expected
        reference_state = {k: torch.zeros(shape) for k, shape in expected.items()}
        assert not model.load_state_dict(reference_state, strict=True).missing_keys
    assert sum(p.numel() for p in UNet().parameters()) == 23332739
    assert sum(p.numel() for p in UNet_conditional(num_classes=10).parameters()) == 23335299


# Recorded by running the reference's own networks in fp32 on the CPU with `deterministic_weights`.
REFERENCE_OUTPUTS = {
    "UNet": dict(mean=-0.161088, std=0.246930, abs_sum=5880.0103,
                 first=[0.27911, 0.50775, 0.66725, 0.76557, 0.83215, 0.8837],
                 last=[-1.17934, -1.15932, -1.11751, -1.04442, -0.92636, -0.74177]),
    "UNet_conditional": dict(mean=-0.187980, std=0.225290, abs_sum=5766.1221,
                             first=[0.2891, 0.52961, 0.69669, 0.80174, 0.87093, 0.9223],
                             last=[-1.18606, -1.16761, -1.12717, -1.05456, -0.93679, -0.75087]),
}


@pytest.mark.parametrize("name", ["UNet", "UNet_conditional", "UNet_conditional_no_label"])
def test_reference_test_vector(name):
    x = torch.sin(torch.arange(2 * 3 * 64 * 64, dtype=torch.float64) * 0.01).float().reshape(2, 3, 64, 64)
    t = torch.tensor([7, 731])
    with torch.no_grad():
        if name == "UNet":
            out, expected = deterministic_weights(UNet())(x, t), REFERENCE_OUTPUTS["UNet"]
        elif name == "UNet_conditional":
            model = deterministic_weights(UNet_conditional(num_classes=10))
            out, expected = model(x, t, torch.tensor([3, 9])), REFERENCE_OUTPUTS["UNet_conditional"]
        else:
            out, expected = deterministic_weights(UNet_conditional(num_classes=10))(x, t), REFERENCE_OUTPUTS["UNet"]
    assert out.mean().item() == pytest.approx(expected["mean"], abs=1e-4)
    assert out.std().item() == pytest.approx(expected["std"], abs=1e-4)
    assert out.abs().sum().item() == pytest.approx(expected["abs_sum"], rel=1e-5)
    torch.testing.assert_close(out[0, 0, 0, :6], torch.tensor(expected["first"]), atol=1e-4, rtol=0)
    torch.testing.assert_close(out[1, 2, 63, -6:], torch.tensor(expected["last"]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("size", [16, 32, 64])
def test_any_size_divisible_by_8(size):
    model = UNet_conditional(num_classes=3, base_channels=8)
    x = torch.randn(2, 3, size, size)
    assert model(x, torch.tensor([1, 500]), torch.tensor([0, 2])).shape == (2, 3, size, size)
    assert UNet(base_channels=8)(x, torch.tensor([1, 500])).shape == (2, 3, size, size)
    assert UNet(base_channels=8)(torch.randn(1, 3, size, 2 * size), torch.tensor([3])).shape == (1, 3, size, 2 * size)


def test_size_not_divisible_by_8_is_a_value_error():
    with pytest.raises(ValueError, match=r"20x20 is not divisible by 8"):
        UNet(base_channels=8)(torch.randn(1, 3, 20, 20), torch.tensor([1]))


def test_base_channels_scales_every_width_by_the_same_ratio():
    full = {k: v.shape for k, v in UNet().state_dict().items()}
    half = {k: v.shape for k, v in UNet(base_channels=32).state_dict().items()}
    assert full.keys() == half.keys()
    unscaled = {("inc.double_conv.0.weight", 1), ("outc.weight", 0), ("outc.bias", 0)}  # image channels
    for key, shape in full.items():
        expected = []
        for dim, size in enumerate(shape):
            kernel = len(shape) == 4 and dim >= 2
            time_dim = key.endswith("emb_layer.1.weight") and dim == 1
            expected.append(size if kernel or time_dim or (key, dim) in unscaled else size // 2)
        expected = tuple(expected)
        assert tuple(half[key]) == expected, key


@pytest.mark.parametrize("factors, left_out", [((2, 4, 8), {"sa6"}), ((4, 8), {"sa1", "sa5", "sa6"}),
                                                ((1, 2, 4), {"sa3"}), ((8,), {"sa1", "sa2", "sa4", "sa5", "sa6"})])
def test_attn_factors_leave_out_the_attention_blocks_of_the_other_factors(factors, left_out):
    full = UNet_conditional(num_classes=3, base_channels=8)
    net = UNet_conditional(num_classes=3, base_channels=8, attn_factors=factors)
    blocks = {key.split(".")[0] for key in full.state_dict()} - {key.split(".")[0] for key in net.state_dict()}
    assert blocks == left_out
    assert all(isinstance(getattr(net, name), NoAttention) for name in left_out)
    shared = {k: v for k, v in full.state_dict().items() if k.split(".")[0] not in left_out}
    net.load_state_dict(shared)  # strict: every other weight is where the full network has it
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([3, 700]), torch.tensor([0, 2])
    for name in left_out:  # the full network with those blocks replaced by the identity computes the same
        setattr(full, name, NoAttention())
    assert torch.equal(net(x, t, y), full(x, t, y))


def test_unknown_attn_factor_is_a_value_error():
    with pytest.raises(ValueError, match=r"attn_factors \[3\] are not downsampling factors of the U-Net"):
        UNet(base_channels=8, attn_factors=(2, 3))


def test_no_device_is_stored_on_the_model():
    model = UNet_conditional(num_classes=3, base_channels=8)
    assert not hasattr(model, "device")
    assert timestep_encoding(torch.tensor([5]), 8).device == torch.device("cpu")


def test_timestep_encoding_formula():
    t = torch.tensor([0, 3, 999])
    dim = 8
    expected = torch.zeros(3, dim)
    for row, step in enumerate(t.tolist()):
        for i in range(dim // 2):
            angle = step / 10000 ** (2 * i / dim)
            expected[row, i] = math.sin(angle)
            expected[row, dim // 2 + i] = math.cos(angle)
    torch.testing.assert_close(timestep_encoding(t, dim), expected, atol=1e-5, rtol=1e-5)


def test_null_label_rows_equal_the_unconditional_prediction():
    torch.manual_seed(0)
    model = UNet_conditional(num_classes=4, base_channels=8).eval()
    with torch.no_grad():
        model.label_emb.weight.normal_()
        x, t = torch.randn(3, 3, 16, 16), torch.tensor([10, 500, 900])
        mixed = model(x, t, torch.tensor([2, NULL_LABEL, 1]))
        uncond = model(x, t)
        cond = model(x, t, torch.tensor([2, 0, 1]))
    torch.testing.assert_close(mixed[1], uncond[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[[0, 2]], cond[[0, 2]], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(mixed[0], uncond[0], atol=1e-3)


def test_self_attention_matches_a_hand_written_softmax_attention():
    torch.manual_seed(0)
    block = SelfAttention(8, heads=4).eval()
    x = torch.randn(2, 8, 4, 4)
    tokens = x.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, HW, C)
    h = F.layer_norm(tokens, (8,), block.ln.weight, block.ln.bias)
    q, k, v = (h @ block.mha.in_proj_weight.T + block.mha.in_proj_bias).chunk(3, dim=-1)
    heads = [torch.softmax(q[..., i:i + 2] @ k[..., i:i + 2].transpose(1, 2) / math.sqrt(2), dim=-1) @ v[..., i:i + 2]
             for i in range(0, 8, 2)]
    a = torch.cat(heads, dim=-1) @ block.mha.out_proj.weight.T + block.mha.out_proj.bias + tokens
    ff = block.ff_self
    out = ff[3](F.gelu(ff[1](F.layer_norm(a, (8,), ff[0].weight, ff[0].bias)))) + a
    expected = out.transpose(1, 2).reshape(2, 8, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


def test_attention_runs_on_the_fused_kernel(monkeypatch):
    fused, modules_called = [], []
    original = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: fused.append(1) or original(*a, **k))
    monkeypatch.setattr(torch.nn.MultiheadAttention, "forward", lambda *a, **k: modules_called.append(1))
    UNet(base_channels=8)(torch.randn(1, 3, 16, 16), torch.tensor([3]))
    assert len(fused) == 6
    UNet_text(base_channels=8, context_dim=16)(torch.randn(1, 4, 16, 16), torch.tensor([3]), torch.randn(1, 5, 16))
    assert len(fused) == 6 + 12 and not modules_called  # 6 self- and 6 cross-attentions


def test_cross_attention_matches_the_multihead_attention_module():
    torch.manual_seed(0)
    block = CrossAttention(query_dim=8, context_dim=12, heads=2)
    x, context = torch.randn(3, 10, 8), torch.randn(3, 5, 12)
    expected = block.mha(x, context, context, need_weights=False)[0]
    torch.testing.assert_close(block(x, context), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("conditioning", ["cross_attention", "add"])
def test_text_unet_shapes(conditioning):
    model = UNet_text(c_in=4, c_out=4, base_channels=8, context_dim=16, conditioning=conditioning)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([1, 999])
    context = torch.randn(2, 7, 16) if conditioning == "cross_attention" else torch.randn(2, 16)
    out = model(x, t, context)
    assert out.shape == (2, 4, 16, 16)
    other = model(x, t, context + 1.0)
    assert not torch.allclose(out, other)  # the text changes the prediction


def test_cross_attention_shapes():
    attention = CrossAttention(query_dim=8, context_dim=12, heads=2)
    assert attention(torch.randn(3, 10, 8), torch.randn(3, 5, 12)).shape == (3, 10, 8)


def test_ema_warm_up_copies_then_follows_the_formula():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema_model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = EMA(beta=0.9, start_step=2)
    for _ in range(2):
        with torch.no_grad():
            model[0].weight.add_(1.0)
            model[1].running_mean.add_(0.5)
        ema.step_ema(ema_model, model)
        torch.testing.assert_close(ema_model[0].weight, model[0].weight)
        torch.testing.assert_close(ema_model[1].running_mean, model[1].running_mean)
    before = ema_model[0].weight.clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.step_ema(ema_model, model)
    torch.testing.assert_close(ema_model[0].weight, 0.9 * before + 0.1 * model[0].weight)
    assert ema.step == 3
    restored = EMA()
    restored.load_state_dict(ema.state_dict())
    assert (restored.beta, restored.start_step, restored.step) == (0.9, 2, 3)


def test_ema_default_semantics_are_the_reference():
    ema = EMA()
    assert (ema.beta, ema.start_step) == (0.995, 2000)
    assert not ema.warmup


@pytest.mark.parametrize("start_step", [0, 3])
def test_ema_warmup_decay_is_min_beta_and_1_plus_n_over_10_plus_n(start_step):
    """After start_step plain copies, update n uses decay min(beta, (1 + n) / (10 + n)), as diffusers' EMAModel."""
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(-1.0)
    ema_model = copy.deepcopy(model)  # as training.train starts it
    ema = EMA(beta=0.95, start_step=start_step, warmup=True)
    expected_ema, decays = -1.0, []
    for step in range(start_step + 300):
        with torch.no_grad():
            model.weight.fill_(float(step))
        ema.step_ema(ema_model, model)
        if step < start_step:
            expected_ema = float(step)
        else:
            n = step - start_step
            decays.append(min(0.95, (1 + n) / (10 + n)))
            expected_ema = decays[-1] * expected_ema + (1 - decays[-1]) * step
        assert ema_model.weight.item() == pytest.approx(expected_ema, rel=1e-5)
    assert decays[:3] == [0.1, 2 / 11, 3 / 12] and decays[-1] == 0.95
    assert ema.decay() == 0.95  # the warm-up has reached beta: (1 + n) / (10 + n) >= 0.95 from n = 170
    restored = EMA()
    restored.load_state_dict(ema.state_dict())
    assert restored.warmup and restored.decay() == 0.95
    restored.load_state_dict({"beta": 0.9, "start_step": 5, "step": 7})  # a state saved before the warm-up
    assert not restored.warmup and restored.decay() == 0.9


def test_ema_multi_tensor_update_equals_the_per_tensor_formula_on_every_tensor_of_the_unet():
    torch.manual_seed(0)
    model, ema_model = (UNet_conditional(num_classes=3, base_channels=8) for _ in range(2))
    expected = [e.detach().lerp(p.detach(), 1 - 0.9) for e, p in zip(ema_model.parameters(), model.parameters())]
    EMA(beta=0.9, start_step=0).step_ema(ema_model, model)
    updated = list(ema_model.parameters())
    assert len(updated) == len(expected) > 100
    assert all(torch.equal(e, x) for e, x in zip(updated, expected))


# ----------------------------------------------------------------------------- the four conditioning modes
MODES = UNet_conditional.CONDITIONINGS
MODE_KEYS = {"add": "label_emb.weight", "concat": "label_map.weight", "xattn": "label_tokens.weight",
             "adanorm": "inc.modulation.1.weight"}


def trained_like(model):
    """Random non-zero weights for the parts that start at zero (the AdaGN modulation), as after training."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modulation" in name:
                p.normal_(0, 0.05)
    return model.eval()


@pytest.mark.parametrize("conditioning", MODES)
def test_every_mode_reads_the_label_and_null_rows_are_unconditional(conditioning):
    torch.manual_seed(0)
    model = trained_like(UNet_conditional(num_classes=4, base_channels=8, conditioning=conditioning))
    x, t = torch.randn(4, 3, 16, 16), torch.tensor([10, 500, 900, 300])
    with torch.no_grad():
        mixed = model(x, t, torch.tensor([2, NULL_LABEL, 1, NULL_LABEL]))  # the batch guidance sends
        uncond = model(x, t)  # y=None: no row has a label
        cond = model(x, t, torch.tensor([2, 0, 1, 3]))
        other = model(x, t, torch.tensor([3, 0, 0, 3]))
    assert mixed.shape == (4, 3, 16, 16)
    torch.testing.assert_close(mixed[[1, 3]], uncond[[1, 3]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[[0, 2]], cond[[0, 2]], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(cond[0], uncond[0], atol=1e-3)  # a label is not the null label
    assert not torch.allclose(cond[[0, 2]], other[[0, 2]], atol=1e-3)  # another label gives another output
    torch.testing.assert_close(cond[3], other[3])  # the same label, the same output


@pytest.mark.parametrize("conditioning", MODES)
def test_each_mode_has_its_own_label_weights(conditioning):
    keys = set(UNet_conditional(num_classes=4, base_channels=8, conditioning=conditioning).state_dict())
    expected = {conditioning, "add"} if conditioning == "adanorm" else {conditioning}  # adanorm: add's label_emb too
    assert {mode for mode, key in MODE_KEYS.items() if key in keys} == expected


def test_new_modes_leave_the_add_network_as_it_was():
    add = UNet_conditional(num_classes=10, base_channels=8)
    default = UNet_conditional(num_classes=10, base_channels=8, conditioning="add")
    assert {k: v.shape for k, v in add.state_dict().items()} == {k: v.shape for k, v in default.state_dict().items()}
    concat = UNet_conditional(num_classes=10, base_channels=8, conditioning="concat", concat_channels=5)
    assert concat.inc.double_conv[0].weight.shape == (8, 3 + 5, 3, 3)  # the label map enters as 5 more channels
    xattn = UNet_conditional(num_classes=10, base_channels=8, conditioning="xattn", context_tokens=2)
    assert xattn.label_tokens.weight.shape == (11, 2 * 256)  # 10 classes and the null label, 2 tokens each


@pytest.mark.parametrize("conditioning", ["add", "adanorm"])
def test_dropout_acts_in_training_only_and_adds_no_weights(conditioning):
    torch.manual_seed(0)
    plain = UNet_conditional(num_classes=4, base_channels=8, conditioning=conditioning, cond_channels=1)
    dropped = UNet_conditional(num_classes=4, base_channels=8, conditioning=conditioning, cond_channels=1,
                               dropout=0.5)
    dropped.load_state_dict(plain.state_dict(), strict=True)  # the same keys: a checkpoint loads at any rate
    assert all(block.dropout == 0.5 for block in dropped.modules() if isinstance(block, DoubleConv))
    x, t, y, cond = torch.randn(2, 3, 16, 16), torch.tensor([10, 500]), torch.tensor([1, 2]), torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(plain.eval()(x, t, y, cond), dropped.eval()(x, t, y, cond))  # sampling: no dropout
        torch.manual_seed(1)
        first = dropped.train()(x, t, y, cond)
        torch.manual_seed(2)
        second = dropped(x, t, y, cond)
        torch.manual_seed(1)
        assert torch.equal(first, dropped(x, t, y, cond))  # the same dropout mask for the same generator state
        assert not torch.allclose(first, second)  # another mask, another output
        assert torch.equal(plain.train()(x, t, y, cond), plain.eval()(x, t, y, cond))  # rate 0: train = eval


def test_adanorm_with_zero_initialised_modulation_starts_as_the_unconditional_network():
    torch.manual_seed(0)
    adanorm = UNet_conditional(num_classes=4, base_channels=8, conditioning="adanorm").eval()
    plain = UNet(base_channels=8).eval()
    shared = {k: v for k, v in adanorm.state_dict().items() if k in plain.state_dict()}
    plain.load_state_dict(shared, strict=True)  # every weight of the plain U-Net, none of AdaGN's
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([5, 400, 999])
    with torch.no_grad():
        expected = plain(x, t)
        for y in (torch.tensor([0, 1, 3]), torch.tensor([NULL_LABEL] * 3), None):
            torch.testing.assert_close(adanorm(x, t, y), expected, atol=1e-6, rtol=1e-6)


def test_adanorm_scales_and_shifts_each_norm():
    torch.manual_seed(0)
    block = DoubleConv(2, 4, norm_emb_dim=6).eval()
    with torch.no_grad():
        block.modulation[1].weight.normal_()
        block.modulation[1].bias.normal_()
    x, norm_emb = torch.randn(2, 2, 5, 5), torch.randn(2, 6)
    conv1, norm1, act, conv2, norm2 = block.double_conv
    scale1, shift1, scale2, shift2 = block.modulation(norm_emb).split([4, 4, 4, 4], dim=1)
    h = norm1(conv1(x)) * (1 + scale1[:, :, None, None]) + shift1[:, :, None, None]
    expected = norm2(conv2(act(h))) * (1 + scale2[:, :, None, None]) + shift2[:, :, None, None]
    with torch.no_grad():
        torch.testing.assert_close(block(x, norm_emb), expected)
        torch.testing.assert_close(block(x), block.double_conv(x))  # no embedding: the plain block


@pytest.mark.parametrize("num_classes, conditioning", [(None, "add"), (4, "add"), (4, "concat")])
def test_the_condition_image_reaches_the_network_as_input_channels(num_classes, conditioning):
    """ddpm_img2img.py's network: the output changes when only the condition image changes, a missing condition is
    the zero image (the dropped one), and the image enters through the same concat_maps as the class map."""
    torch.manual_seed(0)
    model = UNet_conditional(num_classes=num_classes, base_channels=8, conditioning=conditioning,
                             cond_channels=3).eval()
    concat = 8 if conditioning == "concat" else 0
    assert model.inc.double_conv[0].weight.shape == (8, 3 + 3 + concat, 3, 3)  # RGB superres: 6 channels (+ the map)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 700])
    y = None if num_classes is None else torch.tensor([1, 2])
    cond, other = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = model(x, t, y, cond=cond)
        assert not torch.allclose(out, model(x, t, y, cond=other), atol=1e-4)
        torch.testing.assert_close(model(x, t, y), model(x, t, y, cond=torch.zeros_like(cond)))
        if num_classes is not None:  # the label still counts beside the image
            assert not torch.allclose(out, model(x, t, torch.tensor([3, 0]), cond=cond), atol=1e-4)
    with pytest.raises(ValueError, match=r"condition image of shape \(2, 1, 16, 16\).*takes \(2, 3, 16, 16\)"):
        model(x, t, y, cond=torch.zeros(2, 1, 16, 16))


def test_an_inpainting_network_reads_7_channels_and_a_network_without_a_condition_keeps_its_weights():
    inpaint = UNet_conditional(base_channels=8, cond_channels=4)  # Palette: the masked RGB image and the mask
    assert inpaint.inc.double_conv[0].weight.shape == (8, 7, 3, 3)
    plain = {k: v.shape for k, v in UNet(base_channels=8).state_dict().items()}
    assert {k: v.shape for k, v in UNet_conditional(base_channels=8).state_dict().items()} == plain


def test_unknown_conditioning_is_a_value_error():
    with pytest.raises(ValueError, match=r"conditioning 'film' is unknown: use one of add, concat, xattn, adanorm"):
        UNet_conditional(num_classes=3, conditioning="film")


# ----------------------------------------------------------------------------- DiT
def tiny_dit(**options):
    torch.manual_seed(0)
    return DiT(**{"num_classes": 4, "patch_size": 2, "depth": 2, "dim": 32, "heads": 2, **options}).eval()


def away_from_zero(model):
    """Random values for every weight that starts at zero (adaLN-Zero's modulations and gates, the output layer, the
    cross-attentions' output), as after training."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    return model.eval()


# Every allowed size: multiples of the patch size, square or not (the scripts use multiples of 8).
ALLOWED = [(p, h, w) for p in PATCH_SIZES for h, w in [(8, 8), (16, 16), (24, 24), (32, 32), (16, 32), (32, 8),
                                                         (3 * p, 5 * p), (p, p)]]


@pytest.mark.parametrize("patch_size, height, width", ALLOWED)
def test_patchify_cuts_row_major_patches_and_unpatchify_is_its_inverse(patch_size, height, width):
    p = patch_size
    x = torch.randn(2, 3, height, width)
    tokens = patchify(x, p)
    assert tokens.shape == (2, (height // p) * (width // p), p * p * 3)
    for index in (0, tokens.shape[1] // 2, tokens.shape[1] - 1):  # token k: the patch at row k // (W/p), col k % (W/p)
        row, col = divmod(index, width // p)
        patch = x[:, :, row * p:(row + 1) * p, col * p:(col + 1) * p]  # (B, C, p, p)
        assert torch.equal(tokens[:, index], patch.permute(0, 2, 3, 1).flatten(1))  # flattened as (p, p, C)
    assert torch.equal(unpatchify(tokens, p, height, width), x)
    features = torch.randn(2, (height // p) * (width // p), p * p * 4)
    assert torch.equal(patchify(unpatchify(features, p, height, width), p), features)


@pytest.mark.parametrize("patch_size, height, width", ALLOWED)
def test_dit_output_has_the_input_shape_at_every_allowed_size(patch_size, height, width):
    x, t = torch.randn(2, 3, height, width), torch.tensor([1, 900])
    with torch.no_grad():
        assert tiny_dit(patch_size=patch_size)(x, t, torch.tensor([0, 3])).shape == x.shape
        assert tiny_dit(patch_size=patch_size, num_classes=None)(x, t).shape == x.shape
        assert DiT(c_in=4, c_out=2, patch_size=patch_size, depth=1, dim=16, heads=2)(
            torch.randn(1, 4, height, width), t[:1]).shape == (1, 2, height, width)


@pytest.mark.parametrize("patch_size, height, width", [(4, 18, 18), (4, 16, 10), (2, 15, 16), (2, 7, 7)])
def test_other_sizes_are_one_line_naming_the_allowed_ones(patch_size, height, width):
    x = torch.randn(1, 3, height, width)
    message = rf"image size {height}x{width} is not divisible by the patch size {patch_size}: .* multiples of " \
              rf"{patch_size}, e.g. 16, 32 or 64"
    for call in (lambda: patchify(x, patch_size), lambda: tiny_dit(patch_size=patch_size)(x, torch.tensor([3]))):
        with pytest.raises(ValueError, match=message) as error:
            call()
        assert "\n" not in str(error.value)


@pytest.mark.parametrize("patch_size", [1, 3, 8])
def test_a_patch_size_that_is_not_allowed_is_a_value_error(patch_size):
    with pytest.raises(ValueError, match=rf"^patch_size {patch_size} is not allowed: use 2 or 4$"):
        DiT(patch_size=patch_size)


def test_position_embedding_is_fixed_sin_cos_of_row_and_column():
    embedding = position_embedding_2d(3, 4, 16)  # a 3 x 4 grid, row-major
    assert embedding.shape == (12, 16)
    for index in range(12):
        row, col = divmod(index, 4)
        expected = torch.cat([timestep_encoding(torch.tensor([row]), 8), timestep_encoding(torch.tensor([col]), 8)], 1)
        torch.testing.assert_close(embedding[index], expected[0])
    assert len({tuple(v.tolist()) for v in embedding}) == 12  # every position is told apart
    names = [name for name, _ in tiny_dit().named_parameters()] + [name for name, _ in tiny_dit().named_buffers()]
    assert not [name for name in names if "pos" in name]  # not learned, not stored: made for each input size


def test_adaln_zero_every_block_starts_as_the_identity_so_the_output_ignores_the_class():
    model = tiny_dit()
    with torch.no_grad():
        model.out.weight.normal_()  # a non-zero output layer, so the output below is not zero for a trivial reason
    tokens, cond = torch.randn(3, 64, 32), torch.randn(3, 32)
    with torch.no_grad():
        for block in model.blocks:
            assert torch.equal(block(tokens, cond), tokens)
        x, t = torch.randn(3, 3, 16, 16), torch.tensor([5, 400, 999])
        outputs = [model(x, t, y) for y in (torch.tensor([0, 1, 3]), torch.tensor([2, 2, 2]),
                                            torch.tensor([NULL_LABEL] * 3), None)]
        assert outputs[0].abs().sum() > 0
        for out in outputs[1:]:
            assert torch.equal(out, outputs[0])
        away_from_zero(model)  # once the modulations have moved, as training moves them, the class counts
        assert not torch.allclose(model(x, t, torch.tensor([0, 1, 3])), model(x, t, torch.tensor([2, 2, 2])))


def test_text_dit_blocks_start_as_the_identity_too():
    torch.manual_seed(0)
    model = DiT_text(c_in=4, c_out=4, depth=2, dim=32, heads=2, context_dim=16).eval()
    tokens, cond, context = torch.randn(2, 16, 32), torch.randn(2, 32), torch.randn(2, 5, 16)
    with torch.no_grad():
        for block in model.blocks:
            assert torch.equal(block(tokens, cond, context), tokens)


def test_dit_null_class_is_the_unconditional_branch_and_guidance_is_one_batch():
    model = away_from_zero(tiny_dit())
    x, t = torch.randn(4, 3, 16, 16), torch.tensor([10, 500, 900, 300])
    with torch.no_grad():
        mixed = model(x, t, torch.tensor([2, NULL_LABEL, 1, NULL_LABEL]))
        uncond = model(x, t)  # y=None: the learned null class for every row
        cond = model(x, t, torch.tensor([2, 0, 1, 3]))
    torch.testing.assert_close(mixed[[1, 3]], uncond[[1, 3]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[[0, 2]], cond[[0, 2]], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(cond, uncond, atol=1e-3)
    assert model.class_emb.weight.shape == (5, 32)  # 4 classes and the learned null class, the last row

    calls = []

    class Counting(torch.nn.Module):
        def forward(self, x_t, t, y):
            calls.append(len(y))
            return model(x_t, t, y)

    labels = torch.tensor([2, 0, 1, 3])
    with torch.no_grad():
        guided = Diffusion(image_size=16).predict_eps(Counting(), x, t, labels, torch.full_like(labels, NULL_LABEL),
                                                      3.0)
    assert calls == [8]  # one forward pass: the conditional and the unconditional half together
    torch.testing.assert_close(guided, uncond + 3.0 * (cond - uncond), atol=1e-4, rtol=1e-4)

    model.train()
    model(x, t, torch.tensor([NULL_LABEL, 1, NULL_LABEL, 1])).square().mean().backward()
    grad = model.class_emb.weight.grad
    assert grad[4].abs().sum() > 0 and grad[1].abs().sum() > 0  # the null class is learned like a class
    assert grad[[0, 2, 3]].abs().sum() == 0


def test_dit_attention_runs_on_the_fused_kernel(monkeypatch):
    fused, modules_called = [], []
    original = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: fused.append(1) or original(*a, **k))
    monkeypatch.setattr(torch.nn.MultiheadAttention, "forward", lambda *a, **k: modules_called.append(1))
    tiny_dit(depth=3)(torch.randn(1, 3, 16, 16), torch.tensor([3]), torch.tensor([1]))
    assert len(fused) == 3
    text_dit = DiT_text(depth=3, dim=32, heads=2, context_dim=16)
    text_dit(torch.randn(1, 4, 8, 8), torch.tensor([3]), torch.randn(1, 5, 16))
    assert len(fused) == 3 + 6 and not modules_called  # 3 self- and 3 cross-attentions


@pytest.mark.parametrize("conditioning", DiT_text.CONDITIONINGS)
def test_text_dit_reads_the_text(conditioning):
    torch.manual_seed(0)
    model = away_from_zero(DiT_text(c_in=4, c_out=4, depth=2, dim=32, heads=2, context_dim=16,
                                    conditioning=conditioning))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([1, 999])
    context = torch.randn(2, 7, 16) if conditioning == "cross_attention" else torch.randn(2, 16)
    with torch.no_grad():
        out = model(x, t, context)
        assert out.shape == (2, 4, 8, 8)
        assert not torch.allclose(out, model(x, t, context + 1.0))


def test_dit_t_with_patch_size_2_matches_the_flops_of_the_small_unet():
    """The comparison of configs/compare_backbones.json is at matched FLOPs: dit-t/2 and the base_channels-32 U-Net
    at 16 px, per image, within 10%."""
    x, t, y = torch.randn(1, 3, 16, 16), torch.tensor([5]), torch.tensor([1])
    depth, dim, heads = DIT_SIZES["dit-t"]
    dit = DiT(num_classes=10, patch_size=2, depth=depth, dim=dim, heads=heads)
    unet = UNet_conditional(num_classes=10, base_channels=32)
    with torch.no_grad():
        dit_flops, unet_flops = (count_flops(lambda: net(x, t, y)) for net in (dit, unet))
    assert abs(dit_flops / unet_flops - 1) < 0.1, (dit_flops, unet_flops)


# ----------------------------------------------------------------------------- gradient checkpointing
def loss_and_gradients(model, *inputs):
    model.zero_grad(set_to_none=True)
    out = model(*inputs)
    loss = out.pow(2).mean()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same_loss_and_gradients(model, checkpointed, plain):
    """Gradient checkpointing changes neither the loss nor any parameter's gradient (to float tolerance)."""
    (loss_ckpt, grads_ckpt), (loss, grads) = checkpointed, plain
    torch.testing.assert_close(loss_ckpt, loss, rtol=1e-6, atol=0)
    assert grads_ckpt.keys() == grads.keys() and len(grads) == len(list(model.parameters()))
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("conditioning", [*MODES, "text"])
def test_gradient_checkpointing_recomputes_the_blocks_and_keeps_loss_and_gradients(conditioning):
    """The same loss and gradients (to float tolerance); each Down, Up and attention block runs twice per step."""
    torch.manual_seed(0)
    if conditioning == "text":
        model = UNet_text(c_in=4, c_out=4, base_channels=8, context_dim=16)
        inputs = (torch.randn(2, 4, 16, 16), torch.tensor([3, 700]), torch.randn(2, 5, 16))
    else:
        model = trained_like(UNet_conditional(num_classes=3, base_channels=8, conditioning=conditioning))
        inputs = (torch.randn(2, 3, 16, 16), torch.tensor([3, 700]), torch.tensor([1, NULL_LABEL]))
    model.train()
    calls = {"down1": 0, "up3": 0, "sa1": 0, "inc": 0}
    def count(name):
        return lambda module, args: calls.update({name: calls[name] + 1})

    for name in calls:  # a pre-hook: the recomputation stops as soon as it has what the backward pass needs
        getattr(model, name).register_forward_pre_hook(count(name))
    loss, grads = loss_and_gradients(model, *inputs)
    assert calls == {"down1": 1, "up3": 1, "sa1": 1, "inc": 1}
    model.enable_gradient_checkpointing()
    loss_ckpt, grads_ckpt = loss_and_gradients(model, *inputs)
    assert calls == {"down1": 3, "up3": 3, "sa1": 3, "inc": 2}  # the blocks ran again in the backward pass
    assert_same_loss_and_gradients(model, (loss_ckpt, grads_ckpt), (loss, grads))
    with torch.no_grad():  # sampling: nothing to recompute
        model(*inputs)
    assert calls["down1"] == 4


@pytest.mark.parametrize("text", [False, True])
def test_dit_gradient_checkpointing_recomputes_each_block_and_keeps_loss_and_gradients(text):
    """The same loss and gradients (to float tolerance); each DiTBlock runs twice per step, once under no_grad."""
    torch.manual_seed(0)
    if text:
        model = away_from_zero(DiT_text(c_in=1, c_out=1, patch_size=2, depth=2, dim=32, heads=2, context_dim=16))
        inputs = (torch.randn(2, 1, 8, 8), torch.tensor([3, 700]), torch.randn(2, 5, 16))
    else:
        model = away_from_zero(tiny_dit())
        inputs = (torch.randn(2, 3, 8, 8), torch.tensor([3, 700]), torch.tensor([1, NULL_LABEL]))
    model.train()
    calls = [0] * len(model.blocks)
    for index, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda module, args, index=index: calls.__setitem__(index, calls[index] + 1))
    loss, grads = loss_and_gradients(model, *inputs)
    assert calls == [1, 1]
    model.enable_gradient_checkpointing()
    loss_ckpt, grads_ckpt = loss_and_gradients(model, *inputs)
    assert calls == [3, 3]  # the blocks ran again in the backward pass
    assert_same_loss_and_gradients(model, (loss_ckpt, grads_ckpt), (loss, grads))
    with torch.no_grad():  # sampling: nothing to recompute
        model(*inputs)
    assert calls == [4, 4]


# ----------------------------------------------------------------------------- build_network
UNET_ARCH = {"backbone": "unet", "c_in": 3, "c_out": 3, "num_classes": None, "conditioning": "add", "base_channels": 8,
             "attn_factors": (2, 4, 8), "dropout": 0.0, "cond_channels": 0}
DIT_ARCH = {"backbone": "dit", "c_in": 3, "c_out": 3, "num_classes": None, "conditioning": "add", "patch_size": 2,
            "depth": 2, "dim": 32, "heads": 2}
UNET_SIZE = {"base_channels": 8, "attn_factors": (2, 4, 8)}
DIT_SIZE = {"patch_size": 2, "depth": 2, "dim": 32, "heads": 2}

# (arch, the network it describes, built directly)
KINDS = {
    "unet": (UNET_ARCH, lambda: UNet(3, 3, 256, **UNET_SIZE)),
    "unet grey, time_dim 128, dropout": ({**UNET_ARCH, "c_in": 1, "c_out": 1, "time_dim": 128, "dropout": 0.1},
                                         lambda: UNet(1, 1, 128, **UNET_SIZE, dropout=0.1)),
    **{f"conditional {mode}": ({**UNET_ARCH, "num_classes": 4, "conditioning": mode},
                               lambda mode=mode: UNet_conditional(3, 3, 256, 4, conditioning=mode, **UNET_SIZE))
       for mode in MODES},
    "conditional concat, concat_channels 5": (
        {**UNET_ARCH, "num_classes": 4, "conditioning": "concat", "concat_channels": 5},
        lambda: UNet_conditional(3, 3, 256, 4, conditioning="concat", concat_channels=5, **UNET_SIZE)),
    "conditional xattn, context_tokens 2": (
        {**UNET_ARCH, "num_classes": 4, "conditioning": "xattn", "context_tokens": 2},
        lambda: UNet_conditional(3, 3, 256, 4, conditioning="xattn", context_tokens=2, **UNET_SIZE)),
    "image condition": ({**UNET_ARCH, "cond_channels": 4},
                        lambda: UNet_conditional(3, 3, 256, None, cond_channels=4, **UNET_SIZE)),
    "image and class condition": ({**UNET_ARCH, "num_classes": 4, "conditioning": "concat", "cond_channels": 3},
                                  lambda: UNet_conditional(3, 3, 256, 4, conditioning="concat", cond_channels=3,
                                                           **UNET_SIZE)),
    **{f"text {mode}, dropout": ({**UNET_ARCH, "c_in": 4, "c_out": 4, "conditioning": mode, "context_dim": 16,
                                  "dropout": 0.1},
                                 lambda mode=mode: UNet_text(4, 4, 256, context_dim=16, conditioning=mode, dropout=0.1,
                                                             **UNET_SIZE))
       for mode in UNet_text.CONDITIONINGS},
    "dit": (DIT_ARCH, lambda: DiT(3, 3, None, **DIT_SIZE)),
    "dit classes": ({**DIT_ARCH, "num_classes": 4}, lambda: DiT(3, 3, 4, **DIT_SIZE)),
    **{f"dit text {mode}": ({**DIT_ARCH, "c_in": 4, "c_out": 4, "conditioning": mode, "context_dim": 16},
                            lambda mode=mode: DiT_text(4, 4, **DIT_SIZE, context_dim=16, conditioning=mode))
       for mode in DiT_text.CONDITIONINGS},
}


def shapes(net):
    return {key: tuple(value.shape) for key, value in net.state_dict().items()}


def example_inputs(arch):
    """(args, kwargs) of a forward pass of the network of `arch` on two 16 px images."""
    x, t = torch.randn(2, arch["c_in"], 16, 16), torch.tensor([3, 700])
    if arch.get("context_dim") is not None:
        context = torch.randn(2, 5, 16) if arch["conditioning"] == "cross_attention" else torch.randn(2, 16)
        return (x, t, context), {}
    labels = None if arch["num_classes"] is None else torch.tensor([1, NULL_LABEL])
    kwargs = {"cond": torch.randn(2, arch["cond_channels"], 16, 16)} if arch.get("cond_channels") else {}
    return ((x, t) if labels is None and not kwargs else (x, t, labels)), kwargs


@pytest.mark.parametrize("kind", KINDS)
def test_build_network_builds_the_network_its_arch_describes(kind):
    arch, direct = KINDS[kind]
    net, expected = build_network(arch), direct()
    assert type(net) is type(expected)
    assert shapes(net) == shapes(expected)
    for attribute in ("conditioning", "num_classes", "cond_channels", "time_dim", "patch_size"):
        assert getattr(net, attribute, None) == getattr(expected, attribute, None), attribute
    rates = [block.dropout for block in net.modules() if isinstance(block, DoubleConv)]
    assert rates == [block.dropout for block in expected.modules() if isinstance(block, DoubleConv)]
    assert set(rates) <= {arch.get("dropout", 0.0)}
    assert not net.gradient_checkpointing


# (kind, the saved config that checkpoints.infer_network reads beside the weights)
ROUND_TRIPS = [
    ("unet", {}),
    ("conditional concat, concat_channels 5", {"conditioning": "concat"}),
    ("conditional xattn, context_tokens 2", {"conditioning": "xattn"}),
    ("conditional adanorm", {"conditioning": "adanorm"}),
    ("image condition", {"task": "inpaint"}),  # RGB inpainting: the masked image and its mask, 4 channels
    ("text cross_attention, dropout", {"text_encoder": "clip", "prompt": ["a red circle"]}),
    ("dit classes", {"backbone": "dit", "dit_size": "dit-n", "patch_size": 2}),
    ("dit text add", {"backbone": "dit", "dit_size": "dit-n", "patch_size": 2, "text_encoder": "clip",
                      "prompt": ["a red circle"], "vae": "models/vae/vae"}),
]


@pytest.mark.parametrize("kind, saved", ROUND_TRIPS, ids=[kind for kind, _ in ROUND_TRIPS])
def test_a_network_rebuilt_from_its_weights_loads_them_strictly_and_computes_the_same(kind, saved):
    arch = KINDS[kind][0]
    if arch["backbone"] == "dit":  # the size that the saved dit_size names
        depth, dim, heads = DIT_SIZES[saved["dit_size"]]
        arch = {**arch, "depth": depth, "dim": dim, "heads": heads}
    torch.manual_seed(0)
    net = away_from_zero(build_network(arch))
    rebuilt = build_network(infer_network(net.state_dict(), saved=saved)).eval()
    assert type(rebuilt) is type(net)
    rebuilt.load_state_dict(net.state_dict(), strict=True)
    args, kwargs = example_inputs(arch)
    with torch.no_grad():
        assert torch.equal(rebuilt(*args, **kwargs), net(*args, **kwargs))


@pytest.mark.parametrize("kind", ["unet", "conditional adanorm", "text add, dropout", "dit classes", "dit text add"])
def test_gradient_checkpointing_in_the_arch_switches_it_on(kind):
    arch = KINDS[kind][0]
    assert not build_network(arch).gradient_checkpointing
    assert not build_network({**arch, "gradient_checkpointing": False}).gradient_checkpointing
    assert build_network({**arch, "gradient_checkpointing": True}).gradient_checkpointing


@pytest.mark.parametrize("kind", ["unet", "conditional concat", "text cross_attention, dropout"])
def test_channels_last_in_the_arch_switches_it_on_and_computes_the_same(kind):
    arch = KINDS[kind][0]
    torch.manual_seed(0)
    plain = build_network(arch).eval()
    assert not plain.inc.double_conv[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not build_network({**arch, "channels_last": False}).inc.double_conv[0].weight.is_contiguous(
        memory_format=torch.channels_last)
    net = build_network({**arch, "channels_last": True}).eval()
    convolutions = [p for p in net.parameters() if p.dim() == 4]
    assert convolutions and all(p.is_contiguous(memory_format=torch.channels_last) for p in convolutions)
    net.load_state_dict(plain.state_dict(), strict=True)
    args, kwargs = example_inputs(arch)
    with torch.no_grad():
        torch.testing.assert_close(net(*args, **kwargs), plain(*args, **kwargs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_a_text_network_reads_every_token_of_its_context_not_only_the_first(backbone):
    """Two contexts that share their first token and differ after it give different outputs; the same context gives
    the same output. (A cross-attention that read only the first token passes every other test of the text networks
    but the slow colour learning test.)"""
    torch.manual_seed(0)
    if backbone == "unet":
        net = UNet_text(c_in=4, c_out=4, base_channels=8, context_dim=32)
    else:  # its cross-attentions start at zero (adaLN-Zero): move them, as training does
        net = moved(DiT_text(c_in=4, c_out=4, patch_size=2, depth=2, dim=32, heads=2, context_dim=32))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    first = torch.randn(2, 5, 32)
    other = torch.cat([first[:, :1], torch.randn(2, 4, 32)], dim=1)  # (B, L, D): the same first token
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, first), net(x, t, first.clone()))
        assert (net(x, t, first) - net(x, t, other)).abs().max() > 1e-3
