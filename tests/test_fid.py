"""Tests for fid.py: the Frechet distance against closed forms, the Inception Score, statistics
files and their protocols (ours, EDM's published ones, pytorch-fid's), image sources and bad
input, PRDC against a brute-force count and known answers, and the CLI (with a fake network).

The network itself and its weights are tested in test_inception.py. Nothing is downloaded:
downloads are faked or go through file://.
"""
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fid

# ---------------------------------------------------------------------------------------------
# Frechet distance
# ---------------------------------------------------------------------------------------------

def _random_cov(n, d, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) / np.sqrt(d)
    return fid.feature_stats(x)


def _trace_sqrt_reference(s1, s2):
    """tr((s1 s2)^(1/2)) = tr((s1^(1/2) s2 s1^(1/2))^(1/2)), via symmetric eigendecompositions."""
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    return np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ s2 @ root1), 0, None)).sum()


def test_frechet_closed_form_for_commuting_covariances():
    rng = np.random.default_rng(4)
    d = 32
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    closed = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    value = fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert isinstance(value, float)
    assert value == pytest.approx(closed, rel=1e-12)
    # Same eigenbasis, not diagonal: S_i = Q diag(.) Q^T commute and the closed form still holds.
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    value = fid.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert value == pytest.approx(closed, rel=1e-9)


def test_frechet_identical_symmetric_and_general_case():
    mu1, s1 = _random_cov(500, 64, 5)
    mu2, s2 = _random_cov(400, 64, 6)
    assert abs(fid.frechet_distance(mu1, s1, mu1, s1)) < 1e-9 * np.trace(s1)
    d12, d21 = fid.frechet_distance(mu1, s1, mu2, s2), fid.frechet_distance(mu2, s2, mu1, s1)
    assert d12 == pytest.approx(d21, rel=1e-10)
    reference = (((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2)
                 - 2 * _trace_sqrt_reference(s1, s2))
    assert d12 == pytest.approx(reference, rel=1e-10)


def test_frechet_rank_deficient_covariances():
    # 41 and 49 samples in 64 dimensions: ranks 40 and 48, as FID on too few images would give.
    mu1, s1 = _random_cov(41, 64, 7)
    mu2, s2 = _random_cov(49, 64, 8)
    assert np.linalg.matrix_rank(s1) == 40 and np.linalg.matrix_rank(s2) == 48
    value = fid.frechet_distance(mu1, s1, mu2, s2)
    reference = (((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2)
                 - 2 * _trace_sqrt_reference(s1, s2))
    assert isinstance(value, float) and math.isfinite(value)
    assert value == pytest.approx(reference, rel=1e-7)
    assert value == pytest.approx(fid.frechet_distance(mu2, s2, mu1, s1), rel=1e-7)


def test_frechet_retries_with_eps_when_the_root_is_not_finite(monkeypatch):
    rng = np.random.default_rng(9)
    a, b = rng.uniform(0.1, 2, 8), rng.uniform(0.1, 2, 8)
    real_sqrtm, calls = fid.linalg.sqrtm, []

    def flaky_sqrtm(m):
        calls.append(m)
        return np.full_like(m, np.nan) if len(calls) == 1 else real_sqrtm(m)

    monkeypatch.setattr(fid.linalg, 'sqrtm', flaky_sqrtm)
    eps = 1e-2  # large enough to see that the offset is used inside the root only
    with pytest.warns(UserWarning, match='singular'):
        value = fid.frechet_distance(np.zeros(8), np.diag(a), np.zeros(8), np.diag(b), eps=eps)
    assert len(calls) == 2
    np.testing.assert_allclose(calls[1], np.diag((a + eps) * (b + eps)))
    assert value == pytest.approx(a.sum() + b.sum() - 2 * np.sqrt((a + eps) * (b + eps)).sum(), rel=1e-12)


def test_frechet_imaginary_parts(monkeypatch):
    # A "covariance" that is not PSD has a genuinely complex root: refuse it.
    with pytest.raises(ValueError, match='imaginary'):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), -np.eye(3))
    # Tiny imaginary parts (rounding) are dropped.
    real_sqrtm = fid.linalg.sqrtm
    monkeypatch.setattr(fid.linalg, 'sqrtm', lambda m: real_sqrtm(m) + 1e-7j)
    a = np.array([1.0, 4.0])
    assert fid.frechet_distance(np.zeros(2), np.diag(a), np.ones(2), np.diag(a)) == pytest.approx(2.0)
    with pytest.raises(ValueError, match='mismatched'):
        fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


