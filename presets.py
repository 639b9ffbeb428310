"""Settings of every training run, resolved once: one table of presets per (world, method).

The settings dataclasses (distill.SFDConfig, guided_pd.GuidedConfig) hold the papers' CIFAR-10
defaults (SFD Table 6; Meng App. B and the official configs). A teacher lives in one of four
worlds, and each world has its own recipe for each method:

    cifar10    NVIDIA's EDM pixel networks (and any EDM-style net or file): the papers' settings
    toy        the 2-D point worlds (toy.py): fresh MLPs, larger lr and batch, minutes on a CPU
    images     the 16x16 CIFAR-10 world (toy:cifar10-16): DDPM++ copies fine-tuned on a CPU
    diffusers  Stable Diffusion and other diffusers models: SFD Table 6's SD recipe, Meng App. C

`resolve` applies, in this order and nowhere else:
    1. the dataclass defaults (the paper)            4. the user's flags (on resume: only RESUMABLE)
    2. the preset of (world, method)                  5. values derived from others (callables below)
    3. a resumed run's stored settings                6. the teacher's metadata (second stage: its grid)
then validates once and returns a frozen dataclass. A diffusers teacher's t_max = 0 ("the model's
sigma_max") is the one value read from the loaded network (`with_levels`). The -h text of every
flag is generated here from the same tables (`help_text`), so it cannot drift from them.

    python distill.py --teacher toy:ring -h       # the flags, with each world's value
"""

import dataclasses
import math
from pathlib import Path

import cli
import distill
import guided_pd
import hub
import models
import solvers
import toy

UNIFORM = 'discrete_uniform'  # a diffusers model's grid, uniform in its timestep (latent.UNIFORM)

# ---------------------------------------------------------------------------------------------
# SFD (distill.py)
# ---------------------------------------------------------------------------------------------

# Toy teachers are fresh MLPs, not pretrained U-Nets: a larger lr suits them (SFD's 5e-5 was tuned
# for fine-tuning EDM networks), and they are cheap enough for larger batches.
_TOY = dict(lr=5e-4, batch=256, kimg=100.0, tick_kimg=5.0, snapshot_kimg=50.0)
# toy:cifar10-16: 3K trajectories of SFD + AFS at 2 NFE in 1.7 minutes on two cores
# (experiments/image_results.py); SFD-v twice as many (its four NFE).
_IMAGES = dict(lr=2e-4, batch=32, kimg=3.0, tick_kimg=0.5, snapshot_kimg=1.0)
# The official launch script's second stage: 2000K trajectories, lr 10x, K = M + 1 = 3 (the text
# says K = 2; with K = 3 the 1-NFE student's teacher is the first-stage student at 2 * 3 - 1 = 5
# NFE, which every SFD-v model of Table 7 was trained at). Images: L1 + LPIPS (Sec. 4.2), whose
# weights are downloaded once (lpips_vgg.py); a run without them stops before training and says so.
_SECOND = dict(nfe=1, K=3, lr=5e-4, kimg=2000.0)
# SFD Table 6, Stable Diffusion: DPM-Solver++(2M) (SD's own), K = 3, t_min raised to 0.1, no AFS
# (SD's trajectories are not straight enough near t_max, Fig. 9c), 100K trajectories per NFE, lr
# 5e-5, batch 16 x 8 micro-batches; App. D.2's grid uniform in the timestep. t_max = 0: the model's.
_LATENT = dict(teacher_solver='dpmpp2m', K=3, t_min=0.1, t_max=0.0, afs=False, schedule=UNIFORM, rho=1.0,
               kimg=100.0, lr=5e-5, batch=128, accumulate=8, snapshot_kimg=25.0)


class _PerNFE:
    """A derived preset: SFD-v trains each NFE of its list as long as SFD trains one."""

    def __init__(self, kimg):
        self.kimg = kimg

    def __call__(self, cfg):
        return self.kimg * len(cfg.nfe_list)

    def __str__(self):
        return f'{self.kimg:g} per NFE'


