"""Tests for toy.py: data sets, the MLP denoiser in EDM's preconditioning, metrics, teachers; the image
world toy:cifar10-16 (its data path on a fixture; its teacher, quick-sized, on the in-house zip)."""
import copy
import math

import pytest
import torch
from conftest import SHARED_DATA

import data
import models
import solvers
import toy


def test_datasets_and_labels():
    g = torch.Generator().manual_seed(0)
    x, y = toy.toy_data('ring', 4000, generator=g)
    assert x.shape == (4000, 2) and y.min() == 0 and y.max() == 7
    angle = 2 * math.pi * y / 8  # each point sits near the Gaussian its label names
    centre = torch.stack([angle.cos(), angle.sin()], 1)
    assert (x - centre).norm(dim=1).max() < 0.35
    x, y = toy.toy_data('checkerboard', 4000, generator=g)
    cell = ((x + 1) * 2).floor().long()  # column, row on the 4 x 4 board
    assert ((cell.sum(1) % 2) == 0).all() and x.abs().max() <= 1  # black squares only
    assert (cell[:, 1] == y // 2).all()
    x, y = toy.toy_data('moons', 4000, generator=g)
    assert set(y.tolist()) == {0, 1} and x[y == 0, 1].mean() > x[y == 1, 1].mean()
    with pytest.raises(ValueError, match='unknown toy data set'):
        toy.toy_data('spiral', 10)


def test_toy_net_speaks_the_protocol_and_conditions_start_as_no_ops():
    torch.manual_seed(0)
    net = toy.toy_net(label_dim=8).double()
    x, t = torch.randn(5, 2, dtype=torch.float64), torch.rand(5, dtype=torch.float64) * 10
    y = torch.nn.functional.one_hot(torch.arange(5), 8).double()
    D = net(x, t, class_labels=y)
    assert D.shape == (5, 2) and D.dtype == torch.float64
    net.enable_step_condition().enable_guidance_condition()
    assert torch.equal(net(x, t, class_labels=y, step=4, guidance=torch.full((5,), 2.0, dtype=torch.float64)), D)
    # One SGD step reaches the new layers and changes the output.
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net(x, t, class_labels=y, step=4, guidance=2.0).square().sum().backward()
    assert net.model.map_step.layer1.weight.grad.abs().sum() > 0
    assert net.model.map_guidance.layer1.weight.grad.abs().sum() > 0
    opt.step()
    assert not torch.allclose(net(x, t, class_labels=y, step=4, guidance=2.0), D)


def test_edm_preconditioning_limits():
    """At sigma -> 0 EDM's c_skip -> 1 and c_out -> 0: the denoiser is the identity."""
    net = toy.toy_net().double()
    x = torch.randn(4, 2, dtype=torch.float64)
    torch.testing.assert_close(net(x, torch.full((4,), 1e-8, dtype=torch.float64)), x, atol=1e-7, rtol=0)


def test_sliced_wasserstein_and_fidelity():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2000, 2, generator=g)
    assert toy.sliced_wasserstein(a, a) == 0
    shift = torch.tensor([0.3, -0.4])
    # Shifting every point by v moves each projection by v . theta: SW2^2 = E(v.theta)^2 = |v|^2 / 2
    # over uniform directions in 2-D (a Monte-Carlo estimate over 2048 directions).
    assert toy.sliced_wasserstein(a, a + shift, projections=2048) == pytest.approx(0.5 / math.sqrt(2), rel=0.03)
    assert toy.fidelity(a, a + shift) == pytest.approx(0.5)


@pytest.fixture(scope='session')
def ring_teacher():
    return models.load('toy:ring')


def test_toy_teacher_is_cached_and_learns_the_data(ring_teacher):
    teacher, meta = ring_teacher
    again, _ = models.load('toy:ring')  # read from the cache, not retrained
    for p, q in zip(teacher.parameters(), again.parameters()):
        assert torch.equal(p, q)
    assert not teacher.training and meta['toy'] == 'ring'
    z = toy.eval_noise(2000)
    ref = toy.reference_solution(teacher, z)
    data_ref = toy.toy_data('ring', 2000, generator=torch.Generator().manual_seed(99))[0]
    # The teacher's ODE samples lie on the ring's 8 Gaussians (radius 1, std 0.05), as the data do.
    r = ref.norm(dim=1)
    assert abs(r.mean() - 1) < 0.02 and 0.04 < r.std() < 0.06
    near = lambda x: ((lambda a: (a - a.round()).abs() < 0.1)(torch.atan2(x[:, 1], x[:, 0]) * 4 / math.pi))
    assert near(ref).float().mean() > near(data_ref).float().mean() - 0.03  # as close to a centre as data
    # Sliced W2 between two independent data sets of this size is ~0.05 (the 8 clusters' counts
    # fluctuate); an untrained network gives ~1.
    assert toy.sliced_wasserstein(ref, data_ref) < 0.1


