"""Tests for models.py: the spec resolver, our model files, and NVIDIA's pickles read as data.

NVIDIA's EDM code is never imported here: the pickle tests write their own faithful miniature
of an EDM snapshot (the torch_utils.persistence structure) with a pure-Python pickler.
"""
import collections
import copy
import io
import math
import pickle
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import hub
import models
import solvers
import toy
import unet
from test_latent import HAVE, save_tiny_sd, tiny_parts
from test_unet import VARIANTS, Probe, inputs, tiny

# ------------------------------------------------------------------------------------------------
# The denoiser protocol: every kind of network implements it
# ------------------------------------------------------------------------------------------------

def _protocol_net(kind, tmp_path):
    """A small network of each kind models.load returns (the diffusers one skips without the extra)."""
    if kind == 'toy':
        return toy.toy_net(label_dim=3, width=16, depth=2).eval()
    if kind == 'edm':
        return tiny('ddpmpp', label_dim=4)
    if not HAVE:
        pytest.skip('the optional extra (diffusers, transformers) is not installed')
    return hub.load(save_tiny_sd(tiny_parts(), tmp_path / 'sd'))[0]


@pytest.mark.parametrize('kind', ['toy', 'edm', 'diffusers'])
def test_every_kind_implements_the_denoiser_protocol(kind, tmp_path):
    """Toy MLP, EDM U-Net, diffusers UNet: the protocol's members with their types, the call, decode,
    the step condition, and models.save_student written back as a spec that models.load reads."""
    net = _protocol_net(kind, tmp_path)
    assert isinstance(net, models.Denoiser) and not isinstance(nn.Linear(2, 2), models.Denoiser)
    types = dict(label_dim=int, sigma_data=float, sigma_min=float, sigma_max=float, text=bool,
                 use_step_condition=bool, use_guidance_condition=bool, shape=list)
    for name, t in types.items():
        assert type(getattr(net, name)) is t, name
    assert net.shape == models.shape_of(net) == {'toy': [2], 'edm': [3, 8, 8], 'diffusers': [4, 8, 8]}[kind]
    assert (net.label_dim, net.text) == {'toy': (3, False), 'edm': (4, False), 'diffusers': (0, True)}[kind]
    assert 0 <= net.sigma_min < 1.0 < net.sigma_max and not net.use_step_condition
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *net.shape, generator=g, dtype=next(net.parameters()).dtype)
    cond = dict(encoder_hidden_states=net.encode_prompts(['a cat', ''])) if net.text else {}
    if net.label_dim:
        cond['class_labels'] = torch.tensor([0, 1])
    with torch.no_grad():
        assert net(x, 1.0, **cond).shape == x.shape
    images = net.decode(x)
    assert images.shape == ((2, 3, 16, 16) if kind == 'diffusers' else x.shape)
    assert kind == 'diffusers' or images is x  # pixel models: the samples are the images
    student = copy.deepcopy(net).enable_step_condition()
    assert student.use_step_condition and not net.use_step_condition
    path = models.save_student(tmp_path / 'run', 'student', student, prior='edm', kind='protocol-test',
                               sampling=solvers.Recipe(solver='euler', nfe=2))
    assert path == tmp_path / 'run' / ('student' if kind == 'diffusers' else 'student.pt')
    back, meta = models.load(path)
    assert type(back) is type(net) and back.use_step_condition and meta['kind'] == 'protocol-test'
    assert meta['sampling']['solver'] == 'euler' and meta['shape'] == net.shape
    assert meta.get('init_scale') == ('edm' if kind == 'diffusers' else None)  # prior: diffusers' only
    with torch.no_grad():
        assert torch.equal(back(x, 1.0, step=2, **cond), student(x, 1.0, step=2, **cond))
    with pytest.raises(TypeError, match='neither unet.EDMPrecond nor latent.Denoiser'):
        models.save_student(tmp_path, 'other', nn.Linear(2, 2))

# ------------------------------------------------------------------------------------------------
# Our checkpoints
# ------------------------------------------------------------------------------------------------

