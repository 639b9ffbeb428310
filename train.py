"""The one training loop: every network this project trains goes through `fit`.

SFD and its family (distill_run.py), Meng et al.'s two stages (guided_pd_run.py) and the toy and
image teachers (toy.py) differ only in what one *iteration* does. Everything around it is here,
once:

    iterations   `Job.iteration(loop)` draws its batch from `loop.gen` and makes its optimiser
                 updates through `loop.update` (SFD makes one per student step, Alg. 4 line 6)
    updates      gradient accumulation over micro-batches (DDP all-reduces once, on the last),
                 a finite check of the loss and gradients, optional gradient-norm clipping
    after each   an optional EMA of the weights, the lr of the next iteration from a schedule
    processes    torchrun + DistributedDataParallel: every random draw is made for the global
                 batch from one generator shared by all ranks, each rank takes its slice
    precision    'auto' (bf16 autocast on CUDA, float32 elsewhere), 'fp32' or 'bf16';
                 torch.compile with a named backend, opt-in
    records      a progress bar, one stats.jsonl row per tick, snapshots (the job's student file
                 and training-state.pt) every so often, at the end and on SIGINT / SIGTERM
    resume       from training-state.pt bit for bit: weights, Adam, EMA, counters, the shared
                 generator and every rank's torch random state

    python distill.py --teacher toy:ring --kimg 2     # one of its users; see distill_run.py
"""

import contextlib
import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Union

import torch
import torch.distributed as dist
from tqdm import tqdm

import cli
import data
import solvers

STATE_FILE = 'training-state.pt'


@dataclass(frozen=True)
class Settings:
    """How long and how to train; the method's own settings stay in its job."""
    iterations: int                      # the loop ends after this many (a resumed run may add more)
    batch: int                           # samples per iteration over all processes (kimg counts them)
    lr: Union[float, Callable[[int], float]]  # a number, or iteration -> lr (set before the iteration)
    device: str = 'auto'
    seed: int = 0                        # the shared generator's seed
    ema: Union[None, float, Callable[[int], float]] = None  # decay per iteration (None: no EMA)
    grad_clip: float = 0.0               # max gradient norm before each update (0: off)
    tick_kimg: float = 1.0               # one stats.jsonl row per tick
    snapshot_kimg: float = 50.0          # snapshot every so often (run folders only)
    precision: str = 'auto'              # auto | fp32 | bf16 (autocast inside the job's calls)
    compile: bool = False                # torch.compile the trained network (fused kernels, same numerics)
    compile_backend: str = 'inductor'
    desc: str = 'train'                  # the progress bar's label
    unit: str = 'img'                    # the progress bar counts samples ('img') or iterations ('it')
    progress: bool = True
    distributed: bool = True             # False: this process alone, even under torchrun (a teacher
                                         # trained by rank 0 while the others wait)


class Job(Protocol):
    """What a training method gives the loop (distill_run.py, guided_pd_run.py and toy.py have one)."""
    student: torch.nn.Module             # the network trained (what the files hold)
    optimizer: torch.optim.Optimizer

    def iteration(self, loop: 'Loop') -> list:
        """One iteration: its losses (a list, e.g. one per student step), updates made via loop.update."""

    def save(self, net: torch.nn.Module, loop: 'Loop') -> Path:
        """Write the trained network (the EMA copy when there is one) as the method's file; its path."""


def _call(v, it):
    return v(it) if callable(v) else v


# ---------------------------------------------------------------------------------------------
# The loop's state, and the updates a job makes through it
# ---------------------------------------------------------------------------------------------