def test_conditional_teacher_follows_labels():
    teacher, meta = models.load('toy:ring:cond')
    assert teacher.label_dim == 8 and meta['train']['label_dropout'] == 0.1
    z = toy.eval_noise(800)
    y = torch.arange(800) % 8
    onehot = torch.nn.functional.one_hot(y, 8).float()
    x = solvers.sample(teacher, 80 * z, solvers.time_schedule(32, 0.006, 80.), 'dpmpp3m', class_labels=onehot)
    angle = 2 * math.pi * y / 8
    centre = torch.stack([angle.cos(), angle.sin()], 1)
    assert ((x - centre).norm(dim=1) < 0.3).float().mean() > 0.9
    # Classifier-free guidance (w = 2) trades diversity for class fidelity: every sample stays in
    # its class's sector while the spread around the class's direction shrinks (0.054 -> 0.017 here).
    guided = solvers.sample(solvers.guided(teacher, 2.0), 80 * z, solvers.time_schedule(32, 0.006, 80.),
                            'dpmpp3m', class_labels=onehot)
    spread = lambda v: torch.remainder(torch.atan2(v[:, 1], v[:, 0]) - angle + math.pi, 2 * math.pi) - math.pi
    assert (spread(guided).abs() < math.pi / 8).all()
    assert spread(guided).std() < 0.6 * spread(x).std()


def test_toy_model_file_round_trip(tmp_path, ring_teacher):
    teacher, meta = ring_teacher
    models.save_model(tmp_path / 't.pt', teacher, **meta)
    net, meta2 = models.load_model(tmp_path / 't.pt')
    x = torch.randn(3, 2)
    assert torch.equal(net(x, 1.0), teacher(x, 1.0)) and meta2 == meta


def test_local_step_errors_eq_7(ring_teacher):
    """SFD Eq. 7: a denoiser that reproduces the trajectory exactly has zero local error; the
    teacher's own Euler steps against its fine DPM-Solver++ trajectory do not."""
    teacher, _ = ring_teacher
    z = toy.eval_noise(200)
    t_fine = solvers.time_schedule(12, 0.006, 80.)
    traj = solvers.sample(teacher, 80 * z, t_fine, 'dpmpp3m', trajectory=True)
    t_coarse, coarse = t_fine[::4], traj[::4]
    errs = toy.local_step_errors(teacher, coarse, t_coarse)
    assert len(errs) == 3 and all(e > 0 for e in errs)
    euler_traj = solvers.sample(teacher, 80 * z, t_coarse, 'euler', trajectory=True)
    assert max(toy.local_step_errors(teacher, euler_traj, t_coarse)) < 1e-5


# ---------------------------------------------------------------------------------------------
# Image worlds (toy:cifar10-16): the data path on a fixture, the teacher on the in-house zip
# ---------------------------------------------------------------------------------------------

def _write_zip(path, images, labels):
    """An EDM-style zip of lossless PNGs (uint8 [N, 3, H, W]) with dataset.json labels."""
    import io
    import json
    import zipfile

    from PIL import Image
    with zipfile.ZipFile(path, 'w') as z:
        names = [f'00000/img{i:08d}.png' for i in range(len(images))]
        for name, img in zip(names, images):
            buf = io.BytesIO()
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, format='PNG')
            z.writestr(name, buf.getvalue())
        z.writestr('dataset.json', json.dumps({'labels': [[n, int(y)] for n, y in zip(names, labels)]}))


