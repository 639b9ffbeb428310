"""A whole SFD run: what distill.py's algorithms need around train.py's loop.

distill.py holds the paper (Alg. 3-8) as functions over solvers.py; this file names the teacher
(models.load), builds the student as its exact copy (Alg. 4: psi = theta; SFD-v's zero-initialised
step condition, Alg. 6), draws each iteration's noise, labels or captions and SFD-v's NFE, writes
the student file with its sampling recipe, and runs the command line. The loop itself (updates,
DDP, resume, snapshots, stats) is train.fit; the settings come resolved from presets.py.

    python distill.py --teacher toy:ring --kimg 20        # SFD + AFS at 2 NFE on a CPU, ~20 s
    python distill.py --resume runs/00000-sfd-toy-ring-nfe2 --kimg 40    # continue, longer
"""

import copy
import dataclasses
import warnings
from pathlib import Path

import torch

import cli
import data
import distill
import hub
import model_cards
import models
import presets
import solvers
import toy
import train

SFDConfig = distill.SFDConfig


class SFDJob:
    """One SFD-family run's state between iterations: teacher, student, Adam, conditions, data."""

    def __init__(self, cfg, run_dir, device, teacher, meta, world):
        self.cfg, self.run_dir, self.device, self.shape = cfg, run_dir, device, meta['shape']
        self.teacher, self.teacher_cond = teacher, {}
        if cfg.method == 'second-stage':  # Alg. 7: the teacher is a first-stage student, at a trained NFE
            self.teacher_cond = distill.second_stage_setup(cfg, meta)[1]
        elif 'method' in meta:  # a student follows its own few-step grid, not the teacher ODE K-fold finer
            warnings.warn(f'--teacher {cfg.teacher} is a {meta["method"]} student: it was distilled for its '
                          f'own {meta["sampling"]["nfe"]}-NFE grid, not as a {cfg.teacher_solver} teacher '
                          'on a finer one (for a 1-NFE student from it: --method second-stage)', stacklevel=2)
        self.label_dim = teacher.label_dim
        self.prompts = _prompts(teacher, cfg.captions)  # Sec. 3.4: captions at guidance 1
        student = copy.deepcopy(teacher).train().requires_grad_(True)
        if cfg.method == 'sfd-v' and not student.use_step_condition:
            student.enable_step_condition()  # Alg. 6, "Initialize": zero-initialised, an exact no-op
        if cfg.lora_rank:  # a LoRA student: the UNet frozen, adapters with B = 0 (still psi = theta)
            hub.add_lora(student, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
        if cfg.grad_checkpointing:
            student.unet.enable_gradient_checkpointing()  # the same gradients, recomputed block by block
        self.student = student
        self.optimizer = torch.optim.Adam(hub.trainable(student), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
        self.lpips = (distill.load_lpips(device, cfg.lpips_vgg or None, cfg.lpips_weights or None)
                      if 'lpips' in cfg.loss else None)
        self.data = vanilla_data(cfg) if cfg.method == 'vanilla' else None
        self.calls, self.nfe = [0, 0], cfg.nfe  # (teacher NFE, student calls) per sample so far
        self.config = presets.plain(dict(dataclasses.asdict(cfg), run_dir=str(run_dir)))

    def iteration(self, loop):
        """One iteration of Alg. 3 (vanilla) or Alg. 4-7 (the SFD family)."""
        cfg = self.cfg
        # SFD-v (Alg. 6, line 1): this iteration's NFE; its schedule, K times refined for the teacher.
        draw = lambda: cfg.nfe_list[int(torch.randint(len(cfg.nfe_list), (), generator=loop.gen))]
        self.nfe = draw() if cfg.method == 'sfd-v' else cfg.nfe
        t_steps = distill.student_schedule(cfg, self.nfe, self.student)
        N = len(t_steps) - 1
        t_teacher = distill.grid(cfg, cfg.K * N, self.student)
        cond, student_cond = self.conditions(loop)
        if cfg.method == 'vanilla':  # the baseline, Alg. 3: one local step per sample
            self.calls[0] += cfg.K * solvers.nfe(cfg.teacher_solver, 1)  # K sub-steps of one interval
            self.calls[1] += 1
            return self.vanilla(loop, t_steps, t_teacher, student_cond)
        # Alg. 4, line 1: x_N = x~_N ~ N(0, t_max^2 I), drawn for the global batch.
        x_N = (cfg.t_max * torch.randn([cfg.batch, *self.shape], generator=loop.gen)[slice(*loop.part)])
        x_N = x_N.to(self.device)
        # Alg. 4, line 5 for every n at once: the teacher's trajectory over the refined grid
        # (Alg. 7: the second stage's teacher is a first-stage student sampled with Euler).
        second = cfg.method == 'second-stage'
        solver = 'euler' if second else cfg.teacher_solver
        targets = distill.teacher_targets(self.teacher, x_N, t_teacher, cfg.K, solver, afs=cfg.afs and second,
                                          accumulate=cfg.accumulate, precision=cfg.precision,
                                          **cond, **self.teacher_cond)
        self.calls[0] += solvers.nfe(solver, cfg.K * N, cfg.afs and second)
        self.calls[1] += N - int(cfg.afs)
        # Alg. 4, lines 3-7: a student step and an update per interval, from its own detached output.
        return distill.sfd_iteration(loop.model, self.optimizer, x_N, t_steps, targets, cfg, self.lpips,
                                     loop.before_step, **student_cond)

    def conditions(self, loop):
        """(teacher's, student's) conditions: random labels of a class-conditional teacher or random
        captions of a text teacher at guidance scale 1 (Sec. 3.4), and SFD-v's step condition."""
        cond, (lo, hi), B = {}, loop.part, self.cfg.batch
        if self.label_dim:
            y = torch.randint(self.label_dim, (B,), generator=loop.gen)[lo:hi]
            cond['class_labels'] = torch.eye(self.label_dim, device=self.device)[y.to(self.device)]
        if self.prompts:
            idx = torch.randint(len(self.prompts), (B,), generator=loop.gen)[lo:hi].tolist()
            cond['encoder_hidden_states'] = self.student.encode_prompts([self.prompts[i] for i in idx])
        step = {'step': distill.step_value(self.nfe, self.cfg.afs)} if self.student.use_step_condition else {}
        return cond, dict(cond, **step)

    def vanilla(self, loop, t_steps, t_teacher, cond):
        """Alg. 3, line 1: a batch of data x_0 (with its labels for a conditional teacher); lines
        2-7 in distill.vanilla_iteration."""
        x_all, y_all = self.data
        lo, hi = loop.part
        pick = torch.randint(len(x_all), (self.cfg.batch,), generator=loop.gen)[lo:hi]
        if self.label_dim and y_all is not None:
            cond['class_labels'] = torch.eye(self.label_dim, device=self.device)[y_all[pick].to(self.device)]
        x0 = x_all[pick].to(self.device)
        return distill.vanilla_iteration(loop.model, self.teacher, self.optimizer, x0, t_steps, t_teacher,
                                         self.cfg, loop.gen, (lo, hi, self.cfg.batch), self.lpips,
                                         loop.before_step, **cond)

    def row(self):
        return dict(nfe=self.nfe)

    def save(self, net, loop):
        """The student with its sampling recipe (Alg. 8): a .pt file, or a diffusers student folder
        sampled from t_max z as trained (prior 'edm')."""
        meta = dict(sampling=distill.sampling_recipe(self.cfg, net).to_dict(), method=self.cfg.method,
                    teacher=self.cfg.teacher, kimg=loop.nimg / 1000, shape=list(self.shape),
                    config=self.config)
        self.saved = models.save_student(self.run_dir, 'student', net, prior='edm', **meta)
        return self.saved


def _prompts(teacher, captions_file):
    """A text teacher's training prompts (captions.py); None for every other teacher."""
    if not (teacher.text or captions_file):
        return None
    import captions
    return captions.training_prompts(teacher, captions_file)


def vanilla_data(cfg):
    """Alg. 3's data x_0 (and labels): the toy's own data set, or images scaled to [-1, 1]."""
    name = models.toy_world(cfg.teacher)
    if name:
        return toy.toy_data(name, 20_000, generator=torch.Generator().manual_seed(cfg.seed))
    x, y = data.load_images(cfg.data)
    return data.to_float(x), y


# ---------------------------------------------------------------------------------------------
# A run: settings, folder, teacher and student, the loop
# ---------------------------------------------------------------------------------------------

def resumed_state(run_dir):
    """The training state of the run folder `--resume` names, or one clear error."""
    state = train.read_state(run_dir)
    if state is None:
        raise ValueError(f'--resume {run_dir}: no training-state.pt there (not a distill.py run folder, or '
                         'a run that stopped before its first snapshot: start it again with '
                         f'--run-dir {run_dir})')
    return state


def resolve_and_run(cfg, resume=None, stop_at_iteration=None, progress=True, log=print, on_tick=None,
                    explicit=None):
    """distill.distill: check `cfg` (or, with `resume`, merge it into the stored run's settings:
    `explicit` names the fields the caller chose, default all) and run."""
    state = resumed_state(resume) if resume else None
    names = explicit if explicit is not None and resume else [f.name for f in dataclasses.fields(cfg)]
    flags = dict({n: getattr(cfg, n) for n in names}, **({'run_dir': str(resume)} if resume else {}))
    cfg = presets.resolve(SFDConfig, state['config']['method'] if state else cfg.method, flags,
                          resumed=state and state['config'], world_size=cli.world_size())
    return run(cfg, state, stop_at_iteration, progress, log, on_tick)


def run(cfg, state=None, stop_at_iteration=None, progress=True, log=print, on_tick=None):
    """Train with resolved settings `cfg` (continuing `state`); returns (student, summary). The run
    folder is claimed under its lock before the teacher is loaded, and held to the end."""
    models.check_spec(cfg.teacher)  # its form, and a cache it would be written to, before anything slow
    rank, world, device = cli.init_distributed(cli.device(cfg.device))
    cli.rank_zero_first(lambda: lpips_files(cfg))  # LPIPS's weights: now, not after loading the teacher
    with cli.run_folder(cfg.run_dir, default_run_name(cfg), resume=state is not None) as run_dir:
        return _train(cfg, state, run_dir, (rank, world, device), stop_at_iteration, progress, log, on_tick)


def _train(cfg, state, run_dir, where, stop_at_iteration, progress, log, on_tick):
    """The teacher, the student as its copy, the loop (train.fit), the closing line."""
    rank, world, device = where
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
    torch.manual_seed(cfg.seed)  # new layers (SFD-v's step embedding) start alike on every rank
    teacher, meta = cli.rank_zero_first(lambda: models.load(cfg.teacher, device))
    cfg = presets.with_levels(cfg, teacher)  # a diffusers teacher: t_max 0 = its sigma_max
    job = SFDJob(cfg, run_dir, device, teacher, meta, world)
    torch.manual_seed(cfg.seed * world + rank)  # dropout: a different stream on every rank
    total = int(cfg.kimg * 1000)
    settings = train.Settings(
        iterations=train.iterations_for(cfg.kimg, cfg.batch), batch=cfg.batch, device=cfg.device,
        seed=cfg.seed,
        lr=lambda it: distill.lr_at(cfg, it * cfg.batch, total), tick_kimg=cfg.tick_kimg,
        snapshot_kimg=cfg.snapshot_kimg, precision=cfg.precision, compile=cfg.compile,
        compile_backend=cfg.compile_backend, desc=cfg.method, progress=progress)
    if rank == 0:
        log(describe(cfg, run_dir, device, world))
    job.teacher = train.compiled(teacher, settings)  # --compile: the teacher too
    loop = train.fit(job, settings, run_dir, state, stop_at_iteration, on_tick)
    if rank == 0:
        log(f'stopped at iteration {loop.it} ({loop.nimg / 1000:g} kimg); continue with --resume {run_dir}'
            if loop.interrupted else f'done: {loop.it} iterations, {loop.nimg / 1000:g} kimg; student '
            f'written to {job.saved}')
    if loop.interrupted:
        raise KeyboardInterrupt
    return job.student, dict(iterations=loop.it, kimg=loop.nimg / 1000, run_dir=str(run_dir),
                             teacher_nfe=job.calls[0], student_calls=job.calls[1])


def lpips_files(cfg):
    """A loss with LPIPS: its two weight files, found (given, cached) or downloaded once, or one error
    naming the files, the cache folder they go in, the flags that point at copies and --loss l1."""
    if 'lpips' not in cfg.loss:
        return None
    import lpips_vgg
    return lpips_vgg.weight_files(cfg.lpips_vgg or None, cfg.lpips_weights or None,
                                  instead=', or point --lpips-vgg and --lpips-weights at copies of them, '
                                          f'or train without LPIPS: --loss l1 (this run: --loss {cfg.loss})')


def default_run_name(cfg):
    return f'{cfg.method}-{cfg.teacher.replace(":", "-").replace("/", "_")}-nfe{cfg.nfe}'.replace('..', '')


def describe(cfg, run_dir, device, world):
    """The one-line summary printed when a run starts."""
    teacher = 'euler' if cfg.method == 'second-stage' else cfg.teacher_solver
    nfe = list(cfg.nfe_list) if cfg.method == 'sfd-v' else cfg.nfe
    return (f'{cfg.method}: teacher {cfg.teacher} ({teacher}, K={cfg.K}), student NFE {nfe}'
            f'{" + AFS" if cfg.afs else ""}, {cfg.loss}, lr {cfg.lr:g}, batch {cfg.batch}'
            f'{f" in {cfg.accumulate} micro-batches" if cfg.accumulate > 1 else ""} on {world} x '
            f'{device.type}, {cfg.kimg:g} kimg -> {run_dir}')


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

HELP = {'teacher': 'a model spec (python models.py -h); the second stage: a first-stage student file',
        'method': f'one of {", ".join(distill.METHODS)}',
        'nfe_list': 'SFD-v NFE list L (comma-separated)',
        'teacher_solver': f'one of {", ".join(solvers.SOLVERS)}',
        'schedule': f'one of {", ".join(solvers.SCHEDULES)} (diffusers teachers also {presets.UNIFORM})',
        'loss': f'one of {", ".join(distill.LOSSES)}',
        'lpips_vgg': "LPIPS losses: torchvision's vgg16-397923af.pth (path or URL); '' = download it once "
                     '(528 MB) into the cache ($SFD_CACHE)',
        'lpips_weights': "LPIPS losses: piq's lpips_weights.pt (path or URL); '' = download it once into "
                         'the cache',
        'kimg': 'thousands of teacher trajectories (paper: SFD 200, SFD-v 800, second stage 2000)',
        'lr': 'Adam lr, divided by 10 half-way (paper 5e-5, second stage 5e-4)',
        'batch': 'trajectories per iteration, over all processes',
        'run_dir': "'' = a new numbered folder runs/<00000>-<method>-<teacher>-nfe<N>",
        'accumulate': 'micro-batches per update: batch / (processes x micro-batches) per forward',
        't_max': "diffusers teachers: 0 = the model's sigma_max (SD: 14.6146)",
        'captions': 'text teachers (SD): the prompts, one per line, MS-COCO captions .json or .csv (text)',
        'precision': 'auto = bf16 autocast on CUDA, fp32 elsewhere; fp32; bf16',
        'compile_backend': 'torch.compile backend when --compile is true',
        'lora_rank': 'diffusers teachers: a LoRA student, only adapters of this rank train (0: all)',
        'lora_alpha': 'LoRA scale alpha / rank (0: alpha = rank)',
        'lora_targets': "UNet layers given adapters, comma-separated ('': hub.LORA_TARGETS, attention and "
                        'feed-forward projections)'}


def main(argv=None, doc=None):
    """python distill.py: flags -> settings (presets.resolve) -> run -> the toy before/after table."""
    helps = presets.help_text(SFDConfig, HELP)  # each flag with every world's preset value
    p = cli.add_config_flags(cli.parser(doc or distill.__doc__), SFDConfig, helps)
    p.add_argument('--resume', help='continue the run in this folder (may change: '
                   f'{", ".join(presets.flag(f) for f in presets.SFD_RESUMABLE)})')
    p.add_argument('--quiet', action='store_true', help='no progress bar')
    p.add_argument('--eval-n', type=int, default=2000, help='toy teachers: samples in the before/after '
                   'table (images: at most toy.IMAGE_EVAL_N; 0: no table)')
    args = p.parse_args(argv)
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(SFDConfig) if f.name in vars(args)}
    state = resumed_state(args.resume) if args.resume else None
    if state is not None:
        flags['run_dir'] = args.resume
    method = flags.get('method', state['config']['method'] if state else SFDConfig.method)
    cfg = presets.resolve(SFDConfig, method, flags, resumed=state and state['config'],
                          world_size=cli.world_size(), typed=set(flags))  # every bad setting, before loading
    student, summary = run(cfg, state, progress=not args.quiet)
    path = Path(summary['run_dir']) / 'student.pt'  # a diffusers student is the folder student/
    meta = models.load_meta(path) if cli.rank() == 0 and path.is_file() else {}
    name = models.toy_world(meta.get('teacher', ''))
    if name and args.eval_n > 0:  # a toy run: the before/after table
        first = models.load(meta['teacher']) if meta['method'] == 'second-stage' else None
        teacher = models.load(f'toy:{name}')[0]
        table = toy.before_after_table(name, student.cpu(), meta, teacher, first_stage=first, n=args.eval_n)
        print(table)
        for m in model_cards.table_metrics(table, args.eval_n):  # metric A into the run's model card
            model_cards.add_metric(summary['run_dir'], **m)
    cli.close_distributed()
