"""Diffusers models (Stable Diffusion, latent and pixel DDPMs) as EDM-form denoisers.

A discrete-time DDPM is trained at T noise levels j = 0 .. T - 1 with z_j = sqrt(abar_j) x0 +
sqrt(1 - abar_j) eps. Dividing by sqrt(abar_j) gives this project's form (SFD paper Eq. 2-4):

    x = z / sqrt(abar),   sigma = sqrt((1 - abar) / abar),   x = x0 + sigma eps,

so the same network is a denoiser D(x, sigma) that every solver of solvers.py integrates. `wrap`
turns a diffusers UNet (UNet2DConditionModel for text, UNet2DModel for pixels; epsilon-, v- or
sample-prediction) and its scheduler's `alphas_cumprod` into such a `Denoiser` (the protocol of
models.py); the VAE, the CLIP text encoder and the tokenizer travel with it (decode latents to
images, prompts to embeddings), and `guided` is classifier-free guidance (SFD Eq. 9 with omega =
1 + Meng's w). Reading a hub id or a saved pipeline, and the folder format of distilled students,
are hub.py's; prompts, captioned training images and the CLIP score are captions.py's.
diffusers and transformers are an optional extra (`pip install -r requirements-latent.txt`); this
module imports without them.

Parity: with diffusers' grid `discrete_grid(n)`, the start x = sqrt(1 + t_max^2) z and the last
step to 0, `solvers.sample(..., 'dpmpp2m')` is diffusers' DPMSolverMultistepScheduler loop and
'euler' over `discrete_grid(n, 'leading', 'sigma_min')` is its DDIMScheduler loop
(tests/test_latent.py).

Students (distill.py, guided_pd.py): SFD-v's step N or Meng's w enters through the UNet's
`time_cond_proj_dim` projection, zero-initialised (an exact no-op), and SFD's latent students
use `schedule(n, t_min, t_max, UNIFORM)`, uniform in the UNet's timestep (SFD App. D.2).

    python latent.py              # SD v1.5's noise levels and its default DPM-Solver++(2M) grid
"""

import contextlib
import math
import sys

import numpy as np
import torch

EXTRA = 'pip install -r requirements-latent.txt'
SPACINGS = ('linspace', 'leading', 'trailing')
PREDICTIONS = ('epsilon', 'v_prediction', 'sample')


class MissingExtra(ImportError, ValueError):
    """An optional package is not installed. Also a ValueError, so a CLI ends with one `error:` line."""


def _require():
    """Import the optional extra, or raise one error naming the requirements file."""
    try:
        import diffusers
        import transformers
    except ImportError as e:
        raise MissingExtra(f'diffusers models need the optional extra: {EXTRA} ({e})') from None
    return diffusers, transformers


# ---------------------------------------------------------------------------------------------
# The discrete noise levels in EDM sigma, and the continuous sigma <-> timestep map
# ---------------------------------------------------------------------------------------------

def scaled_linear_alphas_cumprod(beta_start=0.00085, beta_end=0.012, T=1000):
    """Stable Diffusion's schedule abar_j in float32, as diffusers computes "scaled_linear".

    beta_j = (sqrt(beta_start) + j / (T - 1) (sqrt(beta_end) - sqrt(beta_start)))^2 (LDM's
    "linear"), abar_j = prod_{i <= j} (1 - beta_i).
    """
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float32) ** 2
    return torch.cumprod(1 - betas, dim=0)


def sigmas_from_alphas_cumprod(alphas_cumprod):
    """The noise levels sigma_j = sqrt((1 - abar_j) / abar_j), increasing, as a float64 CPU tensor.

    Evaluated in the dtype of `alphas_cumprod` (float32 for diffusers' schedulers), exactly as
    diffusers computes its own `sigmas`, then held in float64: a solver fed these levels asks the
    UNet for exactly the integer timesteps a diffusers loop uses.
    """
    abar = torch.as_tensor(alphas_cumprod).detach().cpu()
    sigmas = (((1 - abar) / abar) ** 0.5).to(torch.float64)
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f'alphas_cumprod must be a 1-D table of 2 or more levels, got {list(abar.shape)}')
    if not (torch.isfinite(sigmas).all() and sigmas[0] > 0 and (sigmas[1:] > sigmas[:-1]).all()):
        raise ValueError('alphas_cumprod must decrease strictly inside (0, 1): zero terminal SNR '
                         '(sigma = inf at the last level) has no EDM form')
    return sigmas