def test_image_data_is_a_2x2_box_filter_of_the_zip(tmp_path):
    """Each 16x16 pixel is the rounded mean of its 2x2 block of the 32x32 image (exact on PNGs);
    an evenly spread subset keeps every class of a class-ordered zip; wrong sizes are refused."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (20, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.arange(20) // 2  # class order, as the in-house zips
    _write_zip(tmp_path / 'c.zip', images, labels)
    x, y = toy.image_data(str(tmp_path / 'c.zip'), 16)
    blocks = images.double().reshape(20, 3, 16, 2, 16, 2).mean((3, 5))
    assert x.dtype == torch.uint8 and x.shape == (20, 3, 16, 16) and torch.equal(y, labels)
    assert (x.double() - blocks).abs().max() <= 0.5
    _, y_sub = toy.image_data(str(tmp_path / 'c.zip'), 16, max_images=10)
    assert y_sub.unique().numel() == 10
    _write_zip(tmp_path / 'small.zip', images[:, :, :16, :16], labels)
    with pytest.raises(ValueError, match='SFD_CIFAR10=.*expected CIFAR-10 images'):
        toy.image_data(str(tmp_path / 'small.zip'), 16)


def test_image_edm_loss_matches_its_formula():
    """edm_loss on images: sigma ~ exp(N(-1.2, 1.2^2)), weight (s^2 + 0.25) / (0.5 s)^2, summed over
    pixels, averaged over the batch -- recomputed by hand from the same random stream (float64)."""
    torch.manual_seed(0)
    net = toy.image_net(8, model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[]).double()
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64) * 2 - 1
    loss = toy.edm_loss(net, x, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    sigma = (torch.randn(4, generator=g) * 1.2 - 1.2).exp().double()
    n = torch.randn(x.shape, generator=g).double() * sigma[:, None, None, None]
    w = (sigma ** 2 + 0.25) / (0.5 * sigma) ** 2
    D = [net(x[i:i + 1] + n[i:i + 1], sigma[i:i + 1]) for i in range(4)]  # one sample at a time
    per_sample = [w[i] * (D[i] - x[i:i + 1]).square().sum() for i in range(4)]
    expect = sum(per_sample) / 4
    torch.testing.assert_close(loss, expect, rtol=1e-12, atol=0)


def test_teacher_training_is_the_plain_loop_bit_for_bit(tmp_path):
    """train_toy and train_images run through train.py's loop; the cached teachers (keyed by their
    settings) and every number measured with them need the plain loop's exact weights: the same
    draws from one generator in the same order, Adam, the lr schedule, the EMA (written out here)."""
    def plain(net, draw, steps, lr_at, beta_at, seed, **adam):
        g = torch.Generator().manual_seed(seed)
        ema = copy.deepcopy(net).eval().requires_grad_(False)
        opt = torch.optim.Adam(net.parameters(), **adam)
        for i in range(steps):
            x, labels = draw(g)
            loss = toy.edm_loss(net, x, labels, generator=g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for group in opt.param_groups:
                group['lr'] = lr_at(i)
            opt.step()
            with torch.no_grad():
                for p_ema, p in zip(ema.parameters(), net.parameters()):
                    p_ema.lerp_(p, 1 - beta_at(i))
        return ema

    def same(a, b):
        return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))

    new = toy.train_toy('ring', label_dropout=0.1, steps=40, batch=64, lr=2e-3, seed=1, progress=False)
    after = torch.get_rng_state()
    torch.manual_seed(1)
    net = toy.toy_net(label_dim=8)
    toy.toy_net(label_dim=8)  # the plain loop built its EMA copy so

    def points(g):
        x, y = toy.toy_data('ring', 64, generator=g)
        keep = (torch.rand(64, generator=g) >= 0.1).float()
        return x, torch.nn.functional.one_hot(y, 8).float() * keep[:, None]
    old = plain(net, points, 40, lambda i: 2e-3 * min(1.0, (40 - i) / 12), lambda i: 0.995, 1, lr=2e-3)
    assert same(new, old) and torch.equal(after, torch.get_rng_state())
    # The image recipe: uint8 images with x-flips, a warm-up lr and a growing EMA decay.
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12, 3, 32, 32), generator=g, dtype=torch.uint8)
    _write_zip(tmp_path / 'c.zip', images, torch.arange(12) % 10)
    kw = dict(model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[])
    new = toy.train_images('cifar10-16', kimg=0.03, batch=4, lr=1e-3, lr_rampup_kimg=0.02, ema_max=0.9,
                           net=kw, source=str(tmp_path / 'c.zip'), seed=2, progress=False)
    x_all = toy.image_data(str(tmp_path / 'c.zip'), 16)[0]
    torch.manual_seed(2)

    def batch(g):
        x = data.to_float(x_all[torch.randint(12, (4,), generator=g)])
        flip = torch.rand(4, generator=g) < 0.5
        return torch.where(flip[:, None, None, None], x.flip(3), x), None
    old = plain(toy.image_net(16, **kw).train(), batch, 8, lambda i: 1e-3 * min(1.0, (i + 1) * 4 / 20),
                lambda i: min(0.9, (1 + i) / (10 + i)), 2, lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    assert same(new, old)


needs_data = pytest.mark.skipif(not (SHARED_DATA / 'cifar10-jpeg-train.zip').is_file(),
                                reason='the in-house CIFAR-10 zips (../shared/data) are absent')


@pytest.fixture(scope='module')
def quick_images():
    """$SFD_TOY_QUICK=1 and $SFD_CIFAR10 = the in-house train zip: toy:cifar10-16 is then a tiny net
    trained for 6 iterations on 1,000 real images, through the same code as the real teacher."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('SFD_TOY_QUICK', '1')
        mp.setenv('SFD_CIFAR10', str(SHARED_DATA / 'cifar10-jpeg-train.zip'))
        yield mp


