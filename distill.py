"""SFD: Simple and Fast Distillation of diffusion models (Zhou et al., NeurIPS 2024).

A teacher diffusion model plus a training-free ODE solver define sampling trajectories; a
student (initialised as an exact copy of the teacher) learns to follow them with a few Euler
steps of its own. This file implements, line by line with the paper's Appendix C:

    SFD            Alg. 4   the whole teacher trajectory, the student imitates it step by step
    SFD + AFS      Alg. 5   the first student step is the analytical first step: one NFE saved
    SFD-v          Alg. 6   one student for several NFE, told the NFE by a step condition
    second stage   Alg. 7   a 1-NFE student distilled from an SFD/SFD-v student
    vanilla        Alg. 3   local trajectory distillation from data, the baseline
    sampling       Alg. 8   Euler over the student's own schedule (`solvers.sample_with`)

SFD under classifier-free guidance (Sec. 3.4) is the same loop with random class labels, or for
Stable Diffusion random captions (guidance scale omega = 1, i.e. the conditional model only);
sample the student with any omega. A diffusers teacher gets SFD Table 6's SD recipe.

    python distill.py                         # SFD, 2 NFE, on NVIDIA's CIFAR-10 EDM (downloads)
    python distill.py --teacher stable-diffusion-v1-5/stable-diffusion-v1-5 --method sfd-v \\
        --captions MS-COCO_val2014_30k_captions.csv     # SFD-v on SD v1.5, 2-5 steps (a GPU)
    python distill.py --teacher toy:ring      # the same code on a 2-D toy teacher, ~1 min on a CPU
    torchrun --nproc_per_node=4 distill.py    # data-parallel
"""

import contextlib
import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import captions
import cli
import data
import latent
import models
import solvers
import toy

# ---------------------------------------------------------------------------------------------
# Settings: SFD Table 6 (CIFAR-10) and the official launch script
# ---------------------------------------------------------------------------------------------

METHODS = ('sfd', 'sfd-v', 'second-stage', 'vanilla')
LOSSES = ('l1', 'l2', 'pseudo_huber', 'lpips', 'l1+lpips')


@dataclass
class SFDConfig:
    """Everything a distillation run needs; the defaults are SFD Table 6 for CIFAR-10."""
    teacher: str = 'cifar10-32x32-uncond-vp'  # any models.load spec (a student file: second stage)
    method: str = 'sfd'                  # sfd | sfd-v | second-stage | vanilla
    nfe: int = 2                         # student NFE (sfd, vanilla); second stage: 1
    nfe_list: tuple = (2, 3, 4, 5)       # SFD-v: the list L of Alg. 6, as NFE
    afs: bool = True                     # analytical first step (Sec. 3.2, Alg. 5)
    K: int = 4                           # teacher steps per student step
    teacher_solver: str = 'dpmpp3m'      # DPM-Solver++(3M) with lower-order final steps
    schedule: str = 'polynomial'         # student schedule; the teacher's is it refined K times
    rho: float = 7.0
    t_min: float = 0.006                 # Sec. 3.2: raised from EDM's 0.002
    t_max: float = 80.0
    loss: str = 'l1'                     # l1 | l2 | pseudo_huber | lpips | l1+lpips
    lr: float = 5e-5                     # Adam(0.9, 0.999), divided by 10 half-way
    batch: int = 128                     # total over all processes
    accumulate: int = 1                  # gradient-accumulation rounds per update (SD: 128 = 16 x 8)
    captions: str = ''                   # text teachers: the prompts (one per line, COCO .json, .csv)
    grad_checkpointing: bool = False     # diffusers students: recompute activations in backward
    kimg: float = 200.0                  # thousands of teacher trajectories (200K = 1563 iters; SFD-v 800)
    data: str = 'cifar10'                # vanilla only: where the x_0 come from
    seed: int = 0
    run_dir: str = ''                    # '' = a new numbered folder runs/<00000>-<method>-<teacher>-nfe<N>
    tick_kimg: float = 1.0               # one stats.jsonl line per tick
    snapshot_kimg: float = 50.0          # student + training state every so often (and at the end)
    device: str = 'auto'
    compile: bool = False                # torch.compile teacher and student (opt-in; slow to start)


# Toy teachers are fresh MLPs, not pretrained UNets: a larger lr suits them (SFD's 5e-5 was tuned
# for fine-tuning EDM networks), and they are cheap enough for larger batches.
TOY_DEFAULTS = dict(lr=5e-4, batch=256, kimg=100.0, tick_kimg=5.0, snapshot_kimg=50.0)
# The image worlds (toy:cifar10-16): DDPM++ copies fine-tuned on a CPU, 3K trajectories of SFD +
# AFS at 2 NFE in 1.7 minutes on two cores (benchmarks/image_results.py); SFD-v twice as many (its
# four NFE), the second stage at 10x the lr (as SFD's official launch script).
IMAGE_DEFAULTS = dict(lr=2e-4, batch=32, kimg=3.0, tick_kimg=0.5, snapshot_kimg=1.0)
IMAGE_METHOD_DEFAULTS = {'sfd-v': dict(kimg=6.0), 'second-stage': dict(lr=2e-3)}
# Per-method recipes of the official launch script: SFD-v trains 800K trajectories (200K per NFE,
# Table 7). The second stage: 2000K trajectories, lr 10x, K = M + 1 = 3. The paper's text says
# K = 2; we follow the code: with K = 3 the 1-NFE student's teacher is the first-stage student at
# 2 * 3 - 1 = 5 NFE, which every SFD-v model of Table 7 was trained at. Vanilla (Alg. 3) needs a
# single-step teacher solver over the K sub-steps of one interval.
METHOD_DEFAULTS = {'sfd': {}, 'sfd-v': dict(kimg=800.0),
                   'second-stage': dict(nfe=1, K=3, lr=5e-4, kimg=2000.0),
                   'vanilla': dict(teacher_solver='dpm2')}
