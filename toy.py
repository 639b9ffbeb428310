"""Worlds small enough for a CPU: 2-D points, and small CIFAR-10 images, with teachers trained here.

2-D points. Data are points in the plane with class labels; the teacher is a small MLP denoiser
wrapped in EDM's preconditioning (`unet.EDMPrecond`), trained with EDM's loss (Karras et al. 2022,
Sec. 5: log-normal noise levels, weight (sigma^2 + sigma_data^2) / (sigma sigma_data)^2),
optionally with label dropout so it also serves as its own unconditional model for
classifier-free guidance.

Images. `cifar10-16` is CIFAR-10 average-pooled 2x2 to 16x16 with EDM's DDPM++ (`unet.SongUNet`,
1.75M parameters), EDM's preconditioning and loss, random x-flips and an EMA: 200 kimg, about 16
minutes on two quiet CPU cores (100 kimg of this recipe measured 7.8 min), and its 35-NFE Heun
samples look like CIFAR-10 at 16x16 (notebook 04). `cifar10-32` is the
same code at full resolution with a wider net, for a GPU. The images come from the official
CIFAR-10 archive (data.load_cifar10), or from an EDM-style zip or folder named by $SFD_CIFAR10.

Every world speaks the project's denoiser protocol, so every solver, SFD and guided distillation
run on it unchanged, and the exact quantities they optimise can be measured:

  fidelity (SFD Fig. 3's notion)  mean distance of a sample to the teacher's own very fine ODE
                                  solution from the same noise ("metric A"); for images the
                                  per-pixel RMSE, the distance / sqrt(C H W) (`rmse`);
  distribution distance            sliced Wasserstein-2 distance between sample sets.

As model specs (models.py) `toy:<world>` and `toy:<world>:cond` are trained once and cached.

    python toy.py ring              # train a ring teacher (about 30 s) and print every
                                    # solver's fidelity at a few NFE
    python models.py toy:cifar10-16 # train (once, ~16 min on 2 cores) and cache the image teacher
    python toy.py cifar10-16 --real-npz real16.npz   # its real 16x16 images, for `fid.py ref`
"""

import copy
import dataclasses
import math
import os
import sys
import time

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

import cli
import data
import solvers
import train
import unet

DATASETS = ('ring', 'checkerboard', 'moons')  # the 2-D worlds
SIGMA_DATA = 0.5  # EDMPrecond's sigma_data for the toys (with 0.7 the MLP barely trains); EDM's for images


# ---------------------------------------------------------------------------------------------
# Data sets: points with labels, roughly of unit scale
# ---------------------------------------------------------------------------------------------

def toy_data(name, n, generator=None):
    """n points of a 2-D data set and their integer class labels: (x [n, 2], y [n]).

    ring          8 Gaussians (std 0.05) on the unit circle; the label is the Gaussian.
    checkerboard  uniform on the 8 black squares of a 4 x 4 board on [-1, 1]^2; label = square.
    moons         two interleaved half circles with noise 0.05; label = moon.
    An image world (IMAGE_WORLDS) gives n of its real training images, drawn uniformly with
    replacement, in [-1, 1]: (x [n, 3, R, R], y [n]) (SFD Alg. 3's and Meng Alg. 1's x ~ D).
    """
    g = generator
    if name in IMAGE_WORLDS:
        s = teacher_settings(name)
        x, y = image_data(s['source'], s['resolution'], s['max_images'])
        pick = torch.randint(len(x), (n,), generator=g)
        return data.to_float(x[pick]), y[pick]
    if name == 'ring':
        y = torch.randint(0, 8, (n,), generator=g)
        angle = 2 * math.pi * y / 8
        x = torch.stack([angle.cos(), angle.sin()], 1) + 0.05 * torch.randn(n, 2, generator=g)
    elif name == 'checkerboard':
        y = torch.randint(0, 8, (n,), generator=g)
        row, col = y // 2, 2 * (y % 2) + (y // 2) % 2  # black squares: row + col even
        cell = torch.stack([col, row], 1).float()
        x = (cell + torch.rand(n, 2, generator=g)) / 2 - 1
    elif name == 'moons':
        y = torch.randint(0, 2, (n,), generator=g)
        angle = math.pi * torch.rand(n, generator=g)
        upper = torch.stack([angle.cos(), angle.sin()], 1)
        lower = torch.stack([1 - angle.cos(), 0.5 - angle.sin()], 1)
        x = torch.where(y[:, None] == 0, upper, lower) - torch.tensor([0.5, 0.25])
        x = x / 1.2 + 0.05 * torch.randn(n, 2, generator=g)
    else:
        raise ValueError(f'unknown toy data set {name!r}; choose one of {WORLDS}')
    return x, y


