"""Guided distillation: Meng et al., On Distillation of Guided Diffusion Models (CVPR 2023).

Classifier-free guidance (CFG) evaluates a conditional and an unconditional model at every step
and mixes them, D_w = (1 + w) D_cond - w D_uncond. Meng et al. distil that into one network and
then into a few steps. This file holds the paper in its order, over `solvers.py`:

    stage one   Alg. 1/2  a student conditioned on w learns D_w for every w in [w_min, w_max]
    stage two   Alg. 3    progressive distillation: one student DDIM step = two teacher steps,
                          halving the step count each round (2N -> N -> ... -> 1)
                Alg. 4    the same for the N-step stochastic sampler (Sec. 3.3, Eq. 4-7)
    sampling    Eq. 2     DDIM with the student at any w; Eq. 4-7 the stochastic sampler;
                          the baseline, DDIM with CFG (two network calls per step)

All of it in EDM form (x = x0 + sigma z, denoiser D(x, sigma)). Meng's VP state z_t = alpha_t x0 +
sigma_t eps divided by alpha_t is our x at noise level sigma = sigma_t / alpha_t (SNR = 1 / sigma^2),
and Meng's x_hat(z_t) is our D(x, sigma). t_min / t_max name the range of sigma (the project's word
for noise levels, as in distill.py); Meng's t is time in [0, 1]. Copied next to `solvers.py` alone,
this file computes both stages' losses on any denoiser; a whole run (teachers by name, data, files,
resume, torchrun) is guided_pd_run.py around train.py's loop, with settings from presets.py.

    python guided_pd.py stage1 --teacher toy:ring     # both stages on a 2-D toy, minutes on a CPU
    python guided_pd.py stage2 --teacher runs/00000-guided-stage1-toy-ring/student.pt
    python guided_pd.py stage1        # CIFAR-10: NVIDIA's cond + uncond EDM nets (downloads)
    python guided_pd.py stage1 --teacher stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --data train2014 --captions captions_train2014.json     # SD: w through time_cond_proj_dim (a GPU)
"""

import copy
import math
from dataclasses import dataclass

import torch

import solvers

WEIGHTINGS = ('edm', 'snr', 'snr_trunc', 'constant')


@dataclass(frozen=True)
class GuidedConfig:
    """Settings of both stages; defaults are Meng App. B / the official CIFAR-10 configs (stage
    one); presets.py holds stage two's and the other worlds' recipes and resolves a run once."""
    teacher: str = 'cifar10-32x32-cond-vp'   # stage one: a conditional model spec; stage two: a student file
    uncond: str = 'cifar10-32x32-uncond-vp'  # stage one's unconditional branch; '' = the null label
    data: str = 'cifar10'                 # x ~ D (Alg. 1, 3): 'cifar10' or an image zip/folder
    captions: str = ''                    # text teachers: MS-COCO captions JSON naming the images in data
    w_min: float = 0.0                    # guidance range [w_min, w_max] (Sec. 4.1: [0, 4])
    w_max: float = 4.0
    sigma_dist: str = 'cosine'            # stage one noise levels: cosine (Meng) | lognormal (EDM)
    weighting: str = 'edm'                # edm (stage one) | snr | snr_trunc (stage two, App. B.3) | constant
    t_min: float = 0.002                  # the cosine schedule's noise levels (EDM's range)
    t_max: float = 80.0
    kimg: float = 6400.0                  # stage one, thousands of samples (50K updates of 128)
    start_n: int = 1024                   # stage two: DDIM steps of the first teacher (App. B.3)
    end_n: int = 1                        # stage two: steps of the last student
    stochastic: bool = False              # stage two for the stochastic sampler (Alg. 4)
    round_kimg: float = 6400.0            # per halving (App. B.3: 50K updates) ...
    final_round_kimg: float = 12800.0     # ... and for the 2- and 1-step students (100K)
    lr: float = 1e-4                      # Adam; stage one: paper text 1e-3, official config 1e-4
    batch: int = 128                      # samples per update, over all processes
    accumulate: int = 1                   # micro-batches per update (the same update in less memory)
    ema: float = 0.9999                   # EMA decay (App. B.2); stage two: none (0)
    grad_clip: float = 1.0                # official configs
    lora_rank: int = 0                    # diffusers stage one: LoRA adapters of this rank only (0: all)
    lora_alpha: float = 0.0               # the adapters' scale is alpha / rank; 0: alpha = rank
    lora_targets: str = ''                # the UNet layers adapted; '': attention + feed-forward (hub.py)
    w_init: str = 'zero'                  # stage one's w embedding: zero last layer (a no-op) | random
    w_lr_scale: float = 1.0               # its lr, in units of lr (the teacher's weights keep lr)
    seed: int = 0
    run_dir: str = ''                     # '' = a new folder runs/<00000>-guided-<stage>-<teacher>
    tick_kimg: float = 64.0               # one stats.jsonl row per tick
    snapshot_kimg: float = 500.0          # student + training state every so often (and at the end)
    device: str = 'auto'
    precision: str = 'auto'               # auto (bf16 autocast on CUDA) | fp32 | bf16
    compile: bool = False                 # torch.compile teacher and student (opt-in)
    compile_backend: str = 'inductor'