# SFD Table 6, Stable Diffusion: DPM-Solver++(2M) (SD's own), K = 3, t_min raised to 0.1, no AFS
# (SD's trajectories are not straight enough near t_max, Fig. 9c), 100K trajectories (per NFE for
# SFD-v), lr 5e-5, batch 16 x 8 rounds; App. D.2's linear schedule (uniform in the timestep).
# t_max = 0 means the model's sigma_max (14.6146 for SD), set once the teacher is loaded.
LATENT_DEFAULTS = dict(teacher_solver='dpmpp2m', K=3, t_min=0.1, t_max=0.0, afs=False,
                       schedule=latent.UNIFORM, rho=1.0, kimg=100.0, lr=5e-5, batch=128, accumulate=8,
                       snapshot_kimg=25.0)


def step_value(nfe, afs):
    """SFD-v's step condition: the number of timestamps of the student schedule (NFE + AFS + 1),
    the raw integer the official code feeds (e.g. 4 for 2 NFE with AFS)."""
    return nfe + int(afs) + 1


def student_schedule(cfg, nfe, net=None):
    """The student's N = NFE + AFS Euler steps (Alg. 5 uses N = 3 for 2 NFE with AFS)."""
    return grid(cfg, nfe + int(cfg.afs), net)


def grid(cfg, n, net=None):
    """cfg's n-step schedule; latent.UNIFORM (uniform in a diffusers model's timestep) needs `net`.
    Every kind nests: grid(K n)[::K] == grid(n), so the teacher's grid holds the student's."""
    if cfg.schedule == latent.UNIFORM:
        return net.uniform_schedule(n, cfg.t_min, cfg.t_max, cfg.rho)
    return solvers.time_schedule(n, cfg.t_min, cfg.t_max, cfg.schedule, cfg.rho)


def rounds_of(x, cond, rounds):
    """Gradient accumulation: x [B, ...] and its per-sample conditions (tensors of length B, e.g. the
    prompts' embeddings) cut into `rounds` micro-batches; other conditions go to each unchanged."""
    B = x.shape[0]
    parts = torch.arange(B).tensor_split(rounds)
    pick = lambda v, i: v[i.to(v.device)] if torch.is_tensor(v) and v.ndim and len(v) == B else v
    return [(x[i.to(x.device)], {k: pick(v, i) for k, v in cond.items()}) for i in parts]


# ---------------------------------------------------------------------------------------------
# Distance metrics d(., .) (SFD Sec. 3.2, "loss metric"; Table 1)
# ---------------------------------------------------------------------------------------------

def per_sample_loss(metric, x, target, lpips=None):
    """d(x, target) per sample [B]: sums over each sample's elements, as the official code does
    (then averaged over the batch); pseudo-Huber with c = 0.00054 sqrt(d) as in iCT."""
    dtype = torch.promote_types(x.dtype, torch.float32)  # bf16 (autocast) in float32, float64 kept
    diff = (x.to(dtype) - target.to(dtype)).flatten(1)
    if metric == 'l1':
        return diff.abs().sum(1)
    if metric == 'l2':
        return diff.square().sum(1)
    if metric == 'pseudo_huber':
        c = 0.00054 * math.sqrt(diff.shape[1])
        return (diff.square().sum(1) + c * c).sqrt() - c
    if metric in ('lpips', 'l1+lpips'):
        # LPIPS on bilinearly upsampled 224x224 images mapped to [0, 1], the range piq expects
        # (the official code passes [-1, 1]). The official second stage broadcast-adds LPIPS to
        # every pixel of the L1 map, i.e. adds C*H*W * LPIPS to the per-sample L1 sum.
        up = lambda v: (torch.nn.functional.interpolate(v.float(), size=224, mode='bilinear') + 1) / 2
        d = lpips(up(x), up(target)).flatten() * diff.shape[1]
        return d + diff.abs().sum(1) if metric == 'l1+lpips' else d
    raise ValueError(f'unknown loss {metric!r}; choose one of {LOSSES}')


def load_lpips(device):
    """The LPIPS network of the official code (piq, VGG16 with average pooling); optional."""
    try:
        import piq
    except ImportError as e:
        raise ImportError('the lpips loss needs the optional package piq: pip install piq') from e
    return piq.LPIPS(replace_pooling=True, reduction='none').to(device)


# ---------------------------------------------------------------------------------------------
# One training iteration of each method
# ---------------------------------------------------------------------------------------------


