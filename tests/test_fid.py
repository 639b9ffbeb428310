"""Tests for fid.py: the Inception network's layout and invariants, the Frechet distance against
closed forms, the Inception Score, statistics files, downloads and the CLI (with a fake network).

The real weights are never downloaded: layouts are generated here, downloads go through file://.
Exact parity with pytorch-fid's own code was checked outside the test suite (see the report).
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
import fid

# ---------------------------------------------------------------------------------------------
# The published key layout, written out independently of fid.py (torchvision's Inception3 names)
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


def published_layout():
    """{key: shape} of pt_inception-2015-12-05-6726825d.pth: 94 conv+BN units and fc."""
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
    convs += [(f'{block}.{name}', *rest) for block, units in blocks.items() for name, *rest in units]
    layout = {}
    for name, c_in, c_out, kh, kw in convs:
        layout[f'{name}.conv.weight'] = (c_out, c_in, kh, kw)
        for key in ('weight', 'bias', 'running_mean', 'running_var'):
            layout[f'{name}.bn.{key}'] = (c_out,)
        layout[f'{name}.bn.num_batches_tracked'] = ()
    layout['fc.weight'], layout['fc.bias'] = (1008, 2048), (1008,)
    return layout


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
    net = fid.InceptionV3()

    def calibrate(bn):
        def hook(module, inputs, out):
            bn.running_mean.copy_(out.mean((0, 2, 3)))
            bn.running_var.copy_(out.var((0, 2, 3)) * (0.8 + 0.4 * torch.rand(out.shape[1])))
            bn.weight.copy_(0.5 + torch.rand(out.shape[1]))
            bn.bias.copy_(0.3 * torch.randn(out.shape[1]))
        return hook

    handles = [m.conv.register_forward_hook(calibrate(m.bn)) for m in net.modules()
               if isinstance(m, fid.Conv)]
    with torch.no_grad():
        net(torch.rand(2, 3, 32, 32))
    for h in handles:
        h.remove()
    net.fc.weight.normal_(0, 0.05)
    net.fc.bias.normal_(0, 1.0)
    return net


# ---------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------

def test_published_layout_loads_strictly():
    layout = published_layout()
    # The published file's inventory: 566 keys, 23,850,960 parameters (fc included).
    assert len(layout) == 566
    assert sum(math.prod(s) for k, s in layout.items()
               if 'running' not in k and 'num_batches' not in k) == 23_850_960
    state = random_state_dict()
    net = fid.InceptionV3()
    net.load_state_dict(state)  # strict
    mine = net.state_dict()
    assert {k: tuple(v.shape) for k, v in mine.items()} == layout
    assert torch.equal(net.Mixed_7c.branch_pool.bn.running_var, state['Mixed_7c.branch_pool.bn.running_var'])
    assert torch.equal(net.Mixed_6b.branch7x7dbl_3.conv.weight, state['Mixed_6b.branch7x7dbl_3.conv.weight'])
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
    u8 = torch.randint(0, 256, (3, 3, 32, 32), generator=g, dtype=torch.uint8)
    features, logits = model(u8)
    assert features.shape == (3, 2048) and logits.shape == (3, 1008)
    assert features.dtype == logits.dtype == torch.float32
    assert (features >= 0).all() and features.std() > 0.01  # an average of ReLUs, and not tiny
    # uint8 input is exactly float input / 255 (what PIL -> ToTensor gives pytorch-fid).
    assert torch.equal(model(u8.float() / 255)[0], features)
    # Channels-last storage (an NHWC array viewed as NCHW) gives the same numbers.
    nhwc = u8.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    assert torch.equal(model(nhwc)[0], features)
    # The IS logits are pool3 times the classifier matrix, without the bias.
    assert torch.allclose(logits, features @ model.fc.weight.T, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits, model.fc(features), atol=1e-2)
    # Grayscale is the image repeated over RGB, as PIL's convert('RGB') does.
    assert torch.equal(model(u8[:, :1])[0], model(u8[:, :1].repeat(1, 3, 1, 1))[0])
    with pytest.raises(ValueError, match='expected images'):
        model(torch.rand(2, 4, 8, 8))


def test_always_eval_mode_so_features_do_not_depend_on_the_batch(model):
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    together = model(x)[0]
    model.train()  # must not switch BatchNorm to batch statistics
    assert not model.training and not any(m.training for m in model.modules())
    alone = torch.cat([model(x[i:i + 1])[0] for i in range(3)])
    torch.testing.assert_close(alone, together, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize('block, pool', [(lambda: fid.InceptionA(4, pool_features=4), 'tf_avg'),
                                         (lambda: fid.InceptionC(4, c7=4), 'tf_avg'),
                                         (lambda: fid.InceptionE(4, pool='avg'), 'tf_avg'),
                                         (lambda: fid.InceptionE(4, pool='max'), 'max')])
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


def _stats(n, d=16, seed=12):
    mu, sigma = _random_cov(200, d, seed)
    return dict(mu=mu, sigma=sigma, num_images=n, protocol=fid.PROTOCOL)


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


def test_stats_npz_round_trip_and_foreign_files(tmp_path):
    stats = _stats(4096)
    path = tmp_path / 'sub' / 'ref.npz'
    fid.save_stats(path, stats)
    assert sorted(p.name for p in path.parent.iterdir()) == ['ref.npz']  # no temporary left
    back = fid.load_stats(path)
    assert np.array_equal(back['mu'], stats['mu']) and np.array_equal(back['sigma'], stats['sigma'])
    assert back['num_images'] == 4096 and back['protocol'] == fid.PROTOCOL
    # An EDM-style file: plain np.savez(mu, sigma), no protocol marker. Never mixed silently.
    edm = tmp_path / 'cifar10-32x32.npz'
    np.savez(edm, mu=stats['mu'], sigma=stats['sigma'])
    foreign = fid.load_stats(edm)
    assert foreign['protocol'] is None and foreign['num_images'] is None
    with pytest.raises(ValueError, match="no 'protocol' key.*EDM"):
        fid.fid_from_stats(stats, foreign)
    with pytest.warns(UserWarning, match='MIXING FID PROTOCOLS'):
        assert fid.fid_from_stats(stats, foreign, allow_foreign=True) == pytest.approx(0, abs=1e-8)
    images = tmp_path / 'images.npz'
    np.savez(images, images=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match='no FID statistics'):
        fid.load_stats(images)


# ---------------------------------------------------------------------------------------------
# Weights download (file:// fixtures; never the network)
# ---------------------------------------------------------------------------------------------

def _hashed_copy(tmp_path, stem, payload_path):
    """Rename a file to torch.hub's `<stem>-<sha256 prefix>.pth` form."""
    digest = data.sha256_of(payload_path)
    dest = tmp_path / f'{stem}-{digest[:8]}.pth'
    payload_path.rename(dest)
    return dest