@needs_data
def test_image_teacher_is_trained_once_cached_and_loads(quick_images, monkeypatch):
    net, meta = models.load('toy:cifar10-16')
    assert meta['kind'] == 'toy-teacher' and meta['shape'] == [3, 16, 16] and net.label_dim == 0
    assert meta['train'] == toy.teacher_settings('cifar10-16') and meta['train']['max_images'] == 1000
    monkeypatch.setattr(toy, 'train_teacher', lambda *a, **k: pytest.fail('retrained instead of cached'))
    again, _ = models.load('toy:cifar10-16')
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), again.parameters()))
    x, y = toy.toy_data('cifar10-16', 64, generator=torch.Generator().manual_seed(0))
    assert x.shape == (64, 3, 16, 16) and -1 <= x.min() < x.max() <= 1 and 0 <= y.min() and y.max() <= 9
    # The real teacher is a different file: its settings (and so its hash) differ from the quick ones.
    monkeypatch.delenv('SFD_TOY_QUICK')  # this test only: the fixture's quick setting stays for the others
    assert toy.teacher_settings('cifar10-16')['kimg'] > 10 * meta['train']['kimg']


@needs_data
def test_conditional_image_teacher_is_its_own_cfg_pair(quick_images):
    net, meta = models.load('toy:cifar10-16:cond')
    assert net.label_dim == 10 and meta['train']['label_dropout'] == 0.1
    z = torch.randn(2, 3, 16, 16)
    labels = torch.eye(10)[[3, 7]]
    # The null label (zero one-hot, as trained with dropout) is the unconditional branch D_u, so
    # guidance at w = 0 is the conditional model and w != 0 moves away from D_u.
    c, u = net(z, 1.0, class_labels=labels), net(z, 1.0)
    torch.testing.assert_close(solvers.guided(net, 0.0)(z, 1.0, class_labels=labels), c)
    torch.testing.assert_close(solvers.guided(net, 2.0)(z, 1.0, class_labels=labels), 3 * c - 2 * u)


@needs_data
def test_image_teacher_runs_through_every_cli(quick_images, tmp_path, capsys):
    """sample.py grids, distill.py (SFD + AFS and vanilla from real images), guided_pd.py stage
    one: a couple of iterations each on the quick teacher."""
    from PIL import Image

    import distill
    import guided_pd
    import sample
    sample.main(['--model', 'toy:cifar10-16', '--seeds', '0-7', '--nfe', '5', '--solver', 'dpmpp3m',
                 '--grid', str(tmp_path / 'g.png'), '--quiet'])
    assert Image.open(tmp_path / 'g.png').size == (3 * 16, 3 * 16)  # 8 images: a 3 x 3 grid
    for method in ('sfd', 'vanilla'):
        cfg = distill.SFDConfig(teacher='toy:cifar10-16', method=method, batch=4, kimg=0.008, lr=1e-4,
                                run_dir=str(tmp_path / method), device='cpu')
        student, summary = distill.distill(distill.apply_defaults(cfg, explicit={'batch', 'kimg', 'lr'}),
                                           progress=False, log=lambda s: None)
        assert summary['iterations'] == 2
    net, meta = models.load(str(tmp_path / 'sfd' / 'student.pt'))
    table = toy.before_after_table('cifar10-16', net, meta, models.load('toy:cifar10-16')[0], n=4)
    assert table.splitlines()[0].split()[-2:] == ['RMSE', '(A)'] and len(table.splitlines()) == 5
    cfg = guided_pd.GuidedConfig(teacher='toy:cifar10-16:cond', kimg=0.008, batch=4, tick_kimg=0.004,
                                 run_dir=str(tmp_path / 'g1'), device='cpu')
    guided_pd.stage_one(cfg, progress=False, log=lambda s: None)
    student, meta = models.load(str(tmp_path / 'g1' / 'student.pt'))
    assert student.use_guidance_condition and meta['data'] == 'toy:cifar10-16'
    assert meta['shape'] == [3, 16, 16]


