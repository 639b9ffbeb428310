"""LPIPS, the learned perceptual distance of SFD's second stage, computed as piq computes it.

SFD (Zhou et al., 2024) trains its 1-NFE student (Alg. 7, Sec. 4.2) with L1 + LPIPS, LPIPS being
the distance of Zhang et al. (CVPR 2018): deep features of both images, unit-normalised per pixel,
compared channel by channel with learned weights. The official code takes it from the package piq
(`piq.LPIPS(replace_pooling=True, reduction='none')`); piq needs torchvision, which has no build
beside this project's pinned CPU torch, so the network and the formula are written out here. With
f^l(x) the feature map of layer l ([C_l, H_l, W_l]) and w^l its learned weights:

    f^(x)_chw = f_chw(x) / (sqrt(sum_c' f_c'hw(x)^2) + eps)                   eps = 1e-10
    LPIPS(x, y) = sum_l sum_c w^l_c * mean_hw (f^l(x)_chw - f^l(y)_chw)^2     one number per image

The features are VGG16's (configuration D) at relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3
(torchvision's `vgg16().features` numbers 3, 8, 15, 22, 29), with every max pool replaced by a
2x2 average pool (`replace_pooling=True`, as SFD asks), after ImageNet normalisation of images in
[0, 1]. The weights are the files piq reads, each fetched once into the download cache (data.py):

    vgg16-397923af.pth  torchvision's ImageNet VGG16 (528 MB): the features; the classifier is unused
    lpips_weights.pt    piq's learned weights w^1..w^5: five tensors [1, C, 1, 1], C = 64 ... 512

Offline, copy both files into the cache folder (`$SFD_CACHE`, default ~/.cache/diffdistill) or pass
their paths. The network is frozen; gradients flow to the images, which is what a loss needs.

    python lpips_vgg.py                    # fetch both files into the cache once; say where they are
    python lpips_vgg.py a.png b.png        # the LPIPS distance of two images
"""

import sys
from pathlib import Path

import torch
from torch import nn

VGG16_URL = 'https://download.pytorch.org/models/vgg16-397923af.pth'
# torchvision publishes only the prefix in the name (torch.hub's <name>-<sha256 prefix>.pth); the full
# hash, 553,433,881 bytes, is the one several independent projects pin for this file.
VGG16_SHA256 = '397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0'
# piq's LPIPS._weights_url (piq 0.8.0). No sha256 is published; record it here once measured. Until
# then the file is checked by its form: five [1, C, 1, 1] tensors of the right C, read as data only.
WEIGHTS_URL = ('https://github.com/photosynthesis-team/photosynthesis.metrics/releases/download/v0.4.0/'
               'lpips_weights.pt')
WEIGHTS_SHA256 = None
SIZES = {VGG16_URL: '528 MB', WEIGHTS_URL: 'a few KB'}

# VGG16, configuration D (Simonyan & Zisserman, Table 1): 3x3 convolutions (padding 1) + ReLU, 'P' a
# pool. Numbered as torchvision numbers `features` (conv, relu, ..., pool): the state dict's keys.
VGG16_D = (64, 64, 'P', 128, 128, 'P', 256, 256, 256, 'P', 512, 512, 512, 'P', 512, 512, 512, 'P')
TAPS = (3, 8, 15, 22, 29)            # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
CHANNELS = (64, 128, 256, 512, 512)  # C of each tap: the shapes of the learned weights
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EPS = 1e-10                          # piq's EPS, added to the norm (not under the square root)


def conv_layers():
    """(index in `features`, C_in, C_out) of VGG16's 13 convolutions, up to the last tap."""
    out, index, c_in = [], 0, 3
    for v in VGG16_D:
        if v != 'P':
            out.append((index, c_in, v))
            c_in = v
        index += 1 if v == 'P' else 2  # a pool is one module, a conv two (conv, ReLU)
    return [c for c in out if c[0] < max(TAPS)]


def vgg16_features():
    """torchvision's `vgg16().features` up to relu5_3 (index 29), max pools replaced by 2x2 average pools."""
    layers, c_in = [], 3
    for v in VGG16_D:
        if v == 'P':
            layers.append(nn.AvgPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(c_in, v, kernel_size=3, padding=1), nn.ReLU()]
            c_in = v
    return nn.Sequential(*layers[:max(TAPS) + 1])


class LPIPS(nn.Module):
    """LPIPS(x, y) -> [B]: piq's LPIPS (replace_pooling=True, reduction='none') for images in [0, 1]."""

    def __init__(self, vgg_state, layer_weights):
        super().__init__()
        self.features = vgg16_features()
        self.features.load_state_dict(vgg_state)  # keys '<N>.weight' / '<N>.bias' (read_vgg16)
        for l, w in enumerate(layer_weights):
            self.register_buffer(f'w{l}', w.detach().float().clone())
        # float64, cast to the images' dtype in taps (as piq's `.to(x)`): exact in a float64 module too
        self.register_buffer('mean', torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1))
        self.register_buffer('std', torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1))
        self.requires_grad_(False).eval()  # frozen: a metric, never trained

    def taps(self, x):
        """The five unit-normalised feature maps of images x in [0, 1]."""
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in TAPS:
                # Zhang et al. Eq. 1: unit length along channels, eps added to the norm as piq does. (At
                # an all-zero pixel sqrt's gradient is NaN, but the ReLU before masks it: no NaN reaches x.)
                out.append(x / (x.square().sum(dim=1, keepdim=True).sqrt() + EPS))
        return out

    def forward(self, x, y):
        # Two passes, as piq's ContentLoss.forward makes them (a target without grad builds no graph).
        d = 0
        for l, (fx, fy) in enumerate(zip(self.taps(x), self.taps(y), strict=True)):
            # piq: the squared difference times w, averaged over H, W, summed over channels and layers.
            d = d + ((fx - fy).square() * getattr(self, f'w{l}')).mean(dim=(2, 3)).sum(dim=1)
        return d


