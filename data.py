"""Everything this project reads from disk or from the network.

Three things live here, and nothing else in the project opens a URL or an archive itself:

* `download(url, sha256)` -- fetch a file once into a cache, verify its checksum, and never
  leave a half-written file behind. Plain paths and `file://` URLs go through the same
  checks, which is how the tests exercise it without a network.
* `load_cifar10(split)` -- the official CIFAR-10 python archive as uint8 NCHW images and labels.
* `ImageZipDataset(path)` -- a zip or folder of images with optional `dataset.json` labels,
  the layout written by EDM's `dataset_tool.py`.

Where the project writes is checked here too, before anything slow: `check_writable(path, flag)`
(an output file or folder that cannot be made: a file in the way, no permission, a read-only
disk), `check_cache()` (the download cache, `$SFD_CACHE`), and `atomic_write`, which says "the
disk is full" when it is. `mark_sample_set` / `check_sample_set` are the marker sample.py leaves in
an --outdir, so that an interrupted set of images is never scored by fid.py as if it were complete.

Pickled files are read with `RestrictedUnpickler`, which builds only the globals of an allow-list
(models.py and inception.py read NVIDIA's network files with it too): loading never executes code.

Run `python data.py cifar10` to download and summarise the training set.
"""

import codecs
import errno
import hashlib
import io
import json
import os
import pickle
import shutil
import tarfile
import urllib.parse
import urllib.request
import zipfile
import zlib
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
# Errors a user can act on (cli.run reports a ValueError as one line with exit status 2)
# ---------------------------------------------------------------------------------------------

class DownloadError(RuntimeError, ValueError):
    """A file could not be fetched (offline, a wrong URL): the message says where to put it by hand.
    A RuntimeError, as it always was, and a ValueError, so that every CLI reports it in one line."""


class DiskFullError(ValueError):
    """A write failed because the disk (or the user's quota) is full; the message names the file."""


# ---------------------------------------------------------------------------------------------
# Where we write: checked before anything slow starts
# ---------------------------------------------------------------------------------------------

def _in_the_way(path, kind):
    """(why `path` can never be written -- a file or a broken link on the way -- or None, the
    nearest folder on the way that exists). Looks only: nothing is created."""
    path = Path(path).expanduser()
    if kind == 'folder' and path.exists() and not path.is_dir():
        return f'{path} is a file, not a folder', None
    existing = path if kind == 'folder' else path.parent
    while not existing.exists():
        if existing.is_symlink():
            return f'{existing} is a broken link', None
        existing = existing.parent
    if not existing.is_dir():
        return f'{existing} is a file, not a folder', None
    return None, existing


def _denied(folder):
    """Why this process may not create files in the existing `folder`, or None."""
    if hasattr(os, 'statvfs') and os.statvfs(folder).f_flag & os.ST_RDONLY:
        return f'{folder} is on a read-only file system'
    if not os.access(folder, os.W_OK | os.X_OK):
        return f'no permission to write in {folder}'
    return None


def _unwritable(path, kind):
    """Why `path` (a 'file' to create or replace, or a 'folder' to create or fill) cannot be
    written, or None: nothing on the way may be a file, and the nearest folder on the way that
    exists must be one we may write in."""
    why, existing = _in_the_way(path, kind)
    return why or _denied(existing)


def check_writable(path, flag, kind='file'):
    """Refuse now, in one line naming `flag`, an output that could not be written later (after an
    hour of sampling or training): kind 'file' (written through atomic_write: its folder must be
    creatable and writable, and it must not be a folder) or 'folder'. Returns the path."""
    if kind not in ('file', 'folder'):
        raise TypeError(f"kind must be 'file' or 'folder', not {kind!r}")
    path = Path(path).expanduser()
    if kind == 'file' and path.is_dir():
        raise ValueError(f'{flag} {path} is a folder; give a file name')
    why = _unwritable(path, kind)
    if why:
        raise ValueError(f'{flag} {path}: cannot write there ({why}); choose another path')
    return path


def check_suffix(path, flag, suffixes, what):
    """Refuse a file name whose suffix does not say what will be in it (a PNG under a .npz name)."""
    if Path(path).suffix.lower() not in suffixes:
        raise ValueError(f'{flag} {path}: {what} needs a name ending in {" or ".join(suffixes)}')


