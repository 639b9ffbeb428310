"""Tests for latent.py and hub.py: diffusers UNets as EDM-form denoisers, at parity with diffusers' loops.

Everything is built from config (tiny random UNets, VAE, CLIP text encoder, a 54-token tokenizer)
in float64; nothing is downloaded. The parity statement these tests prove:
    solvers.sample(latent.wrap(unet, scheduler) [+ latent.guided], x = sqrt(1 + t_0^2) z_T, t_steps, s)
equals diffusers' scheduler loop started from z_T when
    s = 'dpmpp2m', t_steps = net.discrete_grid(N) (= scheduler.sigmas: sigma at its linspace timesteps,
                   then 0),
    s = 'euler',   t_steps = net.discrete_grid(N, 'leading', 'sigma_min') (DDIM with SD's config; the result
                   is x / sqrt(1 + sigma_0^2)).
Measured here (max |difference| / max |z|): stock diffusers <= 3.0e-7 (its DPM step casts the sample to
float32, DDIM uses float32 abar), so the bound is 1e-6; with those casts taken out <= 5e-15 relative
(2.5e-13 absolute), bound 1e-12. Tests that need diffusers skip without the extra.
"""
import copy
import importlib.util
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, Counter

import hub
import latent
import solvers

pytestmark = [  # diffusers' own noise under numpy 2 and huggingface_hub 2, not ours
    pytest.mark.filterwarnings('ignore:__array__ implementation:DeprecationWarning'),
    pytest.mark.filterwarnings('ignore:The `local_dir_use_symlinks`:UserWarning')]


def _found(name):
    """Is the module importable (False when a test blocks it)?"""
    try:
        return importlib.util.find_spec(name) is not None
    except (ValueError, AttributeError):  # blocked with sys.modules[name] = None
        return False


HAVE = _found('diffusers') and _found('transformers')
needs_diffusers = pytest.mark.skipif(not HAVE, reason=f'the optional extra is not installed ({latent.EXTRA})')
SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear')  # SD v1.5's schedule
STOCK, CASTFREE = 1e-6, 1e-12  # relative bounds (see the module docstring for the measured values)


def _randomize(module, seed):
    """Every weight random (default inits zero some outputs, which could hide a wrong formula)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 16
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) / math.sqrt(fan_in))
    return module


def tiny_parts():
    """Tiny SD-like components in float64: UNet (latents 4x8x8), VAE (2x down), CLIP text, tokenizer."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                                down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
                                up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=('DownEncoderBlock2D',) * 2,
                        up_block_types=('UpDecoderBlock2D',) * 2, latent_channels=4, layers_per_block=1,
                        norm_num_groups=8, sample_size=16)
    clip = CLIPTextConfig(vocab_size=60, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                          pad_token_id=1)
    text = CLIPTextModel(clip)
    # A CLIP BPE vocabulary of single letters (word-final letters end in </w>), no merges.
    vocab = {'<|startoftext|>': 0, '<|endoftext|>': 1}
    for token in [c + suffix for suffix in ('', '</w>') for c in 'abcdefghijklmnopqrstuvwxyz']:
        vocab[token] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    for i, m in enumerate((unet, vae, text)):
        _randomize(m.double().eval(), i)
    return dict(unet=unet, vae=vae, text_encoder=text, tokenizer=tok)


@pytest.fixture(scope='module')
def parts():
    if not HAVE:
        pytest.skip(f'the optional extra is not installed ({latent.EXTRA})')
    return tiny_parts()


def _dpm(prediction_type='epsilon', **kw):
    from diffusers import DPMSolverMultistepScheduler
    return DPMSolverMultistepScheduler(**SD, prediction_type=prediction_type, **kw)


def _ddim(prediction_type='epsilon', **kw):
    from diffusers import DDIMScheduler  # SD's config; DDIMScheduler's own defaults (clip_sample=True) differ
    return DDIMScheduler(**SD, prediction_type=prediction_type, clip_sample=False, set_alpha_to_one=False,
                         steps_offset=1, **kw)


def _eps_fn(unet, c, u, omega):
    """StableDiffusionPipeline's network call: one batch [uncond, cond], eps_u + omega (eps_c - eps_u)."""
    def f(z, t):
        if omega is None:
            return unet(z, t, encoder_hidden_states=c).sample
        both = unet(torch.cat([z, z]), t, encoder_hidden_states=torch.cat([u.expand_as(c), c])).sample
        out_u, out_c = both.chunk(2)
        return out_u + omega * (out_c - out_u)
    return f


