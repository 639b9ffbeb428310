"""Generate images (or 2-D points) from any model of this project, reproducibly, for viewing or FID.

A model is any spec of models.py: an NVIDIA EDM network (preset, alias, .pkl or URL) or a toy
teacher, sampled by any training-free solver of solvers.py, or one of our own files, whose recipe
(solvers.Recipe) says how to sample it: an SFD student is Euler over its own schedule (SFD Alg. 8), with AFS and
SFD-v's step condition where it was trained with them; a guided student (Meng et al.) takes the
guidance strength w as a network input. Seeds work as in EDM's generate.py: every image has its
own generator, so an image depends only on its seed, not on the batch size or the GPU count (up
to the float rounding of batched network arithmetic).

    python sample.py --model cifar10-32x32-uncond-vp --seeds 0-63 --grid g.png   # EDM's sampler:
        # Heun, 18 timestamps + a final 0 = 17 Heun steps and 1 Euler step = 35 NFE
    python sample.py --model runs/<run>/student.pt --nfe 3 --grid g.png         # an SFD-v student
    python sample.py --model cifar10-cond --class 3 --guidance 1 --uncond cifar10 --grid g.png
    torchrun --standalone --nproc_per_node=8 sample.py --model cifar10 --seeds 0-49999 \\
        --outdir fid-tmp --npz fid-tmp.npz                   # 50k images for `python fid.py calc`
"""

import argparse
import dataclasses
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from einops import rearrange
from PIL import Image
from tqdm import tqdm

import captions
import cli
import data
import fid  # only for IMAGES_KEY: the npz layout fid.py reads
import latent
import models
import solvers

# A teacher's recipe is EDM's sampler (Karras et al. 2022, Alg. 1; generate.py defaults),
# solvers.Recipe(): Heun on the rho = 7 polynomial schedule from 80 to 0.002, then a final step to
# t = 0 that lands on the denoiser's output. 18 timestamps + 0 = 18 steps = 17 two-call Heun
# steps + 1 one-call Euler step = 35 NFE.


def ends_at_zero_default(solver):
    """Single-step solvers end at t = 0 as EDM's sampler does (a last Euler step onto D); multistep
    ones stop at t_min as the official SFD teacher code does (lambda = -log t is infinite at 0)."""
    return solver in ('heun', 'dpm2', 'euler')


# ---------------------------------------------------------------------------------------------
# Seeds, noise and labels: one generator per image (EDM generate.py's convention)
# ---------------------------------------------------------------------------------------------

def parse_seeds(text):
    """'0-63,100' -> [0, ..., 63, 100]: comma-separated integers and inclusive ranges a-b."""
    seeds = []
    for part in str(text).split(','):
        m = re.fullmatch(r'\s*(\d+)\s*(?:-\s*(\d+)\s*)?', part)
        if not m or (m[2] is not None and int(m[2]) < int(m[1])):
            raise ValueError(f'bad seed list {text!r}: use integers and inclusive ranges, e.g. 0-63,100')
        seeds += range(int(m[1]), int(m[2] or m[1]) + 1)
    return seeds


def noise(seeds, shape, label_dim, class_idx=None, device='cpu'):
    """Unit latents z [B, *shape], one-hot labels [B, C] (or None) and the per-seed generators.

    Each seed s seeds its own torch.Generator(device) with s mod 2^32; it draws randn(shape) first,
    then (for a conditional model) a class uniformly from `label_dim`, exactly as EDM's
    generate.py does. The label is drawn even when `class_idx` then replaces it, so a stochastic
    sampler continues each generator from the same state with or without --class.
    """
    gens = [torch.Generator(device).manual_seed(int(s) % 2 ** 32) for s in seeds]
    z = torch.stack([torch.randn(shape, generator=g, device=device) for g in gens])
    labels = None
    if label_dim:
        idx = torch.stack([torch.randint(label_dim, size=[], generator=g, device=device) for g in gens])
        if class_idx is not None:
            idx = torch.full_like(idx, class_idx)
        labels = torch.eye(label_dim, device=device)[idx]
    return z, labels, gens


def to_uint8(x):
    """EDM's conversion of [-1, 1] images to pixels: x * 127.5 + 128, clipped, truncated to uint8."""
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8)


