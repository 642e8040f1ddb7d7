"""Tests for the samplers of diffusion.Diffusion: the DDPM step against diffusers, timesteps, guidance, seeds, errors,
and an analytic oracle (data that is one point) that every sampler must reproduce."""

import pytest
import torch
import torch.nn as nn

from diffusion import DEFAULT_STEPS, PREDICTION_TYPES, SAMPLERS, Diffusion
from modules import NULL_LABEL, UNet_conditional

NUM_CLASSES = 3
POINT = torch.tensor([0.5, -0.25, 0.1]).view(1, 3, 1, 1)  # the data point c, one value per channel
LABEL_OFFSET = torch.tensor([-0.05, 0.05, 0.05]).view(1, 3, 1, 1)  # class y's point is c + (y + 1) LABEL_OFFSET


def default_steps(sampler, diffusion):
    return DEFAULT_STEPS.get(sampler, diffusion.noise_steps - 1)


class PointMassEps(nn.Module):
    """The exact eps-prediction for data x_0 = c: eps* = (x_t - sqrt(alpha_hat_t) c) / sqrt(1 - alpha_hat_t).

    label_shift > 0 adds label_shift * (y + 1) to rows with a label (NULL_LABEL rows get 0), so conditional and
    unconditional predictions differ. label_offset makes each class a point of its own: class y's data is
    c + (y + 1) label_offset, the unconditional data c. Every call's rows, timesteps and inputs are recorded.
    """

    def __init__(self, alpha_hat, c=POINT, label_shift=0.0, num_classes=NUM_CLASSES, label_offset=0.0):
        super().__init__()
        self.alpha_hat, self.c, self.label_shift, self.label_offset = alpha_hat, c, label_shift, label_offset
        self.num_classes = num_classes
        self.rows, self.timesteps, self.inputs = [], [], []

    def forward(self, x, t, y=None):
        self.rows.append(x.shape[0])
        self.timesteps.append(t.detach().clone())
        self.inputs.append(x.detach().clone())
        alpha_hat = self.alpha_hat[t.long()].view(-1, 1, 1, 1)
        c = self.c if y is None else self.c + (y + 1).float().view(-1, 1, 1, 1) * self.label_offset
        eps = (x - alpha_hat.sqrt() * c) / (1.0 - alpha_hat).sqrt()
        if y is not None:
            eps = eps + self.label_shift * (y + 1).float().view(-1, 1, 1, 1)
        return eps


def guided_point(labels, cfg_scale):
    """Where guidance takes PointMassEps(label_offset=LABEL_OFFSET): eps is linear in the point, so
    lerp(eps_uncond, eps_cond, s) is the exact eps of the point lerp(c, c_y, s) = c + s (y + 1) LABEL_OFFSET."""
    if labels is None:
        return POINT
    return POINT + cfg_scale * (labels + 1).float().view(-1, 1, 1, 1) * LABEL_OFFSET


class SeparateGuidance(nn.Module):
    """Guidance done by hand: two separate passes (conditional, unconditional), then their lerp."""

    def __init__(self, model, cfg_scale):
        super().__init__()
        self.model, self.cfg_scale, self.num_classes = model, cfg_scale, model.num_classes

    def forward(self, x, t, y):
        eps_cond = self.model(x, t, y)
        eps_uncond = self.model(x, t, torch.full_like(y, NULL_LABEL))
        return eps_uncond + self.cfg_scale * (eps_cond - eps_uncond)


@pytest.fixture(scope="module")
def diffusion():
    return Diffusion(image_size=8)


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    return UNet_conditional(num_classes=NUM_CLASSES, base_channels=8)


def labels_for(n):
    return torch.arange(n) % NUM_CLASSES