def test_download_checks_the_sha256_prefix_in_the_file_name(tmp_path, monkeypatch):
    raw = tmp_path / 'raw.bin'
    raw.write_bytes(b'not really weights')
    good = _hashed_copy(tmp_path, 'tiny', raw)
    cached = fid.download_weights(good.as_uri())
    assert cached != good and cached.read_bytes() == b'not really weights'
    bad = tmp_path / 'tiny-00000000.pth'
    bad.write_bytes(b'not really weights')
    with pytest.raises(ValueError, match='00000000.*deleted'):
        fid.download_weights(bad.as_uri())
    assert not (data.cache_root() / bad.name).exists()  # the bad cached copy is gone
    # The official URL carries 6726825d, and it is checked (download faked: no network).
    raw.write_bytes(b'something else')
    monkeypatch.setattr(fid.data, 'download', lambda url: raw)
    with pytest.raises(ValueError, match='6726825d'):
        fid.download_weights()


def test_load_inception_end_to_end(tmp_path, monkeypatch):
    state = random_state_dict(seed=1)
    raw = tmp_path / 'raw.pth'
    torch.save(state, raw)
    weights = _hashed_copy(tmp_path, 'pt_inception-test', raw)
    monkeypatch.setattr(fid, 'WEIGHTS_URL', weights.as_uri())
    net = fid.load_inception('cpu')
    assert not net.training and next(net.parameters()).device.type == 'cpu'
    loaded = net.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


# ---------------------------------------------------------------------------------------------
# Images in, statistics out, and the CLI, with a cheap stand-in for the network
# ---------------------------------------------------------------------------------------------