SFD = {
    'cifar10': {'sfd': {}, 'sfd-v': dict(kimg=800.0), 'second-stage': dict(_SECOND, loss='l1+lpips'),
                'vanilla': dict(teacher_solver='dpm2')},  # Alg. 3 needs a single-step solver
    'toy': {'sfd': _TOY, 'sfd-v': _TOY, 'second-stage': {**_SECOND, **_TOY},
            'vanilla': dict(teacher_solver='dpm2', **_TOY)},
    'images': {'sfd': _IMAGES, 'sfd-v': dict(_IMAGES, kimg=6.0),
               'second-stage': {**_SECOND, **_IMAGES, 'lr': 2e-3, 'loss': 'l1+lpips'},
               'vanilla': dict(teacher_solver='dpm2', **_IMAGES)},
    'diffusers': {'sfd': _LATENT, 'sfd-v': dict(_LATENT, kimg=_PerNFE(100.0))},
}
# May change when a run is resumed (accumulation and checkpointing change memory, not the updates).
SFD_RESUMABLE = ('kimg', 'tick_kimg', 'snapshot_kimg', 'device', 'compile', 'compile_backend', 'run_dir',
                 'accumulate', 'grad_checkpointing', 'lpips_vgg', 'lpips_weights')

# ---------------------------------------------------------------------------------------------
# Guided distillation (guided_pd.py): stage1 and stage2
# ---------------------------------------------------------------------------------------------

_STAGE2 = dict(weighting='snr_trunc', ema=0.0)  # Meng App. B.3: SNR truncation, no EMA
# A fresh toy MLP adapts faster than a pretrained U-Net, and its runs must fit in minutes on a CPU.
_GTOY = dict(batch=256, lr=1e-3, kimg=768.0, ema=0.99, start_n=16, round_kimg=384.0, final_round_kimg=512.0,
             tick_kimg=64.0)
# toy:cifar10-16:cond, a DDPM++ copy on a CPU. Stage one: Meng's text lr 1e-3 (not the official 1e-4),
# 600 updates of 32, EMA 0.99, the w embedding's last layer at zero. Measured by
# experiments/guided_image_results.py --search (metric A at w = 0 / 1 / 2 / 4, 4 DPM-Solver++(3M) steps,
# 32 noises; CFG with the teacher: 4 steps 0.132 / 0.128 / 0.125 / 0.146, 2 steps 0.174 / 0.173 /
# 0.181 / 0.243): this recipe 0.144 / 0.133 / 0.130 / 0.135 (w-sensitivity 0.84), within 15% of CFG
# at 4 steps and better than CFG at 2 at every w, ~9 minutes on one busy CPU thread. lr 1e-4 after
# 300 updates: 0.213 / 0.155 / 0.131 / 0.181 (w-sensitivity 0.23; the student learns the
# w-averaged target first); with the embedding's lr x10: 0.186 / 0.147 / 0.134 / 0.169 (0.49); a
# fresh random last layer (Meng's code) starts far off (0.38-0.53) and is still behind after 300
# (0.215 / 0.149 / 0.132 / 0.200). lr 1e-3 with the embedding's lr x10, 600 updates: 0.141 / 0.134 /
# 0.132 / 0.133, no clear gain over plain 1e-3 (one seed, 32 noises: differences of ~0.003 are noise).
_GIMAGES = dict(batch=32, lr=1e-3, kimg=19.2, ema=0.99, tick_kimg=3.2)
# Stage two (not searched: one setting, sized for ~15 CPU minutes for both chains): 150 updates per
# halving and 200 for the 2- and 1-step students, from an 8-step start; lr 1e-3 annealed to 0 in
# each round (App. B.3's schedule; stage one's lr; the official 1e-4 was not tried here), no EMA.
_GIMAGES2 = dict(batch=32, lr=1e-3, ema=0.0, start_n=8, round_kimg=4.8, final_round_kimg=6.4, tick_kimg=1.6)
# Text-to-image teachers: Meng Sec. 4.2 / App. C, w in [2, 14] (SD guidance_scale 3 .. 15), a
# 512-step DDIM teacher for stage two, ~3000 stage-one updates and 2000 per halving at batch 16.
_GLATENT = dict(w_min=2.0, w_max=14.0, uncond='', batch=16, kimg=48.0, start_n=512, round_kimg=32.0,
                final_round_kimg=160.0, tick_kimg=0.8)
