"""Tests for lpips_vgg.py and the L1 + LPIPS loss of distill.py: exact math, files, a run, offline errors.

No real weights are downloaded (no network in tests): random weights are written in both formats
(torchvision's VGG16 state dict, piq's list of five [1, C, 1, 1] tensors), and the formula is
written out again below in float64 with plain F.conv2d / F.avg_pool2d over VGG16's configuration.
"""
import hashlib
import json
import shutil
import urllib.error

import pytest
import torch
import torch.nn.functional as F

import cli
import data
import distill
import lpips_vgg
import models
import presets
import unet

CFG_D = [64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512, 'M']


class NotATensor:
    """A pickled object: torch.load(weights_only=True) must refuse to build it."""


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """Random weights in both published formats: (VGG16 state dict file, layer-weights file)."""
    d = tmp_path_factory.mktemp('lpips')
    g = torch.Generator().manual_seed(0)
    state, c_in, i = {}, 3, 0
    for v in CFG_D:  # torchvision numbering: conv i, ReLU i + 1; a pool takes one number
        if v == 'M':
            i += 1
            continue
        state[f'features.{i}.weight'] = torch.randn(v, c_in, 3, 3, generator=g) * (2 / (9 * c_in)) ** 0.5
        state[f'features.{i}.bias'] = 0.1 * torch.randn(v, generator=g)
        c_in, i = v, i + 2
    state['classifier.0.weight'] = torch.randn(7, 5, generator=g)  # present in the real file, unused
    torch.save(state, d / 'vgg.pth')
    torch.save([torch.rand(1, c, 1, 1, generator=g) for c in (64, 128, 256, 512, 512)], d / 'w.pt')
    return d / 'vgg.pth', d / 'w.pt'


@pytest.fixture(scope='module')
def net(files):
    return distill.load_lpips('cpu', str(files[0]), str(files[1]))


def tiny_image_teacher(path):
    models.save_model(path, unet.EDMPrecond(img_resolution=8, img_channels=3, model_channels=16,
                                            channel_mult=[1], num_blocks=1, attn_resolutions=[]))


def reference(x, y, state, weights):
    """LPIPS in float64, written out: ImageNet normalisation, VGG16-D with 2x2 average pools, the
    outputs of relu1_2 .. relu5_3 unit-normalised over channels (norm + 1e-10), squared differences
    weighted per channel, averaged over pixels, summed over channels and layers."""
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, 3, 1, 1)
    a, b = (x.double() - mean) / std, (y.double() - mean) / std
    total, i, taps = 0, 0, []
    for v in CFG_D:
        if v == 'M':
            a, b, i = F.avg_pool2d(a, 2), F.avg_pool2d(b, 2), i + 1
            continue
        W, bias = state[f'features.{i}.weight'].double(), state[f'features.{i}.bias'].double()
        a, b = F.relu(F.conv2d(a, W, bias, padding=1)), F.relu(F.conv2d(b, W, bias, padding=1))
        i += 2
        if i - 1 in (3, 8, 15, 22, 29):  # the ReLU just applied has number i - 1
            taps.append((a / (a.square().sum(1, keepdim=True).sqrt() + 1e-10),
                         b / (b.square().sum(1, keepdim=True).sqrt() + 1e-10)))
    for (fa, fb), w in zip(taps, weights, strict=True):
        per_channel = (fa - fb).square().mean(dim=(2, 3))       # [B, C]
        total = total + (per_channel * w.double().view(1, -1)).sum(1)
    assert len(taps) == 5
    return total


# ------------------------------------------------------------------------------------------------
# The formula
# ------------------------------------------------------------------------------------------------

def test_matches_the_formula_written_out_in_float64(files, net):
    state, weights = torch.load(files[0], weights_only=True), torch.load(files[1], weights_only=True)
    g = torch.Generator().manual_seed(1)
    x, y = (torch.rand(2, 3, 32, 32, generator=g, dtype=torch.float64) for _ in range(2))
    y[1] = x[1] + 0.01 * (y[1] - x[1])  # one pair close together: distances of different sizes
    ref = reference(x, y, state, weights)
    assert ref.shape == (2,) and (ref > 0).all() and ref[1] < ref[0] / 10
    d64 = lpips_vgg.LPIPS(lpips_vgg.read_vgg16(files[0]), lpips_vgg.read_layer_weights(files[1])).double()
    torch.testing.assert_close(d64(x, y), ref, rtol=1e-10, atol=0)
    torch.testing.assert_close(net(x.float(), y.float()).double(), ref, rtol=1e-4, atol=0)  # float32


