"""Meng et al.'s guided distillation on images, measured: stage one, stage two and the stochastic sampler.

The teacher is `toy:cifar10-16:cond` (toy.py: EDM's DDPM++ trained here on CIFAR-10 at 16x16 with
label dropout, so its null label is the unconditional branch of classifier-free guidance). Every
row starts from the same noise and labels and is measured by

  metric A  the per-pixel RMSE (images in [-1, 1]) to the guided teacher's own fine ODE solution
            at the same w (--ref-steps DPM-Solver++(3M) steps with CFG, full third order): to
            t_min 0.006 for the DPM-Solver++(3M) rows (toy.reference_solution), to 0 for the DDIM
            rows over Meng's cosine grid (guided_pd.guided_reference);
  w-sens.   how much a sampler's output moves from w = 0 to w = 4, relative to how much the
            teacher's fine solutions move: RMS(x(4) - x(0)) / RMS(ref(4) - ref(0)), same noise and
            labels (1 = follows guidance fully; a w-blind student gives 0).

Two modes:
  --search  stage one (Meng Alg. 1) for a few candidate recipes (lr, EMA, the w embedding's
            initialisation and lr), each a learning curve: metric A at w in {0, 1, 2, 4} of the
            EMA student at 4 DPM-Solver++(3M) steps and its w-sensitivity every --eval-every
            updates, against CFG with the teacher at 4 steps (8 NFE) and 2 steps (4 NFE).
  default   the chosen recipe (presets.GUIDED['images']): stage one, then stage two (Alg. 3) and
            its stochastic twin (Alg. 4) from the stage-one student, halving --start-n steps down to
            1 (deterministic) and 2 (stochastic), and a table laid out as Meng Table 3: the students
            at N steps (D / S) against DDIM with CFG at k x 2 steps, for each w.
The stochastic sampler adds fresh noise on its way, so its samples are not meant to land on the
ODE's endpoint: its metric A includes that spread and is no measure of its sample quality.
--fid N adds FIDs at one w (--fid-w) for Table 3's rows (N samples each, fresh noise and every
class in turn, against N real 16x16 training images, fid.py's EDM protocol; with the floor of that
N, another N real images): FIDs of 16x16 images, comparable with one another, NOT with any
CIFAR-10 FID. They measure what metric A cannot: the stochastic sampler's samples.
Students go to --out (runs/guided-image-results, read by notebook 03), results to
<out>/results.md and results.json (the search: <out>/search.md and search.json).

    python experiments/guided_image_results.py --search   # 4 recipes x 300 updates, curves: ~25 min
    python experiments/guided_image_results.py --search --candidates lr1e-3 lr1e-3-w-lr-x10 \
        --search-updates 600 --eval-every 100                # the two that work, longer: ~18 min
    python experiments/guided_image_results.py            # stage one + both stage twos: ~20 min
    python experiments/guided_image_results.py --fid 2048  # + FIDs at w = 1: ~5 min per row
(times: one busy CPU thread per run, as measured for docs/results.md; the default mode reuses the
search's run of the preset recipe, and every run folder is reused when its files exist)
"""
import argparse
import dataclasses
import functools
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import guided_pd  # noqa: E402
import guided_pd_run  # noqa: E402
import models  # noqa: E402
import solvers  # noqa: E402
import toy  # noqa: E402

WS = (0.0, 1.0, 2.0, 4.0)
# Stage-one candidates (name: settings over presets.GUIDED['images']); --search runs those named.
CANDIDATES = {
    'official': dict(lr=1e-4, ema=0.99, w_init='zero', w_lr_scale=1.0),    # the failing recipe, longer
    'lr1e-3': dict(lr=1e-3, ema=0.99, w_init='zero', w_lr_scale=1.0),      # Meng's text for CIFAR-10
    'random-w': dict(lr=1e-4, ema=0.99, w_init='random', w_lr_scale=1.0),  # a fresh layer, as Meng's code
    'w-lr-x10': dict(lr=1e-4, ema=0.99, w_init='zero', w_lr_scale=10.0),   # zero layer, new params 10x lr
    'lr1e-3-w-lr-x10': dict(lr=1e-3, ema=0.99, w_init='zero', w_lr_scale=10.0),  # both
}