GUIDED = {
    'cifar10': {'stage1': {}, 'stage2': _STAGE2},
    'toy': {'stage1': _GTOY, 'stage2': dict(_STAGE2, **_GTOY)},
    'images': {'stage1': _GIMAGES, 'stage2': dict(_STAGE2, **_GIMAGES2)},
    'diffusers': {'stage1': _GLATENT, 'stage2': dict(_STAGE2, **_GLATENT)},
}
# May change when a run is resumed. Not a stage-two round's length: the iterations already made
# are placed in their rounds by it (stage one's `kimg` may grow).
GUIDED_RESUMABLE = ('kimg', 'tick_kimg', 'snapshot_kimg', 'device', 'compile', 'compile_backend', 'run_dir',
                    'accumulate')


def with_guided_teacher(cfg, stage, net, meta, log=print, world=1):
    """Resolve's teacher step for guided distillation, once the teacher is loaded (its metadata and
    levels): a toy stage one has no separate unconditional net (its null label is one); stage two
    keeps the w range its teacher learned and the captions of its data and, continuing a chain,
    takes its step count (start_n) and grid (t_min, t_max); the levels are clipped to those the
    network knows (a diffusers model's). Returns the settings, validated and frozen."""
    values = {}
    if stage == 'stage1' and cfg.teacher.startswith('toy:'):
        if cfg.uncond not in ('', guided_pd.GuidedConfig.uncond):
            raise ValueError(f'--uncond {cfg.uncond}: a toy teacher\'s :cond network is its own '
                             'unconditional model (its null label); drop --uncond')
        values['uncond'] = ''  # guided_pd_run.load_guided_teacher: a toy's :cond net is its own pair
    if stage == 'stage2':
        values['w_min'], values['w_max'] = meta.get('guidance_range', [cfg.w_min, cfg.w_max])
        values['captions'] = cfg.captions or meta.get('config', {}).get('captions', '')
        step = guided_pd.teacher_step(meta)
        if step is not None:
            log(f'start_n = {step}: the step count of the teacher {cfg.teacher}')
            values.update(start_n=step, t_min=meta['sampling']['t_min'], t_max=meta['sampling']['t_max'])
    t_min, t_max = values.get('t_min', cfg.t_min), values.get('t_max', cfg.t_max)
    lo, hi = max(t_min, net.sigma_min), min(t_max, net.sigma_max)
    if (lo, hi) != (t_min, t_max):
        log(f'noise levels [{t_min:g}, {t_max:g}] clipped to the trained levels [{lo:g}, {hi:g}]')
        values.update(t_min=lo, t_max=hi)
    return validate_guided(dataclasses.replace(cfg, **values), world, stage)

TABLES = {distill.SFDConfig: (SFD, SFD_RESUMABLE), guided_pd.GuidedConfig: (GUIDED, GUIDED_RESUMABLE)}


def world_of(spec):
    """The world of a teacher spec: 'toy', 'images', 'diffusers' or 'cifar10' (every other EDM-style
    network). A student file is in its teacher's world (its metadata names the lineage)."""
    spec = str(spec)
    try:
        if models.kind_of(spec) == 'diffusers':
            return 'diffusers'
        name = models.toy_world(spec)
    except (ValueError, OSError, RuntimeError, KeyError):
        return 'cifar10'  # an unreadable spec: loading it reports the error
    return 'images' if name in toy.IMAGE_WORLDS else 'toy' if name else 'cifar10'


