"""No slower: SFD iterations and teacher training, timed before and after a change on one machine.

A redesign must not cost speed. This script takes the tree of an earlier commit (`git archive REV`,
by default dd9fd06, the last commit before issue 22's redesign) and the current working tree, and
times the same two workloads with each, by running THIS file's measuring code in a fresh Python
process with one tree or the other first on sys.path:

  SFD iteration     distill.distill(SFDConfig(...)) on a small EDM U-Net teacher file (the 16x16
                    CIFAR-10 teacher's DDPM++ with random weights), batch 32, 2 NFE + AFS, the
                    paper's DPM-Solver++(3M) teacher with K = 4, on the CPU: trajectories/s, from
                    the on_tick callback's clock, the first (warm-up) iteration left out;
  teacher training  toy.train_images('cifar10-16', batch=32, ...) on a zip of random 32x32 images:
                    images/s, from a 1-iteration run subtracted from an n-iteration run (so the
                    set-up, the zip's reading and the first iteration are left out).

The runs alternate between the trees (before, after, after, before, ...: a slow drift of the
machine's load hits both alike), --repeat times each, one process at a time with the same
thread count; the table gives each tree's median and their ratio (the target: >= 0.95), per
second of wall clock and per CPU second of the measuring process. On a machine others share, the
wall clock also counts their load; the CPU seconds of a 1-thread run (--threads 1) count only
this work, so those rows are the fair comparison there.

    python benchmarks/before_after.py                        # dd9fd06 vs the working tree, 3 runs each
    python benchmarks/before_after.py --rev HEAD~1 --repeat 5 --threads 2 --json ba.json
    python benchmarks/before_after.py --tiny                 # 1-2 iterations each: checks the script only
"""
import argparse
import dataclasses
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The 16x16 CIFAR-10 teacher's DDPM++ (toy.IMAGE_WORLDS['cifar10-16']); --tiny: a few channels.
NET = dict(model_channels=32, channel_mult=[1, 2, 2], num_blocks=2, attn_resolutions=[8])
TINY_NET = dict(model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])
# (iterations of the SFD run, of the long teacher run): the first of each is not timed.
ITERS = {'full': (8, 24), 'tiny': (2, 2)}
MARK = 'BEFORE_AFTER_RESULT '  # the measuring process prints its JSON after this on one line
# Rates per wall-clock second, and per CPU second of the measuring process (robust to other load).
ROWS = (('sfd', 'SFD iteration (trajectories/s)'), ('teacher', 'teacher training (img/s)'),
        ('sfd_cpu', 'SFD iteration (per CPU s)'), ('teacher_cpu', 'teacher training (per CPU s)'))


# ---------------------------------------------------------------------------------------------
# The measuring process: one tree first on sys.path, both workloads, one JSON line
# ---------------------------------------------------------------------------------------------

def write_teacher(path, net_kw):
    """A teacher file of random weights written with this tree's own models.save_model (so each
    tree reads a file in its own format); seed 0, so both trees get the same network."""
    import models
    import torch
    import unet
    torch.manual_seed(0)
    net = unet.EDMPrecond(img_resolution=16, img_channels=3, **net_kw)
    models.save_model(path, net, kind='before_after random teacher', shape=[3, 16, 16])


def clocks():
    """(wall-clock seconds, this process's CPU seconds): on a shared machine the second barely
    sees the other processes' load (with one thread it is the compute alone)."""
    return time.perf_counter(), time.process_time()


def rates(n, t0, t1):
    """n per second between two clocks() readings: {'wall': ..., 'cpu': ...}."""
    return dict(wall=n / max(t1[0] - t0[0], 1e-9), cpu=n / max(t1[1] - t0[1], 1e-9))