def _ours(net, z_T, t_steps, solver, c, u, omega):
    """This project's sampler over the wrapped UNet, started at x = sqrt(1 + t_0^2) z_T."""
    D = net if omega is None else latent.guided(net, omega - 1, u)  # Meng's w = omega - 1
    return solvers.sample(D, latent.init_scale(t_steps[0]) * z_T, t_steps, solver, encoder_hidden_states=c)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope='module')
def conds():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 77, 32, generator=g, dtype=torch.float64),   # two prompts' embeddings
            torch.randn(1, 77, 32, generator=g, dtype=torch.float64),   # the empty prompt's
            torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64))  # z_T


# ---------------------------------------------------------------------------------------------
# Noise levels, the sigma <-> timestep map, grids
# ---------------------------------------------------------------------------------------------

@needs_diffusers
def test_levels_are_diffusers_levels():
    """SD's abar and sigma_j equal diffusers' own tables bit for bit (float32 arithmetic kept)."""
    sched = _dpm()
    abar = latent.scaled_linear_alphas_cumprod()
    assert torch.equal(abar, sched.alphas_cumprod) and torch.equal(abar, _ddim().alphas_cumprod)
    sigmas = latent.sigmas_from_alphas_cumprod(abar)
    assert sigmas.dtype == torch.float64 and torch.equal(sigmas, sched.sigmas.double())