def teacher_targets(teacher, x_N, t_teacher, K, solver, afs=False, rounds=1, **cond):
    """SFD Alg. 4, line 5 for every n at once: one teacher solve over the student grid refined
    K times; its states at every K-th timestamp are the targets x~_{N-1}, ..., x~_0 ([N, B, ...]).
    `rounds` micro-batches are solved one after another (the memory of one; the same states)."""
    with torch.inference_mode(), cli.autocast(x_N.device):
        # x.clone(): an inference tensor like every later state, so torch.compile traces the teacher once
        traj = torch.cat([solvers.sample(teacher, x.clone(), t_teacher, solver, afs=afs, trajectory=True, **c)
                          for x, c in rounds_of(x_N, cond, rounds)], dim=1)
    return traj[K::K].clone()  # clone: out of inference mode, usable as loss targets


def sfd_iteration(student, optimizer, x_N, t_steps, targets, cfg, lpips=None, check=None, **cond):
    """SFD Alg. 4 (and Alg. 5 with AFS) for one batch of trajectories; returns per-step losses.

    Every student step is its own optimiser update (Alg. 4, line 6), taken from the student's
    own *detached* previous output (line 7): the student learns to correct the errors it makes
    itself. Official-code choices the paper leaves open, followed here: the student runs in
    train mode (EDM's dropout active), and the loss is the per-sample sum averaged over the batch.
    With cfg.accumulate = R rounds (sfd-main's SD recipe) each update sums the gradients of R
    micro-batches, each loss divided by the whole batch: the update of one batch, in 1/R the memory.
    """
    B, R = x_N.shape[0], getattr(cfg, 'accumulate', 1)
    chunks = rounds_of(x_N, cond, R)
    xs, conds = [x for x, _ in chunks], [c for _, c in chunks]
    cut = [len(x) for x in xs]
    losses = []
    for i in range(len(t_steps) - 1):  # paper's n = N-1, ..., 0; here t_steps[i] = t_{N-i}
        t_cur, t_next = float(t_steps[i]), float(t_steps[i + 1])
        target = targets[i].split(cut)
        if cfg.afs and i == 0:
            # Alg. 5, lines 2-3: x_{N-1} = x_N + (t_{N-1} - t_N) x_N / sqrt(1 + t_N^2), no update.
            xs = [x + (t_next - t_cur) * solvers.afs_eps(x, t_cur) for x in xs]
            losses.append(per_sample_loss('l1', torch.cat(xs), targets[i]).mean().item())  # logged only
            continue
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for r in range(R):
            last = r == R - 1  # DDP: the gradients are all-reduced once, after the last round
            with (contextlib.nullcontext() if last or not hasattr(student, 'no_sync') else student.no_sync()):
                with cli.autocast(xs[r].device):
                    # Alg. 4, line 4 (Eq. 6): one Euler step of the student
                    x_pred = solvers.euler_step(student, xs[r], t_cur, t_next, **conds[r])
                # line 6: d(x^psi_n, x~_n), the per-sample sum averaged over all B trajectories
                loss = per_sample_loss(cfg.loss, x_pred, target[r], lpips).sum() / B
                loss.backward()
            xs[r] = x_pred.detach()                                           # line 7: detach
            total = total + loss.detach()
        if check:
            check(total, i)
        optimizer.step()                                                      # line 6: psi update
        losses.append(float(total))
    return losses


def vanilla_iteration(student, teacher, optimizer, x0, t_steps, t_teacher, cfg, generator, part,
                      lpips=None, check=None, **cond):
    """Trajectory distillation (SFD Alg. 3): a local, data-driven baseline.

    Each sample draws a step n (line 2), is noised to t_{n+1} (line 3), and the student's single
    Euler step (line 4) is regressed onto K teacher sub-steps of a single-step solver (line 5)
    over the same interval. With AFS the first step is analytic, so it is never drawn.
    `part = (lo, hi, batch)`: random draws are made for the global batch, this rank uses [lo:hi].
    """
    lo, hi, batch = part
    N, K = len(t_steps) - 1, cfg.K
    i = torch.randint(int(cfg.afs), N, (batch,), generator=generator)[lo:hi]    # line 2
    z = torch.randn([batch, *x0.shape[1:]], generator=generator)[lo:hi].to(x0)
    t_cur, t_next = t_steps[i].to(x0), t_steps[i + 1].to(x0)
    x = x0 + t_cur.reshape(-1, *[1] * (x0.ndim - 1)) * z                       # line 3
    target = torch.empty_like(x)
    for k in i.unique().tolist():                                               # line 5, per n
        sel = (i == k).to(x.device)
        sub = {c: v[sel] if torch.is_tensor(v) and v.ndim and len(v) == len(x) else v
               for c, v in cond.items()}
        sub.pop('step', None)  # the teacher takes no step condition
        with torch.inference_mode(), cli.autocast(x.device):
            target[sel] = solvers.sample(teacher, x[sel], t_teacher[K * k:K * (k + 1) + 1],
                                         cfg.teacher_solver, **sub).clone()
    optimizer.zero_grad(set_to_none=True)
    with cli.autocast(x.device):
        x_pred = solvers.euler_step(student, x, t_cur, t_next, **cond)           # line 4
    loss = per_sample_loss(cfg.loss, x_pred, target, lpips).mean()              # line 6
    loss.backward()
    if check:
        check(loss, 0)
    optimizer.step()                                                            # line 7
    return [loss.item()]


# ---------------------------------------------------------------------------------------------
# Settings: defaults per teacher and method, and checks before anything slow starts
# ---------------------------------------------------------------------------------------------

# May change on resume (accumulation and checkpointing change memory, not the updates).
RESUMABLE = ('kimg', 'tick_kimg', 'snapshot_kimg', 'device', 'compile', 'run_dir', 'accumulate',
             'grad_checkpointing')


