"""Everything this project reads from disk or from the network.

Three things live here, and nothing else in the project opens a URL or an archive itself:

* `download(url, sha256)` -- fetch a file once into a cache, verify its checksum, and never
  leave a half-written file behind. Plain paths and `file://` URLs go through the same
  checks, which is how the tests exercise it without a network.
* `load_cifar10(split)` -- the official CIFAR-10 python archive as uint8 NCHW images and labels.
* `ImageZipDataset(path)` -- a zip or folder of images with optional `dataset.json` labels,
  the layout written by EDM's `dataset_tool.py`.

Pickled files are read with `RestrictedUnpickler`, which builds only the globals of an allow-list
(models.py and inception.py read NVIDIA's network files with it too): loading never executes code.

Run `python data.py cifar10` to download and summarise the training set.
"""

import codecs
import hashlib
import io
import json
import os
import pickle
import tarfile
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

PROJECT = 'diffdistill'

CIFAR10_URL = 'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz'
# The archive's published md5 is c58f30108f718f92721af3b95e74349a; this is its sha256.
CIFAR10_SHA256 = '6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce'
CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer',
                   'dog', 'frog', 'horse', 'ship', 'truck')


# ---------------------------------------------------------------------------------------------
# Downloads
# ---------------------------------------------------------------------------------------------

def cache_root(cache_dir=None) -> Path:
    """The download cache: the argument, else `$SFD_CACHE`, else `~/.cache/diffdistill`."""
    path = cache_dir or os.environ.get('SFD_CACHE') or Path.home() / '.cache' / PROJECT
    return Path(path).expanduser()