def test_timestep_map_exact_monotone_and_invertible():
    """tau(sigma_j) = j exactly; log-linear inside a segment; strictly increasing; sigma(tau) inverts it.

    Measured: midpoints off by 1.1e-13, the largest tau step between neighbouring points of the dense
    grid 0.095 (a jump at a level would exceed it), inversions 7e-16 relative and 5.7e-14 in tau.
    """
    sigmas = latent.sigmas_from_alphas_cumprod(latent.scaled_linear_alphas_cumprod())
    T = len(sigmas)
    assert torch.equal(latent.timestep_from_sigma(sigmas, sigmas), torch.arange(T, dtype=torch.float64))
    assert torch.equal(latent.sigma_from_timestep(torch.arange(T), sigmas), sigmas)
    mid = (sigmas[:-1] * sigmas[1:]).sqrt()  # geometric midpoints: half way in log sigma
    assert (latent.timestep_from_sigma(mid, sigmas) - (torch.arange(T - 1) + 0.5)).abs().max() < 1e-11
    dense = torch.logspace(math.log10(sigmas[0]), math.log10(sigmas[-1]), 20001, dtype=torch.float64)
    dense = dense.clamp(sigmas[0], sigmas[-1])
    tau = latent.timestep_from_sigma(dense, sigmas)
    assert (tau[1:] > tau[:-1]).all() and tau[0] == 0 and tau[-1] == T - 1
    assert (tau[1:] - tau[:-1]).max() < 0.2  # continuous: no jumps at the levels
    back = latent.sigma_from_timestep(tau, sigmas)
    assert ((back - dense).abs() / dense).max() < 1e-13
    t = torch.rand(1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * (T - 1)
    assert (latent.timestep_from_sigma(latent.sigma_from_timestep(t, sigmas), sigmas) - t).abs().max() < 1e-11


@needs_diffusers
def test_timestep_map_is_diffusers_sigma_to_t():
    """The same rule as diffusers' interpolation for Karras sigmas (`_sigma_to_t`, in float64; 2.3e-13)."""
    sched = _dpm()
    sigmas = latent.sigmas_from_alphas_cumprod(sched.alphas_cumprod)
    s = np.exp(np.random.default_rng(0).uniform(math.log(sigmas[0]), math.log(sigmas[-1]), 500))
    ref = sched._sigma_to_t(s, np.log(sigmas.numpy()))
    assert np.abs(latent.timestep_from_sigma(torch.from_numpy(s), sigmas).numpy() - ref).max() < 1e-11


def test_timestep_map_range_errors():
    sigmas = latent.sigmas_from_alphas_cumprod(latent.scaled_linear_alphas_cumprod())
    lo, hi = float(sigmas[0]), float(sigmas[-1])
    latent.timestep_from_sigma(torch.tensor([lo, hi]), sigmas)  # the ends are in range
    for bad in (math.nextafter(lo, 0), math.nextafter(hi, math.inf), 0.0, -1.0, float('nan'), 80.0):
        with pytest.raises(ValueError, match=r'outside this model.s trained noise levels \[0.0291'):
            latent.timestep_from_sigma(torch.tensor([1.0, bad], dtype=torch.float64), sigmas)
    with pytest.raises(ValueError, match='timesteps must lie in'):
        latent.sigma_from_timestep(torch.tensor([1000.0]), sigmas)
    with pytest.raises(ValueError, match='zero terminal SNR'):
        latent.sigmas_from_alphas_cumprod(torch.tensor([0.9, 0.5, 0.0]))


@needs_diffusers
def test_grids_are_the_schedulers_grids():
    """discrete_timesteps reproduces DPM-Solver's linspace/trailing and DDIM's leading/trailing spacings."""
    for n in [*range(1, 61), 100, 250, 333, 999]:
        dpm, ddim, dpm_tr, ddim_tr = _dpm(), _ddim(), _dpm(timestep_spacing='trailing'), \
            _ddim(timestep_spacing='trailing')
        for s in (dpm, ddim, dpm_tr, ddim_tr):
            s.set_timesteps(n)
        assert latent.discrete_timesteps(n) == dpm.timesteps.tolist()
        assert latent.discrete_timesteps(n, spacing='leading', steps_offset=1) == ddim.timesteps.tolist()
        trailing = latent.discrete_timesteps(n, spacing='trailing')
        assert trailing == dpm_tr.timesteps.tolist() == ddim_tr.timesteps.tolist()
        sigmas = latent.sigmas_from_alphas_cumprod(dpm.alphas_cumprod)
        grid = latent.discrete_schedule(sigmas, latent.discrete_timesteps(n))
        assert torch.equal(grid, dpm.sigmas.double())
    for bad in (dict(n=0), dict(n=1001), dict(n=4, spacing='karras')):
        with pytest.raises(ValueError):
            latent.discrete_timesteps(**bad)


# ---------------------------------------------------------------------------------------------
# The denoiser's formulas, on a fake UNet that knows the answer
# ---------------------------------------------------------------------------------------------

class OracleUNet(torch.nn.Module):
    """A UNet-shaped oracle for data = one point x0: given z_tau it returns the exact eps, v or x0."""

    def __init__(self, x0, abar, prediction_type):
        super().__init__()
        self.config = dict(in_channels=x0.shape[1], sample_size=x0.shape[2])
        self.w = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
        self.x0, self.abar, self.kind, self.seen = x0, abar, prediction_type, []

    def forward(self, z, tau, return_dict=True):
        self.seen.append(tau)
        a = self.abar[tau.round().long()].reshape(-1, 1, 1, 1) ** 0.5   # integral tau: the level's abar
        s = (1 - a ** 2).sqrt()
        eps = (z - a * self.x0) / s
        v = a * eps - s * self.x0
        out = {'epsilon': eps, 'v_prediction': v, 'sample': self.x0.expand_as(z)}[self.kind]
        return (out + self.w,)


@pytest.mark.parametrize('prediction_type', latent.PREDICTIONS)
def test_denoiser_formulas_recover_the_data(prediction_type):
    """D(x0 + sigma eps, sigma) = x0 for a one-point data set, with epsilon, v and sample outputs; the UNet
    sees z = x / sqrt(1 + sigma^2) at the integer timestep of each level. Measured: |D - x0| <= 7.2e-15."""
    abar = latent.scaled_linear_alphas_cumprod().double()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
    fake = OracleUNet(x0, abar, prediction_type)

    class Sched:  # duck-typed: alphas_cumprod and a config
        alphas_cumprod, config = abar, dict(prediction_type=prediction_type)
    net = latent.wrap(fake, Sched)
    j = torch.tensor([0, 1, 500, 999])
    sigma = net.sigmas[j]
    x = x0 + sigma.reshape(-1, 1, 1, 1) * torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64)
    D = net(x, sigma)
    assert D.dtype == torch.float64 and (D - x0).abs().max() < 1e-12  # measured <= 7.2e-15
    assert torch.equal(fake.seen[-1], j.float())
    assert net.label_dim == 0 and not net.use_step_condition and not net.use_guidance_condition
    assert net.shape == [4, 8, 8] and not net.text and next(net.parameters()) is fake.w


