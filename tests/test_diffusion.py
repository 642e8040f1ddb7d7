"""The DDPM math of diffusion.py: schedule, forward noising, Algorithm 2, guidance, the loss, the CFG dropout mask,
RePaint, and bad input."""
import math
import warnings

import pytest
import torch

from config import Schedule
from diffusion import PREDICTION_TYPES, REFERENCE_SCHEDULE, SCHEDULES, Diffusion, dropped_rows, make_betas
from modules import NULL_LABEL, UNet, UNet_conditional


class CountingModel(torch.nn.Module):
    """Wraps a network and records the batch size of every forward call."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.num_classes = getattr(net, "num_classes", None)
        self.batch_sizes = []

    def forward(self, *args, **kwargs):
        self.batch_sizes.append(args[0].shape[0])
        return self.net(*args, **kwargs)


def test_schedule_alpha_hat_strictly_decreasing_in_open_unit_interval():
    diffusion = Diffusion()
    alpha_hat = diffusion.alpha_hat
    assert alpha_hat.shape == (1000,)
    assert torch.all(alpha_hat > 0) and torch.all(alpha_hat < 1)
    assert torch.all(alpha_hat[1:] < alpha_hat[:-1])
    assert diffusion.beta[0].item() == pytest.approx(1e-4) and diffusion.beta[-1].item() == pytest.approx(0.02)
    expected = math.prod(1 - (1e-4 + i * (0.02 - 1e-4) / 999) for i in range(11))
    assert alpha_hat[10].item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_every_schedule_decreases_alpha_hat_from_near_1_to_near_0(schedule):
    diffusion = Diffusion(schedule=schedule)
    alpha_hat = diffusion.alpha_hat
    assert alpha_hat.shape == (1000,) and alpha_hat.dtype == torch.float32
    assert torch.all(alpha_hat[1:] < alpha_hat[:-1]) and torch.all(alpha_hat > 0)
    assert alpha_hat[0].item() > 0.999 and alpha_hat[-1].item() < 1e-4


def test_cosine_schedule_follows_its_closed_form():
    """alpha_hat_t = f(t + 1) / f(0) with f(t) = cos((t / T + s) / (1 + s) pi / 2)^2, s = 0.008, until the 0.999
    clip of beta, which only the last step reaches."""
    beta = make_betas("cosine", 1000)
    assert beta.max().item() == pytest.approx(0.999) and (beta >= 0.999 - 1e-6).sum().item() == 1
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    alpha_hat = Diffusion(schedule="cosine").alpha_hat
    for t in (0, 100, 500, 900):
        assert alpha_hat[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-4)
    with pytest.raises(ValueError, match="schedule 'sigmoid' is unknown"):
        make_betas("sigmoid", 1000)


def test_sample_timesteps_range():
    t = Diffusion(noise_steps=10).sample_timesteps(5000)
    assert t.min().item() == 1 and t.max().item() == 9


def test_noise_images_matches_the_closed_form():
    diffusion = Diffusion(image_size=8)
    x_0 = torch.randn(3, 3, 8, 8)
    eps = torch.randn(3, 3, 8, 8)
    t = torch.tensor([1, 400, 999])
    x_t, returned_eps = diffusion.noise_images(x_0, t, eps)
    assert returned_eps is eps
    for row, step in enumerate(t.tolist()):
        a = diffusion.alpha_hat[step].item()
        torch.testing.assert_close(x_t[row], math.sqrt(a) * x_0[row] + math.sqrt(1 - a) * eps[row])


@pytest.mark.parametrize("t", [1, 2, 500])
def test_one_reverse_step_against_algorithm_2_by_hand(t):
    """At t = 500 alpha_hat_t and alpha_hat_{t-1} are within the tolerance of each other; at t = 1 and 2,
    1 - alpha_hat_t is 2.2 and 1.5 times 1 - alpha_hat_{t-1}, so a step with the wrong one fails."""
    diffusion = Diffusion(image_size=8)
    x_t, eps, z = torch.randn(3, 1, 1, 1), torch.randn(3, 1, 1, 1), torch.randn(3, 1, 1, 1)
    beta = 1e-4 + t * (0.02 - 1e-4) / 999
    alpha = 1 - beta
    alpha_hat = math.prod(1 - (1e-4 + i * (0.02 - 1e-4) / 999) for i in range(t + 1))
    expected = 1 / math.sqrt(alpha) * (x_t - (1 - alpha) / math.sqrt(1 - alpha_hat) * eps) + math.sqrt(beta) * z
    torch.testing.assert_close(diffusion.p_sample_step(x_t, t, eps, z), expected, atol=1e-5, rtol=1e-4)


def test_sampling_loop_runs_t_from_T_minus_1_to_1_and_adds_no_noise_last():
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, x, t):
            seen.append(t[0].item())
            return torch.zeros_like(x)

    diffusion = Diffusion(noise_steps=6, image_size=8)
    x_0 = diffusion.sample_x0(Recorder(), 2, seed=0, progress=False)
    assert seen == [5, 4, 3, 2, 1]
    # With eps = 0, every step is x / sqrt(alpha_t) + sqrt(beta_t) z; replay it with the same noise.
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((2, 3, 8, 8), generator=generator)
    for t in range(5, 0, -1):
        z = torch.randn(x.shape, generator=generator) if t > 1 else torch.zeros_like(x)
        x = x / diffusion.alpha[t].sqrt() + diffusion.beta[t].sqrt() * z
    torch.testing.assert_close(x_0, x)


def test_batched_guidance_equals_two_passes_then_lerp():
    torch.manual_seed(0)
    net = UNet_conditional(num_classes=3, base_channels=8).eval()
    with torch.no_grad():
        net.label_emb.weight.normal_()
    diffusion = Diffusion(image_size=16)
    x_t, t, labels = torch.randn(2, 3, 16, 16), torch.tensor([50, 700]), torch.tensor([0, 2])
    with torch.no_grad():
        guided = diffusion.predict_eps(net, x_t, t, labels, torch.full_like(labels, NULL_LABEL), cfg_scale=3.0)
        eps_cond = net(x_t, t, labels)
        eps_uncond = net(x_t, t, None)
    torch.testing.assert_close(guided, eps_uncond + 3.0 * (eps_cond - eps_uncond), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cfg_scale, rows", [(0, 2), (3, 4)])
def test_forwards_per_step(cfg_scale, rows):
    model = CountingModel(UNet_conditional(num_classes=3, base_channels=8))
    Diffusion(noise_steps=5, image_size=16).sample(model, 2, torch.tensor([0, 1]), cfg_scale=cfg_scale, progress=False)
    assert model.batch_sizes == [rows] * 4  # one forward per step, of n rows (no guidance) or 2n rows


def test_unconditional_sampling_and_output_format():
    model = CountingModel(UNet(base_channels=8))
    images = Diffusion(noise_steps=4, image_size=16).sample(model, 3, progress=False)
    assert images.dtype == torch.uint8 and images.shape == (3, 3, 16, 16)
    assert model.batch_sizes == [3, 3, 3]


def test_seed_makes_sampling_reproducible():
    model = UNet_conditional(num_classes=3, base_channels=8)
    diffusion = Diffusion(noise_steps=4, image_size=16)
    labels = torch.tensor([0, 2])
    first = diffusion.sample(model, 2, labels, seed=1, progress=False)
    again = diffusion.sample(model, 2, labels, seed=1, progress=False)
    other = diffusion.sample(model, 2, labels, seed=2, progress=False)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert model.training  # the caller's mode is restored


def test_loss_is_the_mse_to_the_drawn_noise():
    """The plain loss is mean((model(x_t, t) - eps)^2) for the t and eps it drew: replay them under the same seed.
    The model returns x_t / 2, so a loss whose target were x_0 or x_t, or whose t differed, would differ too."""
    class Half(torch.nn.Module):
        def forward(self, x, t):
            return x / 2

    diffusion = Diffusion(image_size=8)
    x_0 = torch.randn(16, 3, 8, 8)
    torch.manual_seed(0)
    loss = diffusion.loss(Half(), x_0)
    torch.manual_seed(0)  # the same t and eps, drawn again
    t = diffusion.sample_timesteps(16)
    x_t, eps = diffusion.noise_images(x_0, t)
    assert loss.item() == pytest.approx((x_t / 2 - eps).pow(2).mean().item(), rel=1e-5)


def test_min_snr_loss_weighs_each_row_by_min_snr_gamma_over_snr():
    """With a constant-zero model the row loss is mean(eps^2); Min-SNR-5 scales it by min(SNR_t, 5) / SNR_t."""
    class Zero(torch.nn.Module):
        def forward(self, x, t):
            return torch.zeros_like(x)

    x_0 = torch.randn(16, 3, 8, 8)
    plain, weighted = Diffusion(image_size=8), Diffusion(image_size=8, min_snr_gamma=5.0)
    torch.manual_seed(0)
    loss = weighted.loss(Zero(), x_0)
    torch.manual_seed(0)  # the same t and eps, drawn again
    t = plain.sample_timesteps(16)
    _, eps = plain.noise_images(x_0, t)
    snr = plain.alpha_hat[t] / (1 - plain.alpha_hat[t])
    expected = (eps.pow(2).mean(dim=(1, 2, 3)) * torch.clamp(snr, max=5.0) / snr).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss.item() < 0.9  # most t have SNR > 5 on the linear schedule, so the weights are < 1
    with pytest.raises(ValueError, match="min_snr_gamma 0 is not positive"):
        Diffusion(min_snr_gamma=0)


def replayed_draw(diffusion, x_0, seed=0):
    """The t, x_t and eps that `diffusion.loss` draws under torch.manual_seed(seed), drawn again, and the target of
    its prediction_type in closed form: eps, x_0, or v = sqrt(alpha_hat_t) eps - sqrt(1 - alpha_hat_t) x_0."""
    torch.manual_seed(seed)
    t = diffusion.sample_timesteps(x_0.shape[0])
    x_t, eps = diffusion.noise_images(x_0, t)
    a = diffusion.alpha_hat[t].view(-1, 1, 1, 1)
    v = a.sqrt() * eps - (1 - a).sqrt() * x_0
    return t, x_t, eps, {"epsilon": eps, "sample": x_0, "v_prediction": v}[diffusion.prediction_type]


class Half(torch.nn.Module):
    def forward(self, x, t):
        return x / 2


# The Min-SNR-gamma weights in closed form (Hang et al. 2023, with v's as in their eq. for v: min(SNR, g) / (SNR + 1)),
# written out from SNR alone, so that a weight computed from the wrong target's formula fails.
CLOSED_FORM_WEIGHTS = {
    "epsilon": lambda snr, gamma: torch.minimum(snr, torch.full_like(snr, gamma)) / snr,
    "sample": lambda snr, gamma: torch.minimum(snr, torch.full_like(snr, gamma)),
    "v_prediction": lambda snr, gamma: torch.minimum(snr, torch.full_like(snr, gamma)) / (snr + 1),
}


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_each_prediction_type_regresses_its_own_target(prediction_type):
    """The plain loss is mean((model(x_t, t) - target)^2) with target eps, x_0 or v = sqrt(a) eps - sqrt(1 - a) x_0."""
    diffusion = Diffusion(image_size=8, prediction_type=prediction_type)
    x_0 = torch.randn(16, 3, 8, 8)
    torch.manual_seed(0)
    loss = diffusion.loss(Half(), x_0)
    _, x_t, _, target = replayed_draw(diffusion, x_0)
    assert loss.item() == pytest.approx((x_t / 2 - target).pow(2).mean().item(), rel=1e-5)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_min_snr_weight_of_each_target_is_its_closed_form(prediction_type, schedule):
    """loss_weight over every t, and the weighted loss of a zero model (row loss mean(target^2) times the weight)."""
    gamma = 5.0
    diffusion = Diffusion(image_size=8, schedule=schedule, min_snr_gamma=gamma, prediction_type=prediction_type)
    t_all = torch.arange(1, diffusion.noise_steps)
    alpha_hat = torch.cumprod(1 - make_betas(schedule, diffusion.noise_steps).double(), 0)[t_all]
    snr = alpha_hat / (1 - alpha_hat)
    torch.testing.assert_close(diffusion.loss_weight(t_all).double(), CLOSED_FORM_WEIGHTS[prediction_type](snr, gamma),
                               rtol=1e-4, atol=1e-6)

    class Zero(torch.nn.Module):
        def forward(self, x, t):
            return torch.zeros_like(x)

    x_0 = torch.randn(16, 3, 8, 8)
    torch.manual_seed(0)
    loss = diffusion.loss(Zero(), x_0)
    t, _, _, target = replayed_draw(diffusion, x_0)
    snr_t = (diffusion.alpha_hat[t] / (1 - diffusion.alpha_hat[t])).double()
    expected = (target.pow(2).mean(dim=(1, 2, 3)).double() * CLOSED_FORM_WEIGHTS[prediction_type](snr_t, gamma)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_every_target_weighs_its_x0_error_by_min_snr_gamma():
    """The reason for the three weights: a network output that is off by d in x_0 costs min(SNR, gamma) d^2 whatever
    it predicts (eps is then off by sqrt(SNR) d, v by sqrt(SNR + 1) d)."""
    x_0 = torch.randn(64, 3, 8, 8)
    costs = []
    for prediction_type in PREDICTION_TYPES:
        diffusion = Diffusion(image_size=8, min_snr_gamma=5.0, prediction_type=prediction_type)
        t = replayed_draw(diffusion, x_0)[0]

        class OffInX0(torch.nn.Module):  # the exact output of x_0 + 0.1, in this target's kind
            def forward(self, x, t_in, diffusion=diffusion):
                return diffusion.output_from_x0(x, t_in, x_0 + 0.1)

        torch.manual_seed(0)
        costs.append(diffusion.loss(OffInX0(), x_0).item())
    snr = Diffusion().alpha_hat[t] / (1 - Diffusion().alpha_hat[t])
    assert costs == pytest.approx([(0.01 * snr.clamp(max=5.0)).mean().item()] * 3, rel=1e-3)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_output_conversions_invert_each_other(prediction_type):
    diffusion = Diffusion(image_size=8, prediction_type=prediction_type)
    x_0 = torch.rand(4, 3, 8, 8) * 2 - 1
    t = torch.tensor([1, 200, 700, 999])
    x_t, eps = diffusion.noise_images(x_0, t)
    output = diffusion.target(x_0, t, eps)
    torch.testing.assert_close(diffusion.predict_x0(x_t, t, output), x_0, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(diffusion.eps_from_output(x_t, t, output), eps, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(diffusion.output_from_x0(x_t, t, x_0), output, atol=2e-3, rtol=1e-3)


def test_an_unknown_prediction_type_is_a_value_error():
    with pytest.raises(ValueError, match=r"prediction_type 'x0' is unknown: use one of epsilon, v_prediction, sample"):
        Diffusion(prediction_type="x0")


@pytest.mark.parametrize("kwargs, message", [
    (dict(cfg_scale=-1), r"cfg_scale -1 is negative"),
    (dict(labels=torch.tensor([0, 3])), r"label 3 is outside the model's classes: use 0\.\.2"),
    (dict(labels=torch.tensor([0])), r"got 1 labels for n=2"),
    (dict(sampler="plms"), r"sampler 'plms' is unknown"),
])
def test_bad_sampling_arguments_raise_value_errors(kwargs, message):
    model = UNet_conditional(num_classes=3, base_channels=8)
    kwargs.setdefault("labels", torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=message):
        Diffusion(noise_steps=4, image_size=16).sample(model, 2, progress=False, **kwargs)


def test_image_size_not_divisible_by_8_is_a_value_error():
    with pytest.raises(ValueError, match=r"image_size 30 is not divisible by 8"):
        Diffusion(image_size=30)


def test_the_old_img_size_keyword_and_attribute_still_work_with_a_deprecation_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new name warns of nothing
        assert Diffusion(image_size=16).image_size == 16
    with pytest.warns(DeprecationWarning, match=r"Diffusion\(img_size=\.\.\.\) is now image_size="):
        diffusion = Diffusion(noise_steps=3, img_size=16)
    assert diffusion.image_size == 16
    with pytest.warns(DeprecationWarning, match=r"Diffusion\.img_size is now image_size"):
        assert diffusion.img_size == 16
    class Zero(torch.nn.Module):
        def forward(self, x, t):
            return torch.zeros_like(x)

    x_0 = diffusion.sample_x0(Zero(), 2, seed=0, progress=False)
    assert x_0.shape == (2, 3, 16, 16)  # the old keyword sets the sampled size
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match=r"image_size 20 is not divisible by 8"):
        Diffusion(img_size=20)


def test_from_settings_takes_the_schedule_of_a_dict_or_a_config_and_the_reference_values_for_the_rest():
    settings = {"noise_steps": 50, "beta_start": 2e-4, "beta_end": 0.03, "schedule": "linear", "min_snr_gamma": 2.0,
                "prediction_type": "v_prediction", "lr": 1.0}  # lr: not the schedule's, ignored
    diffusion = Diffusion.from_settings(settings, 16, c_in=4, clip_x0=True)
    assert (diffusion.noise_steps, diffusion.min_snr_gamma, diffusion.prediction_type, diffusion.schedule) == \
        (50, 2.0, "v_prediction", "linear")
    assert (diffusion.image_size, diffusion.c_in, diffusion.clip_x0) == (16, 4, True)
    torch.testing.assert_close(diffusion.beta, make_betas("linear", 50, 2e-4, 0.03), rtol=0, atol=0)
    reference = Diffusion.from_settings({}, 8)  # a run saved without these fields: the reference's schedule
    assert {key: getattr(reference, key) for key in ("noise_steps", "schedule", "min_snr_gamma", "prediction_type")} \
        == {key: REFERENCE_SCHEDULE[key] for key in ("noise_steps", "schedule", "min_snr_gamma", "prediction_type")}
    torch.testing.assert_close(reference.beta, Diffusion(image_size=8).beta, rtol=0, atol=0)
    assert (reference.c_in, reference.clip_x0) == (3, False)
    group = Schedule(noise_steps=40, schedule="cosine", prediction_type="sample")  # a Config's fields, not a dict
    from_config = Diffusion.from_settings(group, 8)
    assert (from_config.noise_steps, from_config.schedule, from_config.prediction_type, from_config.min_snr_gamma) == \
        (40, "cosine", "sample", group.min_snr_gamma)
    torch.testing.assert_close(from_config.beta, make_betas("cosine", 40), rtol=0, atol=0)


# ----------------------------------------------------------------------------- the CFG dropout mask
def test_dropped_rows_drops_each_row_with_probability_p_uncond():
    torch.manual_seed(0)
    n, p = 20000, 0.3
    mask = dropped_rows(n, p)
    assert mask.shape == (n,) and mask.dtype == torch.bool
    assert abs(mask.float().mean().item() - p) < 4 * math.sqrt(p * (1 - p) / n)  # within 4 sd of the rate
    assert not dropped_rows(n, 0.0).any()
    assert dropped_rows(n, 1.0).all()


def test_dropped_rows_is_torch_rand_below_p_on_the_given_device():
    torch.manual_seed(5)
    mask = dropped_rows(1000, 0.3)
    after = torch.rand(1)
    torch.manual_seed(5)
    assert torch.equal(mask, torch.rand(1000) < 0.3)  # the same seed, the same mask
    assert torch.equal(after, torch.rand(1))  # exactly n numbers drawn
    assert dropped_rows(4, 0.5, device="meta").device.type == "meta"


# ----------------------------------------------------------------------------- image conditions and RePaint
class MixtureOracle(torch.nn.Module):
    """The exact eps of data that is K equally likely images `points` (K, C, H, W): E[x_0 | x_t] is the mean of the
    points weighted by q(x_t | x_0 = point), and eps = (x_t - sqrt(alpha_hat_t) E[x_0 | x_t]) / sqrt(1 - alpha_hat_t)."""

    def __init__(self, diffusion, points):
        super().__init__()
        self.diffusion, self.points = diffusion, points

    def forward(self, x, t):
        alpha_hat = self.diffusion.alpha_hat[t].view(-1, 1)  # (B, 1)
        signal = alpha_hat.sqrt()
        distance = (x[:, None] - signal[:, :, None, None, None] * self.points[None]).flatten(2).pow(2).sum(-1)  # (B, K)
        weights = torch.softmax(-distance / (2 * (1 - alpha_hat)), dim=1)
        x_0 = torch.einsum("bk,kchw->bchw", weights, self.points)
        return (x - signal[:, :, None, None] * x_0) / (1 - alpha_hat)[:, :, None, None].sqrt()


def oracle_diffusion():
    """The reference's schedule. Its last step adds no noise but keeps sqrt(alpha) (1 - alpha_hat_0) / (1 - alpha_hat_1)
    = 0.45 of x_1's, whose std is sqrt(1 - alpha_hat_1) = 0.015: the result is the data up to about 0.007 per pixel."""
    return Diffusion(image_size=8, c_in=1)


