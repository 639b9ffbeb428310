"""The GPU check: one command that proves this project's CUDA code paths ran and measures them.

A GPU is lent to this project now and then, for minutes. In at most 8 minutes on one H100/H200-class
GPU, with no network, this script measures (random weights: speed and numerics, not quality)

  unet          EDM's CIFAR-10 DDPM++ (55.7M parameters) forward and forward + backward at batch
                128 and 512: fp32, bf16 autocast, bf16 + channels_last (and, under compile, bf16 +
                torch.compile): images/s, TFLOP/s, fraction of the device's peak, memory;
  distill       one SFD iteration split into teacher and student, and a real distill.distill run
                (2 NFE + AFS, batch 128, about 2 minutes) on a full-size teacher file: kimg/s, peak
                memory, the paper's 200 kimg projected next to SFD's 0.64 A100-hours;
  sampling, fid sample.generate at 2 NFE (the student) and EDM's Heun at 35 NFE (the teacher), and
                FID feature extraction: images/s;
  correctness   bf16 vs fp32 teacher trajectories and first SFD update, torch.compile vs eager (the
                U-Net, distill.py, sampling: dynamo's graphs), a NaN/inf scan of every output, and
                the code paths as they ran (autocast, the teacher under inference_mode).

Precision and compiler are the training code's own arguments (SFDConfig.precision, .compile_backend,
distill.teacher_targets(precision=)), so the check runs that code unchanged. The steps run through
bench.Steps: a failure is a row, a time budget skips what no longer fits, a hard limit interrupts a
step that overruns, and the JSON is rewritten after every step. The table shows the JSON's main
numbers, by section.

    python benchmarks/gpu_check.py --out gpu.json            # one GPU, about 7 minutes
    python benchmarks/gpu_check.py --dry-run --out dry.json  # the same steps on a CPU, tiny, < 1 min
    python benchmarks/gpu_check.py --only compile            # some steps (names or prefixes)
"""
import contextlib
import copy
import dataclasses
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
import bench  # noqa: E402

import cli  # noqa: E402
import data  # noqa: E402
import distill  # noqa: E402
import models  # noqa: E402
import sample  # noqa: E402
import solvers  # noqa: E402
import unet  # noqa: E402

SFD_A100_HOURS = 0.64  # SFD Sec. 1 and Table 2: 2-NFE SFD on CIFAR-10, 200K trajectories, one A100
SECTIONS = ('meta', 'steps', 'unet', 'distill', 'sampling', 'fid', 'compile', 'correctness')
# GPU: the paper's sizes. Dry run: a shallow eighth-width DDPM++ (the same block types), batches of
# 2-4, bf16 on the CPU (so bf16 and fp32 really differ) and dynamo's 'eager' backend (it traces and
# guards as inductor does, then runs the captured graph eagerly: no compiler). It measures nothing.
SIZES = {
    'gpu': dict(net=dict(channels=128), unet_batches=(128, 512), batch=128, repeat=5, tick_every=10,
                min_iters=20, compile_iters=8, distill_seconds=120.0, sample_batch=256,
                student_images=2048, teacher_images=512, fid_batch=512, budget=390.0, need_scale=1.0,
                backend='inductor'),
    'dry': dict(net=dict(channels=16, channel_mult=[1, 2], num_blocks=1), unet_batches=(2, 4), batch=4,
                repeat=1, tick_every=1, min_iters=2, compile_iters=2, distill_seconds=0.5, sample_batch=4,
                student_images=8, teacher_images=4, fid_batch=2, budget=600.0, need_scale=0.0,
                backend='eager'),
}
HARD_MARGIN = 45.0  # seconds past the budget at which a running step is interrupted (and imports)
EAGER, COMPILED = ('fp32', 'bf16', 'bf16+channels_last'), 'bf16+compile'
# torch.compile at its best: one graph per network and grad mode (the U-Net's eval and train,
# distill.py's teacher and student, the sampled network) and no graph breaks.
GRAPHS_EXPECTED = {'unet': 2, 'distill': 2, 'sample': 1}
# What the table shows of each section's results (the JSON has everything); a.b is b inside a.
UNET = ('fwd_img_s', 'fwd_bwd_img_s', 'fwd_tflops', 'fwd_bwd_tflops', 'fwd_peak_fraction',
        'fwd_bwd_peak_fraction', 'fwd_bwd_mem_gib', 'max_abs_diff')
