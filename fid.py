"""Inception-based evaluation: Frechet Inception Distance (FID) and Inception Score (IS).

FID (Heusel et al. 2017) fits a Gaussian to the 2048-d "pool3" features of Inception-v3 for
real and generated images and measures the Frechet (2-Wasserstein) distance between the two:

    FID = ||mu_1 - mu_2||^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)).

IS (Salimans et al. 2016) is exp(E_x KL(p(y|x) || p(y))) over the same network's classes.

The network here is our own reimplementation of the FID variant of Inception-v3, the one
pytorch-fid ported from TensorFlow's 2015-12-05 graph; its published weights load into it
unchanged. The preprocessing is pytorch-fid's (bilinear resize to 299, then [-1, 1]). EDM's
fid.py uses NVIDIA's port of the same graph but a different resize and scaling, so its
reference statistics (e.g. cifar10-32x32.npz) are NOT interchangeable with ours: files written
here carry a `protocol` key and anything without it is refused unless asked for explicitly.

    python fid.py ref  --data cifar10 --dest cifar10-train.npz
    python fid.py calc --images samples.npz --ref cifar10-train.npz
"""

import argparse
import math
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from scipy import linalg
from torch import nn
from tqdm import tqdm

import data

WEIGHTS_URL = ('https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
               'pt_inception-2015-12-05-6726825d.pth')
# Written into every statistics file we make, and printed next to every number we report.
PROTOCOL = 'pytorch-fid Inception (pt_inception-2015-12-05), bilinear resize to 299, [-1,1]'
MIN_IMAGES = 2048  # = feature dimension; see check_count
IMAGES_KEY = 'images'  # npz of generated images: uint8 [N, H, W, C] under this key (as sample.py writes)


def default_device():
    return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


# ---------------------------------------------------------------------------------------------
# The network: Inception-v3 as in TensorFlow's 2015-12-05 graph
# ---------------------------------------------------------------------------------------------
# Attribute names follow torchvision's Inception3 (Conv2d_1a_3x3, Mixed_5b.branch5x5_1, ...),
# because that is the key layout of the published .pth file; then `load_state_dict` is strict.

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
    # TF's 3x3 'SAME' average pool divides by the number of *real* pixels under the window:
    # padded zeros do not count (torchvision's default counts them and is wrong for these weights).
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


class InceptionV3(nn.Module):
    """The FID Inception-v3: images in [0, 1] -> (pool3 features [N, 2048], IS logits [N, 1008]).

    Built with random weights; use `load_inception()` for the published ones. The network is a
    fixed measuring instrument, so it never leaves eval mode (in training mode BatchNorm would
    normalise with the batch's own statistics and a feature would depend on its batch-mates)
    and its parameters never require gradients.
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

    def forward(self, images):
        """images: [N, 3 or 1, H, W], float in [0, 1] or uint8 in [0, 255], any H and W."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f'expected images [N, 3, H, W] (or 1 channel), got {tuple(images.shape)}')
        w = self.fc.weight
        # uint8 / 255 in float32 is exactly what PIL -> torchvision ToTensor gives pytorch-fid.
        x = images.to(w.device, w.dtype) / 255 if images.dtype == torch.uint8 else images.to(w)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # grayscale: the same as PIL's convert('RGB')
        # NCHW-contiguous, because kernels for other memory layouts (e.g. a permuted NHWC array)
        # round differently: features would depend on how the images were stored (~3e-7).
        x = x.contiguous()
        # The measurement is defined in float32 even inside someone's bf16 autocast region.
        # (On CUDA, PyTorch lets cuDNN use TF32 by default, as it does for pytorch-fid; set
        # torch.backends.cudnn.allow_tf32 = False for full float32 convolutions.)
        with torch.autocast(x.device.type, enabled=False):
            # pytorch-fid's preprocessing: half-pixel-centre bilinear resize to 299x299 without
            # antialiasing (applied even at 299, where it is the identity), then [0, 1] -> [-1, 1].
            x = F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False)
            x = 2 * x - 1
            x = chain(x, self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3)
            x = F.max_pool2d(x, 3, stride=2)
            x = chain(x, self.Conv2d_3b_1x1, self.Conv2d_4a_3x3)
            x = F.max_pool2d(x, 3, stride=2)
            x = chain(x, self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                      self.Mixed_7c)
            # pool3: the global average of the 8x8 map of Mixed_7c -> the FID features.
            features = F.adaptive_avg_pool2d(x, 1).flatten(1)
            # The Inception Score's logits: pool3 times the classifier matrix *without* its bias,
            # as the original TF IS code reads the graph (its MatMul, before the bias add) and as
            # StyleGAN/EDM's `no_output_bias=True` reproduces. `self.fc(features)` has the bias.
            logits = features @ self.fc.weight.T
        return features, logits