# ---------------------------------------------------------------------------------------------
# Inception Score and statistics
# ---------------------------------------------------------------------------------------------

def test_inception_score():
    # Identical predictions for every image: p(y|x) = p(y), KL = 0, IS = 1.
    assert fid.inception_score(np.tile(np.arange(1008.0), (20, 1)))[0] == pytest.approx(1.0, abs=1e-12)
    # Confident predictions spread evenly over K classes in each split: IS = K.
    K = 7
    onehot = 60.0 * np.eye(1008)[np.arange(70) % K]
    mean, std = fid.inception_score(onehot, splits=10)
    assert mean == pytest.approx(K, rel=1e-9) and std == pytest.approx(0, abs=1e-9)
    # Random logits, N not divisible by the splits: the original formula, written out with numpy.
    logits = np.random.default_rng(10).standard_normal((103, 1008)) * 3
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for i in range(10):
        part = p[i * 103 // 10:(i + 1) * 103 // 10]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    assert fid.inception_score(logits) == pytest.approx((np.mean(scores), np.std(scores)), rel=1e-10)
    with pytest.raises(ValueError, match='at least 10'):
        fid.inception_score(logits[:9])


def test_feature_stats_are_float64_mean_and_unbiased_covariance():
    f = torch.randn(50, 6, generator=torch.Generator().manual_seed(11))
    mu, sigma = fid.feature_stats(f)
    assert mu.dtype == sigma.dtype == np.float64
    x = f.double().numpy()
    np.testing.assert_allclose(mu, x.sum(0) / 50, rtol=1e-12)
    np.testing.assert_allclose(sigma, (x - mu).T @ (x - mu) / 49, rtol=1e-10, atol=1e-14)



def _stats(n, d=16, seed=12, protocol='edm'):
    mu, sigma = _random_cov(200, d, seed)
    return dict(mu=mu, sigma=sigma, num_images=n, protocol=protocol)


def test_fewer_than_2048_images_refused():
    with pytest.raises(ValueError, match='at least 2048 .*rank'):
        fid.check_count(2047)
    fid.check_count(2048)
    with pytest.raises(ValueError, match='2048'):
        fid.fid_from_stats(_stats(1000), _stats(50000, seed=13))
    with pytest.raises(ValueError, match='2048 reference'):
        fid.fid_from_stats(_stats(50000), _stats(100, seed=13))
    a, b = _stats(50000), _stats(50000, seed=13)
    assert fid.fid_from_stats(a, b) == fid.frechet_distance(a['mu'], a['sigma'], b['mu'], b['sigma'])


def test_stats_files_record_their_protocol(tmp_path):
    for protocol in fid.PROTOCOLS:
        stats = _stats(4096, protocol=protocol)
        path = tmp_path / protocol / 'ref.npz'
        fid.save_stats(path, stats)
        assert sorted(p.name for p in path.parent.iterdir()) == ['ref.npz']  # no temporary left
        back = fid.load_stats(path)
        assert np.array_equal(back['mu'], stats['mu']) and np.array_equal(back['sigma'], stats['sigma'])
        assert back['num_images'] == 4096 and back['protocol'] == protocol and not back['protocol_inferred']
        with np.load(path) as f:
            assert str(f['protocol']) == fid.PROTOCOLS[protocol]  # the description is on disk
    # Files written before protocols had names carry pytorch-fid's description: still pytorch-fid.
    legacy = tmp_path / 'legacy.npz'
    np.savez(legacy, mu=stats['mu'], sigma=stats['sigma'], num_images=4096,
             protocol='pytorch-fid Inception (pt_inception-2015-12-05), bilinear resize to 299, [-1,1]')
    assert fid.load_stats(legacy)['protocol'] == 'pytorch-fid'
    # No protocol key: EDM's fid.py writes np.savez (stored), pytorch-fid np.savez_compressed.
    edm, torch_fid = tmp_path / 'cifar10-32x32.npz', tmp_path / 'pytorch-fid.npz'
    np.savez(edm, mu=stats['mu'], sigma=stats['sigma'])
    np.savez_compressed(torch_fid, mu=stats['mu'], sigma=stats['sigma'])
    for path, protocol in ((edm, 'edm'), (torch_fid, 'pytorch-fid')):
        back = fid.load_stats(path)
        assert back['protocol'] == protocol and back['protocol_inferred'] and back['num_images'] is None
    images = tmp_path / 'images.npz'
    np.savez(images, images=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match='no FID statistics'):
        fid.load_stats(images)


def test_mixing_protocols_is_refused_naming_the_file_to_use(tmp_path):
    ours_edm, ours_pt = _stats(50000), _stats(50000, seed=13, protocol='pytorch-fid')
    # A pytorch-fid reference under edm: use EDM's published file or make an edm one.
    with pytest.raises(ValueError, match=r"protocol 'pytorch-fid'.*uses 'edm'.*--ref cifar10-32x32.*"
                                         r'fid-refs/cifar10-32x32.npz.*--protocol pytorch-fid to use this'):
        fid.fid_from_stats(ours_edm, ours_pt)
    # An EDM reference (inferred from storage) under pytorch-fid: make a pytorch-fid one.
    edm = tmp_path / 'cifar10-32x32.npz'
    np.savez(edm, mu=ours_edm['mu'], sigma=ours_edm['sigma'])
    with pytest.raises(ValueError, match=r"protocol 'edm' \(inferred.*ref --protocol pytorch-fid.*"
                                         r'--protocol edm'):
        fid.fid_from_stats(_stats(50000, protocol='pytorch-fid'), fid.load_stats(edm))
    assert fid.fid_from_stats(_stats(50000), fid.load_stats(edm)) == pytest.approx(0, abs=1e-8)
    with pytest.warns(UserWarning, match='MIXING FID PROTOCOLS'):
        fid.fid_from_stats(ours_pt, fid.load_stats(edm), allow_foreign=True)
    with pytest.raises(ValueError, match="protocol 'tf-slim'"):
        fid.fid_from_stats(ours_edm, {**ours_pt, 'protocol': 'tf-slim'})
    with pytest.raises(ValueError, match='no known protocol'):
        fid.fid_from_stats({**ours_edm, 'protocol': None}, ours_edm)


def test_edms_published_references_are_downloaded_by_name(tmp_path, monkeypatch):
    path = tmp_path / 'stored.npz'
    np.savez_compressed(path, mu=np.zeros(4), sigma=np.eye(4))  # even stored differently: it is EDM's
    calls = []
    monkeypatch.setattr(fid.data, 'download', lambda url, sha256=None: calls.append((url, sha256)) or path)
    ref = fid.load_reference('cifar10-32x32')
    assert calls == [('https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz', None)]
    assert ref['protocol'] == 'edm' and not ref['protocol_inferred']
    assert fid.load_reference('https://example.org/mine.npz')['protocol'] == 'pytorch-fid'  # compressed


# ---------------------------------------------------------------------------------------------
# Images in, statistics out, with a cheap stand-in for the network
# ---------------------------------------------------------------------------------------------

class FakeNet(torch.nn.Module):
    """A fixed random linear map of the preprocessed pixels to 16 'features' and 10 'logits'.

    Each protocol scales the pixels its own way (and edm takes uint8 only), as the real one does.
    """

    def __init__(self, pixels=3 * 8 * 8):
        super().__init__()
        g = torch.Generator().manual_seed(14)
        proj = torch.randn(pixels, 26, generator=g, dtype=torch.float64) / pixels ** 0.5
        self.register_buffer('proj', proj)
        self.calls = 0

    def forward(self, images, protocol='edm'):
        self.calls += 1
        if protocol == 'edm':
            assert images.dtype == torch.uint8
            x = (images.double() - 128) / 128
        else:
            x = 2 * (images.double() / 255 if images.dtype == torch.uint8 else images.double()) - 1
        x = x.expand(-1, 3, -1, -1).flatten(1)
        out = x @ self.proj  # float64: equal up to rounding whatever the batching
        return out[:, :16], 5 * out[:, 16:]


def _images(n, seed, size=8):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)  # NHWC