def test_per_sample_distances_zero_for_equal_images_and_gradients_to_the_input(net):
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(4, 3, 16, 16, generator=g), torch.rand(4, 3, 16, 16, generator=g)
    assert torch.equal(net(x, x), torch.zeros(4))
    d = net(x, y)
    torch.testing.assert_close(net(x[2:3], y[2:3]), d[2:3])  # each sample on its own: per sample
    assert not any(p.requires_grad for p in net.parameters()) and not net.training
    x.requires_grad_(True)
    net(x, y).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # The gradient is the distance's: a small step against it lowers every sample's distance.
    with torch.no_grad():
        assert (net(x - 1e-3 * x.grad / x.grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1), y) < d).all()


def test_all_zero_features_give_finite_gradients(files):
    """relu1_2 all zero (a large negative bias): sqrt's NaN gradient at a zero norm must not reach x."""
    state = lpips_vgg.read_vgg16(files[0])
    state['2.bias'] = torch.full((64,), -1e3)
    net = lpips_vgg.LPIPS(state, lpips_vgg.read_layer_weights(files[1]))
    x, y = torch.rand(2, 3, 16, 16, requires_grad=True), torch.rand(2, 3, 16, 16)
    assert net.taps(x)[0].abs().max() == 0
    net(x, y).sum().backward()
    assert torch.isfinite(x.grad).all()


# ------------------------------------------------------------------------------------------------
# The weight files
# ------------------------------------------------------------------------------------------------

def test_files_load_from_paths_and_urls_and_bad_files_are_refused(files, net, tmp_path):
    vgg, w = files
    x = torch.rand(2, 3, 16, 16)
    by_url = distill.load_lpips('cpu', vgg.as_uri(), w.as_uri())  # file:// URLs go through data.download
    assert torch.equal(by_url(x, x.flip(0)), net(x, x.flip(0)))
    state = torch.load(vgg, weights_only=True)
    bad = {'missing.pth': {k: v for k, v in state.items() if k != 'features.28.bias'},
           'shape.pth': {**state, 'features.0.weight': torch.zeros(64, 3, 5, 5)},
           'list.pth': list(state.values())}
    for name, content in bad.items():
        torch.save(content, tmp_path / name)
        with pytest.raises(ValueError, match="VGG16 state dict") as e:
            lpips_vgg.read_vgg16(tmp_path / name)
        assert '\n' not in str(e.value)
    torch.save(torch.load(w, weights_only=True)[:4], tmp_path / 'four.pt')
    with pytest.raises(ValueError, match="not piq's lpips_weights.pt: expected a list of five"):
        lpips_vgg.read_layer_weights(tmp_path / 'four.pt')
    torch.save({'w': NotATensor()}, tmp_path / 'code.pt')  # an object: never unpickled
    (tmp_path / 'noise.pt').write_bytes(bytes(range(256)) * 8)
    for name in ('code.pt', 'noise.pt'):
        with pytest.raises(ValueError, match='cannot be read as'):
            distill.load_lpips('cpu', str(vgg), str(tmp_path / name))
    # A file named like the official one must be the official one (its sha256).
    shutil.copy(w, tmp_path / 'vgg16-397923af.pth')
    with pytest.raises(ValueError, match='Checksum mismatch'):
        lpips_vgg.weight_files(str(tmp_path / 'vgg16-397923af.pth'), str(w))


def test_official_files_are_read_from_the_cache_without_a_download(files, tmp_path, monkeypatch):
    monkeypatch.setenv('SFD_CACHE', str(tmp_path))
    monkeypatch.setattr(data.urllib.request, 'urlopen', lambda *a, **k: pytest.fail('downloaded'))
    assert not lpips_vgg.in_cache()
    for src, dest in zip(files, lpips_vgg.cache_paths(), strict=True):
        shutil.copy(src, dest)
    assert lpips_vgg.in_cache()
    # The cached VGG16 copy is checked against the official sha256: here the random file's own.
    monkeypatch.setattr(lpips_vgg, 'VGG16_SHA256', hashlib.sha256(files[0].read_bytes()).hexdigest())
    assert lpips_vgg.weight_files() == lpips_vgg.cache_paths()


# ------------------------------------------------------------------------------------------------
# The loss, and a run through distill.py
# ------------------------------------------------------------------------------------------------