def apply_defaults(cfg, explicit=()):
    """Fill the settings the user did not give with the method's and (toy teachers) the toy recipe."""
    changes = dict(METHOD_DEFAULTS.get(cfg.method, {}))
    world = models.toy_world(cfg.teacher)
    if world in toy.IMAGE_WORLDS:
        changes.update(IMAGE_DEFAULTS, **IMAGE_METHOD_DEFAULTS.get(cfg.method, {}))
    elif world:
        changes.update(TOY_DEFAULTS)
    elif latent.is_spec(cfg.teacher):
        changes.update(LATENT_DEFAULTS, kimg=100.0 * (len(cfg.nfe_list) if cfg.method == 'sfd-v' else 1))
    pixels = world in toy.IMAGE_WORLDS or not (world or latent.is_spec(cfg.teacher))
    if cfg.method == 'second-stage' and pixels:  # Sec. 4.2: L1 + LPIPS for images
        try:
            import piq  # noqa: F401
            changes['loss'] = 'l1+lpips'
        except ImportError:
            print('second stage: piq is not installed, training with L1 only (pip install piq for LPIPS)')
    for k, v in changes.items():
        if k not in explicit:
            setattr(cfg, k, v)
    return cfg


def validate(cfg, world=1):
    """One clear error for any setting that cannot work, naming its flag (no teacher is loaded yet)."""
    def need(ok, flag, what):
        if not ok:
            raise ValueError(f'--{flag.replace("_", "-")} {getattr(cfg, flag)!r}: {what}')
    finite = lambda v: isinstance(v, (int, float)) and math.isfinite(v)
    need(cfg.method in METHODS, 'method', f'choose one of {", ".join(METHODS)}')
    need(cfg.loss in LOSSES, 'loss', f'choose one of {", ".join(LOSSES)}')
    if latent.is_spec(cfg.teacher):
        need(cfg.method in ('sfd', 'sfd-v'), 'method', 'diffusers teachers take sfd or sfd-v only')
    else:
        need(not cfg.grad_checkpointing, 'grad_checkpointing', 'is for diffusers teachers (their UNets)')
        need(not cfg.captions, 'captions', 'prompts are for text-conditioned diffusers teachers')
    need(cfg.teacher_solver in solvers.SOLVERS, 'teacher_solver', 'choose one of ' + ', '.join(solvers.SOLVERS))
    kinds = solvers.SCHEDULES + ((latent.UNIFORM,) if latent.is_spec(cfg.teacher) else ())
    need(cfg.schedule in kinds, 'schedule', f'choose one of {", ".join(kinds)}')
    need(cfg.nfe >= 1, 'nfe', 'the student needs at least one network call')
    need(len(cfg.nfe_list) > 0 and min(cfg.nfe_list) >= 1, 'nfe_list', 'give NFE >= 1, e.g. 2,3,4,5')
    need(cfg.K >= 1, 'K', 'the teacher takes K >= 1 steps per student step')
    need(finite(cfg.lr) and cfg.lr > 0, 'lr', 'the learning rate must be positive')
    need(cfg.batch >= 1, 'batch', 'the batch must hold at least one trajectory')
    need(cfg.accumulate >= 1, 'accumulate', 'at least one round per update')
    need(cfg.batch % (world * cfg.accumulate) == 0, 'batch',
         f'must split evenly over the {world} processes x {cfg.accumulate} accumulation rounds')
    for flag in ('kimg', 'tick_kimg', 'snapshot_kimg'):
        need(finite(getattr(cfg, flag)) and getattr(cfg, flag) > 0, flag, 'must be positive (in thousands)')
    need(finite(cfg.t_min) and cfg.t_min > 0, 't_min', 'need 0 < t_min < t_max')
    model_t_max = cfg.t_max == 0 and latent.is_spec(cfg.teacher)  # 0: a diffusers model's sigma_max
    need(finite(cfg.t_max) and (cfg.t_max > cfg.t_min or model_t_max), 't_max',
         'need 0 < t_min < t_max < inf')
    need(finite(cfg.rho) and cfg.rho > 0, 'rho', 'must be positive')
    need(cfg.seed >= 0, 'seed', 'must be a non-negative integer')
    cli.device(cfg.device)  # e.g. --device cuda without a GPU
    if cfg.method == 'vanilla':
        need(cfg.teacher_solver in ('euler', 'heun', 'dpm2'), 'teacher_solver',
             'vanilla distillation (Alg. 3) needs a single-step solver over K sub-steps: euler, heun or dpm2')
        need(cfg.accumulate == 1, 'accumulate', 'applies to sfd, sfd-v and the second stage')
    if cfg.captions:
        captions.read_captions(cfg.captions)  # a missing or empty file fails now
    return cfg


