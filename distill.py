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

SFD under classifier-free guidance (Sec. 3.4) is the same loop with random class labels
(guidance scale omega = 1, i.e. the conditional model); sample the student with any omega.

    python distill.py                         # SFD, 2 NFE, on NVIDIA's CIFAR-10 EDM (downloads)
    python distill.py --teacher toy:ring      # the same code on a 2-D toy teacher, ~1 min on a CPU
    torchrun --nproc_per_node=4 distill.py    # data-parallel
"""

import argparse
import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import solvers
import toy  # also registers the toy MLP, so toy teachers and students load
import unet

# ---------------------------------------------------------------------------------------------
# Settings: SFD Table 6 (CIFAR-10) and the official launch script
# ---------------------------------------------------------------------------------------------

METHODS = ('sfd', 'sfd-v', 'second-stage', 'vanilla')
LOSSES = ('l1', 'l2', 'pseudo_huber', 'lpips', 'l1+lpips')


@dataclass
class SFDConfig:
    """Everything a distillation run needs; the defaults are SFD Table 6 for CIFAR-10."""
    teacher: str = 'cifar10-32x32-uncond-vp'  # EDM preset/.pkl/URL, a student file, or toy:<name>
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
    kimg: float = 200.0                  # thousands of teacher trajectories (200K = 1563 iters)
    data: str = 'cifar10'                # vanilla only: where the x_0 come from
    seed: int = 0
    run_dir: str = 'runs'
    tick_kimg: float = 1.0               # one stats.jsonl line per tick
    snapshot_kimg: float = 50.0          # student + training state every so often (and at the end)
    device: str = 'auto'
    compile: bool = False                # torch.compile teacher and student (opt-in; slow to start)


# Toy teachers are fresh MLPs, not pretrained UNets: a larger lr suits them (SFD's 5e-5 was tuned
# for fine-tuning EDM networks), and they are cheap enough for larger batches.
TOY_DEFAULTS = dict(lr=5e-4, batch=256, kimg=100.0, tick_kimg=5.0, snapshot_kimg=50.0)
# The official second-stage recipe (launch.sh): 2000K trajectories, lr 10x, K = M + 1 = 3. The
# paper's text says K = 2; we follow the code: with K = 3 the 1-NFE student's teacher is the
# first-stage student at 2 * 3 - 1 = 5 NFE, which every SFD-v model of Table 7 was trained at.
SECOND_STAGE_DEFAULTS = dict(nfe=1, K=3, lr=5e-4, kimg=2000.0)


def step_value(nfe, afs):
    """SFD-v's step condition: the number of timestamps of the student schedule (NFE + AFS + 1),
    the raw integer the official code feeds (e.g. 4 for 2 NFE with AFS)."""
    return nfe + int(afs) + 1


def student_schedule(cfg, nfe):
    """The student's N = NFE + AFS Euler steps (Alg. 5 uses N = 3 for 2 NFE with AFS)."""
    return solvers.time_schedule(nfe + int(cfg.afs), cfg.t_min, cfg.t_max, cfg.schedule, cfg.rho)


# ---------------------------------------------------------------------------------------------
# Distance metrics d(., .) (SFD Sec. 3.2, "loss metric"; Table 1)
# ---------------------------------------------------------------------------------------------

def per_sample_loss(metric, x, target, lpips=None):
    """d(x, target) per sample [B]: sums over each sample's elements, as the official code does
    (then averaged over the batch); pseudo-Huber with c = 0.00054 sqrt(d) as in iCT."""
    diff = (x.float() - target.float()).flatten(1)
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

def autocast(device):
    """bf16 autocast on CUDA (EDMPrecond keeps its preconditioning in float32); off on a CPU."""
    return torch.autocast('cuda', dtype=torch.bfloat16, enabled=torch.device(device).type == 'cuda')


def teacher_targets(teacher, x_N, t_teacher, K, solver, afs=False, **cond):
    """SFD Alg. 4, line 5 for every n at once: one teacher solve over the student grid refined
    K times; its states at every K-th timestamp are the targets x~_{N-1}, ..., x~_0."""
    with torch.inference_mode(), autocast(x_N.device):
        traj = solvers.sample(teacher, x_N, t_teacher, solver, afs=afs, trajectory=True, **cond)
    return traj[K::K].clone()  # clone: out of inference mode, usable as loss targets


