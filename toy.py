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

    python toy.py ring              # train a ring teacher (about 30 s) and print every
                                    # solver's fidelity at a few NFE; as a model spec,
                                    # `toy:ring` is trained once and cached (models.py)
"""

import argparse
import math
import time

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

def toy_net(label_dim=0, width=256, depth=4):
    """An MLP denoiser for 2-D points (unet.ToyMLP) wrapped in EDM's preconditioning (unet.EDMPrecond)."""
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


def teacher_settings(name, cond=False):
    """The training settings of the cached toy teacher `toy:<name>[:cond]` (models.py caches by them):
    `cond` adds label dropout 0.1, so the network is its own unconditional model for guidance."""
    if name not in DATASETS:
        raise ValueError(f'unknown toy data set {name!r}; choose one of {DATASETS}')
    return dict(name=name, label_dropout=0.1 if cond else 0.0)


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


def solver_config(solver, nfe, t_min=0.006, t_max=80., **options):
    """The baselines' recipe: a training-free solver on the same polynomial schedule, ending at
    t_min as the students do (options: e.g. afs=True)."""
    return solvers.Recipe(solver, nfe, t_min=t_min, t_max=t_max, ends_at_zero=False, **options)


def before_after_table(name, student, meta, teacher, first_stage=None, n=2000):
    """The student against DPM-Solver++(3M) and Euler at equal NFE, from the same noise; with
    `first_stage` = (net, meta) of an SFD/SFD-v model, also that model at the same NFE."""
    s = solvers.Recipe.from_dict(meta['sampling']).to_dict()
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
    p = argparse.ArgumentParser(description='Train a toy teacher (about 30 s) and measure the solvers on it.')
    p.add_argument('name', nargs='?', default='ring', choices=DATASETS)
    p.add_argument('--cond', action='store_true', help='class-conditional with label dropout 0.1')
    args = p.parse_args()
    t0 = time.time()
    teacher = train_toy(args.name, **{k: v for k, v in teacher_settings(args.name, args.cond).items() if k != 'name'})
    print(f'toy:{args.name} teacher, trained in {time.time() - t0:.0f} s (models.load caches it as a spec)')
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