def _png_folder(folder, nhwc):
    for i, img in enumerate(nhwc):  # nested, as EDM's generate.py writes seed folders
        (folder / f'{i // 3:06d}').mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img).save(
            folder / f'{i // 3:06d}' / f'{i:06d}.png')
    return folder


@pytest.mark.parametrize('protocol', list(fid.PROTOCOLS))
def test_every_image_source_gives_the_same_features(tmp_path, protocol):
    nhwc = _images(5, 15)
    npz = tmp_path / 'samples.npz'
    np.savez(npz, images=nhwc)
    folder = _png_folder(tmp_path / 'pngs', nhwc)
    net = FakeNet()
    nchw = torch.from_numpy(nhwc).permute(0, 3, 1, 2)
    expected = net(nchw, protocol)[0].numpy()
    for source, workers in ((nchw, 0), (str(npz), 0), (folder, 0), (folder, 1)):
        features, logits = fid.compute_features(source, net, batch_size=2, num_workers=workers,
                                                progress=False, protocol=protocol)
        assert features.shape == (5, 16) and logits.shape == (5, 10)
        np.testing.assert_allclose(features, expected, rtol=1e-6, atol=1e-7)  # float32 output
    with pytest.raises(ValueError, match=r'uint8 images \[N, H, W, C\]'):
        np.savez(npz, images=nhwc.transpose(0, 3, 1, 2).astype(np.float32))
        fid.read_source(str(npz))
    with pytest.raises(ValueError, match="unknown FID protocol 'tf'"):
        fid.compute_features(nchw, net, protocol='tf')


