"""SFD: Simple and Fast Distillation of diffusion models (Zhou et al., NeurIPS 2024).

A teacher diffusion model plus a training-free ODE solver define sampling trajectories; a
student (initialised as an exact copy of the teacher) learns to follow them with a few Euler
steps of its own. This file holds the paper's Appendix C, in its order, over `solvers.py`:

    vanilla        Alg. 3   local trajectory distillation from data, the baseline
    SFD            Alg. 4   the whole teacher trajectory, the student imitates it step by step
    SFD + AFS      Alg. 5   the first student step is the analytical first step: one NFE saved
    SFD-v          Alg. 6   one student for several NFE, told the NFE by a step condition
    second stage   Alg. 7   a 1-NFE student distilled from an SFD/SFD-v student
    sampling       Alg. 8   Euler over the student's own schedule (`sampling_recipe` + solvers.sample_with)

SFD under classifier-free guidance (Sec. 3.4) is the same iteration with random class labels or
captions at guidance scale omega = 1 (Meng's w = 0, the conditional model only); sample the
student at any w. Copied next to `solvers.py` alone, this file runs an SFD iteration on any
denoiser D(x, t, **cond); a whole run (teachers by name, data, files, resume, torchrun) is
distill_run.py around train.py's loop, and the settings of each world come from presets.py.

    python distill.py                         # SFD, 2 NFE, on NVIDIA's CIFAR-10 EDM (downloads)
    python distill.py --teacher toy:ring      # the same code on a 2-D toy teacher, ~1 min on a CPU
    python distill.py --teacher stable-diffusion-v1-5/stable-diffusion-v1-5 --method sfd-v \\
        --captions MS-COCO_val2014_30k_captions.csv     # SFD-v on SD v1.5, 2-5 steps (a GPU)
    torchrun --nproc_per_node=4 distill.py    # data-parallel
"""

import contextlib
import math
from dataclasses import dataclass

import torch

import solvers

METHODS = ('sfd', 'sfd-v', 'second-stage', 'vanilla')
LOSSES = ('l1', 'l2', 'pseudo_huber', 'lpips', 'l1+lpips')


@dataclass(frozen=True)
class SFDConfig:
    """Every setting of a distillation run; the defaults are SFD Table 6 for CIFAR-10 (presets.py
    holds the other worlds' recipes and resolves a run's settings once)."""
    teacher: str = 'cifar10-32x32-uncond-vp'  # any models.load spec (second stage: a student)
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
    lpips_vgg: str = ''                  # LPIPS: torchvision's VGG16 file (path/URL); '' = download once
    lpips_weights: str = ''              # LPIPS: piq's lpips_weights.pt (path/URL); '' = download once
    lr: float = 5e-5                     # Adam(0.9, 0.999), divided by 10 half-way
    batch: int = 128                     # trajectories per iteration, over all processes
    accumulate: int = 1                  # micro-batches per update (SD: 128 = 16 x 8)
    captions: str = ''                   # text teachers: the prompts (one per line, COCO .json, .csv)
    grad_checkpointing: bool = False     # diffusers students: recompute activations in backward
    lora_rank: int = 0                   # diffusers students: train LoRA adapters of this rank only (0: all)
    lora_alpha: float = 0.0              # the adapters' scale is alpha / rank; 0: alpha = rank
    lora_targets: str = ''               # the UNet layers adapted; '': attention + feed-forward (hub.py)
    kimg: float = 200.0                  # thousands of teacher trajectories (200K = 1563 iterations)
    data: str = 'cifar10'                # vanilla only: where the x_0 come from
    seed: int = 0
    run_dir: str = ''                    # '' = a new numbered folder runs/<00000>-<method>-<teacher>-nfe<N>
    tick_kimg: float = 1.0               # one stats.jsonl row per tick
    snapshot_kimg: float = 50.0          # student + training state every so often (and at the end)
    device: str = 'auto'
    precision: str = 'auto'              # auto (bf16 autocast on CUDA) | fp32 | bf16
    compile: bool = False                # torch.compile teacher and student (opt-in; slow to start)
    compile_backend: str = 'inductor'


# ---------------------------------------------------------------------------------------------
# Schedules and the step condition
# ---------------------------------------------------------------------------------------------

def step_value(nfe, afs):
    """SFD-v's step condition: the number of timestamps of the student schedule (NFE + AFS + 1),
    the raw integer the official code feeds (e.g. 4 for 2 NFE with AFS)."""
    return nfe + int(afs) + 1