def test_save_load_round_trip(tmp_path):
    net = tiny('ncsnpp', label_dim=5).enable_step_condition()
    meta = dict(sampling=dict(solver='euler', nfe=[2, 3], afs=True, schedule='polynomial', rho=7.0,
                              t_min=0.006, t_max=80.0, step_values={'2': 4, '3': 5}), note=None)
    path = tmp_path / 'sub' / 'student.pt'
    models.save_model(path, net, **meta)
    assert sorted(p.name for p in path.parent.iterdir()) == ['student.pt']  # no temporary file left
    torch.load(path, weights_only=True)  # loads without unpickling code
    net2, meta2 = models.load_model(path)
    assert meta2 == meta and not net2.training and net2.use_step_condition
    x, sigma, y = inputs(net)
    assert torch.equal(net2(x, sigma, y, step=5), net(x, sigma, y, step=5))
    # A loaded network can be switched on further and saved again.
    net2.enable_guidance_condition()
    models.save_model(path, net2, kind='guided')
    net3, meta3 = models.load_model(path)
    assert net3.use_guidance_condition and meta3 == {'kind': 'guided'}


def test_save_load_custom_inner_model(tmp_path):
    net = unet.EDMPrecond(img_resolution=1, img_channels=2, model_type=Probe, scale=0.5)
    models.save_model(tmp_path / 'probe.pt', net, shape=[2])
    net2, meta = models.load_model(tmp_path / 'probe.pt')
    x = torch.randn(4, 2)
    assert meta == {'shape': [2]} and torch.equal(net2(x, 0.3), net(x, 0.3))


def test_bad_files_and_values_raise_clear_errors(tmp_path):
    (tmp_path / 'junk.pt').write_bytes(b'not a checkpoint')
    with pytest.raises(ValueError, match='not a readable model file'):
        models.load_model(tmp_path / 'junk.pt')
    torch.save({'state_dict': {}}, tmp_path / 'foreign.pt')
    with pytest.raises(ValueError, match='not written by this project'):
        models.load_model(tmp_path / 'foreign.pt')
    with pytest.raises(TypeError, match=r"meta\['x'\] is a float64"):
        models.save_model(tmp_path / 'bad.pt', tiny(), x=np.float64(1.0))
    assert not (tmp_path / 'bad.pt').exists()
    with pytest.raises(ValueError, match='unknown model_type'):
        unet.EDMPrecond(img_resolution=8, img_channels=3, model_type='NoSuchNet')


# ------------------------------------------------------------------------------------------------
# NVIDIA's pickles: a miniature written the way torch_utils.persistence writes them
# ------------------------------------------------------------------------------------------------

class Global:
    """A global written by name (module, qualname) without importing it: STACK_GLOBAL."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self):  # pickle wants reduce functions to be callable; never called here
        raise AssertionError


class Persistent:
    """What EDM's persistent classes reduce to: _reconstruct_persistent_obj(meta)."""

    def __init__(self, class_name, state, module_src):
        self.meta = dict(type='class', version=6, module_src=module_src, class_name=class_name, state=state)


class ModuleDictObj:
    """A torch.nn.ModuleDict: NEWOBJ of the class, then BUILD with its __dict__."""

    def __init__(self, state):
        self.state = state


class Storage:
    def __init__(self, tensor):
        self.tensor = tensor


class Call:
    """Any call module.name(*args) written into the pickle (REDUCE), e.g. a malicious one."""

    def __init__(self, module, name, *args):
        self.func, self.args = Global(module, name), args


class EDMPickler(pickle._Pickler):
    """Pure-Python pickler that writes EDM's snapshot structure; `numpy_module` picks numpy's spelling."""
    dispatch = dict(pickle._Pickler.dispatch)
    numpy_module = 'numpy._core.multiarray'

    def save_global_marker(self, obj):
        self.save(obj.module)
        self.save(obj.name)
        self.write(pickle.STACK_GLOBAL)
        self.memoize(obj)

    def save_module_dict(self, obj):
        self.save(Global('torch.nn.modules.container', 'ModuleDict'))
        self.save(())
        self.write(pickle.NEWOBJ)
        self.memoize(obj)
        self.save(obj.state)
        self.write(pickle.BUILD)

    dispatch[Global] = save_global_marker
    dispatch[ModuleDictObj] = save_module_dict

    def reducer_override(self, obj):
        if isinstance(obj, Call):
            return obj.func, obj.args
        if isinstance(obj, Persistent):
            return Global('torch_utils.persistence', '_reconstruct_persistent_obj'), (obj.meta,)
        if isinstance(obj, nn.Parameter):
            return Global('torch._utils', '_rebuild_parameter'), (obj.data, False, collections.OrderedDict())
        if isinstance(obj, torch.Tensor):
            args = Storage(obj), 0, tuple(obj.shape), obj.stride(), False, collections.OrderedDict()
            return Global('torch._utils', '_rebuild_tensor_v2'), args
        if isinstance(obj, Storage):  # a legacy (non-zip) torch.save stream of a typed storage
            buf = io.BytesIO()
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')  # TypedStorage is deprecated, but it is what the files hold
                torch.save(obj.tensor.detach().clone().contiguous().storage(), buf,
                           _use_new_zipfile_serialization=False)
            return Global('torch.storage', '_load_from_bytes'), (buf.getvalue(),)
        if isinstance(obj, np.floating):
            return Global(self.numpy_module, 'scalar'), (obj.dtype, obj.tobytes())
        return NotImplemented


