"""The GPU check: one command that proves this project's CUDA code paths ran and measures them.

A GPU is lent to this project now and then, for minutes; this script spends them on measuring.
In at most 8 minutes on one H100/H200-class GPU, with no network, it runs

  the U-Net     EDM's CIFAR-10 DDPM++ (55.7M parameters) forward and forward + backward at batch
                128 and 512: fp32, bf16 autocast, bf16 + channels_last, bf16 + torch.compile;
                images/s, TFLOP/s (torch.utils.flop_counter), fraction of the device's peak, memory;
  distillation  a real distill.distill run (SFD, 2 NFE + AFS, batch 128, about 2 minutes) on a
                full-size DDPM++ teacher file with random weights: kimg/s, the teacher/student split,
                peak memory, the projected time for the paper's 200 kimg next to SFD's 0.64 A100-hours;
  sampling      sample.generate at 2 NFE (the student) and EDM's Heun at 35 NFE (the teacher), and
                FID feature extraction: images/s;
  correctness   bf16 vs fp32 teacher trajectories, the student's first SFD update in bf16 vs fp32,
                torch.compile vs eager, a NaN/inf scan of every output, and a record of the README's
                CUDA code paths as they ran (autocast, the teacher under inference_mode, compile in
                distill.py and sample.py, with dynamo's graph counts);

then prints one table and writes JSON, rewritten after every step (a killed run keeps what it had).
Each step has its own try block, so a failure is a row of the table and the rest still runs; a
time budget skips the steps that no longer fit and a hard limit interrupts one that overruns.

    python benchmarks/gpu_check.py --out gpu.json            # one GPU, about 7 minutes
    python benchmarks/gpu_check.py --dry-run --out dry.json  # the same steps on a CPU, tiny, < 1 min
    python benchmarks/gpu_check.py --only compile            # some steps (names or prefixes)
"""
import contextlib
import copy
import json
import math
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from unittest import mock

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
# GPU: the paper's sizes. Dry run: a shallow eighth-width DDPM++ (the same block types, attention
# at 16x16, one block per level), batches of 2-4, dynamo's eager backend; it measures nothing.
SIZES = {
    'gpu': dict(net=dict(channels=128), unet_batches=(128, 512), batch=128, repeat=5, tick_every=10,
                min_iters=20, compile_iters=8, distill_seconds=120.0, sample_batch=256,
                student_images=2048, teacher_images=512, fid_batch=512, budget=390.0, need_scale=1.0,
                backend=None),
    'dry': dict(net=dict(channels=16, channel_mult=[1, 2], num_blocks=1), unet_batches=(2, 4), batch=4,
                repeat=1, tick_every=1, min_iters=2, compile_iters=2, distill_seconds=0.5, sample_batch=4,
                student_images=8, teacher_images=4, fid_batch=2, budget=240.0, need_scale=0.0,
                backend='eager'),
}
HARD_MARGIN = 45.0  # seconds past the budget at which a running step is interrupted (and imports)
EAGER, COMPILED = ('fp32', 'bf16', 'bf16+channels_last'), 'bf16+compile'
# torch.compile at its best: one graph per network and grad mode (the U-Net's eval and train,
# distill.py's teacher and student, sample.py's network) and no graph breaks.
GRAPHS_EXPECTED = {'unet': 2, 'distill': 2, 'sample': 1}


def dynamo_counts():
    """(graphs dynamo has compiled, graph breaks it has met) so far in this process."""
    from torch._dynamo.utils import counters
    return counters['stats']['unique_graphs'], sum(counters['graph_break'].values())


def nonfinite(*xs):
    """How many NaN/inf values the tensors (or arrays) hold."""
    return sum(int((~torch.isfinite(torch.as_tensor(x).float())).sum()) for x in xs)


def plain(v):
    """JSON-ready: containers, tensors, dtypes and paths to plain values; NaN/inf to strings."""
    if isinstance(v, dict):
        return {str(k): plain(u) for k, u in v.items()}
    if isinstance(v, (list, tuple, set)):
        return [plain(u) for u in (sorted(v, key=str) if isinstance(v, set) else v)]
    if isinstance(v, torch.Tensor):
        return plain(v.tolist())
    if hasattr(v, 'item') and not isinstance(v, (str, bytes)):  # numpy scalars
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)
    return v if isinstance(v, (str, int, float, bool, type(None))) else str(v)


def fmt_mem(gib):
    """', peak x GiB' for a table cell, '' where memory is not measured (CPU)."""
    return '' if gib is None else f', peak {gib:.1f} GiB'