def sfd_iteration(student, optimizer, x_N, t_steps, targets, cfg, lpips=None, check=None, **cond):
    """SFD Alg. 4 (and Alg. 5 with AFS) for one batch of trajectories; returns per-step losses.

    Every student step is its own optimiser update (Alg. 4, line 6), taken from the student's
    own *detached* previous output (line 7): the student learns to correct the errors it makes
    itself. Official-code choices the paper leaves open, followed here: the student runs in
    train mode (EDM's dropout active), and the loss is the per-sample sum averaged over the batch.
    """
    x, losses = x_N, []
    for i in range(len(t_steps) - 1):  # paper's n = N-1, ..., 0; here t_steps[i] = t_{N-i}
        t_cur, t_next = float(t_steps[i]), float(t_steps[i + 1])
        if cfg.afs and i == 0:
            # Alg. 5, lines 2-3: x_{N-1} = x_N + (t_{N-1} - t_N) x_N / sqrt(1 + t_N^2), no update.
            x = x + (t_next - t_cur) * solvers.afs_eps(x, t_cur)
            losses.append(per_sample_loss('l1', x, targets[i]).mean().item())  # logged only
            continue
        optimizer.zero_grad(set_to_none=True)
        with autocast(x.device):
            x_pred = solvers.euler_step(student, x, t_cur, t_next, **cond)  # Alg. 4, line 4 (Eq. 6)
        loss = per_sample_loss(cfg.loss, x_pred, targets[i], lpips).mean()  # line 6: d(x^psi_n, x~_n)
        loss.backward()
        if check:
            check(loss, i)
        optimizer.step()                                                      # line 6: psi update
        x = x_pred.detach()                                                   # line 7: detach
        losses.append(loss.item())
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
        sub = {c: v[sel] if torch.is_tensor(v) and v.ndim and len(v) == len(x) else v for c, v in cond.items()}
        sub.pop('step', None)  # the teacher takes no step condition
        with torch.inference_mode(), autocast(x.device):
            target[sel] = solvers.sample(teacher, x[sel], t_teacher[K * k:K * (k + 1) + 1],
                                         cfg.teacher_solver, **sub).clone()
    optimizer.zero_grad(set_to_none=True)
    with autocast(x.device):
        x_pred = solvers.euler_step(student, x, t_cur, t_next, **cond)           # line 4
    loss = per_sample_loss(cfg.loss, x_pred, target, lpips).mean()              # line 6
    loss.backward()
    if check:
        check(loss, 0)
    optimizer.step()                                                            # line 7
    return [loss.item()]


# ---------------------------------------------------------------------------------------------
# Teachers and students
# ---------------------------------------------------------------------------------------------

def load_teacher(spec, device):
    """(teacher network in eval mode, its metadata). `spec`: toy:<name>, one of our model files
    (a first-stage student for the second stage), or anything `unet.load_edm` accepts."""
    if spec.startswith('toy:'):  # toy:<name> or toy:<name>:cond (trained once, then cached)
        name, _, cond = spec[4:].partition(':')
        net, meta = toy.toy_teacher(name, cond=cond == 'cond', device=device)
    elif Path(spec).suffix in ('.pt', '.pth') and Path(spec).is_file():
        net, meta = unet.load_model(spec, device=device)
    else:
        net, meta = unet.load_edm(spec, device=device), {'source': spec}
    return net.eval().requires_grad_(False), meta


def toy_lineage(spec):
    """The toy data set behind a teacher spec: toy:<name>[:cond], or a student file distilled
    from one (its metadata names its teacher); None for image models."""
    if spec.startswith('toy:'):
        return spec[4:].split(':')[0]
    if Path(spec).suffix == '.pt' and Path(spec).is_file():  # mmap: the metadata, not the weights
        meta = torch.load(spec, map_location='cpu', weights_only=True, mmap=True).get('meta', {})
        return toy_lineage(meta.get('teacher', ''))
    return None


def apply_defaults(cfg, explicit=()):
    """Fill settings the user did not set with the toy or second-stage recipes."""
    changes = dict(SECOND_STAGE_DEFAULTS) if cfg.method == 'second-stage' else {}
    if cfg.method == 'vanilla':
        changes['teacher_solver'] = 'dpm2'  # Alg. 3 needs a single-step solver over the K sub-steps
    if toy_lineage(cfg.teacher):
        changes.update(TOY_DEFAULTS)
    elif cfg.method == 'second-stage':  # Sec. 4.2: L1 + LPIPS for images, when piq is installed
        try:
            import piq  # noqa: F401
            changes['loss'] = 'l1+lpips'
        except ImportError:
            print('second stage: piq is not installed, training with L1 only (pip install piq for LPIPS)')
    for k, v in changes.items():
        if k not in explicit:
            setattr(cfg, k, v)
    return cfg