def num_classes(name):
    """The number of classes of a world (CIFAR-10's 10 for the image worlds)."""
    if name in IMAGE_WORLDS:
        return len(data.CIFAR10_CLASSES)
    return {'ring': 8, 'checkerboard': 8, 'moons': 2}[name]


def sample_shape(name):
    """One sample's shape in a world: [2] for points, [3, R, R] for images."""
    if name in IMAGE_WORLDS:
        return [3, IMAGE_WORLDS[name]['resolution'], IMAGE_WORLDS[name]['resolution']]
    return [2]


# ---------------------------------------------------------------------------------------------
# The toy denoiser and its training
# ---------------------------------------------------------------------------------------------

def toy_net(label_dim=0, width=256, depth=4):
    """An MLP denoiser for 2-D points (unet.ToyMLP) wrapped in EDM's preconditioning (unet.EDMPrecond)."""
    return unet.EDMPrecond(img_resolution=1, img_channels=2, label_dim=label_dim, sigma_data=SIGMA_DATA,
                           model_type='ToyMLP', width=width, depth=depth)


def edm_loss(net, x, class_labels=None, generator=None, P_mean=-1.2, P_std=1.2):
    """EDM's training loss (Karras et al. 2022, Eq. 8 and Table 1): sigma ~ exp(N(P_mean, P_std^2)),
    lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2, loss = lambda ||D(x + n) - x||^2,
    summed over each sample's elements and averaged over the batch (as EDM's training loop)."""
    sigma = (torch.randn(x.shape[0], generator=generator) * P_std + P_mean).exp().to(x)
    s, sd = sigma.reshape(-1, *[1] * (x.ndim - 1)), net.sigma_data
    noise = torch.randn(x.shape, generator=generator).to(x) * s
    weight = (s ** 2 + sd ** 2) / (s * sd) ** 2
    D = net(x + noise, sigma, class_labels=class_labels)
    return (weight * (D - x) ** 2).flatten(1).sum(1).mean()


class EDMJob:
    """A teacher's training as a job of train.py's loop: one update of EDM's loss per iteration."""

    def __init__(self, net, optimizer, draw):
        self.student, self.optimizer, self.draw = net, optimizer, draw

    def iteration(self, loop):
        x, labels = self.draw(loop.gen)  # the batch first, then edm_loss's noise: one random stream
        loss = loop.update([lambda: edm_loss(loop.model, x, labels, generator=loop.gen)])
        return [float(loss)]

    def save(self, net, loop):  # teachers are returned (models.py caches them), no run folder
        return None


def fit_teacher(job, settings, run_dir=None):
    """train.fit on this process alone (torchrun's other ranks wait for the cached file); the EMA
    network (eval mode), or KeyboardInterrupt if a signal stopped it (a half-trained teacher is not
    cached). With `run_dir` the training keeps snapshots there and continues from them: a teacher
    interrupted at 13% starts again at 13%. Off a terminal, a line per tick says how far it is."""
    state = train.read_state(run_dir) if run_dir else None
    if state is not None:
        print(f'{settings.desc}: continuing from iteration {state["iteration"]} of {settings.iterations} '
              f'({run_dir})', file=sys.stderr)
    settings = dataclasses.replace(settings, distributed=False, snapshot_kimg=settings.iterations * settings.batch
                                   / 20000)  # a snapshot every 5%
    loop = train.fit(job, settings, run_dir, state, on_tick=None if sys.stderr.isatty() else _tick_line(settings))
    if loop.interrupted:
        raise KeyboardInterrupt
    return loop.ema