# ---------------------------------------------------------------------------------------------
# The sampling plan: schedule, solver, conditions and the true number of network calls
# ---------------------------------------------------------------------------------------------

@dataclass
class Plan:
    """How `generate` integrates, fixed before the first image, with its true cost per image."""
    solver: str            # a name in solvers.SOLVERS, or 'stochastic' (Meng's N-step sampler)
    t_steps: torch.Tensor  # the timestamps, t_max first (a trailing 0 for EDM-style sampling)
    afs: bool              # SFD's analytical first step (one call saved)
    cond: dict             # network conditions: step= (SFD-v), guidance= (a guided student)
    w: float = None        # classifier-free guidance (Meng's w), two calls per evaluation, or None
    nfe: int = 0           # network calls per image, the CFG doubling included

    def describe(self):
        t, n = [float(v) for v in self.t_steps], len(self.t_steps) - 1
        end = f'{t[-2]:g} -> 0' if t[-1] == 0 else f'{t[-1]:g}'
        what = f'{self.solver}, {n} steps from t={t[0]:g} to {end}' + (', AFS' if self.afs else '')
        if t[-1] == 0 and self.solver in ('heun', 'dpm2'):
            what += ' (the step to 0 is one-call Euler)'
        what += ''.join(f', {k}={v:g}' for k, v in self.cond.items())
        if self.w is not None:
            what += f', classifier-free guidance w={self.w:g} (2 calls per evaluation)'
        return f'{what}: NFE {self.nfe} per image'


