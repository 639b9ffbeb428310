"""Every model the project can name: one spec string -> (network, metadata), and model files.

A *spec* names a model wherever one is expected (`--teacher`, `--model`, `--uncond`, notebooks):

    toy:<name>[:cond]         a teacher of toy.py's worlds (2-D points; cifar10-16, cifar10-32 images),
                              trained once and cached; :cond is the class-conditional one with label
                              dropout (its own CFG pair)
    cifar10, cifar10-cond ... an alias or preset of NVIDIA's EDM networks (EDM_ALIASES, EDM_PRESETS;
                              edm-<preset> works too), downloaded once (data.download)
    path/to/net.pkl, https://...pkl
                              an EDM network pickle, read as data: no code from the file runs
    path/to/model.pt          a file of ours (save_model): teachers, SFD and guided students
    owner/name, path/to/pipeline/
                              a diffusers pipeline (hub.py, latent.py; the optional extra): Stable
                              Diffusion, latent and pixel DDPMs, from the hub or a save_pretrained folder
    runs/<run>/student/       a distilled diffusers student (hub.save_student: its UNet in diffusers'
                              format, its recipe, and the base pipeline its VAE and text encoder are from)
                              or a LoRA student (hub.save_lora_student: adapters in diffusers' LoRA format
                              on its base pipeline, folded in when loaded; needs requirements-lora.txt)

`load(spec)` is the one loader: it returns a network implementing the `Denoiser` protocol (written
down below: the call, its metadata, conditions, grid, decode) in eval mode, frozen, and metadata
that always holds `source`, `shape` (one sample's shape) and `sampling` (a solvers.Recipe as a
dict: how to sample it; EDM's sampler for a teacher). The table KINDS lists the forms in the order
they are tried; a new kind of model is one row. `save_student` writes any trained denoiser back as
a spec. Our files are torch.save dicts of tensors and plain values that torch.load(weights_only=True)
reads: the constructor keywords, the state dict, and the metadata (sampling recipe, lineage).

    python models.py cifar10          # download (once), load, print what the spec resolved to
"""

import argparse
import collections
import hashlib
import io
import itertools
import json
import pickle
import shutil
import sys
import textwrap
import time
import typing
from pathlib import Path

import numpy as np
import torch

import data
import hub
import latent
import model_cards
import solvers
import toy
import unet

# ---------------------------------------------------------------------------------------------
# The denoiser protocol: what every network `load` returns offers, and all the algorithms use
# ---------------------------------------------------------------------------------------------

@typing.runtime_checkable
class Denoiser(typing.Protocol):
    """A denoiser D(x; sigma): the estimate of the clean sample x0 from x = x0 + sigma eps.

    EDM's form (Karras et al. 2022; SFD Eq. 2-4): the probability-flow ODE every solver of
    solvers.py integrates is dx/dsigma = (x - D(x; sigma)) / sigma, so SFD (distill.py), Meng et
    al. (guided_pd.py) and sample.py need nothing from a network but the members below; they never
    ask which kind it is. Two classes implement it: unet.EDMPrecond (EDM's U-Nets and the toy MLP)
    and latent.Denoiser (diffusers UNets: Stable Diffusion's latents, pixel DDPMs).
    isinstance(net, Denoiser) checks that every member is there.

    Two optional members, present where they make sense:
      encode_prompts(prompts: list[str]) -> tensor [len(prompts), L, D]
            the encoder_hidden_states of prompts (a model with `text`; [""] is the unconditional
            branch of classifier-free guidance).
      schedule(n, t_min, t_max, kind, rho) -> t_steps float64 [n + 1], t_max down to t_min
            a grid of a kind of the model's own (latent.UNIFORM: uniform in a diffusers UNet's
            timestep, SFD App. D.2). Callers use solvers.time_schedule for kinds in
            solvers.SCHEDULES and net.schedule(...) for any other; an unknown kind is a ValueError.
    """

    # One sample's shape: [3, 32, 32] for CIFAR-10, [2] for toy points, [4, 64, 64] for SD's latents.
    shape: list
    # Classes of the class_labels condition (one-hot [B, label_dim] or integers [B]); 0: none.
    label_dim: int
    # The data's standard deviation in EDM's preconditioning (0.5 for images in [-1, 1]; 1 for
    # diffusers models, whose latents have unit scale); EDM's loss weight uses it (guided_pd.py).
    sigma_data: float
    # The noise levels it accepts: EDMPrecond takes any (NVIDIA's files say 0 and inf; EDM trained
    # on [0.002, 80]); a diffusers model knows only [sigma_0, sigma_{T-1}] of its T levels.
    sigma_min: float
    sigma_max: float
    # Does it take encoder_hidden_states= (a text-to-image model)? Then it has encode_prompts.
    text: bool
    # SFD-v (SFD Alg. 6): the student is told its step count, net(x, sigma, step=N).
    use_step_condition: bool
    # Meng et al. Sec. 3.1: the stage-one student takes the guidance weight, net(x, sigma, guidance=w).
    use_guidance_condition: bool
    # Where sampling starts: 'edm' x = t_max z (EDM nets, every SFD student); 'vp' x = sqrt(1 +
    # t_max^2) z, a diffusers pipeline's own prior (its VP latent, decoded at that level).
    prior: str

    def __call__(self, x, sigma, **cond):
        """x0_hat = D(x; sigma), shaped like x [B, *shape]. sigma: a float or [B]. cond: among
        class_labels, step, guidance, encoder_hidden_states -- only the ones this model takes."""

    def enable_step_condition(self):
        """Add the step condition as an exact no-op (zero-initialised: D unchanged); returns self."""

    def enable_guidance_condition(self):
        """Add the guidance-weight condition as an exact no-op; returns self."""

    def decode(self, x, sigma=0.0):
        """Images in about [-1, 1] of a final sample x at noise level sigma (0 but for a 'vp' prior's
        VP latent): x itself for pixel models, the VAE's decoding for latent models."""