# ---------------------------------------------------------------------------------------------
# The two weight files: found or fetched once (data.download), read as data, checked
# ---------------------------------------------------------------------------------------------

def _read(path, what):
    """torch.load(weights_only=True): tensors and containers only, never code; one clear error."""
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # a pickle of objects, a truncated file, not a torch file at all
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ValueError(f'{path} cannot be read as {what} (torch.load weights_only: {first})') from None


def read_vgg16(path):
    """The convolutions of torchvision's VGG16 state dict (keys features.N.weight / .bias; the
    classifier ignored) as the state dict of vgg16_features(); anything missing or misshapen is refused."""
    state = _read(path, "torchvision's VGG16 state dict")
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not torchvision's VGG16 state dict "
                         f'(expected keys features.N.weight / .bias, as in {VGG16_URL})')
    out, wrong = {}, []
    for i, c_in, c_out in conv_layers():
        for name, shape in (('weight', (c_out, c_in, 3, 3)), ('bias', (c_out,))):
            v = state.get(f'features.{i}.{name}')
            if not isinstance(v, torch.Tensor) or tuple(v.shape) != shape:
                wrong.append(f'features.{i}.{name} ' + (f'{tuple(v.shape)}' if isinstance(v, torch.Tensor)
                                                        else 'missing') + f', expected {shape}')
            else:
                out[f'{i}.{name}'] = v.float()
    if wrong:
        raise ValueError(f"{path} is not torchvision's VGG16 state dict ({len(wrong)} of 26 convolution "
                         f'tensors wrong: {"; ".join(wrong[:3])}{"; ..." if len(wrong) > 3 else ""}); '
                         f'use {VGG16_URL}')
    return out


def read_layer_weights(path):
    """piq's lpips_weights.pt: a list of five tensors [1, C, 1, 1], C = 64, 128, 256, 512, 512."""
    w = _read(path, "piq's LPIPS weights")
    shapes = [(1, c, 1, 1) for c in CHANNELS]
    if not (isinstance(w, (list, tuple)) and len(w) == 5 and all(isinstance(t, torch.Tensor) for t in w)
            and [tuple(t.shape) for t in w] == shapes):
        got = ([tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in w]
               if isinstance(w, (list, tuple)) else type(w).__name__)
        raise ValueError(f"{path} is not piq's lpips_weights.pt: expected a list of five tensors of shapes "
                         f'{shapes}, got {got}; use {WEIGHTS_URL}')
    return [t.float() for t in w]


def cache_paths():
    """Where the two official files lie once downloaded: <download cache>/<file name> (data.download)."""
    import data
    return [data.cache_root() / Path(url).name for url in (VGG16_URL, WEIGHTS_URL)]


def in_cache():
    """True when both official files are in the download cache (real LPIPS without a download)."""
    return all(p.is_file() for p in cache_paths())


def weight_files(vgg=None, weights=None, instead=''):
    """(VGG16 file, layer-weights file) as local paths. Each argument: a path or URL; None = the
    official file, downloaded once into the cache, its sha256 checked (a given file named like the
    official one is checked too). Offline, one error says which files go where; `instead` is
    appended to it (the caller's flags)."""
    import data
    paths = []
    for given, url, sha in ((vgg, VGG16_URL, VGG16_SHA256), (weights, WEIGHTS_URL, WEIGHTS_SHA256)):
        source = given or url
        try:
            paths.append(data.download(source, sha if Path(str(source)).name == Path(url).name else None))
        except data.DownloadError as e:
            cause = e.__cause__ or e  # what urllib said, in one line
            reason = f'{type(cause).__name__}: {" ".join(str(cause).split())[:120]}'
            official = zip((VGG16_URL, WEIGHTS_URL), cache_paths(), strict=True)
            files = [f'{Path(u).name} ({SIZES[u]}, {u})' for u, p in official if not p.is_file()] \
                if not given else [str(source)]
            raise data.DownloadError(
                f'LPIPS needs its weight files and {source} could not be fetched ({reason}): put '
                f'{" and ".join(files)} in {data.cache_root()} (the download cache; $SFD_CACHE moves it)'
                f'{instead}') from None
    return paths


def load(device=None, vgg=None, weights=None, instead=''):
    """The LPIPS module on `device`, from the two files (weight_files: paths, URLs, None = official)."""
    vgg_path, weights_path = weight_files(vgg, weights, instead)
    return LPIPS(read_vgg16(vgg_path), read_layer_weights(weights_path)).to(device)


def main(argv=None):
    """python lpips_vgg.py [a.png b.png]: fetch the weights once (and measure two images' distance)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (0, 2):
        raise ValueError('usage: python lpips_vgg.py [IMAGE_A IMAGE_B]')
    paths = weight_files()
    print('LPIPS weights: ' + ', '.join(str(p) for p in paths))
    if argv:
        import numpy as np
        from PIL import Image
        read = lambda p: torch.from_numpy(np.asarray(Image.open(p).convert('RGB'), dtype=np.float32) / 255)
        a, b = (read(p).permute(2, 0, 1)[None] for p in argv)
        if a.shape != b.shape:
            raise ValueError(f'the images differ in size: {tuple(a.shape[2:])} vs {tuple(b.shape[2:])}')
        with torch.no_grad():
            print(f'LPIPS({argv[0]}, {argv[1]}) = {load("cpu").forward(a, b).item():.4f}')


if __name__ == '__main__':
    import cli
    cli.run(main)
