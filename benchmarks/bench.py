"""Speed of the hot paths: U-Net forward/backward, one SFD iteration, sampling, FID features.

Prints a table and writes JSON. On a GPU it runs the full CIFAR-10 sizes; on a CPU it runs
reduced sizes (a quarter-width DDPM++, small batches: the table says which) in a few minutes.
benchmarks/gpu_check.py builds its measurements from the functions here.

    python benchmarks/bench.py                       # auto device, sizes for it
    python benchmarks/bench.py --device cuda --compile --json bench.json
    python benchmarks/bench.py --full                # CIFAR-10 sizes even on a CPU (slow)

FLOPs come from torch.utils.flop_counter (one multiply-add = 2 FLOPs); the achieved fraction of
peak uses the device's published dense peak for the precision used (PEAKS below), or --peak.
"""
import argparse
import contextlib
import copy
import json
import math
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import distill  # noqa: E402
import fid  # noqa: E402
import solvers  # noqa: E402
import unet  # noqa: E402

# Published dense peaks in TFLOP/s (no sparsity) from NVIDIA's data sheets: bf16 and tf32 tensor
# cores, plain fp32. Matched in order against torch.cuda.get_device_name (case-insensitive), so
# the PCIe and NVL boards come before the SXM name they contain ("NVIDIA H100 80GB HBM3" is SXM).
PEAKS = (('H100 PCIe', {'bf16': 756.0, 'tf32': 378.0, 'fp32': 51.0}),
         ('H100 NVL', {'bf16': 835.0, 'tf32': 418.0, 'fp32': 60.0}),
         ('H200 NVL', {'bf16': 835.0, 'tf32': 418.0, 'fp32': 60.0}),
         ('H100', {'bf16': 989.0, 'tf32': 495.0, 'fp32': 67.0}),
         ('H200', {'bf16': 989.0, 'tf32': 495.0, 'fp32': 67.0}),
         ('A100', {'bf16': 312.0, 'tf32': 156.0, 'fp32': 19.5}))
DDPMPP = dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard',
              decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1],
              model_channels=128, channel_mult=[2, 2, 2], augment_dim=9, dropout=0.13)


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def peak_gib(device, reset=False):
    """Peak GiB allocated on a CUDA device since the last reset (None on a CPU); `reset` starts anew."""
    if device.type != 'cuda':
        return None
    if reset:
        torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.max_memory_allocated(device) / 2 ** 30