# ---------------------------------------------------------------------------------------------
# Our own model files
# ---------------------------------------------------------------------------------------------

FORMAT = 'diffdistill-model-v1'


def _check_plain(value, where):
    """Raise unless `value` is something torch.load(weights_only=True) reads back (np.float64 is not)."""
    if isinstance(value, (list, tuple, dict)):
        for k, v in value.items() if isinstance(value, dict) else enumerate(value):
            _check_plain(v, f'{where}[{k!r}]')
    elif type(value) not in (str, int, float, bool, type(None)) and not isinstance(value, torch.Tensor):
        raise TypeError(f'{where} is a {type(value).__name__}: save only plain Python values and tensors')


def save_model(path, net, **meta):
    """Write EDMPrecond `net` and plain metadata `meta` to `path` atomically: constructor keywords
    (conditions included), state dict, meta. A `sampling` entry may be a solvers.Recipe."""
    if isinstance(meta.get('sampling'), solvers.Recipe):
        meta['sampling'] = meta['sampling'].to_dict()
    _check_plain(net.init_kwargs, 'init_kwargs')
    _check_plain(meta, 'meta')
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    ckpt = dict(format=FORMAT, init_kwargs=net.init_kwargs, state_dict=state, meta=meta)
    return data.atomic_write(path, lambda tmp: torch.save(ckpt, tmp))


def _build(init_kwargs, state_dict, device):
    """EDMPrecond(**init_kwargs) holding exactly `state_dict` (strict), built without a random init."""
    with torch.device('meta'):
        net = unet.EDMPrecond(**init_kwargs)
    net.load_state_dict(state_dict, strict=True, assign=True)
    if any(t.is_meta for t in itertools.chain(net.parameters(), net.buffers())):  # e.g. unsaved buffers
        net = unet.EDMPrecond(**init_kwargs)
        net.load_state_dict(state_dict, strict=True)
    return net.to(device).eval()


def _read(path, mmap=False):
    """The checkpoint dict of one of our files, or one clear error naming the file."""
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
    except Exception as e:
        reason = (str(e).strip().splitlines() or [''])[0][:100]
        raise ValueError(f'{path} is not a readable model file ({type(e).__name__}: {reason}); expected '
                         'one written by this project (NVIDIA EDM networks are .pkl files)') from e
    if not isinstance(ckpt, dict) or ckpt.get('format') != FORMAT:
        raise ValueError(f'{path} was not written by this project (no {FORMAT!r} marker)')
    return ckpt


def load_model(path, device='cpu'):
    """Read a save_model file (weights only): (EDMPrecond in eval mode on `device`, its meta)."""
    ckpt = _read(path)
    try:
        return _build(ckpt['init_kwargs'], ckpt['state_dict'], device), ckpt['meta']
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        raise ValueError(f'{path}: its network does not match this code ({type(e).__name__}: {e})') from e


