"""Guided distillation: Meng et al., On Distillation of Guided Diffusion Models (CVPR 2023).

Classifier-free guidance (CFG) evaluates a conditional and an unconditional model at every step
and mixes them, D_w = (1 + w) D_cond - w D_uncond. Meng et al. distil that into one network and
then into a few steps:

    stage one   Alg. 1/2  a student conditioned on w learns D_w for every w in [w_min, w_max]
    stage two   Alg. 3    progressive distillation: one student DDIM step = two teacher steps,
                          halving the step count each round (2N -> N -> ... -> 1)
                Alg. 4    the same for the N-step stochastic sampler (Sec. 3.3, Eq. 4-7)
    sampling    Eq. 2     DDIM with the student at any w; Eq. 4-7 the stochastic sampler;
                          the baseline, DDIM with CFG (two network calls per step)

All of it in EDM form (x = x0 + sigma z, denoiser D(x, sigma)). Meng writes the VP process
z_t = alpha_t x0 + sigma_t eps; dividing by alpha_t gives our state x = z_t / alpha_t at noise
level sigma_EDM = sigma_t / alpha_t (so SNR = alpha^2 / sigma^2 = 1 / sigma_EDM^2), and Meng's
data prediction x_hat(z_t) is our D(x, sigma_EDM). Below, sigma always means sigma_EDM.

    python guided_pd.py stage1        # CIFAR-10: NVIDIA's cond + uncond EDM nets (downloads)
    python guided_pd.py stage2 --teacher runs/guided-stage1-cifar10-32x32-cond-vp/student.pt
    python guided_pd.py stage1 --teacher toy:ring     # both stages on a 2-D toy, minutes on a CPU
    python guided_pd.py stage2 --teacher runs/guided-stage1-toy-ring/student.pt
    python guided_pd.py stage1 --teacher stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --data train2014 --captions captions_train2014.json     # SD: w through time_cond_proj_dim (a GPU)
"""

import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import captions
import cli
import data
import latent
import models
import solvers
import toy
import unet


@dataclass
class GuidedConfig:
    """Settings of both stages; defaults are Meng App. B / the official CIFAR-10 configs."""
    teacher: str = 'cifar10-32x32-cond-vp'   # stage one: a conditional model spec; stage two: a .pt
    uncond: str = 'cifar10-32x32-uncond-vp'  # stage one's unconditional branch; '' = the null label
    data: str = 'cifar10'                 # x ~ D (Alg. 1, 3): 'cifar10' or an image zip/folder
    captions: str = ''                    # text teachers: MS-COCO captions JSON naming the images in data
    w_min: float = 0.0                    # guidance range [w_min, w_max] (Sec. 4.1: [0, 4])
    w_max: float = 4.0
    sigma_dist: str = 'cosine'            # stage one noise levels: cosine (Meng) | lognormal (EDM)
    weighting: str = ''                   # '' = stage default: edm (stage one), snr_trunc (stage two)
    sigma_min: float = 0.002              # the cosine schedule's range in sigma (EDM's)
    sigma_max: float = 80.0
    iters: int = 50_000                   # stage-one updates (the paper gives no number)
    start_n: int = 1024                   # stage two: DDIM steps of the first teacher (App. B.3)
    end_n: int = 1                        # stage two: steps of the last student
    stochastic: bool = False              # stage two for the stochastic sampler (Alg. 4)
    round_iters: int = 50_000             # updates per halving (App. B.3) ...
    final_round_iters: int = 100_000      # ... and for the 2- and 1-step students
    lr: float = 1e-4                      # Adam; stage one: paper text 1e-3, official config 1e-4
    batch: int = 128
    ema: float = -1.0                     # -1 = stage default: 0.9999 (stage one), 0 = none (stage two)
    grad_clip: float = 1.0                # official configs
    seed: int = 0
    run_dir: str = ''                     # '' = a new folder runs/<00000>-guided-<stage>-<teacher>
    tick: int = 500                       # updates per stats.jsonl line
    device: str = 'auto'


# A fresh toy MLP adapts faster than a pretrained U-Net, and its runs must fit in minutes on a CPU.
TOY_DEFAULTS = dict(batch=256, lr=1e-3, iters=3000, ema=0.99, start_n=16, round_iters=1500,
                    final_round_iters=2000, tick=250)
# The image worlds (toy:cifar10-16:cond): a DDPM++ copy on a CPU, a few minutes per stage.
IMAGE_DEFAULTS = dict(batch=32, lr=1e-4, iters=200, ema=0.99, start_n=8, round_iters=100,
                      final_round_iters=200, tick=50)
# Text-to-image teachers (diffusers): Meng Sec. 4.2 / App. C on SD, w in [2, 14] in Imagen's convention,
# i.e. SD guidance_scale 3 .. 15 (our w = omega - 1 is the same number); a 512-step DDIM teacher for
# stage two; ~3000 stage-one updates and 2000 per halving; the paper's batch 512 needs many GPUs.
LATENT_DEFAULTS = dict(w_min=2.0, w_max=14.0, uncond='', batch=16, iters=3000, start_n=512, round_iters=2000,
                       final_round_iters=10000, tick=50)
WEIGHTINGS = ('edm', 'snr', 'snr_trunc', 'constant')


# ---------------------------------------------------------------------------------------------
# The cosine schedule in EDM form (Meng Sec. 2; Salimans & Ho 2022)
# ---------------------------------------------------------------------------------------------