# ---------------------------------------------------------------------------------------------
# Parity with diffusers' own loops
# ---------------------------------------------------------------------------------------------

def _dpm_castfree(sched, eps, z, N):
    """diffusers' DPM-Solver++(2M) update formulas (its first/second-order update methods) stepped by hand
    in float64, without step()'s float32 upcast; orders [1, 2, ..., 2, 1] as step() chooses them."""
    sched.set_timesteps(N)
    sched.sigmas = sched.sigmas.double()
    outs = []
    for i, t in enumerate(sched.timesteps):
        sched._step_index = i
        outs = (outs + [sched.convert_model_output(eps(z, t), sample=z)])[-2:]
        if i in (0, N - 1):
            z = sched.dpm_solver_first_order_update(outs[-1], sample=z)
        else:
            z = sched.multistep_dpm_solver_second_order_update(outs, sample=z)
    return z


@needs_diffusers
@pytest.mark.parametrize('prediction_type', ['epsilon', 'v_prediction'])
@pytest.mark.parametrize('omega', [None, 7.5])
@pytest.mark.parametrize('N', [5])
def test_dpmpp2m_is_diffusers_dpm_solver(parts, conds, prediction_type, omega, N):
    """DPM-Solver++(2M) over net.discrete_grid(N) = DPMSolverMultistepScheduler's loop (with/without CFG)."""
    unet, (c, u, z_T) = parts['unet'], conds
    eps = _eps_fn(unet, c, u, omega)
    sched = _dpm(prediction_type)
    sched.set_timesteps(N)
    z = z_T
    with torch.no_grad():
        for t in sched.timesteps:
            z = sched.step(eps(z, t), t, z).prev_sample
        z_exact = _dpm_castfree(_dpm(prediction_type), eps, z_T, N)
    net = latent.wrap(unet, sched)
    t_steps = net.discrete_grid(N)
    assert torch.equal(t_steps, sched.sigmas.double())  # the same grid, bit for bit
    x = _ours(net, z_T, t_steps, 'dpmpp2m', c, u, omega)
    assert _rel(x, z) < STOCK and _rel(x, z_exact) < CASTFREE


@needs_diffusers
@pytest.mark.parametrize('N', [2, 16])
def test_dpmpp2m_parity_at_other_step_counts(parts, conds, N):
    """N = 2 (orders [1, 1]) and N = 16 (diffusers' lower_order_second switch is off from 15 steps)."""
    test_dpmpp2m_is_diffusers_dpm_solver(parts, conds, 'epsilon', 7.5, N)


@needs_diffusers
@pytest.mark.parametrize('prediction_type', ['epsilon', 'v_prediction'])
@pytest.mark.parametrize('omega', [None, 7.5])
def test_euler_is_diffusers_ddim(parts, conds, prediction_type, omega):
    """Euler over sigma at DDIM's leading timesteps, ending at sigma_0, then x / sqrt(1 + sigma_0^2) =
    DDIMScheduler's loop (eta = 0, SD's config). Cast-free: DDIM fed abar = 1 / (1 + sigma_j^2) in float64."""
    unet, (c, u, z_T), N = parts['unet'], conds, 4
    eps = _eps_fn(unet, c, u, omega)
    net = latent.wrap(unet, _ddim(prediction_type))
    t_steps = net.discrete_grid(N, 'leading', 'sigma_min')
    x = _ours(net, z_T, t_steps, 'euler', c, u, omega)
    z_ours = net.decode(x, sigma=t_steps[-1])  # DDIM returns the VP latent z = x / sqrt(1 + sigma_0^2)
    for castfree, bound in ((False, STOCK), (True, CASTFREE)):
        sched = _ddim(prediction_type)
        sched.set_timesteps(N)
        if castfree:
            sched.alphas_cumprod = 1 / (1 + net.sigmas ** 2)
            sched.final_alpha_cumprod = sched.alphas_cumprod[0]
        z = z_T
        with torch.no_grad():
            for t in sched.timesteps:
                z = sched.step(eps(z, t), t, z).prev_sample
        assert _rel(z_ours, z) < bound