def _tick_line(settings):
    """A progress line per tick for a log file (a progress bar draws only on a terminal)."""
    return lambda row, net: print(f'{settings.desc}: iteration {row["iteration"]} of {settings.iterations}, '
                                  f'loss {row["loss"]:.4g}, {row["img_per_s"]:.0f} img/s', file=sys.stderr)


def train_toy(name, label_dropout=0.0, steps=3000, batch=512, lr=2e-3, ema=0.995, seed=0,
              device='cpu', progress=True, run_dir=None):
    """Train a toy teacher from scratch; returns the EMA network in eval mode.

    With `label_dropout` > 0 the network is class-conditional and sees the null label (a zero
    one-hot) that often, so it is also its own unconditional model (classifier-free guidance).
    Adam at `lr`, constant, then a linear decay over the last 30% of the steps; EMA decay `ema`.
    """
    torch.manual_seed(seed)
    C = num_classes(name) if label_dropout > 0 else 0
    net = toy_net(label_dim=C).to(device).train()
    toy_net(label_dim=C)  # the cached teachers' EMA copy was built so: the same global random stream after

    def draw(g):
        x, y = toy_data(name, batch, generator=g)
        labels = None
        if C:
            keep = (torch.rand(batch, generator=g) >= label_dropout).float()
            labels = (torch.nn.functional.one_hot(y, C).float() * keep[:, None]).to(device)
        return x.to(device), labels
    job = EDMJob(net, torch.optim.Adam(net.parameters(), lr=lr), draw)
    return fit_teacher(job, train.Settings(
        iterations=steps, batch=batch, seed=seed, lr=lambda i: lr * min(1.0, (steps - i) / (0.3 * steps)),
        ema=ema, precision='fp32', desc=f'train toy:{name}', unit='it', progress=progress,
        tick_kimg=steps * batch / 10000), run_dir)


def teacher_settings(name, cond=False):
    """The training settings of the cached teacher `toy:<name>[:cond]` (models.py caches by them):
    `cond` adds label dropout 0.1, so the network is its own unconditional model for guidance.
    An image world's settings name its data source (image_source) and, with $SFD_TOY_QUICK=1, are
    the tiny quick ones (QUICK_IMAGES: tests and the notebooks' quick mode; cached separately)."""
    if name in DATASETS:
        return dict(name=name, label_dropout=0.1 if cond else 0.0)
    if name not in IMAGE_WORLDS:
        raise ValueError(f'unknown toy world {name!r}; choose one of {WORLDS}')
    s = copy.deepcopy(IMAGE_WORLDS[name])
    if os.environ.get('SFD_TOY_QUICK', '') not in ('', '0'):
        s.update(copy.deepcopy(QUICK_IMAGES))
    return dict(name=name, label_dropout=0.1 if cond else 0.0, source=image_source(), **s)


def train_teacher(settings, device='cpu', progress=True, run_dir=None):
    """Train the teacher that teacher_settings(...) describes (train_toy or train_images), with
    its snapshots in `run_dir` if given (an interrupted training continues there)."""
    s = dict(settings)
    name = s.pop('name')
    trainer = train_images if name in IMAGE_WORLDS else train_toy
    return trainer(name, **s, device=device, progress=progress, run_dir=run_dir)


# ---------------------------------------------------------------------------------------------
# Image worlds: CIFAR-10 at 16x16 (a CPU) and 32x32 (a GPU), EDM's DDPM++ trained here
# ---------------------------------------------------------------------------------------------