def test_repaint_with_the_exact_eps_of_one_image_returns_it_in_the_known_region_and_in_the_hole():
    diffusion = oracle_diffusion()
    image = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    known = torch.zeros(1, 1, 8, 8)
    known[:, :, :4] = 1  # the upper half is known
    x_0 = diffusion.sample_x0(MixtureOracle(diffusion, image), 4, known_image=image.expand(4, -1, -1, -1),
                              known_mask=known, jump_length=10, jump_n_sample=3, seed=0, progress=False)
    torch.testing.assert_close(x_0[:, :, :4], image.expand(4, -1, -1, -1)[:, :, :4])  # exactly: the last replacement
    assert (x_0[:, :, 4:] - image[:, :, 4:]).abs().max() < 0.04  # the hole: the image, up to the last step's noise


class ZeroEps(torch.nn.Module):
    def forward(self, x, t):
        return torch.zeros_like(x)


@pytest.mark.parametrize("jump_n_sample", [1, 2])
def test_repaint_puts_the_known_pixels_at_the_noise_level_of_each_step(jump_n_sample):
    """Every network input x_t after the first holds in the known region a draw of q(x_t | x_0) of the given image
    (RePaint's replacement, and its jumps back up): the residual (x_t - sqrt(alpha_hat_t) x_0) / sqrt(1 - alpha_hat_t)
    there has mean 0 and sd 1. Pasting x_0 itself, or noising it to another level, gives another sd."""
    diffusion = Diffusion(noise_steps=40, image_size=16)
    image = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    known = torch.zeros(1, 1, 16, 16)
    known[:, :, :8] = 1  # the upper half: 1536 known values per step
    inputs = []
    diffusion.sample_x0(ZeroEps(), 4, known_image=image, known_mask=known, jump_length=5,
                        jump_n_sample=jump_n_sample, seed=0, progress=False,
                        callback=lambda step, t, x_t, x0_pred: inputs.append((t, x_t[:, :, :8].clone())))
    levels = diffusion.repaint_levels(5, jump_n_sample)
    assert len(inputs) == sum(down < up for up, down in zip(levels, levels[1:])) >= 39  # and more with jumps
    for t, x_t in inputs[1:]:
        alpha_hat = diffusion.alpha_hat[t]
        residual = (x_t - alpha_hat.sqrt() * image[:, :, :8]) / (1 - alpha_hat).sqrt()
        assert abs(residual.mean().item()) < 0.1 and abs(residual.std().item() - 1) < 0.1, (t, residual.std())