def measure(fn, device, repeat):
    """(median seconds of `repeat` calls after one warm-up call, the warm-up's seconds (it holds
    compilation and cuDNN's autotuning), peak GiB allocated by the timed calls; None on a CPU)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - t0
    peak_gib(device, reset=True)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], first, peak_gib(device)


def nonfinite(*xs):
    """How many NaN/inf values the tensors (or arrays) hold."""
    return sum(int((~torch.isfinite(torch.as_tensor(x).float())).sum()) for x in xs)


def abs_diff(a, b):
    """Max and mean |a - b| over every element."""
    d = (a.float() - b.float()).abs()
    return dict(max_abs=d.max().item(), mean_abs=d.mean().item())


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


def timed(fn, device, repeat):
    """Median seconds of `repeat` calls after one warm-up call."""
    return measure(fn, device, repeat)[0]


def flops_of(fn):
    with FlopCounterMode(display=False) as counter:
        out = fn()
    return counter.get_total_flops(), out


def precision_of(variant, device):
    """The peak a variant is compared with: bf16 under autocast; else tf32 where cuDNN runs the
    convolutions (nearly all the U-Net's FLOPs) in TF32, PyTorch's default on CUDA; else fp32."""
    if 'bf16' in variant:
        return 'bf16'
    return 'tf32' if device.type == 'cuda' and torch.backends.cudnn.allow_tf32 else 'fp32'


def peak_tflops(device, precision, override):
    if override:
        return override
    name = torch.cuda.get_device_name(device).lower() if device.type == 'cuda' else ''
    return next((p[precision] for key, p in PEAKS if key.lower() in name), None)


def make_unet(channels, device, seed=0, **kwargs):
    """EDM's CIFAR-10 DDPM++ (the SFD teacher's architecture), random weights at unit gain: every
    weight matrix and kernel drawn from N(0, 1/fan_in). EDM initialises its output layers near zero
    (D = c_skip x at first), which would make a random network trivial; at unit gain F's output is
    O(1), as a trained network's, so precision differences and NaN checks see realistic magnitudes."""
    torch.manual_seed(seed)
    net = unet.EDMPrecond(img_resolution=32, img_channels=3,
                          **dict(DDPMPP, model_channels=channels, **kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
    return net.to(device)


def unet_flops(net, x, sigma):
    """FLOPs per image of D(x; sigma) forward (eval) and forward + backward (train), and the fp32
    eval output (the reference every variant is compared with)."""
    net.eval()
    with torch.no_grad():
        fwd, ref = flops_of(lambda: net(x, sigma))
    net.train()
    fwd_bwd, _ = flops_of(lambda: net(x, sigma).square().mean().backward())
    net.eval().zero_grad(set_to_none=True)
    return {'fwd': fwd / len(x), 'fwd_bwd': fwd_bwd / len(x)}, ref


def unet_variant(net, x, sigma, variant, device, repeat, peak_override, flops, ref, backend='inductor'):
    """One row of (a) for one variant and batch, and the variant's eval output.

    Each variant is a speed-up that keeps the numbers (tests/test_unet.py checks channels_last;
    bf16 is EDM's mixed precision, its preconditioning stays in float32); the row says how far
    its output is from the fp32 reference `ref`. '+compile' variants use torch.compile's `backend`."""
    model = net
    xin = x.to(memory_format=torch.channels_last) if 'channels_last' in variant else x
    if 'channels_last' in variant:
        model = copy.deepcopy(net).to(memory_format=torch.channels_last)
    if 'compile' in variant:
        model = torch.compile(model, dynamic=False, backend=backend)  # one static graph per batch size
    amp = lambda: solvers.autocast(device, 'bf16' if 'bf16' in variant else 'fp32')  # the training code's
    out = []

    def fwd():
        with torch.inference_mode(), amp():
            out[:] = [model(xin, sigma)]

    def fwd_bwd():
        with amp():
            model(xin, sigma).float().square().mean().backward()
    net.eval()
    t_f, first_f, mem_f = measure(fwd, device, repeat)
    net.train()
    t_fb, first_fb, mem_fb = measure(fwd_bwd, device, repeat)
    net.eval().zero_grad(set_to_none=True)
    precision = precision_of(variant, device)
    peak, batch = peak_tflops(device, precision, peak_override), len(x)
    row = dict(bench='unet', variant=variant, batch=batch, gflop_per_img=flops['fwd'] / 1e9,
               fwd_img_s=batch / t_f, fwd_bwd_img_s=batch / t_fb, precision=precision, peak_tflops=peak)
    for key, t in (('fwd', t_f), ('fwd_bwd', t_fb)):
        row[f'{key}_tflops'] = flops[key] * batch / t / 1e12
        row[f'{key}_peak_fraction'] = row[f'{key}_tflops'] / peak if peak else None
    row.update(fwd_first_s=first_f, fwd_bwd_first_s=first_fb, fwd_mem_gib=mem_f, fwd_bwd_mem_gib=mem_fb,
               max_abs_diff=abs_diff(out[0], ref)['max_abs'])
    return row, out[0]


def bench_unet(net, batches, device, variants, repeat, peak_override):
    """(a) images/s of D(x; sigma) forward (inference) and forward + backward (training)."""
    rows = []
    for batch in batches:
        x = torch.randn(batch, 3, 32, 32, device=device)
        sigma = torch.full((batch,), 2.0, device=device)
        flops, ref = unet_flops(net, x, sigma)  # the same for every variant
        rows += [unet_variant(net, x, sigma, v, device, repeat, peak_override, flops, ref)[0]
                 for v in variants]
    return rows


def bench_sfd(net, batch, device, repeat):
    """(b) one SFD iteration (CIFAR-10 defaults: DPM-Solver++(3M) teacher, K = 4, 2 NFE + AFS),
    split into teacher trajectory and student steps, with the counted network calls."""
    cfg = distill.SFDConfig()
    teacher = copy.deepcopy(net).eval().requires_grad_(False)
    student = copy.deepcopy(net).train().requires_grad_(True)
    calls = {'teacher': 0, 'student': 0}

    def counting(model, key):
        def D(x, t, **c):
            calls[key] += 1
            return model(x, t, **c)
        return D
    opt = torch.optim.Adam(student.parameters(), lr=cfg.lr)
    # The student's NFE + AFS grid and the teacher's K-times refinement of it (SFD Alg. 4, line 5).
    t_steps = distill.student_schedule(cfg, cfg.nfe)
    N = len(t_steps) - 1
    t_teacher = solvers.time_schedule(cfg.K * N, cfg.t_min, cfg.t_max)
    x_N = cfg.t_max * torch.randn(batch, 3, 32, 32, device=device)
    T, S = counting(teacher, 'teacher'), counting(student, 'student')
    targets = distill.teacher_targets(T, x_N, t_teacher, cfg.K, cfg.teacher_solver)
    t_teach = timed(lambda: distill.teacher_targets(T, x_N, t_teacher, cfg.K, cfg.teacher_solver), device,
                    repeat)
    t_stud = timed(lambda: distill.sfd_iteration(S, opt, x_N, t_steps, targets, cfg), device, repeat)
    # Calls per iteration: the teacher ran repeat + 1 times (warm-up) plus once for `targets`, the
    # student repeat + 1 times; the counts must match SFD's accounting (tests/test_bench.py).
    runs = repeat + 2
    return [dict(bench='sfd_iteration', batch=batch, teacher_s=t_teach, student_s=t_stud,
                 teacher_fraction=t_teach / (t_teach + t_stud), teacher_calls=calls['teacher'] // runs,
                 student_calls=calls['student'] // (repeat + 1), img_s=batch / (t_teach + t_stud))]


def bench_sampling(net, batch, nfe, device, repeat):
    """(c) images/s of each solver at a fixed NFE (EDM's schedule, t_min = 0.002)."""
    rows = []
    z = torch.randn(batch, 3, 32, 32, device=device)
    for name in solvers.SOLVERS:
        # One-step solvers end with EDM's Euler step to 0; multistep ones stop at t_min (SFD's code).
        recipe = solvers.Recipe(name, nfe, ends_at_zero=name in ('heun', 'dpm2', 'euler'))
        try:
            solvers.schedule_for(recipe)
        except ValueError:
            recipe.nfe = nfe + 1  # two-call solvers need an odd count when ending at zero
        with torch.inference_mode():
            t = timed(lambda r=recipe: solvers.sample_with(net, z, r), device, repeat)
        rows.append(dict(bench='sampling', solver=name, nfe=recipe.nfe, batch=batch, img_s=batch / t))
    return rows


def bench_fid(batch, device, repeat, workers, images=None):
    """(d) FID feature extraction images/s (the Inception network, random weights: same cost) of
    `images` (uint8 [N, 3, H, W]; default one batch of random 32x32 ones) in batches of `batch`."""
    model = fid.InceptionV3().to(device)
    if images is None:
        images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8)
    out = []
    t = timed(lambda: out.__setitem__(slice(None), fid.compute_features(
        images, model=model, batch_size=batch, num_workers=workers, progress=False)), device, repeat)
    flops, _ = flops_of(lambda: model(images[:1].to(device)))
    return [dict(bench='fid_features', batch=batch, img_s=len(images) / t, gflop_per_img=flops / 1e9,
                 nonfinite=nonfinite(*out))]


def dynamo_counts():
    """(graphs dynamo has compiled, graph breaks it has met) so far in this process."""
    from torch._dynamo.utils import counters
    return counters['stats']['unique_graphs'], sum(counters['graph_break'].values())


class Steps:
    """Named steps run one after another, each in its own try block (a failure is recorded, and the
    next step still runs), under a time budget: a step that no longer fits is skipped, and one still
    running `margin` seconds past the budget is interrupted (inside `hard_limit()`). `status` holds
    each step's outcome, seconds and dynamo graphs; `after()` runs after every step (rewrite a file)."""

    def __init__(self, budget=math.inf, margin=45.0, after=None):
        self.budget, self.margin, self.after = budget, margin, after or (lambda: None)
        self.status, self.in_step, self.t0 = {}, False, time.perf_counter()

    def run(self, name, need_s, fn, *args):
        """fn(*args), or None when the step is skipped or fails (self.status[name] says which)."""
        t0, (graphs, breaks), out = time.perf_counter(), dynamo_counts(), None
        left = self.budget - (t0 - self.t0)
        if left < need_s:
            st = dict(status='skipped', reason=f'time budget: {max(left, 0):.0f} s left, needs about '
                      f'{need_s:.0f} s')
        else:
            self.in_step = True
            try:
                out, st = fn(*args), dict(status='ok')
            except Exception as e:  # e.g. out of memory: what the step held is freed for the next
                st = dict(status='failed', error=f'{type(e).__name__}: {e}'.splitlines()[0][:300],
                          traceback=traceback.format_exc(limit=-4))
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            finally:
                self.in_step = False
        st.update(seconds=time.perf_counter() - t0, dynamo_graphs=dynamo_counts()[0] - graphs,
                  graph_breaks=dynamo_counts()[1] - breaks)
        self.status[name] = st
        print(f'[{time.perf_counter() - self.t0:5.0f} s] {name}: {st["status"]} ({st["seconds"]:.1f} s)',
              flush=True)
        self.after()
        return out

    @contextlib.contextmanager
    def hard_limit(self):
        """SIGALRM at budget + margin: the step then running stops with TimeoutError. Only where
        signals work (the main thread of a POSIX process) and the budget is finite."""
        limit = self.budget + self.margin
        if (not math.isfinite(limit) or not hasattr(signal, 'setitimer')
                or threading.current_thread() is not threading.main_thread()):
            yield
            return

        def ring(sig, frame):
            if self.in_step:
                raise TimeoutError(f'hard time limit of {limit:.0f} s reached')
        old = signal.signal(signal.SIGALRM, ring)
        signal.setitimer(signal.ITIMER_REAL, max(limit - (time.perf_counter() - self.t0), 0.01))
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)


def _cell(v):
    return '-' if v is None else f'{v:.4g}' if isinstance(v, float) else str(v)


def _line(values, widths, text_left):
    """One table row: cells two spaces apart, numbers on the right, text on the left if asked."""
    cells = [_cell(v).ljust(w) if text_left and isinstance(v, str) else _cell(v).rjust(w)
             for v, w in zip(values, widths, strict=True)]
    return '  '.join(cells).rstrip()


def table(rows, text_left=False):
    """One aligned text table per benchmark (the same rows go to --json); `text_left` aligns
    text cells on the left (numbers always on the right)."""
    out = []
    for bench in dict.fromkeys(r['bench'] for r in rows):
        part = [[v for k, v in r.items() if k != 'bench'] for r in rows if r['bench'] == bench]
        cols = [k for k in next(r for r in rows if r['bench'] == bench) if k != 'bench']
        widths = [max(len(c), *(len(_cell(r[i])) for r in part)) for i, c in enumerate(cols)]
        out += [f'\n{bench}', _line(cols, widths, text_left)] + [_line(r, widths, text_left) for r in part]
    return '\n'.join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--full', action='store_true', help='CIFAR-10 sizes even on a CPU')
    p.add_argument('--channels', type=int, help='U-Net width (default: 128 full size, 32 reduced)')
    p.add_argument('--batches', type=int, nargs='+', help='U-Net batch sizes (default: by device)')
    p.add_argument('--small-batch', type=int,
                   help='batch of (b)-(d) (default: 128/256/250 on a GPU, 4/8/8 on a CPU)')
    p.add_argument('--compile', action='store_true', help='also time torch.compile variants')
    p.add_argument('--peak', type=float, help='device peak TFLOP/s for the fraction column')
    p.add_argument('--repeat', type=int, default=3)
    p.add_argument('--json', help='write the rows here')
    args = p.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == 'cuda'
    # GPU: EDM's CIFAR-10 sizes. CPU: a quarter-width U-Net and small batches, a few minutes in all.
    full = args.full or gpu
    channels = args.channels or (128 if full else 32)
    batches = args.batches or ([32, 128, 512] if gpu else ([1, 8] if full else [4, 16]))
    variants = ['fp32', 'channels_last'] + (['bf16', 'bf16+channels_last'] if gpu else [])
    variants += [v + '+compile' for v in variants] if args.compile else []
    torch.manual_seed(0)
    net = make_unet(channels, device).eval()
    width = 'CIFAR-10 size' if channels == 128 else 'reduced width'
    name = torch.cuda.get_device_name(device) if gpu else 'CPU'
    print(f'device: {name} ({torch.get_num_threads()} threads), '
          f'DDPM++ with model_channels={channels} ({width}), '
          f'{sum(p.numel() for p in net.parameters()) / 1e6:.1f}M parameters')
    small = lambda gpu_batch, cpu_batch: args.small_batch or (gpu_batch if gpu else cpu_batch)
    rows = []  # each benchmark a step: one that fails is reported, the others still run
    steps = Steps(after=lambda: args.json and Path(args.json).write_text(json.dumps(plain(rows), indent=1)))
    for name, fn, *fn_args in [('unet', bench_unet, net, batches, device, variants, args.repeat, args.peak),
                               ('sfd_iteration', bench_sfd, net, small(128, 4), device, args.repeat),
                               ('sampling', bench_sampling, net, small(256, 8), 10, device, args.repeat),
                               ('fid_features', bench_fid, small(250, 8), device, args.repeat, 2)]:
        steps.run(name, 0, lambda f, *a: rows.extend(f(*a)), fn, *fn_args)  # rows grow inside the step
    print(table(rows) + ''.join(f'\n{n}: FAILED {st["error"]}' for n, st in steps.status.items()
                                if 'error' in st))
    return rows


if __name__ == '__main__':
    main()