def test_l1_plus_lpips_loss_is_its_formula():
    """SFD's second-stage loss: per sample, the L1 sum plus C*H*W times LPIPS of the images
    upsampled to 224x224 (bilinear) and mapped from [-1, 1] to [0, 1]. A stand-in distance that
    records its inputs keeps this quick; the real network runs in the next test."""
    g = torch.Generator().manual_seed(3)
    x, t = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1, torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    seen = []

    def stand_in(a, b):
        seen.append((a, b))
        return (a - b).abs().amax(dim=(1, 2, 3)) + a.mean(dim=(1, 2, 3))  # any per-sample distance
    up = lambda v: (F.interpolate(v, size=(224, 224), mode='bilinear', align_corners=False) + 1) / 2
    expected = (x - t).abs().sum((1, 2, 3)) + 3 * 8 * 8 * stand_in(up(x), up(t))  # C*H*W = 3*8*8
    got = distill.per_sample_loss('l1+lpips', x, t, stand_in)
    assert got.shape == (2,)
    torch.testing.assert_close(got, expected)
    l1 = (x - t).abs().sum((1, 2, 3))
    torch.testing.assert_close(distill.per_sample_loss('lpips', x, t, stand_in), expected - l1)
    a, b = seen[1]
    assert a.shape == (2, 3, 224, 224) and 0 <= a.min() and a.max() <= 1  # what LPIPS expects
    torch.testing.assert_close((a, b), (up(x), up(t)))


def test_a_run_with_l1_lpips_uses_the_given_files(files, tmp_path, monkeypatch):
    """distill.py --loss l1+lpips with --lpips-vgg (a path) and --lpips-weights (a URL) on a tiny
    8x8 teacher: the files reach load_lpips, and the network is called by the iteration."""
    tiny_image_teacher(tmp_path / 'img.pt')
    seen, real = {}, distill.load_lpips

    def load(device, vgg, weights):
        seen['files'], net = (vgg, weights), real(device, vgg, weights)
        seen['calls'] = 0

        def counted(x, y):
            seen['calls'] += 1
            return type(net).forward(net, x, y)
        net.forward = counted
        return net
    monkeypatch.setattr(distill, 'load_lpips', load)
    run = tmp_path / 'run'
    distill.main(['--teacher', str(tmp_path / 'img.pt'), '--loss', 'l1+lpips', '--lpips-vgg', str(files[0]),
                  '--lpips-weights', files[1].as_uri(), '--nfe', '1', '--batch', '1', '--kimg', '0.001',
                  '--device', 'cpu', '--quiet', '--run-dir', str(run)])
    assert seen == {'files': (str(files[0]), files[1].as_uri()), 'calls': 1}  # N = 1 + AFS: one update
    config = json.loads((run / 'stats.jsonl').read_text().splitlines()[-1])
    assert config['kimg'] == pytest.approx(0.001) and (run / 'student.pt').is_file()
    assert models.load_meta(run / 'student.pt')['config']['lpips_vgg'] == str(files[0])


# ------------------------------------------------------------------------------------------------
# Settings and the offline error
# ------------------------------------------------------------------------------------------------

def test_image_second_stage_defaults_to_l1_lpips_and_its_flags_are_checked(tmp_path):
    second = distill.apply_defaults(distill.SFDConfig(teacher='toy:cifar10-16', method='second-stage'))
    assert second.loss == 'l1+lpips'  # the paper's (Sec. 4.2); never silently L1
    resolve = lambda **f: presets.resolve(distill.SFDConfig, f.get('method', 'sfd'), f, typed=set(f))
    with pytest.raises(ValueError, match='--lpips-vgg is not used by --loss l1'):
        resolve(teacher='toy:cifar10-16', lpips_vgg='vgg.pth')
    with pytest.raises(ValueError, match=r"--lpips-weights '.*nothing.pt': no such file"):
        resolve(teacher='toy:cifar10-16', loss='l1+lpips', lpips_weights=str(tmp_path / 'nothing.pt'))
    with pytest.raises(ValueError, match="--loss 'l1\\+lpips': LPIPS compares RGB images"):
        resolve(teacher='toy:ring', loss='l1+lpips')


def test_missing_weights_stop_the_run_before_the_teacher_with_one_line(tmp_path, monkeypatch, capsys):
    cache = tmp_path / 'cache'
    monkeypatch.setenv('SFD_CACHE', str(cache))

    def offline(*a, **k):
        raise urllib.error.URLError('no network here')
    monkeypatch.setattr(data.urllib.request, 'urlopen', offline)
    monkeypatch.setattr(models, 'load', lambda *a, **k: pytest.fail('the teacher was loaded'))
    tiny_image_teacher(tmp_path / 'img.pt')
    with pytest.raises(SystemExit) as e:
        cli.run(distill.main, ['--teacher', str(tmp_path / 'img.pt'), '--loss', 'l1+lpips', '--device', 'cpu',
                               '--run-dir', str(tmp_path / 'run')])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    for part in ('vgg16-397923af.pth (528 MB, https://download.pytorch.org/models/vgg16-397923af.pth)',
                 'lpips_weights.pt', lpips_vgg.WEIGHTS_URL, f'in {cache} ', 'no network here', '--lpips-vgg',
                 '--lpips-weights', '--loss l1'):
        assert part in err, part
    assert not (tmp_path / 'run').exists()
