"""A whole guided-distillation run: what guided_pd.py's algorithms need around train.py's loop.

guided_pd.py holds Meng et al. (Alg. 1-4) as functions over solvers.py; this file names the
teachers (models.load; the guided pair of a conditional and an unconditional net, or a text
model against the empty prompt), draws the data x ~ D (labelled images, toy points, captioned
images), runs each stage as a job of train.fit, writes the student files with their sampling
recipes, and runs the command line. The loop (updates, accumulation, DDP, EMA, clipping, resume,
snapshots, stats) is train.py's; the settings come resolved from presets.py.

    stage one   one job: Alg. 1 on the global batch, the EMA network written as student.pt
    stage two   one job for all rounds (Alg. 3/4): the iteration counter runs through them, each
                round starts from its teacher with a fresh Adam and EMA, its lr annealed to 0, and
                writes student-n<N>.pt; a resumed run skips the finished rounds and continues the
                current one from training-state.pt

    python guided_pd.py stage1 --teacher toy:ring --kimg 100
    python guided_pd.py stage2 --resume runs/00001-guided-stage2-00000-guided-stage1-toy-ring
"""

import argparse
import copy
import dataclasses
import math
from pathlib import Path

import torch

import cli
import data
import guided_pd
import hub
import models
import presets
import toy
import train

GuidedConfig = guided_pd.GuidedConfig
STAGES = ('stage1', 'stage2')


# ---------------------------------------------------------------------------------------------
# Teachers and data
# ---------------------------------------------------------------------------------------------

def load_guided_teacher(spec, uncond='', device='cpu', wrap=None):
    """(D_w, conditional net, its metadata) for a model spec (models.load). A toy spec means its
    jointly trained class-conditional net (toy:<name>:cond, label dropout 0.1), whose null label
    is the unconditional model; `uncond` names a separate unconditional network ('' = the null
    label). NVIDIA's class-conditional CIFAR-10 net never saw a null label: it needs the uncond net.
    A text model is guided against the empty prompt. `wrap(net)`: e.g. torch.compile, for D_w."""
    wrap = wrap or (lambda net: net)
    world = models.toy_world(spec)
    if spec.startswith('toy:'):
        spec, uncond = f'toy:{world}:cond', ''
    net, meta = models.load(spec, device)  # eval mode (EDM's dropout off), frozen
    if net.text:  # SD: CFG against the empty prompt (SFD Eq. 9), both branches in one UNet call
        import latent
        u, D = net.encode_prompts(['']), wrap(net)
        return lambda x, s, guidance=0.0, **c: latent.guided(D, guidance, u)(x, s, **c), net, meta
    if not net.label_dim:
        raise ValueError(f'--teacher {spec} is not class-conditional: guidance distillation needs a '
                         'conditional model (e.g. cifar10-cond, toy:ring)')
    meta = dict(meta, data=f'toy:{world}') if world else meta
    D_u = None
    if uncond:
        u = models.load(uncond, device)[0]
        if list(u.shape) != list(net.shape) or u.sigma_data != net.sigma_data:
            raise ValueError(f'--uncond {uncond}: makes samples {list(u.shape)} (sigma_data {u.sigma_data:g}), '
                             f'the teacher {list(net.shape)} (sigma_data {net.sigma_data:g}): the guidance '
                             "partner must be the teacher's unconditional twin (same data, same preconditioning)")
        D_u = wrap(u)
    return guided_pd.guided_teacher(wrap(net), D_u), net, meta


load_cfg_teacher = load_guided_teacher  # the name of earlier versions


def data_source(spec, label_dim, dataset=None):
    """draw(n, generator) -> (x [n, ...], one-hot labels [n, C]): Alg. 1/3's x ~ D, with the data's
    own labels as the condition. `spec`: toy:<name> (fresh points every draw), 'cifar10' or an
    image zip/folder (data.load_images, scaled to [-1, 1]); `dataset` = (x, labels) overrides it."""
    eye = torch.eye(label_dim)
    if dataset is None and spec.startswith('toy:'):
        def draw(n, g):
            x, y = toy.toy_data(spec[4:], n, generator=g)
            return x, eye[y]
        return draw
    if dataset is None:
        dataset = data.load_images(spec)
    x_all, y_all = dataset
    if y_all.min() < 0 or y_all.max() >= label_dim:
        raise ValueError(f'the data need labels in [0, {label_dim}) for this teacher; got '
                         f'[{int(y_all.min())}, {int(y_all.max())}]')

    def draw(n, g):
        idx = torch.randint(len(x_all), (n,), generator=g)
        x = x_all[idx]
        return (x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x.float()), eye[y_all[idx]]
    return draw