def load_meta(path):
    """A model file's metadata without reading its weights (memory-mapped)."""
    return _read(path, mmap=True)['meta']


# ---------------------------------------------------------------------------------------------
# NVIDIA's EDM pickles, read as data: no code from the file ever runs
# ---------------------------------------------------------------------------------------------

# NVIDIA's official EDM networks (EDM README); 'vp' / 've' name the DDPM++ / NCSN++ architecture,
# all use EDM's preconditioning. The file names are edm-<preset>.pkl.
EDM_PRESETS = ('cifar10-32x32-uncond-vp', 'cifar10-32x32-cond-vp', 'cifar10-32x32-uncond-ve',
               'cifar10-32x32-cond-ve', 'ffhq-64x64-uncond-vp', 'ffhq-64x64-uncond-ve',
               'afhqv2-64x64-uncond-vp', 'afhqv2-64x64-uncond-ve', 'imagenet-64x64-cond-adm')
# NVIDIA publishes no checksums for these files, so downloads are not sha256-verified.
EDM_URL = 'https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-{}.pkl'
EDM_ALIASES = {'cifar10': 'cifar10-32x32-uncond-vp', 'cifar10-uncond': 'cifar10-32x32-uncond-vp',
               'cifar10-cond': 'cifar10-32x32-cond-vp', 'cifar10-uncond-ve': 'cifar10-32x32-uncond-ve',
               'cifar10-cond-ve': 'cifar10-32x32-cond-ve', 'ffhq': 'ffhq-64x64-uncond-vp',
               'ffhq-ve': 'ffhq-64x64-uncond-ve', 'afhqv2': 'afhqv2-64x64-uncond-vp',
               'afhqv2-ve': 'afhqv2-64x64-uncond-ve', 'imagenet': 'imagenet-64x64-cond-adm'}


class _Record:
    """One pickled object kept as data: class name and attribute dict (`state`). torch's ModuleDict
    arrives as NEWOBJ + BUILD(__dict__) and lands here; EDM's classes via _persistent_object."""
    class_name = 'ModuleDict'

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise pickle.UnpicklingError('malformed module state')
        self.state = state


def _persistent_object(meta):
    """Stands in for torch_utils.persistence._reconstruct_persistent_obj, which would exec()
    meta['module_src'] (EDM's networks.py) to rebuild the class: we keep the state, unexecuted."""
    if not (isinstance(meta, dict) and meta.get('type') == 'class' and meta.get('version') == 6
            and isinstance(meta.get('class_name'), str)):
        raise pickle.UnpicklingError('malformed persistent object')
    record = _Record()
    record.__setstate__(meta.get('state'))
    record.class_name = meta['class_name']
    return record


def _rebuild_tensor(storage, offset, size, stride, *_):
    """torch._utils._rebuild_tensor_v2 plus bounds checks (Tensor.set_ alone would read past the storage)."""
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))  # the last element's index
    if not isinstance(storage, torch.storage.TypedStorage) or offset < 0 or min(stride, default=0) < 0 or (
            min(size, default=1) > 0 and last >= storage.size()):
        raise pickle.UnpicklingError('malformed tensor record')
    return torch.empty(0, dtype=storage.dtype).set_(storage._untyped_storage, offset, size, stride)


def _numpy_scalar(dtype, data):
    """numpy's scalar(dtype, raw bytes) -> a Python number (EDM stores e.g. skip_scale as np.float64)."""
    if not (isinstance(dtype, np.dtype) and dtype.kind in 'biuf' and isinstance(data, bytes)):
        raise pickle.UnpicklingError('unexpected numpy scalar')
    return np.frombuffer(data, dtype)[0].item()


# Exactly the globals an EDM snapshot uses, each mapped to a harmless stand-in (data.RestrictedUnpickler).
EDM_GLOBALS = {('torch_utils.persistence', '_reconstruct_persistent_obj'): _persistent_object,
               ('torch.nn.modules.container', 'ModuleDict'): _Record,
               ('collections', 'OrderedDict'): collections.OrderedDict, ('builtins', 'set'): set,
               ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
               ('torch._utils', '_rebuild_parameter'): lambda data, *_: data,  # drops hooks and grad flags
               # each storage is a legacy torch.save stream of its own, read weights-only
               ('torch.storage', '_load_from_bytes'): lambda blob: torch.load(io.BytesIO(blob), 'cpu',
                                                                               weights_only=True),
               ('numpy', 'dtype'): np.dtype,
               ('numpy.core.multiarray', 'scalar'): _numpy_scalar,  # numpy 1.x (the 2022 files)
               ('numpy._core.multiarray', 'scalar'): _numpy_scalar}  # numpy 2