# ---------------------------------------------------------------------------------------------
# The cosine schedule in EDM form (Meng Sec. 2; Salimans & Ho 2022)
# ---------------------------------------------------------------------------------------------

def cosine_sigma(t, t_min=0.002, t_max=80.0):
    """sigma(t) for Meng's time t in [0, 1] (float64): tan(a t + b), clipped to [t_min, t_max], 0 at t = 0.

    Meng's cosine schedule alpha_t = cos(phi), sigma_t = sin(phi) has sigma_EDM = tan(phi) with
    phi = a t + b linear in t, i.e. logsnr(t) = -2 ln tan(a t + b). The official bounds logsnr in
    [-20, 20] (sigma up to 22026) put the top 0.8% of t above 80, where EDM networks were never
    trained, and clipping there would merge grid points; so a and b are chosen to make the curve
    itself span the EDM range: b = arctan(t_min), a = arctan(t_max) - b (the clip only removes
    round-off). sigma(0) := 0 is the data itself: a DDIM step to t = 0 returns D, so the last
    sampling step outputs the denoised sample and stage two's last target is the teacher's D.
    """
    b = math.atan(t_min)
    a = math.atan(t_max) - b
    t = torch.as_tensor(t, dtype=torch.float64)
    sigma = torch.tan(a * t + b).clamp(t_min, t_max)
    sigma = torch.where(t < 1, sigma, torch.full_like(sigma, t_max))  # exact at t = 1 (no round-off)
    return torch.where(t > 0, sigma, torch.zeros_like(sigma))


def cosine_grid(N, t_min=0.002, t_max=80.0):
    """The N-step grid sigma(i / N), i = N .. 0 (N + 1 values, the last 0): a solvers-style schedule.
    Grids nest: cosine_grid(2N)[::2] == cosine_grid(N), as progressive distillation needs."""
    return cosine_sigma(torch.arange(N, -1, -1, dtype=torch.float64) / N, t_min, t_max)


# ---------------------------------------------------------------------------------------------
# The guided teacher (Meng Sec. 2) and the stage-one student (Sec. 3.1)
# ---------------------------------------------------------------------------------------------

def guided_teacher(cond_net, uncond_net=None):
    """Classifier-free guidance as one denoiser D_w(x, sigma, class_labels, guidance=w), Meng's w
    (w = 0 is the conditional model; SFD's omega = 1 + w): (1 + w) D_cond - w D_uncond, with
    D_uncond = `uncond_net` or, for a jointly trained net, `cond_net` with the null label (zero
    one-hot). `w` is a number or a per-sample [B] tensor. Two network calls per evaluation."""
    def D_w(x, sigma, class_labels=None, guidance=0.0):
        return solvers.guided(cond_net, guidance, uncond_net)(x, sigma, class_labels=class_labels)
    return D_w


cfg_teacher = guided_teacher  # the name of earlier versions


W_INITS = ('zero', 'random')