def rms(x):
    return x.float().square().mean().sqrt().item()


def per_sample_rmse(x, ref):
    """Each sample's per-pixel RMSE to its reference: [B] (image_results.per_sample_rmse)."""
    return (x - ref).flatten(1).square().mean(1).sqrt()


class Bench:
    """Fixed noise and labels, and the guided teacher's fine solves at every w: what rows are measured on."""

    def __init__(self, spec, n, ref_steps, ws=WS, seed=777, cache=None):
        self.D_w, net, meta = guided_pd_run.load_guided_teacher(spec)
        self.ws, self.n, self.ref_steps = ws, n, ref_steps
        self.z = toy.eval_noise(n, seed=seed, shape=meta['shape'])
        self.labels = torch.eye(net.label_dim)[torch.arange(n) % net.label_dim]  # every class in turn
        key = json.dumps([meta.get('train'), meta.get('train_seconds'), n, ref_steps, list(ws), seed])
        self.key = hashlib.sha256(key.encode()).hexdigest()[:10]  # the teacher's training names its solves
        self.cache = cache

    def _solves(self, name, solve):
        """{w: the fine solve} made by solve(w), kept in <cache>/<name>-<key>.pt for later runs."""
        path = Path(self.cache) / f'{name}-{self.key}.pt' if self.cache else None
        if path is not None and path.is_file():
            return torch.load(path, weights_only=True)
        t0 = time.time()
        out = {w: solve(w) for w in self.ws}
        print(f'{name}: {len(self.ws)} fine solves of {self.n} images: {time.time() - t0:.0f} s', flush=True)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(out, path)
        return out

    @functools.cached_property
    def ref(self):
        """To t_min 0.006, for the DPM-Solver++(3M) rows (toy.reference_solution, as image_results)."""
        c = dict(class_labels=self.labels)
        return self._solves('references', lambda w: toy.reference_solution(
            self.D_w, self.z, steps=self.ref_steps, guidance=w, **c))

    @functools.cached_property
    def ref0(self):
        """To 0, for the DDIM rows over Meng's cosine grid, which end on D (guided_pd.guided_reference)."""
        c = dict(class_labels=self.labels)
        return self._solves('references-to-0', lambda w: guided_pd.guided_reference(
            self.D_w, self.z, w, steps=self.ref_steps, **c))

    @torch.no_grad()
    def dpm(self, net, k, w):
        """k DPM-Solver++(3M) steps to t_min 0.006 (image_results' guided rows), one call per step."""
        t = solvers.time_schedule(k, 0.006, 80.0)
        net = net.eval() if isinstance(net, torch.nn.Module) else net  # a student, or the CFG teacher D_w
        return solvers.sample(net, 80.0 * self.z, t, 'dpmpp3m', guidance=w, class_labels=self.labels)

    def sensitivity(self, x0, x4, ref):
        """RMS(x(w=4) - x(w=0)) / RMS(ref(4) - ref(0)): the share of guidance's effect a sampler shows."""
        return rms(x4 - x0) / rms(ref[4.0] - ref[0.0])

    def stage_one(self, net, steps=4):
        """{w: metric A} of a w-conditioned net (or the CFG teacher D_w) at `steps` DPM++(3M) steps, and
        its w-sensitivity."""
        xs = {w: self.dpm(net, steps, w) for w in self.ws}
        a = {w: per_sample_rmse(xs[w], self.ref[w]).mean().item() for w in self.ws}
        return a, self.sensitivity(xs[0.0], xs[4.0], self.ref)


# ---------------------------------------------------------------------------------------------
# Stage one: one run with its learning curve
# ---------------------------------------------------------------------------------------------

def stage_one_config(args, updates=None, **settings):
    """GuidedConfig of a stage-one run: presets.GUIDED['images'] with `settings` (and `updates`) over
    it, a curve point every --eval-every updates, in <out>/stage1/<the recipe> (the search and the
    default mode share the runs of the same recipe)."""
    flags = dict(teacher=args.teacher, uncond='', seed=args.seed, device='cpu', snapshot_kimg=1e6, **settings)
    cfg = guided_pd.apply_defaults(guided_pd.GuidedConfig(**flags), 'stage1', explicit=flags)
    kimg = guided_pd_run.kimg_of(updates, cfg.batch) if updates else cfg.kimg
    n = train_iterations(dataclasses.replace(cfg, kimg=kimg))
    tag = f'lr{cfg.lr:g}-ema{cfg.ema:g}-{cfg.w_init}-x{cfg.w_lr_scale:g}-b{cfg.batch}-{n}u-s{cfg.seed}'
    return dataclasses.replace(cfg, kimg=kimg, tick_kimg=guided_pd_run.kimg_of(args.eval_every, cfg.batch),
                               run_dir=str(Path(args.out) / 'stage1' / tag))