# The recipe of each image world. cifar10-16 was sized by a calibration run that estimated 325
# img/s on 2 CPU cores (153 kimg already gave CIFAR-like Heun samples); a 100 kimg run of this
# recipe took 7.8 min on 2 quiet cores (214 img/s), so its 200 kimg take ~16 min. DDPM++ at 1/4
# of EDM's width, two levels of down-sampling, attention at 8x8, no dropout. Adam at lr 2e-3
# after a short linear warm-up (EDM ramps its lr up over 10 Mimg; a short run needs a shorter
# ramp), and an EMA whose decay grows as
# (1 + i) / (10 + i) up to `ema_max` (a short run's stand-in for EDM's ramped half-life).
# cifar10-32 is the same code for a GPU (bf16 autocast: use_fp16) at EDM's resolution: about
# 8 minutes on one large GPU, never run here.
IMAGE_WORLDS = {
    'cifar10-16': dict(resolution=16, kimg=200.0, batch=128, lr=2e-3, lr_rampup_kimg=5.0, ema_max=0.999,
                       max_images=None, net=dict(model_channels=32, channel_mult=[1, 2, 2], num_blocks=2,
                                                 attn_resolutions=[8])),
    'cifar10-32': dict(resolution=32, kimg=4000.0, batch=512, lr=1e-3, lr_rampup_kimg=200.0, ema_max=0.9995,
                       max_images=None, net=dict(model_channels=64, channel_mult=[1, 2, 2, 2], num_blocks=2,
                                                 attn_resolutions=[16], use_fp16=True)),
}
# $SFD_TOY_QUICK=1: a tiny net for a few iterations on an evenly spread 1,000-image subset, through
# the same code (the tests' and the notebooks' quick mode; its samples are blobs).
QUICK_IMAGES = dict(kimg=0.096, batch=16, lr_rampup_kimg=0.0, max_images=1000,
                    net=dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8]))
WORLDS = DATASETS + tuple(IMAGE_WORLDS)
_IMAGES = {}  # (source, resolution, max_images) -> (uint8 images, labels): each is read once per process


def image_source():
    """Where the CIFAR-10 training images come from: $SFD_CIFAR10 (an EDM-style zip or folder of
    32x32 images with dataset.json labels) or 'cifar10', the official archive (data.load_cifar10)."""
    return os.environ.get('SFD_CIFAR10') or 'cifar10'