SHOW = dict(unet=UNET, compile=UNET + ('fwd_first_s', 'max_abs_diff_vs_eager', 'first_iteration_s',
                                       's_per_it', 'speedup_vs_eager', 'max_pixel_diff', 'pixels_differing'),
            distill=('teacher_s', 'student_s', 'teacher_fraction', 'teacher_calls', 'student_calls',
                     'iterations', 'kimg_s', 'projected_hours', 'paper_a100_hours', 'peak_mem_gib'),
            sampling=('solver', 'nfe', 'batch', 'img_s', 'peak_mem_gib'),
            fid=('batch', 'img_s', 'gflop_per_img'),
            correctness=('bf16.max_abs', 'bf16.mean_abs', 'fp32_rerun.max_abs', 'gradient_bf16.rel_l2',
                         'gradient_bf16.cosine', 'delta_bf16.same_sign', 'gradient_fp32_rerun.rel_l2'))


def vector_diff(a, b):
    """How far vector a is from the reference b (same_sign: where b is non-zero, the signs agree)."""
    return dict(rel_l2=((a - b).norm() / b.norm()).item(), max_abs=(a - b).abs().max().item(),
                cosine=torch.nn.functional.cosine_similarity(a, b, dim=0).item(),
                same_sign=((a.sign() == b.sign()) | (b == 0)).float().mean().item())


@contextlib.contextmanager
def strict(precision):
    """The fp32 reference is strict float32: TF32 (PyTorch's default for cuDNN's convolutions) is
    off inside it; a bf16 run keeps the flags as training has them."""
    flags = torch.backends.cudnn, torch.backends.cuda.matmul
    old = [f.allow_tf32 for f in flags]
    for f, v in zip(flags, old, strict=True):
        f.allow_tf32 = v and precision != 'fp32'
    try:
        yield
    finally:
        for f, v in zip(flags, old, strict=True):
            f.allow_tf32 = v


class CodePaths:
    """A global forward hook recording, for the teacher (eval mode) and the student (train mode)
    apart, the modes of every EDMPrecond call and the dtype of the network F inside it."""

    def __init__(self):
        self.seen, self.handle = {}, None

    def start(self):
        self.handle = torch.nn.modules.module.register_module_forward_hook(self.hook)

    def stop(self):  # a hook slows every module call down: one tick's worth of calls is enough
        if self.handle is not None:
            self.handle = self.handle.remove()

    def hook(self, module, args, out):
        role = 'student' if module.training else 'teacher'
        record = lambda key, v: self.seen.setdefault(role, {}).setdefault(key, set()).add(v)
        if isinstance(module, unet.EDMPrecond):
            record('autocast', torch.is_autocast_enabled(out.device.type))
            record('inference_mode', torch.is_inference_mode_enabled())
            record('output_dtype', str(out.dtype))  # EDM's preconditioning stays in float32
        elif isinstance(module, (unet.SongUNet, unet.DhariwalUNet)):
            record('network_dtype', str(out.dtype))  # F under autocast: bf16 on CUDA


class Check:
    """One check: sizes, device, its steps, what steps leave for later ones, and the results."""

    def __init__(self, args, device):
        self.args, self.device, self.size = args, device, SIZES['dry' if args.dry_run else 'gpu']
        self.work = Path(args.work_dir or tempfile.mkdtemp(prefix='gpu-check-'))
        self.results = {s: {} for s in SECTIONS}
        self.results['correctness']['non_finite'] = {}
        self.shared, self.paths = {}, CodePaths()
        self.steps = bench.Steps(args.budget or self.size['budget'], HARD_MARGIN, after=self.write)
        self.results['steps'] = self.steps.status  # the same dict: each step's status as it ends

    def scan(self, name, *xs):
        """The NaN/inf scan: record how many non-finite values this output holds."""
        self.results['correctness']['non_finite'][name] = bench.nonfinite(*xs)

    def need(self, key, step):
        """What an earlier step left under `key`, or an error naming that step."""
        if key not in self.shared:
            raise RuntimeError(f'needs the result of step {step}, which did not run')
        return self.shared[key]

    def write(self):
        """The JSON, atomically (a reader never sees half a file)."""
        self.results['meta']['elapsed_s'] = time.perf_counter() - self.steps.t0
        text = json.dumps(bench.plain(self.results), indent=1, allow_nan=False)
        data.atomic_write(self.args.out, lambda tmp: Path(tmp).write_text(text))