def train_stage_one(cfg, bench, log=print):
    """Stage one (Meng Alg. 1) with its curve: (EMA student, curve rows, training seconds without the
    evaluations). Reused from cfg.run_dir when its student.pt and curve.json exist."""
    run_dir = Path(cfg.run_dir)
    if (run_dir / 'student.pt').is_file() and (run_dir / 'curve.json').is_file():
        curve = json.loads((run_dir / 'curve.json').read_text())
        return models.load(run_dir / 'student.pt')[0], curve['rows'], curve['seconds']
    rows, t = [], dict(start=time.time(), eval=0.0)
    torch.manual_seed(cfg.seed)  # the student's fresh w layer (w_init random), as the run makes it
    first = guided_pd.make_student(models.load(cfg.teacher)[0], cfg.w_init)

    def point(it, loss, net):
        t0 = time.time()
        a, s = bench.stage_one(net)
        t['eval'] += time.time() - t0
        rows.append(dict(updates=it, seconds=time.time() - t['start'] - t['eval'], loss=loss,
                         metric_a={str(w): v for w, v in a.items()}, w_sensitivity=s))
        log(f'  {it:5d} updates  {rows[-1]["seconds"]:6.0f} s  loss {loss:8.4f}  A ' +
            ' '.join(f'{v:.4f}' for v in a.values()) + f'  w-sens. {s:.3f}')
    point(0, float('nan'), first)
    net, _ = guided_pd.stage_one(cfg, progress=False, log=lambda *_: None,
                                 on_tick=lambda row, net: point(row['iteration'], row['loss'], net))
    seconds = time.time() - t['start'] - t['eval']
    (run_dir / 'curve.json').write_text(json.dumps(dict(rows=rows, seconds=seconds, config=vars(cfg),
                                                        threads=torch.get_num_threads()), indent=1))
    return net.eval(), rows, seconds


def stage_one_table(bench, named, header='stage one'):
    """Markdown: metric A per w of each (label, {w: A}, w-sens.) row, and the target's verdict
    for the students (within 15% of CFG at 4 steps and better than CFG at 2 steps, every w)."""
    cfg4, cfg2 = bench.stage_one(bench.D_w, 4), bench.stage_one(bench.D_w, 2)
    rows = [('CFG teacher, 4 steps', 8, *cfg4), ('CFG teacher, 2 steps', 4, *cfg2)] + \
        [(label, 4, a, s) for label, a, s in named]
    out = [f'| {header}: DPM-Solver++(3M) to t_min 0.006 | NFE | '
           + ' | '.join(f'A, w = {w:g}' for w in bench.ws) + ' | w-sens. | target |',
           '| --- | ---: |' + ' ---: |' * (len(bench.ws) + 2)]
    for label, nfe, a, s in rows:
        ok = all(a[w] <= 1.15 * cfg4[0][w] and a[w] < cfg2[0][w] for w in bench.ws)
        verdict = '-' if label.startswith('CFG') else 'met' if ok else 'missed'
        out.append(f'| {label} | {nfe} | ' + ' | '.join(f'{a[w]:.4f}' for w in bench.ws)
                   + f' | {s:.3f} | {verdict} |')
    return '\n'.join(out)