# ----------------------------------------------------------------------------- the DDPM step: oracle
@pytest.mark.parametrize("t", [2, 10, 500, 999])
def test_p_sample_step_equals_diffusers_ddpm_step(diffusion, t):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=diffusion.noise_steps, trained_betas=diffusion.beta.numpy(),
                              variance_type="fixed_large", clip_sample=False, prediction_type="epsilon")
    scheduler.set_timesteps(diffusion.noise_steps)  # 999..0: the step from t goes to t-1, as in Alg. 2
    generator = torch.Generator().manual_seed(0)
    x_t, eps = torch.randn(2, 3, 8, 8, generator=generator), torch.randn(2, 3, 8, 8, generator=generator)
    # DDPMScheduler.step draws its noise as torch.randn(shape, generator) on the CPU: the same z as here.
    z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(t))
    ours = diffusion.p_sample_step(x_t, t, eps, z)
    theirs = scheduler.step(eps, t, x_t, generator=torch.Generator().manual_seed(t)).prev_sample
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(ours, diffusion.p_sample_step(x_t, t, eps, torch.zeros_like(z)))  # noise matters


# ----------------------------------------------------------------------------- output, timesteps, calls
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sample_returns_uint8_images(sampler, tiny_unet):
    diffusion = Diffusion(image_size=16)
    images = diffusion.sample(tiny_unet, 3, labels_for(3), 3, sampler=sampler, steps=2, seed=0, progress=False)
    assert images.dtype == torch.uint8
    assert images.shape == (3, 3, 16, 16)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_default_steps_trailing_from_999_never_zero(diffusion, sampler):
    model = PointMassEps(diffusion.alpha_hat)
    diffusion.sample(model, 2, labels_for(2), 3, sampler=sampler, seed=0, progress=False)
    timesteps = torch.stack([t[0] for t in model.timesteps])
    assert len(model.rows) == default_steps(sampler, diffusion)
    assert timesteps[0] == diffusion.noise_steps - 1
    assert timesteps.min() >= 1  # training never drew t = 0
    assert torch.all(timesteps[1:] < timesteps[:-1])
    assert torch.equal(timesteps, timesteps.round())  # integer timesteps, even where the scheduler uses floats
    if sampler == "ddpm":
        assert torch.equal(timesteps, torch.arange(diffusion.noise_steps - 1, 0, -1).float().to(timesteps.dtype))


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("cfg_scale, rows_per_image", [(3.0, 2), (1.0, 2), (0.0, 1)])
def test_network_calls_equal_steps_and_rows_double_with_guidance(diffusion, sampler, cfg_scale, rows_per_image):
    model = PointMassEps(diffusion.alpha_hat)
    diffusion.sample(model, 4, labels_for(4), cfg_scale, sampler=sampler, steps=7, seed=0, progress=False)
    assert model.rows == [4 * rows_per_image] * 7