def make_plan(net, sampling, nfe=None, guidance=None, uncond=None, stochastic=False):
    """Check the request against the model and fix schedule, conditions and cost (see Plan).

    `sampling` is a recipe (solvers.Recipe or its dict); `nfe` picks one of several (SFD-v).
    `guidance` is Meng's w (SFD's omega = 1 + w): a network input for a guided student
    (`net.use_guidance_condition`), else classifier-free guidance of a conditional model,
    D_w = (1 + w) D(x, c) - w D_u(x), at two calls per evaluation, D_u being `uncond` or the same
    network with a null (all-zero) label. `stochastic` selects Meng's stochastic N-step sampler
    over the recipe's schedule: N calls.
    """
    cond, w = {}, None
    if net.text and guidance is not None and not net.use_guidance_condition:
        w = float(guidance) if guidance != 0 else None  # a text model: CFG against the empty prompt
    elif net.use_guidance_condition:
        if guidance is None:
            raise ValueError('this model takes the guidance strength as an input: pass --guidance w '
                             "(Meng's w; w = 0 is the plain conditional model)")
        if uncond is not None:
            raise ValueError('--uncond is for classifier-free guidance; this model is guided by its input w')
        cond['guidance'] = float(guidance)
    elif guidance is not None:
        if not net.label_dim:
            raise ValueError('--guidance needs a class-conditional model (or a guided student); '
                             'this one is unconditional')
        w = float(guidance) if guidance != 0 or uncond is not None else None  # w = 0: D_w = D_c
    elif uncond is not None:
        raise ValueError('--uncond is the unconditional branch of classifier-free guidance: add --guidance w')
    recipe = solvers.Recipe.from_dict(sampling)
    if stochastic:  # Meng Eq. 4-7: N grid points below t_N = t_max, one call each
        recipe = dataclasses.replace(recipe, solver='stochastic', afs=False, ends_at_zero=False)
    own_grid = recipe.schedule not in solvers.SCHEDULES + ('discrete',)
    if own_grid and recipe.t_steps is None and (nfe or len(recipe.nfes()) == 1):
        # a grid of the model's own kind (a diffusers SFD-v student's, uniform in its timestep), this NFE
        nfe = nfe or recipe.nfes()[0]
        n = solvers.steps_for_nfe(recipe.solver, nfe, recipe.afs, recipe.ends_at_zero) - recipe.ends_at_zero
        t = net.schedule(n, recipe.t_min, recipe.t_max, recipe.schedule, recipe.rho)
        t = solvers.append_zero(t) if recipe.ends_at_zero else t
        recipe = dataclasses.replace(recipe, nfe=nfe, t_steps=t.tolist())
    t_steps, nfe, step = solvers.schedule_for(recipe, nfe)
    if recipe.solver == 'stochastic':
        calls = len(t_steps) - 1
    else:
        calls = solvers.nfe(recipe.solver, len(t_steps) - 1, recipe.afs, ends_at_zero=float(t_steps[-1]) == 0)
    if net.use_step_condition:
        # SFD-v (Alg. 6): the student is told its schedule through the step condition (the recipe's
        # stored value of this NFE; for an untrained NFE the number of timestamps, with a warning).
        cond['step'] = step.get('step', len(t_steps))
    return Plan(recipe.solver, t_steps, recipe.afs, cond, w, calls * (2 if w is not None else 1))


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def generate(net, seeds, sampling, nfe=None, class_idx=None, guidance=None, uncond=None, batch=64,
             device=None, stochastic=False, progress=True, raw=False, on_batch=None, return_labels=False,
             prompts=None):
    """Samples for `seeds`, in their order: uint8 images [N, C, H, W] (EDM's conversion, on the CPU),
    or float points [N, D] for a point model; `raw=True` returns the float images instead.

    Arguments as in make_plan; `class_idx` fixes the class of a conditional model (else one is
    drawn per seed); `device` defaults to the network's; `on_batch(seeds, samples, labels)` is
    called after every batch (sample.py's CLI writes PNGs there); `return_labels=True` returns
    (samples, class indices [N] or None). The state is integrated in float64 as in EDM's
    sampler, the network evaluated in its own dtype. A diffusers model (latent.Denoiser) starts
    from diffusers' prior, x = sqrt(1 + t_max^2) z, takes `prompts` (the i-th seed gets prompt i,
    cycling) if it is text-conditioned, and its final latents are decoded by its VAE.
    """
    device = torch.device(device) if device is not None else next(net.parameters()).device
    shape, label_dim = list(net.shape), net.label_dim
    if class_idx is not None and not 0 <= class_idx < label_dim:
        raise ValueError('--class needs a class-conditional model; this one is unconditional' if not label_dim
                         else f'class index {class_idx} is out of range: this model has {label_dim} classes')
    plan = make_plan(net, sampling, nfe, guidance, uncond, stochastic)
    text = net.text
    if text and not prompts:
        raise ValueError('this model is text-conditioned: give --prompt TEXT or --prompts FILE')
    if prompts and not text:
        raise ValueError('--prompt/--prompts are for text-conditioned (diffusers) models; this one takes none')
    dtype = next(net.parameters()).dtype
    D = lambda x, t, **c: net(x.to(dtype), t, **c)  # EDM casts the state to the network's dtype
    if plan.w is not None and text:  # SFD Eq. 9: D_u + omega (D_c - D_u), the empty prompt as D_u
        D = latent.guided(D, plan.w, net.encode_prompts(['']))
    elif plan.w is not None:  # Meng Sec. 2 / Ho & Salimans: (1 + w) D(x, c) - w D_u(x)
        D_u = None if uncond is None else (lambda x, t, **c: uncond(x.to(dtype), t, **c))
        D = solvers.guided(D, plan.w, uncond=D_u)
    vp = net.prior == 'vp'  # a pipeline's own prior; a distilled student starts as it was trained
    start = (lambda t: math.sqrt(1 + float(t) ** 2)) if vp else float  # diffusers' prior, or x = t_max z
    out, out_labels = [], []
    for i in tqdm(range(0, len(seeds), batch), unit='batch', disable=not progress or None, desc='sample'):
        chunk = seeds[i:i + batch]
        D_checked = finite_or_raise(D, chunk)
        z, labels, gens = noise(chunk, shape, label_dim, class_idx, device)
        cond = dict(plan.cond, **({'class_labels': labels} if label_dim else {}))
        if text:
            cond['encoder_hidden_states'] = net.encode_prompts([prompts[k % len(prompts)] for k in range(i, i + len(chunk))])
        x_T = start(plan.t_steps[0]) * z.to(torch.float64)
        if plan.solver == 'stochastic':  # fresh noise per step from each image's own generator
            x = solvers.stochastic_sample(D_checked, x_T, plan.t_steps, generator=gens, **cond)
        else:
            x = solvers.sample(D_checked, x_T, plan.t_steps, plan.solver, afs=plan.afs, **cond)
        # latents (or a VP pixel state) to images in [-1, 1]; a pixel model's x is its image
        x = net.decode(x, sigma=float(plan.t_steps[-1]) if vp else 0.0).to(torch.float64)
        out.append((x if raw or len(shape) == 1 else to_uint8(x)).cpu())
        out_labels.append(None if labels is None else labels.argmax(1).cpu())
        if on_batch is not None:
            on_batch(chunk, out[-1], out_labels[-1])
    x = torch.cat(out) if out else torch.empty(0, *shape)
    if return_labels:
        return x, (torch.cat(out_labels) if label_dim and out else None)
    return x