def resumed_config(run_dir, cfg, explicit=None):
    """The stored run's settings, with the given ones that may change on resume (RESUMABLE, e.g. a
    larger --kimg extends the run, moving the lr switch to half of the new total). Any other
    given setting that differs from the stored run is refused, naming it."""
    path = Path(run_dir) / 'training-state.pt'
    if not path.is_file():
        raise ValueError(f'--resume {run_dir}: no training-state.pt there (not a distill.py run folder)')
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
        stored = SFDConfig(**{**state['config'], 'nfe_list': tuple(state['config']['nfe_list'])})
    except Exception as e:
        raise ValueError(f'--resume {run_dir}: {path} is unreadable ({type(e).__name__}: {e}); '
                         'the run cannot be continued from it') from e
    given = explicit if explicit is not None else {f for f in asdict(cfg)}
    conflicts = [f for f in given if f not in RESUMABLE and getattr(cfg, f) != getattr(stored, f)]
    if conflicts:
        raise ValueError(f'--resume {run_dir}: the run was made with ' + ', '.join(
            f'--{f.replace("_", "-")} {getattr(stored, f)!r}' for f in sorted(conflicts)) +
            f'; only {", ".join("--" + f.replace("_", "-") for f in RESUMABLE)} may change on resume')
    for f in given:
        if f in RESUMABLE and f != 'run_dir':
            setattr(stored, f, getattr(cfg, f))
    stored.run_dir = str(run_dir)
    return stored, state


def default_run_name(cfg):
    return f'{cfg.method}-{cfg.teacher.replace(":", "-").replace("/", "_")}-nfe{cfg.nfe}'.replace('..', '')


def second_stage_setup(cfg, teacher_meta):
    """Alg. 7: the teacher is a first-stage student sampled with Euler at a trained NFE; the new
    student lives on the same (schedule, t_min, t_max, AFS) grid so the two grids nest."""
    s = teacher_meta.get('sampling')
    if 'method' not in teacher_meta or s.get('solver') != 'euler':
        raise ValueError(f'--teacher {cfg.teacher}: the second stage needs a first-stage SFD/SFD-v '
                         'student file (runs/<run>/student.pt)')
    for k in ('schedule', 'rho', 't_min', 't_max', 'afs'):
        setattr(cfg, k, s[k])
    N_teacher = cfg.K * (cfg.nfe + int(cfg.afs))
    teacher_nfe = N_teacher - int(s['afs'])
    trained = s['nfe'] if isinstance(s['nfe'], list) else [s['nfe']]
    if teacher_nfe not in trained:
        raise ValueError(f'with K={cfg.K} the teacher must sample at {teacher_nfe} NFE, but it was '
                         f'trained at {trained}: choose K so that K*(NFE+AFS)-AFS is one of them')
    step = (s.get('step_values') or {}).get(str(teacher_nfe))
    return teacher_nfe, ({} if step is None else {'step': step})


def sampling_recipe(cfg, student):
    """How to sample the student (stored in its file; Alg. 8 needs nothing else): Euler over its
    own schedule, with AFS and, for SFD-v, the step condition of every trained NFE."""
    nfes = list(cfg.nfe_list) if cfg.method == 'sfd-v' else [cfg.nfe]
    has_step = getattr(student, 'use_step_condition', False)
    # A diffusers student's grid needs its noise levels: stored for one NFE (sample.py makes the others).
    single = cfg.schedule == latent.UNIFORM and cfg.method != 'sfd-v'
    return solvers.Recipe('euler', nfes if cfg.method == 'sfd-v' else cfg.nfe, afs=cfg.afs,
                          schedule=cfg.schedule,
                          rho=cfg.rho, t_min=cfg.t_min, t_max=cfg.t_max, ends_at_zero=False,
                          t_steps=student_schedule(cfg, cfg.nfe, student).tolist() if single else None,
                          step_values={str(n): step_value(n, cfg.afs) for n in nfes} if has_step else None)


def lr_at(cfg, nimg, total):
    """The official schedule: lr until half of the trajectories are used, then lr / 10. The
    official loop checks after an iteration's updates whether the images seen before it reached
    half, so the switch takes effect one iteration after the one that crosses total / 2."""
    return cfg.lr / 10 if nimg - cfg.batch >= total / 2 else cfg.lr


# ---------------------------------------------------------------------------------------------
# One run: set-up, conditions, snapshots, logs (the loop itself is `distill` below)
# ---------------------------------------------------------------------------------------------

@dataclass
class Run:
    """Everything a distillation run holds between iterations."""
    cfg: SFDConfig
    device: torch.device
    rank: int
    world: int
    run_dir: Path
    teacher: object             # frozen, eval mode (its compiled form with --compile)
    student: torch.nn.Module    # the trained network (what the files hold)
    model: object               # what the loop calls: the student, DDP-wrapped and/or compiled
    optimizer: torch.optim.Optimizer
    gen: torch.Generator        # every random draw of the loop, for the global batch
    shape: list
    label_dim: int
    teacher_cond: dict = field(default_factory=dict)  # second stage: the teacher's step condition
    lpips: object = None
    prompts: list = None        # text teachers: the captions prompts are drawn from
    data: tuple = (None, None)  # vanilla: x_0 and labels
    it: int = 0
    nimg: int = 0


