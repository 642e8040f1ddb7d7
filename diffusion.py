"""The DDPM math: the noise schedule, q(x_t | x_0), the loss and its targets, the samplers, guidance and RePaint.

`Diffusion` is the design's own name: the scripts import it from ddpm.py, as the reference repository's do; it lives
here so that the library modules (the loop, the checkpoint loader, the judges) can use it without importing a
script. Nothing here knows a network beyond calling it: model(x_t, t[, labels][, cond=cond]).
"""
import dataclasses
import warnings

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from modules import NULL_LABEL
from utils import to_uint8


SAMPLERS = ("ddpm", "ddim", "dpm++", "dpm++ode", "euler_a")
SCHEDULES = ("linear", "cosine")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # the diffusers names
REFERENCE_SCHEDULE = {"noise_steps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "schedule": "linear",
                      "min_snr_gamma": None, "prediction_type": "epsilon"}
DEFAULT_STEPS = {"ddim": 50, "dpm++": 20, "dpm++ode": 20, "euler_a": 30}


def broadcast(values, x):
    """Per-row scalars (B,) -> (B, 1, 1, 1), to scale images or latents x of any channel count."""
    return values.view(-1, *([1] * (x.dim() - 1)))


def make_betas(schedule, noise_steps, beta_start=1e-4, beta_end=0.02):
    """beta_t for t = 0..T-1, float32 (T,).

    linear: evenly spaced from beta_start to beta_end (Ho et al. 2020; the reference). cosine (Nichol & Dhariwal
    2021, eq. 17): alpha_hat follows f(t) = cos((t / T + s) / (1 + s) * pi / 2)^2 with s = 0.008, so
    beta_t = 1 - f(t + 1) / f(t), clipped at 0.999 as in the paper; beta_start and beta_end are unused. At low
    resolution the linear schedule destroys the image well before t = T and wastes those steps; the cosine one
    adds noise more evenly.
    """
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, noise_steps)
    if schedule == "cosine":
        s = 0.008
        steps = torch.arange(noise_steps + 1, dtype=torch.float64) / noise_steps
        f = torch.cos((steps + s) / (1 + s) * torch.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999).float()
    raise ValueError(f"schedule {schedule!r} is unknown: use one of {', '.join(SCHEDULES)}")