def search(args, bench):
    """--search: each candidate's curve, then a table of the last point of every candidate in
    <out>/search.json (this run's and earlier ones', e.g. a parallel run's) against CFG."""
    path = Path(args.out) / 'search.json'
    results = json.loads(path.read_text()) if path.is_file() else {}
    for name in args.candidates:
        cfg = stage_one_config(args, args.search_updates, **CANDIDATES[name])
        print(f'{name}: lr {cfg.lr:g}, EMA {cfg.ema:g}, w_init {cfg.w_init}, w lr x{cfg.w_lr_scale:g}, '
              f'batch {cfg.batch}, {args.search_updates} updates', flush=True)
        _, rows, seconds = train_stage_one(cfg, bench)
        results[f'{name}, {args.search_updates} updates'] = dict(
            CANDIDATES[name], name=name, rows=rows, seconds=seconds, threads=torch.get_num_threads())
    named = [(f'{name} ({r["seconds"]:.0f} s)',
              {w: r['rows'][-1]['metric_a'][str(w)] for w in bench.ws}, r['rows'][-1]['w_sensitivity'])
             for name, r in results.items()]
    table = stage_one_table(bench, named, 'stage-one search')
    print(table)
    (Path(args.out) / 'search.md').write_text(table + '\n')
    path.write_text(json.dumps(results, indent=1))
    return results


# ---------------------------------------------------------------------------------------------
# Stage two (Alg. 3 / 4) and the Table 3 layout
# ---------------------------------------------------------------------------------------------

def stage_two(args, stage_one_path, stochastic):
    """Both halving chains from the stage-one student (reused when their last file exists): paths."""
    flags = dict(teacher=str(stage_one_path), seed=args.seed, device='cpu', stochastic=stochastic,
                 snapshot_kimg=1e6, end_n=2 if stochastic else 1,
                 **{k: getattr(args, k) for k in ('start_n', 'round_kimg', 'final_round_kimg')
                    if getattr(args, k) is not None})
    cfg = guided_pd.apply_defaults(guided_pd.GuidedConfig(**flags), 'stage2', explicit=flags)
    # Named after its teacher and rounds: another stage one or another length is another folder.
    name = (f'stage2-{Path(stage_one_path).parent.name}-n{cfg.start_n}-{cfg.round_kimg:g}k-'
            f'{cfg.final_round_kimg:g}k')
    run_dir = Path(args.out) / (name + ('-stochastic' if stochastic else ''))
    cfg = dataclasses.replace(cfg, run_dir=str(run_dir))
    paths = [run_dir / f'student-n{N}.pt' for N in guided_pd.rounds(cfg)]
    if not paths[-1].is_file():
        t0 = time.time()
        guided_pd.stage_two(cfg, progress=False, log=lambda *_: None)
        (run_dir / 'seconds.json').write_text(json.dumps(dict(seconds=time.time() - t0,
                                                              threads=torch.get_num_threads())))
    return paths, json.loads((run_dir / 'seconds.json').read_text())['seconds']


@torch.no_grad()
def table3(bench, stage_one_net, det, sto, seed=0):
    """Meng Table 3's rows (the students at N steps, D / S; DDIM with CFG at k x 2 steps; the target)
    with one column per w instead of one block: metric A to the fine solve ending at 0. Returns
    (markdown, rows as dicts)."""
    nets = {(m['N'], m['stochastic']): (net, m) for net, m in (models.load(p) for p in det + sto)}
    Ns = sorted({N for N, _ in nets})
    start = 2 * max(N for N, s in nets if not s)  # the deterministic chain's teacher: DDIM at 2N steps
    c = dict(class_labels=bench.labels)
    A = lambda x, w: per_sample_rmse(x, bench.ref0[w]).mean().item()  # noqa: E731
    rows = []
    for N in Ns:
        for s in (False, True):
            if (N, s) in nets:
                net, m = nets[N, s]
                g = lambda: torch.Generator().manual_seed(seed)  # noqa: E731  (the stochastic sampler's)
                rows.append(dict(sampler=f'student {N}-step ({"S" if s else "D"})', nfe=N, metric_a={
                    w: A(guided_pd.sample_student(net, m, bench.z, w, g(), **c), w) for w in bench.ws}))
    rows.append(dict(sampler=f'stage-one student, DDIM {start}-step', nfe=start, metric_a={
        w: A(guided_pd.ddim(stage_one_net, bench.z, start, w, **c), w) for w in bench.ws}))
    for k in sorted({1, *Ns, start}):
        rows.append(dict(sampler=f'DDIM with CFG {k}x2-step', nfe=2 * k,
                         metric_a={w: A(guided_pd.ddim(bench.D_w, bench.z, k, w, **c), w) for w in bench.ws}))
    out = ['| sampler (metric A, cosine grid to 0) | NFE | '
           + ' | '.join(f'w = {w:g}' for w in bench.ws) + ' |',
           '| --- | ---: |' + ' ---: |' * len(bench.ws)]
    out += [f'| {r["sampler"]} | {r["nfe"]} | ' + ' | '.join(f'{r["metric_a"][w]:.4f}' for w in bench.ws)
            + ' |' for r in rows]
    out.append(f'| target: the fine solve (DPM++(3M) {bench.ref_steps}x2-step) | '
               f'{2 * (bench.ref_steps + 1)} | ' + ' | '.join('0' for _ in bench.ws) + ' |')
    for r in rows:
        r['metric_a'] = {str(w): v for w, v in r['metric_a'].items()}
    return '\n'.join(out), rows