def sha256_of(path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def _check(path: Path, sha256, url, delete: bool):
    """Raise if `path` does not have the expected sha256 (deleting it when it is ours)."""
    if sha256 is None:
        return
    actual = sha256_of(path)
    if actual != sha256.lower():
        if delete:
            path.unlink(missing_ok=True)
        raise ValueError(f'Checksum mismatch for {url}: expected sha256 {sha256}, got {actual}. '
                         f'{"The file was deleted; try again." if delete else "Replace the file."}')


def atomic_write(path, write):
    """Call write(tmp) on a temporary name beside `path`, then rename it onto `path`: readers see
    no file, the old file or the whole new one, never half of one; nothing is left on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.name}.tmp{os.getpid()}')
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def download(url, sha256=None, cache_dir=None) -> Path:
    """Return a local path for `url`, downloading it into the cache on first use.

    `url` may be http(s)://, file://, or a plain local path. A plain path is used where it is
    (checked, not copied). Anything else is written to `<cache>/<file name>` through a temporary
    name and renamed only once complete and verified, so an interrupted download leaves
    nothing behind. A cached file is re-verified on every call when `sha256` is given.
    """
    url = str(url)
    parsed = urllib.parse.urlparse(url)
    if len(parsed.scheme) <= 1:  # a plain path (a one-letter "scheme" is a Windows drive)
        path = Path(url).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f'No such file: {path}')
        _check(path, sha256, url, delete=False)
        return path

    name = Path(urllib.parse.unquote(parsed.path)).name or 'download'
    dest = cache_root(cache_dir) / name
    if dest.is_file():
        try:
            _check(dest, sha256, url, delete=True)
            return dest
        except ValueError:
            pass  # a stale or corrupt cached copy: it was deleted, fetch it again
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f'{dest.name}.part{os.getpid()}')
    try:
        request = urllib.request.Request(url, headers={'User-Agent': PROJECT})
        with urllib.request.urlopen(request, timeout=60) as response, open(tmp, 'wb') as f:
            total = int(response.headers.get('Content-Length') or 0) or None
            with tqdm(total=total, unit='B', unit_scale=True, desc=f'download {name}',
                      disable=total is not None and total < (1 << 20)) as bar:
                for chunk in iter(lambda: response.read(1 << 20), b''):
                    f.write(chunk)
                    bar.update(len(chunk))
        _check(tmp, sha256, url, delete=True)
        os.replace(tmp, dest)  # atomic: the cache only ever holds complete, verified files
    except ValueError:
        raise
    except Exception as e:
        raise RuntimeError(
            f'Could not download {url} ({type(e).__name__}: {e}). If this machine is offline, '
            f'fetch the file elsewhere and put it at {dest} (or set SFD_CACHE to a folder '
            f'holding it).') from e
    finally:
        tmp.unlink(missing_ok=True)
    return dest


# ---------------------------------------------------------------------------------------------
# Restricted unpickling: a pickle may name any function to call; only allow-listed ones are built
# ---------------------------------------------------------------------------------------------
# A pickle is a small program: GLOBAL module.name imports an object and REDUCE calls it, so loading
# an untrusted pickle with pickle.load can run anything (os.system). Every reader of this project
# (CIFAR-10 batches here, NVIDIA's EDM networks in models.py, the TorchScript Inception archive in
# inception.py) goes through one class that resolves a global only from its allow-list.

class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that builds only the globals of its allow-list; any other is refused, never imported.

    allowed: {(module, name): the object to use}, often a harmless stand-in for the real one.
    what: what the file should be, for the error ('refusing global os.system: not part of <what>').
    A subclass may override `lookup` to allow a whole family of names (inception.py's).
    """

    def __init__(self, file, allowed, what, **kwargs):
        super().__init__(file, **kwargs)
        self.allowed, self.what = allowed, what

    def lookup(self, module, name):
        """The object a pickle's global module.name stands for, or None (refused)."""
        return self.allowed.get((module, name))

    def find_class(self, module, name):
        found = self.lookup(module, name)
        if found is None:
            raise pickle.UnpicklingError(f'refusing global {module}.{name}: not part of {self.what}')
        return found


def _numpy_reconstruct():
    """numpy's array rebuilder (numpy 2 moved numpy.core to numpy._core)."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


# Dicts, lists and numpy arrays: what CIFAR-10's batches hold.
NUMPY_GLOBALS = {**dict.fromkeys([('numpy.core.multiarray', '_reconstruct'),
                                   ('numpy._core.multiarray', '_reconstruct')], _numpy_reconstruct()),
                 ('numpy', 'ndarray'): np.ndarray, ('numpy', 'dtype'): np.dtype,
                 ('_codecs', 'encode'): codecs.encode}  # how Python 3 writes bytes at protocol 2 (harmless)


def _safe_pickle_load(data: bytes):
    # CIFAR-10's batches were pickled by Python 2: byte-string keys, hence encoding='bytes'.
    return RestrictedUnpickler(io.BytesIO(data), NUMPY_GLOBALS, 'a data file of numpy arrays',
                               encoding='bytes').load()


# ---------------------------------------------------------------------------------------------
# CIFAR-10
# ---------------------------------------------------------------------------------------------

def load_cifar10(split='train', source=CIFAR10_URL, sha256=CIFAR10_SHA256, cache_dir=None):
    """CIFAR-10 from the official python archive: (uint8 images [N, 3, 32, 32], int64 labels [N]).

    Each batch in the archive is a pickled dict whose `b'data'` is N x 3072 uint8 rows stored
    channel-planar (1024 red, then 1024 green, then 1024 blue values, each row-major), so a
    row reshapes directly to [3, 32, 32]. `split` is 'train' (data_batch_1..5) or 'test'.
    `source` may be a local copy of the archive (pass `sha256=None` for a test fixture).
    """
    names = {'train': [f'data_batch_{i}' for i in range(1, 6)], 'test': ['test_batch']}
    if split not in names:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    path = download(source, sha256=sha256, cache_dir=cache_dir)
    images, labels = [], []
    with tarfile.open(path, 'r:gz') as tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
        for name in names[split]:
            if name not in members:
                raise ValueError(f'{path} is not the CIFAR-10 python archive: no {name} in it')
            batch = _safe_pickle_load(tar.extractfile(members[name]).read())
            images.append(np.asarray(batch[b'data'], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(batch[b'labels'], dtype=np.int64))
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


# ---------------------------------------------------------------------------------------------
# Image zips and folders (EDM's dataset_tool.py layout)
# ---------------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp', '.ppm', '.tif', '.tiff')


class ImageZipDataset(torch.utils.data.Dataset):
    """A zip file or folder of images, with labels from an optional `dataset.json`.

    `dataset.json` holds `{"labels": [["00000/img00000000.png", 3], ...]}` (or `null`). Images
    are sorted by relative path; item i is `(uint8 tensor [C, H, W], label)` with label -1 when
    the dataset has none. The zip is opened lazily in each worker process, so the dataset can be
    used with a multi-worker DataLoader.
    """

    def __init__(self, path, max_size=None):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f'No such zip or folder: {self.path}')
        self._zip = None
        names = self._list()
        self.files = sorted(n for n in names if n.lower().endswith(IMAGE_EXTENSIONS))
        if not self.files:
            raise ValueError(f'{self.path} holds no images ({", ".join(IMAGE_EXTENSIONS)})')
        self.files = self.files[:max_size]
        self.labels = None
        if 'dataset.json' in names:
            table = json.loads(self._read('dataset.json')).get('labels')
            if table is not None:
                by_name = {name.replace('\\', '/'): label for name, label in table}
                missing = [f for f in self.files if f not in by_name]
                if missing:
                    raise ValueError(f'dataset.json has no label for {missing[0]} '
                                     f'({len(missing)} images unlabelled)')
                self.labels = np.asarray([by_name[f] for f in self.files], dtype=np.int64)
        self.num_classes = int(self.labels.max()) + 1 if self.labels is not None else 0
        self.shape = tuple(self[0][0].shape)  # [C, H, W] of the first image

    def _list(self):
        if self.path.is_dir():
            return [p.relative_to(self.path).as_posix() for p in self.path.rglob('*') if p.is_file()]
        return self._zipfile().namelist()

    def _zipfile(self):
        if self._zip is None:
            self._zip = zipfile.ZipFile(self.path)
        return self._zip

    def _read(self, name) -> bytes:
        if self.path.is_dir():
            return (self.path / name).read_bytes()
        return self._zipfile().read(name)

    def __getstate__(self):
        return {**self.__dict__, '_zip': None}  # each worker reopens the zip for itself

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image
        with Image.open(io.BytesIO(self._read(self.files[i]))) as img:
            arr = np.asarray(img.convert('L' if img.mode in ('L', 'I;16', 'I') else 'RGB'))
        arr = arr[:, :, None] if arr.ndim == 2 else arr  # HWC
        label = int(self.labels[i]) if self.labels is not None else -1
        return torch.from_numpy(arr.transpose(2, 0, 1).copy()), label

    def load_all(self, progress=True):
        """Every image and label at once: (uint8 [N, C, H, W], int64 [N])."""
        items = [self[i] for i in tqdm(range(len(self)), desc=f'read {self.path.name}',
                                       disable=not progress or len(self) < 1000)]
        return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


def to_float(images_uint8):
    """uint8 images in [0, 255] -> float in [-1, 1], the EDM data range."""
    return images_uint8.float() / 127.5 - 1


def load_images(source, split='train'):
    """Training images as uint8 [N, C, H, W] and labels: `cifar10` or a zip/folder path."""
    if source == 'cifar10':
        return load_cifar10(split)
    return ImageZipDataset(source).load_all()


if __name__ == '__main__':
    import argparse
    parser = argparse.ArgumentParser(description='Download and summarise a data set.')
    parser.add_argument('source', nargs='?', default='cifar10', help="'cifar10' or a zip/folder")
    parser.add_argument('--split', default='train', choices=['train', 'test'])
    args = parser.parse_args()
    x, y = load_images(args.source, args.split)
    print(f'{args.source} [{args.split}]: images {tuple(x.shape)} {x.dtype}, '
          f'labels {tuple(y.shape)} in [{int(y.min())}, {int(y.max())}], '
          f'pixel mean {x.float().mean():.2f}')