def cosine_sigma(t, sigma_min=0.002, sigma_max=80.0):
    """sigma(t) for t in [0, 1] (float64): tan(a t + b), clipped to [sigma_min, sigma_max], and 0 at t = 0.

    Meng's cosine schedule alpha_t = cos(phi), sigma_t = sin(phi) has sigma_EDM = tan(phi) with
    phi = a t + b linear in t, i.e. logsnr(t) = -2 ln tan(a t + b). The official bounds logsnr in
    [-20, 20] (sigma up to 22026) put the top 0.8% of t above 80, where EDM networks were never
    trained, and clipping there would merge grid points; so a and b are chosen to make the curve
    itself span the EDM range: b = arctan(sigma_min), a = arctan(sigma_max) - b (the clip only
    removes round-off). sigma(0) := 0 is the data itself: a DDIM step to t = 0 returns D, so the
    last sampling step outputs the denoised sample and stage two's last target is the teacher's D.
    """
    b = math.atan(sigma_min)
    a = math.atan(sigma_max) - b
    t = torch.as_tensor(t, dtype=torch.float64)
    sigma = torch.tan(a * t + b).clamp(sigma_min, sigma_max)
    sigma = torch.where(t < 1, sigma, torch.full_like(sigma, sigma_max))  # exact at t = 1 (no round-off)
    return torch.where(t > 0, sigma, torch.zeros_like(sigma))


def cosine_grid(N, sigma_min=0.002, sigma_max=80.0):
    """The N-step grid sigma(i / N), i = N .. 0 (N + 1 values, the last 0): a solvers-style schedule.

    Grids nest: cosine_grid(2N)[::2] == cosine_grid(N), the property progressive distillation
    needs (the teacher's 2N-step grid holds the student's N-step grid)."""
    return cosine_sigma(torch.arange(N, -1, -1, dtype=torch.float64) / N, sigma_min, sigma_max)


# ---------------------------------------------------------------------------------------------
# The guided teacher (Meng Sec. 2) and the stage-one student (Sec. 3.1)
# ---------------------------------------------------------------------------------------------

def cfg_teacher(cond_net, uncond_net=None):
    """Classifier-free guidance as one denoiser D_w(x, sigma, class_labels, guidance=w), Meng's w
    (w = 0 is the conditional model; SFD's omega = 1 + w): (1 + w) D_cond - w D_uncond, with
    D_uncond = `uncond_net` or, for a jointly trained net, `cond_net` with the null label (zero
    one-hot). `w` is a number or a per-sample [B] tensor. Two network calls per evaluation."""
    def D_w(x, sigma, class_labels=None, guidance=0.0):
        return solvers.guided(cond_net, guidance, uncond_net)(x, sigma, class_labels=class_labels)
    return D_w


def load_cfg_teacher(spec, uncond='', device='cpu'):
    """(D_w, conditional net, its metadata) for a model spec (models.load). A toy spec means its
    jointly trained class-conditional net (toy:<name>:cond, label dropout 0.1), whose null label
    is the unconditional model; `uncond` names a separate unconditional network ('' = the null
    label). NVIDIA's class-conditional CIFAR-10 net never saw a null label: it needs the uncond net."""
    world = models.toy_world(spec)
    if spec.startswith('toy:'):
        spec, uncond = f'toy:{world}:cond', ''
    net, meta = models.load(spec, device)  # eval mode (EDM's dropout off), frozen
    if isinstance(net, latent.Denoiser) and net.text:  # SD: CFG against the empty prompt (SFD Eq. 9)
        u = net.encode_prompts([''])
        return lambda x, s, guidance=0.0, **c: latent.guided(net, guidance, u)(x, s, **c), net, meta
    if not net.label_dim:
        raise ValueError(f'--teacher {spec} is not class-conditional: guidance distillation needs a '
                         'conditional model (e.g. cifar10-cond, toy:ring)')
    meta = dict(meta, data=f'toy:{world}') if world else meta
    return cfg_teacher(net, models.load(uncond, device)[0] if uncond else None), net, meta


def make_student(net):
    """Meng Sec. 3.1: the student starts as the conditional teacher plus a w input (a zero-
    initialised embedding added like the noise level's, unet.py: an exact no-op until trained),
    without dropout (App. B; EDM's U-Net blocks drop with p = 0.13 in train mode)."""
    student = copy.deepcopy(net).train().requires_grad_(True)
    if not student.use_guidance_condition:
        student.enable_guidance_condition()
    for m in student.modules():
        if isinstance(m, unet.UNetBlock):
            m.dropout = 0.0
        if hasattr(m, 'label_dropout'):
            m.label_dropout = 0.0  # the student always sees the real label
    if isinstance(getattr(student, 'model', None), (unet.SongUNet, unet.DhariwalUNet)):
        student.init_kwargs.update(dropout=0.0, label_dropout=0.0)  # rebuilt files keep it
    return student


# ---------------------------------------------------------------------------------------------
# Losses: Meng Eq. 1/3 with the weight written in sigma (SNR = 1 / sigma^2)
# ---------------------------------------------------------------------------------------------

