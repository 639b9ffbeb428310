"""The README's image results: SFD, its baselines and guided distillation on a CIFAR-10 teacher of our own.

The teacher is `toy:cifar10-16` (toy.py: EDM's DDPM++ trained here on CIFAR-10 average-pooled to
16x16), the guided pair `toy:cifar10-16:cond` (one net with label dropout). Every method starts
from the same noise, and each row prints

  metric A  the per-pixel RMSE (images in [-1, 1]) to the teacher's own fine ODE solution from
            the same noise (toy.reference_solution: --ref-steps DPM-Solver++(3M) steps, full third
            order), at the row's own t_min (0.006, or 0.002 for EDM's sampler, which ends at 0,
            and the t_min = 0.002 rows); its spread over the noises (s.e.) and over seeds (std);
  FID       optional (--fid N >= 2048): against N real 16x16 training images, fid.py's EDM
            protocol, for the --fid-rows (seed 0 students), with the floor of that N (another N
            real images). FIDs of 16x16 images at a small N rank the rows of this table and are
            NOT comparable with any CIFAR-10 FID (32x32, 50,000 images).

Rows: the teacher's fine solve, EDM's Heun (35 NFE), DPM-Solver++(3M) and Euler at 2-5 NFE, SFD +
AFS at 2 NFE, SFD-v at 2-5, the second stage at 1 NFE, vanilla trajectory distillation (Alg. 3) at
2 NFE, Meng's stage-one student at w = 0, 1, 2, 4 (stage two, the stochastic sampler and the
stage-one recipe search: experiments/guided_image_results.py), and SFD Table 1's ladder (teacher
Heun / DPM-2 / DPM++(3M), t_min 0.002 -> 0.006, AFS, L2 -> L1) next to the paper's CIFAR-10 FIDs.
Every student trains for --kimg thousand trajectories (SFD-v twice as many), far below the
paper's 100-200K: what is compared is the ordering at equal cost, not the paper's numbers. SFD +
AFS trains for every --seeds, every other student for the first seed.
Students are kept in --out (runs/image-results, shared with notebook 04) and reused when present.
The results go to <out>/results.md and results.json as well.

    python experiments/image_results.py                 # metric A only: about 70 minutes on 2 cores
                                                        # (+ ~6 for the guided recipe's 600 updates)
    python experiments/image_results.py --fid 2048      # + FIDs: about 30 minutes more

The CIFAR-10 images: the official archive (data.py downloads it once) or $SFD_CIFAR10 (toy.py).
"""
import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import distill  # noqa: E402
import guided_pd  # noqa: E402
import guided_pd_run  # noqa: E402
import models  # noqa: E402
import sample  # noqa: E402
import solvers  # noqa: E402
import toy  # noqa: E402

# SFD Table 1 (CIFAR-10, 2 NFE, FID of 50K samples): (run name, method, teacher, K, t_min, AFS, loss, FID).
# K keeps the teacher at 12 NFE per trajectory, as the paper does (Heun and DPM-2 take 2 per step).
LADDER = [('vanilla', 'vanilla', 'dpm2', 3, 0.002, False, 'l2', 16.69),
          ('heun-l2', 'sfd', 'heun', 3, 0.002, False, 'l2', 20.88),
          ('dpm2-l2', 'sfd', 'dpm2', 3, 0.002, False, 'l2', 12.50),
          ('dpmpp3m-l2', 'sfd', 'dpmpp3m', 6, 0.002, False, 'l2', 11.65),
          ('tmin-l2', 'sfd', 'dpmpp3m', 6, 0.006, False, 'l2', 10.93),
          ('afs-l2', 'sfd', 'dpmpp3m', 4, 0.006, True, 'l2', 5.67),
          ('sfd-afs', 'sfd', 'dpmpp3m', 4, 0.006, True, 'l1', 4.57)]
NAMES = {'dpmpp3m': 'DPM++(3M)', 'dpm2': 'DPM-2', 'heun': 'Heun'}


def train_student(name, seed, args, **settings):
    """One distill.py run in <out>/<name>-s<seed> (reused when its student file exists); returns
    (net, meta, training seconds)."""
    run_dir = Path(args.out) / f'{name}-s{seed}'
    if not (run_dir / 'student.pt').is_file():
        cfg = distill.SFDConfig(**dict(dict(teacher=args.teacher, seed=seed, run_dir=str(run_dir), batch=args.batch,
                                            lr=args.lr, kimg=args.kimg, tick_kimg=1.0, snapshot_kimg=1e6,
                                            device='cpu'), **settings))
        t0 = time.time()
        distill.distill(cfg, progress=False, log=lambda *_: None)
        (run_dir / 'seconds.json').write_text(json.dumps(dict(seconds=time.time() - t0,
                                                              threads=torch.get_num_threads())))
    net, meta = models.load_model(run_dir / 'student.pt')
    return net, meta, json.loads((run_dir / 'seconds.json').read_text())['seconds']