@needs_diffusers
def test_stable_diffusion_pipeline_end_to_end(parts):
    """The whole StableDiffusionPipeline (prompts -> CLIP -> CFG at omega = 7.5 -> DPM-Solver++ -> VAE)
    against encode_prompts + guided + solvers.sample + decode."""
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline(**parts, scheduler=_dpm(steps_offset=1), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    prompts, N = ['a cat', 'an astronaut riding a horse'], 5
    z_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    net = latent.wrap(parts['unet'], pipe.scheduler, vae=parts['vae'], text_encoder=parts['text_encoder'],
                      tokenizer=parts['tokenizer'])
    c, u = net.encode_prompts(prompts), net.encode_prompts([''])
    ref_c, ref_u = pipe.encode_prompt(prompts, 'cpu', 1, True)
    assert torch.equal(c, ref_c) and torch.equal(u.expand_as(c), ref_u)
    with torch.no_grad():
        run = lambda out: pipe(prompts, num_inference_steps=N, guidance_scale=7.5, latents=z_T,
                               output_type=out)
        z_ref, img_ref = run('latent').images, run('pt').images
    x = _ours(net, z_T, net.discrete_grid(N), 'dpmpp2m', c, u, 7.5)
    assert _rel(x, z_ref) < STOCK
    img = net.decode(x)
    assert img.shape == (2, 3, 16, 16) and _rel((img / 2 + 0.5).clamp(0, 1), img_ref) < STOCK


@needs_diffusers
def test_pixel_ddpm_unet2d_parity():
    """A pixel-space UNet2DModel with DDPMScheduler's default linear betas: DPM-Solver++(2M) parity."""
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel
    unet = UNet2DModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                       down_block_types=('DownBlock2D', 'AttnDownBlock2D'),
                       up_block_types=('AttnUpBlock2D', 'UpBlock2D'))
    unet = _randomize(unet.double().eval(), 5)
    net = latent.wrap(unet, DDPMScheduler())
    assert not net.text and net.vae is None and abs(net.sigma_max / 157.407 - 1) < 1e-5
    sched = DPMSolverMultistepScheduler.from_config(DDPMScheduler().config)
    sched.set_timesteps(6)
    z_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    z = z_T
    with torch.no_grad():
        for t in sched.timesteps:
            z = sched.step(unet(z, t).sample, t, z).prev_sample
    x = solvers.sample(net, latent.init_scale(net.sigma_max) * z_T, net.discrete_grid(6), 'dpmpp2m')
    assert _rel(x, z) < STOCK and torch.equal(net.decode(x), x)


@needs_diffusers
def test_every_solver_runs_with_guidance_and_counts_calls(parts, conds):
    """All solvers of solvers.py integrate the guided latent denoiser (fractional timesteps in between);
    each evaluation is one batched UNet call on 2B samples (= 2 NFE), w = 0 is one call on B."""
    c, u, z_T = conds
    counted = Counter(latent.wrap(parts['unet'], _dpm()))
    t_steps = counted.net.discrete_grid(3)  # 3 steps ending at 0
    for name in solvers.SOLVERS:
        counted.calls = 0
        x = solvers.sample(latent.guided(counted, 6.5, u), latent.init_scale(t_steps[0]) * z_T, t_steps, name,
                           encoder_hidden_states=c)
        assert torch.isfinite(x).all() and counted.calls == solvers.nfe(name, 3, ends_at_zero=True)
    counted.calls = 0
    D0 = latent.guided(counted, 0.0, u)(z_T, 1.0, encoder_hidden_states=c)
    assert counted.calls == 1 and torch.equal(D0, counted.net(z_T, 1.0, encoder_hidden_states=c))
    # Meng's form (1 + w) D_c - w D_u with separate calls, per-sample w (measured 2.2e-15 relative).
    w = torch.tensor([0.5, 6.5], dtype=torch.float64)
    net = counted.net
    ref = (1 + w.reshape(-1, 1, 1, 1)) * net(z_T, 2.0, encoder_hidden_states=c) - \
        w.reshape(-1, 1, 1, 1) * net(z_T, 2.0, encoder_hidden_states=u)
    assert _rel(latent.guided(net, w, u)(z_T, 2.0, encoder_hidden_states=c), ref) < 1e-12
    with pytest.raises(ValueError, match='unconditional embedding'):
        latent.guided(net, 1.0, None)


# ---------------------------------------------------------------------------------------------
# VAE, prompts, the module's parts
# ---------------------------------------------------------------------------------------------