def loss_weight(kind, sigma, sigma_data):
    """omega(lambda_t) of Meng Eq. 1 in sigma terms, for a loss on D (x-space):
    edm        1/sigma^2 + 1/sigma_data^2  EDM's own lambda; times c_out^2 it is exactly 1, i.e. a
                                          plain MSE on the raw network output at every sigma
    snr        1/sigma^2                  = epsilon-MSE; the official stage one (with v-prediction)
    snr_trunc  max(1, 1/sigma^2)          "SNR truncation", max of x- and epsilon-MSE (stage two)
    constant   1                          x-MSE
    With sigma_data = 1, edm is 1 + SNR, the v-MSE of v-prediction models (Meng's networks). edm and
    snr agree below sigma_data; above it snr -> 0 stops teaching D_w at the high noise levels where
    a few-step sampler's first step is taken, edm keeps weight 1/sigma_data^2 there: stage one's
    default is edm, the teacher's own training weight."""
    snr = sigma.pow(-2)
    table = {'edm': lambda: snr + sigma_data ** -2, 'snr': lambda: snr,
             'snr_trunc': lambda: snr.clamp(min=1), 'constant': lambda: torch.ones_like(sigma)}
    if kind not in table:
        raise ValueError(f'unknown weighting {kind!r}; choose one of {WEIGHTINGS}')
    return table[kind]()


def weighted_mse(D, target, weight):
    """weight * ||D - target||^2, the mean over a sample's elements (the official code's scale,
    which its gradient clip at 1 assumes), then over the batch."""
    return (weight.to(D) * (D.float() - target.float()).square().flatten(1).mean(1)).mean()


def sample_sigma(kind, n, generator, sigma_min=0.002, sigma_max=80.0):
    """Stage one's noise levels. cosine: Meng Alg. 1, line 2, t ~ U(0, 1] through the cosine
    schedule, the same t-uniform law as stage two's grid points t = i/N, so stage one trains D_w
    at the noise levels in the proportion stage two and the samplers will query them (sigma is
    then half-Cauchy-like: median 1, 6% above 10). lognormal: EDM's training law ln sigma ~
    N(-1.2, 1.2^2), where the teacher itself is best trained, but which rarely visits sigma > 10."""
    if kind == 'cosine':
        return cosine_sigma(1 - torch.rand(n, generator=generator, dtype=torch.float64), sigma_min, sigma_max)
    if kind == 'lognormal':
        return (torch.randn(n, generator=generator, dtype=torch.float64) * 1.2 - 1.2).exp()
    raise ValueError(f"unknown sigma distribution {kind!r}; choose 'cosine' or 'lognormal'")


def _cond(y, device):
    """The network conditions of a draw: one-hot labels, or a dict (a text model's prompt embeddings)."""
    return {k: v.to(device) for k, v in y.items()} if isinstance(y, dict) else {'class_labels': y.to(device)}


def _bc(v, x):
    """A per-sample [B] tensor shaped to broadcast over x [B, ...]."""
    return v.reshape(-1, *[1] * (x.ndim - 1))


def stage_one_loss(student, D_w, x0, y, cfg, generator, weighting='edm'):
    """One batch of Meng Alg. 1 (Alg. 2 is the same), line by line in EDM form."""
    B, dev = x0.shape[0], x0.device
    sigma = sample_sigma(cfg.sigma_dist, B, generator, cfg.sigma_min, cfg.sigma_max).to(dev)  # t ~ U[0,1]
    w = (cfg.w_min + (cfg.w_max - cfg.w_min) * torch.rand(B, generator=generator)).to(dev)     # w ~ U
    eps = torch.randn(x0.shape, generator=generator).to(x0)                                    # eps ~ N(0,I)
    x = x0 + _bc(sigma, x0).to(x0) * eps   # z_t = alpha_t x + sigma_t eps, divided by alpha_t
    with torch.inference_mode(), cli.autocast(dev):
        target = D_w(x, sigma, **_cond(y, dev), guidance=w)  # x_hat^w = (1 + w) x_hat_c - w x_hat
    target = target.clone()  # out of inference mode: usable in the graph
    with cli.autocast(dev):
        D = student(x, sigma, **_cond(y, dev), guidance=w)   # x_hat_eta1(z_t, w)
    # L = omega(lambda_t) ||x_hat^w - x_hat_eta1||^2
    return weighted_mse(D, target, loss_weight(weighting, sigma, student.sigma_data))


# ---------------------------------------------------------------------------------------------
# Stage two (Meng Alg. 3 and 4): the two-step teacher target
# ---------------------------------------------------------------------------------------------

def ddim_step(D, x, sigma, sigma_next):
    """Meng Eq. 2, z_s = alpha_s x_hat + sigma_s (z_t - alpha_t x_hat) / sigma_t, divided by alpha_s:
    x_s = D + (sigma_s / sigma_t)(x_t - D). Lands on D when sigma_s = 0. Per-sample [B] sigmas."""
    return D + _bc(sigma_next / sigma, x) * (x - D)