def _check_range(sigma, sigmas):
    """One clear error for noise levels outside the trained range [sigma_0, sigma_{T-1}]."""
    if torch.compiler.is_compiling():
        return  # a data-dependent check would break the graph; the eager run already checked
    lo, hi = float(sigmas[0]), float(sigmas[-1])
    bad = ~((sigma >= lo) & (sigma <= hi))  # also catches NaN
    if bad.any():
        v = float(sigma[bad].flatten()[0])
        raise ValueError(f'sigma = {v:g} is outside this model\'s trained noise levels [{lo:g}, {hi:g}]: '
                         f'use t_min >= {lo:g} (a schedule may still end at 0) and t_max <= {hi:g}')


# Which map. Both candidates are exact at the T trained levels, where every diffusers scheduler
# evaluates the UNet, and differ by at most 0.09 of a timestep between them (near sigma_0; ~1e-3
# above sigma = 0.5): the official SFD code interpolates log alpha = -log(1 + sigma^2) / 2 piecewise
# linearly (DPM-Solver's discrete NoiseScheduleVP), k-diffusion interpolates log sigma. We take log
# sigma: it is -lambda, the variable the solvers step in (half the log-SNR), its inverse is the same
# interpolation read backwards, diffusers itself uses it for off-grid levels (Karras sigmas), and
# it needs no extrapolation -- levels outside the trained range are refused, not extrapolated as
# the SFD code does (its LSUN recipe asks for sigma = 0.006 < sigma_0 = 0.039).

def timestep_from_sigma(sigma, sigmas):
    """The UNet timestep tau(sigma): piecewise-linear in log sigma between the discrete levels.

    tau = j + (log sigma - log sigma_j) / (log sigma_{j+1} - log sigma_j) for sigma_j <= sigma <=
    sigma_{j+1} (k-diffusion's DiscreteEpsDDPMDenoiser, diffusers' `_sigma_to_t`). Exact at the
    levels (tau(sigma_j) = j bit for bit), strictly increasing and continuous between them;
    outside [sigma_0, sigma_{T-1}] a ValueError. Returns float64 with the shape of `sigma`.
    """
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    knots = sigmas.to(device=sigma.device, dtype=torch.float64)
    _check_range(sigma, knots)
    s = sigma.reshape(-1).contiguous()
    # The segment [sigma_j, sigma_{j+1}] holding s; the top level uses the last segment (fraction 1).
    j = (torch.searchsorted(knots, s, right=True) - 1).clamp(0, len(knots) - 2)
    lo, hi = knots[j].log(), knots[j + 1].log()
    return (j.to(torch.float64) + (s.log() - lo) / (hi - lo)).reshape(sigma.shape)


def sigma_from_timestep(t, sigmas):
    """The inverse map sigma(tau): log sigma interpolated linearly in tau; sigma(j) = sigma_j exactly."""
    t = torch.as_tensor(t, dtype=torch.float64)
    knots = sigmas.to(device=t.device, dtype=torch.float64)
    if not ((t >= 0) & (t <= len(knots) - 1)).all():
        raise ValueError(f'timesteps must lie in [0, {len(knots) - 1}]')
    j = t.floor().long().clamp(0, len(knots) - 2)
    f = t - j
    out = torch.lerp(knots[j].log(), knots[j + 1].log(), f).exp()
    return torch.where(f == 0, knots[j], torch.where(f == 1, knots[j + 1], out))