# ----------------------------------------------------------------------------- guidance
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_batched_guidance_equals_lerp_of_two_separate_passes(diffusion, sampler):
    labels = labels_for(4)
    steps = None if sampler == "ddpm" else 7  # ddpm: the hand-written Alg. 2 loop
    batched = diffusion.sample_x0(PointMassEps(diffusion.alpha_hat, label_shift=0.1), 4, labels, 3.0,
                                  sampler=sampler, steps=steps, seed=5, progress=False)
    separate_model = SeparateGuidance(PointMassEps(diffusion.alpha_hat, label_shift=0.1), 3.0)
    separate = diffusion.sample_x0(separate_model, 4, labels, 0.0, sampler=sampler, steps=steps, seed=5,
                                   progress=False)
    unguided = diffusion.sample_x0(PointMassEps(diffusion.alpha_hat, label_shift=0.1), 4, labels, 0.0,
                                   sampler=sampler, steps=steps, seed=5, progress=False)
    torch.testing.assert_close(batched, separate, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(batched, unguided, atol=1e-2)  # guidance changed the result


def test_predict_eps_guidance_identity(diffusion):
    model = PointMassEps(diffusion.alpha_hat, label_shift=0.2)
    x_t, t, labels = torch.randn(2, 3, 8, 8), torch.tensor([400, 400]), torch.tensor([0, 2])
    eps = diffusion.predict_eps(model, x_t, t, labels, torch.full_like(labels, NULL_LABEL), cfg_scale=2.5)
    eps_cond, eps_uncond = model(x_t, t, labels), model(x_t, t, torch.full_like(labels, NULL_LABEL))
    torch.testing.assert_close(eps, eps_uncond + 2.5 * (eps_cond - eps_uncond))
    assert model.rows[0] == 4  # one batched pass of 2B rows


# ----------------------------------------------------------------------------- seeds and errors
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_same_seed_same_images_other_seed_other_images(sampler, tiny_unet):
    diffusion = Diffusion(image_size=16)

    def run(seed):
        return diffusion.sample_x0(tiny_unet, 2, labels_for(2), 3, sampler=sampler, steps=3, seed=seed,
                                   progress=False)

    first, again, other = run(1), run(1), run(2)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


@pytest.mark.parametrize("kwargs, value", [({"sampler": "plms"}, "plms"), ({"cfg_scale": -0.5}, "-0.5"),
                                           ({"labels": torch.tensor([0, NUM_CLASSES])}, str(NUM_CLASSES))])
def test_invalid_arguments_raise_value_error_naming_the_value(diffusion, kwargs, value):
    args = {"labels": labels_for(2), "cfg_scale": 3.0, "sampler": "ddim"} | kwargs
    model = PointMassEps(diffusion.alpha_hat)
    with pytest.raises(ValueError, match=value.replace("+", r"\+")):
        diffusion.sample(model, 2, args["labels"], args["cfg_scale"], sampler=args["sampler"], progress=False)
    assert model.rows == []  # refused before any network call


# ----------------------------------------------------------------------------- analytic oracle
# Exact eps for a point mass: deterministic samplers land on c; the stochastic ones too, since the posterior
# is a point mass. ddpm's Alg. 2 ends at the index-0 sample (noise std sqrt(1 - alpha_hat_0) = 0.01 around c).
# Guided, each class is a point of its own and the samplers land on guided_point.
ORACLE_TOLERANCE = {"ddpm": 0.06, "ddim": 1e-4, "dpm++": 1e-4, "dpm++ode": 1e-4, "euler_a": 1e-4}


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("guided", [False, True])
def test_point_mass_oracle_every_sampler_returns_the_point(diffusion, sampler, guided):
    labels, cfg_scale = (labels_for(4), 3.0) if guided else (None, 0.0)
    point = guided_point(labels, cfg_scale)
    x_0 = diffusion.sample_x0(PointMassEps(diffusion.alpha_hat, label_offset=LABEL_OFFSET), 4, labels, cfg_scale,
                              sampler=sampler, seed=3, progress=False)
    error = (x_0 - point).abs().max().item()
    assert error < ORACLE_TOLERANCE[sampler], f"{sampler}: max |x_0 - c| = {error:.3g}"
    images = diffusion.sample(PointMassEps(diffusion.alpha_hat, label_offset=LABEL_OFFSET), 4, labels, cfg_scale,
                              sampler=sampler, seed=3, progress=False)
    expected = ((point + 1) / 2 * 255).round().expand_as(images)
    assert (images.float() - expected).abs().max() <= 255 * ORACLE_TOLERANCE[sampler] / 2 + 1


@pytest.mark.parametrize("steps", [10, 100])
def test_strided_ddpm_adds_no_noise_at_its_last_step(diffusion, steps):
    x_0 = diffusion.sample_x0(PointMassEps(diffusion.alpha_hat), 4, sampler="ddpm", steps=steps, seed=0,
                              progress=False)
    assert (x_0 - POINT).abs().max().item() < 1e-4


@pytest.mark.parametrize("steps, message", [(61, "steps 61: trailing spacing gives 62 timesteps"),
                                            (0, "steps 0 is out of range"), (1000, "steps 1000 is out of range")])
def test_step_counts_that_would_ask_for_t_below_1_are_refused(diffusion, steps, message):
    with pytest.raises(ValueError, match=message):
        diffusion.sample(PointMassEps(diffusion.alpha_hat), 1, sampler="ddim", steps=steps, progress=False)


# ----------------------------------------------------------------------------- the per-step callback
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_callback_sees_every_step_in_order_with_its_timestep_and_the_point(diffusion, sampler):
    """One call per network step, in order; x_t is the network's input (the DDPM x_t: the point-mass eps of it
    implies x_0 = c exactly, also for euler_a, whose own state is x_t / sqrt(alpha_hat_t)); x0_pred is c."""
    model = PointMassEps(diffusion.alpha_hat)
    calls = []
    diffusion.sample_x0(model, 2, sampler=sampler, seed=0, progress=False,
                        callback=lambda i, t, x_t, x0_pred: calls.append((i, t, x_t.clone(), x0_pred.clone())))
    steps = default_steps(sampler, diffusion)
    assert [i for i, *_ in calls] == list(range(steps))
    assert [t for _, t, *_ in calls] == [int(t[0]) for t in model.timesteps]
    assert all(isinstance(t, int) for _, t, *_ in calls)
    assert calls[0][1] == diffusion.noise_steps - 1 and calls[-1][1] >= 1
    for (_, t, x_t, x0_pred), x_in in zip(calls, model.inputs, strict=True):
        assert torch.equal(x_t, x_in)
        assert (x0_pred - POINT).abs().max() < 1e-3, f"{sampler} at t={t}"
    assert abs(calls[0][2].std().item() - 1.0) < 0.2  # x_T ~ N(0, I), not euler_a's sigma-scaled state


def test_callback_with_guidance_and_strided_ddpm(diffusion):
    """The scheduler's DDPM with 10 steps: 10 calls, timesteps strictly decreasing, x_t of the n images only."""
    model = PointMassEps(diffusion.alpha_hat, label_shift=0.0)
    calls = []
    diffusion.sample_x0(model, 3, labels_for(3), 3.0, sampler="ddpm", steps=10, seed=0, progress=False,
                        callback=lambda i, t, x_t, x0_pred: calls.append((t, x_t.shape, x0_pred.shape)))
    timesteps = [t for t, *_ in calls]
    assert len(calls) == 10 and timesteps == sorted(timesteps, reverse=True) and len(set(timesteps)) == 10
    assert all(shape == (3, 3, 8, 8) == pred_shape for _, shape, pred_shape in calls)


@pytest.mark.parametrize("t", [1, 500, 999])
def test_predict_x0_inverts_noise_images(diffusion, t):
    torch.manual_seed(t)
    x_0, eps = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    x_t, _ = diffusion.noise_images(x_0, torch.full((4,), t), eps)
    assert torch.allclose(diffusion.predict_x0(x_t, t, eps), x_0, atol=1e-3 * (1 + t / 100))
    per_row = torch.tensor([t, 1, 250, 999])
    x_t, _ = diffusion.noise_images(x_0, per_row, eps)
    assert torch.allclose(diffusion.predict_x0(x_t, per_row, eps), x_0, atol=2e-2)


# ----------------------------------------------------------------------------- clipping the predicted x_0
def test_predict_x0_inverts_noise_images_and_eps_from_x0_inverts_it(diffusion):
    generator = torch.Generator().manual_seed(0)
    x_0, eps = torch.randn(3, 3, 8, 8, generator=generator), torch.randn(3, 3, 8, 8, generator=generator)
    t = torch.tensor([1, 400, 999])
    x_t, _ = diffusion.noise_images(x_0, t, eps)
    torch.testing.assert_close(diffusion.predict_x0(x_t, t, eps), x_0, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(diffusion.eps_from_x0(x_t, t, x_0), eps, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(diffusion.predict_x0(x_t[1:2], 400, eps[1:2]), diffusion.predict_x0(x_t, t, eps)[1:2])


@pytest.mark.parametrize("t", [2, 10, 500, 999])
def test_clipped_p_sample_step_equals_diffusers_clipped_ddpm_step(diffusion, t):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=diffusion.noise_steps, trained_betas=diffusion.beta.numpy(),
                              variance_type="fixed_large", clip_sample=True, clip_sample_range=1.0,
                              prediction_type="epsilon")
    scheduler.set_timesteps(diffusion.noise_steps)
    generator = torch.Generator().manual_seed(1)
    x_t, eps = 3 * torch.randn(2, 3, 8, 8, generator=generator), torch.randn(2, 3, 8, 8, generator=generator)
    assert diffusion.predict_x0(x_t, t, eps).abs().max() > 1.5  # clipping changes this step
    z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(t))
    ours = diffusion.p_sample_step(x_t, t, eps, z, clip_x0=True)
    theirs = scheduler.step(eps, t, x_t, generator=torch.Generator().manual_seed(t)).prev_sample
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(ours, diffusion.p_sample_step(x_t, t, eps, z), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("t", [1, 2, 300, 999])
def test_clipped_step_is_alg_2_when_x0_is_in_range(diffusion, t):
    """The posterior mean of q(x_{t-1} | x_t, x_0), x_0 from eps, is Alg. 2's mean: clipping nothing changes nothing."""
    generator = torch.Generator().manual_seed(2)
    x_0 = torch.rand(2, 3, 8, 8, generator=generator) * 1.8 - 0.9
    eps, z = torch.randn(2, 3, 8, 8, generator=generator), torch.randn(2, 3, 8, 8, generator=generator)
    x_t, _ = diffusion.noise_images(x_0, torch.full((2,), t), eps)
    torch.testing.assert_close(diffusion.p_sample_step(x_t, t, eps, z, clip_x0=True),
                               diffusion.p_sample_step(x_t, t, eps, z), rtol=1e-4, atol=1e-4)


class FarOutEps(nn.Module):
    """A bad network: its eps always implies x_0 = 4 sign(x_t), far outside the data range."""

    def __init__(self, diffusion):
        super().__init__()
        self.diffusion = diffusion

    def forward(self, x, t):
        return self.diffusion.eps_from_x0(x, t.long(), 4 * torch.sign(x))


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_clipped_samplers_keep_x0_in_the_data_range(diffusion, sampler):
    model = FarOutEps(diffusion)
    clipped = diffusion.sample_x0(model, 4, sampler=sampler, seed=0, progress=False, clip_x0=True)
    unclipped = diffusion.sample_x0(model, 4, sampler=sampler, seed=0, progress=False, clip_x0=False)
    assert unclipped.abs().max() > 3  # the test can fail: without clipping the samples leave [-1, 1]
    # ddpm's Alg. 2 ends at alpha_hat_0, a mean of the clipped x_0 and x_1 (noise std ~0.01); the others at x_0.
    assert clipped.abs().max() <= (1.05 if sampler == "ddpm" else 1.0 + 1e-5), clipped.abs().max()


def test_clipped_ddim_step_uses_the_eps_of_the_clipped_x0(diffusion):
    """DDIM eq. 12 (eta 0) with x_0 clipped: the direction term uses eps(x_t, clip(x_0)), as improved-diffusion's
    ddim_sample does; the network's raw eps beside a clipped x_0 would leave q(x_t' | x_0)."""
    seen = []
    diffusion.sample_x0(FarOutEps(diffusion), 2, sampler="ddim", steps=2, seed=0, progress=False, clip_x0=True,
                        callback=lambda i, t, x_t, x0: seen.append((t, x_t, x0)))
    (t, x_t, x0), (t_next, x_next, _) = seen
    assert (x0.abs() == 1.0).all()  # 4 sign(x_t), clipped to sign(x_t)
    alpha_hat_next = diffusion.alpha_hat[t_next]
    expected = alpha_hat_next.sqrt() * x0 + (1 - alpha_hat_next).sqrt() * diffusion.eps_from_x0(x_t, t, x0)
    torch.testing.assert_close(x_next, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_clip_x0_defaults_to_the_diffusion_setting(sampler):
    model = FarOutEps(Diffusion(image_size=8))
    steps = 10 if sampler == "ddpm" else None
    kwargs = dict(sampler=sampler, steps=steps, seed=0, progress=False)
    on, off = Diffusion(image_size=8, clip_x0=True), Diffusion(image_size=8)
    assert not off.clip_x0  # the reference's unclipped sampler
    torch.testing.assert_close(on.sample_x0(model, 2, **kwargs), off.sample_x0(model, 2, clip_x0=True, **kwargs))
    assert on.sample_x0(model, 2, **kwargs).abs().max() <= 1.0 + 1e-5


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++", "dpm++ode"])
def test_make_scheduler_sets_each_schedulers_own_clipping(diffusion, sampler):
    config = diffusion.make_scheduler(sampler, 10, clip_x0=True).config
    if sampler in ("ddpm", "ddim"):
        assert config.clip_sample and config.clip_sample_range == 1.0 and not config.thresholding
    else:  # dynamic thresholding with s clamped to [1, sample_max_value] = [1, 1]: the plain clip
        assert config.thresholding and config.sample_max_value == 1.0
    off = diffusion.make_scheduler(sampler, 10).config
    assert not off.get("clip_sample", False) and not off.thresholding


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("clip_x0", [False, True])
def test_point_mass_oracle_on_the_cosine_schedule(sampler, clip_x0):
    """The samplers build their schedulers from the model's betas, so any schedule works: here the cosine one,
    whose alpha_hat at T-1 is nearly 0 (beta clipped at 0.999)."""
    diffusion = Diffusion(image_size=8, schedule="cosine", clip_x0=clip_x0)
    x_0 = diffusion.sample_x0(PointMassEps(diffusion.alpha_hat, label_offset=LABEL_OFFSET), 4, labels_for(4), 3.0,
                              sampler=sampler, seed=3, progress=False)
    error = (x_0 - guided_point(labels_for(4), 3.0)).abs().max().item()
    assert error < ORACLE_TOLERANCE[sampler], f"{sampler}: max |x_0 - c| = {error:.3g}"


class PointMassOutput(PointMassEps):
    """The exact prediction of PointMassEps's data in another kind: x_0 (sample) or v, from its exact eps."""

    def __init__(self, alpha_hat, prediction_type, **kwargs):
        super().__init__(alpha_hat, **kwargs)
        self.prediction_type = prediction_type

    def forward(self, x, t, y=None):
        eps = super().forward(x, t, y)
        alpha_hat = self.alpha_hat[t.long()].view(-1, 1, 1, 1)
        x_0 = (x - (1 - alpha_hat).sqrt() * eps) / alpha_hat.sqrt()  # the point c (of class y), written out
        if self.prediction_type == "sample":
            return x_0
        return alpha_hat.sqrt() * eps - (1 - alpha_hat).sqrt() * x_0  # v


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
@pytest.mark.parametrize("schedule, clip_x0", [("linear", False), ("cosine", True)])
def test_point_mass_oracle_for_v_and_x0_prediction(sampler, prediction_type, schedule, clip_x0):
    """Every sampler, given the exact v or x_0 of data that is one point per class, returns that point (guided)."""
    diffusion = Diffusion(image_size=8, schedule=schedule, clip_x0=clip_x0, prediction_type=prediction_type)
    model = PointMassOutput(diffusion.alpha_hat, prediction_type, label_offset=LABEL_OFFSET)
    x_0 = diffusion.sample_x0(model, 4, labels_for(4), 3.0, sampler=sampler, seed=3, progress=False)
    error = (x_0 - guided_point(labels_for(4), 3.0)).abs().max().item()
    assert error < ORACLE_TOLERANCE[sampler], f"{sampler}, {prediction_type}: max |x_0 - c| = {error:.3g}"


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_the_callback_sees_the_x0_of_every_prediction_type(sampler, prediction_type):
    """The predicted x_0 handed to the callback is the point from the first step on, whatever the network predicts."""
    diffusion = Diffusion(image_size=8, prediction_type=prediction_type)
    model = PointMassOutput(diffusion.alpha_hat, prediction_type) if prediction_type != "epsilon" else \
        PointMassEps(diffusion.alpha_hat)
    seen = []
    diffusion.sample_x0(model, 2, None, 0.0, sampler=sampler, steps=10 if sampler == "ddpm" else None, seed=0,
                        progress=False, callback=lambda i, t, x_t, x0: seen.append((x0 - POINT).abs().max().item()))
    assert max(seen) < 1e-2


def test_schedulers_are_told_the_prediction_type_but_euler_a_gets_eps_for_x0():
    for prediction_type in PREDICTION_TYPES:
        diffusion = Diffusion(image_size=8, prediction_type=prediction_type)
        for sampler in ("ddpm", "ddim", "dpm++", "dpm++ode", "euler_a"):
            expected = "epsilon" if (sampler, prediction_type) == ("euler_a", "sample") else prediction_type
            assert diffusion.make_scheduler(sampler, 10).config.prediction_type == expected