def make_student(net, w_init='zero'):
    """Meng Sec. 3.1: the student starts as the conditional teacher plus a w input (added like the
    noise level's embedding), without dropout (App. B; EDM's U-Net blocks drop with p = 0.13 in
    train mode) or label dropout. `w_init`: 'zero' (the embedding's last layer is zero: an exact
    no-op until trained) or 'random' (a fresh Xavier-uniform last layer, as a new layer in Meng's
    code: the student starts off the teacher, by an amount that depends on w)."""
    if w_init not in W_INITS:
        raise ValueError(f'--w-init {w_init!r}: choose one of {", ".join(W_INITS)}')
    student = copy.deepcopy(net).train().requires_grad_(True)
    new = not student.use_guidance_condition
    if new:
        student.enable_guidance_condition()
    if w_init == 'random' and new:
        last = _w_embedding(student).layer1
        with torch.no_grad():
            torch.nn.init.xavier_uniform_(last.weight)
    off = set()
    for m in student.modules():  # EDM's U-Net blocks keep their p in `dropout`, its U-Nets `label_dropout`
        if hasattr(m, 'config'):
            continue  # a diffusers module: its dropout lives in its config (0 in Stable Diffusion)
        for k in ('dropout', 'label_dropout'):
            if type(getattr(m, k, None)) in (int, float):
                setattr(m, k, 0.0)
                off.add(k)
    if isinstance(getattr(student, 'init_kwargs', None), dict):
        student.init_kwargs.update(dict.fromkeys(off, 0.0))  # a file rebuilt from them keeps them off
    return student


def _w_embedding(student):
    """The w embedding of one of the project's networks (unet.py's U-Nets, toy.py's MLP), or an error."""
    emb = getattr(getattr(student, 'model', student), 'map_guidance', None)
    if emb is None:
        raise ValueError("--w-init random / --w-lr-scale: for the project's own networks (a diffusers "
                         'UNet takes w through its time_cond_proj_dim layers)')
    return emb


def param_groups(student, w_lr_scale=1.0):
    """Adam's parameter groups for stage one: the teacher's weights, and the new w embedding with
    its lr multiplied by `w_lr_scale` (train.py scales a group's lr by its 'lr_scale'). Frozen
    parameters (a LoRA student's base) are left out."""
    params = [p for p in student.parameters() if p.requires_grad]
    if w_lr_scale == 1.0:
        return [{'params': params}]
    new = {id(p) for p in _w_embedding(student).parameters()}
    return [{'params': [p for p in params if id(p) not in new]},
            {'params': [p for p in params if id(p) in new], 'lr_scale': w_lr_scale}]


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


def sample_sigma(kind, n, generator, t_min=0.002, t_max=80.0):
    """Stage one's noise levels. cosine: Meng Alg. 1, line 2, t ~ U(0, 1] through the cosine
    schedule, the same t-uniform law as stage two's grid points t = i/N, so stage one trains D_w
    at the noise levels in the proportion stage two and the samplers will query them (sigma is
    then half-Cauchy-like: median 1, 6% above 10). lognormal: EDM's training law ln sigma ~
    N(-1.2, 1.2^2), where the teacher itself is best trained, but which rarely visits sigma > 10."""
    if kind == 'cosine':
        return cosine_sigma(1 - torch.rand(n, generator=generator, dtype=torch.float64), t_min, t_max)
    if kind == 'lognormal':
        return (torch.randn(n, generator=generator, dtype=torch.float64) * 1.2 - 1.2).exp()
    raise ValueError(f"unknown sigma distribution {kind!r}; choose 'cosine' or 'lognormal'")


def _cond(y, device):
    """The network conditions of a draw: one-hot labels, or a dict (a text model's prompt embeddings)."""
    return {k: v.to(device) for k, v in y.items()} if isinstance(y, dict) else {'class_labels': y.to(device)}


def _bc(v, x):
    """A per-sample [B] tensor shaped to broadcast over x [B, ...]."""
    return v.reshape(-1, *[1] * (x.ndim - 1))


def stage_one_draws(shape, cfg, generator):
    """Alg. 1, line 2 for a batch of `shape`, on the CPU: (sigma = sigma(t), w ~ U[w_min, w_max], eps)."""
    sigma = sample_sigma(cfg.sigma_dist, shape[0], generator, cfg.t_min, cfg.t_max)      # t ~ U[0, 1]
    w = cfg.w_min + (cfg.w_max - cfg.w_min) * torch.rand(shape[0], generator=generator)  # w ~ U
    return sigma, w, torch.randn(shape, generator=generator)                             # eps ~ N(0, I)