def _state_dict(record, prefix='', out=None):
    """Walk a record tree as nn.Module.state_dict does: parameters, persistent buffers, children."""
    st, out = record.state, {} if out is None else out
    hidden = st.get('_non_persistent_buffers_set') or set()
    for name, t in itertools.chain((st.get('_parameters') or {}).items(), (st.get('_buffers') or {}).items()):
        if t is not None and name not in hidden:
            if not isinstance(t, torch.Tensor):
                raise ValueError(f'{prefix}{name} is not a tensor')
            out[prefix + name] = t
    for name, child in (st.get('_modules') or {}).items():
        if child is not None:
            if not isinstance(child, _Record):
                raise ValueError(f'{prefix}{name} is not a module')
            _state_dict(child, f'{prefix}{name}.', out)
    return out


def read_edm_pickle(path):
    """An EDM snapshot's 'ema' network as data: (init_kwargs, state_dict). Runs nothing from the file."""
    try:
        with open(path, 'rb') as f:
            snapshot = data.RestrictedUnpickler(f, EDM_GLOBALS, 'an EDM network file').load()
        ema = snapshot['ema']
        if not isinstance(ema, _Record) or ema.class_name != 'EDMPrecond':
            found = getattr(ema, 'class_name', type(ema).__name__)
            raise ValueError(f'"ema" is a {found}, not an EDMPrecond (VP/VE/iDDPM baselines are unsupported)')
        if not isinstance(ema.state.get('_init_kwargs'), dict):
            raise ValueError('the network records no constructor keywords')
        return dict(ema.state['_init_kwargs']), _state_dict(ema)
    except Exception as e:
        raise ValueError(f'{path} is not a loadable EDM network pickle: {type(e).__name__}: {e}') from e


def load_edm(source, device='cpu'):
    """NVIDIA's EDM network as our EDMPrecond (eval mode, on `device`) from a .pkl path or URL
    (downloaded once by data.download). Only the snapshot's 'ema' is read."""
    path = data.download(source)
    kwargs, state = read_edm_pickle(path)
    try:
        return _build(kwargs, state, device)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f'{path}: its network ({kwargs}) does not match our EDM classes: {e}') from e


# ---------------------------------------------------------------------------------------------
# Specs: one table of kinds, tried in order
# ---------------------------------------------------------------------------------------------

def _edm_name(spec):
    """The preset an alias or preset names (with or without the edm- prefix), else None."""
    name = EDM_ALIASES.get(spec, spec.removeprefix('edm-'))
    return name if name in EDM_PRESETS else None


def _is_file(spec, *suffixes):
    path = Path(spec).expanduser()
    return path.suffix in suffixes and ('://' in spec or path.is_file())


def _toy_teacher(spec):
    """(world name, its teacher's settings, the cached file) of a toy spec; an unknown one is refused."""
    name, _, flag = spec[4:].partition(':')
    if name not in toy.WORLDS or flag not in ('', 'cond'):
        raise ValueError(f'unknown toy spec {spec!r}: use toy:<name> or toy:<name>:cond with a name in '
                         f'{toy.WORLDS}')
    settings = toy.teacher_settings(name, cond=flag == 'cond')
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return name, settings, data.cache_root() / 'toy' / f'toy-{name}{"-" + flag if flag else ""}-{key}.pt'


def _load_toy(spec, device):
    """A toy teacher (2-D: ~30 s; toy:cifar10-16: ~16 min on 2 cores), trained once
    (toy.train_teacher) and cached in <download cache>/toy under a hash of its settings, so tests,
    notebooks and every CLI share one copy."""
    name, settings, path = _toy_teacher(spec)
    if path.is_file():
        return load_model(path, device)
    data.check_cache()  # the cache must take the teacher: refused now, not after its training
    run_dir = path.with_suffix('.run')  # its snapshots: an interrupted training continues from them
    print(f'{spec}: training this teacher once (2-D: ~30 s; cifar10-16: ~16 min on 2 CPU cores); it is '
          f'cached as {path} for every later use; snapshots in {run_dir}', file=sys.stderr)
    t0 = time.time()
    net = toy.train_teacher(settings, device=device, run_dir=run_dir)
    meta = dict(kind='toy-teacher', toy=name, train=settings, shape=toy.sample_shape(name),
                train_seconds=time.time() - t0, train_threads=torch.get_num_threads(),
                train_device=str(device),
                sampling=solvers.Recipe().to_dict())  # EDM's sampler
    save_model(path, net, **meta)
    shutil.rmtree(run_dir, ignore_errors=True)  # the teacher is cached: its snapshots are done with
    return net, meta