def test_repaint_completes_each_image_of_two_from_its_known_half_and_resampling_makes_it_agree():
    """Data of two images a and b: from the noise alone the oracle gives either; RePaint with a's known half gives a's
    hole, and with b's, b's: the known region steers the hole, which it only can through the replacement. Without
    resampling (jump_n_sample 1) a few completions take the other image's half (the disharmony that RePaint's jumps
    are for: 6 of these 128); with jump_n_sample 3, none does."""
    diffusion = oracle_diffusion()
    points = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    oracle = MixtureOracle(diffusion, points)
    free = diffusion.sample_x0(oracle, 16, seed=0, progress=False)
    nearest = (free[:, None] - points[None]).flatten(2).abs().amax(-1).argmin(dim=1)  # (16,): a or b
    assert set(nearest.tolist()) == {0, 1}  # without RePaint both images come out
    known = torch.zeros(1, 1, 8, 8)
    known[:, :, :, :4] = 1  # the left half is known
    wrong = {}
    for jump_n_sample in (1, 3):
        wrong[jump_n_sample] = 0
        for k in (0, 1):
            x_0 = diffusion.sample_x0(oracle, 64, known_image=points[k:k + 1].expand(64, -1, -1, -1), known_mask=known,
                                      jump_length=10, jump_n_sample=jump_n_sample, seed=1, progress=False)
            error = (x_0 - points[k]).flatten(1).abs().amax(dim=1)  # (64,)
            assert (error[error >= 0.04] > 0.5).all()  # each is the image, or visibly not
            wrong[jump_n_sample] += int((error >= 0.04).sum())
    assert wrong[3] == 0 and 0 < wrong[1] < 16