# ---------------------------------------------------------------------------------------------
# Steps: each records its results in ck.results[section][label]
# ---------------------------------------------------------------------------------------------

def setup(ck):
    """The network every step uses, and the teacher file of the distillation runs (no download)."""
    if ck.device.type == 'cuda':
        torch.backends.cudnn.benchmark = True  # as the training loop sets it: fixed shapes, fastest kernels
    ck.net = bench.make_unet(device=ck.device, seed=0, **ck.size['net']).eval()  # random, at unit gain
    ck.teacher_path = ck.work / 'teacher.pt'  # sampled as NVIDIA's nets are: EDM's Heun, 35 NFE
    models.save_model(ck.teacher_path, ck.net, kind='gpu-check random teacher', shape=[3, 32, 32],
                      sampling=solvers.Recipe())
    ck.results['meta']['parameters'] = sum(p.numel() for p in ck.net.parameters())


def teacher_precision(ck):
    """bf16 vs fp32 teacher trajectories: distill.teacher_targets (DPM-Solver++(3M), K = 4) on one
    batch, its states at the student's timestamps compared; an fp32 rerun gives the noise floor."""
    cfg, B, diff = distill.SFDConfig(), ck.size['batch'], bench.abs_diff
    t_steps = distill.student_schedule(cfg, cfg.nfe)  # SFD Alg. 4/5: 2 NFE + AFS, refined K times
    t_teacher = distill.grid(cfg, cfg.K * (len(t_steps) - 1))
    x_N = cfg.t_max * torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(ck.device)

    def solve(precision):
        with strict(precision):
            return distill.teacher_targets(ck.net, x_N, t_teacher, cfg.K, cfg.teacher_solver,
                                           precision=precision)
    fp32, again, bf16 = solve('fp32'), solve('fp32'), solve('bf16')
    ck.scan('teacher trajectories', fp32, again, bf16)
    ck.shared['sfd'] = (cfg, t_steps, x_N, fp32)
    ck.results['correctness']['teacher_bf16_vs_fp32'] = dict(
        batch=B, solver=cfg.teacher_solver, K=cfg.K, teacher_steps=len(t_teacher) - 1, bf16=diff(bf16, fp32),
        bf16_final=diff(bf16[-1], fp32[-1]), fp32_rerun=diff(again, fp32),
        bf16_max_abs_per_target=[diff(b, f)['max_abs'] for b, f in zip(bf16, fp32, strict=True)],
        target_rms=fp32.float().square().mean((1, 2, 3, 4)).sqrt())


def one_update(net, precision, cfg, t_steps, x_N, targets):
    """One SFD iteration (Alg. 5: AFS, then an Adam update per student step) of a fresh student copy
    in `precision`: (losses, the first update's gradient, the parameter change), flattened."""
    student = copy.deepcopy(net).eval().requires_grad_(True)  # eval: dropout off, one function for both
    params = list(student.parameters())
    flat = lambda ts: torch.cat([t.detach().flatten() for t in ts])
    before, grads = flat(params).clone(), []

    def first_gradient(loss, step):  # sfd_iteration's check: after backward, before the update
        if not grads:
            grads.append(flat([p.grad if p.grad is not None else torch.zeros_like(p) for p in params]))
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)  # distill's optimiser
    with strict(precision):
        losses = distill.sfd_iteration(student, opt, x_N, t_steps, targets,
                                       dataclasses.replace(cfg, precision=precision), check=first_gradient)
    return losses, grads[0], flat(params) - before