class Loop:
    """A running fit: counters, the shared generator, the wrapped network and the update step."""

    def __init__(self, job, settings, run_dir):
        self.job, self.s, self.run_dir = job, settings, run_dir and Path(run_dir)
        self.rank, self.world = (cli.rank(), cli.world_size()) if settings.distributed else (0, 1)
        self.device = next(job.student.parameters()).device
        self.it = self.nimg = 0
        self.gen = torch.Generator().manual_seed(settings.seed)  # every random draw, for the global batch
        self.model = job.student  # what the job calls: DDP-wrapped and/or compiled below
        self.ema = None
        if settings.ema is not None:
            self.ema = copy.deepcopy(job.student).eval().requires_grad_(False)

    @property
    def part(self):
        """This rank's slice [lo, hi) of the global batch: a G-process run sees exactly the
        samples of a 1-process run with the same total batch."""
        return (self.rank * self.s.batch // self.world, (self.rank + 1) * self.s.batch // self.world)

    def autocast(self):
        """The precision the job's forward passes run in."""
        return solvers.autocast(self.device, self.s.precision)


    def before_step(self, loss, step=None):
        """Called right before every optimiser update: a non-finite loss or gradient stops the run,
        saying where; then the gradient-norm clip, if any."""
        params = [p for p in self.job.student.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in params])) if params else 0
        if not (torch.isfinite(torch.as_tensor(loss)) and torch.isfinite(torch.as_tensor(norm))):
            where = '' if step is None else f', student step {step}'
            raise FloatingPointError(f'non-finite loss or gradient at iteration {self.it}{where}, '
                                     f'(loss {float(loss):g}); lower --lr or check the teacher')
        if self.s.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.job.student.parameters(), self.s.grad_clip)

    def update(self, micro_losses, step=None):
        """One optimiser update from the losses of R micro-batches (callables, each returning a
        loss already divided as the job wants the sum to be): gradients summed, DDP's all-reduce
        once after the last; returns the summed loss."""
        opt = self.job.optimizer
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for r, loss_fn in enumerate(micro_losses):
            with self.no_sync(last=r == len(micro_losses) - 1):
                loss = loss_fn()
                loss.backward()
            total = total + loss.detach()
        self.before_step(total, step)
        opt.step()
        return total

    def no_sync(self, last=True):
        """DDP: no gradient all-reduce on the micro-batches before the last."""
        sync = last or not hasattr(self.model, 'no_sync')
        return contextlib.nullcontext() if sync else self.model.no_sync()

    def state(self):
        """Everything a resumed run needs (collective under DDP: every rank's torch random state)."""
        rngs = [torch.get_rng_state()]
        if self.world > 1:
            rngs = [torch.empty_like(rngs[0]) for _ in range(self.world)]
            dist.all_gather(rngs, torch.get_rng_state())
        st = dict(student=self.job.student.state_dict(), optimizer=self.job.optimizer.state_dict(),
                  iteration=self.it, nimg=self.nimg, generator=self.gen.get_state(), torch_rng=rngs)
        if self.ema is not None:
            st['ema'] = self.ema.state_dict()
        return st

    def load_state(self, st):
        """Continue from a state written by `state` (before DDP wrapping and compiling)."""
        self.job.student.load_state_dict(st['student'])
        self.job.optimizer.load_state_dict(st['optimizer'])
        if self.ema is not None:
            self.ema.load_state_dict(st['ema'] if 'ema' in st else st['student'])
        self.it, self.nimg = st['iteration'], st['nimg']
        self.gen.set_state(st['generator'])
        torch.set_rng_state(st['torch_rng'][self.rank])


# ---------------------------------------------------------------------------------------------
# Records: stats rows, snapshots
# ---------------------------------------------------------------------------------------------