def test_reconstruction_guidance_makes_the_completions_agree_without_resampling():
    """The two images of the test above, with no jumps: RePaint alone lets a few completions take the other image's
    half; the gradient of the known pixels' reconstruction error through the oracle steers every hole to its own image,
    and the known pixels are still the given ones."""
    diffusion = oracle_diffusion()
    points = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    oracle = MixtureOracle(diffusion, points)
    known = torch.zeros(1, 1, 8, 8)
    known[:, :, :, :4] = 1
    wrong = {}
    for zeta in (0.0, 1.0):
        wrong[zeta] = 0
        for k in (0, 1):
            x_0 = diffusion.sample_x0(oracle, 64, known_image=points[k:k + 1].expand(64, -1, -1, -1), known_mask=known,
                                      reconstruction_guidance=zeta, seed=1, progress=False)
            torch.testing.assert_close(x_0[:, :, :, :4], points[k:k + 1, :, :, :4].expand(64, -1, -1, -1))
            wrong[zeta] += int(((x_0 - points[k]).flatten(1).abs().amax(dim=1) >= 0.04).sum())
    assert wrong[0.0] > 0 and wrong[1.0] == 0


def test_reconstruction_gradient_is_that_of_the_known_pixels_distance_and_the_eps_is_the_plain_one():
    diffusion = Diffusion(noise_steps=50, image_size=8, c_in=1, prediction_type="v_prediction", schedule="cosine")
    model = UNet(c_in=1, c_out=1, base_channels=8).eval()
    x_t, image = torch.randn(2, 2, 1, 8, 8, generator=torch.Generator().manual_seed(0)).unbind()
    known = torch.zeros(1, 1, 8, 8)
    known[..., :4, :] = 1
    t = torch.tensor([30, 10])
    with torch.no_grad():  # as inside sample_x0
        eps, gradient = diffusion.reconstruction_gradient(model, x_t, t, image, known, {})
    torch.testing.assert_close(eps, diffusion.predict_eps(model, x_t, t))
    assert all(p.grad is None for p in model.parameters())  # the gradient of x_t only: the weights' are left alone
    x = x_t[1:].clone().requires_grad_(True)  # the second image alone: each row's gradient is its own
    x0_pred = diffusion.predict_x0(x, t[1:], model(x, t[1:]))
    (known * (x0_pred - image[1:])).norm().backward()
    torch.testing.assert_close(gradient[1:], x.grad)
    assert gradient[0].abs().sum() > 0 and not gradient[..., 4:, :].eq(0).all()  # the hole is moved too


