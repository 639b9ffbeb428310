"""A 2-D toy world where every idea of this project runs in seconds on a CPU.

Data are points in the plane with class labels; the teacher is a small MLP denoiser wrapped in
EDM's preconditioning (`unet.EDMPrecond`), trained with EDM's loss (Karras et al. 2022, Sec. 5:
log-normal noise levels, weight (sigma^2 + sigma_data^2) / (sigma sigma_data)^2), optionally
with label dropout so it also serves as its own unconditional model for classifier-free
guidance. It speaks the project's denoiser protocol, so every solver, SFD and guided
distillation run on it unchanged, and the exact quantities they optimise can be measured:

  fidelity (SFD Fig. 3's notion)  mean distance of a sample to the teacher's own very fine ODE
                                  solution from the same noise ("metric A");
  distribution distance            sliced Wasserstein-2 distance between sample sets.

    python toy.py ring              # train (or load from the cache) the ring teacher and
                                    # print every solver's fidelity at a few NFE
"""

import argparse
import hashlib
import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

import solvers
import unet

DATASETS = ('ring', 'checkerboard', 'moons')
SIGMA_DATA = 0.5  # EDMPrecond's sigma_data for the toys (with 0.7 the MLP barely trains)


# ---------------------------------------------------------------------------------------------
# Data sets: points with labels, roughly of unit scale
# ---------------------------------------------------------------------------------------------

def toy_data(name, n, generator=None):
    """n points of a 2-D data set and their integer class labels: (x [n, 2], y [n]).

    ring          8 Gaussians (std 0.05) on the unit circle; the label is the Gaussian.
    checkerboard  uniform on the 8 black squares of a 4 x 4 board on [-1, 1]^2; label = square.
    moons         two interleaved half circles with noise 0.05; label = moon.
    """
    g = generator
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
        raise ValueError(f'unknown toy data set {name!r}; choose one of {DATASETS}')
    return x, y


def num_classes(name):
    return {'ring': 8, 'checkerboard': 8, 'moons': 2}[name]


# ---------------------------------------------------------------------------------------------
# The toy denoiser and its training
# ---------------------------------------------------------------------------------------------

class ToyMLP(torch.nn.Module):
    """The inner network F of a toy denoiser: [x, embedding] -> `depth` SiLU layers -> 2 outputs.

    The embedding is built like a U-Net's: sinusoids of c_noise = ln(sigma) / 4 and a linear map
    of the (sqrt(C)-scaled, as EDM does) one-hot label, through Linear-SiLU. The step and guidance
    conditions are the U-Nets' too (unet.ConditionEmbedding, zero-initialised): switching them on
    leaves the output unchanged until trained.
    """

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, width=256, depth=4, emb=64):
        super().__init__()
        self.label_dim, self.emb = label_dim, emb
        self.use_step_condition = self.use_guidance_condition = False
        self.map_noise = unet.PositionalEmbedding(emb, endpoint=True)
        self.map_label = unet.Linear(label_dim, emb) if label_dim else None
        self.map_layer = unet.Linear(emb, emb)
        self.layers = torch.nn.ModuleList([unet.Linear(in_channels + emb, width)] +
                                          [unet.Linear(width, width) for _ in range(depth - 1)])
        self.out = unet.Linear(width, out_channels)

    def _new(self, module):
        p = next(self.parameters())
        return module.to(device=p.device, dtype=p.dtype)

    def enable_step_condition(self):
        """SFD-v's step N, embedded like the noise level and added to the embedding (App. D.1)."""
        if not self.use_step_condition:
            self.map_step = self._new(unet.ConditionEmbedding(self.emb, self.emb, self.emb, zero_out=True))
            self.use_step_condition = True
        return self

    def enable_guidance_condition(self):
        """Meng's w, embedded like the noise level and added to the noise features (Sec. 3.1)."""
        if not self.use_guidance_condition:
            self.map_guidance = self._new(unet.ConditionEmbedding(self.emb, self.emb, self.emb, zero_out=True))
            self.use_guidance_condition = True
        return self

    def forward(self, x, noise_labels, class_labels=None, step=None, guidance=None, augment_labels=None):
        emb = self.map_noise(noise_labels)
        if guidance is not None:
            emb = emb + self.map_guidance(guidance)
        if self.map_label is not None:
            emb = emb + self.map_label(class_labels * math.sqrt(self.label_dim))
        emb = torch.nn.functional.silu(self.map_layer(emb))
        if step is not None:
            emb = emb + self.map_step(step)
        h = torch.cat([x, emb], dim=1)
        for layer in self.layers:
            h = torch.nn.functional.silu(layer(h))
        return self.out(h)


unet.MODELS['ToyMLP'] = ToyMLP  # so that unet.load_model rebuilds saved toy networks


def toy_net(label_dim=0, width=256, depth=4):
    """An MLP denoiser for 2-D points, wrapped in EDM's preconditioning (unet.EDMPrecond)."""
    return unet.EDMPrecond(img_resolution=1, img_channels=2, label_dim=label_dim, sigma_data=SIGMA_DATA,
                           model_type='ToyMLP', width=width, depth=depth)


def edm_loss(net, x, class_labels=None, generator=None, P_mean=-1.2, P_std=1.2):
    """EDM's training loss (Karras et al. 2022, Eq. 8 and Table 1): sigma ~ exp(N(P_mean, P_std^2)),
    lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2, loss = lambda ||D(x + n) - x||^2."""
    sigma = (torch.randn(x.shape[0], generator=generator) * P_std + P_mean).exp().to(x)
    noise = torch.randn(x.shape, generator=generator).to(x) * sigma[:, None]
    weight = (sigma ** 2 + SIGMA_DATA ** 2) / (sigma * SIGMA_DATA) ** 2
    D = net(x + noise, sigma, class_labels=class_labels)
    return (weight[:, None] * (D - x) ** 2).sum(1).mean()