def results(args, bench):
    """The default mode: stage one with the preset recipe (and its curve), both stage twos, the tables."""
    t_start = time.time()
    cfg = stage_one_config(args, args.stage1_updates)
    print(f'stage one: lr {cfg.lr:g}, EMA {cfg.ema:g}, w_init {cfg.w_init}, w lr x{cfg.w_lr_scale:g}, '
          f'{train_iterations(cfg)} updates of {cfg.batch}', flush=True)
    net1, curve, s1 = train_stage_one(cfg, bench)
    last = curve[-1]
    t1 = stage_one_table(bench, [(f'stage-one student ({last["updates"]} updates, {s1:.0f} s)',
                                  {w: last['metric_a'][str(w)] for w in bench.ws}, last['w_sensitivity'])])
    print(t1, flush=True)
    det, s_det = stage_two(args, Path(cfg.run_dir) / 'student.pt', stochastic=False)
    sto, s_sto = stage_two(args, Path(cfg.run_dir) / 'student.pt', stochastic=True)
    print(f'stage two: deterministic {s_det:.0f} s, stochastic {s_sto:.0f} s', flush=True)
    t3, rows = table3(bench, net1, det, sto, args.seed)
    print(t3)
    t_fid, fids = fid_rows(args, det, sto, args.fid_w) if args.fid else ('', [])
    print(t_fid)
    head = (f'teacher {args.teacher}; metric A on {bench.n} noises (seed 777), fine solves of '
            f'{bench.ref_steps} steps; training seed {args.seed}; {torch.get_num_threads()} thread(s)')
    (Path(args.out) / 'results.md').write_text(f'{head}\n\n{t1}\n\n{t3}\n\n{t_fid}\n')
    (Path(args.out) / 'results.json').write_text(json.dumps(dict(
        stage_one=dict(curve=curve, seconds=s1, config=vars(cfg)), table3=rows, students=dict(
            stage1=str(Path(cfg.run_dir) / 'student.pt'), deterministic=list(map(str, det)),
            stochastic=list(map(str, sto))), fid=fids, teacher=args.teacher, n=bench.n,
        ref_steps=bench.ref_steps,
        seconds=dict(stage1=s1, stage2=s_det, stage2_stochastic=s_sto)), indent=1))
    print(f'total {time.time() - t_start:.0f} s on {torch.get_num_threads()} thread(s)')
    return rows