def test_repaint_levels_go_down_with_jumps_back_up_and_the_network_runs_once_per_step_down():
    diffusion = Diffusion(noise_steps=20, image_size=8)
    assert diffusion.repaint_levels(3, 1) == list(range(19, -1, -1))  # jump_n_sample 1: plain Alg. 2
    levels = diffusion.repaint_levels(3, 3)
    assert levels[0] == 19 and levels[-1] == 0 and 0 not in levels[:-1]
    moves = [b - a for a, b in zip(levels[:-1], levels[1:])]
    assert set(moves) == {-1, 1}
    # jumps at levels 1, 4, .., 16 (below T - jump_length = 17), each gone back up 3 levels, 2 more times
    assert moves.count(1) == 6 * 2 * 3 and moves.count(-1) == 19 + 6 * 2 * 3
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, x, t):
            seen.append(t[0].item())
            return torch.zeros_like(x)

    known = torch.ones(1, 1, 8, 8)
    known[:, :, 4:] = 0
    diffusion.sample_x0(Recorder(), 1, known_image=torch.zeros(1, 3, 8, 8), known_mask=known, jump_length=3,
                        jump_n_sample=3, seed=0, progress=False)
    assert seen == [a for a, b in zip(levels[:-1], levels[1:]) if b < a]  # the network at each level it goes down from