def test_images_of_mixed_sizes_are_refused(tmp_path):
    net = FakeNet()
    folder = _png_folder(tmp_path / 'mixed', _images(3, 16))
    Image.fromarray(_images(1, 17, size=6)[0]).save(folder / '000000' / 'zz.png')  # sorts last
    # Inside one batch (in a DataLoader worker or not), and across batches.
    for batch, workers in ((100, 0), (100, 1), (1, 0)):
        with pytest.raises(ValueError, match=r'images of different sizes \(.*6, 6\).*resize them'):
            fid.compute_features(folder, net, batch_size=batch, num_workers=workers, progress=False)
    # Grayscale among RGB images of one size is fine: it is repeated over the channels.
    rgb = _images(4, 18)
    rgb[1] = rgb[1, :, :, :1]  # image 1 is gray: R = G = B
    folder = _png_folder(tmp_path / 'gray', rgb)
    Image.fromarray(rgb[1, :, :, 0]).save(folder / '000000' / '000001.png')  # stored as mode L
    features, _ = fid.compute_features(folder, net, batch_size=4, progress=False)
    expected = net(torch.from_numpy(rgb).permute(0, 3, 1, 2))[0].numpy()
    np.testing.assert_allclose(features, expected, rtol=1e-6, atol=1e-7)


def test_inception_score_is_none_without_a_classifier():
    class NoClassifier(FakeNet):
        def forward(self, images, protocol='edm'):
            features, logits = super().forward(images, protocol)
            return features, torch.full_like(logits, float('nan'))

    images = torch.from_numpy(_images(20, 19)).permute(0, 3, 1, 2)
    assert fid.compute_stats(images, FakeNet(), progress=False)['inception_score'] is not None
    stats = fid.compute_stats(images, NoClassifier(), progress=False)
    assert stats['inception_score'] is None and stats['protocol'] == 'edm' and stats['num_images'] == 20


# ---------------------------------------------------------------------------------------------
# PRDC
# ---------------------------------------------------------------------------------------------