def _load_edm_spec(spec, device):
    name = _edm_name(spec)
    net = load_edm(EDM_URL.format(name) if name else spec, device)
    return net, dict(kind='edm', preset=name)


def _load_ours(spec, device):
    return load_model(data.download(spec), device)


# kind: (the form, as the error message lists it; does a spec have this form?; load(spec, device))
KINDS = {
    'toy': ('toy:<name>[:cond] (name in ' + ', '.join(toy.WORLDS) + ')',
            lambda s: s.startswith('toy:'), _load_toy),
    'edm': ('an EDM preset or alias (' + ', '.join(EDM_ALIASES) + ', or edm-<preset>)',
            lambda s: _edm_name(s) is not None, _load_edm_spec),
    'pickle': ('an EDM network .pkl file or URL', lambda s: _is_file(s, '.pkl'), _load_edm_spec),
    'ours': ("a model file of this project (.pt), e.g. runs/<run>/student.pt",
             lambda s: _is_file(s, '.pt', '.pth'), _load_ours),
    'diffusers': ('a diffusers pipeline: a hub id (owner/name, e.g. '
                  'stable-diffusion-v1-5/stable-diffusion-v1-5), a folder with model_index.json, or a '
                  'distilled student folder, runs/<run>/student, full or LoRA (needs pip install -r '
                  'requirements-latent.txt; a LoRA student also requirements-lora.txt)',
                  hub.is_spec, hub.load),
}


def kind_of(spec):
    """The KINDS entry a spec has, or one error listing every accepted form."""
    spec = str(spec)
    for kind, (_, matches, _) in KINDS.items():
        if matches(spec):
            return kind
    missing = ' (no such file)' if Path(spec).suffix in ('.pt', '.pth', '.pkl') else ''
    forms = '; '.join(form for form, _, _ in KINDS.values())
    raise ValueError(f'unknown model {spec!r}{missing}: expected {forms}')


def check_spec(spec):
    """A spec checked without loading anything (what a CLI calls before slow work): its form
    (kind_of) and, where loading it would write into the download cache (a toy teacher not yet
    trained, an EDM network not yet downloaded), a cache that can be written. Returns its kind."""
    spec = str(spec)
    kind = kind_of(spec)
    if kind == 'toy':
        cached = _toy_teacher(spec)[2]
    elif kind in ('edm', 'pickle') and (_edm_name(spec) or '://' in spec):
        url = EDM_URL.format(_edm_name(spec)) if _edm_name(spec) else spec
        cached = data.cache_root() / Path(url.split('?')[0]).name
    else:
        return kind
    if not cached.is_file():
        data.check_cache()
    return kind


def shape_of(net):
    """One sample's shape: the protocol's `net.shape`, as a list."""
    return list(net.shape)


def load(spec, device='cpu'):
    """(network in eval mode with frozen weights, metadata) for any spec (see the module doc).

    The metadata always has `source` (the spec), `shape` and `sampling` (a complete recipe dict,
    old files' recipes upgraded); a file's own metadata is kept as written otherwise."""
    spec = str(spec)
    net, meta = KINDS[kind_of(spec)][2](spec, device)
    meta = dict(meta)
    meta['source'] = spec
    meta['shape'] = list(meta.get('shape') or shape_of(net))
    meta['sampling'] = solvers.Recipe.from_dict(meta.get('sampling') or solvers.Recipe()).to_dict()
    return net.eval().requires_grad_(False), meta


def toy_world(spec):
    """The toy data set behind a spec (toy:<name>[:cond], or a model file distilled from one: its
    metadata names its teacher), else None. Reads no weights."""
    spec = str(spec)
    if spec.startswith('toy:'):
        return spec[4:].split(':')[0]
    if _is_file(spec, '.pt', '.pth') and '://' not in spec:
        meta = load_meta(spec)
        return meta.get('toy') or toy_world(meta.get('teacher', ''))
    return None


