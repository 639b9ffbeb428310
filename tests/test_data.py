"""Tests for data.py: downloads without a network, the CIFAR-10 archive format, image zips."""
import hashlib
import io
import json
import os
import pickle
import tarfile
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import data
from conftest import SHARED_DATA


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


# ------------------------------------------------------------------------------------------------
# download
# ------------------------------------------------------------------------------------------------

def test_plain_path_is_used_in_place_and_checked(tmp_path):
    f = tmp_path / 'weights.bin'
    f.write_bytes(b'hello')
    assert data.download(f) == f
    assert data.download(str(f), sha256=sha(b'hello')) == f
    with pytest.raises(ValueError, match=f'expected sha256 {"0" * 64}, got {sha(b"hello")}'):
        data.download(f, sha256='0' * 64)
    assert f.exists()  # never delete a user's own file
    with pytest.raises(FileNotFoundError):
        data.download(tmp_path / 'missing.bin')


def test_file_url_is_cached_atomically(tmp_path):
    src = tmp_path / 'src' / 'model.pkl'
    src.parent.mkdir()
    src.write_bytes(b'v1' * 1000)
    cache = tmp_path / 'cache'
    out = data.download(src.as_uri(), sha256=sha(b'v1' * 1000), cache_dir=cache)
    assert out == cache / 'model.pkl' and out.read_bytes() == b'v1' * 1000
    assert sorted(p.name for p in cache.iterdir()) == ['model.pkl']  # no temporary files left
    # A second call is served from the cache (the source changed, no checksum asked).
    src.write_bytes(b'v2')
    assert data.download(src.as_uri(), cache_dir=cache).read_bytes() == b'v1' * 1000
    # With a checksum the stale cached copy is replaced by a verified fresh one.
    assert data.download(src.as_uri(), sha256=sha(b'v2'), cache_dir=cache).read_bytes() == b'v2'


def test_checksum_mismatch_deletes_and_reports(tmp_path):
    src = tmp_path / 'f.bin'
    src.write_bytes(b'payload')
    with pytest.raises(ValueError) as e:
        data.download(src.as_uri(), sha256='ab' * 32, cache_dir=tmp_path / 'c')
    assert 'ab' * 32 in str(e.value) and sha(b'payload') in str(e.value)
    assert not any((tmp_path / 'c').iterdir())  # neither the file nor a temporary one remains


def test_env_cache_and_failed_download_message(tmp_path, monkeypatch):
    monkeypatch.setenv('SFD_CACHE', str(tmp_path / 'envcache'))
    assert data.cache_root() == tmp_path / 'envcache'
    url = (tmp_path / 'nowhere' / 'edm-model.pkl').as_uri()
    with pytest.raises(RuntimeError) as e:
        data.download(url)
    msg = str(e.value)
    assert url in msg and 'put it at' in msg and str(tmp_path / 'envcache' / 'edm-model.pkl') in msg
    assert not (tmp_path / 'envcache').exists() or not any((tmp_path / 'envcache').iterdir())


# ------------------------------------------------------------------------------------------------
# CIFAR-10 python archive
# ------------------------------------------------------------------------------------------------

def write_cifar_archive(path, n_per_batch=3, seed=0):
    """A tiny archive in the official format: Python-2-style pickled dicts with byte keys."""
    rng = np.random.default_rng(seed)
    batches = {}
    with tarfile.open(path, 'w:gz') as tar:
        for name in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']:
            rows = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
            labels = rng.integers(0, 10, size=n_per_batch).tolist()
            blob = pickle.dumps({b'batch_label': name.encode(), b'labels': labels, b'data': rows,
                                 b'filenames': [b'x.png'] * n_per_batch}, protocol=2)
            info = tarfile.TarInfo(f'cifar-10-batches-py/{name}')
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
            batches[name] = (rows, labels)
    return batches