class Diffusion:
    """DDPM (Ho et al. 2020) with the linear beta schedule of the reference repository, or the cosine one.

    Index conventions. beta, alpha and alpha_hat are tensors of length T = noise_steps, indexed by
    t = 0..T-1, with alpha = 1 - beta and alpha_hat[t] = alpha[0] * ... * alpha[t]. Training draws t
    uniformly from 1..T-1. Ancestral sampling (DDPM Alg. 2) starts from x ~ N(0, I) at its first step
    t = T-1 and ends after its last step t = 1, which adds no noise; the result is x_0.

    Guidance (CFG, Ho & Salimans 2022, eq. 6): eps = lerp(eps_uncond, eps_cond, cfg_scale). cfg_scale 0
    means the conditional prediction alone, in one pass; 1 gives the same result in a batched pass; above 1
    pushes away from the unconditional prediction.

    clip_x0: every sampler clips its prediction of x_0 to the data range [-1, 1] at each step (the DDPM
    authors' code and improved-diffusion's clip_denoised). False, the default here, is the reference's
    unclipped Alg. 2; the pixel-space scripts turn it on, train_sd.py only without a VAE (latents have no range).

    prediction_type: what the network outputs, in the diffusers names: "epsilon" (eps, DDPM), "v_prediction"
    (v = sqrt(alpha_hat_t) eps - sqrt(1 - alpha_hat_t) x_0, Salimans & Ho 2022, eq. 9 ff.) or "sample" (x_0). The
    loss regresses that target; every sampler converts it (`predict_x0`, `eps_from_output`), and the diffusers
    schedulers are told the type. Guidance mixes the outputs, which is the same as mixing the eps, since each
    conversion is affine in the output at fixed x_t and t.

    Conditioning reaches the network as model(x_t, t[, labels][, cond=cond]): `labels` are class ids (or text token
    states), `cond` an image of the same H x W (ddpm_img2img.py: a low-resolution image upsampled back, a masked
    image and its mask); either may be None. Guidance mixes the output conditioned on both with the one conditioned
    on null_labels and null_cond (NULL_LABEL rows and a zero image by default).

    RePaint (Lugmayr et al. 2022) inpaints with any of these networks, trained for inpainting or not: `sample_x0`
    with `known_image` and `known_mask` runs Alg. 2 and, after each step to level t-1, overwrites the known pixels
    with a draw of q(x_{t-1} | x_0) of the given image; every jump_length steps it goes back up jump_length levels by
    q(x_t | x_{t-1}) and down again, jump_n_sample - 1 times, so that the generated region can agree with the
    known one (see `repaint_levels`). Only the ddpm sampler does this, over every timestep or over `steps` evenly
    spaced ones (`spaced_timesteps`: each step then goes from timestep t to s < t by `step_scales(t, s)`). With
    reconstruction_guidance zeta > 0, each step also moves x_{t-1} by -zeta times the gradient, with respect to x_t,
    of || known_mask * (x0_pred(x_t) - x_0) ||_2, the distance of the known pixels that the network predicts from the
    given ones (MCG, Chung et al. 2022, its manifold-constrained gradient before RePaint's replacement; DPS is the
    same step without it): the hole hears of the known region through the network at every noise level, not only
    through the noisy known pixels it is shown.

    min_snr_gamma: None is the simple loss of Alg. 1 (an unweighted MSE to the target). A number gamma weights the
    loss at t so that every target gets the x_0-space weight min(SNR_t, gamma), with SNR_t = alpha_hat_t /
    (1 - alpha_hat_t) (Min-SNR-gamma, Hang et al. 2023): as ||eps - eps_pred||^2 = SNR_t ||x_0 - x0_pred||^2 and
    ||v - v_pred||^2 = (SNR_t + 1) ||x_0 - x0_pred||^2, the weight is min(SNR_t, gamma) / SNR_t for epsilon,
    min(SNR_t, gamma) for sample and min(SNR_t, gamma) / (SNR_t + 1) for v_prediction. The nearly clean
    timesteps, whose eps is easy to guess and says little, weigh less.
    """

    def __init__(self, noise_steps=1000, beta_start=1e-4, beta_end=0.02, image_size=64, c_in=3, device="cpu",
                 clip_x0=False, schedule="linear", min_snr_gamma=None, prediction_type="epsilon", img_size=None):
        if img_size is not None:  # the reference's name
            warnings.warn("Diffusion(img_size=...) is now image_size=...; the old name still works",
                          DeprecationWarning, stacklevel=2)
            image_size = img_size
        if image_size % 8:
            raise ValueError(f"image_size {image_size} is not divisible by 8: the U-Net halves it 3 times; "
                             "use 16, 32 or 64")
        self.noise_steps = noise_steps
        self.image_size = image_size
        self.c_in = c_in
        self.clip_x0 = clip_x0
        self.device = torch.device(device)
        if min_snr_gamma is not None and min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma {min_snr_gamma} is not positive: use e.g. 5, or None for the plain loss")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {prediction_type!r} is unknown: use one of "
                             f"{', '.join(PREDICTION_TYPES)}")
        self.prediction_type = prediction_type
        self.schedule = schedule
        self.min_snr_gamma = min_snr_gamma
        self.beta = make_betas(schedule, noise_steps, beta_start, beta_end).to(self.device)  # float32, as the reference
        self.alpha = 1.0 - self.beta
        self.alpha_hat = torch.cumprod(self.alpha, dim=0)

    @property
    def img_size(self):
        """The reference's name of `image_size`."""
        warnings.warn("Diffusion.img_size is now image_size", DeprecationWarning, stacklevel=2)
        return self.image_size

    @classmethod
    def from_settings(cls, settings, image_size, c_in=3, device="cpu", clip_x0=False):
        """The one factory: the Diffusion of a run's settings (a Config, or a saved config dict), on images or latents
        of image_size x image_size and c_in channels; the schedule fields it lacks take the reference's values."""
        if not isinstance(settings, dict):
            settings = dataclasses.asdict(settings)
        schedule = {key: settings.get(key, default) for key, default in REFERENCE_SCHEDULE.items()}
        return cls(image_size=image_size, c_in=c_in, device=device, clip_x0=clip_x0, **schedule)

    def sample_timesteps(self, n, generator=None):
        """t ~ U{1, ..., T-1}, shape (n,)."""
        return torch.randint(1, self.noise_steps, (n,), device=self.device, generator=generator)

    def noise_images(self, x_0, t, eps=None):
        """Sample q(x_t | x_0): x_t = sqrt(alpha_hat_t) x_0 + sqrt(1 - alpha_hat_t) eps. Returns (x_t, eps)."""
        if eps is None:
            eps = torch.randn_like(x_0)
        alpha_hat = broadcast(self.alpha_hat[t], x_0)
        x_t = alpha_hat.sqrt() * x_0 + (1.0 - alpha_hat).sqrt() * eps
        return x_t, eps

    def target(self, x_0, t, eps):
        """What the network learns to output for x_t = noise_images(x_0, t, eps): eps, v or x_0 (prediction_type)."""
        if self.prediction_type == "epsilon":
            return eps
        if self.prediction_type == "sample":
            return x_0
        signal, noise = self._scales(t, x_0)
        return signal * eps - noise * x_0  # v, Salimans & Ho 2022

    def snr(self, t):
        """SNR_t = alpha_hat_t / (1 - alpha_hat_t), per row of t (B,)."""
        return self.alpha_hat[t] / (1.0 - self.alpha_hat[t])

    def loss_weight(self, t):
        """Min-SNR-gamma weight of each row (B,): min(SNR, gamma) in x_0 space, divided by what the target's squared
        error is worth there: SNR for eps, 1 for x_0, SNR + 1 for v (see the class docstring)."""
        snr = self.snr(t)
        clipped = snr.clamp(max=self.min_snr_gamma)
        if self.prediction_type == "epsilon":
            return clipped / snr
        if self.prediction_type == "sample":
            return clipped
        return clipped / (snr + 1.0)

    def loss(self, model, x_0, labels=None, cond=None):
        """The simple DDPM objective (Alg. 1): MSE between the target (eps, v or x_0) and the model's prediction of it,
        each row weighted by `loss_weight` when min_snr_gamma is set.

        `labels` is the model's conditioning for each row (class ids, or text embeddings), or None; `cond` the image
        it is conditioned on (B, C_cond, H, W), or None.
        """
        t = self.sample_timesteps(x_0.shape[0])
        x_t, eps = self.noise_images(x_0, t)
        prediction = call_model(model, x_t, t, labels, cond)
        target = self.target(x_0.float(), t, eps.float())
        if self.min_snr_gamma is None:
            return F.mse_loss(prediction.float(), target)
        per_row = F.mse_loss(prediction.float(), target, reduction="none").mean(dim=tuple(range(1, x_0.dim())))
        return (per_row * self.loss_weight(t)).mean()

    def predict(self, model, x_t, t, labels=None, null_labels=None, cfg_scale=0.0, cond=None, null_cond=None):
        """The model's output (eps, v or x_0: prediction_type) for x_t at timesteps t (B,), guided when cfg_scale > 0.

        With guidance, the conditional (labels, cond) and unconditional (null_labels, null_cond) predictions are one
        forward pass of 2B rows.
        """
        if labels is None and cond is None:
            return model(x_t, t)
        if cfg_scale == 0:
            return call_model(model, x_t, t, labels, cond)
        both = call_model(model, torch.cat([x_t, x_t]), torch.cat([t, t]), stack_pair(labels, null_labels),
                          stack_pair(cond, null_cond))
        conditional, unconditional = both.chunk(2)
        return torch.lerp(unconditional, conditional, cfg_scale)  # CFG, Ho & Salimans 2022, eq. 6

    def predict_eps(self, model, x_t, t, labels=None, null_labels=None, cfg_scale=0.0, cond=None, null_cond=None):
        """The model's eps for x_t at timesteps t (B,), guided when cfg_scale > 0, whatever it predicts."""
        output = self.predict(model, x_t, t, labels, null_labels, cfg_scale, cond, null_cond)
        return self.eps_from_output(x_t, t, output)

    def _scales(self, t, x):
        """(sqrt(alpha_hat_t), sqrt(1 - alpha_hat_t)) for t an int or a (B,) tensor, broadcastable against x."""
        alpha_hat = self.alpha_hat[t]
        if alpha_hat.dim():
            alpha_hat = broadcast(alpha_hat, x)
        return alpha_hat.sqrt(), (1.0 - alpha_hat).sqrt()

    def predict_x0(self, x_t, t, output, prediction_type=None):
        """x_0 implied by the network's output at x_t; t an int or a (B,) tensor. prediction_type: the output's kind
        (None: this Diffusion's). epsilon: (x_t - sqrt(1 - alpha_hat_t) eps) / sqrt(alpha_hat_t); v_prediction:
        sqrt(alpha_hat_t) x_t - sqrt(1 - alpha_hat_t) v; sample: the output itself."""
        prediction_type = prediction_type or self.prediction_type
        if prediction_type == "sample":
            return output
        signal, noise = self._scales(t, x_t)
        if prediction_type == "v_prediction":
            return signal * x_t - noise * output
        return (x_t - noise * output) / signal

    def eps_from_output(self, x_t, t, output):
        """eps implied by the network's output at x_t (this Diffusion's prediction_type)."""
        if self.prediction_type == "epsilon":
            return output
        if self.prediction_type == "sample":
            return self.eps_from_x0(x_t, t, output)
        signal, noise = self._scales(t, x_t)
        return signal * output + noise * x_t  # eps from v

    def output_from_x0(self, x_t, t, x_0):
        """The inverse of `predict_x0`: the output (of this Diffusion's prediction_type) that implies x_0 at x_t."""
        if self.prediction_type == "sample":
            return x_0
        if self.prediction_type == "epsilon":
            return self.eps_from_x0(x_t, t, x_0)
        signal, noise = self._scales(t, x_t)
        return (signal * x_t - x_0) / noise  # v

    def eps_from_x0(self, x_t, t, x_0):
        """eps = (x_t - sqrt(alpha_hat_t) x_0) / sqrt(1 - alpha_hat_t): the eps that `predict_x0` maps to x_0."""
        signal, noise = self._scales(t, x_t)
        return (x_t - signal * x_0) / noise

    def step_scales(self, t, s):
        """(alpha, beta) of one step between the timesteps s < t: x_t ~ N(sqrt(alpha) x_s, beta I), with
        alpha = alpha_hat_t / alpha_hat_s; for s = t - 1 the schedule's own alpha_t and beta_t (a respaced chain,
        improved-diffusion's, steps over several timesteps at once)."""
        if s == t - 1:
            return self.alpha[t], self.beta[t]
        alpha = self.alpha_hat[t] / self.alpha_hat[s]
        return alpha, 1.0 - alpha

    def p_sample_step(self, x_t, t, eps, z, clip_x0=False, s=None):
        """One step of DDPM Alg. 2 from the integer timestep t >= 1 down to s (None: t - 1), with sigma^2 = beta of
        `step_scales(t, s)` and noise z.

        clip_x0=False is Alg. 2 as written. clip_x0=True goes through x_0: it clamps predict_x0 to [-1, 1] and
        takes the mean of the posterior q(x_s | x_t, x_0) (DDPM eq. 7), which is the same mean when no
        pixel is clipped.
        """
        s = t - 1 if s is None else s
        (alpha, beta), alpha_hat = self.step_scales(t, s), self.alpha_hat[t]
        if not clip_x0:
            mean = (x_t - (1.0 - alpha) / (1.0 - alpha_hat).sqrt() * eps) / alpha.sqrt()
            return mean + beta.sqrt() * z
        alpha_hat_prev = self.alpha_hat[s]
        x_0 = self.predict_x0(x_t, t, eps, "epsilon").clamp(-1.0, 1.0)
        coef_x0 = alpha_hat_prev.sqrt() * beta / (1.0 - alpha_hat)  # DDPM eq. 7, mu_tilde
        coef_xt = alpha.sqrt() * (1.0 - alpha_hat_prev) / (1.0 - alpha_hat)
        return coef_x0 * x_0 + coef_xt * x_t + beta.sqrt() * z

    def _check_sample_args(self, model, n, labels, cfg_scale, sampler, cond=None):
        if cfg_scale < 0:
            raise ValueError(f"cfg_scale {cfg_scale} is negative: use 0 (no guidance) or a value > 0, e.g. 3")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler {sampler!r} is unknown: use one of {', '.join(SAMPLERS)}")
        if cond is not None and (cond.shape[0] != n or cond.shape[2:] != (self.image_size, self.image_size)):
            raise ValueError(f"condition images of shape {tuple(cond.shape)} for n={n} images of "
                             f"{self.image_size} x {self.image_size}: give one condition image per image, at that size")
        if labels is None:
            return
        if labels.shape[0] != n:
            raise ValueError(f"got {labels.shape[0]} labels for n={n} images: give one label per image")
        num_classes = getattr(model, "num_classes", None)
        if num_classes is not None and not labels.is_floating_point():
            bad = labels[(labels >= num_classes) | (labels < NULL_LABEL)]
            if bad.numel():
                raise ValueError(
                    f"label {bad[0].item()} is outside the model's classes: use 0..{num_classes - 1} (or -1 for none)"
                )

    @torch.no_grad()
    def sample(self, model, n, labels=None, cfg_scale=3, **kwargs):
        """Generate n images. Returns uint8 (n, c_in, H, W); see `sample_x0` for the arguments."""
        return to_uint8(self.sample_x0(model, n, labels, cfg_scale, **kwargs))

    @torch.no_grad()
    def sample_x0(self, model, n, labels=None, cfg_scale=3, *, null_labels=None, sampler="ddpm", steps=None,
                  eta=0.0, generator=None, seed=None, progress=True, clip_x0=None, callback=None, cond=None,
                  null_cond=None, known_image=None, known_mask=None, jump_length=1, jump_n_sample=1,
                  reconstruction_guidance=0.0):
        """Generate n samples x_0 as float (n, c_in, H, W), in the model's space (pixels in [-1, 1], or latents).

        labels: None (unconditional), class ids (n,), or any conditioning with n rows, such as text token
            states (n, L, D). null_labels: the unconditional conditioning for guidance; by default every row is
            NULL_LABEL. cond: None, or the condition images (n, C_cond, H, W) of an image-conditioned network;
            null_cond: their unconditional counterpart for guidance (default: zeros, as training drops them).
            sampler: "ddpm" with the default steps is the hand-written Alg. 2 over t = T-1..1;
            the others (and ddpm with fewer steps) use diffusers' schedulers built from these betas.
        known_image (n, c_in, H, W) and known_mask (n or 1, 1, H, W; 1 where known, 0 in the hole): RePaint
            inpainting (see the class docstring), with jump_length and jump_n_sample (1 and 1: no resampling) and
            reconstruction_guidance zeta (0: RePaint alone; each step then runs the network backward too);
            sampler "ddpm" only, over all T - 1 steps or, with `steps`, a chain of that many evenly spaced ones.
        generator or seed: make the noise reproducible. clip_x0: clip the predicted x_0 to [-1, 1] at every
            step (None: this Diffusion's clip_x0).
        callback: None, or callback(step_index, t, x_t, x0_pred), called once per network step, in order, with
            step_index 0..steps-1, the integer timestep t, the network's input x_t at t and the x_0 the sampler
            predicts from it (clipped when clip_x0). x_t is in the DDPM convention
            x_t = sqrt(alpha_hat_t) x_0 + sqrt(1 - alpha_hat_t) eps for every sampler: ddpm, ddim and dpm++ keep
            their state in it; euler_a keeps x_t / sqrt(alpha_hat_t) (x_0 + sigma_t eps), which its
            scale_model_input turns into x_t. x0_pred is the scheduler's pred_original_sample where it has one,
            else `predict_x0` of the network's output.
        """
        self._check_sample_args(model, n, labels, cfg_scale, sampler, cond)
        repaint = self._repaint_args(n, known_image, known_mask, jump_length, jump_n_sample, sampler, steps,
                                     reconstruction_guidance)
        if labels is not None and null_labels is None:
            null_labels = torch.full_like(labels, NULL_LABEL)
        if cond is not None and null_cond is None:
            null_cond = torch.zeros_like(cond)
        guide = {"labels": labels, "null_labels": null_labels, "cfg_scale": cfg_scale, "cond": cond,
                 "null_cond": null_cond}
        if generator is None and seed is not None:
            generator = torch.Generator(self.device).manual_seed(seed)
        shape = (n, self.c_in, self.image_size, self.image_size)
        x = torch.randn(shape, generator=generator, device=self.device)
        was_training = model.training
        model.eval()
        clip_x0 = self.clip_x0 if clip_x0 is None else clip_x0
        if repaint is not None or (sampler == "ddpm" and steps in (None, self.noise_steps - 1)):
            x = self._ddpm_loop(model, x, guide, generator, progress, clip_x0, callback, repaint)
        else:
            x = self._scheduler_loop(model, x, guide, sampler, steps, eta, generator, progress, clip_x0, callback)
        model.train(was_training)
        return x

    def _repaint_args(self, n, known_image, known_mask, jump_length, jump_n_sample, sampler, steps,
                      reconstruction_guidance=0.0):
        """None without known_image, else (known image, known mask, the levels of `repaint_levels`, zeta); checked."""
        if known_image is None and known_mask is None:
            if reconstruction_guidance:
                raise ValueError("reconstruction_guidance is a part of RePaint: pass known_image and known_mask too")
            return None
        if not reconstruction_guidance >= 0:
            raise ValueError(f"reconstruction_guidance {reconstruction_guidance} must be >= 0 (0: RePaint alone)")
        if known_image is None or known_mask is None:
            raise ValueError("RePaint needs both known_image and known_mask: pass the image and its mask")
        if sampler != "ddpm" or not (steps is None or 1 <= steps <= self.noise_steps - 1):
            raise ValueError(f"RePaint is written into DDPM Alg. 2: use sampler 'ddpm' with 1 to "
                             f"{self.noise_steps - 1} steps (None: all), not {sampler!r} with steps {steps}")
        if known_image.shape != (n, self.c_in, self.image_size, self.image_size):
            raise ValueError(f"known_image of shape {tuple(known_image.shape)}: RePaint of n={n} images takes "
                             f"({n}, {self.c_in}, {self.image_size}, {self.image_size})")
        if known_mask.dim() != 4 or known_mask.shape[1] != 1 or known_mask.shape[0] not in (1, n) or \
                known_mask.shape[2:] != known_image.shape[2:]:
            raise ValueError(f"known_mask of shape {tuple(known_mask.shape)}: use (n or 1, 1, H, W) with 1 where the "
                             "image is known, 0 in the hole")
        levels = self.repaint_levels(jump_length, jump_n_sample, steps)
        return (known_image.to(self.device), known_mask.to(self.device, known_image.dtype), levels,
                float(reconstruction_guidance))

    def spaced_timesteps(self, steps=None):
        """The timesteps of a chain of `steps` network steps (None: T - 1): steps + 1 timesteps from 0 to T - 1, evenly
        spaced; level k of the chain is timestep spaced_timesteps(steps)[k]. T - 1 steps is every timestep."""
        steps = self.noise_steps - 1 if steps is None else steps
        return [round(k * (self.noise_steps - 1) / steps) for k in range(steps + 1)]

    def repaint_levels(self, jump_length=1, jump_n_sample=1, steps=None):
        """The levels RePaint visits, from `steps` (None: T - 1; pure noise) to 0 (the result): RePaint's time schedule
        (Lugmayr et al. 2022, Sec. 4.2 and its code's get_schedule_jump) in this class's index convention. Level k is
        the timestep spaced_timesteps(steps)[k]: with all T - 1 steps, level k is timestep k.

        Each step down from level k to k-1 is one network step of Alg. 2; a step up is a draw of q(x_k | x_{k-1}).
        At the levels 1, 1 + jump_length, 1 + 2 jump_length, ... (below T - jump_length), reached going down, the
        path goes back up jump_length levels and down again, jump_n_sample - 1 times; it never goes up from level 0.
        jump_n_sample 1 is the plain T-1..0 of Alg. 2; the network runs about jump_n_sample times as often.
        """
        if jump_length < 1 or jump_n_sample < 1:
            raise ValueError(f"jump_length {jump_length} and jump_n_sample {jump_n_sample} must be >= 1 (1 and 1: "
                             "no resampling)")
        top = self.noise_steps - 1 if steps is None else steps
        jumps_left = {level: jump_n_sample - 1 for level in range(1, top - jump_length + 1, jump_length)}
        levels, level = [top], top
        while level > 0:
            level -= 1
            levels.append(level)
            if jumps_left.get(level, 0) > 0:
                jumps_left[level] -= 1
                for _ in range(jump_length):
                    level += 1
                    levels.append(level)
        return levels

    def _ddpm_loop(self, model, x, guide, generator, progress, clip_x0, callback=None, repaint=None):
        """DDPM Alg. 2, exactly as the reference runs it when clip_x0 is False; a v or x_0 output is turned into eps.

        guide: the conditioning keywords of `predict_eps`. repaint: None, or (known image x_0, known mask, levels,
        zeta): RePaint's known-region replacement and its jumps (see the class docstring and `repaint_levels`), over
        the chain of `spaced_timesteps(steps)` (steps: the top level, levels[0]), with reconstruction guidance zeta.
        """
        n = x.shape[0]
        known_x0, known_mask, levels, zeta = repaint or (None, None, list(range(self.noise_steps - 1, -1, -1)), 0.0)
        timesteps = self.spaced_timesteps(levels[0])  # level -> timestep; the identity with all T - 1 steps
        steps = tqdm(total=len(levels) - 1, desc="ddpm" if repaint is None else "repaint", leave=False,
                     disable=not progress)
        step_index = 0
        for i, level in zip(levels[:-1], levels[1:]):  # i: the level of x, `level` the next one
            steps.update()
            now, then = timesteps[i], timesteps[level]
            if level > i:  # RePaint's jump up: x_then ~ q(x_then | x_now) = N(sqrt(alpha) x_now, beta I)
                z = torch.randn(x.shape, generator=generator, device=self.device)
                alpha, beta = self.step_scales(then, now)
                x = alpha.sqrt() * x + beta.sqrt() * z
                continue
            t = torch.full((n,), now, dtype=torch.long, device=self.device)
            if zeta > 0:
                eps, gradient = self.reconstruction_gradient(model, x, t, known_x0, known_mask, guide)
            else:
                eps = self.predict_eps(model, x, t, **guide)
            if callback is not None:
                x0_pred = self.predict_x0(x, now, eps, "epsilon")
                callback(step_index, now, x, x0_pred.clamp(-1.0, 1.0) if clip_x0 else x0_pred)
            step_index += 1
            if i > 1:
                z = torch.randn(x.shape, generator=generator, device=self.device)
            else:
                z = torch.zeros_like(x)
            x = self.p_sample_step(x, now, eps, z, clip_x0, then)
            if repaint is not None:  # RePaint: the known pixels from q(x_then | x_0) of the given image
                if zeta > 0:
                    x = x - zeta * gradient
                known = known_x0
                if i > 1:
                    z = torch.randn(x.shape, generator=generator, device=self.device)
                    known, _ = self.noise_images(known_x0, torch.full_like(t, then), z)
                x = torch.lerp(x, known, known_mask)  # known_mask * known + (1 - known_mask) * x
        steps.close()
        return x

    def reconstruction_gradient(self, model, x_t, t, known_image, known_mask, guide):
        """(eps, gradient): the model's eps at x_t, and the gradient with respect to x_t of each image's distance
        || known_mask * (x0_pred(x_t) - known_image) ||_2, where x0_pred is `predict_x0` of the network's output: the
        step of reconstruction guidance (MCG / DPS, Chung et al. 2022), which backpropagates through the network."""
        with torch.enable_grad():
            x_t = x_t.detach().requires_grad_(True)
            output = self.predict(model, x_t, t, **guide)
            squared = (known_mask * (self.predict_x0(x_t, t, output) - known_image)).flatten(1).pow(2).sum(dim=1)
            (gradient,) = torch.autograd.grad(squared.sum(), x_t)  # of ||r||^2, one image's rows apart from another's
        distance = squared.detach().sqrt().clamp_min(1e-12)
        gradient = gradient / broadcast(2.0 * distance, gradient)  # d||r|| = d||r||^2 / (2 ||r||)
        return self.eps_from_output(x_t.detach(), t, output.detach()), gradient

    def make_scheduler(self, sampler, steps=None, clip_x0=False):
        """A diffusers scheduler for `sampler`, built from these betas, with `steps` network steps.

        "trailing" spacing starts at t = T-1 and never asks for t = 0, which training never drew. clip_x0 sets the
        scheduler's own clipping of its predicted x_0: clip_sample (ddpm, ddim), or thresholding with
        sample_max_value 1, which clamps the quantile s to 1 and so is the plain clip to [-1, 1] (dpm++).
        EulerAncestralDiscreteScheduler has no such option: `_scheduler_loop` clips its input instead. Each scheduler
        is told the network's prediction_type, except euler_a for "sample", which it lacks: it is given eps.
        """
        from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler

        common = dict(num_train_timesteps=self.noise_steps, trained_betas=self.beta.cpu().numpy(),
                      timestep_spacing="trailing", prediction_type=self.scheduler_prediction_type(sampler))
        if sampler == "ddpm":
            # "fixed_small" (the posterior variance) is 0 at the last strided step; "fixed_large" would add noise there.
            scheduler = DDPMScheduler(variance_type="fixed_small", clip_sample=clip_x0, clip_sample_range=1.0,
                                      **common)
        elif sampler == "ddim":
            scheduler = DDIMScheduler(clip_sample=clip_x0, clip_sample_range=1.0, **common)
        elif sampler in ("dpm++", "dpm++ode"):
            algorithm_type = "sde-dpmsolver++" if sampler == "dpm++" else "dpmsolver++"
            scheduler = DPMSolverMultistepScheduler(algorithm_type=algorithm_type, thresholding=clip_x0,
                                                    sample_max_value=1.0, **common)
        else:
            scheduler = EulerAncestralDiscreteScheduler(**common)
        steps = steps if steps is not None else DEFAULT_STEPS.get(sampler, self.noise_steps - 1)
        if not 1 <= steps < self.noise_steps:
            raise ValueError(f"steps {steps} is out of range: use 1..{self.noise_steps - 1}")
        scheduler.set_timesteps(steps, device=self.device)
        if len(scheduler.timesteps) != steps or scheduler.timesteps.min() < 1:
            # diffusers' trailing spacing rounds badly for a few step counts, and for counts >= 2T/3.
            raise ValueError(f"steps {steps}: trailing spacing gives {len(scheduler.timesteps)} timesteps down to "
                             f"t={int(scheduler.timesteps.min())}, outside 1..{self.noise_steps - 1}; use a "
                             f"neighbouring count, at most {2 * self.noise_steps // 3 - 1}")
        return scheduler

    def scheduler_prediction_type(self, sampler):
        """The prediction_type the scheduler of `sampler` is given: the network's, but eps for euler_a's x_0."""
        return "epsilon" if sampler == "euler_a" and self.prediction_type == "sample" else self.prediction_type

    def _scheduler_loop(self, model, x, guide, sampler, steps, eta, generator, progress, clip_x0, callback=None):
        scheduler = self.make_scheduler(sampler, steps, clip_x0)
        clip_input = clip_x0 and sampler == "euler_a"  # the one scheduler without an x_0 clipping option
        as_eps = self.scheduler_prediction_type(sampler) != self.prediction_type
        # DDIM needs its eps re-derived from the clipped x_0 (improved-diffusion's ddim_sample): a clipped x_0 beside
        # the raw eps is no point of q(x_t | x_0), and its samples go wrong.
        step_kwargs = {"eta": eta, "use_clipped_model_output": clip_x0} if sampler == "ddim" else {}
        x = x * scheduler.init_noise_sigma
        n = x.shape[0]
        for step_index, t in enumerate(tqdm(scheduler.timesteps, desc=sampler, leave=False, disable=not progress)):
            x_in = scheduler.scale_model_input(x, t)  # the DDPM x_t (euler_a's state is x_t / sqrt(alpha_hat_t))
            output = self.predict(model, x_in, t.expand(n), **guide)
            t_int = int(t)
            if clip_input:  # x_in is x_t in DDPM scale: replace the output by the one whose x_0 is clipped
                output = self.output_from_x0(x_in, t_int, self.predict_x0(x_in, t_int, output).clamp(-1.0, 1.0))
            out = scheduler.step(self.eps_from_output(x_in, t_int, output) if as_eps else output, t, x,
                                 generator=generator, **step_kwargs)
            if callback is not None:
                x0_pred = getattr(out, "pred_original_sample", None)
                if x0_pred is None:
                    x0_pred = self.predict_x0(x_in, t_int, output)
                    x0_pred = x0_pred.clamp(-1.0, 1.0) if clip_x0 else x0_pred
                callback(step_index, t_int, x_in, x0_pred)
            x = out.prev_sample
        return x


def call_model(model, x_t, t, labels=None, cond=None):
    """model(x_t, t), with the labels and the condition image where given: model(x_t, t[, labels][, cond=cond])."""
    args = (x_t, t) if labels is None else (x_t, t, labels)
    return model(*args) if cond is None else model(*args, cond=cond)


def stack_pair(conditional, unconditional):
    """The conditioning of a guided batch of 2B rows, the conditional rows first; None for None."""
    return None if conditional is None else torch.cat([conditional, unconditional])


def dropped_rows(n, p_uncond, device=None):
    """The rows (n,) of a training batch whose condition is dropped, each with probability p_uncond: the null
    condition (NULL_LABEL, the empty prompt, a zero image) teaches the same network the unconditional prediction
    that guidance needs (CFG training, Ho & Salimans 2022, Alg. 1)."""
    return torch.rand(n, device=device) < p_uncond