def edm_tree(module, mapping, module_src, init_kwargs=None):
    """The state tree EDM pickles for one module: its __dict__ with parameters, buffers and children."""
    kids = mapping((k, edm_tree(v, mapping, module_src)) for k, v in module._modules.items())
    hooks = {k: mapping() for k in ('_backward_hooks', '_forward_hooks', '_forward_pre_hooks',
                                    '_state_dict_hooks', '_load_state_dict_pre_hooks')}
    state = dict(training=False, _parameters=mapping(module._parameters.items()),
                 _buffers=mapping(module._buffers.items()), _non_persistent_buffers_set=set(), _modules=kids,
                 **hooks, _is_full_backward_hook=None)
    if isinstance(module, nn.ModuleDict):
        return ModuleDictObj(state)
    for k, v in vars(module).items():  # plain attributes; floats as numpy scalars (EDM's skip_scale)
        if not k.startswith('_') and isinstance(v, (int, float, bool, type(None))) and k not in state:
            state[k] = np.float64(v) if isinstance(v, float) else v
    state.update(_init_args=(), _init_kwargs=init_kwargs or {})
    return Persistent(type(module).__name__, state, module_src)


def write_edm_pickle(path, net, init_kwargs, mapping=dict, numpy_module='numpy._core.multiarray',
                     module_src='', extra=None):
    """A snapshot as EDM's training_loop.py pickles it: ema, loss_fn, augment_pipe, dataset_kwargs."""
    src = module_src or '# the source of training/networks.py would be here\n'
    snapshot = dict(ema=edm_tree(net, mapping, src, init_kwargs),
                    loss_fn=Persistent('EDMLoss', dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5), src),
                    augment_pipe=None, dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset',
                                                           path='x.zip', use_labels=True, xflip=False))
    snapshot.update(extra or {})
    with open(path, 'wb') as f:
        p = EDMPickler(f, protocol=4)
        p.numpy_module = numpy_module
        p.dump(snapshot)


EDM_KWARGS = dict(img_resolution=8, img_channels=3, label_dim=5, model_type='SongUNet', model_channels=16,
                  channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], embedding_type='fourier',
                  encoder_type='residual', channel_mult_noise=2, resample_filter=[1, 3, 3, 1], augment_dim=9,
                  dropout=np.float64(0.13), use_fp16=False)


@pytest.mark.parametrize('style', ['torch2-numpy2', 'torch1.12-numpy1'])
def test_load_edm_reads_a_persistence_pickle(tmp_path, style):
    old = style.startswith('torch1')  # 2022 files: OrderedDicts and numpy.core scalars
    net = tiny(label_dim=5, **{k: v for k, v in EDM_KWARGS.items() if k not in ('label_dim', 'dropout')})
    net = net.float()
    path = tmp_path / 'network-snapshot.pkl'
    write_edm_pickle(path, net, EDM_KWARGS, mapping=collections.OrderedDict if old else dict,
                     numpy_module='numpy.core.multiarray' if old else 'numpy._core.multiarray')
    assert b'numpy.core.multiarray' in path.read_bytes() if old else b'numpy._core' in path.read_bytes()
    kwargs, state = models.read_edm_pickle(path)
    assert kwargs['dropout'] == 0.13 and type(kwargs['dropout']) is float
    assert list(state) == list(net.state_dict())
    loaded = models.load_edm(str(path))
    assert isinstance(loaded, unet.EDMPrecond) and not loaded.training
    x, sigma, y = (t.float() if t.is_floating_point() else t for t in inputs(net))
    aug = torch.randn(3, 9)
    assert torch.equal(loaded(x, sigma, y, augment_labels=aug), net(x, sigma, y, augment_labels=aug))
    assert loaded.model.enc['4x4_down'].skip_scale == math.sqrt(0.5)
    models.save_model(tmp_path / 'm.pt', loaded)  # numpy scalars became plain floats: savable
    assert models.load_model(tmp_path / 'm.pt')[0].init_kwargs['dropout'] == 0.13