@needs_diffusers
def test_protocol_schedule_is_the_timestep_uniform_grid(parts):
    """net.schedule(n, t_min, t_max, kind, rho), the protocol's grid of a model's own kind: UNIFORM only."""
    net = latent.wrap(parts['unet'], _dpm())
    for rho in (1.0, 2.0):
        t = net.schedule(4, 0.1, 10.0, latent.UNIFORM, rho)
        assert torch.equal(t, latent.uniform_schedule(4, 0.1, 10.0, net.sigmas, rho))
    assert t.dtype == torch.float64 and len(t) == 5 and (t[0], t[-1]) == (10.0, 0.1)
    with pytest.raises(ValueError, match="unknown schedule 'polynomial'"):
        net.schedule(4, 0.1, 10.0, 'polynomial')


@needs_diffusers
def test_vae_encode_decode_scaling_and_shapes(parts):
    net = latent.wrap(parts['unet'], _dpm(), vae=parts['vae'])
    vae, sf = parts['vae'], parts['vae'].config.scaling_factor
    assert sf == 0.18215
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 16, 16, generator=g, dtype=torch.float64) * 2 - 1
    z = net.encode(images, sample=False)
    assert z.shape == (3, 4, 8, 8) and torch.equal(z, vae.encode(images).latent_dist.mode() * sf)
    drawn = net.encode(images, generator=torch.Generator().manual_seed(7))
    assert torch.equal(drawn, vae.encode(images).latent_dist.sample(torch.Generator().manual_seed(7)) * sf)
    out = net.decode(z)
    assert out.shape == images.shape and torch.equal(out, vae.decode(z / sf).sample)
    assert _rel(net.decode(z, batch=1), out) < 1e-12  # decoded in chunks: the same images (measured 0)
    sigma = 0.0291675
    assert _rel(net.decode(z * math.sqrt(1 + sigma ** 2), sigma=sigma), out) < 1e-12  # x at sigma -> z


@needs_diffusers
def test_prompts(parts):
    net = latent.wrap(parts['unet'], _dpm(), text_encoder=parts['text_encoder'], tokenizer=parts['tokenizer'])
    e = net.encode_prompts(['a cat', ''])
    assert e.shape == (2, 77, 32) and e.dtype == torch.float64
    assert torch.equal(net.encode_prompts('a cat'), e[:1]) and torch.equal(net.encode_prompts(['']), e[1:])
    assert not torch.equal(e[0], e[1])
    long = ' '.join(['abcdefgh'] * 20)  # 160 letter tokens: truncated to 77 (BOS, 75 tokens, EOS)
    assert net.encode_prompts([long]).shape == (1, 77, 32)
    for bad in ([], [3], None):
        with pytest.raises((ValueError, TypeError)):
            net.encode_prompts(bad)
    x = torch.zeros(2, 4, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match='encoder_hidden_states='):
        net(x, 1.0)
    with pytest.raises(ValueError, match='class_labels'):
        net(x, 1.0, encoder_hidden_states=e, class_labels=torch.eye(2))
    with pytest.raises(ValueError, match='batch 3'):
        net(x, 1.0, encoder_hidden_states=e[:1].expand(3, -1, -1))
    bare = latent.wrap(parts['unet'], _dpm())
    with pytest.raises(ValueError, match='without text_encoder'):
        bare.encode_prompts(['a cat'])


@needs_diffusers
def test_frozen_parts_follow_moves_but_stay_out_of_parameters(parts):
    """parameters()/state_dict() are the UNet's (optimisers, DDP, checkpoints); .double()/.to() move the
    VAE and text encoder too; a deepcopy (a student) shares them."""
    p = {k: copy.deepcopy(v) for k, v in parts.items()}
    net = latent.wrap(p['unet'], _dpm(), vae=p['vae'], text_encoder=p['text_encoder'],
                      tokenizer=p['tokenizer'])
    assert {id(q) for q in net.parameters()} == {id(q) for q in p['unet'].parameters()}
    assert all(k.startswith('unet.') for k in net.state_dict())
    net.float()
    assert p['vae'].dtype == p['text_encoder'].dtype == p['unet'].dtype == torch.float32
    student = copy.deepcopy(net)
    assert student.vae is net.vae and student.unet is not net.unet
    assert not any(q.requires_grad for q in net.vae.parameters())


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