def test_load_cifar10_pixel_order(tmp_path):
    archive = tmp_path / 'cifar-10-python.tar.gz'
    batches = write_cifar_archive(archive)
    x, y = data.load_cifar10('train', source=archive, sha256=None)
    assert x.shape == (15, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
    rows, labels = batches['data_batch_2']
    # Row layout: 1024 red values, then green, then blue, each a row-major 32x32 image.
    n, c, i, j = 1, 2, 5, 17
    assert x[3 + n, c, i, j] == rows[n, c * 1024 + i * 32 + j]
    assert x[3 + n, 0, 0, 1] == rows[n, 1] and x[3 + n, 1, 0, 0] == rows[n, 1024]
    assert y[3:6].tolist() == labels
    xt, yt = data.load_cifar10('test', source=archive, sha256=None)
    assert torch.equal(xt.reshape(3, -1), torch.from_numpy(batches['test_batch'][0]))
    with pytest.raises(ValueError, match="'train' or 'test'"):
        data.load_cifar10('val', source=archive, sha256=None)
    with pytest.raises(ValueError, match='Checksum mismatch'):
        data.load_cifar10('train', source=archive)  # the real sha256 cannot match a fixture


def test_cifar_loader_refuses_code_in_pickles(tmp_path):
    marker = tmp_path / 'pwned'

    class Evil:
        def __reduce__(self):
            return os.system, (f'touch {marker}',)
    blob = pickle.dumps({b'data': Evil(), b'labels': []}, protocol=2)
    archive = tmp_path / 'evil.tar.gz'
    with tarfile.open(archive, 'w:gz') as tar:
        for name in [f'data_batch_{i}' for i in range(1, 6)]:
            info = tarfile.TarInfo(f'cifar-10-batches-py/{name}')
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    with pytest.raises(pickle.UnpicklingError, match='refusing'):
        data.load_cifar10('train', source=archive, sha256=None)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------
# Image zips and folders
# ------------------------------------------------------------------------------------------------

def make_images(n=5, size=8, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8) for _ in range(n)]


def png_bytes(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format='PNG')
    return buf.getvalue()


@pytest.mark.parametrize('kind', ['zip', 'folder'])
def test_image_zip_dataset(tmp_path, kind):
    images = make_images()
    names = [f'00000/img{i:08d}.png' for i in range(len(images))]
    labels = {'labels': [[nm, i % 3] for i, nm in enumerate(names)]}
    if kind == 'zip':
        path = tmp_path / 'ds.zip'
        with zipfile.ZipFile(path, 'w') as z:
            for nm, arr in zip(names[::-1], images[::-1]):  # stored out of order
                z.writestr(nm, png_bytes(arr))
            z.writestr('dataset.json', json.dumps(labels))
    else:
        path = tmp_path / 'ds'
        for nm, arr in zip(names, images):
            (path / nm).parent.mkdir(parents=True, exist_ok=True)
            (path / nm).write_bytes(png_bytes(arr))
        (path / 'dataset.json').write_text(json.dumps(labels))
    ds = data.ImageZipDataset(path)
    assert len(ds) == 5 and ds.shape == (3, 8, 8) and ds.num_classes == 3
    x, y = ds[3]
    assert torch.equal(x, torch.from_numpy(images[3]).permute(2, 0, 1)) and y == 0
    X, Y = ds.load_all()
    assert X.shape == (5, 3, 8, 8) and Y.tolist() == [0, 1, 2, 0, 1]
    # Works in worker processes (the zip handle is reopened per worker).
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1)
    assert sum(len(b[0]) for b in loader) == 5
    torch.testing.assert_close(data.to_float(X).max(), torch.tensor(1.0), atol=1 / 127.5, rtol=0)


def test_image_dataset_without_labels_and_errors(tmp_path):
    path = tmp_path / 'plain'
    path.mkdir()
    for i, arr in enumerate(make_images(3)):
        (path / f'{i}.png').write_bytes(png_bytes(arr))
    ds = data.ImageZipDataset(path)
    assert ds.labels is None and ds[0][1] == -1 and ds.num_classes == 0
    (path / 'dataset.json').write_text(json.dumps({'labels': [['0.png', 1]]}))
    with pytest.raises(ValueError, match='no label for 1.png'):
        data.ImageZipDataset(path)
    with pytest.raises(FileNotFoundError):
        data.ImageZipDataset(tmp_path / 'nope.zip')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match='holds no images'):
        data.ImageZipDataset(tmp_path / 'empty')


@pytest.mark.skipif(not (SHARED_DATA / 'cifar10-jpeg-test.zip').exists(),
                    reason='in-house CIFAR-10 zips not present')
def test_real_cifar10_jpeg_zip():
    ds = data.ImageZipDataset(SHARED_DATA / 'cifar10-jpeg-test.zip')
    assert len(ds) == 10_000 and ds.shape == (3, 32, 32) and ds.num_classes == 10
    assert np.bincount(ds.labels).tolist() == [1000] * 10
    x, y = ds[0]
    assert x.dtype == torch.uint8 and 0 <= y < 10