def test_module_src_is_never_executed(tmp_path):
    sentinel = tmp_path / 'pwned'
    net = tiny().float()
    kwargs = {k: v for k, v in VARIANTS['ddpmpp'].items()}
    write_edm_pickle(tmp_path / 'a.pkl', net, kwargs, module_src=f'open({str(sentinel)!r}, "w").write("x")\n')
    loaded = models.load_edm(tmp_path / 'a.pkl')
    assert not sentinel.exists()
    x, sigma, _ = inputs(net)
    assert torch.equal(loaded(x.float(), sigma.float()), net(x.float(), sigma.float()))


@pytest.mark.parametrize('target', [('os', 'system'), ('posix', 'system'), ('builtins', 'exec'),
                                    ('torch_utils.persistence', '_src_to_module')])
def test_malicious_globals_are_refused_before_anything_runs(tmp_path, target):
    sentinel = tmp_path / 'pwned'
    arg = f'touch {sentinel}' if target[1] == 'system' else f'open({str(sentinel)!r}, "w")'
    with open(tmp_path / 'evil.pkl', 'wb') as f:
        EDMPickler(f, protocol=4).dump(dict(ema=Call(*target, arg)))
    with pytest.raises(ValueError, match=f'refusing global {target[0]}.{target[1]}'):
        models.load_edm(tmp_path / 'evil.pkl')
    assert not sentinel.exists()


def test_malformed_pickles_raise(tmp_path):
    net = tiny().float()
    kwargs = dict(VARIANTS['ddpmpp'])
    # A tensor record pointing past its storage (Tensor.set_ alone would read foreign memory).
    with open(tmp_path / 'oob.pkl', 'wb') as f:
        bad = Call('torch._utils', '_rebuild_tensor_v2', Storage(torch.zeros(4)), 2, (2, 2), (2, 1), False,
                   collections.OrderedDict())  # needs elements 2..5 of a 4-element storage
        EDMPickler(f, protocol=4).dump(dict(ema=Persistent('X', dict(_parameters=dict(w=bad)), '')))
    with pytest.raises(ValueError, match='malformed tensor record'):
        models.read_edm_pickle(tmp_path / 'oob.pkl')
    # A persistent object of an unknown format version, and a top level without an EDMPrecond.
    tree = edm_tree(net, dict, '', kwargs)
    tree.meta['version'] = 5
    with open(tmp_path / 'v5.pkl', 'wb') as f:
        EDMPickler(f, protocol=4).dump(dict(ema=tree))
    with pytest.raises(ValueError, match='malformed persistent object'):
        models.load_edm(tmp_path / 'v5.pkl')
    write_edm_pickle(tmp_path / 'loss.pkl', net, kwargs, extra=dict(ema=Persistent('VPPrecond', {}, '')))
    with pytest.raises(ValueError, match='not an EDMPrecond'):
        models.load_edm(tmp_path / 'loss.pkl')
    # A network that does not match its constructor keywords.
    write_edm_pickle(tmp_path / 'mismatch.pkl', net, dict(kwargs, num_blocks=2))
    with pytest.raises(ValueError, match='does not match'):
        models.load_edm(tmp_path / 'mismatch.pkl')