def download_weights(url=None) -> Path:
    """Fetch (or find in the cache) the published FID weights and check them.

    No sha256 is published for this file, but its name follows torch.hub's convention
    `<name>-<first hex digits of the file's sha256>.<ext>`, so the prefix is a real check that
    we hold the very file that was published (`6726825d` for the official one). A local path
    whose name has no such suffix is used unchecked.
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


def load_inception(device=None, url=None) -> InceptionV3:
    """InceptionV3 with the published pytorch-fid weights, on `device` (default: cuda if any)."""
    state = torch.load(download_weights(url), map_location='cpu', weights_only=True)
    model = InceptionV3()
    model.load_state_dict(state)  # strict: exactly the published layout, nothing missing or extra
    return model.to(device or default_device())


# ---------------------------------------------------------------------------------------------
# Images in, features out
# ---------------------------------------------------------------------------------------------

def load_images_npz(path):
    """uint8 images [N, C, H, W] from an npz holding uint8 [N, H, W, C] under 'images'.

    NHWC is the numpy/PIL image layout (and that of EDM-style image npz files); if the key is
    absent the file's only array is used.
    """
    with np.load(path, allow_pickle=False) as f:
        if IMAGES_KEY in f:
            arr = f[IMAGES_KEY]
        elif len(f.files) == 1:
            arr = f[f.files[0]]
        else:
            raise ValueError(f'{path} has no {IMAGES_KEY!r} array (keys: {f.files})')
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise ValueError(f'{path}: expected uint8 images [N, H, W, C] with C = 1 or 3, '
                         f'got {arr.dtype} {arr.shape}')
    return torch.from_numpy(rearrange(arr, 'n h w c -> n c h w'))


def read_source(source):
    """A source of images as something with a length: a uint8 tensor, or a dataset of files.

    source: a uint8 [N, C, H, W] tensor or array (or float in [0, 1]); 'cifar10' (the training
    set, via data.load_cifar10); an .npz of uint8 NHWC images (see load_images_npz); or a zip
    or folder of images. Folders are read by data.ImageZipDataset: recursively (EDM's
    generate.py writes seed subfolders), any case of extension, sorted, all the same size.
    pytorch-fid instead reads one folder level only; for a flat folder both see the same files.
    """
    if isinstance(source, (np.ndarray, torch.Tensor, data.ImageZipDataset)):
        return source
    if str(source) == 'cifar10':
        return data.load_cifar10('train')[0]
    if str(source).endswith('.npz'):
        return load_images_npz(source)
    return data.ImageZipDataset(source)


def open_images(source, batch_size=100, num_workers=0):
    """Batches of images from any source (see read_source) and their count: (iterable, N)."""
    source = read_source(source)
    if len(source) == 0:
        raise ValueError('no images to evaluate')
    if isinstance(source, data.ImageZipDataset):
        loader = torch.utils.data.DataLoader(source, batch_size=batch_size, shuffle=False,
                                             num_workers=num_workers,
                                             pin_memory=torch.cuda.is_available())
        return (x for x, _ in loader), len(source)
    x = torch.as_tensor(source)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f'expected images [N, C, H, W] with C = 1 or 3, got {tuple(x.shape)}')
    return (x[i:i + batch_size] for i in range(0, len(x), batch_size)), len(x)


@torch.inference_mode()
def compute_features(source, model=None, batch_size=100, num_workers=0, progress=True):
    """Inception features and IS logits of every image in `source` (see read_source), in order.

    Returns float32 numpy arrays (features [N, 2048], logits [N, 1008]). `model` defaults to
    load_inception() on the default device; images are moved to the model's device batch by batch.
    """
    batches, n = open_images(source, batch_size, num_workers)
    model = load_inception() if model is None else model
    features, logits = [], []
    for x in tqdm(batches, total=math.ceil(n / batch_size), desc='inception', unit='batch',
                  disable=not progress):
        f, l = model(x)
        features.append(f.float().cpu())
        logits.append(l.float().cpu())
    return torch.cat(features).numpy(), torch.cat(logits).numpy()


# ---------------------------------------------------------------------------------------------
# Statistics, the Frechet distance and the Inception Score
# ---------------------------------------------------------------------------------------------

def feature_stats(features):
    """(mu, sigma) in float64: the mean and the unbiased (N - 1) covariance of features [N, D]."""
    f = features.detach().cpu().numpy() if torch.is_tensor(features) else np.asarray(features)
    f = f.astype(np.float64)  # float32 features summed over 50k images need float64 sums
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6) -> float:
    """Squared Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. Eq. 6).

    d^2 = ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)),
    computed as pytorch-fid does (same steps, same numbers) without scipy's deprecated `disp`.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f'mismatched statistics: mu {mu1.shape} vs {mu2.shape}, '
                         f'sigma {sigma1.shape} vs {sigma2.shape}')
    diff = mu1 - mu2
    # sigma1 sigma2 is not symmetric, but it is similar to sigma1^(1/2) sigma2 sigma1^(1/2), which
    # is PSD: its eigenvalues are real and >= 0, so a principal square root exists and its trace
    # is sum(sqrt(lambda_i)). scipy's Schur-based sqrtm finds it.
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # The product can be (numerically) singular. Nudge both covariances by eps I inside the
        # square root only; the traces below still use the original matrices.
        warnings.warn(f'singular covariance product; adding {eps} to the diagonals for its square root',
                      stacklevel=2)
        offset = np.eye(len(sigma1)) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        # Rounding in a rank-deficient product gives tiny negative eigenvalues and hence tiny
        # imaginary parts; tolerate them (on the diagonal, |Im| <= 1e-3, pytorch-fid's rule).
        # Large ones mean a sigma is not a covariance (not PSD), which is an error.
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f'sqrt(sigma1 sigma2) has an imaginary component of '
                             f'{np.abs(covmean.imag).max():.3g}: are both sigmas covariances (PSD)?')
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(logits, splits=10):
    """Inception Score (Salimans et al. 2016): (mean, std) over `splits` consecutive parts.

    IS = exp(E_x KL(p(y|x) || p(y))), where p(y|x) is the softmax over all 1008 logits and p(y)
    its mean over the part, as in the original TF code (and StyleGAN's/EDM's). The parts have
    boundaries i N // splits; the std is the population std (ddof 0) of the part scores.
    """
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    n = len(logits)
    if n < splits:
        raise ValueError(f'the Inception Score needs at least {splits} images (one per split), got {n}')
    log_p = torch.log_softmax(logits, dim=1)  # log p(y|x), stable even where p underflows to 0
    scores = []
    for i in range(splits):
        part = log_p[i * n // splits:(i + 1) * n // splits]
        log_py = torch.logsumexp(part, dim=0) - math.log(len(part))  # log p(y), the part's mean
        kl = (part.exp() * (part - log_py)).sum(dim=1)  # KL(p(y|x) || p(y)) for each x
        scores.append(kl.mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def check_count(n, what='images'):
    """Refuse FID on fewer than MIN_IMAGES images, saying why."""
    if n < MIN_IMAGES:
        raise ValueError(
            f'FID needs at least {MIN_IMAGES} {what}, got {n}. The covariance of n feature '
            f'vectors has rank at most n - 1, so with fewer than 2048 images the 2048 x 2048 '
            f'covariance is singular and the Gaussian fit (and its matrix square root) is '
            f'degenerate; FID is also strongly biased at small n. Use 50,000 as papers do.')


def check_protocol(stats, what, allow_foreign=False):
    """Refuse (or, with allow_foreign, warn loudly about) statistics made by another pipeline."""
    protocol = stats.get('protocol')
    if protocol == PROTOCOL:
        return
    found = f'protocol {protocol!r}' if protocol else "no 'protocol' key"
    msg = (f'the {what} statistics were not made with this FID protocol ({found}; ours: '
           f'{PROTOCOL}). EDM\'s published references (e.g. cifar10-32x32.npz) come from '
           f'NVIDIA\'s detector with a TF1-style resize and (x - 128) / 128 scaling, which moves '
           f'the features by several percent; FIDs across protocols are not comparable. Make a '
           f'reference with `python fid.py ref`, or pass --allow-foreign-ref to compare anyway.')
    if not allow_foreign:
        raise ValueError(msg[0].upper() + msg[1:])
    warnings.warn('MIXING FID PROTOCOLS: ' + msg, stacklevel=2)


def compute_stats(source, model=None, batch_size=100, num_workers=0, splits=10, progress=True):
    """Statistics of `source` as a dict: mu, sigma, num_images, protocol, inception_score.

    `inception_score` is (mean, std), or None when there are fewer images than splits.
    """
    features, logits = compute_features(source, model, batch_size, num_workers, progress)
    mu, sigma = feature_stats(features)
    score = inception_score(logits, splits) if len(logits) >= splits else None
    return dict(mu=mu, sigma=sigma, num_images=len(features), protocol=PROTOCOL,
                inception_score=score)


def fid_from_stats(stats, ref, allow_foreign=False) -> float:
    """FID between two statistics dicts (compute_stats / load_stats), with the safety checks.

    Both must come from our protocol (see check_protocol) and, where the image count is
    known, from at least MIN_IMAGES images.
    """
    check_stats(stats, 'image', allow_foreign)
    check_stats(ref, 'reference', allow_foreign)
    return frechet_distance(stats['mu'], stats['sigma'], ref['mu'], ref['sigma'])


def check_stats(stats, what, allow_foreign=False):
    """check_protocol, and check_count where the number of images is known."""
    check_protocol(stats, what, allow_foreign)
    if stats.get('num_images') is not None:
        check_count(stats['num_images'], f'{what} images')


def save_stats(path, stats):
    """Write mu, sigma, num_images and protocol to an .npz, atomically (temporary name, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'{path.name}.tmp{os.getpid()}')
    try:
        with open(tmp, 'wb') as f:  # a file object, so numpy does not append '.npz' to tmp
            np.savez(f, mu=np.asarray(stats['mu'], np.float64),
                     sigma=np.asarray(stats['sigma'], np.float64),
                     num_images=np.int64(stats['num_images']), protocol=np.str_(stats['protocol']))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_stats(path):
    """Read statistics from an .npz: ours, pytorch-fid's or EDM's (`protocol` None if absent)."""
    with np.load(path, allow_pickle=False) as f:
        if 'mu' not in f or 'sigma' not in f:
            raise ValueError(f'{path} holds no FID statistics (keys mu, sigma); it has {f.files}')
        return dict(mu=f['mu'].astype(np.float64), sigma=f['sigma'].astype(np.float64),
                    num_images=int(f['num_images']) if 'num_images' in f else None,
                    protocol=str(f['protocol']) if 'protocol' in f else None)


def _is_stats_file(path):
    if not str(path).endswith('.npz'):
        return False
    with np.load(path, allow_pickle=False) as f:
        return 'mu' in f and 'sigma' in f


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description='FID / IS with the pytorch-fid Inception network.')
    sub = parser.add_subparsers(dest='command', required=True)
    ref = sub.add_parser('ref', help='write reference statistics (mu, sigma) of a data set')
    ref.add_argument('--data', required=True, help="'cifar10' (training set), a zip, folder or .npz")
    ref.add_argument('--dest', required=True, help='output .npz')
    calc = sub.add_parser('calc', help='FID (and IS) of images against reference statistics')
    calc.add_argument('--images', required=True,
                      help='folder or zip of images, .npz of uint8 NHWC images, or a statistics .npz')
    calc.add_argument('--ref', required=True, help='reference statistics .npz from `fid.py ref`')
    calc.add_argument('--splits', type=int, default=10, help='Inception Score splits')
    calc.add_argument('--allow-foreign-ref', action='store_true',
                      help='compare against statistics made by another pipeline (e.g. EDM), with a warning')
    for p in (ref, calc):
        p.add_argument('--batch', type=int, default=100, help='images per Inception batch')
        p.add_argument('--workers', type=int, default=min(8, os.cpu_count() or 1),
                       help='DataLoader workers for image folders and zips')
        p.add_argument('--device', default=None, help='default: cuda if available, else cpu')
        p.add_argument('--weights', default=None, help='URL or path of the Inception weights '
                       '(default: the published pytorch-fid file, downloaded once and cached)')
    args = parser.parse_args(argv)
    device = torch.device(args.device) if args.device else default_device()
    print(f'Features: {PROTOCOL}')

    if args.command == 'ref':
        source = read_source(args.data)  # read once: 'cifar10' is a 50k-image download
        n = len(source)
        if n < MIN_IMAGES:
            print(f'Warning: only {n} images; FID against this reference will be refused '
                  f'(it needs {MIN_IMAGES}).')
        stats = compute_stats(source, load_inception(device, args.weights), args.batch, args.workers)
        save_stats(args.dest, stats)
        print(f'Wrote {args.dest}: statistics of {n} images of {args.data}')
        return stats

    # calc: check everything cheap (reference file, protocol, counts) before running the network.
    # (This is fid_from_stats with its checks split around the expensive part.)
    ref_stats = load_stats(args.ref)
    check_stats(ref_stats, 'reference', args.allow_foreign_ref)
    if _is_stats_file(args.images):
        stats = load_stats(args.images)
    else:
        source = read_source(args.images)
        check_count(len(source))
        stats = compute_stats(source, load_inception(device, args.weights), args.batch,
                              args.workers, args.splits)
    check_stats(stats, 'image', args.allow_foreign_ref)
    fid = frechet_distance(stats['mu'], stats['sigma'], ref_stats['mu'], ref_stats['sigma'])
    n = stats['num_images']
    line = f'FID {fid:g}'
    if stats.get('inception_score'):
        line += ' IS {:g} +- {:g}'.format(*stats['inception_score'])
    print(f'{line}  ({n if n is not None else "?"} images vs {ref_stats["num_images"] or "?"} reference)')
    if n is not None and n != 50000:
        print(f'Note: FID is biased by the number of images; papers report it for 50,000, not {n}.')
    return fid


if __name__ == '__main__':
    try:
        main()
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # bad input: one clear line
        raise SystemExit(f'fid.py: error: {e}') from None