def setup(cfg, state=None):
    """Build a Run: device and processes, the frozen teacher, the student as its exact copy
    (SFD Alg. 4: psi = theta; SFD-v adds the zero-initialised step condition, Alg. 6), Adam, and
    from a training state everything needed to continue bit for bit."""
    rank, world, device = cli.init_distributed(cli.device(cfg.device))
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
    torch.manual_seed(cfg.seed)  # new layers (SFD-v's step embedding) start alike on every rank
    teacher, meta = cli.rank_zero_first(lambda: models.load(cfg.teacher, device))
    teacher_cond = {}
    if cfg.method == 'second-stage':
        teacher_cond = second_stage_setup(cfg, meta)[1]
    prompts = None
    if isinstance(teacher, latent.Denoiser):  # t_max 0: its sigma_max; Sec. 3.4: captions, guidance 1
        cfg.t_max = teacher.check_levels(cfg.t_min, cfg.t_max)
        prompts = captions.training_prompts(teacher, cfg.captions)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    if cfg.method == 'sfd-v' and not getattr(student, 'use_step_condition', False):
        student.enable_step_condition()  # Alg. 6, "Initialize": zero-initialised, an exact no-op
    if cfg.grad_checkpointing:
        student.unet.enable_gradient_checkpointing()  # the same gradients, recomputed block by block
    optimizer = torch.optim.Adam(student.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    torch.manual_seed(cfg.seed * world + rank)  # dropout: a different stream on every rank
    # Every random draw of the loop is made for the global batch from one generator shared by all
    # ranks (same seed), and each rank takes its slice: a G-process run sees exactly the samples
    # of a 1-process run with the same total batch. Its state and the global one are saved.
    run = Run(cfg, device, rank, world, Path(cfg.run_dir), teacher, student, student, optimizer,
              torch.Generator().manual_seed(cfg.seed), meta['shape'], getattr(teacher, 'label_dim', 0),
              teacher_cond, load_lpips(device) if 'lpips' in cfg.loss else None, prompts=prompts)
    if cfg.method == 'vanilla':
        run.data = vanilla_data(cfg)
    if state is not None:
        student.load_state_dict(state['student'])
        optimizer.load_state_dict(state['optimizer'])
        run.it, run.nimg = state['iteration'], state['nimg']
        run.gen.set_state(state['generator'])
        torch.set_rng_state(state['torch_rng'][rank])
    if world > 1:
        run.model = torch.nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == 'cuda' else None,
            find_unused_parameters=True)  # e.g. EDM's map_augment, unused without augment labels
    if cfg.compile:  # same numerics, fused kernels; the files still hold the plain networks
        run.model, run.teacher = torch.compile(run.model), torch.compile(teacher)
    return run


def vanilla_data(cfg):
    """Alg. 3's data x_0 (and labels): the toy's own data set, or images scaled to [-1, 1]."""
    name = models.toy_world(cfg.teacher)
    if name:
        return toy.toy_data(name, 20_000, generator=torch.Generator().manual_seed(cfg.seed))
    x, y = data.load_images(cfg.data)
    return data.to_float(x), y


def draw_conditions(run, nfe, lo, hi):
    """(teacher's, student's) conditions for this iteration: random labels of a class-conditional
    teacher at guidance scale 1 (Sec. 3.4), and SFD-v's step condition for the student."""
    cond = {}
    if run.label_dim:
        y = torch.randint(run.label_dim, (run.cfg.batch,), generator=run.gen)[lo:hi]
        cond['class_labels'] = torch.eye(run.label_dim, device=run.device)[y.to(run.device)]
    if run.prompts:  # Sec. 3.4: random captions, the conditional model only (guidance scale 1)
        idx = torch.randint(len(run.prompts), (run.cfg.batch,), generator=run.gen)[lo:hi].tolist()
        cond['encoder_hidden_states'] = run.student.encode_prompts([run.prompts[i] for i in idx])
    use_step = getattr(run.student, 'use_step_condition', False)
    return cond, dict(cond, **({'step': step_value(nfe, run.cfg.afs)} if use_step else {}))


def check_finite(run):
    """A check for every update: a non-finite loss or gradient stops the run, saying where."""
    def check(loss, step):
        grads = [p.grad for p in run.student.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads])) if grads else 0
        if not (torch.isfinite(loss) and torch.isfinite(torch.as_tensor(norm))):
            raise FloatingPointError(f'non-finite loss or gradient at iteration {run.it}, student step {step}, '
                                     f'(loss {loss.item():g}); lower --lr or check the teacher')
    return check


def save_snapshot(run):
    """Atomic snapshot: the student with its sampling recipe, and the training state (weights,
    Adam, counters, every random state) from which `--resume` continues bit for bit."""
    rngs = [torch.get_rng_state()]
    if run.world > 1:
        rngs = [torch.empty_like(rngs[0]) for _ in range(run.world)]
        dist.all_gather(rngs, torch.get_rng_state())
    if run.rank != 0:
        return
    cfg = _plain(asdict(run.cfg))
    meta = dict(sampling=sampling_recipe(run.cfg, run.student).to_dict(), method=run.cfg.method,
                teacher=run.cfg.teacher, kimg=run.nimg / 1000, shape=list(run.shape), config=cfg)
    if isinstance(run.student, latent.Denoiser):  # diffusers' own format, sampled from t_max z as trained
        latent.save_student(run.run_dir / 'student', run.student, prior='edm', **meta)
    else:
        models.save_model(run.run_dir / 'student.pt', run.student, **meta)
    st = dict(student=run.student.state_dict(), optimizer=run.optimizer.state_dict(), iteration=run.it,
              nimg=run.nimg, generator=run.gen.get_state(), torch_rng=rngs, config=cfg)
    data.atomic_write(run.run_dir / 'training-state.pt', lambda tmp: torch.save(st, tmp))


# ---------------------------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------------------------