def stage_one_loss(student, D_w, x0, y, cfg, generator, weighting='edm', draws=None, sigma_data=None):
    """One batch of Meng Alg. 1 (Alg. 2 is the same), line by line in EDM form. `draws`: line 2's
    (sigma, w, eps) made already (a slice of a larger batch's), else drawn here from `generator`."""
    dev = x0.device
    sigma, w, eps = stage_one_draws(x0.shape, cfg, generator) if draws is None else draws
    sigma, w, eps = sigma.to(dev), w.to(dev), eps.to(x0)
    x = x0 + _bc(sigma, x0).to(x0) * eps   # z_t = alpha_t x + sigma_t eps, divided by alpha_t
    with torch.inference_mode(), solvers.autocast(dev, cfg.precision):
        target = D_w(x, sigma, **_cond(y, dev), guidance=w)  # x_hat^w = (1 + w) x_hat_c - w x_hat
    target = target.clone()  # out of inference mode: usable in the graph
    with solvers.autocast(dev, cfg.precision):
        D = student(x, sigma, **_cond(y, dev), guidance=w)   # x_hat_eta1(z_t, w)
    # L = omega(lambda_t) ||x_hat^w - x_hat_eta1||^2
    return weighted_mse(D, target, loss_weight(weighting, sigma, sigma_data or student.sigma_data))


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


def stage_two_draws(shape, N, cfg, generator):
    """Alg. 3, lines 2-4 for a batch of `shape`, on the CPU: (i of t = i/N, i ~ Cat[1..N]; w; eps)."""
    i = torch.randint(1, N + 1, (shape[0],), generator=generator).double()
    w = cfg.w_min + (cfg.w_max - cfg.w_min) * torch.rand(shape[0], generator=generator)
    return i, w, torch.randn(shape, generator=generator)


def stage_two_loss(student, teacher, x0, y, N, cfg, generator, weighting='snr_trunc', draws=None,
                   sigma_data=None):
    """One batch of Meng Alg. 3 (deterministic) or Alg. 4 (cfg.stochastic), EDM form.

    Alg. 3: the student at t = i/N learns the teacher's two half steps t -> t - 0.5/N -> t - 1/N.
    Alg. 4: it learns a 2/N jump made of two teacher steps of 1/N, t -> t - 1/N -> t - 2/N,
    the jump the stochastic sampler takes (Eq. 4/6); at t = 1/N one teacher step, to 0.
    `draws`: (i, w, eps) made already (stage_two_draws), else drawn here from `generator`."""
    dev = x0.device
    i, w, eps = stage_two_draws(x0.shape, N, cfg, generator) if draws is None else draws
    w, eps = w.to(dev), eps.to(x0)
    h = 1.0 if cfg.stochastic else 0.5                                    # teacher step, in units of 1/N
    sigma, sigma1, sigma2 = (cosine_sigma(((i - k * h) / N).clamp(min=0), cfg.t_min, cfg.t_max).to(dev)
                             for k in (0, 1, 2))                          # t, t', t''
    x = x0 + _bc(sigma, x0).to(x0) * eps                                  # z_t, divided by alpha_t
    with solvers.autocast(dev, cfg.precision):
        target = two_step_target(teacher, x, sigma, sigma1, sigma2, **_cond(y, dev), guidance=w).clone()
        D = student(x, sigma, **_cond(y, dev), guidance=w)               # x_hat_eta2(z_t, w)
    # L = omega(lambda_t) ||x~^w - x_hat_eta2||^2
    return weighted_mse(D, target, loss_weight(weighting, sigma, sigma_data or student.sigma_data))


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


def round_kimg(cfg, N):
    """App. B.3: the length of the N-step student's round (the 2- and 1-step students train longer)."""
    return cfg.final_round_kimg if N <= 2 else cfg.round_kimg


def round_lr(cfg, i, n):
    """App. B.3: each round's lr decays linearly from cfg.lr to 0 over its n updates (i = 0 .. n-1)."""
    return cfg.lr * (1 - i / n)


def teacher_step(meta):
    """1 / (the step length in t) of a stage-two teacher file's sampler: any for a stage-one model
    (None), N for a deterministic N-step student, N / 2 for a stochastic one (its jumps are 2/N)."""
    if meta.get('kind') != 'guided-stage2':
        return None
    return meta['N'] // 2 if meta['stochastic'] else meta['N']