def sfd_rate(work, iters, batch, net_kw):
    """Trajectories/s of distill.distill after its first iteration (on_tick's clock, one tick per
    iteration); checks that the run made the iterations and images asked for."""
    import distill
    write_teacher(work / 'teacher.pt', net_kw)
    settings = dict(teacher=str(work / 'teacher.pt'), method='sfd', nfe=2, afs=True, batch=batch,
                    kimg=iters * batch / 1000, seed=0, device='cpu', run_dir=str(work / 'sfd-run'),
                    tick_kimg=batch / 1000, snapshot_kimg=1e9)  # a tick per iteration; a snapshot at the end
    known = {f.name for f in dataclasses.fields(distill.SFDConfig)}
    optional = {'tick_kimg', 'snapshot_kimg'}  # only the clock's resolution and the snapshot's timing
    if not set(settings) - optional <= known:
        raise ValueError(f'distill.SFDConfig lacks {sorted(set(settings) - optional - known)}')
    cfg = distill.SFDConfig(**{k: v for k, v in settings.items() if k in known})
    stamps = []
    _, summary = distill.distill(cfg, progress=False, log=lambda *_: None,
                                 on_tick=lambda *_: stamps.append(clocks()))
    if len(stamps) != iters or summary.get('iterations', iters) != iters:
        raise RuntimeError(f'asked for {iters} iterations with one tick each, saw {len(stamps)} ticks '
                           f'and summary {summary}')
    return rates((iters - 1) * batch, stamps[0], stamps[-1])


def teacher_rate(work, iters, batch, net_kw, source):
    """Images/s of toy.train_images: an `iters`-iteration run minus a 1-iteration run, both after a
    warm-up run that reads the zip (cached per process) and runs the first iteration."""
    import toy

    def run(n):  # (wall, CPU) seconds of an n-iteration run
        t0 = clocks()
        toy.train_images('cifar10-16', kimg=n * batch / 1000, batch=batch, lr_rampup_kimg=0.0,
                         net=dict(net_kw), source=str(source), max_images=None, progress=False)
        return [b - a for a, b in zip(t0, clocks(), strict=True)]
    run(1)  # warm-up
    one, many = run(1), run(iters)
    return rates((iters - 1) * batch, one, many)


def measure(args):
    """The child's job: put --tree first on sys.path, time both workloads, print one JSON line."""
    sys.path.insert(0, str(Path(args.tree).resolve()))
    import torch
    torch.set_num_threads(args.threads)
    import distill
    if Path(distill.__file__).resolve().parent != Path(args.tree).resolve():
        raise RuntimeError(f'imported {distill.__file__}, not the tree {args.tree}')
    work = Path(tempfile.mkdtemp(prefix='before-after-', dir=args.work))
    net_kw = TINY_NET if args.tiny else NET
    sfd_iters, teacher_iters = ITERS['tiny' if args.tiny else 'full']
    sfd = sfd_rate(work, sfd_iters, args.batch, net_kw)
    teacher = teacher_rate(work, teacher_iters, args.batch, net_kw, args.source)
    res = dict(sfd=sfd['wall'], sfd_cpu=sfd['cpu'], teacher=teacher['wall'], teacher_cpu=teacher['cpu'],
               threads=torch.get_num_threads(), torch=torch.__version__)
    print(MARK + json.dumps(res), flush=True)


# ---------------------------------------------------------------------------------------------
# The driver: the old tree, the data, alternating runs, the table
# ---------------------------------------------------------------------------------------------

def extract(rev, into):
    """`git archive REV | tar -x` into `into`; one clear error when git or the commit is missing."""
    try:
        ok = subprocess.run(['git', '-C', str(ROOT), 'cat-file', '-e', f'{rev}^{{commit}}'],
                            capture_output=True).returncode == 0
    except FileNotFoundError:
        ok = False
    if not ok:
        raise ValueError(f'--rev {rev}: no such commit here (needs git and the full history: '
                         'git fetch --unshallow), or pass another --rev')
    into.mkdir(parents=True)
    archive = subprocess.Popen(['git', '-C', str(ROOT), 'archive', rev], stdout=subprocess.PIPE)
    subprocess.run(['tar', '-x', '-C', str(into)], stdin=archive.stdout, check=True)
    archive.stdout.close()
    if archive.wait():
        raise RuntimeError(f'git archive {rev} failed')