def start(cfg, resume=None, explicit=None):
    """Settings checked (a resumed run's from its folder), the run folder chosen, the Run built."""
    state = None
    if resume:
        cfg, state = resumed_config(resume, cfg, explicit)
    cfg = validate(copy.deepcopy(cfg), cli.world_size())
    if not cfg.run_dir:
        cfg.run_dir = str(cli.new_run_dir('runs', default_run_name(cfg)))
    elif not resume:
        cli.check_fresh_run_dir(cfg.run_dir)
    cli.RunLock(cfg.run_dir).check()  # a second writer is refused before the teacher is loaded
    return setup(cfg, state)


def vanilla_step(run, part, t_steps, t_teacher, cond, check):
    """Alg. 3, line 1: a batch of data x_0 (with its labels for a conditional teacher); lines 2-7
    in vanilla_iteration."""
    x_all, y_all = run.data
    pick = torch.randint(len(x_all), (run.cfg.batch,), generator=run.gen)[part[0]:part[1]]
    if run.label_dim and y_all is not None:
        cond['class_labels'] = torch.eye(run.label_dim, device=run.device)[y_all[pick].to(run.device)]
    return vanilla_iteration(run.model, run.teacher, run.optimizer, x_all[pick].to(run.device), t_steps,
                             t_teacher, run.cfg, run.gen, (*part, run.cfg.batch), run.lpips, check, **cond)