def train_toy(name, label_dropout=0.0, steps=3000, batch=512, lr=2e-3, ema=0.995, seed=0,
              device='cpu', progress=True):
    """Train a toy teacher from scratch; returns the EMA network in eval mode.

    With `label_dropout` > 0 the network is class-conditional and sees the null label (a zero
    one-hot) that often, so it is also its own unconditional model (classifier-free guidance).
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    C = num_classes(name) if label_dropout > 0 else 0
    net = toy_net(label_dim=C).to(device).train()
    ema_net = toy_net(label_dim=C).to(device).eval().requires_grad_(False)
    ema_net.load_state_dict(net.state_dict())
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for i in tqdm(range(steps), desc=f'train toy:{name}', disable=None if progress else True):
        x, y = toy_data(name, batch, generator=g)
        labels = None
        if C:
            keep = (torch.rand(batch, generator=g) >= label_dropout).float()
            labels = torch.nn.functional.one_hot(y, C).float() * keep[:, None]
            labels = labels.to(device)
        loss = edm_loss(net, x.to(device), labels, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for group in opt.param_groups:  # constant, then a linear decay over the last 30%
            group['lr'] = lr * min(1.0, (steps - i) / (0.3 * steps))
        opt.step()
        with torch.no_grad():
            for p_ema, p in zip(ema_net.parameters(), net.parameters()):
                p_ema.lerp_(p, 1 - ema)
    return ema_net


def toy_teacher(name='ring', cond=False, device='cpu', cache=True, progress=True, **train_kwargs):
    """A trained toy teacher (eval mode) and its metadata, cached on disk by its settings.

    `cond=True` trains a class-conditional teacher with label dropout 0.1 (for guidance).
    The cache lives in `<download cache>/toy`, so tests and notebooks train each teacher once.
    """
    import data
    settings = dict(name=name, label_dropout=0.1 if cond else 0.0, **train_kwargs)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    path = data.cache_root() / 'toy' / f'toy-{name}{"-cond" if cond else ""}-{key}.pt'
    if cache and path.is_file():
        net, meta = unet.load_model(path, device=device)
        return net.eval().requires_grad_(False), meta
    t0 = time.time()
    net = train_toy(name, progress=progress, device=device, **{k: v for k, v in settings.items() if k != 'name'})
    meta = dict(kind='toy-teacher', toy=name, train=settings, shape=[2], train_seconds=time.time() - t0,
                sampling=dict(solver='heun', nfe=35, afs=False, schedule='polynomial', rho=7.0,
                              t_min=0.002, t_max=80.0, ends_at_zero=True))
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        unet.save_model(path, net, **meta)
    return net, meta


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


def eval_noise(n=2000, seed=1234):
    """Fixed unit noise for evaluations: every method is compared from the same starting points."""
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))


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


def solver_config(solver, nfe, t_min=0.006, t_max=80.):
    """The baselines' configuration: a training-free solver on the same polynomial schedule."""
    return dict(solver=solver, nfe=nfe, afs=False, schedule='polynomial', rho=7.0, t_min=t_min, t_max=t_max)


def before_after_table(name, student, meta, teacher=None, first_stage=None, n=2000):
    """The student against DPM-Solver++(3M) and Euler at equal NFE, from the same noise; with
    `first_stage` = (net, meta) of an SFD/SFD-v model, also that model at the same NFE."""
    teacher = teacher or toy_teacher(name)[0]
    s = meta['sampling']
    z = eval_noise(n)
    ref = reference_solution(teacher, z, s['t_min'], s['t_max'])
    data_ref = toy_data(name, n, generator=torch.Generator().manual_seed(99))[0]
    nfes = s['nfe'] if isinstance(s['nfe'], list) else [s['nfe']]
    rows = ['NFE  method            fidelity (A)  sliced W2 to data',
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
            a, w = evaluate(net.eval(), cfg, ref, data_ref, z, nfe=k, **cond)
            rows.append(f'{k:3d}  {label:<16}  {a:12.4f}  {w:12.4f}')
    return '\n'.join(rows)


if __name__ == '__main__':
    p = argparse.ArgumentParser(description='Train (or load) a toy teacher and measure the solvers on it.')
    p.add_argument('name', nargs='?', default='ring', choices=DATASETS)
    p.add_argument('--cond', action='store_true', help='class-conditional with label dropout 0.1')
    args = p.parse_args()
    teacher, meta = toy_teacher(args.name, cond=args.cond)
    print(f'toy:{args.name} teacher, trained in {meta.get("train_seconds", 0):.0f} s')
    z = eval_noise()
    ref = reference_solution(teacher, z)
    data_ref = toy_data(args.name, len(z), generator=torch.Generator().manual_seed(99))[0]
    print('fidelity (A) to the teacher ODE at t_min = 0.006')
    print('solver   ' + ''.join(f'{f"NFE {k}":>9}' for k in (2, 3, 4, 5, 8, 12)))
    for solver in solvers.SOLVERS:
        cells = []
        for k in (2, 3, 4, 5, 8, 12):
            try:
                cells.append(f'{evaluate(teacher, solver_config(solver, k), ref, data_ref, z)[0]:9.3f}')
            except ValueError:
                cells.append(f'{"-":>9}')
        print(f'{solver:<9}' + ''.join(cells))