@needs_diffusers
def test_load_saved_pipelines(parts, tmp_path):
    """load() reads a saved StableDiffusionPipeline and a DDPMPipeline; meta is plain (JSON) data."""
    from diffusers import DDPMPipeline, DDPMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DModel
    sd_sched = PNDMScheduler(**SD, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)  # SD's own
    StableDiffusionPipeline(**parts, scheduler=sd_sched, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(tmp_path / 'sd')
    net, meta = hub.load(tmp_path / 'sd', dtype=torch.float64)
    assert json.loads(json.dumps(meta)) == meta
    want = dict(kind='diffusers', pipeline='StableDiffusionPipeline', shape=[4, 8, 8], latent=True,
                image_shape=[3, 16, 16], text=True, prediction_type='epsilon', init_scale='vp', guidance=6.5,
                timesteps=1000)
    assert {k: meta[k] for k in want} == want
    r = meta['sampling']
    assert set(r) >= {'solver', 'nfe', 'afs', 'schedule', 'rho', 't_min', 't_max', 'ends_at_zero', 't_steps'}
    assert r['t_steps'] == net.discrete_grid(r['nfe']).tolist()
    assert r['t_max'] == meta['sigma_max'] == r['t_steps'][0]
    assert solvers.nfe(r['solver'], len(r['t_steps']) - 1, r['afs'], r['ends_at_zero']) == r['nfe']
    assert net.steps_offset == 1  # from the scheduler's config: DDIM/PNDM's leading grid
    assert net.discrete_grid(4, 'leading')[:-1].tolist() == net.sigmas[[751, 501, 251, 1]].tolist()
    ref = latent.wrap(parts['unet'], sd_sched, vae=parts['vae'], text_encoder=parts['text_encoder'],
                      tokenizer=parts['tokenizer'])
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    e = net.encode_prompts(['a cat', 'a dog'])
    assert torch.equal(e, ref.encode_prompts(['a cat', 'a dog']))
    assert torch.equal(net(x, 3.0, encoder_hidden_states=e), ref(x, 3.0, encoder_hidden_states=e))

    pixels = UNet2DModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                         down_block_types=('DownBlock2D',) * 2, up_block_types=('UpBlock2D',) * 2)
    DDPMPipeline(unet=pixels, scheduler=DDPMScheduler()).save_pretrained(tmp_path / 'ddpm')
    net, meta = hub.load(str(tmp_path / 'ddpm'))
    assert (meta['shape'], meta['latent'], meta['text'], meta['guidance']) == ([3, 8, 8], False, False, None)
    assert next(net.parameters()).dtype == torch.float32 and net.vae is None


@needs_diffusers
def test_load_errors(tmp_path, monkeypatch):
    """Offline and not cached: one error saying where the files go; bad folders and names: clear errors."""
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    with pytest.raises(ValueError, match=r'not \(completely\) in the Hugging Face cache .*hf download'):
        hub.load('nobody-here/no-such-model-xyz')
    with pytest.raises(ValueError, match='no model_index.json'):
        hub.load(tmp_path)
    with pytest.raises(ValueError, match='neither a folder nor a Hugging Face hub id'):
        hub.load(str(tmp_path / 'a' / 'b'))


def test_is_spec(tmp_path):
    """Which model names are diffusers pipelines (for the resolver's table of kinds)."""
    for hub_id in ('stable-diffusion-v1-5/stable-diffusion-v1-5', 'google/ddpm-cifar10-32'):
        assert hub.is_spec(hub_id)
    (tmp_path / 'pipe').mkdir()
    assert not hub.is_spec(tmp_path / 'pipe')
    (tmp_path / 'pipe' / 'model_index.json').write_text('{}')
    assert hub.is_spec(tmp_path / 'pipe')
    for other in ('runs/student.pt', 'cifar10', 'edm-cifar10-32x32-cond-vp', 'https://host/x/net.pkl',
                  'toy:moons', 'a/b/c'):
        assert not hub.is_spec(other), other
    (tmp_path / 'student').mkdir()  # a distilled student (hub.save_student) is a spec too
    assert not hub.is_spec(tmp_path / 'student')
    (tmp_path / 'student' / hub.STUDENT_FILE).write_text('{}')
    assert hub.is_spec(tmp_path / 'student') and hub.is_student(tmp_path / 'student')


