"""What every command line and training run of this project shares: flags, devices, processes.

distill.py, guided_pd.py, sample.py and fid.py are scripts with one dataclass of settings each.
The plumbing around them is written once, here:

    flags       one --flag per dataclass field; booleans accept only true/false/yes/no/1/0; the
                set of flags the user actually gave (abbreviations included), so a recipe's
                defaults never override an explicit choice
    errors      bad input ends as one line `<prog>: error: ...` with exit status 2
    devices     'auto' = CUDA when available, else the CPU; bf16 autocast on CUDA only
    processes   torchrun's WORLD_SIZE / RANK / LOCAL_RANK: one GPU per process, NCCL on CUDA,
                gloo on a CPU; a single process needs no launcher
    run folders numbered as EDM's (runs/00003-<name>), never shared by two runs, locked while a
                process writes them; SIGINT / SIGTERM let a loop write its snapshot first

Nothing here knows about diffusion; it imports torch and data.py (atomic writes) only.
"""

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import socket
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

import data

# ---------------------------------------------------------------------------------------------
# Flags from a dataclass of settings
# ---------------------------------------------------------------------------------------------

TRUE, FALSE = ('true', 'yes', '1'), ('false', 'no', '0')


def boolean(text):
    """A strict boolean flag value: true/false, yes/no, 1/0 (any case); anything else is an error."""
    value = str(text).strip().lower()
    if value not in TRUE + FALSE:
        raise argparse.ArgumentTypeError(f'expected true or false (yes/no, 1/0), got {text!r}')
    return value in TRUE


def int_list(text):
    """'2,3,4,5' -> (2, 3, 4, 5)."""
    try:
        return tuple(int(v) for v in str(text).split(','))
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected comma-separated integers, got {text!r}') from None


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `<prog>: error: ...` and exit status 2, no usage dump.
    Unambiguous abbreviations of flags are honoured (and count as given, see config_from_args)."""

    def error(self, message):
        self.exit(2, f'{self.prog}: error: {message} (see {self.prog} -h)\n')


def parser(doc, **kwargs):
    """A Parser described by a module docstring's first paragraph, showing defaults."""
    return Parser(description=doc.split('\n\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                  **kwargs)


def add_config_flags(p, cls, help=None):
    """One --flag per field of dataclass `cls`, typed by its default. The parsed namespace holds
    only the flags given (default=SUPPRESS), so `config_from_args` knows which were explicit;
    --help still shows each default."""
    help = help or {}
    for f in dataclasses.fields(cls):
        default = f.default
        kind = (boolean if isinstance(default, bool) else int_list if isinstance(default, tuple)
                else type(default))
        p.add_argument('--' + f.name.replace('_', '-'), dest=f.name, type=kind, default=argparse.SUPPRESS,
                       help=f'{help.get(f.name, "")} (default: {default!r})'.lstrip())
    return p


def config_from_args(cls, args):
    """(cls instance, names of the fields the user set) from a namespace of add_config_flags."""
    given = {f.name for f in dataclasses.fields(cls) if f.name in vars(args)}
    return cls(**{name: getattr(args, name) for name in given}), given


def run(main, argv=None):
    """Run a CLI's main: bad input (ValueError, FileNotFoundError: this project's errors for things a
    user can fix; FloatingPointError: a model or setting that diverged) becomes one line on stderr
    and exit status 2, as argparse's own errors do."""
    prog = os.path.basename(sys.argv[0]) or 'python'
    warnings.formatwarning = lambda message, *_, **__: f'{prog}: warning: {message}\n'  # one line each
    try:
        main(argv)
        return
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        print(f'{prog}: error: {e}', file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:  # a training loop has written its snapshot and said how to resume
        print(f'{prog}: interrupted', file=sys.stderr)
        raise SystemExit(130) from None


# ---------------------------------------------------------------------------------------------
# Devices and processes
# ---------------------------------------------------------------------------------------------

def device(name='auto'):
    """'auto' -> cuda if available, else cpu; a device that is not there is a clear error."""
    if name in (None, '', 'auto'):
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f'--device {name}: not a device (use auto, cpu, cuda or cuda:<index>)') from None
    if dev.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'--device {name}: no CUDA GPU is visible to torch here; use --device cpu')
    if dev.type == 'cuda' and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f'--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible')
    if dev.type not in ('cpu', 'cuda', 'mps'):
        raise ValueError(f'--device {name}: this project runs on cpu or cuda')
    return dev