def unit_gain_(net, seed):
    """Redraw every weight matrix and kernel from N(0, 1/fan_in). EDM initialises its output layers
    near zero (D = c_skip x at first), which would make a random teacher trivial; at unit gain F's
    output is O(1), as a trained network's, so precision and NaN checks see realistic magnitudes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
    return net


@contextlib.contextmanager
def precision(name):
    """distill.py's autocast (cli.autocast: bf16 on CUDA, off elsewhere) forced to 'bf16' or 'fp32'
    on any device, so the same code runs in both precisions (on a CPU too, for the dry run). 'fp32'
    is the reference: TF32, PyTorch's default for cuDNN's convolutions, is off in it."""
    forced = lambda dev: torch.autocast(torch.device(dev).type, torch.bfloat16, enabled=name == 'bf16')
    flags = torch.backends.cudnn, torch.backends.cuda.matmul
    old = [f.allow_tf32 for f in flags]
    try:
        for f, v in zip(flags, old, strict=True):
            f.allow_tf32 = v and name != 'fp32'
        with mock.patch.object(cli, 'autocast', forced):
            yield
    finally:
        for f, v in zip(flags, old, strict=True):
            f.allow_tf32 = v


@contextlib.contextmanager
def compile_backend(backend):
    """torch.compile with `backend` wherever it is called (the dry run: dynamo's 'eager' backend
    traces and guards as inductor does, then runs the captured graph eagerly; no compiler needed)."""
    if backend is None:
        yield
        return
    real = torch.compile
    with mock.patch.object(torch, 'compile', lambda model, **kw: real(model, **dict(kw, backend=backend))):
        yield


class CodePaths:
    """Global forward hooks recording the modes of every EDMPrecond call of a distill.distill run,
    the teacher's (eval mode) and the student's (train mode) apart, and the inner network's dtype."""

    def __init__(self):
        self.seen, self.handle = {}, None

    def start(self):
        self.handle = torch.nn.modules.module.register_module_forward_hook(self.hook)

    def stop(self):  # hooks slow every module call down: one tick's worth of calls is enough
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def hook(self, module, args, out):
        if not isinstance(module, (unet.EDMPrecond, unet.SongUNet, unet.DhariwalUNet)):
            return
        rec = self.seen.setdefault('student' if module.training else 'teacher', dict(
            calls=0, autocast=set(), inference_mode=set(), output_dtype=set(), network_dtype=set()))
        if not isinstance(module, unet.EDMPrecond):
            rec['network_dtype'].add(str(out.dtype))  # F under autocast: bf16 on CUDA
            return
        rec['calls'] += 1
        rec['autocast'].add(torch.is_autocast_enabled(out.device.type))
        rec['inference_mode'].add(torch.is_inference_mode_enabled())
        rec['output_dtype'].add(str(out.dtype))  # EDM's preconditioning stays in float32