@torch.inference_mode()
def two_step_target(teacher, x, sigma, sigma1, sigma2, **cond):
    """Alg. 3, lines 9-12 (Alg. 4, lines 9-16): two teacher DDIM steps sigma -> sigma1 -> sigma2
    and the x-target that takes the student from sigma to sigma2 in one DDIM step.

    Solving x'' = x~ + r (x - x~) (one student step, r = sigma2 / sigma) for x~ gives
        x~ = (x'' - r x) / (1 - r),
    Meng's (z'' - (s''/s) z_t) / (alpha'' - (s''/s) alpha_t) divided by alpha''. For large N the step
    is short (1 - r ~ 3/N near sigma = 1), and 1/(1 - r) amplifies the round-off of x and x'':
    evaluated in float32 at N = 1024 the target is ~1000x less precise than float32 (tests). The
    teacher's D errors are not amplified (each D enters x'' with a weight proportional to a step
    length; indeed x~ = [(1 - s2/s1) D2 + (s2/s1 - s2/s) D1] / (1 - s2/s), a convex mixture of the
    two outputs), so running the combination in float64 keeps the target as exact as the teacher.
    Edge cases: sigma2 = 0 (the last step) gives r = 0 and x~ = x'' = the teacher's second D;
    sigma1 = 0 (Alg. 4 at t = 1/N, one teacher step) gives x~ = the teacher's first D.
    """
    x64 = x.double()
    D1 = teacher(x, sigma, **cond).double()             # x_hat_eta(z_t, w)
    x1 = ddim_step(D1, x64, sigma, sigma1)              # z_t' = DDIM step t -> t'
    one_step = sigma1 == 0                              # Alg. 4's "else" branch: x~ from one step
    sigma1_ = torch.where(one_step, sigma, sigma1)      # a valid sigma for the unused second call
    D2 = teacher(x1.to(x.dtype), sigma1_, **cond).double()  # x_hat_eta(z_t', w)
    x2 = torch.where(_bc(one_step, x), x1, ddim_step(D2, x1, sigma1_, sigma2))  # z_t''
    r = _bc(sigma2 / sigma, x)                          # sigma_t'' / sigma_t, in EDM sigmas
    return ((x2 - r * x64) / (1 - r)).to(x.dtype)       # x~^w: the teacher's x_hat target


def stage_two_loss(student, teacher, x0, y, N, cfg, generator, weighting='snr_trunc'):
    """One batch of Meng Alg. 3 (deterministic) or Alg. 4 (cfg.stochastic), EDM form.

    Alg. 3: the student at t = i/N learns the teacher's two half steps t -> t - 0.5/N -> t - 1/N.
    Alg. 4: it learns a 2/N jump made of two teacher steps of 1/N, t -> t - 1/N -> t - 2/N,
    the jump the stochastic sampler takes (Eq. 4/6); at t = 1/N one teacher step, to 0."""
    B = x0.shape[0]
    i = torch.randint(1, N + 1, (B,), generator=generator).double()      # t = i/N, i ~ Cat[1..N]
    w = (cfg.w_min + (cfg.w_max - cfg.w_min) * torch.rand(B, generator=generator)).to(x0.device)
    eps = torch.randn(x0.shape, generator=generator).to(x0)              # eps ~ N(0, I)
    h = 1.0 if cfg.stochastic else 0.5                                    # teacher step, in units of 1/N
    sigma, sigma1, sigma2 = (cosine_sigma(((i - k * h) / N).clamp(min=0), cfg.sigma_min, cfg.sigma_max)
                             .to(x0.device) for k in (0, 1, 2))           # t, t', t''
    x = x0 + _bc(sigma, x0).to(x0) * eps                                  # z_t, divided by alpha_t
    with cli.autocast(x.device):
        target = two_step_target(teacher, x, sigma, sigma1, sigma2, **_cond(y, x.device), guidance=w).clone()
        D = student(x, sigma, **_cond(y, x.device), guidance=w)          # x_hat_eta2(z_t, w)
    # L = omega(lambda_t) ||x~^w - x_hat_eta2||^2
    return weighted_mse(D, target, loss_weight(weighting, sigma, student.sigma_data))


# ---------------------------------------------------------------------------------------------
# Sampling (Meng Sec. 3.3)
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def ddim(denoiser, z, N, w, sigma_min=0.002, sigma_max=80.0, **cond):
    """Deterministic N-step sampling from unit noise z: DDIM (Eq. 2) = Euler in EDM form over the
    cosine grid, at guidance w. With a w-conditioned student: N network calls. With the guided
    teacher D_w (cfg_teacher): the baseline "DDIM with CFG", 2N calls."""
    t_steps = cosine_grid(N, sigma_min, sigma_max)
    return solvers.sample(denoiser, sigma_max * z, t_steps, 'euler', guidance=w, **cond)


@torch.no_grad()
def stochastic(net, z, N, w, generator=None, sigma_min=0.002, sigma_max=80.0, **cond):
    """The N-step stochastic sampler (Eq. 4-7; solvers.stochastic_sample): from t = k/N a DDIM jump
    to (k - 2)/N, then fresh noise back up to (k - 1)/N; at t = 1/N the student's D. N calls."""
    t_steps = cosine_grid(N, sigma_min, sigma_max)
    return solvers.stochastic_sample(net, sigma_max * z, t_steps, generator, guidance=w, **cond)


def sampling_recipe(N, stochastic_, sigma_min, sigma_max):
    """How to sample a stage-two student, stored in its file: Euler (= DDIM) or Meng's stochastic
    sampler over the explicit cosine grid `t_steps` (no solvers.time_schedule kind builds it)."""
    return solvers.Recipe('stochastic' if stochastic_ else 'euler', N, schedule='cosine', t_min=sigma_min,
                          t_max=sigma_max, ends_at_zero=True, t_steps=cosine_grid(N, sigma_min, sigma_max).tolist())