def distill(cfg: SFDConfig, resume=None, stop_at_iteration=None, progress=True, log=print, on_tick=None,
            explicit=None):
    """Run one distillation; returns (student, summary). Writes run_dir/{stats.jsonl, student.pt,
    training-state.pt}; an empty cfg.run_dir means a new numbered folder under runs/. `resume`
    continues a run folder (settings as `resumed_config` allows; `explicit` names the settings
    the caller chose, default all); `stop_at_iteration` ends early after a snapshot (an
    interruption); `on_tick(row, student)` sees every stats row."""
    run = start(cfg, resume, explicit)
    cfg, total = run.cfg, int(run.cfg.kimg * 1000)
    part = (run.rank * cfg.batch // run.world, (run.rank + 1) * cfg.batch // run.world)  # this rank's slice
    if run.rank == 0:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        log(describe(cfg, run))
    lock = cli.RunLock(run.run_dir) if run.rank == 0 else contextlib.nullcontext()
    with lock, cli.StopOnSignal() as signals, \
            (cli.open_stats(run.run_dir, run.it) if run.rank == 0 else contextlib.nullcontext()) as stats:
        bar = tqdm(total=total, initial=run.nimg, unit='img', unit_scale=True, desc=cfg.method,
                   disable=not progress or run.rank != 0)
        ticks, check, calls, interrupted = Ticks(run, stats, on_tick), check_finite(run), [0, 0], False
        while run.nimg < total:
            # SFD-v (Alg. 6, line 1): this iteration's NFE; its schedule, K times refined for the teacher.
            nfe = cfg.nfe_list[int(torch.randint(len(cfg.nfe_list), (), generator=run.gen))] \
                if cfg.method == 'sfd-v' else cfg.nfe
            t_steps = student_schedule(cfg, nfe, run.student)
            N = len(t_steps) - 1
            t_teacher = grid(cfg, cfg.K * N, run.student)
            cond, student_cond = draw_conditions(run, nfe, *part)
            for group in run.optimizer.param_groups:
                group['lr'] = lr_at(cfg, run.nimg, total)
            if cfg.method == 'vanilla':  # the baseline, Alg. 3: one local step per sample
                losses = vanilla_step(run, part, t_steps, t_teacher, student_cond, check)
                calls[0] += cfg.K * solvers.nfe(cfg.teacher_solver, 1)  # K sub-steps of one interval
                calls[1] += 1
            else:
                # Alg. 4, line 1: x_N = x~_N ~ N(0, t_max^2 I).
                x_N = (cfg.t_max * torch.randn([cfg.batch, *run.shape], generator=run.gen)[slice(*part)]).to(run.device)
                # Alg. 4, line 5 for every n at once: the teacher's trajectory over the refined grid
                # (Alg. 7: the second stage's teacher is a first-stage student sampled with Euler).
                second = cfg.method == 'second-stage'
                solver = 'euler' if second else cfg.teacher_solver
                targets = teacher_targets(run.teacher, x_N, t_teacher, cfg.K, solver, afs=cfg.afs and second,
                                          rounds=cfg.accumulate, **cond, **run.teacher_cond)
                # Alg. 4, lines 3-7: a student step and an update per interval, from its own detached output.
                losses = sfd_iteration(run.model, run.optimizer, x_N, t_steps, targets, cfg,
                                       run.lpips, check, **student_cond)
                calls[0] += solvers.nfe(solver, cfg.K * N, cfg.afs and second)
                calls[1] += N - int(cfg.afs)
            run.it, run.nimg = run.it + 1, run.nimg + cfg.batch
            bar.update(cfg.batch)
            bar.set_postfix_str(' '.join(f'{v:.3g}' for v in losses))
            interrupted = cli.any_rank(signals.requested, run.device)
            done = run.nimg >= total or interrupted or run.it == stop_at_iteration
            ticks.add(losses, nfe, done)
            if done or run.nimg >= ticks.next_snapshot:
                save_snapshot(run)
                ticks.next_snapshot += int(cfg.snapshot_kimg * 1000)
            if done:
                break
        bar.close()
    run.student.eval()
    if run.rank == 0:
        log(f'stopped at iteration {run.it} ({run.nimg / 1000:g} kimg); continue with --resume {run.run_dir}'
            if interrupted else f'done: {run.it} iterations, {run.nimg / 1000:g} kimg; student written to '
            f'{run.run_dir / ("student" if isinstance(run.student, latent.Denoiser) else "student.pt")}')
    if interrupted:
        raise KeyboardInterrupt
    return run.student, dict(iterations=run.it, kimg=run.nimg / 1000, run_dir=str(run.run_dir),
                             teacher_nfe=calls[0], student_calls=calls[1])


def describe(cfg, run):
    """The one-line summary printed when a run starts."""
    teacher = 'euler' if cfg.method == 'second-stage' else cfg.teacher_solver
    nfe = list(cfg.nfe_list) if cfg.method == 'sfd-v' else cfg.nfe
    return (f'{cfg.method}: teacher {cfg.teacher} ({teacher}, K={cfg.K}), student NFE {nfe}'
            f'{" + AFS" if cfg.afs else ""}, {cfg.loss}, lr {cfg.lr:g}, batch {cfg.batch}'
            f'{f" in {cfg.accumulate} rounds" if cfg.accumulate > 1 else ""} on {run.world} x '
            f'{run.device.type}, {cfg.kimg:g} kimg -> {run.run_dir}')


class Ticks:
    """Collects per-step losses and writes one stats.jsonl row per tick (and at the end)."""

    def __init__(self, run, stats, on_tick):
        self.run, self.stats, self.on_tick = run, stats, on_tick
        self.losses, self.start, self.nimg = [], time.time(), run.nimg
        every = int(run.cfg.snapshot_kimg * 1000)
        self.next_snapshot = (run.nimg // every + 1) * every

    def add(self, losses, nfe, done):
        run = self.run
        self.losses.append(losses)
        if not done and run.nimg - self.nimg < run.cfg.tick_kimg * 1000:
            return
        row = dict(kimg=run.nimg / 1000, iteration=run.it, nfe=nfe, lr=run.optimizer.param_groups[0]['lr'],
                   loss_per_step=_mean_columns(self.losses),
                   img_per_s=(run.nimg - self.nimg) / max(time.time() - self.start, 1e-9))
        if self.stats:
            self.stats.write(json.dumps(row) + '\n')
            self.stats.flush()
        if self.on_tick:
            self.on_tick(row, run.student)
        self.losses, self.start, self.nimg = [], time.time(), run.nimg


def _plain(v):
    """Tuples to lists (recursively): what torch.load(weights_only=True) and JSON both accept."""
    if isinstance(v, (list, tuple)):
        return [_plain(u) for u in v]
    if isinstance(v, dict):
        return {k: _plain(u) for k, u in v.items()}
    return v


def _mean_columns(rows):
    n = max(len(r) for r in rows)
    cols = [[r[i] for r in rows if i < len(r)] for i in range(n)]
    return [sum(c) / len(c) for c in cols]


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

HELP = {'teacher': 'a model spec (python models.py -h); the second stage: a first-stage student file',
        'nfe_list': 'SFD-v NFE list L (comma-separated)',
        'kimg': 'thousands of teacher trajectories (paper: SFD 200, SFD-v 800, second stage 2000; toy: 100)',
        'lr': 'Adam lr (paper 5e-5, second stage 5e-4; toy: 5e-4)',
        'batch': 'total over all processes (toy: 256)',
        'run_dir': "'' = a new numbered folder runs/<00000>-<method>-<teacher>-nfe<N>",
        'accumulate': 'rounds per update: batch / (processes x rounds) per forward (SD: 8, i.e. 16 x 8)',
        't_max': 'diffusers teachers: 0 = the model\'s sigma_max (SD: 14.6146)',
        'captions': 'text teachers (SD): the prompts, one per line, MS-COCO captions .json or .csv (text)'}


def main(argv=None):
    p = cli.add_config_flags(cli.parser(__doc__), SFDConfig, HELP)
    p.add_argument('--resume', help=f'continue the run in this folder (may change: {", ".join(RESUMABLE)})')
    p.add_argument('--quiet', action='store_true', help='no progress bar')
    p.add_argument('--eval-n', type=int, default=2000, help='toy teachers: samples in the before/after '
                   'table (images: at most toy.IMAGE_EVAL_N; 0: no table)')
    args = p.parse_args(argv)
    cfg, explicit = cli.config_from_args(SFDConfig, args)
    if not args.resume:
        cfg = validate(apply_defaults(cfg, explicit))  # every bad setting is reported before any loading
    student, summary = distill(cfg, resume=args.resume, progress=not args.quiet, explicit=explicit)
    path = Path(summary['run_dir']) / 'student.pt'  # a diffusers student is the folder student/
    meta = models.load_meta(path) if cli.rank() == 0 and path.is_file() else {}
    name = models.toy_world(meta.get('teacher', ''))
    if name and args.eval_n > 0:  # a toy run: the before/after table
        first = models.load(meta['teacher']) if meta['method'] == 'second-stage' else None
        teacher = models.load(f'toy:{name}')[0]
        print(toy.before_after_table(name, student.cpu(), meta, teacher, first_stage=first, n=args.eval_n))
    cli.close_distributed()


if __name__ == '__main__':
    cli.run(main)