# ---------------------------------------------------------------------------------------------
# Sampling (Meng Sec. 3.3)
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def ddim(denoiser, z, N, w, t_min=0.002, t_max=80.0, **cond):
    """Deterministic N-step sampling from unit noise z: DDIM (Eq. 2) = Euler in EDM form over the
    cosine grid, at guidance w. With a w-conditioned student: N network calls. With the guided
    teacher D_w (guided_teacher): the baseline "DDIM with CFG", 2N calls."""
    return solvers.sample(denoiser, t_max * z, cosine_grid(N, t_min, t_max), 'euler', guidance=w, **cond)


@torch.no_grad()
def stochastic(net, z, N, w, generator=None, t_min=0.002, t_max=80.0, **cond):
    """The N-step stochastic sampler (Eq. 4-7; solvers.stochastic_sample): from t = k/N a DDIM jump
    to (k - 2)/N, then fresh noise back up to (k - 1)/N; at t = 1/N the student's D. N calls."""
    t_steps = cosine_grid(N, t_min, t_max)
    return solvers.stochastic_sample(net, t_max * z, t_steps, generator, guidance=w, **cond)


def sampling_recipe(N, stochastic_, t_min, t_max):
    """How to sample a stage-two student, stored in its file: Euler (= DDIM) or Meng's stochastic
    sampler over the explicit cosine grid `t_steps` (no solvers.time_schedule kind builds it)."""
    return solvers.Recipe('stochastic' if stochastic_ else 'euler', N, schedule='cosine', t_min=t_min,
                          t_max=t_max, ends_at_zero=True, t_steps=cosine_grid(N, t_min, t_max).tolist())


@torch.no_grad()
def sample_student(net, meta, z, w, generator=None, **cond):
    """Generate from unit noise z as a student file's recipe says (solvers.sample_with), at
    guidance w (float or [B]): stage two over its cosine grid, stage one with its stored solver."""
    return solvers.sample_with(net, z, meta['sampling'], generator=generator, guidance=w, **cond)


@torch.no_grad()
def guided_reference(D_w, z, w, t_min=0.002, t_max=80.0, steps=256, **cond):
    """The guided teacher's own ODE solution from t_max z to 0: DPM-Solver++(3M) with the full
    third-order update over 256 EDM steps, then the step to 0 that returns D (the students' end)."""
    t = solvers.append_zero(solvers.time_schedule(steps, t_min, t_max))
    return solvers.sample(D_w, t_max * z, t, 'dpmpp3m', full_third_order=True, guidance=w, **cond)


# ---------------------------------------------------------------------------------------------
# Whole runs and the command line (the machinery is imported only here: guided_pd_run.py)
# ---------------------------------------------------------------------------------------------

def apply_defaults(cfg, stage, explicit=None):
    """`cfg` with its world's preset of `stage` (presets.GUIDED) for every field not in `explicit`
    (None: every field that differs from the paper's default); not yet validated."""
    import guided_pd_run
    return guided_pd_run.apply_defaults(cfg, stage, explicit)


def stage_one(cfg, dataset=None, progress=True, log=print, **run):
    """Meng Alg. 1/2, a whole run: (student, meta); run_dir/student.pt is the EMA network. `run`:
    resume (a run folder), stop_at_iteration, explicit (the fields to merge on resume); guided_pd_run.run."""
    import guided_pd_run
    return guided_pd_run.run('stage1', cfg, dataset, progress, log, **run)


def stage_two(cfg, dataset=None, progress=True, log=print, **run):
    """Meng Alg. 3 (Alg. 4 with cfg.stochastic) from a stage-one (or stage-two) student file, a round
    per halving: the paths of run_dir/student-n<N>.pt, N = start_n / 2, ..., end_n."""
    import guided_pd_run
    return guided_pd_run.run('stage2', cfg, dataset, progress, log, **run)


def main(argv=None):
    """python guided_pd.py stage1|stage2 [--flags]: settings (presets.py), the run, the toy table."""
    import guided_pd_run
    guided_pd_run.main(argv, __doc__)


if __name__ == '__main__':
    import cli
    cli.run(main)