def student_schedule(cfg, nfe, net=None):
    """The student's N = NFE + AFS Euler steps (Alg. 5 uses N = 3 for 2 NFE with AFS)."""
    return grid(cfg, nfe + int(cfg.afs), net)


def grid(cfg, n, net=None):
    """cfg's n-step schedule. A kind solvers does not know is the model's own grid (a diffusers
    model's, uniform in its timestep: net.schedule). Every kind nests, grid(K n)[::K] == grid(n),
    so the teacher's grid holds the student's."""
    if cfg.schedule in solvers.SCHEDULES:
        return solvers.time_schedule(n, cfg.t_min, cfg.t_max, cfg.schedule, cfg.rho)
    return net.schedule(n, cfg.t_min, cfg.t_max, cfg.schedule, cfg.rho)


def lr_at(cfg, nimg, total):
    """The official schedule: lr until half of the trajectories are used, then lr / 10. The
    official loop checks after an iteration's updates whether the images seen before it reached
    half, so the switch takes effect one iteration after the one that crosses total / 2."""
    return cfg.lr / 10 if nimg - cfg.batch >= total / 2 else cfg.lr


def micro_batches(x, cond, n):
    """Gradient accumulation: x [B, ...] and its per-sample conditions (tensors of length B, e.g.
    the prompts' embeddings) cut into n micro-batches; other conditions go to each unchanged."""
    B = x.shape[0]
    pick = lambda v, i: v[i.to(v.device)] if torch.is_tensor(v) and v.ndim and len(v) == B else v
    parts = torch.arange(B).tensor_split(n)
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


def load_lpips(device, vgg_weights=None, lpips_weights=None):
    """The official code's LPIPS (piq's: VGG16 with average pooling, its learned weights), written out
    in lpips_vgg.py. Each argument: a local path or URL of torchvision's VGG16 state dict and of piq's
    lpips_weights.pt; None = the official file, downloaded once (sha256 checked) and cached."""
    import lpips_vgg
    return lpips_vgg.load(device, vgg_weights, lpips_weights)


# ---------------------------------------------------------------------------------------------
# One iteration of each method (Alg. 3-7)
# ---------------------------------------------------------------------------------------------

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
    teacher_cond = {k: v for k, v in cond.items() if k != 'step'}  # the teacher takes no step condition
    for k in i.unique().tolist():                                               # line 5, per n
        sel = (i == k).to(x.device)
        sub = {c: v[sel] if torch.is_tensor(v) and v.ndim and len(v) == len(x) else v
               for c, v in teacher_cond.items()}
        with torch.inference_mode(), solvers.autocast(x.device, cfg.precision):
            target[sel] = solvers.sample(teacher, x[sel], t_teacher[K * k:K * (k + 1) + 1],
                                         cfg.teacher_solver, **sub).clone()
    optimizer.zero_grad(set_to_none=True)
    with solvers.autocast(x.device, cfg.precision):
        x_pred = solvers.euler_step(student, x, t_cur, t_next, **cond)           # line 4
    loss = per_sample_loss(cfg.loss, x_pred, target, lpips).mean()              # line 6
    loss.backward()
    if check:
        check(loss, 0)
    optimizer.step()                                                            # line 7
    return [loss.item()]


def teacher_targets(teacher, x_N, t_teacher, K, solver, afs=False, accumulate=1, precision='auto', **cond):
    """SFD Alg. 4, line 5 for every n at once: one teacher solve over the student grid refined
    K times; its states at every K-th timestamp are the targets x~_{N-1}, ..., x~_0 ([N, B, ...]).
    `accumulate` micro-batches are solved one after another (the memory of one; the same states)."""
    with torch.inference_mode(), solvers.autocast(x_N.device, precision):
        # x.clone(): an inference tensor like every later state, so torch.compile traces the teacher once
        traj = torch.cat([solvers.sample(teacher, x.clone(), t_teacher, solver, afs=afs, trajectory=True, **c)
                          for x, c in micro_batches(x_N, cond, accumulate)], dim=1)
    return traj[K::K].clone()  # clone: out of inference mode, usable as loss targets


def sfd_iteration(student, optimizer, x_N, t_steps, targets, cfg, lpips=None, check=None, **cond):
    """SFD Alg. 4 (and Alg. 5 with AFS) for one batch of trajectories; returns per-step losses.

    Every student step is its own optimiser update (Alg. 4, line 6), taken from the student's
    own *detached* previous output (line 7): the student learns to correct the errors it makes
    itself. Official-code choices the paper leaves open, followed here: the student runs in
    train mode (EDM's dropout active), and the loss is the per-sample sum averaged over the batch.
    With cfg.accumulate = R micro-batches (sfd-main's SD recipe) each update sums the gradients of
    R micro-batches, each loss divided by the whole batch: the update of one batch, in 1/R the memory.
    """
    B, R = x_N.shape[0], cfg.accumulate
    parts = micro_batches(x_N, cond, R)
    xs, conds = [x for x, _ in parts], [c for _, c in parts]
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
            last = r == R - 1  # DDP: the gradients are all-reduced once, after the last micro-batch
            sync = last or not hasattr(student, 'no_sync')
            with contextlib.nullcontext() if sync else student.no_sync():
                with solvers.autocast(xs[r].device, cfg.precision):
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