def prdc_brute_force(real, fake, k):
    """Naeem et al.'s four definitions, one pair at a time, in float64 numpy."""
    dist = lambda a, b: float(np.sqrt(((a - b) ** 2).sum()))
    radius = lambda s, i: sorted(dist(s[i], s[j]) for j in range(len(s)) if j != i)[k - 1]
    r_real = [radius(real, i) for i in range(len(real))]
    r_fake = [radius(fake, j) for j in range(len(fake))]
    inside = [[dist(real[i], fake[j]) < r_real[i] for j in range(len(fake))] for i in range(len(real))]
    precision = np.mean([any(inside[i][j] for i in range(len(real))) for j in range(len(fake))])
    recall = np.mean([any(dist(real[i], fake[j]) < r_fake[j] for j in range(len(fake)))
                      for i in range(len(real))])
    density = sum(map(sum, inside)) / (k * len(fake))
    coverage = np.mean([any(row) for row in inside])
    return dict(precision=precision, recall=recall, density=density, coverage=coverage)


@pytest.mark.parametrize('k, chunk', [(5, 1024), (3, 7)])
def test_prdc_equals_the_brute_force_count(k, chunk):
    rng = np.random.default_rng(20)
    real = rng.standard_normal((60, 6))
    fake = 1.2 * rng.standard_normal((45, 6)) + 0.6  # overlapping, not identical: values in (0, 1)
    got = fid.prdc(real, fake, k=k, chunk=chunk)
    expected = prdc_brute_force(real, fake, k)
    assert got == pytest.approx(expected, abs=1e-12)
    assert 0 < got['precision'] < 1 and 0 < got['recall'] < 1 and 0 < got['coverage'] < 1


def test_prdc_known_answers():
    x = np.random.default_rng(21).standard_normal((40, 5))
    # Identical sets: every point lies in its own ball, and each ball holds exactly k other points
    # strictly inside (itself and its k - 1 nearest): all four are 1.
    assert fid.prdc(x, x.copy(), k=5) == pytest.approx(dict(precision=1, recall=1, density=1, coverage=1))
    # Disjoint sets far apart: nothing in anyone's ball.
    assert fid.prdc(x, x + 100, k=5) == dict(precision=0, recall=0, density=0, coverage=0)
    # Half the fakes are real points, half far away: precision and density halve, coverage stays 1.
    half = np.concatenate([x, x + 100])
    got = fid.prdc(x, half, k=5)
    assert got['precision'] == pytest.approx(0.5) and got['density'] == pytest.approx(0.5)
    assert got['coverage'] == 1
    with pytest.raises(ValueError, match='more than 5 images'):
        fid.prdc(x[:5], x, k=5)


def test_subset_is_edms_seeded_choice():
    idx = fid.subset(100, 10, seed=3)
    perm = np.arange(100)
    np.random.RandomState(3).shuffle(perm)
    assert np.array_equal(idx, np.sort(perm[:10]))
    assert np.array_equal(fid.subset(8, 10), np.arange(8))


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def fake_cli(monkeypatch):
    """fid.main with FakeNet for the network and a faked CIFAR-10 training set (3000 images)."""
    net, loads = FakeNet(), []
    monkeypatch.setattr(fid, 'load_inception', lambda device=None, url=None, protocol='edm':
                        loads.append((url, protocol)) or net)
    ref_nchw = torch.from_numpy(_images(3000, 16)).permute(0, 3, 1, 2)
    monkeypatch.setattr(fid.data, 'load_cifar10', lambda split: (ref_nchw, torch.zeros(3000)))
    return net, loads, ref_nchw