def finite_or_raise(D, seeds):
    """D, checked: the first non-finite denoiser output stops sampling, naming the step and seeds
    (a broken model must not write black images that FID would then score)."""
    def checked(x, t, **cond):
        out = D(x, t, **cond)
        if not torch.isfinite(out).all():
            bad = [s for s, ok in zip(seeds, torch.isfinite(out).flatten(1).all(1).tolist(), strict=True) if not ok]
            raise FloatingPointError(f'the model returned non-finite values at t={float(t.flatten()[0]):g} for '
                                     f'seeds {bad[:8]}{" ..." if len(bad) > 8 else ""}: check the model file')
        return out
    return checked


# ---------------------------------------------------------------------------------------------
# Writing samples: a grid, EDM's folder layout, an npz for fid.py. All atomic.
# ---------------------------------------------------------------------------------------------

def image_format(path, flag='the image'):
    """PIL's format for an image file name (.png -> PNG, .jpg -> JPEG); a suffix PIL cannot write
    (none, .npz) is refused rather than written as a PNG under a misleading name."""
    fmt = Image.registered_extensions().get(Path(path).suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise ValueError(f'{flag} {path}: give an image file name PIL can write (e.g. .png, .jpg, .webp), '
                         f'not {Path(path).suffix or "no suffix"!r}')
    return fmt


def _save_image(array, path):
    """One HWC uint8 array as an image; the format comes from the suffix."""
    fmt = image_format(path)
    img = Image.fromarray(array[:, :, 0], 'L') if array.shape[2] == 1 else Image.fromarray(array, 'RGB')
    data.atomic_write(path, lambda tmp: img.save(tmp, format=fmt))


def save_grid(images, path, cols=None):
    """uint8 images [N, C, H, W] as one near-square grid (ceil(sqrt N) columns, black padding)."""
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f'save_grid takes uint8 images [N, C, H, W], got {images.dtype} '
                         f'{list(images.shape)}')
    n = len(images)
    cols = cols or max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    pad = images.new_zeros(rows * cols - n, *images.shape[1:])
    grid = rearrange(torch.cat([images, pad]), '(r c) ch h w -> (r h) (c w) ch', r=rows, c=cols)
    _save_image(grid.numpy(), path)


def image_path(outdir, seed):
    """EDM's layout: one subfolder per 1000 seeds, e.g. seed 1234 -> 001000/001234.png."""
    return Path(outdir) / f'{seed - seed % 1000:06d}' / f'{seed:06d}.png'


def save_images(images, seeds, outdir):
    """One PNG per image, named by its seed (see image_path)."""
    for seed, img in zip(seeds, images, strict=True):
        _save_image(rearrange(img, 'c h w -> h w c').numpy(), image_path(outdir, seed))


def save_npz(path, samples, seeds, labels=None):
    """Images as uint8 [N, H, W, C] under fid.IMAGES_KEY (what fid.py reads), or float points
    [N, D] under 'points'; with the seeds and (conditional models) the class indices."""
    samples = torch.as_tensor(samples)
    arrays = dict(seeds=np.asarray(seeds, np.int64))
    if samples.ndim == 4:
        arrays[fid.IMAGES_KEY] = rearrange(samples, 'n c h w -> n h w c').numpy()
    else:
        arrays['points'] = samples.numpy()
    if labels is not None:
        arrays['labels'] = torch.as_tensor(labels).numpy().astype(np.int64)

    def write(tmp):
        with open(tmp, 'wb') as f:  # a file object, so numpy does not append '.npz' to tmp
            np.savez(f, **arrays)
    data.atomic_write(path, write)