def second_stage_grid(teacher_meta, spec=''):
    """Alg. 7: the new student lives on the first-stage student's grid (schedule, rho, t_min,
    t_max, AFS), so the two grids nest: the settings a second stage takes from its teacher."""
    s = teacher_meta.get('sampling') or {}
    if 'method' not in teacher_meta or s.get('solver') != 'euler':
        raise ValueError(f'--teacher {spec}: the second stage needs a first-stage SFD/SFD-v student file '
                         '(runs/<run>/student.pt)')
    return {k: s[k] for k in ('schedule', 'rho', 't_min', 't_max', 'afs')}


def second_stage_setup(cfg, teacher_meta):
    """Alg. 7: the teacher is a first-stage student sampled with Euler at one of its trained NFEs,
    K (N + AFS) - AFS; returns (that NFE, the teacher's step condition for it, if it has one)."""
    second_stage_grid(teacher_meta, cfg.teacher)  # a first-stage student, or one clear error
    s = teacher_meta['sampling']
    teacher_nfe = cfg.K * (cfg.nfe + int(cfg.afs)) - int(s['afs'])
    trained = s['nfe'] if isinstance(s['nfe'], list) else [s['nfe']]
    if teacher_nfe not in trained:
        raise ValueError(f'with K={cfg.K} the teacher must sample at {teacher_nfe} NFE, but it was '
                         f'trained at {trained}: choose K so that K*(NFE+AFS)-AFS is one of them')
    step = (s.get('step_values') or {}).get(str(teacher_nfe))
    return teacher_nfe, ({} if step is None else {'step': step})


def sampling_recipe(cfg, student):
    """Alg. 8, how to sample the student (stored in its file; nothing else is needed): Euler over
    its own schedule, with AFS and, for SFD-v, the step condition of every trained NFE."""
    nfes = list(cfg.nfe_list) if cfg.method == 'sfd-v' else [cfg.nfe]
    # A model-specific grid needs the model's levels: stored for one NFE (sample.py makes the others).
    single = cfg.schedule not in solvers.SCHEDULES and cfg.method != 'sfd-v'
    return solvers.Recipe('euler', nfes if cfg.method == 'sfd-v' else cfg.nfe, afs=cfg.afs,
                          schedule=cfg.schedule, rho=cfg.rho, t_min=cfg.t_min, t_max=cfg.t_max,
                          ends_at_zero=False,
                          t_steps=student_schedule(cfg, cfg.nfe, student).tolist() if single else None,
                          step_values={str(n): step_value(n, cfg.afs) for n in nfes}
                          if student.use_step_condition else None)


# ---------------------------------------------------------------------------------------------
# A whole run, and the command line (the machinery is imported only here)
# ---------------------------------------------------------------------------------------------

def apply_defaults(cfg, explicit=()):
    """`cfg` with its world's preset (presets.py) in every field the preset sets and `explicit`
    does not name; not yet validated."""
    import presets
    return presets.apply_sfd_defaults(cfg, explicit)


def validate(cfg, world=1):
    """One clear error for any setting that cannot work, naming its flag (presets.validate_sfd)."""
    import presets
    return presets.validate_sfd(cfg, world)


def distill(cfg, resume=None, stop_at_iteration=None, progress=True, log=print, on_tick=None, explicit=None):
    """Run one distillation (distill_run.py): returns (student, summary); writes run_dir/{stats.jsonl,
    student file, training-state.pt}. `resume` continues a run folder, `stop_at_iteration` ends
    early after a snapshot, `on_tick(row, student)` sees every stats row."""
    import distill_run
    return distill_run.resolve_and_run(cfg, resume=resume, stop_at_iteration=stop_at_iteration,
                                       progress=progress, log=log, on_tick=on_tick, explicit=explicit)


def main(argv=None):
    """python distill.py [--flags]: resolve the settings (presets.py), run, print the toy table."""
    import distill_run
    distill_run.main(argv, __doc__)


if __name__ == '__main__':
    import cli
    cli.run(main)