def draw_source(cfg, net, spec, dataset=None):
    """Alg. 1/3's x ~ D for `net`: data_source, or for a text model captioned images (MS-COCO
    layout, captions.caption_data: latents through the VAE, prompts through the text encoder)."""
    if not net.text:
        return data_source(spec, net.label_dim, dataset)
    if not cfg.captions:
        raise ValueError('--captions: a text-conditioned teacher needs captioned images: '
                         '--data <image folder> --captions <MS-COCO captions .json>')
    import captions
    return captions.caption_data(net, spec, cfg.captions)


# ---------------------------------------------------------------------------------------------
# The two stages as jobs of train.py's loop
# ---------------------------------------------------------------------------------------------

class _Job:
    """What both stages share: the settings, the run folder, this process's part of each batch."""

    def __init__(self, cfg, stage, run_dir, device):
        self.cfg, self.stage, self.run_dir, self.device = cfg, stage, run_dir, device
        self.saved = {}

    def update(self, loop, loss_of):
        """One optimiser update (train.Loop.update) on this process's part [lo, hi) of the global
        batch in cfg.accumulate micro-batches; loss_of(slice) is the mean loss of those samples,
        weighted by their share of the part (DDP averages the parts)."""
        (lo, hi), R = loop.part, self.cfg.accumulate
        n = (hi - lo) // R
        parts = [slice(lo + r * n, lo + (r + 1) * n) for r in range(R)]
        return [float(loop.update([lambda s=s: loss_of(s) * (n / (hi - lo)) for s in parts]))]

    def settled(self, cfg):
        """The run's final settings; `config` is them as its files and training-state.pt keep them."""
        self.cfg = cfg
        self.config = dict(dataclasses.asdict(cfg), run_dir=str(self.run_dir), stage=self.stage)
        return cfg

    def write(self, name, net, prior, meta):
        """models.save_student: our .pt file or a diffusers student folder (prior: where sampling starts)."""
        self.meta, self.saved[name] = meta, models.save_student(self.run_dir, name, net, prior=prior, **meta)
        return self.saved[name]


def _pick(y, s):
    """The conditions of the samples `s`: labels [B, C], or a dict of per-sample tensors."""
    return {k: v[s] for k, v in y.items()} if isinstance(y, dict) else y[s]