# ---------------------------------------------------------------------------------------------
# Resolve: defaults < preset < resumed run < flags < derived < teacher, validated, frozen
# ---------------------------------------------------------------------------------------------

def resolve(cls, method, flags, resumed=None, validate=True, world_size=1, typed=None):
    """The frozen settings of a run. `flags`: {field: value} the user gave; `method`: SFD's
    --method or guided's stage; `resumed`: the stored settings of the run being continued;
    `typed`: the flags a person typed (a command line), checked for settings the run would ignore."""
    table, resumable = TABLES[cls]
    explicit = dict(flags)
    if 'method' in (f.name for f in dataclasses.fields(cls)):
        explicit.setdefault('method', method)
    teacher = explicit.get('teacher', resumed.get('teacher') if resumed else cls.teacher)
    preset = table[world_of(teacher)].get(method, {})
    values = {k: v for k, v in preset.items() if not callable(v)}                       # 2
    if resumed:                                                                          # 3
        conflicts = sorted(k for k, v in explicit.items() if k not in resumable and k in resumed
                           and plain(v) != plain(resumed[k]))
        if conflicts:
            raise ValueError(f'--resume {explicit.get("run_dir", "")}: the run was made with ' + ', '.join(
                f'{flag(k)} {resumed[k]!r}' for k in conflicts) + '; only ' +
                ', '.join(flag(k) for k in resumable) + ' may change on resume')
        values.update({k: v for k, v in resumed.items() if k in _names(cls)})
    values.update(explicit)                                                              # 4
    cfg = cls(**{k: _typed(cls, k, v) for k, v in values.items()})
    derived = {k: v(cfg) for k, v in preset.items() if callable(v) and k not in explicit and not resumed}
    cfg = dataclasses.replace(cfg, **derived)                                            # 5
    if cls is distill.SFDConfig and cfg.method == 'second-stage' and not resumed \
            and models.kind_of(cfg.teacher) == 'ours':                                   # 6
        teacher_grid = distill.second_stage_grid(models.load_meta(cfg.teacher), cfg.teacher)
        clash = [k for k, v in teacher_grid.items() if k in (typed or ()) and getattr(cfg, k) != v]
        if clash:
            grid = ', '.join(f'{k}={v}' for k, v in teacher_grid.items())
            raise ValueError(', '.join(f'{flag(k)} {getattr(cfg, k)!r}' for k in clash) +
                             f': the second stage keeps its teacher\'s grid ({grid})')
        cfg = dataclasses.replace(cfg, **teacher_grid)
    if typed and not resumed and cls is distill.SFDConfig:
        _refuse_ignored_sfd(cfg, typed)
    if validate:
        (validate_sfd if cls is distill.SFDConfig else validate_guided)(cfg, world_size, method)
    return cfg


def _refuse_ignored_sfd(cfg, typed):
    """A flag the chosen method would ignore is refused, naming what it would need instead."""
    ignored = {'nfe': cfg.method == 'sfd-v' and '--nfe-list (SFD-v trains every NFE of its list)',
               'nfe_list': cfg.method != 'sfd-v' and '--method sfd-v (the others train one --nfe)',
               'data': cfg.method != 'vanilla' and '--method vanilla (SFD draws no data: its teacher '
                       'makes it)'}
    for name, instead in ignored.items():
        if instead and name in typed:
            raise ValueError(f'{flag(name)} is not used by --method {cfg.method}: see {instead}')
    for name in ('lpips_vgg', 'lpips_weights'):
        if name in typed and 'lpips' not in cfg.loss:
            raise ValueError(f'{flag(name)} is not used by --loss {cfg.loss}: only an LPIPS loss (l1+lpips, '
                             'lpips) reads it')


