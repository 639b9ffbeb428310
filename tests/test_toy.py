"""Tests for toy.py: data sets, the MLP denoiser in EDM's preconditioning, metrics, teachers."""
import math

import pytest
import torch

import models
import solvers
import toy
import unet


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