# ---------------------------------------------------------------------------------------------
# Models and their sampling configuration
# ---------------------------------------------------------------------------------------------

def resolve_sampling(meta, nfe=None, net=None, **overrides):
    """The recipe to sample with: the model's own (meta['sampling']; EDM's sampler for a model
    without one), with the non-None `overrides` (solver, afs, schedule, rho, t_min, t_max,
    ends_at_zero). A teacher takes any `nfe`. A distilled student (meta has 'method', or a stored
    grid) was trained for its recipe: `nfe` picks one of its NFE (SFD-v); anything else is
    allowed but warned about."""
    r = solvers.Recipe.from_dict(meta.get('sampling') or solvers.Recipe())
    given = {k: v for k, v in overrides.items() if v is not None}
    if r.schedule == 'discrete' and (nfe is not None or given):  # a diffusers model: its own grid
        return discrete_recipe(r, net, nfe, given)
    if r.t_steps is not None and given.keys() & {'schedule', 'rho', 't_min', 't_max'}:
        raise ValueError('this student stores its time grid (t_steps): its schedule cannot be changed')
    if 'method' in meta or r.t_steps is not None:  # distilled (SFD: distill.py, Meng: guided_pd.py)
        name = meta.get('method') or meta.get('kind') or 'distilled'
        if given:
            warnings.warn(f"overriding the {name} student's sampling {r.to_dict()} with {given}: it was "
                          'distilled for its own recipe', stacklevel=2)
        if nfe is not None and nfe not in r.nfes():
            warnings.warn(f'this {name} student was distilled for NFE {r.nfes()}, not {nfe}', stacklevel=2)
    elif nfe is not None:
        r.nfe = nfe
    if 'solver' in given and 'ends_at_zero' not in given:  # a new solver ends where it usually does
        given['ends_at_zero'] = ends_at_zero_default(given['solver'])
    return dataclasses.replace(r, **given)


def discrete_recipe(recipe, net, nfe, given):
    """A diffusers model's recipe for another NFE or solver: diffusers' own grid of the matching
    step count (`latent.Denoiser.discrete_grid`), ending at 0; its schedule kind stays its own."""
    if given.keys() & {'schedule', 'rho', 't_min', 't_max'}:
        raise ValueError('a diffusers model samples its own discrete grid: --schedule, --rho, --t-min and '
                         '--t-max do not apply (choose --solver and --nfe)')
    r = dataclasses.replace(recipe, **given, ends_at_zero=True)
    nfe = nfe or r.nfes()[0]
    n = solvers.steps_for_nfe(r.solver, nfe, r.afs, ends_at_zero=True)
    return dataclasses.replace(r, nfe=nfe, t_steps=net.discrete_grid(n).tolist())


def read_prompts(prompt=None, path=None):
    """The prompts of --prompt TEXT or --prompts FILE (captions.read_captions: one per line, MS-COCO's
    captions JSON, or a .csv with a 'text' column, SFD's COCO file)."""
    if prompt is not None:
        return [prompt]
    return None if path is None else captions.read_captions(path, '--prompts')


# ---------------------------------------------------------------------------------------------
# Command line (and torchrun: rank r takes seeds[r::world])
# ---------------------------------------------------------------------------------------------

def check_output(path, flag):
    """Fail now, not after 50,000 samples: an output file (--grid, --npz) or folder (--outdir) must
    be writable where it is named (data.check_writable: nothing in the way, permission, a writable
    disk), and a file's suffix must say what it holds."""
    if path is None:
        return
    data.check_writable(path, flag, kind='folder' if flag == '--outdir' else 'file')
    if flag == '--npz':
        data.check_suffix(path, flag, ('.npz',), 'an npz of samples')
    elif flag == '--grid':
        image_format(path, flag)


def check_outdir(outdir):
    """An --outdir must hold no images: sampling into a folder of another model's (or seeds')
    images would mix the two sets, and FID would score the mixture."""
    found = data.image_files(outdir)
    if found:
        raise ValueError(f'--outdir {outdir} already holds {len(found)} images (e.g. '
                         f'{found[0].relative_to(outdir)}): choose an empty folder or delete it')