def test_missing_extra_gives_one_error(monkeypatch):
    """Without diffusers: the module imports and works on schedules; load names the requirements file."""
    code = ('import sys; sys.modules["diffusers"] = None; sys.modules["transformers"] = None\n'
            'import hub, latent\n'
            'assert latent.discrete_timesteps(4) == [999, 749, 500, 250]\n'
            'try:\n    hub.load("stable-diffusion-v1-5/stable-diffusion-v1-5")\n'
            'except ImportError as e:\n    print(e)\n')
    out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert 'pip install -r requirements-latent.txt' in out.stdout
    monkeypatch.setitem(sys.modules, 'diffusers', None)
    with pytest.raises(ImportError, match=r'pip install -r requirements-latent\.txt') as e:
        hub.load('google/ddpm-cifar10-32')
    assert isinstance(e.value, ValueError)  # also a ValueError: a CLI ends with one `error:` line (cli.run)


# ---------------------------------------------------------------------------------------------
# Through the resolver and sample.py (what a user runs)
# ---------------------------------------------------------------------------------------------

def save_tiny_sd(parts, folder):
    """`folder`: the tiny Stable Diffusion pipeline of `parts` saved as diffusers saves one (float32)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    p32 = {k: (copy.deepcopy(v).float() if isinstance(v, torch.nn.Module) else v) for k, v in parts.items()}
    StableDiffusionPipeline(**p32, scheduler=PNDMScheduler(**SD, skip_prk_steps=True, steps_offset=1),
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope='module')
def sd_folder(parts, tmp_path_factory):
    return save_tiny_sd(parts, tmp_path_factory.mktemp('pipelines') / 'sd')


@needs_diffusers
def test_resolver_loads_a_pipeline_folder(sd_folder):
    import models
    net, meta = models.load(sd_folder)
    assert models.kind_of(str(sd_folder)) == 'diffusers' and meta['kind'] == 'diffusers'
    assert meta['shape'] == [4, 8, 8] and solvers.Recipe.from_dict(meta['sampling']).solver == 'dpmpp2m'
    assert not any(p.requires_grad for p in net.parameters())


@needs_diffusers
def test_sample_py_draws_stable_diffusion_with_prompts_and_guidance(sd_folder, tmp_path, capsys):
    """sample.py with --prompt(s) and --guidance: decoded 16x16 images, NFE doubled by CFG, seeds
    independent of the batch, every solver of solvers.py (on the model's own discrete grid)."""
    import sample
    args = ['--model', str(sd_folder), '--seeds', '0-2', '--quiet', '--device', 'cpu']
    x = sample.main(args + ['--prompt', 'a cat', '--guidance', '6.5', '--nfe', '4', '--npz', str(tmp_path / 'a.npz')])
    out = capsys.readouterr().out
    assert x.shape == (3, 3, 16, 16) and x.dtype == torch.uint8
    assert 'NFE 8 per image' in out and 'classifier-free guidance w=6.5' in out
    y = sample.main(args + ['--prompt', 'a cat', '--guidance', '6.5', '--nfe', '4', '--batch', '1',
                            '--grid', str(tmp_path / 'g.png')])
    assert (x.int() - y.int()).abs().max() <= 1  # per-seed noise: the batch size changes nothing (rounding)
    (tmp_path / 'p.txt').write_text('a cat\n\na dog\n')
    z = sample.main(args + ['--prompts', str(tmp_path / 'p.txt'), '--nfe', '3', '--solver', 'euler',
                            '--npz', str(tmp_path / 'b.npz')])
    assert 'NFE 3 per image' in capsys.readouterr().out and not torch.equal(z[0], z[1])  # two prompts
    for solver, nfe in (('heun', 5), ('dpm2', 5), ('ipndm', 3), ('dpmpp3m', 3)):
        sample.main(args + ['--prompt', 'a', '--solver', solver, '--nfe', str(nfe), '--npz', str(tmp_path / 'c.npz')])
        assert f'NFE {nfe} per image' in capsys.readouterr().out
    with pytest.raises(ValueError, match='text-conditioned: give --prompt'):
        sample.main(args + ['--npz', str(tmp_path / 'd.npz')])
    with pytest.raises(ValueError, match='its own discrete grid'):
        sample.main(args + ['--prompt', 'a', '--t-min', '0.1', '--npz', str(tmp_path / 'd.npz')])