@torch.no_grad()
def sample_student(net, meta, z, w, generator=None, **cond):
    """Generate from unit noise z as a student file's recipe says (solvers.sample_with), at
    guidance w (float or [B]): stage two over its cosine grid, stage one with its stored solver."""
    return solvers.sample_with(net, z, meta['sampling'], generator=generator, guidance=w, **cond)


@torch.no_grad()
def guided_reference(D_w, z, w, sigma_min=0.002, sigma_max=80.0, steps=256, **cond):
    """The guided teacher's own ODE solution from sigma_max z to 0: DPM-Solver++(3M) with the full
    third-order update over 256 EDM steps, then the step to 0 that returns D (the students' end)."""
    t = solvers.append_zero(solvers.time_schedule(steps, sigma_min, sigma_max))
    return solvers.sample(D_w, sigma_max * z, t, 'dpmpp3m', full_third_order=True, guidance=w, **cond)


# ---------------------------------------------------------------------------------------------
# Data, the training loop, the two stages
# ---------------------------------------------------------------------------------------------

def data_source(spec, label_dim, dataset=None):
    """draw(n, generator) -> (x [n, ...], one-hot labels [n, C]): Alg. 1/3's x ~ D, with the data's
    own labels as the condition. `spec`: toy:<name> (fresh points every draw), 'cifar10' or an
    image zip/folder (data.load_images, scaled to [-1, 1]); `dataset` = (x, labels) overrides it."""
    eye = torch.eye(label_dim)
    if dataset is None and spec.startswith('toy:'):
        def draw(n, g):
            x, y = toy.toy_data(spec[4:], n, generator=g)
            return x, eye[y]
        return draw
    if dataset is None:
        dataset = data.load_images(spec)
    x_all, y_all = dataset
    if y_all.min() < 0 or y_all.max() >= label_dim:
        raise ValueError(f'the data need labels in [0, {label_dim}) for this teacher; got '
                         f'[{int(y_all.min())}, {int(y_all.max())}]')

    def draw(n, g):
        idx = torch.randint(len(x_all), (n,), generator=g)
        x = x_all[idx]
        return (x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x.float()), eye[y_all[idx]]
    return draw


def train(student, loss_fn, iters, cfg, ema, anneal, desc, stats, progress=True):
    """Adam on loss_fn(student) for `iters` updates with gradient clipping; lr constant or linearly
    annealed to 0 (`anneal`, App. B.3); returns the EMA copy if ema > 0 (App. B.2), else the student.
    One stats.jsonl row every cfg.tick updates."""
    opt = torch.optim.Adam(student.parameters(), lr=cfg.lr)  # a fresh optimiser every call (round)
    avg = copy.deepcopy(student).eval().requires_grad_(False) if ema > 0 else None
    total, count, t0 = 0.0, 0, time.time()
    for it in tqdm(range(iters), desc=desc, disable=None if progress else True):
        lr = cfg.lr * (1 - it / iters) if anneal else cfg.lr
        for group in opt.param_groups:
            group['lr'] = lr
        loss = loss_fn(student)
        if not torch.isfinite(loss):  # a NaN teacher or a diverging student: stop at this update
            raise FloatingPointError(f'{desc}: non-finite loss at update {it + 1}; lower --lr or check the teacher')
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
        opt.step()
        if avg is not None:
            with torch.no_grad():
                for p_avg, p in zip(avg.parameters(), student.parameters(), strict=True):
                    p_avg.lerp_(p, 1 - ema)
        total, count = total + loss.detach(), count + 1  # no per-update sync with the GPU
        if count == cfg.tick or it == iters - 1:
            mean = float(total) / count
            stats.write(json.dumps(dict(stage=desc, iteration=it + 1, loss=mean, lr=lr,
                                        it_per_s=count / (time.time() - t0))) + '\n')
            stats.flush()
            total, count, t0 = 0.0, 0, time.time()
    student.eval()
    return avg if avg is not None else student


def validate(cfg, stage):
    """One clear error for any setting that cannot work, naming its flag (nothing is loaded yet)."""
    def need(ok, flag, what):
        if not ok:
            raise ValueError(f'--{flag.replace("_", "-")} {getattr(cfg, flag)!r}: {what}')
    finite = lambda v: isinstance(v, (int, float)) and math.isfinite(v)
    need(cfg.sigma_dist in ('cosine', 'lognormal'), 'sigma_dist', 'choose cosine or lognormal')
    need(cfg.weighting in WEIGHTINGS + ('',), 'weighting', f'choose one of {", ".join(WEIGHTINGS)}')
    need(finite(cfg.w_min) and cfg.w_min >= 0, 'w_min', 'guidance strengths are >= 0 (w = 0: the conditional model)')
    need(finite(cfg.w_max) and cfg.w_max >= cfg.w_min, 'w_max', 'need w_min <= w_max')
    need(finite(cfg.sigma_min) and cfg.sigma_min > 0, 'sigma_min', 'need 0 < sigma_min < sigma_max')
    need(finite(cfg.sigma_max) and cfg.sigma_max > cfg.sigma_min, 'sigma_max', 'need 0 < sigma_min < sigma_max < inf')
    for flag in ('iters', 'round_iters', 'final_round_iters', 'batch', 'tick', 'start_n', 'end_n'):
        need(getattr(cfg, flag) >= 1, flag, 'must be a positive integer')
    need(finite(cfg.lr) and cfg.lr > 0, 'lr', 'the learning rate must be positive')
    need(finite(cfg.ema) and (cfg.ema == -1 or 0 <= cfg.ema < 1), 'ema', 'a decay in [0, 1), or -1 for the stage default')
    need(finite(cfg.grad_clip) and cfg.grad_clip >= 0, 'grad_clip', 'must be >= 0 (0 = off)')
    need(cfg.seed >= 0, 'seed', 'must be a non-negative integer')
    cli.device(cfg.device)
    if stage == 'stage2':
        ours = Path(cfg.teacher).suffix == '.pt' and Path(cfg.teacher).is_file()
        need(ours or latent.is_student(cfg.teacher),
             'teacher', 'stage two distils a stage-one (or stage-two) student file: runs/<run>/student.pt (a '
             'diffusers student: the folder runs/<run>/student)')
    return cfg