class Check:
    """One check: sizes, device, what steps leave for later ones, the results and the table's lines."""

    def __init__(self, args, device):
        self.args, self.device = args, device
        self.size = SIZES['dry' if args.dry_run else 'gpu']
        self.budget = args.budget or self.size['budget']
        self.work = Path(args.work_dir or tempfile.mkdtemp(prefix='gpu-check-'))
        self.results = {s: {} for s in SECTIONS}
        self.results['correctness']['non_finite'] = {}
        self.lines, self.shared, self.paths, self.in_step = [], {}, CodePaths(), False
        self.t0 = time.perf_counter()  # the budget counts from here

    def left(self):
        """Seconds of the budget left."""
        return self.budget - (time.perf_counter() - self.t0)

    def scan(self, name, *xs):
        """The NaN/inf scan: record how many non-finite values this output holds."""
        self.results['correctness']['non_finite'][name] = nonfinite(*xs)

    def need(self, key, step):
        """What an earlier step left under `key`, or an error naming that step."""
        if key not in self.shared:
            raise RuntimeError(f'needs the result of step {step}, which did not run')
        return self.shared[key]

    def run(self, name, need_s, fn, *fn_args):
        """One step in its own try block (unless --only leaves it out or the budget has no room for
        it): its status, seconds and dynamo graphs, its table lines; then the JSON is rewritten."""
        if self.args.only and name != 'setup' and not any(name.startswith(o) for o in self.args.only):
            return
        need_s *= self.size['need_scale']
        if name.startswith('compile/'):
            # Each compile step starts from empty dynamo caches, as a fresh process would, and never
            # meets dynamo's limit of graphs per function (past it, dynamo silently runs eagerly).
            torch._dynamo.reset()
        t0, status, dynamo = time.perf_counter(), dict(status='skipped'), dynamo_counts()
        if self.left() < need_s:
            status['reason'] = f'time budget: {max(self.left(), 0):.0f} s left, needs about {need_s:.0f} s'
            self.lines.append((name, 'skipped', status['reason']))
        else:
            self.in_step = True
            try:
                self.lines += fn(self, *fn_args)
                status = dict(status='ok')
            except Exception as e:  # one failure is a row of the table; the other steps still run
                msg = f'{type(e).__name__}: {e}'.splitlines()[0][:300]
                status = dict(status='failed', error=msg, traceback=traceback.format_exc(limit=-4))
                self.lines.append((name, 'FAILED', msg))
                if self.device.type == 'cuda':
                    torch.cuda.empty_cache()
            finally:
                self.in_step = False
        status['seconds'] = time.perf_counter() - t0
        graphs, breaks = dynamo_counts()
        status.update(dynamo_graphs=graphs - dynamo[0], graph_breaks=breaks - dynamo[1])
        self.results['steps'][name] = status
        print(f'[{time.perf_counter() - self.t0:5.0f} s] {name}: {status["status"]} '
              f'({status["seconds"]:.1f} s)', flush=True)
        self.write()

    def write(self):
        """The JSON, atomically (a reader never sees half a file)."""
        self.results['meta']['elapsed_s'] = time.perf_counter() - self.t0
        text = json.dumps(plain(self.results), indent=1, allow_nan=False)
        data.atomic_write(self.args.out, lambda tmp: Path(tmp).write_text(text))


# ---------------------------------------------------------------------------------------------
# Steps: each records its results in the check and returns its lines of the table
# ---------------------------------------------------------------------------------------------

def setup(ck):
    """The network every step uses, and the teacher file of the distillation runs (no download)."""
    if ck.device.type == 'cuda':
        torch.backends.cudnn.benchmark = True  # as distill.py sets it: fixed shapes, fastest kernels
    torch.manual_seed(0)
    net = unit_gain_(bench.make_unet(device='cpu', **ck.size['net']), seed=0).to(ck.device).eval()
    ck.net, ck.teacher_path = net, ck.work / 'teacher.pt'
    # The teacher's recipe is EDM's sampler (Heun, 35 NFE), as for NVIDIA's networks.
    models.save_model(ck.teacher_path, net, kind='gpu-check random teacher', shape=[3, 32, 32],
                      sampling=solvers.Recipe())
    params = ck.results['meta']['parameters'] = sum(p.numel() for p in net.parameters())
    width = 'EDM CIFAR-10 size' if ck.size['net']['channels'] == 128 else 'shallow, reduced width'
    return [('setup', f'DDPM++, {width}', f'{params:,} parameters, random weights at unit gain, '
             f'teacher file {ck.teacher_path.stat().st_size / 2 ** 20:.0f} MiB')]


def abs_diff(a, b):
    """Max and mean |a - b| over every element."""
    d = (a.float() - b.float()).abs()
    return dict(max_abs=d.max().item(), mean_abs=d.mean().item())


def teacher_precision(ck):
    """bf16 vs fp32 teacher trajectories: distill.teacher_targets (DPM-Solver++(3M), K = 4) on one
    batch, its states at the student's timestamps compared; an fp32 rerun gives the noise floor."""
    cfg = distill.SFDConfig()
    # SFD Alg. 4/5: the student's 2 NFE + AFS grid, refined K times for the teacher.
    t_steps = distill.student_schedule(cfg, cfg.nfe)
    t_teacher = solvers.time_schedule(cfg.K * (len(t_steps) - 1), cfg.t_min, cfg.t_max, cfg.schedule,
                                      cfg.rho)
    B = ck.size['batch']
    x_N = cfg.t_max * torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(ck.device)

    def solve(name):
        with precision(name):
            return distill.teacher_targets(ck.net, x_N, t_teacher, cfg.K, cfg.teacher_solver)
    fp32, again, bf16 = solve('fp32'), solve('fp32'), solve('bf16')
    ck.scan('teacher trajectories', fp32, again, bf16)
    ck.shared['sfd'] = (cfg, t_steps, x_N, fp32)
    res = dict(batch=B, solver=cfg.teacher_solver, K=cfg.K, teacher_steps=len(t_teacher) - 1,
               bf16=abs_diff(bf16, fp32), bf16_final=abs_diff(bf16[-1], fp32[-1]),
               bf16_max_abs_per_target=[abs_diff(b, f)['max_abs'] for b, f in zip(bf16, fp32, strict=True)],
               fp32_rerun=abs_diff(again, fp32), target_rms=fp32.float().square().mean((1, 2, 3, 4)).sqrt())
    ck.results['correctness']['teacher_bf16_vs_fp32'] = res
    return [('bf16 vs fp32', f'teacher trajectory, {res["teacher_steps"]} steps, batch {B}',
             f'max {res["bf16"]["max_abs"]:.3g}, mean {res["bf16"]["mean_abs"]:.3g} (final state max '
             f'{res["bf16_final"]["max_abs"]:.3g}, its RMS {float(res["target_rms"][-1]):.2g}); '
             f'fp32 rerun max {res["fp32_rerun"]["max_abs"]:.3g}')]