def first_update(ck):
    """The student's first SFD iteration in bf16 vs fp32 from the same trajectories (fp32 targets).
    Adam's first step is about lr * sign(gradient), so the update's signs are its measure."""
    cfg, t_steps, x_N, targets = ck.need('sfd', 'correctness/teacher')
    runs = {name: one_update(ck.net, precision, cfg, t_steps, x_N, targets)
            for name, precision in (('fp32', 'fp32'), ('fp32_rerun', 'fp32'), ('bf16', 'bf16'))}
    res = dict(losses={k: r[0] for k, r in runs.items()}, lr=cfg.lr, updates=len(runs['fp32'][0]) - cfg.afs)
    for k in ('bf16', 'fp32_rerun'):
        res[f'gradient_{k}'], res[f'delta_{k}'] = (vector_diff(runs[k][i], runs['fp32'][i]) for i in (1, 2))
    ck.scan('first SFD update', *[v for r in runs.values() for v in r[1:]],
            torch.tensor([loss for r in runs.values() for loss in r[0]]))
    ck.results['correctness']['first_update_bf16_vs_fp32'] = res


def unet_step(ck, variant, batch):
    """The U-Net at one variant and batch (bench.unet_variant), with the NaN scan and, compiled,
    the distance to the same variant run eagerly."""
    if ('x', batch) not in ck.shared:  # one batch of inputs per size, its FLOPs and fp32 output
        x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch)).to(ck.device)
        sigma = torch.full((batch,), 2.0, device=ck.device)
        ck.shared['x', batch] = (x, sigma, *bench.unet_flops(ck.net, x, sigma))
    x, sigma, flops, ref = ck.shared['x', batch]
    row, out = bench.unet_variant(ck.net, x, sigma, variant, ck.device, ck.size['repeat'], ck.args.peak,
                                  flops, ref, backend=ck.size['backend'])
    ck.scan(f'unet {variant} {batch}', out)
    ck.shared['out', variant, batch], compiled = out, 'compile' in variant
    eager = ck.shared.get(('out', variant.replace('+compile', ''), batch))
    if compiled:
        row['max_abs_diff_vs_eager'] = None if eager is None else bench.abs_diff(out, eager)['max_abs']
    ck.results['compile' if compiled else 'unet'][f'{variant}, batch {batch}'] = row


def distill_split(ck):
    """One SFD iteration timed as teacher trajectory and student steps (bench.bench_sfd)."""
    row = ck.results['distill']['split'] = bench.bench_sfd(ck.net, ck.size['batch'], ck.device,
                                                           ck.size['repeat'])[0]
    ck.shared['s_per_it'] = row['teacher_s'] + row['student_s']