def warn_foreign_sampler(meta, stochastic):
    """--stochastic on a student distilled for a deterministic grid (an SFD student: Euler over its
    own schedule; a DDIM stage-two student) samples it with a sampler it was not trained for: say so."""
    recipe = solvers.Recipe.from_dict(meta.get('sampling') or solvers.Recipe())
    distilled = 'method' in meta or meta.get('kind') == 'guided-stage2' or recipe.t_steps is not None
    if stochastic and distilled and recipe.solver != 'stochastic':
        name = meta.get('method') or meta.get('kind') or 'distilled'
        warnings.warn(f'--stochastic: this {name} student was distilled for its deterministic '
                      f"{recipe.solver} grid, not for Meng's stochastic sampler; its samples will be worse "
                      '(drop --stochastic)',
                      stacklevel=2)


def parse_args(argv=None):
    """The command line of sample.py."""
    p = cli.parser(__doc__)
    p.add_argument('--model', default='cifar10-32x32-uncond-vp', help='a model spec (python models.py -h)')
    p.add_argument('--seeds', default='0-63', help='e.g. 0-63,100 (inclusive ranges)')
    p.add_argument('--batch', type=int, default=64, help='images per batch and process')
    p.add_argument('--nfe', type=int, help='network calls per image (teachers: 35; SFD-v: pick one)')
    p.add_argument('--solver', choices=list(solvers.SOLVERS), help='teachers: heun (EDM)')
    p.add_argument('--schedule', choices=solvers.SCHEDULES, help='teachers: polynomial')
    p.add_argument('--rho', type=float, help='teachers: 7')
    p.add_argument('--t-min', type=float, help='teachers: 0.002 (EDM)')
    p.add_argument('--t-max', type=float, help='teachers: 80')
    p.add_argument('--afs', action=argparse.BooleanOptionalAction, help="SFD's analytical first step")
    p.add_argument('--end-at-zero', dest='ends_at_zero', action=argparse.BooleanOptionalAction,
                   help='append t = 0 (default: yes for heun/dpm2/euler as EDM, no for multistep)')
    p.add_argument('--stochastic', action='store_true', help="Meng et al.'s stochastic N-step sampler")
    p.add_argument('--class', dest='class_idx', type=int, help='class index (default: random per seed)')
    p.add_argument('--guidance', type=float, help="guidance weight, Meng's w (SFD's omega = 1 + w)")
    p.add_argument('--uncond', help='unconditional model for classifier-free guidance (default: null label)')
    p.add_argument('--prompt', help='text-conditioned models (Stable Diffusion): one prompt for every seed')
    p.add_argument('--prompts', help='a file of prompts (one per line, COCO captions .json, .csv with '
                                     "'text'): seed i gets prompt i")
    p.add_argument('--grid', help='write a PNG grid of all images here')
    p.add_argument('--outdir', help='write one PNG per image: DIR/000000/000123.png (EDM layout)')
    p.add_argument('--npz', help='write uint8 NHWC images (or 2-D points) for fid.py here')
    p.add_argument('--device', default='auto', help='auto: cuda if available, else cpu')
    p.add_argument('--compile', action='store_true',
                   help='torch.compile the network(s): same numbers, faster for many images (slow start)')
    p.add_argument('--quiet', action='store_true', help='no progress bar')
    return p.parse_args(argv)


def check_args(args):
    """Every check a user can fail, before any model is loaded or sample drawn; the seeds."""
    if not (args.grid or args.outdir or args.npz):
        raise ValueError('no output requested: add --grid FILE.png, --outdir DIR and/or --npz FILE.npz')
    if args.batch < 1:
        raise ValueError(f'--batch {args.batch}: need at least one image per batch')
    for value, flag in ((args.nfe, '--nfe'), (args.rho, '--rho'), (args.t_min, '--t-min'), (args.t_max, '--t-max')):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f'{flag} {value}: must be positive and finite')
    if args.guidance is not None and not (math.isfinite(args.guidance) and args.guidance >= 0):
        raise ValueError(f"--guidance {args.guidance}: Meng's w must be finite and >= 0")
    seeds = parse_seeds(args.seeds)
    if args.prompt is not None and args.prompts:
        raise ValueError('give --prompt or --prompts, not both')
    for path, flag in ((args.grid, '--grid'), (args.outdir, '--outdir'), (args.npz, '--npz')):
        check_output(path, flag)
    if args.outdir:
        check_outdir(args.outdir)
    for spec in (args.model, args.uncond):  # an unknown spec or an unusable cache, before any download
        if spec:
            models.check_spec(spec)
    return seeds