def image_data(source, resolution, max_images=None):
    """CIFAR-10 training images average-pooled to `resolution` (uint8 [N, 3, R, R]) and labels [N]
    (-1 where a zip has none); `max_images` takes that many, evenly spread (zips are in class order)."""
    key = (str(source), resolution, max_images)
    if key in _IMAGES:
        return _IMAGES[key]
    where = 'the CIFAR-10 archive' if source == 'cifar10' else f'SFD_CIFAR10={source}'
    if source == 'cifar10':
        try:
            x, y = data.load_cifar10('train')
        except RuntimeError as e:  # offline: say the other way to give the images
            raise data.DownloadError(f'{e} Or set SFD_CIFAR10 to an EDM-style zip or folder of the '
                                     'CIFAR-10 training images.') from e
        pick = range(len(x)) if max_images is None else torch.linspace(0, len(x) - 1, max_images).long()
        x, y = x[pick], y[pick]
    else:
        ds = data.ImageZipDataset(source)
        pick = range(len(ds)) if max_images is None else torch.linspace(0, len(ds) - 1, max_images).long()
        items = [ds[int(i)] for i in tqdm(pick, desc=f'read {ds.path.name}',
                                           disable=None if len(pick) >= 5000 else True)]
        x, y = torch.stack([a for a, _ in items]), torch.tensor([b for _, b in items])
    if tuple(x.shape[1:]) != (3, 32, 32) or 32 % resolution:
        raise ValueError(f'{where}: expected CIFAR-10 images [3, 32, 32] (for {resolution}x{resolution}), '
                         f'found {list(x.shape[1:])}; point SFD_CIFAR10 at a CIFAR-10 zip or unset it')
    if resolution < 32:  # a 2x2 (or larger) box filter: each pixel the mean of a k x k block
        x = F.avg_pool2d(x.float(), 32 // resolution).round().to(torch.uint8)
    _IMAGES[key] = (x, y)
    return x, y


def image_net(resolution, label_dim=0, **net):
    """EDM's DDPM++ (SongUNet with positional noise embedding) at `resolution`, in EDM's
    preconditioning with sigma_data = 0.5; `net`: the U-Net's widths and depth."""
    return unet.EDMPrecond(img_resolution=resolution, img_channels=3, label_dim=label_dim,
                           sigma_data=SIGMA_DATA, model_type='SongUNet', dropout=0.0, **net)


def train_images(name, label_dropout=0.0, resolution=16, kimg=200.0, batch=128, lr=2e-3, lr_rampup_kimg=5.0,
                 ema_max=0.999, max_images=None, net=None, source='cifar10', seed=0, device='cpu',
                 progress=True, run_dir=None):
    """Train an image teacher from scratch (EDM's recipe, scaled down); returns the EMA network.

    Each iteration draws a batch of real images (uniformly, with replacement), flips each one
    left-right with probability 1/2 (EDM's --xflip), and with `label_dropout` > 0 replaces a
    label by the null label (a zero one-hot) that often: one network, conditional and its own
    unconditional model, the classifier-free guidance pair (Ho & Salimans 2021)."""
    x_all, y_all = image_data(source, resolution, max_images)
    C = num_classes(name) if label_dropout > 0 else 0
    if C and (y_all < 0).any():
        raise ValueError(f'{source}: a class-conditional teacher needs labels (dataset.json) for every image')
    torch.manual_seed(seed)
    model = image_net(resolution, C, **(net or {})).to(device).train()

    def draw(g):
        pick = torch.randint(len(x_all), (batch,), generator=g)
        x = data.to_float(x_all[pick])
        flip = torch.rand(batch, generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        labels = None
        if C:
            keep = (torch.rand(batch, generator=g) >= label_dropout).float()
            labels = (F.one_hot(y_all[pick], C).float() * keep[:, None]).to(device)
        return x.to(device), labels
    job = EDMJob(model, torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8), draw)
    return fit_teacher(job, train.Settings(
        iterations=math.ceil(kimg * 1000 / batch), batch=batch, seed=seed,
        # a linear warm-up over lr_rampup_kimg, then constant; the EMA's decay grows to ema_max
        lr=lambda it: lr * min(1.0, (it + 1) * batch / max(lr_rampup_kimg * 1000, 1)),
        ema=lambda it: min(ema_max, (1 + it) / (10 + it)), precision='fp32',
        desc=f'train toy:{name}{":cond" if C else ""}', unit='it', progress=progress,
        tick_kimg=kimg / 20), run_dir)


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------

def fidelity(x, reference):
    """Metric A: mean Euclidean distance between each sample and its reference (same noise)."""
    return (x - reference).flatten(1).norm(dim=1).mean().item()


def sliced_wasserstein(a, b, projections=256, seed=0):
    """Sliced Wasserstein-2 distance between two equally sized point sets: the root mean square,
    over random unit directions, of the 1-D W2 distance between the projected (sorted) sets."""
    n = min(len(a), len(b))
    a, b = a[:n].double().flatten(1), b[:n].double().flatten(1)
    theta = torch.randn(a.shape[1], projections, generator=torch.Generator().manual_seed(seed),
                        dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    pa, pb = (a @ theta).sort(0).values, (b @ theta).sort(0).values
    return (pa - pb).square().mean().sqrt().item()


def rmse(x, reference):
    """Metric A for images: the per-pixel RMSE to the reference (same noise), averaged over samples
    (each sample's distance / sqrt(C H W)); images in [-1, 1]."""
    return (x - reference).flatten(1).square().mean(1).sqrt().mean().item()


def eval_noise(n=2000, seed=1234, shape=(2,)):
    """Fixed unit noise for evaluations: every method is compared from the same starting points."""
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def reference_solution(teacher, z, t_min=0.006, t_max=80., steps=256, **cond):
    """The teacher's own ODE solution from t_max * z to t_min: DPM-Solver++ with the full
    third-order update over 256 polynomial steps. Its distance to a 2048-step Heun solve is
    ~1e-5 on the ring teacher, far below every few-step error measured here (> 0.01)."""
    return solvers.sample(teacher, t_max * z, solvers.time_schedule(steps, t_min, t_max), 'dpmpp3m',
                          full_third_order=True, **cond)


@torch.no_grad()
def local_step_errors(denoiser, trajectory, t_steps, **cond):
    """SFD Eq. 7 / 8 (Fig. 3): for every step n, the mean L2 distance between the teacher's state
    x_n and one Euler step of `denoiser` from the teacher's x_{n+1}. With the teacher itself as
    the denoiser this is the baseline (Eq. 7); with a fine-tuned student it is Eq. 8.
    `trajectory` [n + 1, B, ...] holds the teacher's states at `t_steps` (largest t first)."""
    t = [float(v) for v in t_steps]
    return [fidelity(solvers.euler_step(denoiser, trajectory[i], t[i], t[i + 1], **cond), trajectory[i + 1])
            for i in range(len(t) - 1)]


@torch.no_grad()
def evaluate(denoiser, sampling, teacher_ref, data_ref, z, nfe=None, **cond):
    """(fidelity to the teacher's ODE solution, sliced W2 to data) of a sampling configuration."""
    x = solvers.sample_with(denoiser, z, sampling, nfe=nfe, **cond)
    return fidelity(x, teacher_ref), sliced_wasserstein(x, data_ref)


def solver_config(solver, nfe, t_min=0.006, t_max=80., **options):
    """The baselines' recipe: a training-free solver on the same polynomial schedule, ending at
    t_min as the students do (options: e.g. afs=True)."""
    return solvers.Recipe(solver, nfe, t_min=t_min, t_max=t_max, ends_at_zero=False, **options)


IMAGE_EVAL_N = 64  # samples in an image world's before/after table
IMAGE_REF_STEPS = 128  # its reference: 2e-5 per-pixel RMSE from a 512-step solve (toy:cifar10-16, 16 samples)


def before_after_table(name, student, meta, teacher, first_stage=None, n=2000, ref_steps=None):
    """The student against DPM-Solver++(3M) and Euler at equal NFE, from the same noise; with
    `first_stage` = (net, meta) of an SFD/SFD-v model, also that model at the same NFE. Points:
    fidelity (A) and sliced W2 to data; images: metric A as per-pixel RMSE (at most IMAGE_EVAL_N
    samples). The reference: the teacher's fine solve over `ref_steps` (default 256; images 128)."""
    s = solvers.Recipe.from_dict(meta['sampling']).to_dict()
    image = name in IMAGE_WORLDS
    n = min(n, IMAGE_EVAL_N) if image else n
    z = eval_noise(n, shape=sample_shape(name))
    ref_steps = ref_steps or (IMAGE_REF_STEPS if image else 256)
    ref = reference_solution(teacher, z, s['t_min'], s['t_max'], steps=ref_steps)
    data_ref = toy_data(name, n, generator=torch.Generator().manual_seed(99))[0]
    nfes = s['nfe'] if isinstance(s['nfe'], list) else [s['nfe']]
    head = 'RMSE (A)' if image else 'fidelity (A)  sliced W2 to data'
    rows = [f'NFE  method            {head}',
            '  -  teacher ODE         0.0000' if image else
            f'  -  teacher ODE       {0:12.4f}  {sliced_wasserstein(ref, data_ref):12.4f}']
    for k in nfes:
        runs = [('student', student, s, {}),
                ('DPM-Solver++(3M)', teacher, solver_config('dpmpp3m', k, s['t_min'], s['t_max']), {}),
                ('Euler', teacher, solver_config('euler', k, s['t_min'], s['t_max']), {})]
        if first_stage is not None:
            net, m = first_stage
            # SFD-v's step condition is the number of timestamps, NFE + AFS + 1 (also for an
            # NFE it was not trained at).
            step = {'step': k + int(m['sampling']['afs']) + 1} if net.use_step_condition else {}
            runs.append(('first stage', net, m['sampling'], step))
        for label, net, cfg, cond in runs:
            if image:
                with torch.no_grad():
                    x = solvers.sample_with(net.eval(), z, cfg, nfe=k, **cond)
                values = [rmse(x, ref)]
                rows.append(f'{k:3d}  {label:<16}  {values[0]:8.4f}')
            else:
                values = evaluate(net.eval(), cfg, ref, data_ref, z, nfe=k, **cond)
                rows.append(f'{k:3d}  {label:<16}  {values[0]:12.4f}  {values[1]:12.4f}')
            if not all(math.isfinite(v) for v in values):  # a number that is no result is never printed
                raise FloatingPointError(f'{label} at {k} NFE gives non-finite samples (t_max {s["t_max"]:g}): '
                                         'the run diverged or its levels lie outside the teacher\'s range')
    return '\n'.join(rows)


def save_real_npz(name, path):
    """An image world's real training images (image_data: pooled as its teacher saw them) as uint8
    [N, H, W, C] under 'images', the npz layout fid.py reads (fid.IMAGES_KEY); returns N."""
    s = teacher_settings(name)
    x = image_data(s['source'], s['resolution'], s['max_images'])[0]

    def write(tmp):
        with open(tmp, 'wb') as f:  # a file object, so numpy does not append '.npz' to tmp
            np.savez(f, images=x.permute(0, 2, 3, 1).numpy())
    data.atomic_write(path, write)
    return len(x)


def main(argv=None):
    """python toy.py [world]: train its teacher here (uncached) and print every solver's metric A."""
    p = cli.parser('Train a teacher of a world (uncached: `python models.py toy:<world>` caches it) and '
                   'measure the solvers on it.')
    p.add_argument('name', nargs='?', default='ring', choices=WORLDS)
    p.add_argument('--cond', action='store_true', help='class-conditional with label dropout 0.1')
    p.add_argument('--device', default='cpu', help='cpu or cuda (cifar10-32 is meant for a GPU)')
    p.add_argument('--real-npz', metavar='PATH', help="image worlds: write the real training images as the "
                   "teacher sees them (pooled) to an npz for `fid.py ref --data PATH`, and exit")
    args = p.parse_args(argv)
    device = cli.device(args.device)  # a device that is not there: one line, before any training
    if args.real_npz:
        if args.name not in IMAGE_WORLDS:
            p.error(f'--real-npz needs an image world ({", ".join(IMAGE_WORLDS)}), not {args.name!r}')
        data.check_suffix(args.real_npz, '--real-npz', ('.npz',), 'an npz of images')
        data.check_writable(args.real_npz, '--real-npz')
        print(f'{save_real_npz(args.name, args.real_npz)} images -> {args.real_npz}')
        return
    t0 = time.time()
    teacher = train_teacher(teacher_settings(args.name, args.cond), device=device)
    print(f'toy:{args.name} teacher, trained in {time.time() - t0:.0f} s (models.load caches it as a spec)')
    image = args.name in IMAGE_WORLDS
    z = eval_noise(64 if image else 2000, shape=sample_shape(args.name)).to(device)
    ref = reference_solution(teacher, z)
    print(f'{"per-pixel RMSE" if image else "fidelity"} (A) to the teacher ODE at t_min = 0.006')
    print('solver   ' + ''.join(f'{f"NFE {k}":>9}' for k in (2, 3, 4, 5, 8, 12)))
    for solver in solvers.SOLVERS:
        cells = []
        for k in (2, 3, 4, 5, 8, 12):
            try:
                with torch.no_grad():
                    x = solvers.sample_with(teacher, z, solver_config(solver, k))
                cells.append(f'{(rmse if image else fidelity)(x, ref):9.3f}')
            except ValueError:
                cells.append(f'{"-":>9}')
        print(f'{solver:<9}' + ''.join(cells))


if __name__ == '__main__':
    cli.run(main)