def test_a_spaced_chain_keeps_every_timestep_or_steps_evenly_over_them():
    diffusion = Diffusion(noise_steps=20, image_size=8)
    assert diffusion.spaced_timesteps() == list(range(20))  # all T - 1 steps: level k is timestep k
    assert diffusion.spaced_timesteps(4) == [0, 5, 10, 14, 19]
    alpha, beta = diffusion.step_scales(10, 5)  # five steps at once: q(x_10 | x_5)
    torch.testing.assert_close(alpha, diffusion.alpha[6:11].prod())
    torch.testing.assert_close(beta, 1 - diffusion.alpha[6:11].prod())
    assert diffusion.step_scales(10, 9) == (diffusion.alpha[10], diffusion.beta[10])
    x_t, eps, z = torch.randn(3, 2, 1, 8, 8).unbind()
    torch.testing.assert_close(diffusion.p_sample_step(x_t, 7, eps, z), diffusion.p_sample_step(x_t, 7, eps, z, s=6))


def test_repaint_over_a_spaced_chain_calls_the_network_at_its_timesteps_and_returns_the_one_image():
    diffusion = oracle_diffusion()
    image = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    known = torch.zeros(1, 1, 8, 8)
    known[:, :, :4] = 1
    oracle, seen = MixtureOracle(diffusion, image), []
    oracle.register_forward_pre_hook(lambda module, args: seen.append(args[1][0].item()))
    x_0 = diffusion.sample_x0(oracle, 4, known_image=image.expand(4, -1, -1, -1), known_mask=known, steps=50,
                              jump_length=5, jump_n_sample=2, seed=0, progress=False)
    levels, timesteps = diffusion.repaint_levels(5, 2, 50), diffusion.spaced_timesteps(50)
    assert seen == [timesteps[a] for a, b in zip(levels[:-1], levels[1:]) if b < a] and len(seen) < 100
    torch.testing.assert_close(x_0[:, :, :4], image.expand(4, -1, -1, -1)[:, :, :4])
    assert (x_0[:, :, 4:] - image[:, :, 4:]).abs().max() < 0.04