def test_presets_and_aliases_resolve_to_nvidias_urls(tmp_path, monkeypatch):
    net = tiny().float()
    write_edm_pickle(tmp_path / 'f.pkl', net, dict(VARIANTS['ddpmpp']))
    asked = []
    monkeypatch.setattr(models.data, 'download', lambda url: asked.append(url) or tmp_path / 'f.pkl')
    for source in ['cifar10', 'cifar10-uncond', 'cifar10-32x32-uncond-vp', 'edm-cifar10-32x32-uncond-vp']:
        loaded, meta = models.load(source)
        assert meta['kind'] == 'edm' and meta['preset'] == 'cifar10-32x32-uncond-vp'
    models.load('imagenet')
    base = 'https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-'
    assert asked == [base + 'cifar10-32x32-uncond-vp.pkl'] * 4 + [base + 'imagenet-64x64-cond-adm.pkl']
    assert all(a in models.EDM_PRESETS for a in models.EDM_ALIASES.values())
    # A teacher's metadata: its spec, one sample's shape and EDM's sampler as its recipe.
    assert meta['source'] == 'edm-cifar10-32x32-uncond-vp' and meta['shape'] == [3, 8, 8]
    assert solvers.Recipe.from_dict(meta['sampling']) == solvers.Recipe()
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


def test_every_spec_form_resolves(tmp_path, monkeypatch):
    """Each row of KINDS: toy specs, presets, .pkl paths and URLs, our .pt files (paths and URLs)."""
    write_edm_pickle(tmp_path / 'f.pkl', tiny().float(), dict(VARIANTS['ddpmpp']))
    models.save_model(tmp_path / 'ours.pt', tiny().float(), kind='x')
    cases = {'toy:ring': 'toy', 'toy:moons:cond': 'toy', 'cifar10-cond': 'edm', 'edm-ffhq-64x64-uncond-ve': 'edm',
             str(tmp_path / 'f.pkl'): 'pickle', 'https://example.org/net.pkl': 'pickle',
             str(tmp_path / 'ours.pt'): 'ours', 'https://example.org/student.pt': 'ours'}
    assert {s: models.kind_of(s) for s in cases} == cases
    net, meta = models.load(tmp_path / 'f.pkl')
    assert meta['kind'] == 'edm' and meta['preset'] is None and meta['shape'] == [3, 8, 8]
    net, meta = models.load(tmp_path / 'ours.pt')
    assert meta['kind'] == 'x' and meta['source'] == str(tmp_path / 'ours.pt')
    asked = []
    monkeypatch.setattr(models.data, 'download', lambda url: asked.append(url) or tmp_path / 'ours.pt')
    assert models.load('https://example.org/student.pt')[1]['kind'] == 'x' and asked


@pytest.mark.parametrize('spec, message', [
    ('cifar100', "unknown model 'cifar100': expected toy:<name>"),
    ('toy:spiral', "unknown toy spec 'toy:spiral'"),
    ('toy:ring:uncond', "unknown toy spec 'toy:ring:uncond'"),
    ('missing.pt', "unknown model 'missing.pt' (no such file)"),
    ('missing.pkl', 'no such file'),
    ('', "unknown model ''"),
])
def test_every_spec_error_lists_the_accepted_forms(spec, message):
    with pytest.raises(ValueError) as e:
        models.load(spec)
    assert message in str(e.value)
    if 'unknown model' in message:
        assert all(form in str(e.value) for form, _, _ in models.KINDS.values())


def test_loading_needs_no_prior_import(tmp_path):
    """A toy network file loads in a fresh interpreter that imports models only (ToyMLP is in
    unet.MODELS, not registered by importing toy.py)."""
    import subprocess
    import sys

    import toy
    from conftest import ROOT
    models.save_model(tmp_path / 'toy.pt', toy.toy_net(label_dim=3, width=16, depth=2), shape=[2])
    code = ('import sys; sys.modules["toy"] = None\n'  # toy.py cannot even be imported
            'import unet, torch\n'
            f'ck = torch.load({str(tmp_path / "toy.pt")!r}, weights_only=True)\n'
            'net = unet.EDMPrecond(**ck["init_kwargs"]); net.load_state_dict(ck["state_dict"])\n'
            'print(type(net.model).__name__)')
    out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == 'ToyMLP'


def test_toy_world_follows_the_lineage(tmp_path):
    models.save_model(tmp_path / 'a.pt', tiny().float(), teacher='toy:moons:cond')
    models.save_model(tmp_path / 'b.pt', tiny().float(), teacher=str(tmp_path / 'a.pt'))
    assert models.toy_world(tmp_path / 'b.pt') == 'moons' and models.toy_world('toy:ring') == 'ring'
    assert models.toy_world('cifar10') is None and models.toy_world(tmp_path / 'none.pt') is None