@torch.no_grad()
def per_sample_rmse(x, ref):
    """Each sample's per-pixel RMSE to its reference: [B]."""
    return (x - ref).flatten(1).square().mean(1).sqrt()


class Table:
    """Rows of (label, NFE) -> per-seed metric A values, with their sample spread and FIDs."""

    def __init__(self):
        self.rows, self.fid = {}, {}

    def add(self, label, nfe, errors):
        self.rows.setdefault((label, nfe), []).append(errors)

    def value(self, label, nfe):
        return float(np.mean([e.mean().item() for e in self.rows[label, nfe]]))

    def to_dict(self):
        """Every row as {label, nfe, metric A per seed, FID}: what notebooks plot."""
        return [dict(label=label, nfe=nfe, metric_a=[e.mean().item() for e in runs],
                     fid=self.fid.get((label, nfe))) for (label, nfe), runs in self.rows.items()]

    def markdown(self, paper=None):
        paper = paper or {}
        out = ['| method | NFE | metric A | ± s.e. (samples) | ± std (seeds) | FID (16x16) | paper FID |',
               '| --- | ---: | ---: | ---: | ---: | ---: | ---: |']
        for (label, nfe), runs in self.rows.items():
            means = [e.mean().item() for e in runs]
            se = float(np.mean([e.std().item() / math.sqrt(len(e)) for e in runs]))
            sd = f'{np.std(means, ddof=1):.4f}' if len(means) > 1 else '-'
            fid = self.fid.get((label, nfe))
            a = '-' if np.isnan(np.mean(means)) else f'{np.mean(means):.4f}'
            se = '-' if np.isnan(se) else f'{se:.4f}'
            out.append(f'| {label} | {nfe} | {a} | {se} | {sd} | '
                       f'{"-" if fid is None else f"{fid:.1f}"} | {paper.get((label, nfe), "-")} |')
        return '\n'.join(out)


def fid_of(images_uint8, ref_stats, model):
    """FID (EDM protocol) of uint8 images [N, 3, H, W] against reference statistics."""
    import fid
    stats = fid.compute_stats(images_uint8, model, batch_size=64, progress=False)
    return fid.fid_from_stats(stats, ref_stats)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--teacher', default='toy:cifar10-16')
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1],
                   help='training seeds of SFD + AFS (every other student: the first)')
    p.add_argument('--kimg', type=float, default=3.0, help='thousand trajectories per student (SFD-v: 2x)')
    p.add_argument('--batch', type=int, default=32)
    p.add_argument('--lr', type=float, default=2e-4, help='Adam lr (the second stage: 10x), /10 half-way')
    p.add_argument('--n', type=int, default=128, help='noises for metric A (the same for every row)')
    p.add_argument('--ref-steps', type=int, default=128,
                   help="steps of the teacher's fine solve (128 vs 512: 2e-5 per-pixel RMSE apart)")
    p.add_argument('--guided-iters', type=int, default=None,
                   help="stage-one updates (default: presets.GUIDED['images']; 0: no guided rows)")
    p.add_argument('--no-ladder', dest='ladder', action='store_false', help='skip SFD Table 1 ladder runs')
    p.add_argument('--fid', type=int, default=0, help='images per FID (>= 2048; 0: no FID, the default)')
    p.add_argument('--fid-rows', default='Heun (EDM)@35;DPM-Solver++(3M)@2;SFD + AFS@2',
                   help='the rows that get an FID (seed 0 students; about 5 minutes each on 2 CPU cores): '
                        'label@NFE;...')
    p.add_argument('--time-teacher-kimg', type=float, default=10.0,
                   help="train the teacher's recipe afresh for this many kimg to measure its speed (0: skip; "
                        "2 kimg measured 116 img/s where a 100 kimg run reached 214)")
    p.add_argument('--inception', default=None,
                   help="FID weights (path or URL; default fid.py's NVIDIA file)")
    p.add_argument('--out', default='runs/image-results')
    return p.parse_args(argv)


