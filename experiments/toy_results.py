"""The README's toy results: every SFD method and the baselines on the 2-D ring teacher.

Trains SFD + AFS (2 NFE), SFD-v (NFE 2-5), the second stage (1 NFE, from the SFD-v model) and
vanilla trajectory distillation (2 NFE) for each seed: vanilla with its DPM-Solver-2 teacher at
the same teacher cost per sample as SFD's DPM-Solver++(3M), and a like-for-like pair (the same
DPM-2 teacher, K = 4 sub-steps per interval and 100 kimg for both methods). It prints metric A
(mean distance to the teacher's own fine ODE solution from the same noise) and the sliced W2
distance to the data, as a markdown table (mean +- std over seeds).

    python experiments/toy_results.py --seeds 0 1 2      # ~6 minutes on a 2-core CPU
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import distill  # noqa: E402
import models  # noqa: E402
import toy  # noqa: E402


def run(method, seed, out, name=None, **kw):
    # The toy world's preset (distill.apply_defaults) in every setting `kw` does not give.
    cfg = distill.SFDConfig(teacher=kw.pop('teacher', 'toy:ring'), method=method, seed=seed,
                            run_dir=str(out / f'{name or method}-{seed}'), **kw)
    cfg = distill.apply_defaults(cfg, explicit=set(kw))
    distill.distill(cfg, progress=False, log=lambda *_: None)
    return models.load_model(Path(cfg.run_dir) / 'student.pt')


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--out', default='runs/toy-results')
    args = p.parse_args()
    out = Path(args.out)
    teacher = models.load('toy:ring')[0]
    z = toy.eval_noise()
    ref = toy.reference_solution(teacher, z)
    data_ref = toy.toy_data('ring', len(z), generator=torch.Generator().manual_seed(99))[0]
    results = {}  # (row label, nfe) -> list of (A, W)

    def add(label, net, sampling, nfe, **cond):
        results.setdefault((label, nfe), []).append(toy.evaluate(net.eval(), sampling, ref, data_ref, z,
                                                                 nfe=nfe, **cond))

    for k in (1, 2, 3, 4, 5, 12):
        for solver in ('dpmpp3m', 'euler'):
            label = {'dpmpp3m': 'DPM-Solver++(3M)', 'euler': 'Euler (DDIM)'}[solver]
            add(label, teacher, toy.solver_config(solver, k), k)
    for seed in args.seeds:
        print(f'seed {seed}', flush=True)
        net, meta = run('sfd', seed, out)
        add('SFD + AFS (100 kimg)', net, meta['sampling'], 2)
        # Same teacher cost per sample: SFD uses K N = 12 teacher NFE per trajectory, vanilla
        # K x 2 = 8 (DPM-Solver-2 over K = 4 sub-steps): 150 kimg of vanilla = 100 kimg of SFD.
        net, meta = run('vanilla', seed, out, kimg=150.0)
        add('vanilla, DPM-2 teacher (150 kimg)', net, meta['sampling'], 2)
        # Like for like: the same teacher solver and K = 4 sub-steps per interval, the same 100
        # kimg, so that only the algorithm differs (Alg. 3 vs Alg. 4/5).
        net, meta = run('sfd', seed, out, name='sfd-dpm2', teacher_solver='dpm2', K=4)
        add('SFD + AFS, DPM-2 teacher, K = 4 (100 kimg)', net, meta['sampling'], 2)
        net, meta = run('vanilla', seed, out, name='vanilla-100', K=4, kimg=100.0)
        add('vanilla, DPM-2 teacher, K = 4 (100 kimg)', net, meta['sampling'], 2)
        net, meta = run('sfd-v', seed, out, kimg=200.0)
        sfdv = out / f'sfd-v-{seed}' / 'student.pt'
        for k in (2, 3, 4, 5):
            add('SFD-v (200 kimg)', net, meta['sampling'], k)
        add('SFD-v (200 kimg)', net, meta['sampling'], 1, step=3)  # an NFE it was not trained at
        net, meta = run('second-stage', seed, out, teacher=str(sfdv))
        add('second stage (100 kimg)', net, meta['sampling'], 1)
    print('\n| method | NFE | metric A (to teacher ODE) | sliced W2 to data |')
    print('| --- | --- | --- | --- |')
    for (label, k), vals in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        a, w = torch.tensor(vals).T
        fmt = lambda v: f'{v.mean():.4f}' + (f' ± {v.std():.4f}' if len(v) > 1 else '')
        print(f'| {label} | {k} | {fmt(a)} | {fmt(w)} |')


if __name__ == '__main__':
    main()