@pytest.mark.parametrize('protocol', list(fid.PROTOCOLS))
def test_cli_ref_and_calc(tmp_path, fake_cli, capsys, protocol):
    net, loads, ref_nchw = fake_cli
    ref = tmp_path / 'ref.npz'
    flag = [] if protocol == 'edm' else ['--protocol', protocol]  # edm is the default
    fid.main(['ref', '--data', 'cifar10', '--dest', str(ref), '--batch', '512', '--workers', '0',
              '--weights', 'w.pt'] + flag)
    assert loads == [('w.pt', protocol)]
    ref_stats = fid.load_stats(ref)
    assert ref_stats['num_images'] == 3000 and ref_stats['protocol'] == protocol

    samples = tmp_path / 'samples.npz'
    nhwc = _images(2100, 17)
    np.savez(samples, images=nhwc)
    capsys.readouterr()
    value = fid.main(['calc', '--images', str(samples), '--ref', str(ref), '--batch', '500'] + flag)
    out = capsys.readouterr().out
    # Independently: features of all images at once, numpy statistics, the Frechet distance.
    f_gen = net(torch.from_numpy(nhwc).permute(0, 3, 1, 2), protocol)[0].float().double().numpy()
    f_ref = net(ref_nchw, protocol)[0].float().double().numpy()  # features are stored as float32
    expected = fid.frechet_distance(f_gen.mean(0), np.cov(f_gen.T), f_ref.mean(0), np.cov(f_ref.T))
    assert value == pytest.approx(expected, rel=1e-6) and value > 0
    assert f'FID {value:g}' in out and ' IS ' in out and fid.PROTOCOLS[protocol] in out

    # Too few images, or a reference of the other protocol: refused before the network runs.
    few = tmp_path / 'few.npz'
    np.savez(few, images=nhwc[:100])
    calls = net.calls
    with pytest.raises(ValueError, match='at least 2048'):
        fid.main(['calc', '--images', str(few), '--ref', str(ref)] + flag)
    other = 'pytorch-fid' if protocol == 'edm' else 'edm'
    with pytest.raises(ValueError, match=f"made with protocol '{protocol}'.*uses '{other}'"):
        fid.main(['calc', '--images', str(samples), '--ref', str(ref), '--protocol', other])
    assert net.calls == calls
    with pytest.warns(UserWarning, match='MIXING'):
        fid.main(['calc', '--images', str(samples), '--ref', str(ref), '--protocol', other,
                  '--allow-foreign-ref'])


def test_cli_calc_against_edms_published_reference(tmp_path, fake_cli, monkeypatch, capsys):
    net = FakeNet(pixels=3 * 32 * 32)  # EDM's cifar10-32x32 is of 32x32 images: so are these
    monkeypatch.setattr(fid, 'load_inception', lambda *args, **kwargs: net)
    nhwc = _images(2100, 22, size=32)
    f = net(torch.from_numpy(nhwc).permute(0, 3, 1, 2))[0].float().double().numpy()
    published = tmp_path / 'cifar10-32x32.npz'
    np.savez(published, mu=f.mean(0) + 0.1, sigma=np.cov(f.T))  # what EDM's `fid.py ref` writes
    monkeypatch.setattr(fid.data, 'download', lambda url, sha256=None: published)
    samples = tmp_path / 'samples.npz'
    np.savez(samples, images=nhwc)
    value = fid.main(['calc', '--images', str(samples), '--ref', 'cifar10-32x32'])
    assert value == pytest.approx(16 * 0.1 ** 2, rel=1e-6)  # same sigma: only the mean shift remains
    with pytest.raises(ValueError, match="'edm'.*uses 'pytorch-fid'"):
        fid.main(['calc', '--images', str(samples), '--ref', 'cifar10-32x32', '--protocol', 'pytorch-fid'])


def test_cli_prdc(tmp_path, fake_cli, capsys):
    net, _, ref_nchw = fake_cli
    samples = tmp_path / 'samples.npz'
    nhwc = _images(300, 23)
    np.savez(samples, images=nhwc)
    scores = fid.main(['prdc', '--images', str(samples), '--ref-images', 'cifar10', '--num', '200',
                       '--seed', '4', '--workers', '0'])
    real = net(ref_nchw[torch.from_numpy(fid.subset(3000, 200, 4))])[0].float().numpy()
    fake = net(torch.from_numpy(nhwc[fid.subset(300, 200, 4)]).permute(0, 3, 1, 2))[0].float().numpy()
    assert scores == pytest.approx(fid.prdc(real, fake, k=5), abs=1e-12)
    assert 'precision' in capsys.readouterr().out


def test_cli_errors_are_one_line_with_status_2(tmp_path):
    missing = tmp_path / 'nothing.npz'
    command = [sys.executable, 'fid.py', 'calc', '--images', str(missing), '--ref', str(missing)]
    result = subprocess.run(command, cwd=Path(fid.__file__).parent, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count('\n') == 0 and result.stderr.startswith('fid.py: error: No such file')