def discrete_timesteps(n, T=1000, spacing='linspace', steps_offset=0):
    """n decreasing integer timesteps, spaced as diffusers' schedulers space them (Lin et al. 2024, Table 2).

    linspace  DPMSolverMultistepScheduler's: round(linspace(0, T - 1, n + 1)) reversed, without the 0
              (N = 4: 999, 749, 500, 250).
    leading   DDIMScheduler's and PNDM's: (n - 1 - i) (T // n) + steps_offset (SD's offset 1, N = 4:
              751, 501, 251, 1).
    trailing  both: round(T, T - T/n, ...) - 1 (N = 4: 999, 749, 499, 249).
    """
    if int(n) != n or not 1 <= n <= T:
        raise ValueError(f'need 1 <= steps <= {T}, got {n}')
    n = int(n)
    if spacing == 'linspace':
        t = np.linspace(0, T - 1, n + 1).round()[::-1][:-1]
    elif spacing == 'leading':
        t = (np.arange(0, n) * (T // n)).round()[::-1] + steps_offset
    elif spacing == 'trailing':
        t = np.round(np.arange(T, 0, -T / n)) - 1
    else:
        raise ValueError(f'unknown timestep spacing {spacing!r}; choose one of {SPACINGS}')
    t = [int(v) for v in t]
    if any(a <= b for a, b in zip(t, t[1:], strict=False)) or t[0] > T - 1 or t[-1] < 0:
        raise ValueError(f'{n} steps with {spacing!r} spacing give no strictly decreasing timesteps '
                         f'in [0, {T - 1}]')
    return t


def discrete_schedule(sigmas, timesteps, final='zero'):
    """t_steps for solvers.py: sigma at the given integer timesteps, then the level the last step reaches.

    final='zero': sigma = 0, the last step lands on D (DPMSolverMultistepScheduler's default
    final_sigmas_type). final='sigma_min': sigma_0, where DDIMScheduler stops when
    set_alpha_to_one=False (SD's config); decode the result with sigma=sigma_0.
    """
    if final not in ('zero', 'sigma_min'):
        raise ValueError(f"final must be 'zero' or 'sigma_min', got {final!r}")
    last = sigmas.new_zeros(1) if final == 'zero' else sigmas[:1]
    return torch.cat([sigmas[torch.as_tensor(list(timesteps))], last])


UNIFORM = 'discrete_uniform'  # the grid kind of `uniform_schedule` (`Denoiser.schedule`) in recipes


def uniform_schedule(n, t_min, t_max, sigmas, rho=1.0):
    """n + 1 noise levels from t_max to t_min, uniform in the model's timestep tau (rho = 1).

    SFD's "linear schedule" for latent models (App. D.2; sfd-main's 'discrete' schedule with rho
    = 1, which the public SD/LDM commands use): tau_i = (tau_max^(1/rho) + u (tau_min^(1/rho) -
    tau_max^(1/rho)))^rho with u = i / n, sigma_i = sigma(tau_i). A fixed function of u, so the grid
    refined K times holds it exactly (SFD Alg. 4's teacher grid). float64, the ends exact.
    """
    if int(n) != n or n < 1:
        raise ValueError(f'a schedule needs n >= 1 steps, got {n}')
    lo, hi = timestep_from_sigma(torch.tensor([t_min, t_max], dtype=torch.float64), sigmas)
    u = torch.arange(int(n) + 1, dtype=torch.float64) / int(n)
    tau = (hi ** (1 / rho) + u * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    t = sigma_from_timestep(tau.clamp(0, len(sigmas) - 1), sigmas)
    t[0], t[-1] = t_max, t_min
    return t


def init_scale(t_max):
    """diffusers' start: latents z ~ N(0, I) at abar_T are x = z / sqrt(abar) = sqrt(1 + t_max^2) z
    (the solvers' own convention is t_max z, 0.23 % smaller at SD's t_max = 14.61)."""
    return math.sqrt(1 + float(t_max) ** 2)


# ---------------------------------------------------------------------------------------------
# The pieces around the UNet call: the extra condition, the D form of the output, prompts, VAE
# ---------------------------------------------------------------------------------------------

COND_DIM = 256  # sinusoid channels fed to cond_proj (diffusers' LCM script's default)


def condition_embedding(kind, value, B, dim, device='cpu'):
    """The float32 sinusoids [B, dim] of a scalar condition (a number or [B]):
        step      the UNet's own timestep features of N: [cos, sin](N f_k), f_k = 10000^(-k / (dim/2))
                  (diffusers' get_timestep_embedding with flip_sin_to_cos; sfd-main's nfe embedding)
        guidance  StableDiffusionPipeline's embedding of w = guidance_scale - 1 (Meng's w): [sin, cos]
                  (1000 w f_k), f_k = 10000^(-k / (dim/2 - 1)), so diffusers' own pipeline samples a
                  w-conditioned student with one UNet call per step."""
    v = torch.as_tensor(value, dtype=torch.float32, device=device).reshape(-1).expand(B)
    half = dim // 2
    k = torch.arange(half, dtype=torch.float32, device=device)
    if kind == 'step':
        a = v[:, None] * torch.exp(-math.log(10000) * k / half)[None]
        e = torch.cat([a.cos(), a.sin()], dim=1)
    elif kind == 'guidance':
        f = torch.exp(k * -(torch.log(torch.tensor(10000.0)) / (half - 1)).to(device))
        a = (v * 1000.0)[:, None] * f[None]
        e = torch.cat([a.sin(), a.cos()], dim=1)
    else:
        raise ValueError(f"unknown condition {kind!r}: 'step' or 'guidance'")
    return torch.nn.functional.pad(e, (0, dim % 2))


def add_condition_projection(unet, dim):
    """Give a UNet2DConditionModel diffusers' `time_cond_proj_dim` projection, zeroed.

    cond_proj (dim -> the 320 sinusoid channels for SD) adds its output to the sinusoidal timestep
    features before the time MLP, so every block sees the condition the way it sees the time step
    (SFD App. D.1; as diffusers' LCM script embeds w, which leaves it randomly initialised). A zero
    weight adds an exact 0: the student starts as the teacher bit for bit, and the weight still
    gets a gradient.
    """
    emb = unet.time_embedding
    p = emb.linear_1.weight
    emb.cond_proj = torch.nn.Linear(dim, emb.linear_1.in_features, bias=False).to(p)
    torch.nn.init.zeros_(emb.cond_proj.weight)
    unet.register_to_config(time_cond_proj_dim=dim)  # so save_pretrained / from_pretrained keep it


def denoised(x, sigma, out, prediction_type):
    """D(x; sigma) from the UNet's output at z = c_in x, c_in = 1 / sqrt(1 + sigma^2) (sfd
    networks_edm.py, k-diffusion external.py; EDM with sigma_data = 1 for v). sigma: [B, 1, ...]."""
    if prediction_type == 'epsilon':  # x = x0 + sigma eps
        return x - sigma * out
    if prediction_type == 'v_prediction':  # v = alpha eps - sigma_vp x0, sigma_vp = sigma alpha
        return x / (1 + sigma ** 2) - sigma * (1 / (1 + sigma ** 2).sqrt()) * out
    return out  # 'sample': the output is x0


def encode_text(tokenizer, text_encoder, prompts):
    """CLIP embeddings [len(prompts), L, D] of the tokenizer's padded ids (L = model_max_length,
    77 for SD; longer prompts are truncated), exactly as StableDiffusionPipeline.encode_prompt
    computes them; [""] gives the unconditional branch. On the text encoder's device."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError('prompts must be a non-empty list of strings')
    L = tokenizer.model_max_length
    if not 0 < L < 100_000:
        raise ValueError(f'the tokenizer has no usable model_max_length ({L}): set it (77 for CLIP)')
    ids = tokenizer(prompts, padding='max_length', max_length=L, truncation=True, return_tensors='pt')
    device = next(text_encoder.parameters()).device
    use_mask = getattr(text_encoder.config, 'use_attention_mask', False)
    mask = ids.attention_mask.to(device) if use_mask else None
    with torch.no_grad():
        return text_encoder(ids.input_ids.to(device), attention_mask=mask)[0]


def _vae_scale(vae):
    """(scaling_factor, shift_factor) of a VAE: latent = (vae latent - shift) * scale."""
    cfg = vae.config
    return float(cfg.get('scaling_factor', 1.0)), float(cfg.get('shift_factor', None) or 0.0)


def vae_encode(vae, images, generator=None, sample=True):
    """Latents of images [B, 3, H, W] in [-1, 1]: a draw from the VAE posterior (its mean with
    sample=False), shifted and multiplied by the scaling factor (0.18215 for SD)."""
    p = next(vae.parameters())
    out = vae.encode(images.to(device=p.device, dtype=p.dtype))
    if hasattr(out, 'latent_dist'):
        h = out.latent_dist.sample(generator) if sample else out.latent_dist.mode()
    else:
        h = out.latents  # VQModel: deterministic
    scale, shift = _vae_scale(vae)
    return ((h - shift) * scale).to(device=images.device, dtype=images.dtype)


def vae_decode(vae, z, batch=8):
    """Images [B, 3, H, W], about [-1, 1] (unclamped), of latents z: the VAE decodes z / scale + shift,
    `batch` latents at a time."""
    p = next(vae.parameters())
    scale, shift = _vae_scale(vae)
    out = [vae.decode((c / scale + shift).to(device=p.device, dtype=p.dtype)).sample for c in z.split(batch)]
    return torch.cat(out).to(device=z.device, dtype=z.dtype)


def _check_unet(config, prediction_type):
    """One clear error for a UNet or prediction type with no EDM form here."""
    if prediction_type not in PREDICTIONS:
        raise ValueError(f'unknown prediction_type {prediction_type!r}; choose one of {PREDICTIONS}')
    for key in 'addition_embed_type', 'class_embed_type', 'num_class_embeds':
        if config.get(key) is not None:
            raise ValueError(f'UNets with {key}={config.get(key)!r} (extra conditions such as SDXL\'s or '
                             'class labels) are not supported: use a plain text or unconditional UNet')
    if config.get('time_embedding_type', 'positional') != 'positional':
        raise ValueError('this UNet embeds a continuous noise level (score-SDE style), not a timestep')


class _Parts:
    """The frozen parts around the UNet (VAE, text encoder, tokenizer). Kept out of the module tree,
    so parameters(), state_dict(), optimisers and DDP see the UNet only; a deepcopy (a student made
    from the teacher) shares them."""

    def __init__(self, **parts):
        self.__dict__.update(parts)

    def __deepcopy__(self, memo):
        return self

    def modules(self):
        return [m for m in self.__dict__.values() if isinstance(m, torch.nn.Module)]


def _batch(t, B, what):
    """A [1, ...] or [B, ...] tensor as [B, ...] (one prompt for the whole batch broadcasts)."""
    if t.shape[0] == B:
        return t
    if t.shape[0] == 1:
        return t.expand(B, *t.shape[1:])
    raise ValueError(f'{what} has batch {t.shape[0]}, the samples {B}: give one row or one per sample')


# ---------------------------------------------------------------------------------------------
# The denoiser
# ---------------------------------------------------------------------------------------------

class Denoiser(torch.nn.Module):
    """A diffusers UNet as D(x, sigma), the denoiser protocol of models.py; build with `wrap` or hub.load.

    x = z / sqrt(abar), sigma = sqrt((1 - abar) / abar). The UNet sees z = c_in x, c_in =
    1 / sqrt(1 + sigma^2), at the timestep tau(sigma) of `timestep_from_sigma`, and its output
    becomes D (`denoised`):
        epsilon        D = x - sigma eps                        (c_skip = 1, c_out = -sigma)
        v_prediction   D = x / (1 + sigma^2) - sigma c_in v     (x0 = alpha z - sigma_vp v)
        sample         D = the output
    A student (`enable_step_condition`, `enable_guidance_condition`) also takes SFD-v's step= or
    Meng's guidance= through the UNet's `time_cond_proj_dim` projection.
    """
    label_dim = 0     # no class labels: a text UNet is conditioned through encoder_hidden_states
    sigma_data = 1.0  # EDM's sigma_data of this form (v-prediction = EDM with 1); latents have unit scale

    def __init__(self, unet, alphas_cumprod, prediction_type='epsilon', steps_offset=0, vae=None,
                 text_encoder=None, tokenizer=None, use_fp16=False, scheduler=None):
        super().__init__()
        config = unet.config
        _check_unet(config, prediction_type)
        self.unet = unet
        self.sigmas = sigmas_from_alphas_cumprod(alphas_cumprod)  # [T] increasing, float64, CPU
        self.alphas_cumprod = torch.as_tensor(alphas_cumprod).detach().cpu().to(torch.float64)
        self.sigma_min, self.sigma_max = float(self.sigmas[0]), float(self.sigmas[-1])
        self.prediction_type, self.steps_offset = prediction_type, int(steps_offset)
        self.use_fp16 = use_fp16  # as EDMPrecond: bf16 autocast for the UNet call on CUDA
        self.text = 'cross_attention_dim' in config  # UNet2DConditionModel takes encoder_hidden_states
        size = config['sample_size']
        size = [size, size] if isinstance(size, int) else list(size)
        self.shape = [config['in_channels'], *size]  # [C, H, W] of x (latents, or pixels without a VAE)
        self.img_channels, self.img_resolution = config['in_channels'], size[0]
        if self.text and (text_encoder is None) != (tokenizer is None):
            raise ValueError('give both text_encoder and tokenizer, or neither')
        for m in (vae, text_encoder):
            if m is not None:
                m.eval().requires_grad_(False)
        self._parts = _Parts(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
        self._knots = {}  # device -> sigmas there (searched on every call)
        # A UNet with a cond_proj is read as StableDiffusionPipeline reads it: an input for Meng's w.
        self.condition = 'guidance' if config.get('time_cond_proj_dim') else None
        self.prior = 'vp'  # from sqrt(1 + t_max^2) z, decode the VP latent (diffusers); 'edm': t_max z, x
        self.base = None   # the pipeline spec the VAE, text encoder and tokenizer come from (hub.load)

    vae = property(lambda self: self._parts.vae)
    text_encoder = property(lambda self: self._parts.text_encoder)
    tokenizer = property(lambda self: self._parts.tokenizer)
    T = property(lambda self: len(self.sigmas))
    use_step_condition = property(lambda self: self.condition == 'step')
    use_guidance_condition = property(lambda self: self.condition == 'guidance')

    def _apply(self, fn, *args, **kwargs):
        # .to(device), .double(), ... move the frozen parts along with the UNet.
        for m in self._parts.modules():
            m._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)

    # --- noise levels: sigma -> timestep, this model's grids ------------------------------

    def timestep(self, sigma):
        """tau(sigma) of `timestep_from_sigma` on this model's levels (float64)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        if sigma.device not in self._knots:
            self._knots[sigma.device] = self.sigmas.to(sigma.device)
        return timestep_from_sigma(sigma, self._knots[sigma.device])

    def discrete_grid(self, n, spacing='linspace', final='zero'):
        """Diffusers' n-step grid for this model as t_steps (float64), see `discrete_timesteps`.

        Default: DPMSolverMultistepScheduler's (linspace, ending at 0), the grid of `recipe`;
        DDIMScheduler with SD's config is spacing='leading', final='sigma_min'.
        """
        timesteps = discrete_timesteps(n, self.T, spacing, self.steps_offset)
        return discrete_schedule(self.sigmas, timesteps, final)

    def schedule(self, n, t_min, t_max, kind=UNIFORM, rho=1.0):
        """The protocol's grid of a kind of this model's own: n + 1 levels t_max .. t_min (float64).
        UNIFORM (the only one): `uniform_schedule`, SFD's schedule for latent students."""
        if kind != UNIFORM:
            raise ValueError(f'unknown schedule {kind!r} for a diffusers model: its own kind is {UNIFORM!r} '
                             '(the others are solvers.time_schedule\'s)')
        return uniform_schedule(n, t_min, t_max, self.sigmas, rho)

    def recipe(self, nfe=25):
        """The default sampling recipe as a plain dict: DPM-Solver++(2M) on `discrete_grid(nfe)`, as
        diffusers' DPMSolverMultistepScheduler samples SD (one call per step; the step to 0 is D).
        'schedule': 'discrete' means "this model's grid": the explicit `t_steps`, or `discrete_grid(n)`."""
        t = self.discrete_grid(nfe)
        return dict(solver='dpmpp2m', nfe=int(nfe), afs=False, schedule='discrete', rho=1.0,
                    t_min=self.sigma_min, t_max=self.sigma_max, ends_at_zero=True, t_steps=t.tolist())

    def check_levels(self, t_min, t_max):
        """t_max (0: sigma_max) of a training grid [t_min, t_max], checked against the trained levels."""
        t_max = t_max or self.sigma_max
        if not self.sigma_min <= t_min < t_max <= self.sigma_max * (1 + 1e-12):
            raise ValueError(f'--t-min {t_min:g} / --t-max {t_max:g}: this model knows the noise levels '
                             f'[{self.sigma_min:g}, {self.sigma_max:g}] only (--t-max 0: its sigma_max)')
        return t_max

    # --- students: one extra scalar condition (SFD-v's step N, or Meng's w) -----------------

    def enable_step_condition(self, dim=COND_DIM):
        """SFD-v (Alg. 6): the student is told its step count N, an exact no-op at initialisation."""
        return self._enable('step', dim)

    def enable_guidance_condition(self, dim=COND_DIM):
        """Meng Sec. 3.1: the stage-one student takes w, an exact no-op at initialisation."""
        return self._enable('guidance', dim)

    def _enable(self, kind, dim):
        """Take `kind`= through `add_condition_projection`; the UNet has room for one such condition."""
        if self.condition == kind:
            return self
        if self.condition is not None:
            raise ValueError(f'this model already takes {self.condition}= through its one time_cond_proj_dim '
                             f'projection: it cannot take {kind}= as well')
        if not hasattr(getattr(self.unet, 'time_embedding', None), 'cond_proj') or not self.text:
            raise ValueError(f'{kind}= needs a UNet2DConditionModel (its time_cond_proj_dim); '
                             f'{type(self.unet).__name__} has none')
        add_condition_projection(self.unet, dim)
        self.condition = kind
        return self

    # --- D(x; sigma) --------------------------------------------------------------------------

    def _check_inputs(self, x, encoder_hidden_states, class_labels, step, guidance):
        """One clear error for a condition this model does not take, or a missing prompt embedding."""
        for name, value in ('class_labels', class_labels), ('step', step), ('guidance', guidance):
            if value is not None and name != self.condition:
                raise ValueError(f'{name}= is not a condition of this diffusers model')
        if self.text and encoder_hidden_states is None:
            raise ValueError('this UNet is text-conditioned: pass encoder_hidden_states= (net.encode_prompts'
                             '([...]); the empty prompt [""] is the unconditional branch)')
        if not self.text and encoder_hidden_states is not None:
            raise ValueError('this UNet is not text-conditioned: it takes no encoder_hidden_states')
        if x.ndim != 4 or x.shape[1] != self.shape[0]:
            raise ValueError(f'this model takes x [B, {self.shape[0]}, H, W], got {list(x.shape)}')

    def _unet_conditions(self, B, device, dtype, encoder_hidden_states, value):
        """The UNet's keyword inputs: the prompt embeddings, and SFD-v's N or Meng's w as sinusoids
        into the zero-initialised cond_proj (`timestep_cond`)."""
        kwargs = {}
        if self.text:
            h = _batch(encoder_hidden_states, B, 'encoder_hidden_states')
            kwargs['encoder_hidden_states'] = h.to(dtype)
        if value is not None:
            dim = self.unet.config['time_cond_proj_dim']
            kwargs['timestep_cond'] = condition_embedding(self.condition, value, B, dim, device).to(dtype)
        return kwargs

    def forward(self, x, sigma, encoder_hidden_states=None, class_labels=None, step=None, guidance=None,
                force_fp32=False):
        """D(x; sigma). x [B, C, H, W]; sigma a float or [B] in [sigma_min, sigma_max];
        encoder_hidden_states [B or 1, L, D] (text UNets only: `encode_prompts`, the empty prompt
        for the unconditional branch). Float64 arithmetic for float64 x, else float32; the UNet in
        its own dtype (bf16 autocast on CUDA with use_fp16)."""
        self._check_inputs(x, encoder_hidden_states, class_labels, step, guidance)
        B = x.shape[0]
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        x = x.to(dtype)
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1).expand(B)
        # VP <-> EDM (SFD Eq. 2-4): the UNet's input is the VP latent z = alpha x, with
        # alpha = 1 / sqrt(1 + sigma^2), at the (fractional) timestep of that level.
        tau = self.timestep(sigma)
        s = sigma.to(dtype).reshape(B, 1, 1, 1)
        c_in = 1 / (1 + s ** 2).sqrt()
        mdtype = next(self.unet.parameters()).dtype
        kwargs = self._unet_conditions(B, x.device, mdtype, encoder_hidden_states,
                                       step if self.condition == 'step' else guidance)
        amp = contextlib.nullcontext()
        if x.device.type == 'cuda' and self.use_fp16 and not force_fp32:
            amp = torch.autocast('cuda', torch.bfloat16)
        # diffusers embeds timesteps in float32 whatever it is given; integral tau stays exact.
        with amp:
            out = self.unet((c_in * x).to(mdtype), tau.to(torch.float32), return_dict=False, **kwargs)[0]
        out = out[:, :self.shape[0]].to(dtype)  # learned-variance UNets append the variance channels
        return denoised(x, s, out, self.prediction_type)

    # --- prompts -> embeddings; the VAE: images in [-1, 1] <-> latents ------------------------

    def encode_prompts(self, prompts):
        """`encode_text`'s CLIP embeddings [len(prompts), L, D] of prompts, on the UNet's device."""
        if not self.text or self.text_encoder is None:
            raise ValueError('this model has no text encoder: it takes no prompts' if not self.text else
                             'this text UNet was wrapped without text_encoder= and tokenizer=')
        h = encode_text(self.tokenizer, self.text_encoder, prompts)
        return h.to(next(self.unet.parameters()).device)

    @property
    def image_shape(self):
        """[C, H, W] of the decoded images (the VAE up-samples 2^(levels - 1) times), or x's shape."""
        if self.vae is None:
            return list(self.shape)
        cfg = self.vae.config
        f = 2 ** (len(cfg.block_out_channels) - 1)
        return [cfg.out_channels, self.shape[1] * f, self.shape[2] * f]

    def encode(self, images, generator=None, sample=True):
        """The data x0 of images [B, 3, H, W] in [-1, 1]: `vae_encode`'s latents, or the images
        themselves for a pixel-space model."""
        return images if self.vae is None else vae_encode(self.vae, images, generator, sample)

    def decode(self, x, sigma=0.0, batch=8):
        """Images [B, 3, H, W], about [-1, 1] (unclamped), of a final state x at noise level sigma.

        The VP latent is z = x / sqrt(1 + sigma^2) (= x when the schedule ends at 0; DDIM stops at
        sigma_0); `vae_decode` turns it into images, `batch` latents at a time.
        """
        z = x / math.sqrt(1 + float(sigma) ** 2)
        return z if self.vae is None else vae_decode(self.vae, z, batch)


def wrap(unet, scheduler, prediction_type=None, vae=None, text_encoder=None, tokenizer=None, use_fp16=False):
    """A diffusers UNet and its (DDPM-family) scheduler as a `Denoiser`.

    The levels come from `scheduler.alphas_cumprod`; the prediction type from its config unless
    given; steps_offset (for 'leading' grids) from its config. Optional frozen parts: the VAE
    (latent models), the text encoder and tokenizer (text models).
    """
    if getattr(scheduler, 'alphas_cumprod', None) is None:
        raise ValueError(f'{type(scheduler).__name__} has no alphas_cumprod: only discrete-time DDPM '
                         'schedulers (DDPM, DDIM, PNDM, DPM-Solver, Euler, ...) have an EDM form here')
    config = getattr(scheduler, 'config', {})
    prediction_type = prediction_type or config.get('prediction_type', 'epsilon')
    return Denoiser(unet, scheduler.alphas_cumprod, prediction_type, config.get('steps_offset', 0), vae,
                    text_encoder, tokenizer, use_fp16, scheduler)


def guided(denoiser, w, uncond):
    """Classifier-free guidance of a text denoiser (SFD Eq. 9; Meng Sec. 2), omega = 1 + w:

        D_w(x, sigma, c) = D(x, sigma, u) + omega (D(x, sigma, c) - D(x, sigma, u)),

    the D-form of eps_u + omega (eps_c - eps_u) (D is affine in eps at fixed x, sigma). `w` is
    Meng's w (a number or [B]), `uncond` the empty prompt's embedding [1 or B, L, D]. Both
    branches run as one UNet call on 2B samples, as StableDiffusionPipeline does: 2 NFE per
    evaluation; a plain w = 0 (omega = 1) runs the conditional branch only (1 NFE), as sfd-main.
    """
    if uncond is None:
        raise ValueError('classifier-free guidance needs the unconditional embedding (encode_prompts([""]))')

    def D_w(x, sigma, encoder_hidden_states=None, **cond):
        if not torch.is_tensor(w) and w == 0:
            return denoiser(x, sigma, encoder_hidden_states=encoder_hidden_states, **cond)
        if encoder_hidden_states is None:
            raise ValueError('guided sampling needs the prompts\' encoder_hidden_states=')
        B = x.shape[0]
        c = _batch(encoder_hidden_states, B, 'encoder_hidden_states')
        u = _batch(uncond, B, 'the unconditional embedding').to(c)
        s = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1).expand(B)
        cond2 = {k: torch.cat([v, v]) if torch.is_tensor(v) and v.ndim and len(v) == B else v
                 for k, v in cond.items()}
        D_u, D_c = denoiser(torch.cat([x, x]), torch.cat([s, s]), encoder_hidden_states=torch.cat([u, c]),
                            **cond2).chunk(2)
        omega = 1 + (w.to(x).reshape(-1, *[1] * (x.ndim - 1)) if torch.is_tensor(w) else w)
        return D_u + omega * (D_c - D_u)
    return D_w


def main(argv=None):
    """`python latent.py`: SD v1.5's noise levels and default grids (no download). With a model spec,
    hub.py's `python hub.py SPEC` (load it, print its metadata)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv:
        import hub  # the loader sits a layer above this file
        return hub.main(argv)
    sig = sigmas_from_alphas_cumprod(scaled_linear_alphas_cumprod())
    print('SD v1.5 (scaled_linear 0.00085 -> 0.012, T = 1000) in EDM sigma:')
    print('  ' + '  '.join(f'sigma_{j} = {float(sig[j]):.6g}' for j in (0, 1, 99, 499, 999)))
    for n in (4, 8, 25):
        t = discrete_schedule(sig, discrete_timesteps(n))
        print(f'  DPM-Solver++(2M) {n} steps: timesteps {discrete_timesteps(n)}\n    t_steps '
              + ', '.join(f'{float(v):.4g}' for v in t))


if __name__ == '__main__':
    import cli
    cli.run(main)