def one_update(net, name, cfg, t_steps, x_N, targets):
    """One SFD iteration (Alg. 5: AFS, then an Adam update per student step) of a fresh student copy
    in precision `name`: (losses, the first update's gradient, the parameter change), flattened."""
    student = copy.deepcopy(net).eval().requires_grad_(True)  # eval: dropout off, one function for both
    params = list(student.parameters())
    flat = lambda ts: torch.cat([t.detach().flatten() for t in ts])
    before, grads = flat(params).clone(), []

    def first_gradient(loss, step):  # sfd_iteration's check: after backward, before the update
        if not grads:
            grads.append(flat([p.grad if p.grad is not None else torch.zeros_like(p) for p in params]))
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)  # distill.setup's optimiser
    with precision(name):
        losses = distill.sfd_iteration(student, opt, x_N, t_steps, targets, cfg, check=first_gradient)
    return losses, grads[0], flat(params) - before


def vector_diff(a, b):
    """How far vector a is from the reference b (same_sign: where b is non-zero, the signs agree)."""
    return dict(rel_l2=((a - b).norm() / b.norm()).item(), max_abs=(a - b).abs().max().item(),
                cosine=torch.nn.functional.cosine_similarity(a, b, dim=0).item(),
                same_sign=((a.sign() == b.sign()) | (b == 0)).float().mean().item())


def first_update(ck):
    """The student's first SFD iteration in bf16 vs fp32 from the same trajectories (fp32 targets).
    Adam's first step is about lr * sign(gradient), so the update's signs are its measure."""
    cfg, t_steps, x_N, targets = ck.need('sfd', 'correctness/teacher')
    runs = {name: one_update(ck.net, p, cfg, t_steps, x_N, targets)
            for name, p in (('fp32', 'fp32'), ('fp32_rerun', 'fp32'), ('bf16', 'bf16'))}
    res = dict(losses={k: r[0] for k, r in runs.items()}, lr=cfg.lr, updates=len(runs['fp32'][0]) - cfg.afs)
    for k in ('bf16', 'fp32_rerun'):
        res[f'gradient_{k}'] = vector_diff(runs[k][1], runs['fp32'][1])
        res[f'delta_{k}'] = vector_diff(runs[k][2], runs['fp32'][2])
    ck.scan('first SFD update', *[v for r in runs.values() for v in r[1:]],
            torch.tensor([loss for r in runs.values() for loss in r[0]]))
    ck.results['correctness']['first_update_bf16_vs_fp32'] = res
    g, d = res['gradient_bf16'], res['delta_bf16']
    return [('bf16 vs fp32', f'first SFD update, batch {len(x_N)} ({res["updates"]} Adam steps)',
             f'gradient rel. L2 {g["rel_l2"]:.3g} (cosine {g["cosine"]:.4f}); update: same sign '
             f'{d["same_sign"]:.1%}, rel. L2 {d["rel_l2"]:.3g}; fp32 rerun '
             f'{res["gradient_fp32_rerun"]["rel_l2"]:.2g}')]


def unet_inputs(ck, batch):
    """One batch of inputs per size, its FLOPs and the fp32 reference output (cached)."""
    if ('x', batch) not in ck.shared:
        x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch)).to(ck.device)
        sigma = torch.full((batch,), 2.0, device=ck.device)
        ck.shared['x', batch] = (x, sigma, *bench.unet_flops(ck.net, x, sigma))
    return ck.shared['x', batch]