def init_distributed(dev):
    """(rank, world size, this process's device). torchrun sets WORLD_SIZE, RANK and LOCAL_RANK:
    each process then takes GPU LOCAL_RANK and joins the group (NCCL on CUDA, gloo on a CPU)."""
    dev = torch.device(dev)
    world = int(os.environ.get('WORLD_SIZE', 1))
    if dev.type == 'cuda' and world > 1:
        dev = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
    if dev.type == 'cuda':
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group('nccl' if dev.type == 'cuda' else 'gloo')
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), dev
    return 0, 1, dev


def world_size():
    """The number of processes torchrun started (1 without it)."""
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get('WORLD_SIZE', 1))


def rank():
    """This process's rank (0 without torchrun)."""
    return dist.get_rank() if dist.is_initialized() else 0


def any_rank(flag, dev):
    """Whether `flag` is set on any process (so that all of them stop at the same iteration)."""
    if not dist.is_initialized():
        return bool(flag)
    t = torch.tensor([float(flag)], device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def close_distributed():
    """Leave the process group, if one was joined."""
    if dist.is_initialized():
        dist.destroy_process_group()


def rank_zero_first(fn):
    """fn() on rank 0 first, then on the others (a download or a cached toy teacher is made once)."""
    if dist.is_initialized() and dist.get_rank() != 0:
        dist.barrier()
    out = fn()
    if dist.is_initialized() and dist.get_rank() == 0:
        dist.barrier()
    return out


# ---------------------------------------------------------------------------------------------
# Run folders: numbered like EDM's, never shared by two runs, locked while written
# ---------------------------------------------------------------------------------------------

# What marks a folder as holding a run: a snapshot (stats.jsonl alone is a run that stopped before
# its first snapshot, which a retry may take over: its rows are cut back when the retry starts).
RUN_FILES = ('training-state.pt', 'student.pt', 'student')


def new_run_dir(root, name):
    """root/<next number>-<name> (EDM's layout, e.g. runs/00003-sfd-toy-ring-nfe2), not yet created."""
    root = Path(root)
    taken = [int(p.name[:5]) for p in root.glob('[0-9][0-9][0-9][0-9][0-9]-*')] if root.is_dir() else []
    return root / f'{max(taken, default=-1) + 1:05d}-{name}'


def check_fresh_run_dir(run_dir, flag='--run-dir'):
    """A new run never writes into a folder that holds another run's snapshot."""
    found = [f for f in RUN_FILES if (Path(run_dir) / f).exists()] + \
        [p.name for p in Path(run_dir).glob('student-n*.pt')] if Path(run_dir).is_dir() else []
    if found:
        raise ValueError(f'{flag} {run_dir} already holds a run ({", ".join(found)}): continue it with '
                         f'--resume {run_dir}, or choose another folder')


def _make_folder(path, flag):
    """mkdir -p, and a test write: an impossible or unwritable folder is one clear error now."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f'.write-test-{os.getpid()}'
        probe.write_bytes(b'')
        probe.unlink()
    except OSError as e:
        raise ValueError(f'{flag} {path}: cannot write there ({e.strerror or e}); '
                         'choose another folder') from None


def _allocate(root, name):
    """A new numbered folder, created atomically: two runs started together get two numbers."""
    for _ in range(1000):
        path = new_run_dir(root, name)
        _make_folder(path.parent, '--run-dir')
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue  # another run took this number a moment ago
    raise ValueError(f'could not allocate a run folder under {root}')


@contextlib.contextmanager
def run_folder(run_dir, name, resume=False, root='runs'):
    """The folder of a whole run, held under its lock from before the teacher is loaded to the end.

    '' allocates runs/<next number>-<name> atomically; a given folder is created if needed, then
    locked, and only under the lock checked to hold no other run (so two runs started together into
    one folder cannot both pass). `resume` needs the folder's own snapshot instead. Rank 0 decides,
    the other ranks receive the path."""
    path, lock, created = None, None, False
    if rank() == 0:
        path = Path(run_dir) if run_dir else _allocate(root, name)
        created = not run_dir or not path.exists()
        _make_folder(path, '--resume' if resume else '--run-dir')
        lock = RunLock(path).__enter__()
        try:
            if not resume:
                check_fresh_run_dir(path, '--run-dir')
        except BaseException:
            lock.__exit__(None, None, None)
            raise
    if dist.is_initialized():
        shared = [str(path) if path else None]
        dist.broadcast_object_list(shared, src=0)
        path = Path(shared[0])
    try:
        yield path
    except BaseException:
        _release(lock)
        if created and not any(path.iterdir()):  # a run that failed before writing anything
            path.rmdir()                            # leaves no empty numbered folder behind
        raise
    _release(lock)


def _release(lock):
    if lock is not None:
        lock.__exit__(None, None, None)


class RunLock:
    """run_dir/.lock while a process writes the run: a second writer is refused (a lock left by a
    process that no longer runs on this machine is taken over)."""

    held = {}  # lock path -> how many times this process holds it (re-entrant: a run and its loop)

    def __init__(self, run_dir):
        self.path = Path(run_dir).absolute() / '.lock'

    def __enter__(self):
        if RunLock.held.get(self.path):
            RunLock.held[self.path] += 1
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                os.write(fd, f'{os.getpid()} {socket.gethostname()}\n'.encode())
                os.close(fd)
                RunLock.held[self.path] = 1
                return self
            except FileExistsError:
                self.check()
                self.path.unlink(missing_ok=True)  # stale: its process is gone
        raise ValueError(f'could not lock {self.path}')

    def check(self):
        """Raise now if another live process holds the lock (without taking it)."""
        if self.path.is_file() and self._holder_alive():
            raise ValueError(f'{self.path.parent} is being written by another process '
                             f'({self.path.read_text().strip()}); wait for it or remove {self.path} '
                             'if that process is gone')

    def _holder_alive(self):
        try:
            pid, host = self.path.read_text().split()
            if host != socket.gethostname():
                return True  # another machine: cannot tell, so assume it runs
            os.kill(int(pid), 0)
            return True
        except (ValueError, OSError):
            return False

    def __exit__(self, *exc):
        RunLock.held[self.path] -= 1
        if not RunLock.held[self.path]:
            del RunLock.held[self.path]
            self.path.unlink(missing_ok=True)


class StopOnSignal:
    """SIGINT / SIGTERM set `requested` instead of killing the process, so a training loop can
    write its snapshot first; a second signal interrupts at once."""

    def __enter__(self):
        self.requested, self.old = False, {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay as they are
                pass
        return self

    def _handle(self, sig, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f'\n{signal.Signals(sig).name}: writing a snapshot, then stopping (again to stop now)',
              file=sys.stderr)

    def __exit__(self, *exc):
        for sig, handler in self.old.items():
            signal.signal(sig, handler)


def open_stats(run_dir, iteration):
    """run_dir/stats.jsonl for appending, cut back to the rows up to `iteration` (a resumed run
    would otherwise repeat the rows written after its last snapshot)."""
    path = Path(run_dir) / 'stats.jsonl'
    if path.is_file():
        keep = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get('iteration', 0) <= iteration]
        data.atomic_write(path, lambda tmp: Path(tmp).write_text(''.join(line + '\n' for line in keep)))
    return open(path, 'a')
