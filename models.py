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
                              a diffusers pipeline (latent.py; the optional extra): Stable Diffusion,
                              latent and pixel DDPMs, from the hub or a save_pretrained folder
    runs/<run>/student/       a distilled diffusers student (latent.save_student: its UNet in diffusers'
                              format, its recipe, and the base pipeline its VAE and text encoder are from)

`load(spec)` is the one loader: it returns the network in eval mode, frozen, and metadata that
always holds `source`, `shape` (one sample's shape) and `sampling` (a solvers.Recipe as a dict:
how to sample it; EDM's sampler for a teacher). The table KINDS lists the forms in the order they
are tried; a new kind of model is one row. Our files are torch.save dicts of tensors and plain
values that torch.load(weights_only=True) reads: the constructor keywords, the state dict, and
the metadata (sampling recipe, lineage).

    python models.py cifar10          # download (once), load, print what the spec resolved to
"""

import argparse
import collections
import hashlib
import io
import itertools
import json
import pickle
import time
from pathlib import Path

import numpy as np
import torch

import data
import latent
import solvers
import toy
import unet

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


class _EDMUnpickler(pickle.Unpickler):
    """Allows exactly the globals an EDM snapshot uses, each mapped to a harmless stand-in."""
    ALLOWED = {('torch_utils.persistence', '_reconstruct_persistent_obj'): _persistent_object,
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

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f'refusing global {module}.{name}: not part of an EDM network file')
        return self.ALLOWED[module, name]


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
            snapshot = _EDMUnpickler(f).load()
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


def _load_toy(spec, device):
    """A toy teacher (2-D: ~30 s; toy:cifar10-16: ~16 min on 2 cores), trained once
    (toy.train_teacher) and cached in <download cache>/toy under a hash of its settings, so tests,
    notebooks and every CLI share one copy."""
    name, _, flag = spec[4:].partition(':')
    if name not in toy.WORLDS or flag not in ('', 'cond'):
        raise ValueError(f'unknown toy spec {spec!r}: use toy:<name> or toy:<name>:cond with a name in '
                         f'{toy.WORLDS}')
    settings = toy.teacher_settings(name, cond=flag == 'cond')
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    path = data.cache_root() / 'toy' / f'toy-{name}{"-" + flag if flag else ""}-{key}.pt'
    if path.is_file():
        return load_model(path, device)
    t0 = time.time()
    net = toy.train_teacher(settings, device=device)
    meta = dict(kind='toy-teacher', toy=name, train=settings, shape=toy.sample_shape(name),
                train_seconds=time.time() - t0, train_threads=torch.get_num_threads(),
                train_device=str(device),
                sampling=solvers.Recipe().to_dict())  # EDM's sampler
    save_model(path, net, **meta)
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
                  'distilled student folder, runs/<run>/student (needs pip install -r '
                  'requirements-latent.txt)',
                  latent.is_spec, latent.load),
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


def shape_of(net):
    """One sample's shape: [C, H, W] for an image network, [D] for a point model (ToyMLP); a
    diffusers model knows its own (latents for Stable Diffusion)."""
    if getattr(net, 'shape', None) is not None:
        return list(net.shape)
    if isinstance(net.model, (unet.SongUNet, unet.DhariwalUNet)):
        return [net.img_channels, net.img_resolution, net.img_resolution]
    return [net.img_channels]


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


if __name__ == '__main__':
    p = argparse.ArgumentParser(description='Resolve a model spec, load it and describe it.')
    p.add_argument('spec', nargs='?', default='cifar10')
    args = p.parse_args()
    net, meta = load(args.spec)
    print(f'{args.spec}: {kind_of(args.spec)}, {type(getattr(net, "model", net)).__name__}, '
          f'{sum(p.numel() for p in net.parameters()):,} parameters, sample shape {meta["shape"]}')
    print(f'sampling: {meta["sampling"]}')