def _setup(cfg, stage):
    """Check the settings, fill the stage's defaults (weighting, EMA), choose the run folder:
    (cfg, device, run_dir). A new folder is numbered (runs/00003-guided-stage1-toy-ring); one that
    holds another run is refused. Stage two's name says which chain (-stochastic for Alg. 4)."""
    cfg = validate(copy.deepcopy(cfg), stage)
    cfg.weighting = cfg.weighting or ('edm' if stage == 'stage1' else 'snr_trunc')
    cfg.ema = cfg.ema if cfg.ema >= 0 else (0.9999 if stage == 'stage1' else 0.0)
    name = Path(cfg.teacher).parent.name if stage == 'stage2' else cfg.teacher.replace(':', '-')
    name = Path(name).name + ('-stochastic' if stage == 'stage2' and cfg.stochastic else '')
    if cfg.run_dir:
        cli.check_fresh_run_dir(cfg.run_dir)
    run_dir = Path(cfg.run_dir or cli.new_run_dir('runs', f'guided-{stage}-{name}'))
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    return cfg, cli.device(cfg.device), run_dir


def stage_one(cfg, dataset=None, progress=True, log=print):
    """Meng Alg. 1/2: train a w-conditioned student on D_w; writes run_dir/student.pt (the EMA
    network) and stats.jsonl. Returns (student, meta)."""
    cfg, device, run_dir = _setup(cfg, 'stage1')
    cfg.uncond = '' if cfg.teacher.startswith('toy:') else cfg.uncond  # toys: one joint net
    D_w, cond_net, tmeta = load_cfg_teacher(cfg.teacher, cfg.uncond, device)
    data_spec = tmeta.get('data', cfg.data)
    draw = _draw(cfg, cond_net, data_spec, dataset, log)
    student = make_student(cond_net)  # Alg. 1: eta_1 starts from the conditional teacher
    gen = torch.Generator().manual_seed(cfg.seed)  # every draw of the run, reproducible

    def loss_fn(net):
        x0, y = draw(cfg.batch, gen)   # Alg. 1, line 1: x ~ D (and its label c, or its caption)
        return stage_one_loss(net, D_w, x0.to(device), y, cfg, gen, cfg.weighting)
    log(f'stage one: {cfg.teacher} (+ {cfg.uncond or "null label"}), w ~ U[{cfg.w_min:g}, {cfg.w_max:g}], '
        f'sigma {cfg.sigma_dist}, {cfg.weighting} weighting, {cfg.iters} x {cfg.batch} -> {run_dir}')
    with cli.RunLock(run_dir), open(run_dir / 'stats.jsonl', 'a') as stats:
        net = train(student, loss_fn, cfg.iters, cfg, cfg.ema, False, 'stage1', stats, progress)
    shape = tmeta.get('shape') or [net.img_channels, net.img_resolution, net.img_resolution]
    # A stage-one student is a continuous-time D_w: any solver samples it (EDM's Heun; a diffusers
    # model its teacher's recipe, DPM-Solver++(2M) on diffusers' grid, now one call per step).
    meta = dict(kind='guided-stage1', teacher=cfg.teacher, uncond=cfg.uncond, data=data_spec, shape=shape,
                guidance_range=[cfg.w_min, cfg.w_max], stochastic=False, config=asdict(cfg),
                sampling=tmeta['sampling'] if isinstance(net, latent.Denoiser) else
                solvers.Recipe().to_dict())
    log(f'stage one: student written to {_save(run_dir, "student", net, "vp", meta)}')
    return net, meta


def _draw(cfg, net, spec, dataset, log):
    """Alg. 1/3's x ~ D: data_source, or for a text model captioned images (MS-COCO layout,
    captions.caption_data) on its trained levels (the cosine schedule clipped to them)."""
    if not isinstance(net, latent.Denoiser):
        return data_source(spec, net.label_dim, dataset)
    lo, hi = max(cfg.sigma_min, net.sigma_min), min(cfg.sigma_max, net.sigma_max)
    if (lo, hi) != (cfg.sigma_min, cfg.sigma_max):
        log(f'sigma range [{cfg.sigma_min:g}, {cfg.sigma_max:g}] clipped to the trained levels '
            f'[{lo:g}, {hi:g}]')
    cfg.sigma_min, cfg.sigma_max = lo, hi
    if not cfg.captions:
        raise ValueError('--captions: a text-conditioned teacher needs captioned images: '
                         '--data <image folder> --captions <MS-COCO captions .json>')
    return captions.caption_data(net, spec, cfg.captions)