def run_distill(ck, name, iterations, seconds, tick_every, compiled=False):
    """distill.distill on the check's teacher file with SFD's CIFAR-10 settings (kimg stays 200, so
    the lr schedule is the paper's), stopped after `iterations` (one snapshot, at the stop); past
    1.5x the planned seconds + 10 s, a tick ends the run."""
    B, rows, logs, t0, summary = ck.size['batch'], [], [], time.perf_counter(), None
    cfg = distill.SFDConfig(teacher=str(ck.teacher_path), batch=B, run_dir=str(ck.work / name),
                            tick_kimg=B * tick_every / 1000, snapshot_kimg=1e9, device=str(ck.device),
                            compile=compiled, compile_backend=ck.size['backend'])

    def on_tick(row, student):
        rows.append(dict(row, wall_s=time.perf_counter() - t0))
        ck.paths.stop()
        if time.perf_counter() - t0 > 1.5 * seconds + 10:
            raise TimeoutError
    bench.peak_gib(ck.device, reset=True)
    with contextlib.suppress(TimeoutError):  # the guard above, or the hard limit
        student, summary = distill.distill(cfg, stop_at_iteration=iterations, progress=False, log=logs.append,
                                           on_tick=on_tick)
        ck.scan(f'{name}: student weights', *student.parameters())
    ck.scan(f'{name}: losses', torch.tensor([v for r in rows for v in r['loss_per_step']]))
    rates = sorted(r['img_per_s'] for r in rows[1:] or rows)  # the first tick holds the warm-up
    res = dict(batch=B, iterations=rows[-1]['iteration'] if rows else 0, wall_s=time.perf_counter() - t0,
               img_s=rates[len(rates) // 2], ticks=rows, log=logs, summary=summary,
               peak_mem_gib=bench.peak_gib(ck.device))
    if summary is None:
        raise TimeoutError(f'stopped at iteration {res["iterations"]} of {iterations} after '
                           f'{res["wall_s"]:.0f} s (planned: {seconds:.0f} s)')
    return res


def distill_step(ck, compiled=False):
    """The real run: about distill_seconds of SFD at batch 128, kimg/s and the paper's 200 kimg
    projected; compiled (distill.py's compile path): a short run whose first iteration compiles."""
    if compiled:
        res = run_distill(ck, 'run-compile', ck.size['compile_iters'], 240.0, 1, compiled=True)
        ck.results['compile']['distill'] = res
        eager = ck.results['distill'].get('run')
        res.update(s_per_it=ck.size['batch'] / res['img_s'], first_iteration_s=res['ticks'][0]['wall_s'],
                   speedup_vs_eager=res['img_s'] / eager['img_s'] if eager else None)
        return
    seconds = ck.args.distill_seconds or ck.size['distill_seconds']
    iterations = max(ck.size['min_iters'], round(seconds / ck.need('s_per_it', 'distill/split')))
    ck.paths.start()
    try:
        res = run_distill(ck, 'run', iterations, seconds, ck.size['tick_every'])
    finally:
        ck.paths.stop()
    ck.shared['student_path'] = ck.work / 'run' / 'student.pt'
    kimg, n = distill.SFDConfig().kimg, res['iterations']
    ck.results['distill']['run'] = dict(
        res, kimg_s=res['img_s'] / 1000, paper_kimg=kimg, paper_a100_hours=SFD_A100_HOURS,
        projected_hours=kimg / res['img_s'] * 1000 / 3600,
        teacher_nfe_per_it=res['summary']['teacher_nfe'] / n,
        student_calls_per_it=res['summary']['student_calls'] / n)


def sample_step(ck, who, compiled=False):
    """sample.generate images/s after a warm-up batch: the student's 2 NFE (the distilled file or, that
    run missing, SFD's initial student psi = theta: the same cost) or the teacher's Heun at 35 NFE.
    Compiled (as sample.py --compile): timed with compilation, pixels vs the eager student's."""
    if who == 'student' and 'student_path' not in ck.shared:
        ck.shared['student_path'] = ck.work / 'student-init.pt'
        models.save_model(ck.shared['student_path'], ck.net, method='sfd', teacher=str(ck.teacher_path),
                          shape=[3, 32, 32], sampling=distill.sampling_recipe(distill.SFDConfig(), ck.net))
    path = ck.shared['student_path'] if who == 'student' else ck.teacher_path
    net, meta = models.load(path, ck.device)
    net, b = torch.compile(net, backend=ck.size['backend']) if compiled else net, ck.size['sample_batch']
    n = min(2 * b, ck.size['student_images']) if compiled else ck.size[f'{who}_images']
    gen = lambda seeds: sample.generate(net, seeds, meta['sampling'], batch=b, device=ck.device,
                                        progress=False, raw=True)
    if not compiled:  # warm-up: cuDNN's autotuning
        gen(list(range(min(b, n))))
        bench.peak_gib(ck.device, reset=True)
    t0 = time.perf_counter()
    x = sample.to_uint8(gen(list(range(n))))  # ends on the CPU: synchronised
    seconds, plan = time.perf_counter() - t0, sample.make_plan(net, meta['sampling'])
    if compiled:
        diff = (x.int() - ck.need('student_images', 'sample/student')[:n].int()).abs()
        ck.results['compile']['sample'] = dict(images=n, batch=b, wall_s=seconds,
                                               max_pixel_diff=diff.max().item(),
                                               pixels_differing=(diff > 0).float().mean().item())
        return
    ck.scan(f'samples ({who})', x)
    ck.shared[f'{who}_images'] = x
    ck.results['sampling'][who] = dict(model=who, file=path.name, solver=plan.solver, nfe=plan.nfe, images=n,
                                       batch=b, img_s=n / seconds, peak_mem_gib=bench.peak_gib(ck.device))


def fid_step(ck):
    """FID feature extraction of the student's samples (Inception-v3, random weights: same cost)."""
    images = ck.shared.get('student_images')
    if images is None:
        images = torch.randint(0, 256, (ck.size['student_images'], 3, 32, 32), dtype=torch.uint8)
    row = bench.bench_fid(ck.size['fid_batch'], ck.device, ck.size['repeat'], 0, images)[0]
    ck.results['fid'] = row
    row['images'], ck.results['correctness']['non_finite']['FID features'] = len(images), row['nonfinite']


def code_paths(ck):
    """Whether the code paths ran as documented: the distillation run's hooks, and the compile
    steps' dynamo counts. Runs last, whatever ran before."""
    cuda, seen, paths = ck.device.type == 'cuda', ck.paths.seen, {}
    got = lambda key, roles=('teacher', 'student'): {r: sorted(seen.get(r, {}).get(key, ()), key=str)
                                                     for r in roles}
    for name, want, observed in [
            ('autocast bf16 (CUDA only)', [cuda], got('autocast')),
            ('network F in bf16 (CUDA only)', ['torch.bfloat16' if cuda else 'torch.float32'],
             got('network_dtype')),
            ('preconditioning, D, in float32', ['torch.float32'], got('output_dtype')),
            ('teacher under inference_mode', [True], got('inference_mode', ['teacher'])),
            ('student outside inference_mode', [False], got('inference_mode', ['student']))]:
        paths[name] = dict(expected=want, **observed, ok=all(v == want for v in observed.values()))
    for name in [s[0] for s in steps(ck.size) if s[0].startswith('compile/')]:
        st = ck.results['steps'].get(name, dict(status='not run'))
        paths[f'torch.compile: {name}'] = dict(status=st['status'], ok=st['status'] == 'ok',
                                               graphs_expected=GRAPHS_EXPECTED[name.split('/')[1]],
                                               graphs=st.get('dynamo_graphs'),
                                               graph_breaks=st.get('graph_breaks'))
    ck.results['correctness']['code_paths'] = paths


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------

def steps(size):
    """(name, rough GPU seconds it needs, function, arguments), in order: everything eager first, the
    compile steps (slowest to start, least certain) last, the larger batch's last of all."""
    b0, b1 = size['unet_batches']
    return [('setup', 20, setup), ('correctness/teacher', 15, teacher_precision),
            ('correctness/first-update', 15, first_update),
            *[(f'unet/{v}/{b}', 15, unet_step, v, b) for b in (b0, b1) for v in EAGER],
            ('distill/split', 15, distill_split), ('distill/run', size['distill_seconds'] + 30, distill_step),
            ('sample/student', 15, sample_step, 'student'), ('sample/teacher', 30, sample_step, 'teacher'),
            ('fid', 10, fid_step), (f'compile/unet/{b0}', 100, unet_step, COMPILED, b0),
            ('compile/distill', 60, distill_step, True), ('compile/sample', 60, sample_step, 'student', True),
            (f'compile/unet/{b1}', 100, unet_step, COMPILED, b1)]


def numbers(row, keys):
    """'key value, ...' of the `keys` a result has (a.b: b inside the dict a), floats to 3 digits."""
    flat = {f'{k}.{j}': u for k, v in row.items() if isinstance(v, dict) for j, u in v.items()}
    flat.update(row)
    return ', '.join(f'{k} {flat[k]:.3g}' if isinstance(flat[k], float) else f'{k} {flat[k]}'
                     for k in keys if flat.get(k) is not None)


def table(ck, title):
    """The printed table: every step's status, each section's main numbers (SHOW) one line per
    result, the code paths and the NaN/inf scan; names as in the JSON."""
    res, lines = ck.results, []
    add = lambda section, name, text: lines.append(dict(bench=title, section=section, name=name, values=text))
    for name, st in res['steps'].items():
        add('steps', name, f'{st["status"].replace("failed", "FAILED")} {st["seconds"]:.1f} s '
            f'{st.get("error") or st.get("reason") or ""}')
    for section, keys in SHOW.items():  # fid holds one result, the other sections one per name
        for name, row in ([(section, res[section])] if section == 'fid' else res[section].items()):
            if isinstance(row, dict) and numbers(row, keys):
                add(section, name, numbers(row, keys))
    for name, path in res['correctness'].get('code_paths', {}).items():
        observed = numbers(path, [k for k in path if k != 'ok'])
        add('code path', name, ('yes: ' if path['ok'] else 'NO: ') + observed)
    scanned = res['correctness']['non_finite']
    bad = ', '.join(k for k, v in scanned.items() if v)
    add('correctness', 'NaN/inf scan', f'NON-FINITE: {bad}' if bad else f'all {len(scanned)} outputs finite')
    return bench.table(lines, text_left=True)


def main(argv=None):
    """The command line (see the module docstring); returns the results it wrote."""
    p = cli.parser(__doc__)
    p.add_argument('--dry-run', action='store_true', help='the same steps on a CPU at tiny sizes (< 1 min)')
    p.add_argument('--out', default='gpu_check.json', help='write the results here (JSON)')
    p.add_argument('--device', default='auto', help='auto: cuda (the dry run: cpu)')
    p.add_argument('--budget', type=float, help='seconds in which steps may start (GPU 390; dry run 600, '
                   f'for busy shared CPUs); a step still running {HARD_MARGIN:g} s later is interrupted')
    p.add_argument('--distill-seconds', type=float, help='length of the distill.distill run (GPU 120)')
    p.add_argument('--peak', type=float, help='device peak TFLOP/s for every row (default: bench.PEAKS)')
    p.add_argument('--only', type=lambda s: [v for v in s.split(',') if v],
                   help='comma-separated step names or prefixes, e.g. unet,distill (setup always runs)')
    p.add_argument('--work-dir', help='keep the teacher, runs and samples here (default: a temporary folder)')
    args = p.parse_args(argv)
    for v, flag in ((args.budget, '--budget'), (args.distill_seconds, '--distill-seconds'),
                    (args.peak, '--peak')):
        if v is not None and not (math.isfinite(v) and v > 0):
            raise ValueError(f'{flag} {v}: must be a positive number')
    device = cli.device('cpu' if args.dry_run and args.device == 'auto' else args.device)
    if device.type != 'cuda' and not args.dry_run:
        raise ValueError(f'--device {args.device}: no CUDA GPU here, and this check measures one; '
                         'use --dry-run for its tiny CPU version')
    data.check_writable(args.out, '--out')  # refused now, not after minutes of measuring
    ck, cuda = Check(args, device), device.type == 'cuda'
    ck.results['meta'] = dict(  # the device, the software and the settings
        device=torch.cuda.get_device_name(device) if cuda else 'CPU', dry_run=args.dry_run,
        torch=torch.__version__, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
        memory_gib=torch.cuda.get_device_properties(device).total_memory / 2 ** 30 if cuda else None,
        threads=torch.get_num_threads(), cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
        matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32, budget_s=ck.steps.budget,
        hard_limit_s=ck.steps.budget + HARD_MARGIN, sizes=ck.size, peak_override=args.peak,
        argv=sys.argv[1:], note='dry run: tiny sizes on a CPU, its numbers measure nothing' if args.dry_run
        else 'random weights: speed and numerics, not sample quality')
    try:
        with ck.steps.hard_limit():
            for name, need_s, fn, *fn_args in steps(ck.size):
                if name.startswith('compile/'):  # empty dynamo caches, as a fresh process has; never at its
                    torch._dynamo.reset()        # limit of graphs per function (past it, it runs eagerly)
                if name == 'setup' or not args.only or any(name.startswith(o) for o in args.only):
                    ck.steps.run(name, need_s * ck.size['need_scale'], fn, ck, *fn_args)
                if ck.results['steps'].get('setup', {}).get('status') != 'ok':
                    break  # nothing runs without the network
        code_paths(ck)
    finally:
        ck.paths.stop()
        if not args.work_dir:
            shutil.rmtree(ck.work, ignore_errors=True)
    ck.write()
    m = ck.results['meta']
    print(table(ck, f'GPU check: {m["device"]}, torch {m["torch"]}, {m["elapsed_s"]:.0f} s'
                + (' (DRY RUN: tiny sizes on a CPU, not measurements)' if args.dry_run else ''))
          + f'\n\nwrote {args.out}')
    return ck.results


if __name__ == '__main__':
    cli.run(main)