# ---------------------------------------------------------------------------------------------
# Saving a trained denoiser as a spec
# ---------------------------------------------------------------------------------------------

def save_student(folder, name, net, **meta):
    """Write a trained denoiser so that `load` reads it back, with its model card; returns the spec's path.

    An EDM-style network (unet.EDMPrecond) becomes our file folder/<name>.pt (`save_model`; the card
    is folder/README.md); a diffusers denoiser (latent.Denoiser) the student folder folder/<name>
    (hub.save_student: diffusers' own format; its card inside). meta: plain data (the sampling
    recipe, lineage, ...); its `prior` ('vp': started as diffusers starts, from sqrt(1 + t_max^2) z;
    'edm': from t_max z) is the diffusers student's, and an EDM-style network, always started from
    t_max z, drops it.
    """
    folder = Path(folder)
    if isinstance(meta.get('sampling'), solvers.Recipe):
        meta['sampling'] = meta['sampling'].to_dict()
    if isinstance(net, unet.EDMPrecond):
        meta.pop('prior', None)
        path = save_model(folder / f'{name}.pt', net, **meta)
        write_card(folder, meta, str(path))
        return path
    if isinstance(net, latent.Denoiser):
        path = hub.save_student(folder / name, net, **meta)
        write_card(path, dict(meta, diffusers=True, base=net.base, text=net.text,
                              lora=getattr(net, 'lora', None),
                              stock_pipeline=_stock_pipeline(path, net.text)), str(path), run_dir=folder)
        return path
    raise TypeError(f'save_student: a {type(net).__name__} is neither unet.EDMPrecond nor latent.Denoiser')


def _stock_pipeline(path, text):
    """How a student folder runs in a stock diffusers pipeline: 'direct' (its StudentScheduler),
    'export' (stock_pipelines.export first), 'teacher' (the teacher's scheduler), or None."""
    config = json.loads((Path(path) / 'scheduler' / 'scheduler_config.json').read_text())
    if config.get('_class_name') != 'StudentScheduler':
        return 'teacher'
    if config['solver'] != 'euler':
        return None
    return 'export' if config['step_values'] or not text else 'direct'


def stored_meta(spec):
    """The stored metadata of a model file of ours or a student folder, else None (reads no weights)."""
    spec = str(spec)
    try:
        if _is_file(spec, '.pt', '.pth') and '://' not in spec:
            return load_meta(spec)
        if hub.is_student(spec):
            return json.loads((Path(spec).expanduser() / hub.STUDENT_FILE).read_text()).get('meta')
    except (OSError, ValueError, KeyError):
        return None
    return None


def write_card(folder, meta, model, run_dir=None):
    """folder/README.md, the model card of the student `model` (model_cards.write_card), its licence
    followed back to the first teacher."""
    teacher = meta.get('teacher') or meta.get('base') or ''
    return model_cards.write_card(folder, meta, model, run_dir,
                                  model_cards.licence(teacher, kind_of, stored_meta))


def spec_forms():
    """The accepted spec forms (KINDS), one per line: what `python models.py -h` lists."""
    return '\n'.join(textwrap.fill(form, 100, initial_indent=f'  {kind:10} ', subsequent_indent=' ' * 13,
                                   break_on_hyphens=False)
                     for kind, (form, _, _) in KINDS.items())


def main(argv=None):
    """python models.py SPEC [--device D]: resolve, load and describe a model spec."""
    import cli  # layer 1: the one-line errors and devices every CLI shares
    p = cli.Parser(description='Resolve a model spec, load it and describe it.',
                   formatter_class=argparse.RawDescriptionHelpFormatter,
                   epilog='A spec is one of these forms (tried in this order):\n' + spec_forms())
    p.add_argument('spec', nargs='?', default='cifar10', help='a model spec (default: %(default)s)')
    p.add_argument('--device', default='cpu', help='cpu, cuda, cuda:<index> or auto (default: %(default)s)')
    args = p.parse_args(argv)
    device = cli.device(args.device)
    check_spec(args.spec)
    net, meta = load(args.spec, device)
    print(f'{args.spec}: {kind_of(args.spec)}, {type(getattr(net, "model", net)).__name__}, '
          f'{sum(p.numel() for p in net.parameters()):,} parameters, sample shape {meta["shape"]}')
    print(f'sampling: {meta["sampling"]}')
    return net, meta


if __name__ == '__main__':
    import cli
    cli.run(main)