def second_stage_setup(cfg, teacher_meta):
    """Alg. 7: the teacher is a first-stage student sampled with Euler at a trained NFE; the new
    student lives on the same (schedule, t_min, t_max, AFS) grid so the two grids nest."""
    s = teacher_meta.get('sampling')
    if not s or s.get('solver') != 'euler':
        raise ValueError('the second stage needs a first-stage SFD/SFD-v student file (--teacher X.pt)')
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


def sampling_config(cfg, student):
    """How to sample the student (stored in its file; Alg. 8 needs nothing else)."""
    nfe = list(cfg.nfe_list) if cfg.method == 'sfd-v' else cfg.nfe
    has_step = getattr(student, 'use_step_condition', False)
    nfes = nfe if isinstance(nfe, list) else [nfe]
    return dict(solver='euler', nfe=nfe, afs=cfg.afs, schedule=cfg.schedule, rho=cfg.rho,
                t_min=cfg.t_min, t_max=cfg.t_max,
                step_values={str(n): step_value(n, cfg.afs) for n in nfes} if has_step else None)


# ---------------------------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------------------------

def _init_distributed(device):
    """torchrun sets WORLD_SIZE/RANK; a single process needs no launcher."""
    if int(os.environ.get('WORLD_SIZE', 1)) > 1 and not dist.is_initialized():
        dist.init_process_group('nccl' if torch.device(device).type == 'cuda' else 'gloo')
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def distill(cfg: SFDConfig, resume=None, stop_at_iteration=None, progress=True, log=print, on_tick=None):
    """Run one distillation; returns (student, summary). Writes cfg.run_dir/{stats.jsonl,
    student.pt, training-state.pt}. `resume` is a run directory to continue;
    `stop_at_iteration` ends early after writing the training state (an interruption);
    `on_tick(row, student)` is called with every stats row (e.g. to evaluate learning curves)."""
    device = torch.device(cfg.device if cfg.device != 'auto' else 'cuda' if torch.cuda.is_available() else 'cpu')
    rank, world = _init_distributed(device)
    if device.type == 'cuda':
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
    if cfg.method not in METHODS:
        raise ValueError(f'unknown method {cfg.method!r}; choose one of {METHODS}')
    if cfg.batch % world:
        raise ValueError(f'batch {cfg.batch} does not split over {world} processes')
    run_dir = Path(resume or cfg.run_dir)
    state = None
    if resume:
        state = torch.load(run_dir / 'training-state.pt', map_location='cpu', weights_only=True)
        cfg = SFDConfig(**{**state['config'], 'nfe_list': tuple(state['config']['nfe_list'])})

    torch.manual_seed(cfg.seed)  # new layers (SFD-v's step embedding) start alike on every rank
    # The teacher, frozen; the student, an exact copy of it (SFD Alg. 4: psi = theta).
    teacher, teacher_meta = load_teacher(cfg.teacher, device)
    cond_extra, teacher_nfe = {}, None
    if cfg.method == 'second-stage':
        teacher_nfe, cond_extra = second_stage_setup(cfg, teacher_meta)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    if cfg.method == 'sfd-v' and not getattr(student, 'use_step_condition', False):
        student.enable_step_condition()  # Alg. 6, "Initialize": zero-initialised, an exact no-op
    use_step = getattr(student, 'use_step_condition', False)
    optimizer = torch.optim.Adam(student.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    torch.manual_seed(cfg.seed * world + rank)  # dropout: a different stream on every rank
    lpips = load_lpips(device) if 'lpips' in cfg.loss else None
    label_dim = getattr(teacher, 'label_dim', 0)
    shape = teacher_meta.get('shape') or [teacher.img_channels, teacher.img_resolution, teacher.img_resolution]

    # Every random draw of the loop is made for the global batch from one generator shared by all
    # ranks (same seed), and each rank takes its slice: a G-process run sees exactly the samples
    # of a 1-process run with the same total batch. Its state and the global one are saved.
    gen = torch.Generator().manual_seed(cfg.seed)
    it, nimg = 0, 0
    if state is not None:
        student.load_state_dict(state['student'])
        optimizer.load_state_dict(state['optimizer'])
        it, nimg = state['iteration'], state['nimg']
        gen.set_state(state['generator'])
        torch.set_rng_state(state['torch_rng'][rank])
    model = student
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == 'cuda' else None,
            find_unused_parameters=True)  # e.g. EDM's map_augment, unused without augment labels
    if cfg.compile:  # same numerics, fused kernels; the files still hold the plain networks
        model, teacher = torch.compile(model), torch.compile(teacher)

    data_x, data_y = (_vanilla_data(cfg, teacher_meta) if cfg.method == 'vanilla' else (None, None))
    total = int(cfg.kimg * 1000)
    batch_gpu = cfg.batch // world
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        log(f'{cfg.method}: teacher {cfg.teacher} ({cfg.teacher_solver if cfg.method != "second-stage" else "euler"}'
            f', K={cfg.K}), student NFE {list(cfg.nfe_list) if cfg.method == "sfd-v" else cfg.nfe}'
            f'{" + AFS" if cfg.afs else ""}, {cfg.loss}, lr {cfg.lr:g}, batch {cfg.batch} on {world} x {device.type}, '
            f'{cfg.kimg:g} kimg -> {run_dir}')

    def check(loss, step):
        grads = [p.grad for p in student.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads])) if grads else 0
        if not (torch.isfinite(loss) and torch.isfinite(torch.as_tensor(norm))):
            raise FloatingPointError(f'non-finite loss or gradient at iteration {it}, student step {step} '
                                     f'(loss {loss.item():g}); lower --lr or check the teacher')

    def save():
        """Atomic snapshot of the student (plus its sampling recipe) and the training state."""
        rngs = [torch.get_rng_state()]
        if world > 1:
            rngs = [torch.empty_like(rngs[0]) for _ in range(world)]
            dist.all_gather(rngs, torch.get_rng_state())
        if rank != 0:
            return
        meta = dict(sampling=sampling_config(cfg, student), method=cfg.method, teacher=cfg.teacher,
                    kimg=nimg / 1000, shape=list(shape), config=_plain(asdict(cfg)))
        unet.save_model(run_dir / 'student.pt', student, **meta)
        st = dict(student=student.state_dict(), optimizer=optimizer.state_dict(), iteration=it,
                  nimg=nimg, generator=gen.get_state(), torch_rng=rngs, config=_plain(asdict(cfg)))
        tmp = run_dir / 'training-state.pt.tmp'
        torch.save(st, tmp)
        os.replace(tmp, run_dir / 'training-state.pt')

    stats_file = open(run_dir / 'stats.jsonl', 'a') if rank == 0 else None
    bar = tqdm(total=total, initial=nimg, unit='img', unit_scale=True, disable=not progress or rank != 0,
               desc=cfg.method)
    tick_losses, tick_start, tick_nimg = [], time.time(), nimg
    next_snapshot = (nimg // int(cfg.snapshot_kimg * 1000) + 1) * int(cfg.snapshot_kimg * 1000)
    teacher_nfe = student_calls = 0  # teacher evaluations per sample; student calls per iteration
    lo, hi = rank * batch_gpu, (rank + 1) * batch_gpu  # this rank's slice of the global batch
    while nimg < total:
        # SFD-v (Alg. 6, line 1): this iteration's NFE, its schedule and its step condition.
        nfe = cfg.nfe_list[int(torch.randint(len(cfg.nfe_list), (), generator=gen))] \
            if cfg.method == 'sfd-v' else cfg.nfe
        t_steps = student_schedule(cfg, nfe)
        N = len(t_steps) - 1
        t_teacher = solvers.time_schedule(cfg.K * N, cfg.t_min, cfg.t_max, cfg.schedule, cfg.rho)
        cond = {}
        if label_dim:  # a class-conditional teacher: random labels, guidance scale 1 (Sec. 3.4)
            y = torch.randint(label_dim, (cfg.batch,), generator=gen)[lo:hi]
            cond['class_labels'] = torch.eye(label_dim, device=device)[y.to(device)]
        student_cond = dict(cond, **({'step': step_value(nfe, cfg.afs)} if use_step else {}))
        # lr schedule of the official code: lr / 10 once half of the trajectories are used.
        for group in optimizer.param_groups:
            group['lr'] = cfg.lr if nimg < total / 2 else cfg.lr / 10
        if cfg.method == 'vanilla':
            pick = torch.randint(len(data_x), (cfg.batch,), generator=gen)[lo:hi]
            x0 = data_x[pick].to(device)
            if label_dim and data_y is not None:
                cond['class_labels'] = torch.eye(label_dim, device=device)[data_y[pick].to(device)]
                student_cond['class_labels'] = cond['class_labels']
            losses = vanilla_iteration(model, teacher, optimizer, x0, t_steps, t_teacher, cfg, gen,
                                       (lo, hi, cfg.batch), lpips, check, **student_cond)
            teacher_nfe += cfg.K * solvers.nfe(cfg.teacher_solver, 1)  # K sub-steps of one interval
        else:
            # Alg. 4, line 1: x_N = x~_N ~ N(0, t_max^2 I); line 5 for all n: the teacher's states.
            x_N = cfg.t_max * torch.randn([cfg.batch, *shape], generator=gen)[lo:hi].to(device)
            second = cfg.method == 'second-stage'
            solver = 'euler' if second else cfg.teacher_solver
            targets = teacher_targets(teacher, x_N, t_teacher, cfg.K, solver, afs=cfg.afs and second,
                                      **cond, **cond_extra)
            losses = sfd_iteration(model, optimizer, x_N, t_steps, targets, cfg, lpips, check, **student_cond)
            teacher_nfe += solvers.nfe(solver, cfg.K * N, cfg.afs and second)  # the whole trajectory
        student_calls += N - int(cfg.afs) if cfg.method != 'vanilla' else 1
        it += 1
        nimg += cfg.batch
        bar.update(cfg.batch)
        tick_losses.append(losses)
        bar.set_postfix_str(' '.join(f'{v:.3g}' for v in losses))
        done = nimg >= total or (stop_at_iteration is not None and it >= stop_at_iteration)
        if done or nimg - tick_nimg >= cfg.tick_kimg * 1000:
            speed = (nimg - tick_nimg) / max(time.time() - tick_start, 1e-9)
            row = dict(kimg=nimg / 1000, iteration=it, nfe=nfe, lr=optimizer.param_groups[0]['lr'],
                       loss_per_step=_mean_columns(tick_losses), img_per_s=speed)
            if stats_file:
                stats_file.write(json.dumps(row) + '\n')
                stats_file.flush()
            if on_tick:
                on_tick(row, student)
            tick_losses, tick_start, tick_nimg = [], time.time(), nimg
        if done or nimg >= next_snapshot:
            save()
            next_snapshot += int(cfg.snapshot_kimg * 1000)
        if done:
            break
    bar.close()
    if stats_file:
        stats_file.close()
    student.eval()
    summary = dict(iterations=it, kimg=nimg / 1000, teacher_nfe=teacher_nfe, student_calls=student_calls)
    if rank == 0:
        log(f'done: {it} iterations, {nimg / 1000:g} kimg; student written to {run_dir / "student.pt"}')
    return student, summary


def _vanilla_data(cfg, teacher_meta):
    """Alg. 3's data x_0 (and labels): the toy's own data set, or images scaled to [-1, 1]."""
    if cfg.teacher.startswith('toy:'):
        return toy.toy_data(cfg.teacher[4:].split(':')[0], 20_000, generator=torch.Generator().manual_seed(cfg.seed))
    import data
    x, y = data.load_images(cfg.data)
    return data.to_float(x), y


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

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(SFDConfig):
        default = f.default
        name = '--' + f.name.replace('_', '-')
        if f.name == 'nfe_list':
            p.add_argument(name, type=lambda s: tuple(int(v) for v in s.split(',')), default=default,
                           help='SFD-v NFE list L (comma-separated)')
        elif f.type is bool or isinstance(default, bool):
            p.add_argument(name, type=lambda s: s.lower() in ('1', 'true', 'yes'), default=default)
        else:
            p.add_argument(name, type=type(default), default=default)
    p.add_argument('--resume', help='continue the run in this directory')
    p.add_argument('--quiet', action='store_true', help='no progress bar')
    args = p.parse_args(argv)
    explicit = {a.lstrip('-').split('=')[0].replace('-', '_') for a in (argv or __import__('sys').argv[1:])
                if a.startswith('--')}
    cfg = SFDConfig(**{f.name: getattr(args, f.name) for f in fields(SFDConfig)})
    cfg = apply_defaults(cfg, explicit)
    if cfg.run_dir == 'runs' and 'run_dir' not in explicit:
        name = f'{cfg.method}-{cfg.teacher.replace(":", "-").replace("/", "_")}-nfe{cfg.nfe}'
        cfg.run_dir = str(Path('runs') / Path(name).name)
    student, summary = distill(cfg, resume=args.resume, progress=not args.quiet)
    name = toy_lineage(cfg.teacher)
    if name and (not dist.is_initialized() or dist.get_rank() == 0):  # the before/after table
        meta = unet.load_model(Path(args.resume or cfg.run_dir) / 'student.pt')[1]
        first = load_teacher(cfg.teacher, 'cpu') if cfg.method == 'second-stage' else None
        print(toy.before_after_table(name, student.cpu(), meta, first_stage=first))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == '__main__':
    main()