@torch.no_grad()
def fid_rows(args, det, sto, w):
    """FID (16x16, fid.py's EDM protocol) of Table 3's samplers at one w: args.fid samples each from
    fresh noise, labels every class in turn, against as many real images (spread over the training
    set), and the floor (another args.fid real images). Returns (markdown, rows)."""
    import fid
    import sample
    t0 = time.time()
    D_w, net, meta = guided_pd_run.load_guided_teacher(args.teacher)
    s = meta['train']
    x_real = toy.image_data(s['source'], s['resolution'], s['max_images'])[0]
    pick = torch.linspace(0, len(x_real) - 13, args.fid).long()
    model = fid.load_inception(device='cpu', url=args.inception)
    stats = lambda x: fid.compute_stats(x, model, batch_size=64, progress=False)  # noqa: E731
    ref_path = Path(args.out) / f'fid-ref-{args.fid}.npz'  # the real images' statistics, computed once
    if not ref_path.is_file():
        fid.save_stats(ref_path, stats(x_real[pick]))
    ref = fid.load_stats(ref_path)
    wanted = lambda name: not args.fid_rows or any(r in name for r in args.fid_rows.split(';'))  # noqa: E731
    floor = f'real 16x16 images (another {args.fid})'
    rows = [dict(sampler=floor, nfe=0, fid=fid.fid_from_stats(stats(x_real[pick + 12]), ref))
            for _ in range(wanted(floor))]
    for r in rows:
        print(f'FID {r["sampler"]}: {r["fid"]:.1f} ({time.time() - t0:.0f} s)', flush=True)
    z = toy.eval_noise(args.fid, seed=4321, shape=meta['shape'])
    labels = torch.eye(net.label_dim)[torch.arange(args.fid) % net.label_dim]

    def add(name, nfe, draw):
        if not wanted(name):
            return
        x = torch.cat([draw(zb, yb) for zb, yb in zip(z.split(256), labels.split(256), strict=True)])
        rows.append(dict(sampler=name, nfe=nfe, fid=fid.fid_from_stats(stats(sample.to_uint8(x)), ref)))
        print(f'FID {name}: {rows[-1]["fid"]:.1f} ({time.time() - t0:.0f} s)', flush=True)
    for path in det + sto:
        student, m = models.load(path)
        g = torch.Generator().manual_seed(args.seed)  # the stochastic sampler's noise
        add(f'student {m["N"]}-step ({"S" if m["stochastic"] else "D"})', m['N'],
            lambda zb, yb, net=student, m=m, g=g: guided_pd.sample_student(net, m, zb, w, g, class_labels=yb))
    for k in (1, 2, 4, 8):
        add(f'DDIM with CFG {k}x2-step', 2 * k,
            lambda zb, yb, k=k: guided_pd.ddim(D_w, zb, k, w, class_labels=yb))
    out = [f'| sampler (FID of {args.fid} 16x16 samples, w = {w:g}) | NFE | FID |', '| --- | ---: | ---: |']
    out += [f'| {r["sampler"]} | {r["nfe"]} | {r["fid"]:.1f} |' for r in rows]
    print(f'FID rows: {time.time() - t0:.0f} s')
    return '\n'.join(out), rows


def train_iterations(cfg):
    return -(-int(cfg.kimg * 1000) // cfg.batch)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--teacher', default='toy:cifar10-16:cond')
    p.add_argument('--search', action='store_true', help='the stage-one recipe search (curves)')
    p.add_argument('--candidates', nargs='+', default=['official', 'lr1e-3', 'random-w', 'w-lr-x10'],
                   choices=list(CANDIDATES))
    p.add_argument('--search-updates', type=int, default=300, help='updates per candidate')
    p.add_argument('--eval-every', type=int, default=50, help='updates between points of a curve')
    p.add_argument('--stage1-updates', type=int, default=None, help="stage one's length (default: preset)")
    p.add_argument('--start-n', type=int, default=None, help="stage two's first teacher's steps (preset)")
    p.add_argument('--round-kimg', type=float, default=None, help='per halving (default: the preset)')
    p.add_argument('--final-round-kimg', type=float, default=None, help='2- and 1-step rounds (preset)')
    p.add_argument('--n', type=int, default=32, help='noises for metric A')
    p.add_argument('--ref-steps', type=int, default=48, help="steps of the guided teacher's fine solves")
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--fid', type=int, default=0,
                   help="FID of Table 3's rows with this many samples (0: none)")
    p.add_argument('--fid-w', type=float, default=1.0, help='the guidance weight of the FID rows')
    p.add_argument('--fid-rows', default='',
                   help="only the FID rows whose name holds one of these ';'-separated texts ('': all)")
    p.add_argument('--inception', default=None,
                   help="FID weights (path or URL; default fid.py's NVIDIA file)")
    p.add_argument('--out', default='runs/guided-image-results')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    print(f'{torch.get_num_threads()} thread(s); teacher {args.teacher}', flush=True)
    bench = Bench(args.teacher, args.n, args.ref_steps, cache=args.out)
    out = search(args, bench) if args.search else results(args, bench)
    print(f'wall time {time.time() - t0:.0f} s')
    return out


if __name__ == '__main__':
    main()