def test_repaint_is_refused_by_the_other_samplers_and_needs_image_and_mask():
    diffusion = Diffusion(noise_steps=10, image_size=8)
    image, known = torch.zeros(1, 3, 8, 8), torch.ones(1, 1, 8, 8)
    with pytest.raises(ValueError, match="RePaint is written into DDPM Alg. 2: use sampler 'ddpm'"):
        diffusion.sample_x0(UNet(base_channels=8), 1, sampler="ddim", known_image=image, known_mask=known)
    with pytest.raises(ValueError, match="with 1 to 9 steps"):
        diffusion.sample_x0(UNet(base_channels=8), 1, steps=10, known_image=image, known_mask=known)
    with pytest.raises(ValueError, match="needs both known_image and known_mask"):
        diffusion.sample_x0(UNet(base_channels=8), 1, known_image=image)
    with pytest.raises(ValueError, match="known_mask of shape"):
        diffusion.sample_x0(UNet(base_channels=8), 1, known_image=image, known_mask=known[0])
    with pytest.raises(ValueError, match="reconstruction_guidance -1 must be >= 0"):
        diffusion.sample_x0(UNet(base_channels=8), 1, known_image=image, known_mask=known, reconstruction_guidance=-1)
    with pytest.raises(ValueError, match="reconstruction_guidance is a part of RePaint"):
        diffusion.sample_x0(UNet(base_channels=8), 1, reconstruction_guidance=1.0)