def baseline_rows(add, teacher, args):
    """The teacher's training-free solvers at 2-5 NFE (and EDM's Heun at 35) from the same noise."""
    add('Heun (EDM)', 35, teacher, solvers.Recipe())
    for solver, label in (('dpmpp3m', 'DPM-Solver++(3M)'), ('euler', 'Euler')):
        for k in (2, 3, 4, 5):
            add(label, k, teacher, toy.solver_config(solver, k))
    add('DPM-Solver++(3M) + AFS', 2, teacher, toy.solver_config('dpmpp3m', 2, afs=True))


def student_rows(add, args, times, t_start):
    """SFD Table 1's ladder (SFD + AFS for every seed, the rest for the first), SFD-v at 2-5 NFE
    and the second stage at 1 NFE, each trained here."""
    ladder_rows = LADDER if args.ladder else [r for r in LADDER if r[0] in ('sfd-afs', 'vanilla')]
    for seed in args.seeds:
        print(f'seed {seed}: students ({time.time() - t_start:.0f} s so far)', flush=True)
        # SFD + AFS for every seed (its spread over seeds stands for the others'), every other
        # student for the first seed only (a CPU hour).
        for name, method, solver, K, t_min, afs, loss, _ in (ladder_rows if seed == args.seeds[0] else
                                                             [r for r in LADDER if r[0] == 'sfd-afs']):
            net, meta, sec = train_student(name, seed, args, method=method, teacher_solver=solver, K=K,
                                           t_min=t_min, afs=afs, loss=loss)
            times.setdefault(name, []).append(sec)
            add(ladder_label(name, method, solver, K, t_min, afs, loss), 2, net, meta['sampling'])
        if seed != args.seeds[0]:
            continue
        net, meta, sec = train_student('sfd-v', seed, args, method='sfd-v', kimg=2 * args.kimg)
        times.setdefault('sfd-v', []).append(sec)
        for k in (2, 3, 4, 5):
            add('SFD-v', k, net, meta['sampling'])
        # The second stage (Alg. 7): K = 3, its teacher the SFD-v student at 5 NFE; lr 10x (official).
        # L1, and L1 + LPIPS (the paper's, Sec. 4.2) where the real LPIPS weights are in the cache.
        losses = ['l1'] + ['l1+lpips'] * _has_lpips_weights()
        if len(losses) == 1:
            print('second stage with L1 + LPIPS: not run, the real LPIPS weights are not in the download '
                  f'cache {_lpips_cache()} (`python lpips_vgg.py` fetches them once, 528 MB)', flush=True)
        for loss in losses:
            name = 'second-stage' if loss == 'l1' else 'second-stage-lpips'
            net, meta, sec = train_student(name, seed, args, method='second-stage', nfe=1, K=3,
                                           lr=10 * args.lr, loss=loss,
                                           teacher=str(Path(args.out) / f'sfd-v-s{seed}' / 'student.pt'))
            times.setdefault(name, []).append(sec)
            add(f'second stage ({"L1" if loss == "l1" else "L1 + LPIPS"})', 1, net, meta['sampling'])


def main(argv=None):
    args = parse_args(argv)
    t_start = time.time()
    world = models.toy_world(args.teacher)
    teacher, tmeta = models.load(args.teacher)
    shape, table, times = tmeta['shape'], Table(), {}
    if args.time_teacher_kimg:
        times['teacher img/s'] = teacher_throughput(args.teacher, args.time_teacher_kimg)
    z = toy.eval_noise(args.n, seed=1234, shape=shape)
    # The teacher's fine solves, one per t_min (EDM's sampler, ending at 0, is compared at 0.002).
    t0 = time.time()
    refs = {t: toy.reference_solution(teacher, z, t_min=t, steps=args.ref_steps) for t in (0.006, 0.002)}
    times['references'] = time.time() - t0
    ref_of = lambda recipe: refs[0.002 if recipe['ends_at_zero'] or recipe['t_min'] < 0.004 else 0.006]
    samplers = {}  # (label, nfe) -> (net, recipe, cond): what FID rows regenerate

    def add(label, nfe, net, recipe, **cond):
        recipe = solvers.Recipe.from_dict(recipe).to_dict()
        with torch.no_grad():
            x = solvers.sample_with(net.eval(), z, recipe, nfe=nfe, **cond)
        table.add(label, nfe, per_sample_rmse(x, ref_of(recipe)))
        samplers.setdefault((label, nfe), (net, recipe, cond))

    table.add(f'teacher fine solve (DPM++(3M), {args.ref_steps} steps, t_min 0.006)', args.ref_steps,
              torch.zeros(args.n))
    baseline_rows(add, teacher, args)
    student_rows(add, args, times, t_start)
    if args.guided_iters != 0:
        times['guided'] = guided_rows(args, world, table)
    print(f'\nteacher {args.teacher}: {tmeta["train"]["kimg"]:g} kimg, trained in '
          f'{tmeta.get("train_seconds", float("nan")) / 60:.1f} min on {tmeta.get("train_threads", "?")} '
          f'thread(s); metric A on {args.n} noises, students {args.kimg:g} kimg (SFD-v {2 * args.kimg:g}), '
          f'batch {args.batch}, seeds {args.seeds}')
    if args.fid:
        times['fid'] = fid_rows(args, world, table, samplers, tmeta)
    paper = {(ladder_label(*row[:7]), 2): row[7] for row in LADDER}
    print(table.markdown(paper))
    (Path(args.out) / 'results.md').write_text(table.markdown(paper) + '\n')
    (Path(args.out) / 'results.json').write_text(json.dumps(table.to_dict(), indent=1))
    targets(table, times, tmeta)
    print('\ntimes (s): ' + ', '.join(f'{k} {np.mean(v) if isinstance(v, list) else v:.0f}'
                                       for k, v in times.items()) + f'; total {time.time() - t_start:.0f} s')