class FakeNet(torch.nn.Module):
    """A fixed random linear map of the pixels (order-sensitive) to 16 'features' and 10 'logits'."""

    def __init__(self, pixels=3 * 8 * 8):
        super().__init__()
        g = torch.Generator().manual_seed(14)
        proj = torch.randn(pixels, 26, generator=g, dtype=torch.float64) / pixels ** 0.5
        self.register_buffer('proj', proj)
        self.calls = 0

    def forward(self, images):
        self.calls += 1
        x = images.double() / 255 if images.dtype == torch.uint8 else images.double()
        out = x.flatten(1) @ self.proj  # float64: equal up to rounding whatever the batching
        return out[:, :16], 5 * out[:, 16:]


def _images(n, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)  # NHWC


def test_every_image_source_gives_the_same_features(tmp_path):
    nhwc = _images(5, 15)
    npz = tmp_path / 'samples.npz'
    np.savez(npz, images=nhwc)
    folder = tmp_path / 'pngs'
    for i, img in enumerate(nhwc):  # nested, as EDM's generate.py writes seed folders
        (folder / f'{i // 3:06d}').mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f'{i // 3:06d}' / f'{i:06d}.png')
    net = FakeNet()
    nchw = torch.from_numpy(nhwc).permute(0, 3, 1, 2)
    expected = net(nchw)[0].numpy()
    for source, workers in ((nchw, 0), (str(npz), 0), (folder, 0), (folder, 1)):
        features, logits = fid.compute_features(source, net, batch_size=2, num_workers=workers,
                                                progress=False)
        assert features.shape == (5, 16) and logits.shape == (5, 10)
        np.testing.assert_allclose(features, expected, rtol=1e-6, atol=1e-7)  # float32 output
    with pytest.raises(ValueError, match=r'uint8 images \[N, H, W, C\]'):
        np.savez(npz, images=nhwc.transpose(0, 3, 1, 2).astype(np.float32))
        fid.read_source(str(npz))


def test_cli_ref_and_calc(tmp_path, monkeypatch, capsys):
    net = FakeNet()
    monkeypatch.setattr(fid, 'load_inception', lambda device=None, url=None: net)
    # `--data cifar10` reads the training set through data.load_cifar10 (faked here).
    ref_nchw = torch.from_numpy(_images(3000, 16)).permute(0, 3, 1, 2)
    splits_read = []
    monkeypatch.setattr(fid.data, 'load_cifar10',
                        lambda split: splits_read.append(split) or (ref_nchw, torch.zeros(3000)))
    ref = tmp_path / 'ref.npz'
    fid.main(['ref', '--data', 'cifar10', '--dest', str(ref), '--batch', '512', '--workers', '0'])
    assert splits_read == ['train']
    ref_stats = fid.load_stats(ref)
    assert ref_stats['num_images'] == 3000 and ref_stats['protocol'] == fid.PROTOCOL

    samples = tmp_path / 'samples.npz'
    nhwc = _images(2100, 17)
    np.savez(samples, images=nhwc)
    capsys.readouterr()
    value = fid.main(['calc', '--images', str(samples), '--ref', str(ref), '--batch', '500'])
    out = capsys.readouterr().out
    # Independently: features of all images at once, numpy statistics, the Frechet distance.
    f_gen = net(torch.from_numpy(nhwc).permute(0, 3, 1, 2))[0].float().double().numpy()
    f_ref = net(ref_nchw)[0].float().double().numpy()  # features are stored as float32
    expected = fid.frechet_distance(f_gen.mean(0), np.cov(f_gen.T), f_ref.mean(0), np.cov(f_ref.T))
    assert value == pytest.approx(expected, rel=1e-6) and value > 0
    assert f'FID {value:g}' in out and ' IS ' in out and fid.PROTOCOL in out

    # Too few images: refused before the network runs.
    few = tmp_path / 'few.npz'
    np.savez(few, images=nhwc[:100])
    calls = net.calls
    with pytest.raises(ValueError, match='at least 2048'):
        fid.main(['calc', '--images', str(few), '--ref', str(ref)])
    assert net.calls == calls
    # A foreign (EDM-style) reference: refused, or a loud warning when explicitly allowed.
    edm = tmp_path / 'edm.npz'
    np.savez(edm, mu=ref_stats['mu'], sigma=ref_stats['sigma'])
    with pytest.raises(ValueError, match='allow-foreign-ref'):
        fid.main(['calc', '--images', str(samples), '--ref', str(edm)])
    with pytest.warns(UserWarning, match='MIXING'):
        assert fid.main(['calc', '--images', str(samples), '--ref', str(edm),
                         '--allow-foreign-ref']) == pytest.approx(value, rel=1e-12)