def unet_step(ck, variant, batch):
    """The U-Net at one variant and batch (bench.unet_variant), with the NaN scan and, compiled,
    the distance to the same variant run eagerly."""
    x, sigma, flops, ref = unet_inputs(ck, batch)
    row, out = bench.unet_variant(ck.net, x, sigma, variant, ck.device, ck.size['repeat'], ck.args.peak,
                                  flops, ref)
    prec = bench.precision_of(variant, ck.device)
    row.update(precision=prec, peak_tflops=bench.peak_tflops(ck.device, prec, ck.args.peak))
    ck.scan(f'unet {variant} {batch}', out)
    ck.shared['out', variant, batch] = out
    diff, compiled = f'max |D - D_fp32| {row["max_abs_diff"]:.2g}', 'compile' in variant
    if compiled:
        eager = ck.shared.get(('out', variant.replace('+compile', ''), batch))
        row['max_abs_diff_vs_eager'] = None if eager is None else abs_diff(out, eager)['max_abs']
        diff += '' if eager is None else f', vs eager {row["max_abs_diff_vs_eager"]:.2g}'
    ck.results['compile' if compiled else 'unet'][f'{variant}, batch {batch}'] = row
    lines = []
    for key, what in (('fwd', 'forward'), ('fwd_bwd', 'fwd+bwd')):
        frac = row[f'{key}_peak_fraction']
        frac = '' if frac is None else f' ({frac:.1%} of {prec} {row["peak_tflops"]:g})'
        first = f', first call {row[f"{key}_first_s"]:.1f} s' if compiled else ''
        lines.append((f'U-Net {what}', f'{variant}, batch {batch}', f'{row[f"{key}_img_s"]:,.0f} img/s, '
                      f'{row[f"{key}_tflops"]:.3g} TFLOP/s{frac}{fmt_mem(row[f"{key}_mem_gib"])}{first}'))
    lines[0] = (*lines[0][:2], f'{lines[0][2]}; {diff}')
    return lines


def distill_split(ck):
    """One SFD iteration timed as teacher trajectory and student steps (bench.bench_sfd)."""
    row = bench.bench_sfd(ck.net, ck.size['batch'], ck.device, ck.size['repeat'])[0]
    ck.shared['s_per_it'] = row['teacher_s'] + row['student_s']
    row['teacher_fraction'] = row['teacher_s'] / ck.shared['s_per_it']
    ck.results['distill']['split'] = row
    return [('distill split', f'one SFD iteration, batch {row["batch"]}',
             f'teacher {row["teacher_s"]:.3g} s ({row["teacher_calls"]} calls) + student '
             f'{row["student_s"]:.3g} s ({row["student_calls"]} calls and updates): '
             f'teacher {row["teacher_fraction"]:.0%}')]