def test_image_world_recipes_of_the_clis():
    """distill.py and guided_pd.py size runs on an image world for a CPU unless flags say otherwise."""
    import distill
    sfdv = distill.apply_defaults(distill.SFDConfig(teacher='toy:cifar10-16', method='sfd-v'))
    assert (sfdv.kimg, sfdv.lr, sfdv.batch) == (6.0, 2e-4, 32)
    second = distill.apply_defaults(distill.SFDConfig(teacher='toy:cifar10-16', method='second-stage'))
    assert (second.nfe, second.K, second.lr, second.kimg) == (1, 3, 2e-3, 3.0)
    assert second.loss == 'l1+lpips'  # the paper's (Sec. 4.2): the LPIPS weights are downloaded once
    ring = distill.apply_defaults(distill.SFDConfig(teacher='toy:ring', method='second-stage'))
    assert (ring.lr, ring.kimg, ring.loss) == (5e-4, 100.0, 'l1')  # 2-D points: no LPIPS
    mine = distill.apply_defaults(distill.SFDConfig(teacher='toy:cifar10-16', kimg=1.0), explicit={'kimg'})
    assert mine.kimg == 1.0 and mine.lr == 2e-4


@needs_data
def test_image_teacher_sfd_v_second_stage_and_guided_stage_two_clis(quick_images, tmp_path, capsys):
    """SFD-v -> the second stage (its 5-NFE teacher), guided stage one -> stage two, each through
    its command line on the quick teacher, with the before/after tables in per-pixel RMSE."""
    import distill
    import guided_pd
    import guided_pd_run
    common = ['--batch', '4', '--kimg', '0.008', '--device', 'cpu', '--quiet', '--eval-n', '0']
    v, s = tmp_path / 'v', tmp_path / 's'
    distill.main(['--teacher', 'toy:cifar10-16', '--method', 'sfd-v', '--run-dir', str(v)] + common)
    distill.main(['--teacher', str(v / 'student.pt'), '--method', 'second-stage', '--run-dir', str(s),
                  '--loss', 'l1'] + common)  # the default L1 + LPIPS needs real weights (test_lpips.py)
    one, meta = models.load(str(s / 'student.pt'))
    assert meta['sampling']['nfe'] == 1 and models.toy_world(str(s / 'student.pt')) == 'cifar10-16'
    # The tables the CLIs print (--eval-n), on 4 images and a coarse reference to stay quick.
    table = toy.before_after_table('cifar10-16', one, meta, models.load('toy:cifar10-16')[0],
                                   first_stage=models.load(str(v / 'student.pt')), n=4, ref_steps=8)
    assert table.splitlines()[0].endswith('RMSE (A)') and [r.split()[1] for r in table.splitlines()[2:]] == \
        ['student', 'DPM-Solver++(3M)', 'Euler', 'first']
    g = ['--batch', '4', '--device', 'cpu', '--quiet', '--tick-kimg', '0.004']
    guided_pd.main(['stage1', '--teacher', 'toy:cifar10-16:cond', '--kimg', '0.008', '--run-dir',
                    str(tmp_path / 'g1')] + g)
    guided_pd.main(['stage2', '--teacher', str(tmp_path / 'g1' / 'student.pt'), '--start-n', '4',
                    '--round-kimg', '0.004', '--final-round-kimg', '0.004', '--run-dir', str(tmp_path / 'g2'),
                    '--eval-n', '0'] + g)
    paths = sorted((tmp_path / 'g2').glob('student-n*.pt'))  # (and training-state.pt: the loop's resume)
    table = guided_pd_run.toy_table([str(q) for q in paths], n=4, ref_steps=8)
    # Per w (0, 1, 2, 4): the teacher's ODE, the students N = 2 and 1, DDIM-CFG at 2 and 1 steps.
    assert table[0].endswith('RMSE (A)') and len(table) == 1 + 4 * 5
    assert sum('teacher ODE' in r for r in table) == 4
    assert all(0 <= float(r.split()[-1]) < 2 for r in table[1:])  # per-pixel RMSE of [-1, 1] images


@needs_data
def test_real_images_for_an_fid_reference(quick_images, tmp_path):
    """`python toy.py cifar10-16 --real-npz PATH` writes the pooled training images in the layout
    fid.py reads, so `fid.py ref --data PATH` makes the 16x16 reference."""
    import fid
    n = toy.save_real_npz('cifar10-16', tmp_path / 'real.npz')
    s = toy.teacher_settings('cifar10-16')
    x = toy.image_data(s['source'], s['resolution'], s['max_images'])[0]
    assert n == len(x) == 1000 and torch.equal(fid.load_images_npz(tmp_path / 'real.npz'), x)