def gather_in_seed_order(x, labels, n, world):
    """Every rank's share (seeds[r::world]) back in seed order, on every rank."""
    shares = [None] * world
    dist.all_gather_object(shares, (x, labels))
    order = torch.cat([torch.arange(r, n, world) for r in range(world)])  # seeds[r::world]
    unshuffle = lambda parts: torch.cat(parts).index_copy(0, order, torch.cat(parts))
    return unshuffle([x_r for x_r, _ in shares]), None if labels is None else unshuffle([y for _, y in shares])


def main(argv=None):
    args = parse_args(argv)
    seeds = check_args(args)
    prompts = read_prompts(args.prompt, args.prompts)
    per_seed = None if prompts is None else [prompts[j % len(prompts)] for j in range(len(seeds))]
    rank, world, device = cli.init_distributed(cli.device(args.device))
    net, meta = cli.rank_zero_first(lambda: models.load(args.model, device))  # rank 0 downloads first
    uncond = cli.rank_zero_first(lambda: models.load(args.uncond, device)[0]) if args.uncond else None
    if args.compile:  # fused kernels; attributes (label_dim, conditions) still read through the wrapper
        net, uncond = torch.compile(net), uncond if uncond is None else torch.compile(uncond)
    sampling = resolve_sampling(meta, args.nfe, net, solver=args.solver, schedule=args.schedule, rho=args.rho,
                                t_min=args.t_min, t_max=args.t_max, afs=args.afs,
                                ends_at_zero=args.ends_at_zero)
    if len(meta['shape']) == 1 and (args.grid or args.outdir):
        raise ValueError('this model makes 2-D points, not images: use --npz')
    plan = make_plan(net, sampling, args.nfe, args.guidance, uncond, args.stochastic)
    if rank == 0:
        warn_foreign_sampler(meta, args.stochastic)
        print(f'{args.model}: {len(seeds)} samples; {plan.describe()}')
    info = dict(model=args.model, seeds=args.seeds, sampler=plan.describe())
    if args.outdir:  # "started, not finished" first: an interrupted folder is never taken as a set
        start_sample_set(args.outdir, rank, info)
    write = (lambda s, x, y: save_images(x, s, args.outdir)) if args.outdir else None
    x, labels = generate(net, seeds[rank::world], sampling, args.nfe, args.class_idx, args.guidance, uncond,
                         args.batch, device, args.stochastic, progress=not args.quiet and rank == 0,
                         on_batch=write, return_labels=True,
                         prompts=None if prompts is None else per_seed[rank::world])
    if world > 1 and (args.npz or args.grid):  # rank 0 puts every rank's share back in seed order
        x, labels = gather_in_seed_order(x, labels, len(seeds), world)
    if dist.is_initialized():
        dist.barrier()  # every rank's images are written
    if rank == 0:
        if args.npz:
            save_npz(args.npz, x, seeds, labels)
        if args.grid:
            save_grid(x, args.grid)
        if args.outdir:  # the marker of a complete set, last
            finish_sample_set(args.outdir, info, len(seeds), list(x.shape[1:]))
        print('wrote ' + ', '.join(f for f in (args.grid, args.outdir, args.npz) if f))
    if dist.is_initialized():
        dist.barrier()
    cli.close_distributed()
    return x


def start_sample_set(outdir, rank, info):
    """Rank 0 marks --outdir as an unfinished set before any rank writes an image into it."""
    if rank == 0:
        data.mark_sample_set(outdir, complete=False, **info)
    if dist.is_initialized():
        dist.barrier()


def finish_sample_set(outdir, info, count, shape):
    """Mark --outdir complete (data.mark_sample_set), once every image is there: fid.py scores it then."""
    found = len(data.image_files(outdir))
    if found != count:
        raise ValueError(f'--outdir {outdir} holds {found} images after writing {count}: another process '
                         'wrote there too; sample again into an empty folder')
    data.mark_sample_set(outdir, complete=True, count=count, image_shape=shape, **info)


if __name__ == '__main__':
    cli.run(main)