def write_zip(path, n=256, seed=0):
    """An EDM-style zip (dataset_tool.py's layout) of `n` random 32x32 RGB PNGs with dataset.json
    labels: train_images' input without a download. Its pixels do not change the speed."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(path, 'w') as z:
        labels = []
        for i in range(n):
            buf, name = io.BytesIO(), f'00000/img{i:08d}.png'
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format='PNG')
            z.writestr(name, buf.getvalue())
            labels.append([name, i % 10])
        z.writestr('dataset.json', json.dumps(dict(labels=labels)))


def child(tree, args, work, source):
    """One measuring process for `tree`: its results dict, or an error with the end of its output."""
    cmd = [sys.executable, str(Path(__file__).resolve()), '--measure', '--tree', str(tree), '--work',
           str(work), '--source', str(source), '--threads', str(args.threads), '--batch', str(args.batch)]
    cmd += ['--tiny'] if args.tiny else []
    env = dict(os.environ, SFD_CACHE=str(work / 'cache'), PYTHONUNBUFFERED='1')
    p = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    lines = [line for line in p.stdout.splitlines() if line.startswith(MARK)]
    if p.returncode or not lines:
        tail = '\n'.join((p.stdout + p.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f'measuring with {tree} failed (exit {p.returncode}):\n{tail}')
    return json.loads(lines[-1][len(MARK):])


def table(rev, runs, args):
    """The printed table: each row's medians before and after and their ratio."""
    tiny = ' (TINY: checks the script only)' if args.tiny else ''
    head = (f'before/after: {rev} vs the working tree, CPU, {args.threads} threads, batch {args.batch}, '
            f'median of {args.repeat} alternating runs{tiny}')
    rows, lines = [], [head, f'{"measurement":34}{"before":>10}{"after":>10}{"after/before":>14}']
    for key, label in ROWS:
        before = statistics.median(r[key] for r in runs['before'])
        after = statistics.median(r[key] for r in runs['after'])
        rows.append(dict(measurement=label, before=before, after=after, ratio=after / before))
        lines.append(f'{label:34}{before:10.2f}{after:10.2f}{after / before:14.3f}')
    lines.append('target: after/before >= 0.95 (on a busy machine: the per CPU s rows, with --threads 1)')
    return rows, '\n'.join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--rev', default='dd9fd06', help='the "before" commit (default: dd9fd06, before issue 22)')
    p.add_argument('--repeat', type=int, default=3, help='runs per tree, alternating (the median is shown)')
    p.add_argument('--threads', type=int, help="torch threads in every run (default: torch's default here)")
    p.add_argument('--batch', type=int, default=32, help='batch of both workloads')
    p.add_argument('--tiny', action='store_true', help='tiny nets, 1-2 iterations: checks the script only')
    p.add_argument('--json', help='also write the rows and every run here')
    for name in ('--tree', '--work', '--source'):  # the measuring process's arguments
        p.add_argument(name, help=argparse.SUPPRESS)
    p.add_argument('--measure', action='store_true', help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:
        return measure(args)
    for flag, v in (('--repeat', args.repeat), ('--batch', args.batch), ('--threads', args.threads or 1)):
        if v < 1:
            raise ValueError(f'{flag} {v}: must be at least 1')
    if args.threads is None:
        import torch
        args.threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix='before-after-') as tmp:
        tmp = Path(tmp)
        extract(args.rev, tmp / 'before')
        write_zip(tmp / 'images.zip')
        runs = {'before': [], 'after': []}
        for i in range(args.repeat):  # before, after, after, before, ...
            for name in (('before', 'after') if i % 2 == 0 else ('after', 'before')):
                tree = tmp / 'before' if name == 'before' else ROOT
                runs[name].append(child(tree, args, tmp, tmp / 'images.zip'))
                print(f'run {i + 1}/{args.repeat} {name}: ' + ', '.join(
                    f'{k} {runs[name][-1][k]:.2f}' for k, _ in ROWS), flush=True)
    rows, text = table(args.rev, runs, args)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(rev=args.rev, threads=args.threads, rows=rows, runs=runs),
                                              indent=1))
    return rows


if __name__ == '__main__':
    main()