def with_levels(cfg, net):
    """A diffusers teacher's levels: t_max = 0 becomes its sigma_max, and the range is checked."""
    if cfg.t_max == 0 and hasattr(net, 'check_levels'):
        return dataclasses.replace(cfg, t_max=net.check_levels(cfg.t_min, cfg.t_max))
    if hasattr(net, 'check_levels'):
        net.check_levels(cfg.t_min, cfg.t_max)
    return cfg


def _names(cls):
    return {f.name for f in dataclasses.fields(cls)}


def _typed(cls, name, value):
    """Lists read back from a stored run (JSON, torch.load) become the tuples the dataclass holds."""
    if name not in _names(cls):
        raise ValueError(f'unknown setting {flag(name)}')
    return tuple(value) if isinstance(value, list) else value


def plain(v):
    """Tuples to lists (recursively): what torch.load(weights_only=True) and JSON both accept, and
    what a stored run's settings are compared in."""
    if isinstance(v, (list, tuple)):
        return [plain(u) for u in v]
    if isinstance(v, dict):
        return {k: plain(u) for k, u in v.items()}
    return v


def flag(name):
    return '--' + name.replace('_', '-')


def apply_sfd_defaults(cfg, explicit=()):
    """distill.apply_defaults: `cfg` with its world's preset in every field the preset sets and
    `explicit` does not name (the others are kept as they are); not validated."""
    preset = SFD[world_of(cfg.teacher)].get(cfg.method, {})
    flags = {f: getattr(cfg, f) for f in _names(distill.SFDConfig) if f in explicit or f not in preset}
    return resolve(distill.SFDConfig, cfg.method, flags, validate=False)


# ---------------------------------------------------------------------------------------------
# Validation: one clear error naming the flag, before anything is loaded
# ---------------------------------------------------------------------------------------------

def _checker(cfg):
    def need(ok, name, what):
        if not ok:
            raise ValueError(f'{flag(name)} {getattr(cfg, name)!r}: {what}')
    return need