def teacher_throughput(spec, kimg):
    """Images per second of the teacher's own training recipe (toy.train_images, a fresh net for
    `kimg` thousand images, here and now): the cached teacher may have been trained elsewhere."""
    settings = dict(models.load(spec)[1]['train'], kimg=kimg)
    t0 = time.time()
    toy.train_teacher(settings, progress=False)
    return kimg * 1000 / (time.time() - t0)


def ladder_label(name, method, solver, K, t_min, afs, loss):
    """A row label of SFD Table 1's ladder ('SFD + AFS' for the final, default configuration)."""
    if name == 'sfd-afs':
        return 'SFD + AFS'
    return (f'{"vanilla (Alg. 3)" if method == "vanilla" else "SFD"}, {NAMES[solver]}, t_min {t_min}, '
            f'{"AFS, " if afs else ""}{loss.upper()}')


def _has_lpips_weights():
    """Whether both real LPIPS weight files (lpips_vgg.py: VGG16 and piq's layer weights) are in the cache."""
    import lpips_vgg
    return lpips_vgg.in_cache()


def _lpips_cache():
    import lpips_vgg
    return lpips_vgg.cache_paths()[0].parent


def guided_rows(args, world, table, steps=4):
    """Meng stage one on the conditional pair (one net, its null label the unconditional branch),
    with the recipe of presets.GUIDED['images'] (found by experiments/guided_image_results.py
    --search): the w-conditioned student (one call per step) against classifier-free guidance
    with the teacher (two calls per step) at equal steps and at equal NFE, DPM-Solver++(3M) to
    t_min 0.006, at w = 0, 1, 2, 4; metric A to the guided teacher's own fine solve at each w, on
    half as many noises (CFG costs 2 calls). Stage two and the stochastic sampler:
    experiments/guided_image_results.py."""
    t0 = time.time()
    spec = f'toy:{world}:cond'
    flags = dict(teacher=spec, uncond='', seed=args.seeds[0], device='cpu', snapshot_kimg=1e6)
    cfg = guided_pd.apply_defaults(guided_pd.GuidedConfig(**flags), 'stage1', explicit=flags)
    if args.guided_iters is not None:  # --guided-iters updates of the preset's batch
        cfg = dataclasses.replace(cfg, kimg=guided_pd_run.kimg_of(args.guided_iters, cfg.batch))
    updates = math.ceil(int(cfg.kimg * 1000) / cfg.batch)
    # The recipe names the folder: a student of another recipe is never reused for this one.
    run_dir = Path(args.out) / (f'guided-stage1-lr{cfg.lr:g}-ema{cfg.ema:g}-{cfg.w_init}-x{cfg.w_lr_scale:g}-'
                                f'{updates}u-s{cfg.seed}')
    cfg = dataclasses.replace(cfg, run_dir=str(run_dir), tick_kimg=cfg.kimg)
    if not (run_dir / 'student.pt').is_file():
        guided_pd.stage_one(cfg, progress=False, log=lambda *_: None)
    student, _ = models.load(str(run_dir / 'student.pt'))
    D_w = guided_pd_run.load_guided_teacher(spec)[0]
    n = max(args.n // 2, 8)
    zg = toy.eval_noise(n, seed=777, shape=[student.img_channels] + [student.img_resolution] * 2)
    labels = torch.eye(student.label_dim)[torch.arange(n) % student.label_dim]

    @torch.no_grad()
    def run(net, k, w):
        return solvers.sample(net, 80. * zg, solvers.time_schedule(k, 0.006, 80.), 'dpmpp3m', guidance=w,
                              class_labels=labels)
    for w in (0.0, 1.0, 2.0, 4.0):
        ref = toy.reference_solution(D_w, zg, steps=args.ref_steps, guidance=w, class_labels=labels)
        table.add(f'stage-one student, DPM++(3M) {steps} steps, w = {w:g}', steps,
                  per_sample_rmse(run(student, steps, w), ref))
        table.add(f'CFG teacher, DPM++(3M) {steps} steps, w = {w:g}', 2 * steps,
                  per_sample_rmse(run(D_w, steps, w), ref))
        table.add(f'CFG teacher, DPM++(3M) {steps // 2} steps, w = {w:g}', steps,
                  per_sample_rmse(run(D_w, steps // 2, w), ref))
    return time.time() - t0


def fid_rows(args, world, table, samplers, tmeta):
    """FID of the chosen rows: args.fid samples each (fresh noise) against as many real images."""
    import fid
    t0 = time.time()
    model = fid.load_inception(device='cpu', url=args.inception)
    s = tmeta['train']
    x_real = toy.image_data(s['source'], s['resolution'], s['max_images'])[0]
    pick = torch.linspace(0, len(x_real) - 1, args.fid).long()
    ref_path = Path(args.out) / f'fid-ref-{args.fid}.npz'  # computed once (5 minutes on 2 cores)
    if not ref_path.is_file():
        fid.save_stats(ref_path, fid.compute_stats(x_real[pick], model, batch_size=64, progress=False))
    ref = fid.load_stats(ref_path)
    zf = toy.eval_noise(args.fid, seed=4321, shape=tmeta['shape'])
    wanted = {(r.rpartition('@')[0].strip(), int(r.rpartition('@')[2])) for r in args.fid_rows.split(';')
              if r.strip()}
    # The floor of FID at this N: another N real images against the reference ones.
    other = torch.linspace(0, len(x_real) - 13, args.fid).long() + 12
    table.add(f'real 16x16 images (another {args.fid})', 0, torch.full((args.n,), float('nan')))
    table.fid[f'real 16x16 images (another {args.fid})', 0] = fid_of(x_real[other], ref, model)
    for (label, nfe), (net, recipe, cond) in samplers.items():
        if (label, nfe) not in wanted:
            continue
        with torch.no_grad():
            x = torch.cat([solvers.sample_with(net, zb, recipe, nfe=nfe, **cond) for zb in zf.split(256)])
        table.fid[label, nfe] = fid_of(sample.to_uint8(x), ref, model)
        print(f'FID {label} {nfe}: {table.fid[label, nfe]:.1f} ({time.time() - t0:.0f} s)', flush=True)
    return time.time() - t0


def targets(table, times, tmeta):
    """The issue's performance targets, measured (never asserted)."""
    teacher_min = tmeta.get('train_seconds', float('nan')) / 60
    if 'teacher img/s' in times:  # the same recipe's speed measured in this run
        here = tmeta['train']['kimg'] * 1000 / times['teacher img/s'] / 60
        print(f"\nteacher speed here: {times['teacher img/s']:.0f} img/s on {torch.get_num_threads()} "
              f"thread(s): {tmeta['train']['kimg']:g} kimg would take {here:.1f} min "
              f"(the cached teacher took {teacher_min:.1f} min on {tmeta.get('train_threads', '?')})")
        teacher_min = here
    sfd_min = np.mean(times['sfd-afs']) / 60
    ratio = table.value('DPM-Solver++(3M)', 2) / table.value('SFD + AFS', 2)
    ok = lambda c: 'met' if c else 'MISSED'
    print(f'\ntargets: teacher <= 15 min: {teacher_min:.1f} min ({ok(teacher_min <= 15)}); SFD 2-NFE student '
          f'<= 5 min: {sfd_min:.1f} min ({ok(sfd_min <= 5)}); DPM-Solver++(3M) at 2 NFE >= 3x further '
          f'than SFD (metric A): {ratio:.2f}x ({ok(ratio >= 3)})')


if __name__ == '__main__':
    main()