class StageOne(_Job):
    """Meng Alg. 1/2: the guided teacher D_w, the w-conditioned student, its data, its file."""

    def __init__(self, cfg, run_dir, device, dataset, log, world):
        super().__init__(cfg, 'stage1', run_dir, device)
        D_w, net, tmeta = cli.rank_zero_first(lambda: load_guided_teacher(
            cfg.teacher, cfg.uncond, device, wrap=lambda n: train.compiled(n, cfg)))
        cfg = self.settled(presets.with_guided_teacher(cfg, 'stage1', net, tmeta, log, world))
        self.D_w, self.tmeta, self.data = D_w, tmeta, tmeta.get('data', cfg.data)
        self.draw = draw_source(cfg, net, self.data, dataset)
        self.student = guided_pd.make_student(net, cfg.w_init)  # Alg. 1: eta_1 from the conditional teacher
        if cfg.lora_rank:  # a LoRA student: the UNet frozen, adapters with B = 0 and the w projection
            hub.add_lora(self.student, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
        self.optimizer = torch.optim.Adam(guided_pd.param_groups(self.student, cfg.w_lr_scale), lr=cfg.lr)
        self.iterations, self.lr = train.iterations_for(cfg.kimg, cfg.batch), cfg.lr

    def describe(self):
        c = self.cfg
        return (f'stage one: {c.teacher} (+ {c.uncond or "null label"}), w ~ U[{c.w_min:g}, {c.w_max:g}], '
                f'sigma {c.sigma_dist}, {c.weighting} weighting, {self.iterations} x {c.batch} '
                f'-> {self.run_dir}')

    def iteration(self, loop):
        cfg = self.cfg
        x0, y = self.draw(cfg.batch, loop.gen)  # Alg. 1, line 1: x ~ D (and its label c, or its caption)
        draws = guided_pd.stage_one_draws(x0.shape, cfg, loop.gen)  # line 2, the same on every process
        return self.update(loop, lambda s: guided_pd.stage_one_loss(
            loop.model, self.D_w, x0[s].to(self.device), _pick(y, s), cfg, None, cfg.weighting,
            draws=[d[s] for d in draws], sigma_data=self.student.sigma_data))

    def row(self):
        return dict(stage=self.stage)

    def save(self, net, loop):
        """A stage-one student is a continuous-time D_w: any solver samples it, by default as its
        teacher (EDM's Heun; a diffusers model its own recipe), now one call per step."""
        cfg = self.cfg
        meta = dict(kind='guided-stage1', teacher=cfg.teacher, uncond=cfg.uncond, data=self.data,
                    shape=self.tmeta['shape'], guidance_range=[cfg.w_min, cfg.w_max], stochastic=False,
                    config=self.config, sampling=self.tmeta['sampling'])
        return self.write('student', net, 'vp', meta)


class StageTwo(_Job):
    """Meng Alg. 3/4, every halving round in one run: the iteration counter runs through the rounds."""

    def __init__(self, cfg, run_dir, device, dataset, log, world):
        super().__init__(cfg, 'stage2', run_dir, device)
        teacher, tmeta = cli.rank_zero_first(lambda: models.load(cfg.teacher, device))
        if not teacher.use_guidance_condition:
            raise ValueError(f'--teacher {cfg.teacher} has no guidance input: run stage1 first, pass its '
                             'student')
        cfg = self.settled(presets.with_guided_teacher(cfg, 'stage2', teacher, tmeta, log, world))
        self.first, self.tmeta, self.log = teacher, tmeta, log
        self.draw = draw_source(cfg, teacher, tmeta.get('data', cfg.data), dataset)
        self.plan = guided_pd.rounds(cfg)  # the students' step counts, N = start_n / 2, ..., end_n
        self.lengths = [train.iterations_for(guided_pd.round_kimg(cfg, N), cfg.batch) for N in self.plan]
        self.iterations = sum(self.lengths)
        self.student = copy.deepcopy(teacher).train().requires_grad_(True)  # Alg. 3: eta_2 <- eta
        self.optimizer = torch.optim.Adam(self.student.parameters(), lr=cfg.lr)
        self.k = self.teacher = None  # the round this process is in, and its teacher

    def position(self, it):
        """(round, iteration within it) of the run's iteration `it`."""
        for k, n in enumerate(self.lengths):
            if it < n:
                return k, it
            it -= n
        return len(self.lengths) - 1, self.lengths[-1]

    def lr(self, it):
        k, i = self.position(it)
        return guided_pd.round_lr(self.cfg, i, self.lengths[k])  # App. B.3: to 0 within each round

    def describe(self):
        kind = 'stochastic, Alg. 4' if self.cfg.stochastic else 'DDIM, Alg. 3'
        return (f'stage two ({kind}): {self.cfg.teacher} -> {" -> ".join(map(str, self.plan))} steps, '
                f'{" + ".join(map(str, self.lengths))} x {self.cfg.batch} -> {self.run_dir}')

    def start_round(self, k, i, loop):
        """Round k's teacher: the previous round's network (in memory, or its file after a resume),
        or the run's teacher. At i = 0 the student starts as its copy with a new Adam and EMA."""
        if self.k is not None:
            prev = loop.ema if loop.ema is not None else self.student
            if loop.rank == 0:
                self.save(prev, loop)  # the finished round's file (loop.it - 1 is its last iteration)
            teacher = copy.deepcopy(prev)
        else:
            teacher = self.first if k == 0 else models.load(self.path(self.plan[k - 1]), self.device)[0]
        self.teacher = train.compiled(teacher.eval().requires_grad_(False), self.cfg)
        if i == 0:
            with torch.no_grad():
                self.student.load_state_dict(teacher.state_dict())  # Alg. 3: eta_2 <- eta
            self.optimizer.state.clear()  # a fresh Adam every round
            if loop.ema is not None:
                loop.ema.load_state_dict(self.student.state_dict())
        if loop.rank == 0 and i == 0:
            self.log(f'stage two: {self.plan[k]}-step student, {self.lengths[k]} x {self.cfg.batch} updates')
        self.k = k

    def iteration(self, loop):
        cfg = self.cfg
        k, i = self.position(loop.it)
        if k != self.k:
            self.start_round(k, i, loop)
        N = self.plan[k]
        x0, y = self.draw(cfg.batch, loop.gen)  # Alg. 3, line 1
        draws = guided_pd.stage_two_draws(x0.shape, N, cfg, loop.gen)
        return self.update(loop, lambda s: guided_pd.stage_two_loss(
            loop.model, self.teacher, x0[s].to(self.device), _pick(y, s), N, cfg, None, cfg.weighting,
            draws=[d[s] for d in draws], sigma_data=self.student.sigma_data))

    def row(self):
        return dict(stage=f'stage2-n{self.plan[self.k]}')

    def save(self, net, loop):
        cfg, N = self.cfg, self.plan[self.position(loop.it - 1)[0]]
        meta = dict(kind='guided-stage2', teacher=cfg.teacher, data=self.tmeta.get('data', cfg.data),
                    shape=self.tmeta['shape'], guidance_range=[cfg.w_min, cfg.w_max], N=N,
                    stochastic=cfg.stochastic, config=self.config,
                    sampling=guided_pd.sampling_recipe(N, cfg.stochastic, cfg.t_min, cfg.t_max).to_dict())
        return self.write(f'student-n{N}', net, 'edm', meta)  # sampled from t_max z, as trained

    def path(self, N):
        """Round N's student: written here, or by the process this run was resumed from."""
        name = f'student-n{N}'
        return self.saved.get(name) or next((p for p in (self.run_dir / f'{name}.pt', self.run_dir / name)
                                             if p.exists()), None)


# ---------------------------------------------------------------------------------------------
# A run: settings, folder, the loop
# ---------------------------------------------------------------------------------------------

def apply_defaults(cfg, stage, explicit=None):
    """guided_pd.apply_defaults: the preset of (world, stage) for every field of `cfg` not in
    `explicit` (None: the fields that differ from the dataclass default); not yet validated."""
    base = GuidedConfig()
    explicit = ({f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(base, f.name)}
                if explicit is None else set(explicit))
    flags = {f: getattr(cfg, f) for f in explicit | {'teacher'}}
    return presets.resolve(GuidedConfig, stage, flags, validate=False)


def resumed_state(run_dir, stage):
    """The training state of the run folder `--resume` names, or one clear error."""
    state = train.read_state(run_dir)
    if state is None:
        raise ValueError(f'--resume {run_dir}: no training-state.pt there (not a guided_pd.py run folder, '
                         'or a run that stopped before its first snapshot: start it again with --run-dir '
                         f'{run_dir})')
    made = (state.get('config') or {}).get('stage')
    if made != stage:
        raise ValueError(f'--resume {run_dir}: a {made} run; continue it with python guided_pd.py {made} '
                         f'--resume {run_dir}')
    return state


def run(stage, cfg, dataset=None, progress=True, log=print, resume=None, stop_at_iteration=None,
        explicit=None, on_tick=None):
    """guided_pd.stage_one / stage_two: check `cfg` (or, with `resume`, merge the fields named in
    `explicit`, default all, into the stored run's settings) and train. Stage one returns
    (student, meta), stage two the paths of its students. `on_tick(row, net)`: train.fit's, after
    every stats row (e.g. a learning curve measured on the EMA network)."""
    state = None
    if resume:
        state = resumed_state(resume, stage)
        names = explicit if explicit is not None else [f.name for f in dataclasses.fields(cfg)]
        flags = dict({n: getattr(cfg, n) for n in names}, run_dir=str(resume))
        cfg = presets.resolve(GuidedConfig, stage, flags, resumed=state['config'],
                              world_size=cli.world_size())
    else:
        presets.validate_guided(cfg, cli.world_size(), stage)
    return train_stage(stage, cfg, state, dataset, progress, log, stop_at_iteration, on_tick)


def train_stage(stage, cfg, state=None, dataset=None, progress=True, log=print, stop_at_iteration=None,
                on_tick=None):
    """One stage with resolved settings `cfg` (state: a run being continued) through train.fit; the
    run folder is claimed under its lock before the teacher is loaded, and held to the end."""
    for spec in (cfg.teacher, cfg.uncond):  # their forms, and a cache they would be written to, first
        if spec:
            models.check_spec(spec)
    rank, world, device = cli.init_distributed(cli.device(cfg.device))
    with cli.run_folder(cfg.run_dir, default_run_name(cfg, stage), resume=state is not None) as run_dir:
        where = (rank, world, device)
        return _train(stage, cfg, state, dataset, progress, log, stop_at_iteration, run_dir, where, on_tick)


def _train(stage, cfg, state, dataset, progress, log, stop_at_iteration, run_dir, where, on_tick=None):
    """The teacher and the student (the stage's job), the loop (train.fit), the closing line."""
    rank, world, device = where
    torch.manual_seed(cfg.seed)  # the student's new w embedding starts alike on every rank
    job = (StageOne if stage == 'stage1' else StageTwo)(cfg, run_dir, device, dataset, log, world)
    cfg = job.cfg  # with its teacher's values (presets.with_guided_teacher)
    settings = train.Settings(
        iterations=job.iterations, batch=cfg.batch, lr=job.lr, device=cfg.device, seed=cfg.seed,
        ema=cfg.ema if cfg.ema > 0 else None, grad_clip=cfg.grad_clip, tick_kimg=cfg.tick_kimg,
        snapshot_kimg=cfg.snapshot_kimg, precision=cfg.precision, compile=cfg.compile,
        compile_backend=cfg.compile_backend, desc=stage, progress=progress)
    if rank == 0:
        log(job.describe())
    loop = train.fit(job, settings, run_dir, state, stop_at_iteration, on_tick)
    net = loop.ema if loop.ema is not None else job.student
    if rank == 0:
        log(f'stopped at iteration {loop.it} ({loop.nimg / 1000:g} kimg); continue with --resume {run_dir}'
            if loop.interrupted else f'{stage}: {loop.it} iterations, students written to {run_dir}')
    if loop.interrupted:
        raise KeyboardInterrupt
    if stage == 'stage1':
        return net, getattr(job, 'meta', {})
    return [job.path(N) for N in job.plan]


def default_run_name(cfg, stage):
    """guided-stage1-<teacher>, guided-stage2-<the stage-one run>[-stochastic] (under runs/<00000>-)."""
    name = Path(cfg.teacher).parent.name if stage == 'stage2' else cfg.teacher.replace(':', '-')
    chain = '-stochastic' if stage == 'stage2' and cfg.stochastic else ''
    return f'guided-{stage}-{Path(name).name}{chain}'


# ---------------------------------------------------------------------------------------------
# Toy evaluation and the command line
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def toy_table(paths, ws=(0.0, 1.0, 2.0, 4.0), n=2000, seed=0, ref_steps=256):
    """Metric A (mean distance to the guided teacher's ODE endpoint from the same noise) and the
    class-averaged sliced W2 to the class-conditional data, for stage-two students (files) and
    DDIM-with-CFG at equal NFE (N/2 steps) and at equal steps (2N NFE), at several w."""
    meta = models.load_meta(paths[0])
    while meta['kind'] == 'guided-stage2':  # up the lineage to the stage-one file
        meta = models.load_meta(meta['teacher'])
    name, D_w = models.toy_world(meta['teacher']), load_guided_teacher(meta['teacher'])[0]
    image = name in toy.IMAGE_WORLDS  # metric A as per-pixel RMSE on a few images, no W2 (too few per class)
    if image:
        n, ref_steps = min(n, toy.IMAGE_EVAL_N), min(ref_steps, toy.IMAGE_REF_STEPS)
    x_data, y = toy.toy_data(name, n, generator=torch.Generator().manual_seed(seed + 99))
    onehot = torch.eye(toy.num_classes(name))[y]
    z = toy.eval_noise(n, shape=toy.sample_shape(name))
    sw2 = lambda a, b: sum(toy.sliced_wasserstein(a[y == c], b[y == c]) for c in y.unique()) / len(y.unique())
    head = 'RMSE (A)' if image else 'metric A  SW2 to data  SW2 to teacher'
    rows = ['   w  NFE  sampler                 ' + head]
    row = lambda w, nfe, label, x, ref: (f'{w:4g} {nfe:4d}  {label:<22}  ' + (
        f'{toy.rmse(x, ref):8.4f}' if image else
        f'{toy.fidelity(x, ref):8.4f}  {sw2(x, x_data):11.4f}  {sw2(x, ref):14.4f}'))
    students = [models.load(path) for path in paths]
    baseline_steps = sorted({k for _, m in students for k in (max(m['N'] // 2, 1), m['N'])}, reverse=True)
    for w in ws:
        ref = guided_pd.guided_reference(D_w, z, w, steps=ref_steps, class_labels=onehot)
        rows.append(row(w, 2 * (ref_steps + 1), 'teacher ODE (DPM++3M)', ref, ref))  # + the step to 0
        for net, m in students:
            g = torch.Generator().manual_seed(seed)
            x = guided_pd.sample_student(net, m, z, w, g, class_labels=onehot)
            rows.append(row(w, m['N'], f'student {m["sampling"]["solver"]} N={m["N"]}', x, ref))
        for k in baseline_steps:  # equal NFE (N/2 steps) and equal steps (2N NFE) for each student
            x = guided_pd.ddim(D_w, z, k, w, class_labels=onehot)
            rows.append(row(w, 2 * k, f'DDIM-CFG {k} steps', x, ref))
    return rows


# The old flags, hidden (a release's grace): the noise levels were --sigma-min / --sigma-max, the
# lengths counted updates. {old: new}; an update count becomes kimg at the run's batch.
RENAMED = {'sigma_min': 't_min', 'sigma_max': 't_max'}
IN_UPDATES = {'iters': 'kimg', 'round_iters': 'round_kimg', 'final_round_iters': 'final_round_kimg',
              'tick': 'tick_kimg'}


def kimg_of(updates, batch):
    """updates x batch / 1000 as the float whose x 1000 is exactly updates x batch, so that
    train.iterations_for(kimg_of(n, b), b) == n and ticks fall on the same updates."""
    kimg = updates * batch / 1000
    while kimg * 1000 > updates * batch:
        kimg = math.nextafter(kimg, 0)
    while kimg * 1000 < updates * batch:
        kimg = math.nextafter(kimg, math.inf)
    return kimg


def old_flags(args, stage, flags, state):
    """{field: value} of the hidden old flags given; update counts converted at the resolved batch."""
    new = {RENAMED[k]: getattr(args, k) for k in RENAMED if k in vars(args)}
    counts = {k: getattr(args, k) for k in IN_UPDATES if k in vars(args)}
    for k, v in counts.items():
        if v < 1:
            raise ValueError(f'{presets.flag(k)} {v}: must be a positive integer')
    if counts:
        batch = presets.resolve(GuidedConfig, stage, dict(flags, **new), resumed=state and state['config'],
                                validate=False).batch
        new.update({IN_UPDATES[k]: kimg_of(v, batch) for k, v in counts.items()})
    return new


HELP = {
    'teacher': 'stage1: conditional teacher (EDM preset, .pkl, .pt or toy:<name>); stage2: a stage-one '
               '(or stage-two) student file',
    'uncond': "stage1: the unconditional branch (EDM preset/.pkl); '' = the teacher's null label",
    'data': "x ~ D: 'cifar10' or an image zip/folder (toy teachers use their own data; text teachers: the "
            "image folder of --captions)",
    'captions': "text teachers: an MS-COCO captions JSON naming the images in --data (stage two: stage "
                "one's)",
    'w_min': "guidance range [w_min, w_max] of stage one (paper [0, 4]); stage two keeps its teacher's",
    'sigma_dist': 'stage-one noise levels: cosine = Meng Alg. 1 (t ~ U[0,1]); lognormal = EDM training',
    'weighting': 'edm | snr | snr_trunc | constant (stage one: edm; official: snr; stage two: snr_trunc, '
                 'as the paper)',
    't_min': 'the cosine schedule in sigma: tan(a t + b) spans [t_min, t_max] (EDM range); the old '
             'names --sigma-min / --sigma-max still work for a release',
    'kimg': 'stage one, thousands of samples (paper: not stated); the old --iters N (updates) still '
            'works: kimg = N x batch / 1000',
    'start_n': 'DDIM steps of the first stage-two teacher (paper 1024)',
    'end_n': 'steps of the last stage-two student (stochastic: at least 2)',
    'stochastic': 'stage two for the stochastic N-step sampler (Alg. 4)',
    'round_kimg': 'per halving, thousands of samples (paper 50K updates of 128); old --round-iters',
    'final_round_kimg': 'for the 2- and 1-step students (paper 100K updates); old --final-round-iters',
    'lr': 'Adam lr, stage two annealed to 0 in each round (official 1e-4 both stages; paper text 1e-3 '
          'for stage one)',
    'batch': 'samples per update, over all processes (paper 128)',
    'accumulate': 'micro-batches per update: batch / (processes x micro-batches) per forward',
    'ema': 'EMA decay (0: none); stage one 0.9999 (paper), stage two none (paper)',
    'grad_clip': 'gradient-norm clip (official configs: 1; 0 = off)',
    'w_init': "stage one's new w embedding: zero = last layer 0, the student starts as the teacher "
              "exactly; random = a fresh layer (Meng's code)",
    'w_lr_scale': "stage one: the w embedding's lr is lr x this (the teacher's weights keep lr)",
    'run_dir': "'' = a new numbered folder runs/<00000>-guided-<stage>-<teacher>",
    'tick_kimg': 'one stats.jsonl row per tick (old --tick N: updates)',
    'precision': 'auto = bf16 autocast on CUDA, fp32 elsewhere; fp32; bf16',
    'compile_backend': 'torch.compile backend when --compile is true',
    'lora_rank': 'diffusers stage one: a LoRA student, only adapters of this rank (and the w projection) '
                 'train (0: the whole UNet)',
    'lora_alpha': 'LoRA scale alpha / rank (0: alpha = rank)',
    'lora_targets': "UNet layers given adapters, comma-separated ('': hub.LORA_TARGETS)",
}


def main(argv=None, doc=None):
    """python guided_pd.py stage1|stage2: flags -> settings (presets.resolve) -> run -> the toy table."""
    p = cli.parser(doc or guided_pd.__doc__)
    p.add_argument('stage', choices=STAGES)
    cli.add_config_flags(p, GuidedConfig, presets.help_text(GuidedConfig, HELP))
    for old in (*RENAMED, *IN_UPDATES):
        p.add_argument(presets.flag(old), dest=old, type=float if old in RENAMED else int,
                       default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument('--resume', help='continue the run in this folder (may change: '
                   f'{", ".join(presets.flag(f) for f in presets.GUIDED_RESUMABLE)})')
    p.add_argument('--quiet', action='store_true', help='no progress bars')
    p.add_argument('--eval-n', type=int, default=2000, help='toy stage two: samples in the table (0: none)')
    args = p.parse_args(argv)
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(GuidedConfig) if f.name in vars(args)}
    state = resumed_state(args.resume, args.stage) if args.resume else None
    if state is not None:
        flags['run_dir'] = args.resume
    try:
        flags.update(old_flags(args, args.stage, flags, state))
        cfg = presets.resolve(GuidedConfig, args.stage, flags, resumed=state and state['config'],
                              world_size=cli.world_size())  # every bad setting, before any loading
    except ValueError as e:  # name the flag the user typed
        msg = str(e)
        for old, new in RENAMED.items():
            if old in vars(args):
                msg = msg.replace(f'{presets.flag(new)} ', f'{presets.flag(old)} ', 1)
        raise ValueError(msg) from None
    out = train_stage(args.stage, cfg, state, progress=not args.quiet)
    if args.stage == 'stage2' and cli.rank() == 0:
        print(f'stage two done: {", ".join(str(q) for q in out)}')
        if models.toy_world(cfg.teacher) and args.eval_n > 0:
            print('\n'.join(toy_table(out[-3:], n=args.eval_n)))
    cli.close_distributed()