class Ticks:
    """Collects each iteration's losses and writes one stats.jsonl row per tick (and at the end)."""

    def __init__(self, loop, stats, on_tick):
        self.loop, self.stats, self.on_tick = loop, stats, on_tick
        self.losses, self.start, self.nimg = [], time.time(), loop.nimg
        every = max(int(loop.s.snapshot_kimg * 1000), 1)
        self.next_snapshot = (loop.nimg // every + 1) * every

    def add(self, losses, done):
        loop = self.loop
        self.losses.append(losses)
        if not done and loop.nimg - self.nimg < loop.s.tick_kimg * 1000:
            return
        row = dict(kimg=loop.nimg / 1000, iteration=loop.it, **getattr(loop.job, 'row', dict)(),
                   lr=loop.job.optimizer.param_groups[0]['lr'], loss_per_step=mean_columns(self.losses),
                   img_per_s=(loop.nimg - self.nimg) / max(time.time() - self.start, 1e-9))
        row['loss'] = sum(row['loss_per_step']) / len(row['loss_per_step'])
        if self.stats:
            self.stats.write(json.dumps(row) + '\n')
            self.stats.flush()
        if self.on_tick:
            self.on_tick(row, loop.ema if loop.ema is not None else loop.job.student)
        self.losses, self.start, self.nimg = [], time.time(), loop.nimg


def mean_columns(rows):
    """Column means of ragged rows (SFD-v's iterations have 2..5 student steps)."""
    n = max(len(r) for r in rows)
    cols = [[r[i] for r in rows if i < len(r)] for i in range(n)]
    return [sum(c) / len(c) for c in cols]


def snapshot(loop):
    """Atomic snapshot: the job's file (the EMA network when there is one) and training-state.pt."""
    st = loop.state()  # collective: every rank takes part
    if loop.rank != 0 or loop.run_dir is None:
        return
    loop.job.save(loop.ema if loop.ema is not None else loop.job.student, loop)
    st['config'] = getattr(loop.job, 'config', None)
    data.atomic_write(loop.run_dir / STATE_FILE, lambda tmp: torch.save(st, tmp))


def read_state(run_dir):
    """The training state of a run folder (None without one); unreadable is one clear error."""
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise ValueError(f'{path} is unreadable ({type(e).__name__}: {e}); the run cannot be continued '
                         'from it') from e


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

def fit(job, settings, run_dir=None, state=None, stop_at_iteration=None, on_tick=None):
    """Train `job` for settings.iterations; returns the Loop (its .it, .nimg, .ema, .interrupted).

    With a run_dir: stats.jsonl, snapshots and the lock (rank 0). `state` (read_state) continues
    a run bit for bit. `stop_at_iteration` ends early after a snapshot, as an interruption would.
    A SIGINT / SIGTERM ends it after a snapshot too, with .interrupted set: the caller says how
    to resume and raises KeyboardInterrupt (cli.run turns it into exit status 130)."""
    loop = Loop(job, settings, run_dir)
    if state is not None:
        loop.load_state(state)
    if loop.world > 1:
        loop.model = torch.nn.parallel.DistributedDataParallel(
            job.student, device_ids=[loop.device.index] if loop.device.type == 'cuda' else None,
            find_unused_parameters=True)  # e.g. EDM's map_augment, unused without augment labels
    loop.model = compiled(loop.model, settings)  # the files still hold the plain network
    with contextlib.ExitStack() as stack:
        stats = None
        if loop.rank == 0 and run_dir is not None:  # the lock first, then the records it guards
            loop.run_dir.mkdir(parents=True, exist_ok=True)
            stack.enter_context(cli.RunLock(run_dir))
            stats = stack.enter_context(cli.open_stats(run_dir, loop.it))
        signals = stack.enter_context(cli.StopOnSignal())
        loop.interrupted = _run(loop, Ticks(loop, stats, on_tick), signals, stop_at_iteration)
    job.student.eval()
    return loop


def _run(loop, ticks, signals, stop_at_iteration):
    """The iterations themselves; returns whether a signal stopped them."""
    s, job = loop.s, loop.job
    bar = tqdm(total=s.iterations if s.unit == 'it' else s.iterations * s.batch,
               initial=loop.it if s.unit == 'it' else loop.nimg, unit=s.unit, unit_scale=s.unit == 'img',
               desc=s.desc, disable=None if s.progress and loop.rank == 0 else True)
    interrupted = False
    while loop.it < s.iterations:
        for group in job.optimizer.param_groups:  # a group may scale it (e.g. new layers)
            group['lr'] = _call(s.lr, loop.it) * group.get('lr_scale', 1.0)
        losses = job.iteration(loop)
        if loop.ema is not None:
            beta = _call(s.ema, loop.it)
            with torch.no_grad():
                for p_ema, p in zip(loop.ema.parameters(), job.student.parameters(), strict=True):
                    p_ema.lerp_(p, 1 - beta)
        loop.it, loop.nimg = loop.it + 1, loop.nimg + s.batch
        bar.update(1 if s.unit == 'it' else s.batch)
        bar.set_postfix_str(' '.join(f'{v:.3g}' for v in losses))
        interrupted = cli.any_rank(signals.requested, loop.device) if loop.world > 1 else signals.requested
        done = loop.it >= s.iterations or interrupted or loop.it == stop_at_iteration
        ticks.add(losses, done)
        if done or loop.nimg >= ticks.next_snapshot:
            snapshot(loop)
            ticks.next_snapshot += max(int(s.snapshot_kimg * 1000), 1)
        if done:
            break
    bar.close()
    return interrupted


def compiled(net, settings):
    """`net` compiled as the settings say (a job's teacher too), else `net` itself."""
    return torch.compile(net, backend=settings.compile_backend) if settings.compile else net


def iterations_for(kimg, batch):
    """Iterations that see at least int(kimg * 1000) samples (the last batch may overshoot)."""
    return math.ceil(int(kimg * 1000) / batch)