def run_distill(ck, name, iterations, seconds, tick_every, compiled=False):
    """distill.distill on the check's teacher file, stopped after `iterations` (chosen from measured
    speed), with a guard: past 1.5x the planned seconds + 10 s, a tick ends the run."""
    B = ck.size['batch']
    # SFD's CIFAR-10 settings; kimg stays the paper's 200, so the lr schedule is the paper's too.
    # The one snapshot is the one at the stop (student.pt for the sampling steps).
    cfg = distill.SFDConfig(teacher=str(ck.teacher_path), batch=B, run_dir=str(ck.work / name),
                            tick_kimg=B * tick_every / 1000, snapshot_kimg=1e9, device=str(ck.device),
                            compile=compiled)
    rows, logs, t0, summary = [], [], time.perf_counter(), None

    def on_tick(row, student):
        rows.append(dict(row, wall_s=time.perf_counter() - t0))
        ck.paths.stop()
        if time.perf_counter() - t0 > 1.5 * seconds + 10:
            raise TimeoutError
    bench.peak_gib(ck.device, reset=True)
    with contextlib.suppress(TimeoutError):  # the guard above, or the hard limit
        student, summary = distill.distill(cfg, stop_at_iteration=iterations, progress=False,
                                           log=logs.append, on_tick=on_tick)
        ck.scan(f'{name}: student weights', *student.parameters())
    ck.scan(f'{name}: losses', torch.tensor([v for r in rows for v in r['loss_per_step']]))
    rates = [r['img_per_s'] for r in rows[1:]] or [r['img_per_s'] for r in rows]  # the first: warm-up
    res = dict(batch=B, iterations=rows[-1]['iteration'] if rows else 0, wall_s=time.perf_counter() - t0,
               img_s=sorted(rates)[len(rates) // 2], ticks=rows, log=logs, summary=summary,
               peak_mem_gib=bench.peak_gib(ck.device))
    if summary is None:
        raise TimeoutError(f'stopped at iteration {res["iterations"]} of {iterations} after '
                           f'{res["wall_s"]:.0f} s (planned: {seconds:.0f} s)')
    return res


def distill_step(ck):
    """The real run: about distill_seconds of SFD at batch 128; kimg/s and the projection."""
    seconds = ck.args.distill_seconds or ck.size['distill_seconds']
    iterations = max(ck.size['min_iters'], round(seconds / ck.need('s_per_it', 'distill/split')))
    ck.paths.start()
    try:
        res = run_distill(ck, 'run', iterations, seconds, ck.size['tick_every'])
    finally:
        ck.paths.stop()
    ck.shared['student_path'] = ck.work / 'run' / 'student.pt'
    kimg, n = distill.SFDConfig().kimg, res['iterations']
    res.update(kimg_s=res['img_s'] / 1000, paper_kimg=kimg, paper_a100_hours=SFD_A100_HOURS,
               teacher_nfe_per_it=res['summary']['teacher_nfe'] / n,
               student_calls_per_it=res['summary']['student_calls'] / n)
    res['projected_hours'] = kimg / res['kimg_s'] / 3600
    ck.results['distill']['run'] = res
    split = ck.results['distill'].get('split', {}).get('teacher_fraction')
    split = '' if split is None else f'; teacher {split:.0%} / student {1 - split:.0%}'
    return [('distill.distill', f'SFD 2 NFE + AFS, batch {res["batch"]}, {n} it, {res["wall_s"]:.0f} s',
             f'{res["kimg_s"]:.3g} kimg/s{split}{fmt_mem(res["peak_mem_gib"])}'),
            ('distill projection', f"the paper's {kimg:g} kimg",
             f'{res["projected_hours"]:.3g} hours here; SFD reports {SFD_A100_HOURS} A100-hours')]


def student_path(ck):
    """The distilled student's file or, that run missing, SFD's initial student: the teacher with
    the student's recipe (Alg. 4: psi = theta), which costs the same per image."""
    if 'student_path' not in ck.shared:
        cfg, path = distill.SFDConfig(), ck.work / 'student-init.pt'
        models.save_model(path, ck.net, sampling=distill.sampling_recipe(cfg, ck.net), method='sfd',
                          teacher=str(ck.teacher_path), shape=[3, 32, 32])
        ck.shared['student_path'] = path
    return ck.shared['student_path']


def sample_step(ck, who):
    """sample.generate images/s: the student's 2 NFE, or the teacher's EDM Heun at 35 NFE."""
    path = student_path(ck) if who == 'student' else ck.teacher_path
    net, meta = models.load(path, ck.device)
    plan = sample.make_plan(net, meta['sampling'])
    n, b = ck.size[f'{who}_images'], ck.size['sample_batch']
    gen = lambda seeds: sample.generate(net, seeds, meta['sampling'], batch=b, device=ck.device,
                                        progress=False, raw=True)
    gen(list(range(min(b, n))))  # warm-up: cuDNN's autotuning
    bench.peak_gib(ck.device, reset=True)
    t0 = time.perf_counter()
    x = gen(list(range(n)))  # ends on the CPU: synchronised
    row = dict(model=who, file=path.name, solver=plan.solver, nfe=plan.nfe, images=n, batch=b,
               img_s=n / (time.perf_counter() - t0), peak_mem_gib=bench.peak_gib(ck.device))
    ck.scan(f'samples ({who})', x)
    if who == 'student':
        ck.shared['student_images'] = sample.to_uint8(x)
    ck.results['sampling'][who] = row
    return [('sample.generate', f'{who} ({path.name}), {plan.solver} {plan.nfe} NFE, batch {b}',
             f'{row["img_s"]:,.0f} img/s{fmt_mem(row["peak_mem_gib"])}')]


def fid_step(ck):
    """FID feature extraction of the student's samples (Inception-v3, random weights: same cost)."""
    images = ck.shared.get('student_images')
    if images is None:
        images = torch.randint(0, 256, (ck.size['student_images'], 3, 32, 32), dtype=torch.uint8)
    row = bench.bench_fid(ck.size['fid_batch'], ck.device, ck.size['repeat'], 0, images)[0]
    ck.results['fid'] = row
    row['images'] = len(images)
    ck.results['correctness']['non_finite']['FID features'] = row['nonfinite']
    return [('FID features', f'{len(images)} images, batch {row["batch"]}, resized to 299x299',
             f'{row["img_s"]:,.0f} img/s ({row["gflop_per_img"]:.3g} GFLOP/img)')]


def compile_distill(ck):
    """distill.py's compile path (--compile true): a short run; its first iteration compiles."""
    res = run_distill(ck, 'run-compile', ck.size['compile_iters'], 240.0, 1, compiled=True)
    eager = ck.results['distill'].get('run')
    res.update(s_per_it=ck.size['batch'] / res['img_s'], first_iteration_s=res['ticks'][0]['wall_s'],
               speedup_vs_eager=res['img_s'] / eager['img_s'] if eager else None)
    ck.results['compile']['distill'] = res
    speed = f', {res["speedup_vs_eager"]:.2f}x eager' if eager else ''
    return [('torch.compile', f'distill.distill --compile true, batch {res["batch"]}, {res["iterations"]} it',
             f'first iteration {res["first_iteration_s"]:.1f} s, then {res["s_per_it"]:.3g} s/it{speed}')]


def compile_sample(ck):
    """sample.py's compile path: its command line with --compile on the student, pixels vs eager."""
    path, b = student_path(ck), ck.size['sample_batch']
    n = min(2 * b, ck.size['student_images'])
    eager = ck.need('student_images', 'sample/student')[:n]
    t0 = time.perf_counter()
    x = sample.main(['--model', str(path), '--seeds', f'0-{n - 1}', '--batch', str(b), '--compile',
                     '--npz', str(ck.work / 'compiled.npz'), '--quiet', '--device', str(ck.device)])
    diff = (x.int() - eager.int()).abs()
    res = ck.results['compile']['sample'] = dict(
        images=n, batch=b, wall_s=time.perf_counter() - t0, max_pixel_diff=diff.max().item(),
        pixels_differing=(diff > 0).float().mean().item())
    return [('torch.compile', f'sample.py --compile, student, {n} images',
             f'{res["wall_s"]:.1f} s with compilation; pixels vs eager: max diff {res["max_pixel_diff"]}, '
             f'{res["pixels_differing"]:.2%} differ')]


def verdicts(ck):
    """Whether the README's code paths ran as it says (the hooks of the distillation run, the compile
    steps' dynamo counts), and the NaN/inf scan's verdict. Runs last, whatever ran before."""
    cuda, seen = ck.device.type == 'cuda', ck.paths.seen
    observed = lambda role, key: sorted(seen.get(role, {}).get(key, ()), key=str)
    both = lambda key: {role: observed(role, key) for role in ('teacher', 'student')}
    expect = [('autocast bf16 (CUDA only)', [cuda], both('autocast')),
              ('network F in bf16 (CUDA only)', ['torch.bfloat16' if cuda else 'torch.float32'],
               both('network_dtype')),
              ('preconditioning, D, in float32', ['torch.float32'], both('output_dtype')),
              ('teacher under inference_mode', [True], {'teacher': observed('teacher', 'inference_mode')}),
              ('student outside inference_mode', [False], {'student': observed('student', 'inference_mode')})]
    paths, lines = {}, []
    for name, want, got in expect:
        paths[name] = dict(expected=want, **got, ok=all(v == want for v in got.values()))
        what = ', '.join(f'{k} {v}' for k, v in got.items()) if seen else 'distill/run did not run'
        lines.append(('code path', f'{name} (distill.distill)', ('yes: ' if paths[name]['ok'] else 'NO: ')
                      + what))
    for name, *_ in steps(ck.size):
        if name.startswith('compile/'):
            st = ck.results['steps'].get(name, dict(status='not run'))
            want, ok = GRAPHS_EXPECTED[name.split('/')[1]], st['status'] == 'ok'
            paths[f'torch.compile: {name}'] = dict(status=st['status'], ok=ok, graphs_expected=want,
                                                   graphs=st.get('dynamo_graphs'),
                                                   graph_breaks=st.get('graph_breaks'))
            lines.append(('code path', f'torch.compile: {name}', f'yes; {st["dynamo_graphs"]} graphs ({want} '
                          f'expected), {st["graph_breaks"]} graph breaks' if ok else f'NO: {st["status"]}'))
    ck.results['correctness']['code_paths'] = paths
    scanned = ck.results['correctness']['non_finite']
    bad = [k for k, v in scanned.items() if v]
    return lines + [('NaN/inf scan', f'{len(scanned)} outputs', 'NON-FINITE: ' + ', '.join(bad) if bad
                     else 'all finite')]


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def hard_limit(ck, seconds):
    """SIGALRM `seconds` after the check began: the step then running stops with TimeoutError (the budget
    then skips the rest). Only where signals work: the main thread of a POSIX process."""
    if not hasattr(signal, 'setitimer') or threading.current_thread() is not threading.main_thread():
        yield
        return

    def ring(sig, frame):
        if ck.in_step:
            raise TimeoutError(f'hard time limit of {seconds:.0f} s reached')
    old = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, max(seconds - (time.perf_counter() - ck.t0), 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


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
            ('compile/distill', 60, compile_distill), ('compile/sample', 60, compile_sample),
            (f'compile/unet/{b1}', 100, unet_step, COMPILED, b1)]


def meta(ck):
    """The device, the software and the settings of this check."""
    cuda, dev = ck.device.type == 'cuda', ck.device
    return dict(device=torch.cuda.get_device_name(dev) if cuda else 'CPU', dry_run=ck.args.dry_run,
                torch=torch.__version__, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                memory_gib=torch.cuda.get_device_properties(dev).total_memory / 2 ** 30 if cuda else None,
                cudnn_allow_tf32=torch.backends.cudnn.allow_tf32, threads=torch.get_num_threads(),
                matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32, budget_s=ck.budget,
                hard_limit_s=ck.budget + HARD_MARGIN, sizes=ck.size, peak_override=ck.args.peak,
                argv=sys.argv[1:], note='dry run: tiny sizes on a CPU, its numbers measure nothing'
                if ck.args.dry_run else 'random weights: speed and numerics, not sample quality')


def main(argv=None):
    """The command line (see the module docstring); returns the results it wrote."""
    p = cli.parser(__doc__)
    p.add_argument('--dry-run', action='store_true', help='the same steps on a CPU at tiny sizes (< 1 min)')
    p.add_argument('--out', default='gpu_check.json', help='write the results here (JSON)')
    p.add_argument('--device', default='auto', help='auto: cuda (the dry run: cpu)')
    p.add_argument('--budget', type=float, help='seconds in which steps may start (GPU 390, dry run '
                   f'240); a step still running {HARD_MARGIN:g} s later is interrupted')
    p.add_argument('--distill-seconds', type=float, help='length of the distill.distill run (GPU 120)')
    p.add_argument('--peak', type=float, help='device peak TFLOP/s for every row (default: bench.PEAKS)')
    p.add_argument('--only', type=lambda s: [v for v in s.split(',') if v],
                   help='comma-separated step names or prefixes, e.g. unet,distill (setup always runs)')
    p.add_argument('--work-dir', help='keep the teacher, runs and samples here (default: a temporary folder)')
    args = p.parse_args(argv)
    device = cli.device('cpu' if args.dry_run and args.device == 'auto' else args.device)
    if device.type != 'cuda' and not args.dry_run:
        raise ValueError(f'--device {args.device}: no CUDA GPU here, and this check measures one; '
                         'use --dry-run for its tiny CPU version')
    for v, flag in ((args.budget, '--budget'), (args.distill_seconds, '--distill-seconds'),
                    (args.peak, '--peak')):
        if v is not None and not (math.isfinite(v) and v > 0):
            raise ValueError(f'{flag} {v}: must be a positive number')
    sample.check_output(args.out, '--out')
    ck = Check(args, device)
    ck.results['meta'] = meta(ck)
    try:
        with compile_backend(ck.size['backend']), hard_limit(ck, ck.budget + HARD_MARGIN):
            for name, need_s, fn, *fn_args in steps(ck.size):
                ck.run(name, need_s, fn, *fn_args)
                if ck.results['steps'].get('setup', {}).get('status') != 'ok':
                    break  # nothing runs without the network
        ck.lines += verdicts(ck)
    finally:
        ck.paths.stop()
        if not args.work_dir:
            shutil.rmtree(ck.work, ignore_errors=True)
    ck.write()
    m = ck.results['meta']
    title = (f'GPU check: {m["device"]}, torch {m["torch"]}, {m["elapsed_s"]:.0f} s'
             + (' (DRY RUN: tiny sizes on a CPU, not measurements)' if args.dry_run else ''))
    lines = [dict(bench=title, check=c, setting=s, result=r) for c, s, r in ck.lines]
    print(bench.table(lines, text_left=True) + f'\n\nwrote {args.out}')
    return ck.results


if __name__ == '__main__':
    cli.run(main)