def test_guidance_on_an_image_condition_is_two_passes_then_lerp_against_a_zero_image():
    torch.manual_seed(0)
    net = UNet_conditional(base_channels=8, cond_channels=3).eval()
    diffusion = Diffusion(image_size=16)
    x_t, t, cond = torch.randn(2, 3, 16, 16), torch.tensor([50, 700]), torch.randn(2, 3, 16, 16)
    model = CountingModel(net)
    with torch.no_grad():
        guided = diffusion.predict_eps(model, x_t, t, cond=cond, null_cond=torch.zeros_like(cond), cfg_scale=3.0)
        eps_cond, eps_uncond = net(x_t, t, cond=cond), net(x_t, t, cond=torch.zeros_like(cond))
    assert model.batch_sizes == [4]  # both halves in one pass
    torch.testing.assert_close(guided, eps_uncond + 3.0 * (eps_cond - eps_uncond), atol=1e-4, rtol=1e-4)
    images = diffusion.sample_x0(model, 2, cfg_scale=0, cond=cond, sampler="ddim", steps=2, seed=0, progress=False)
    assert images.shape == (2, 3, 16, 16) and model.batch_sizes[1:] == [2, 2]
    with pytest.raises(ValueError, match="give one condition image per image"):
        diffusion.sample_x0(model, 3, cond=cond, sampler="ddim", steps=2, progress=False)


def test_the_loss_gives_the_model_the_condition_image():
    got = []

    class Recorder(torch.nn.Module):
        def forward(self, x, t, cond=None):
            got.append(cond)
            return torch.zeros_like(x)

    cond = torch.randn(4, 2, 8, 8)
    Diffusion(image_size=8).loss(Recorder(), torch.zeros(4, 3, 8, 8), cond=cond)
    assert got[0] is cond