def _save(run_dir, name, net, prior, meta):
    """A student file of ours (run_dir/<name>.pt), or a diffusers student folder run_dir/<name>."""
    if isinstance(net, latent.Denoiser):  # prior 'vp': sampled as its teacher; 'edm': from sigma_max z
        return latent.save_student(run_dir / name, net, prior=prior, **meta)
    return models.save_model(run_dir / f'{name}.pt', net, **meta)


def teacher_step(meta):
    """1 / (the step length in t) of a stage-two teacher file's sampler: any for a stage-one model
    (None), N for a deterministic N-step student, N / 2 for a stochastic one (its jumps are 2/N)."""
    if meta.get('kind') != 'guided-stage2':
        return None
    return meta['N'] // 2 if meta['stochastic'] else meta['N']


def rounds(cfg):
    """The students' step counts, round by round (App. B.3: start_n -> ... -> end_n, halving).
    Deterministic: N = start_n / 2, ..., end_n. Stochastic: N = start_n, ..., max(end_n, 2) (its
    2/N jump is the deterministic student's 1/(N/2) step; at N = 1 only Alg. 4's edge case is left,
    whose target is the teacher's D: nothing to distil)."""
    end = max(cfg.end_n, 2) if cfg.stochastic else cfg.end_n
    Ns = [cfg.start_n if cfg.stochastic else cfg.start_n // 2]
    while Ns[-1] > end and Ns[-1] % 2 == 0:
        Ns.append(Ns[-1] // 2)
    if Ns[-1] != end:
        raise ValueError(f'start_n={cfg.start_n} must be {end} times a power of two'
                         f'{"" if cfg.stochastic else " (at least 2)"} for end_n={cfg.end_n}')
    return Ns


def stage_two(cfg, dataset=None, progress=True, log=print):
    """Meng Alg. 3 (or Alg. 4 with cfg.stochastic) from a stage-one (or stage-two) student file:
    one round per halving, each student starting from its teacher with a fresh optimiser and an
    lr annealed to 0. Writes run_dir/student-n<N>.pt per round; returns their paths."""
    cfg, device, run_dir = _setup(cfg, 'stage2')
    teacher, tmeta = models.load(cfg.teacher, device)
    if not teacher.use_guidance_condition:
        raise ValueError(f'--teacher {cfg.teacher} has no guidance input: run stage1 first, pass its student')
    step = teacher_step(tmeta)
    if step is not None:  # continuing a chain: the teacher's grid fixes the first step and the range
        log(f'start_n = {step}: the step count of the teacher {cfg.teacher}')
        s = tmeta['sampling']
        cfg.start_n, cfg.sigma_min, cfg.sigma_max = step, s['t_min'], s['t_max']
    cfg.w_min, cfg.w_max = tmeta.get('guidance_range', [cfg.w_min, cfg.w_max])  # the w it learned
    cfg.captions = cfg.captions or tmeta.get('config', {}).get('captions', '')  # the stage-one data
    draw = _draw(cfg, teacher, tmeta.get('data', cfg.data), dataset, log)
    gen = torch.Generator().manual_seed(cfg.seed)
    paths = []
    with cli.RunLock(run_dir), open(run_dir / 'stats.jsonl', 'a') as stats:
        for N in rounds(cfg):
            teacher.eval().requires_grad_(False)
            student = copy.deepcopy(teacher).train().requires_grad_(True)  # Alg. 3: eta_2 <- eta

            def loss_fn(net, N=N, teacher=teacher):
                x0, y = draw(cfg.batch, gen)
                return stage_two_loss(net, teacher, x0.to(device), y, N, cfg, gen, cfg.weighting)
            iters = cfg.final_round_iters if N <= 2 else cfg.round_iters
            kind = 'stochastic' if cfg.stochastic else 'DDIM'
            log(f'stage two ({kind}): {N}-step student, {iters} x {cfg.batch} updates')
            student = train(student, loss_fn, iters, cfg, cfg.ema, True, f'stage2-n{N}', stats, progress)
            meta = dict(kind='guided-stage2', teacher=cfg.teacher, data=tmeta.get('data', cfg.data),
                        shape=tmeta.get('shape'), guidance_range=[cfg.w_min, cfg.w_max], N=N,
                        stochastic=cfg.stochastic, config=asdict(cfg),
                        sampling=sampling_recipe(N, cfg.stochastic, cfg.sigma_min, cfg.sigma_max))
            meta['sampling'] = meta['sampling'].to_dict()
            paths.append(_save(run_dir, f'student-n{N}', student, 'edm', meta))
            teacher = student  # Alg. 3: eta <- eta_2, N <- N / 2
    return paths


# ---------------------------------------------------------------------------------------------
# Toy evaluation and the command line
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def toy_table(paths, ws=(0.0, 1.0, 2.0, 4.0), n=2000, seed=0, ref_steps=256):
    """Metric A (mean distance to the guided teacher's ODE endpoint from the same noise) and the
    class-averaged sliced W2 to the class-conditional data, for stage-two students (files) and
    DDIM-with-CFG at equal NFE (N/2 steps) and at equal steps (2N NFE), at several w."""
    meta = models.load_meta(paths[0])
    while meta['kind'] == 'guided-stage2':  # up the lineage to the stage-one file
        meta = models.load_meta(meta['teacher'])
    name, D_w = models.toy_world(meta['teacher']), load_cfg_teacher(meta['teacher'])[0]
    image = name in toy.IMAGE_WORLDS  # metric A as per-pixel RMSE on a few images, no W2 (too few per class)
    if image:
        n, ref_steps = min(n, toy.IMAGE_EVAL_N), min(ref_steps, toy.IMAGE_REF_STEPS)
    x_data, y = toy.toy_data(name, n, generator=torch.Generator().manual_seed(seed + 99))
    onehot = torch.eye(toy.num_classes(name))[y]
    z = toy.eval_noise(n, shape=toy.sample_shape(name))
    sw2 = lambda a, b: sum(toy.sliced_wasserstein(a[y == c], b[y == c]) for c in y.unique()) / len(y.unique())
    head = 'RMSE (A)' if image else 'metric A  SW2 to data  SW2 to teacher'
    rows = ['   w  NFE  sampler                 ' + head]
    row = lambda w, nfe, label, x, ref: (f'{w:4g} {nfe:4d}  {label:<22}  ' + (
        f'{toy.rmse(x, ref):8.4f}' if image else
        f'{toy.fidelity(x, ref):8.4f}  {sw2(x, x_data):11.4f}  {sw2(x, ref):14.4f}'))
    students = [models.load(path) for path in paths]
    baseline_steps = sorted({k for _, m in students for k in (max(m['N'] // 2, 1), m['N'])}, reverse=True)
    for w in ws:
        ref = guided_reference(D_w, z, w, steps=ref_steps, class_labels=onehot)
        rows.append(row(w, 2 * (ref_steps + 1), 'teacher ODE (DPM++3M)', ref, ref))  # + the step to 0
        for net, m in students:
            x = sample_student(net, m, z, w, torch.Generator().manual_seed(seed), class_labels=onehot)
            rows.append(row(w, m['N'], f'student {m["sampling"]["solver"]} N={m["N"]}', x, ref))
        for k in baseline_steps:  # equal NFE (N/2 steps) and equal steps (2N NFE) for each student
            rows.append(row(w, 2 * k, f'DDIM-CFG {k} steps', ddim(D_w, z, k, w, class_labels=onehot), ref))
    return rows


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument('stage', choices=['stage1', 'stage2'])
    cli.add_config_flags(p, GuidedConfig, HELP)
    p.add_argument('--quiet', action='store_true', help='no progress bars')
    p.add_argument('--eval-n', type=int, default=2000, help='toy stage two: samples in the table (0: none)')
    args = p.parse_args(argv)
    cfg, explicit = cli.config_from_args(GuidedConfig, args)
    validate(cfg, args.stage)  # before the teacher's metadata is read
    world = models.toy_world(cfg.teacher)
    defaults = (IMAGE_DEFAULTS if world in toy.IMAGE_WORLDS else TOY_DEFAULTS if world else
                LATENT_DEFAULTS if latent.is_spec(cfg.teacher) else {})
    for k, v in defaults.items():  # toy and diffusers runs: their recipe for every setting not given
        if k not in explicit:
            setattr(cfg, k, v)
    if args.stage == 'stage1':
        stage_one(cfg, progress=not args.quiet)
    else:
        paths = stage_two(cfg, progress=not args.quiet)
        print(f'stage two done: {", ".join(str(q) for q in paths)}')
        if world and args.eval_n > 0:
            print('\n'.join(toy_table(paths[-3:], n=args.eval_n)))


# --help shows our default and, where we scale down or choose, the paper's (App. B, official configs).
HELP = {
    'teacher': 'stage1: conditional teacher (EDM preset, .pkl, .pt or toy:<name>); stage2: a stage-one .pt',
    'uncond': "stage1: the unconditional branch (EDM preset/.pkl); '' = the teacher's null label",
    'sigma_dist': 'stage-one noise levels: cosine = Meng Alg. 1 (t ~ U[0,1]); lognormal = EDM training',
    'weighting': 'edm | snr | snr_trunc | constant; default edm (stage one; official: snr), '
                 'snr_trunc (stage two, as the paper)',
    'iters': 'stage-one updates (paper: not stated; toy: 3000)',
    'start_n': 'DDIM steps of the first stage-two teacher (paper 1024; toy: 16)',
    'round_iters': 'updates per halving (paper 50000; toy: 1500)',
    'final_round_iters': 'updates for the 2- and 1-step students (paper 100000; toy: 2000)',
    'lr': 'Adam lr (official 1e-4 both stages; paper text says 1e-3 for stage one; toy: 1e-3)',
    'batch': 'batch size (paper 128; toy: 256)',
    'ema': 'EMA decay; -1 = 0.9999 for stage one (paper), none for stage two (paper); toy: 0.99 in both stages',
    'stochastic': 'stage two for the stochastic N-step sampler (Alg. 4)',
    'data': "x ~ D: 'cifar10' or an image zip/folder (toy teachers use their own data; text teachers: the "
            "image folder of --captions)",
    'captions': 'text teachers: an MS-COCO captions JSON naming the images in --data (stage two: '
                "stage one's)",
    'w_min': "guidance range [w_min, w_max] of stage one (paper [0, 4]); stage two keeps its teacher's",
    'sigma_min': 'cosine schedule in sigma: tan(a t + b) spans [sigma_min, sigma_max] (EDM range)',
    'end_n': 'steps of the last stage-two student (stochastic: at least 2)',
    'grad_clip': 'gradient-norm clip (official configs: 1; 0 = off)',
    'tick': 'updates per stats.jsonl row',
}

if __name__ == '__main__':
    cli.run(main)