# ---------------------------------------------------------------------------------------------
# Downloads
# ---------------------------------------------------------------------------------------------

def cache_root(cache_dir=None, write=False) -> Path:
    """The download cache: the argument, else `$SFD_CACHE`, else `~/.cache/diffdistill`.

    A cache that is a file (or lies under one) is refused at once, in one line naming SFD_CACHE;
    with `write=True` so is one that cannot be written (a read-only cache that already holds every
    file needed is fine: a cached file is only read)."""
    where = 'cache_dir' if cache_dir else 'SFD_CACHE' if os.environ.get('SFD_CACHE') else 'the default'
    path = Path(cache_dir or os.environ.get('SFD_CACHE') or Path.home() / '.cache' / PROJECT).expanduser()
    why, existing = _in_the_way(path, 'folder')
    why = why or (_denied(existing) if write else None)
    if why:
        raise ValueError(f'the download cache {path} ({where}) cannot be used: {why}; set SFD_CACHE to a '
                         'writable folder')
    return path


def check_cache(cache_dir=None) -> Path:
    """The cache, refused now if it cannot be written: what a CLI calls before slow work whose
    result is cached (a download, a toy teacher's training)."""
    return cache_root(cache_dir, write=True)


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
    no file, the old file or the whole new one, never half of one; nothing is left on failure.
    A full disk (or quota) is a DiskFullError that says so and names `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.name}.tmp{os.getpid()}')
    try:
        write(tmp)
        os.replace(tmp, path)
    except Exception as e:
        full = _disk_full(e, path.parent)  # measured while the partial file still takes its space
        if full:
            tmp.unlink(missing_ok=True)
            raise DiskFullError(f'could not write {path}: {full}; free some space (or write elsewhere) '
                                'and run again') from e
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return path


FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
NEARLY_FULL = 16 << 20  # bytes free below which a writer's vague failure is taken as a full disk


def _disk_full(error, folder):
    """'the disk is full ...' if `error` comes from a full disk, else None. An OSError says so by
    its errno (here or in its chain); torch.save does not (a RuntimeError about 'file write failed'
    or stream positions), so any other failure with (almost) no space left counts too."""
    e = error
    while e is not None:
        if isinstance(e, OSError) and e.errno in FULL_ERRNOS:
            return f'the disk is full ({os.strerror(e.errno)})'
        e = e.__cause__ or e.__context__
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return None
    if free < NEARLY_FULL and not isinstance(error, (ValueError, TypeError)):
        return f'the disk is full ({free / 2 ** 20:.1f} MiB free; {type(error).__name__}: ' \
               f'{(str(error).strip().splitlines() or [""])[0][:120]})'
    return None


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
    cache_root(cache_dir, write=True)  # refused before fetching, not after
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
        full = _disk_full(e, dest.parent)
        if full:
            raise DiskFullError(f'could not write {dest}: {full}; free some space or set SFD_CACHE to '
                                'another disk') from e
        reason = ' '.join(str(e).split())[:200]  # one line, whatever urllib said
        raise DownloadError(
            f'Could not download {url} ({type(e).__name__}: {reason}). If this machine is offline, '
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
    try:
        with tarfile.open(path, 'r:gz') as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            for name in names[split]:
                if name not in members:
                    raise ValueError(f'{path} is not the CIFAR-10 python archive: no {name} in it')
                batch = _safe_pickle_load(tar.extractfile(members[name]).read())
                images.append(np.asarray(batch[b'data'], dtype=np.uint8).reshape(-1, 3, 32, 32))
                labels.append(np.asarray(batch[b'labels'], dtype=np.int64))
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:  # truncated or not a .tar.gz
        raise ValueError(f'{path} is not a readable CIFAR-10 archive ({type(e).__name__}: {e}); delete '
                         'it and download it again') from None
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


# ---------------------------------------------------------------------------------------------
# Image zips and folders (EDM's dataset_tool.py layout)
# ---------------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp', '.ppm', '.tif', '.tiff')
SAMPLE_SET = 'sample-set.json'  # sample.py's marker in an --outdir (see mark_sample_set)
SAMPLE_SET_FORMAT = 'diffdistill-sample-set-v1'


def image_files(folder):
    """The image files under `folder` (recursively, any case of extension), sorted; [] if none."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob('*') if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def mark_sample_set(folder, complete, **info):
    """Write folder/sample-set.json (atomically): what sample.py is writing there and whether it has
    finished. sample.py writes it with complete=False before its first image and with complete=True
    and the final `count` after its last, so a folder it started is complete only if it finished."""
    text = json.dumps(dict(format=SAMPLE_SET_FORMAT, complete=bool(complete), **info), indent=1)
    return atomic_write(Path(folder) / SAMPLE_SET, lambda tmp: Path(tmp).write_text(text + '\n'))


def check_sample_set(where, marker, count):
    """Refuse a folder (or zip) of images that sample.py started but did not finish, or whose images
    were added or removed since: `marker` is its sample-set.json, `count` the images it holds.
    A folder without the marker (a real data set, EDM's generate.py output) is not ours to judge."""
    what = f'{marker.get("model", "a model")}, seeds {marker.get("seeds", "?")}'
    if not marker.get('complete'):
        raise ValueError(f'{where} is an unfinished sample set ({what}): sample.py was interrupted after '
                         f'{count} images; sample again into an empty folder (or delete this one)')
    if marker.get('count') != count:
        raise ValueError(f'{where} holds {count} images, but sample.py wrote {marker.get("count")} there '
                         f'({what}): images were added or removed; sample again into an empty folder')


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
        self.sample_set = None  # sample.py's marker, where it wrote these images
        if SAMPLE_SET in names:
            self.sample_set = json.loads(self._read(SAMPLE_SET))
            check_sample_set(self.path, self.sample_set, len(self.files))
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
            try:
                self._zip = zipfile.ZipFile(self.path)
            except (zipfile.BadZipFile, OSError) as e:
                raise ValueError(f'{self.path} is neither a folder nor a readable zip of images '
                                 f'({e})') from None
        return self._zip

    def _where(self, name):
        """How an error names one file: its path, or `name in archive.zip`."""
        return str(self.path / name) if self.path.is_dir() else f'{name} in {self.path}'

    def _read(self, name) -> bytes:
        try:
            if self.path.is_dir():
                return (self.path / name).read_bytes()
            return self._zipfile().read(name)
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
            raise ValueError(f'{self._where(name)} cannot be read ({type(e).__name__}: {e})') from None

    def __getstate__(self):
        return {**self.__dict__, '_zip': None}  # each worker reopens the zip for itself

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image, UnidentifiedImageError
        try:
            with Image.open(io.BytesIO(self._read(self.files[i]))) as img:
                arr = np.asarray(img.convert('L' if img.mode in ('L', 'I;16', 'I') else 'RGB'))
        except UnidentifiedImageError:  # PIL's message would name a BytesIO, not the file
            raise ValueError(f'{self._where(self.files[i])} is not an image PIL can read (corrupt or '
                             'not an image): remove or replace it') from None
        except (OSError, SyntaxError, Image.DecompressionBombError) as e:  # e.g. a truncated PNG
            raise ValueError(f'{self._where(self.files[i])} is a corrupt image ({e}): remove or replace '
                             'it') from None
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


def main(argv=None):
    """python data.py [cifar10 | ZIP | FOLDER] [--split train|test]: load and summarise."""
    import cli  # the one-line errors every CLI shares (same layer; imported only by the CLI)
    parser = cli.Parser(description='Download and summarise a data set.')
    parser.add_argument('source', nargs='?', default='cifar10', help="'cifar10' or a zip/folder")
    parser.add_argument('--split', default='train', choices=['train', 'test'])
    args = parser.parse_args(argv)
    x, y = load_images(args.source, args.split)
    print(f'{args.source} [{args.split}]: images {tuple(x.shape)} {x.dtype}, '
          f'labels {tuple(y.shape)} in [{int(y.min())}, {int(y.max())}], '
          f'pixel mean {x.float().mean():.2f}')


if __name__ == '__main__':
    import cli
    cli.run(main)