def _finite(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate_sfd(cfg, world=1, method=None):
    """Every SFD setting that cannot work, one error each, naming its flag (no teacher loaded)."""
    need, diffusers = _checker(cfg), world_of(cfg.teacher) == 'diffusers'
    need(cfg.method in distill.METHODS, 'method', f'choose one of {", ".join(distill.METHODS)}')
    need(cfg.loss in distill.LOSSES, 'loss', f'choose one of {", ".join(distill.LOSSES)}')
    if diffusers:
        need(cfg.method in ('sfd', 'sfd-v'), 'method', 'diffusers teachers take sfd or sfd-v only')
    else:
        need(not cfg.grad_checkpointing, 'grad_checkpointing', 'is for diffusers teachers (their UNets)')
        need(not cfg.captions, 'captions', 'prompts are for text-conditioned diffusers teachers')
    need(cfg.teacher_solver in solvers.SOLVERS, 'teacher_solver',
         'choose one of ' + ', '.join(solvers.SOLVERS))
    kinds = solvers.SCHEDULES + ((UNIFORM,) if diffusers else ())
    need(cfg.schedule in kinds, 'schedule', f'choose one of {", ".join(kinds)}')
    need(cfg.nfe >= 1, 'nfe', 'the student needs at least one network call')
    need(len(cfg.nfe_list) > 0 and min(cfg.nfe_list) >= 1, 'nfe_list', 'give NFE >= 1, e.g. 2,3,4,5')
    need(cfg.K >= 1, 'K', 'the teacher takes K >= 1 steps per student step')
    need(_finite(cfg.lr) and cfg.lr > 0, 'lr', 'the learning rate must be positive')
    need(cfg.batch >= 1, 'batch', 'the batch must hold at least one trajectory')
    need(cfg.accumulate >= 1, 'accumulate', 'at least one micro-batch per update')
    need(cfg.batch % (world * cfg.accumulate) == 0, 'batch',
         f'must split evenly over the {world} processes x {cfg.accumulate} micro-batches')
    for name in ('kimg', 'tick_kimg', 'snapshot_kimg'):
        need(_finite(getattr(cfg, name)) and getattr(cfg, name) >= 0.001, name,
             'must be at least 0.001 (in thousands: one trajectory)')
    need(_finite(cfg.t_min) and cfg.t_min > 0, 't_min', 'need 0 < t_min < t_max')
    need(_finite(cfg.t_max) and (cfg.t_max > cfg.t_min or (cfg.t_max == 0 and diffusers)), 't_max',
         'need 0 < t_min < t_max < inf')
    need(_finite(cfg.rho) and cfg.rho > 0, 'rho', 'must be positive')
    need(cfg.seed >= 0, 'seed', 'must be a non-negative integer')
    need(cfg.precision in solvers.PRECISIONS, 'precision', f'choose one of {", ".join(solvers.PRECISIONS)}')
    cli.device(cfg.device)  # e.g. --device cuda without a GPU
    if 'lpips' in cfg.loss:
        need(world_of(cfg.teacher) in ('cifar10', 'images'), 'loss', 'LPIPS compares RGB images, this '
             'teacher gives 2-D points or latents: use l1, l2 or pseudo_huber')
        for name in ('lpips_vgg', 'lpips_weights'):
            path = getattr(cfg, name)
            need('://' in path or not path or Path(path).expanduser().is_file(), name, 'no such file')
    validate_lora(cfg, diffusers)
    if cfg.method == 'vanilla':
        need(cfg.teacher_solver in ('euler', 'heun', 'dpm2'), 'teacher_solver',
             'vanilla distillation (Alg. 3) needs a single-step solver over K sub-steps: euler, heun or dpm2')
        need(cfg.accumulate == 1, 'accumulate', 'applies to sfd, sfd-v and the second stage')
    if cfg.captions:
        import captions
        captions.read_captions(cfg.captions)  # a missing or empty file fails now
    return cfg


def validate_lora(cfg, diffusers):
    """--lora-rank / --lora-alpha / --lora-targets (hub.add_lora): a rank >= 0 (0: full fine-tuning),
    LoRA only on a diffusers pipeline (the base its adapters are saved against), peft installed."""
    need = _checker(cfg)
    need(isinstance(cfg.lora_rank, int) and cfg.lora_rank >= 0, 'lora_rank',
         'a rank >= 1 for a LoRA student, or 0 for full fine-tuning')
    need(_finite(cfg.lora_alpha) and cfg.lora_alpha >= 0, 'lora_alpha', 'must be >= 0 (0: alpha = rank)')
    if not cfg.lora_rank:
        need(not cfg.lora_alpha, 'lora_alpha', 'applies to LoRA students: give --lora-rank too')
        need(not cfg.lora_targets, 'lora_targets', 'applies to LoRA students: give --lora-rank too')
        return cfg
    need(diffusers, 'lora_rank', 'LoRA students need a diffusers teacher (Stable Diffusion: a hub id or '
         'pipeline folder); EDM and toy networks train in full (--lora-rank 0)')
    need(not hub.is_student(cfg.teacher), 'lora_rank', f'the teacher {cfg.teacher} is a student folder; a '
         'LoRA student\'s adapters plug into a pipeline (a hub id or a folder with model_index.json)')
    hub.lora_targets(cfg.lora_targets or hub.LORA_TARGETS)
    hub.require_peft()  # a missing extra: one error now, before the teacher is loaded
    return cfg


def validate_guided(cfg, world=1, stage='stage1'):
    """Every guided-distillation setting that cannot work, one error each, naming its flag."""
    need = _checker(cfg)
    need(cfg.sigma_dist in ('cosine', 'lognormal'), 'sigma_dist', 'choose cosine or lognormal')
    need(cfg.weighting in guided_pd.WEIGHTINGS, 'weighting',
         f'choose one of {", ".join(guided_pd.WEIGHTINGS)}')
    need(_finite(cfg.w_min) and cfg.w_min >= 0, 'w_min',
         'guidance strengths are >= 0 (w = 0: the conditional model)')
    need(_finite(cfg.w_max) and cfg.w_max >= cfg.w_min, 'w_max', 'need w_min <= w_max')
    need(_finite(cfg.t_min) and cfg.t_min > 0, 't_min', 'need 0 < t_min < t_max')
    need(_finite(cfg.t_max) and cfg.t_max > cfg.t_min, 't_max', 'need 0 < t_min < t_max < inf')
    for name in ('kimg', 'round_kimg', 'final_round_kimg', 'tick_kimg', 'snapshot_kimg'):
        need(_finite(getattr(cfg, name)) and getattr(cfg, name) >= 0.001, name,
             'must be at least 0.001 (in thousands: one sample)')
    for name in ('batch', 'start_n', 'end_n', 'accumulate'):
        need(getattr(cfg, name) >= 1, name, 'must be a positive integer')
    need(cfg.batch % (world * cfg.accumulate) == 0, 'batch',
         f'must split evenly over the {world} processes x {cfg.accumulate} micro-batches')
    need(_finite(cfg.lr) and cfg.lr > 0, 'lr', 'the learning rate must be positive')
    need(_finite(cfg.ema) and 0 <= cfg.ema < 1, 'ema', 'a decay in [0, 1) (0: no EMA)')
    need(_finite(cfg.grad_clip) and cfg.grad_clip >= 0, 'grad_clip', 'must be >= 0 (0 = off)')
    need(cfg.seed >= 0, 'seed', 'must be a non-negative integer')
    need(cfg.w_init in guided_pd.W_INITS, 'w_init', f'choose one of {", ".join(guided_pd.W_INITS)}')
    need(_finite(cfg.w_lr_scale) and cfg.w_lr_scale > 0, 'w_lr_scale', 'a positive multiple of --lr')
    need(cfg.precision in solvers.PRECISIONS, 'precision', f'choose one of {", ".join(solvers.PRECISIONS)}')
    cli.device(cfg.device)
    need(not (stage == 'stage2' and cfg.lora_rank), 'lora_rank', 'LoRA students are for stage one (stage '
         'two distils a student, not a pipeline); --lora-rank 0')
    validate_lora(cfg, world_of(cfg.teacher) == 'diffusers')
    if stage == 'stage2':
        from pathlib import Path

        import hub
        ours = Path(cfg.teacher).suffix in ('.pt', '.pth') and Path(cfg.teacher).is_file()
        need(ours or hub.is_student(cfg.teacher), 'teacher', 'stage two distils a stage-one (or stage-two) '
             'student file: runs/<run>/student.pt (a diffusers student: the folder runs/<run>/student)')
        try:
            guided_pd.rounds(cfg)  # each round halves the steps: start_n -> ... -> end_n
        except ValueError as e:
            need(False, 'start_n', str(e))
    return cfg


# ---------------------------------------------------------------------------------------------
# The -h text, generated from the tables
# ---------------------------------------------------------------------------------------------

def help_text(cls, helps):
    """{field: help} with every world's preset value appended, e.g. 'lr: Adam lr (paper 5e-05;
    toy: 0.0005; images: 0.0002 ...)'; choices come from the help strings themselves."""
    table = TABLES[cls][0]
    out = {}
    for f in dataclasses.fields(cls):
        by_world = []
        for world, methods in table.items():
            vals = {m: _show(p[f.name]) for m, p in methods.items() if f.name in p}
            if vals:
                same = len(set(vals.values())) == 1 and len(vals) == len(methods)
                by_world.append(f'{world}: ' + (next(iter(vals.values())) if same else
                                                ', '.join(f'{v} ({m})' for m, v in vals.items())))
        text = helps.get(f.name, '')
        out[f.name] = text + (f' [presets: {"; ".join(by_world)}]' if by_world else '')
    return out


def _show(v):
    return f'{v:g}' if isinstance(v, float) else str(v)
