"""Tests for solvers.py: schedules, exact ODE solutions, convergence orders, NFE counts, AFS."""
import math
import warnings

import numpy as np
import pytest
import torch

import models
import solvers
from solvers import gaussian_denoiser, gaussian_ode_solution, sample, time_schedule

F64 = torch.float64
MU, S, T_MAX = 0.3, 0.5, 80.


class CountingDenoiser:
    """Wraps a denoiser and counts its calls (one call = one NFE for the whole batch)."""

    def __init__(self, fn):
        self.fn, self.calls, self.ts = fn, 0, []

    def __call__(self, x, t, **cond):
        self.calls += 1
        self.ts.append(float(t[0]))
        return self.fn(x, t, **cond)


def gmm_denoiser(means, s):
    """Posterior mean E[x0 | x_t] of an equal-weight Gaussian mixture (a non-linear denoiser)."""
    def D(x, t, **_):
        t2 = t.reshape(-1, 1, 1) ** 2
        v = s ** 2 + t2
        logits = -((x[:, None, :] - means[None]) ** 2).sum(-1, keepdim=True) / (2 * v)
        return (logits.softmax(1) * (s ** 2 * x[:, None, :] + t2 * means[None]) / v).sum(1)
    return D


# ------------------------------------------------------------------------------------------------
# Schedules
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('kind, t_min, expected', [
    # Values of the official SFD code's get_schedule (N = 4 timestamps = 3 steps).
    ('polynomial', 0.002, [80, 9.7232013553, 0.46997905800, 0.002]),
    ('polynomial', 0.006, [80, 10.929297472, 0.66988565566, 0.006]),
    ('logsnr', 0.002, [80, 2.3392141906, 0.068399037867, 0.002]),
    ('logsnr', 0.006, [80, 3.3737306612, 0.14227573218, 0.006]),
    ('time_uniform', 0.002, [80, 0.6228, 0.06611, 0.002]),
])
def test_schedule_values(kind, t_min, expected):
    t = time_schedule(3, t_min, 80., kind)
    assert t.dtype == F64 and t.shape == (4,)
    np.testing.assert_allclose(t.numpy(), expected, rtol=1e-4 if kind == 'time_uniform' else 1e-9)


def test_polynomial_two_steps_and_rho_one():
    np.testing.assert_allclose(time_schedule(2, 0.006, 80.).numpy(), [80, 3.1071219079, 0.006], rtol=1e-9)
    # rho = 1 makes the polynomial schedule uniform in t, and time_uniform uniform in VP time.
    np.testing.assert_allclose(time_schedule(4, 1., 5., 'polynomial', rho=1.).numpy(), [5, 4, 3, 2, 1])


@pytest.mark.parametrize('kind', solvers.SCHEDULES)
@pytest.mark.parametrize('n', [1, 2, 3, 5, 7])
@pytest.mark.parametrize('K', [2, 3, 4])
def test_schedule_refinement_contains_coarse_grid(kind, n, K):
    """SFD's teacher grid (K*n steps) passes exactly through the student's grid (n steps)."""
    coarse, fine = time_schedule(n, 0.006, 80., kind), time_schedule(K * n, 0.006, 80., kind)
    assert torch.equal(fine[::K], coarse)
    assert (fine[1:] < fine[:-1]).all()


def test_schedule_errors():
    with pytest.raises(ValueError, match='unknown schedule'):
        time_schedule(4, kind='cosine')
    with pytest.raises(ValueError, match='n >= 1'):
        time_schedule(0)
    with pytest.raises(ValueError, match='t_min < t_max'):
        time_schedule(4, t_min=1., t_max=0.5)


# ------------------------------------------------------------------------------------------------
# Exact solutions and convergence orders
# ------------------------------------------------------------------------------------------------

def test_gaussian_reference_solves_the_ode():
    """The closed form is the PF-ODE solution: its derivative equals eps(x, t) of the denoiser."""
    x_T = T_MAX * torch.randn(8, 2, dtype=F64)
    D = gaussian_denoiser(MU, S)
    for t in (0.01, 0.7, 12.):
        x, dt = gaussian_ode_solution(x_T, T_MAX, t, MU, S), 1e-4 * t
        dxdt = (gaussian_ode_solution(x_T, T_MAX, t + dt, MU, S)
                - gaussian_ode_solution(x_T, T_MAX, t - dt, MU, S)) / (2 * dt)
        eps = (x - D(x, torch.full((8,), t, dtype=F64))) / t
        torch.testing.assert_close(dxdt, eps, rtol=1e-6, atol=1e-8)


# Expected global orders on the exact Gaussian solution (polynomial schedule, t_min = 0.05,
# n = 64..512 steps: there every pair of doublings already gives the same slope to +-0.05, i.e.
# the asymptotic regime; t_min = 0.05 keeps the final steps non-stiff so that 512 steps suffice;
# the full third-order DPM-Solver++ still measures 2.98 at n = 512..4096 and 2.94 up to 16384).
# The multistep warm-up (first-order first step) does not cap the orders: the ODE contracts
# an error made at t by sqrt((s^2 + t_min^2) / (s^2 + t^2)), ~1/160 for one made at t_max.
ORDERS = [
    ('euler', {}, 1),
    ('heun', {}, 2),
    ('dpm2', {}, 2),
    ('dpmpp2m', {}, 2),
    # iPNDM's equal-step Adams-Bashforth coefficients on this non-uniform schedule: measured 2.0
    # (not the 4 they have on equal steps).
    ('ipndm', {}, 2),
    # Published DPM-Solver++(3M) (= SFD's teacher): D2 carries half the D'' term, so it is
    # second order with or without lower-order-final steps.
    ('dpmpp3m', {}, 2),
    ('dpmpp3m', {'lower_order_final': False}, 2),
    # The full third-order update is third order without lower-order-final steps; with them the
    # final first-order step caps it at 2.
    ('dpmpp3m', {'full_third_order': True, 'lower_order_final': False}, 3),
    ('dpmpp3m', {'full_third_order': True}, 2),
]


def convergence_slope(solver, options, ns=(64, 128, 256, 512), t_min=0.05, kind='polynomial'):
    torch.manual_seed(0)
    x_T = T_MAX * torch.randn(64, 2, dtype=F64)
    exact = gaussian_ode_solution(x_T, T_MAX, t_min, MU, S)
    errs = [(sample(gaussian_denoiser(MU, S), x_T, time_schedule(n, t_min, T_MAX, kind), solver,
                    **options) - exact).pow(2).mean().sqrt().item() for n in ns]
    return -np.polyfit(np.log(ns), np.log(errs), 1)[0], errs


@pytest.mark.parametrize('solver, options, order', ORDERS)
def test_convergence_order_on_exact_gaussian(solver, options, order):
    slope, errs = convergence_slope(solver, options)
    assert abs(slope - order) < 0.15, f'{solver} {options}: slope {slope:.2f}, errors {errs}'


@pytest.fixture(scope='module')
def gmm_problem():
    """A non-linear posterior-mean denoiser, starting noise, and a very fine reference solve."""
    D = gmm_denoiser(torch.tensor([[1.0, -0.3], [-0.5, 0.6], [0.1, -0.9]], dtype=F64), 0.2)
    x_T = T_MAX * torch.randn(128, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    return D, x_T, sample(D, x_T, time_schedule(2048, 0.006, T_MAX), 'dpmpp3m', full_third_order=True)


@pytest.mark.parametrize('solver', list(solvers.SOLVERS))
def test_all_solvers_converge_on_gaussian_mixture(solver, gmm_problem):
    """Every solver approaches the fine reference as the number of steps grows."""
    D, x_T, ref = gmm_problem
    errs = [(sample(D, x_T, time_schedule(n, 0.006, T_MAX), solver) - ref).abs().max().item()
            for n in (16, 64, 256)]
    assert errs[2] < errs[0] / 8 and errs[2] < 2e-2, errs


# ------------------------------------------------------------------------------------------------
# Single updates, by hand
# ------------------------------------------------------------------------------------------------

def test_single_step_formulas():
    """One step of each solver against its update rule written out for a linear denoiser."""
    a = 0.7
    D = lambda x, t, **_: a * x  # eps(x, t) = (1 - a) x / t
    x = torch.tensor([[1.5, -2.0]], dtype=F64)
    t0, t1 = 3.0, 1.2
    eps = lambda x, t: (1 - a) * x / t
    h = t1 - t0
    ts = torch.tensor([t0, t1], dtype=F64)
    # Euler, SFD Eq. 6.
    torch.testing.assert_close(sample(D, x, ts, 'euler'), x + h * eps(x, t0))
    # Heun: trapezoid of the slopes at both ends of the Euler predictor.
    xp = x + h * eps(x, t0)
    torch.testing.assert_close(sample(D, x, ts, 'heun'), x + h * (eps(x, t0) + eps(xp, t1)) / 2)
    # DPM-Solver-2: the slope at the log-midpoint carries the step.
    tm = math.sqrt(t0 * t1)
    torch.testing.assert_close(sample(D, x, ts, 'dpm2'), x + h * eps(x + (tm - t0) * eps(x, t0), tm))
    # First-order DPM-Solver++ is DDIM: (t1/t0) x + (1 - t1/t0) D.
    torch.testing.assert_close(sample(D, x, ts, 'dpmpp3m'), t1 / t0 * x + (1 - t1 / t0) * a * x)
    torch.testing.assert_close(sample(D, x, ts, 'dpmpp2m'), sample(D, x, ts, 'euler'))


def test_multistep_histories_by_hand():
    """Two steps of iPNDM (AB2 after AB1) and DPM-Solver++(2M), written out."""
    a = 0.6
    D = lambda x, t, **_: a * x + 0.1 * t  # time-dependent, so differences matter
    x0 = torch.tensor([[1.0, 2.0]], dtype=F64)
    t = [4.0, 2.0, 0.5]
    ts = torch.tensor(t, dtype=F64)
    eps = lambda x, s: (x - (a * x + 0.1 * s)) / s
    # iPNDM: AB1 then x2 = x1 + h1 (3 eps1 - eps0) / 2.
    e0 = eps(x0, t[0])
    x1 = x0 + (t[1] - t[0]) * e0
    x2 = x1 + (t[2] - t[1]) * (3 * eps(x1, t[1]) - e0) / 2
    torch.testing.assert_close(sample(D, x0, ts, 'ipndm'), x2)
    # DPM-Solver++(2M) without lower-order final: DDIM, then the second-order correction.
    lam = lambda s: -math.log(s)
    D0 = a * x0 + 0.1 * t[0]
    x1 = t[1] / t[0] * x0 + (1 - t[1] / t[0]) * D0
    D1v = a * x1 + 0.1 * t[1]
    h, h0 = lam(t[2]) - lam(t[1]), lam(t[1]) - lam(t[0])
    phi_1 = t[2] / t[1] - 1
    x2 = t[2] / t[1] * x1 - phi_1 * D1v - 0.5 * phi_1 * (D1v - D0) * h / h0
    torch.testing.assert_close(sample(D, x0, ts, 'dpmpp2m', lower_order_final=False), x2)
    # With lower-order final (default) the last of 2 steps is first order: plain DDIM twice.
    torch.testing.assert_close(sample(D, x0, ts, 'dpmpp2m'), sample(D, x0, ts, 'euler'))


def test_dpmpp_order_rule_matches_sfd_teacher():
    order = lambda n, p=3, lof=True: [solvers.dpmpp_order(i, n, p, lof) for i in range(n)]
    assert order(3) == [1, 2, 1]
    assert order(4) == [1, 2, 2, 1]
    assert order(5) == [1, 2, 3, 2, 1]
    assert order(10) == [1, 2] + [3] * 6 + [2, 1]
    assert order(12) == [1, 2] + [3] * 8 + [2, 1]  # the K = 4 teacher of a 3-step student
    assert order(2) == [1, 2] and order(2, p=2) == [1, 1]  # the official quirk at n = 2
    assert order(5, lof=False) == [1, 2, 3, 3, 3]


# ------------------------------------------------------------------------------------------------
# NFE counts, AFS, schedules ending at zero
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('solver', list(solvers.SOLVERS))
@pytest.mark.parametrize('afs', [False, True])
@pytest.mark.parametrize('n', [1, 2, 3, 6])
@pytest.mark.parametrize('to_zero', [False, True])
def test_nfe_is_exact(solver, afs, n, to_zero):
    t_steps = time_schedule(n, 0.006, 80.)
    if to_zero:
        t_steps = solvers.append_zero(t_steps)[1:] if n > 1 else solvers.append_zero(t_steps[:1])
    steps = len(t_steps) - 1
    D = CountingDenoiser(gaussian_denoiser(MU, S))
    x = 80. * torch.randn(4, 2, dtype=F64)
    try:
        expected = solvers.nfe(solver, steps, afs, ends_at_zero=to_zero)
    except ValueError:  # AFS with one Euler-type step: nothing left for the network
        assert afs and solvers.nfe(solver, steps, False, ends_at_zero=to_zero) == 1
        with pytest.raises(ValueError, match='no network call'):
            sample(D, x, t_steps, solver, afs=afs)
        return
    out = sample(D, x, t_steps, solver, afs=afs)
    assert D.calls == expected
    assert torch.isfinite(out).all()
    if afs:
        assert D.ts[0] != float(t_steps[0])  # the first call is not at t_max: AFS replaced it


def test_edm_default_sampler_is_35_nfe():
    """EDM's default: 18 timestamps plus a final 0 = 17 Heun steps and one Euler step."""
    t_steps = solvers.append_zero(time_schedule(17, 0.002, 80.))
    assert len(t_steps) == 19
    D = CountingDenoiser(gaussian_denoiser(MU, S))
    out = sample(D, 80. * torch.randn(3, 2, dtype=F64), t_steps, 'heun')
    assert D.calls == 35 == solvers.nfe('heun', 18, ends_at_zero=True)
    assert solvers.steps_for_nfe('heun', 35, ends_at_zero=True) == 18
    assert torch.isfinite(out).all()


@pytest.mark.parametrize('solver', list(solvers.SOLVERS))
def test_step_to_zero_lands_on_denoised_output(solver):
    D = gaussian_denoiser(MU, S)
    x = torch.randn(5, 2, dtype=F64)
    traj = sample(D, x, torch.tensor([2.0, 0.7, 0.0], dtype=F64), solver, trajectory=True)
    torch.testing.assert_close(traj[-1], D(traj[1], torch.full((5,), 0.7, dtype=F64)))


def test_steps_for_nfe_and_errors():
    assert solvers.steps_for_nfe('euler', 5) == 5
    assert solvers.steps_for_nfe('euler', 2, afs=True) == 3
    assert solvers.steps_for_nfe('heun', 4) == 2
    assert solvers.steps_for_nfe('dpm2', 3, afs=True) == 2
    with pytest.raises(ValueError, match='cannot use exactly 5 NFE'):
        solvers.steps_for_nfe('heun', 5)
    with pytest.raises(ValueError, match='unknown solver'):
        solvers.nfe('rk45', 4)
    with pytest.raises(ValueError, match='unknown solver'):
        sample(gaussian_denoiser(MU, S), torch.zeros(1, 2), time_schedule(2), 'rk45')
    with pytest.raises(ValueError, match='max_order'):
        sample(gaussian_denoiser(MU, S), torch.zeros(1, 2), time_schedule(2), 'ipndm', max_order=5)
    with pytest.raises(ValueError, match='max_order applies to ipndm'):
        sample(gaussian_denoiser(MU, S), torch.zeros(1, 2), time_schedule(2), 'euler', max_order=2)
    with pytest.raises(ValueError, match='at least 2 timestamps'):
        sample(gaussian_denoiser(MU, S), torch.zeros(1, 2), torch.tensor([80.]), 'euler')
    with pytest.raises(ValueError, match='strictly decreasing'):
        sample(gaussian_denoiser(MU, S), torch.zeros(1, 2), torch.tensor([1., 2.]), 'euler')


def test_afs_first_step():
    """SFD Alg. 5, lines 2-3: the first step uses eps = x / sqrt(1 + t^2) and no network call."""
    x = 80. * torch.randn(6, 2, dtype=F64)
    t_steps = time_schedule(3, 0.006, 80.)
    D = CountingDenoiser(gaussian_denoiser(MU, S))
    traj = sample(D, x, t_steps, 'euler', afs=True, trajectory=True)
    t0, t1 = float(t_steps[0]), float(t_steps[1])
    torch.testing.assert_close(traj[1], x + (t1 - t0) * x / math.sqrt(1 + t0 ** 2))
    assert D.calls == 2
    # For multistep solvers the history starts from the matching denoised value x - t eps_AFS:
    # DPM-Solver++'s first (DDIM) step must then agree with Euler's AFS step.
    traj_pp = sample(gaussian_denoiser(MU, S), x, t_steps, 'dpmpp3m', afs=True, trajectory=True)
    torch.testing.assert_close(traj_pp[1], traj[1])
    # AFS is the optimal eps of N(0, I) data up to the factor t / sqrt(1 + t^2) = 1 - O(1/t^2).
    D01 = gaussian_denoiser(0.0, 1.0)
    exact_eps = (x - D01(x, torch.full((6,), t0, dtype=F64))) / t0
    torch.testing.assert_close(solvers.afs_eps(x, t0) * t0 / math.sqrt(1 + t0 ** 2), exact_eps)
    assert (solvers.afs_eps(x, t0) / exact_eps - 1).abs().max() < 1 / t0 ** 2


# ------------------------------------------------------------------------------------------------
# Shapes, dtypes, conditions
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('solver', list(solvers.SOLVERS))
def test_float32_matches_float64_and_image_shapes(solver):
    D = gaussian_denoiser(MU, S)
    x = 80. * torch.randn(3, 3, 4, 4, dtype=F64)
    t_steps = time_schedule(8, 0.006, 80.)
    out64 = sample(D, x, t_steps, solver)
    out32 = sample(D, x.float(), t_steps, solver)
    assert out32.dtype == torch.float32 and out32.shape == x.shape
    torch.testing.assert_close(out32.double(), out64, rtol=1e-4, atol=1e-4)
    assert sample(D, x, t_steps, solver, trajectory=True).shape == (9, 3, 3, 4, 4)


def test_conditions_reach_the_denoiser_and_t_is_a_batch_tensor():
    seen = []

    def D(x, t, class_labels=None, step=None):
        seen.append((t.shape, class_labels, step))
        return torch.zeros_like(x)
    sample(D, torch.ones(4, 2), time_schedule(2), 'dpmpp3m', class_labels='c', step=4)
    assert seen == [(torch.Size([4]), 'c', 4)] * 2
    x1 = solvers.euler_step(D, torch.ones(4, 2), 2.0, 1.0, class_labels='c', step=4)
    torch.testing.assert_close(x1, torch.full((4, 2), 0.5))  # x + (1 - 2) * x / 2


def test_euler_step_keeps_gradients():
    w = torch.tensor(0.5, requires_grad=True)
    x1 = solvers.euler_step(lambda x, t: w * x, torch.ones(2, 2), 2.0, 1.0)
    x1.sum().backward()
    assert w.grad is not None and w.grad.item() == pytest.approx(4 * 0.5)  # d/dw of sum(x + (x - w x)(-1/2))


# ------------------------------------------------------------------------------------------------
# Meng et al.'s stochastic sampler
# ------------------------------------------------------------------------------------------------

def test_stochastic_sampler_noise_levels_and_nfe():
    """With D = 0 the DDIM step scales by t_{k-2}/t_k and the re-noising restores variance t_{k-1}^2:
    every state k of the trajectory has standard deviation exactly t_k (Meng Eq. 4-7 in EDM form)."""
    t_steps = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.0], dtype=F64)
    D = CountingDenoiser(lambda x, t, **_: torch.zeros_like(x))
    g = torch.Generator().manual_seed(0)
    x = 8.0 * torch.randn(200_000, 1, dtype=F64, generator=g)
    traj = solvers.stochastic_sample(D, x, t_steps, generator=g, trajectory=True)
    assert D.calls == 5 and traj.shape == (6, 200_000, 1)
    std = traj[:-1].std(dim=(1, 2))
    torch.testing.assert_close(std, t_steps[:-1], rtol=1e-2, atol=0)
    assert (traj[-1] == 0).all()  # the last step returns the denoised output


def test_stochastic_sampler_is_reproducible_per_sample():
    D = gaussian_denoiser(MU, S)
    t_steps = time_schedule(4, 0.002, 80.)
    x = 80. * torch.randn(4, 2, dtype=F64)
    gens = lambda: [torch.Generator().manual_seed(s) for s in range(4)]
    full = solvers.stochastic_sample(D, x, t_steps, generator=gens())
    half = solvers.stochastic_sample(D, x[2:], t_steps, generator=gens()[2:])
    torch.testing.assert_close(full[2:], half)  # an image does not depend on its batch mates
    other = solvers.stochastic_sample(D, x, t_steps, generator=torch.Generator().manual_seed(7))
    assert not torch.allclose(other, full)


# ------------------------------------------------------------------------------------------------
# Stored sampling configurations and classifier-free guidance
# ------------------------------------------------------------------------------------------------

def test_sample_with_follows_a_stored_configuration():
    """SFD Alg. 8: Euler over the student's own schedule, with AFS and the step of the chosen NFE."""
    seen = []

    def D(x, t, step=None):
        seen.append((float(t[0]), step))
        return 0.5 * x
    cfg = dict(solver='euler', nfe=[2, 3], afs=True, schedule='polynomial', rho=7.0, t_min=0.006,
               t_max=80.0, step_values={'2': 4, '3': 5})
    z = torch.randn(3, 2, dtype=F64)
    out = solvers.sample_with(D, z, cfg, nfe=3)
    t = time_schedule(4, 0.006, 80.)
    assert [s for _, s in seen] == [5, 5, 5] and [ts for ts, _ in seen] == pytest.approx(t[1:4].tolist())
    torch.testing.assert_close(out, sample(D, 80. * z, t, 'euler', afs=True, step=5))
    with pytest.raises(ValueError, match='choose one'):
        solvers.sample_with(D, z, cfg)
    # EDM's default sampler as a stored configuration: Heun, 35 NFE, 18 timestamps plus 0.
    edm = dict(solver='heun', nfe=35, schedule='polynomial', rho=7.0, t_min=0.002, t_max=80.0, ends_at_zero=True)
    t_steps, n, cond = solvers.schedule_for(edm)
    assert n == 35 and len(t_steps) == 19 and t_steps[-1] == 0 and t_steps[-2] == 0.002


def test_recipe_defaults_round_trip_and_old_files():
    """The recipe is EDM's sampler by default; it survives to_dict -> torch.load(weights_only) ->
    from_dict; version-0 dicts (no version key) keep their meaning: afs and ends_at_zero off when
    absent, and a stage-two guided student's grid without rho samples (it raised KeyError 'rho')."""
    import io
    r = solvers.Recipe()
    t, n, cond = solvers.schedule_for(r)
    assert (r.solver, n, len(t), float(t[-1]), cond) == ('heun', 35, 19, 0.0, {})
    sfdv = solvers.Recipe('euler', [2, 3], afs=True, t_min=0.006, ends_at_zero=False, step_values={'2': 4, '3': 5})
    buf = io.BytesIO()
    torch.save(sfdv.to_dict(), buf)
    back = solvers.Recipe.from_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert back == sfdv and back.to_dict()['nfe'] == [2, 3]
    old = dict(solver='euler', nfe=2, schedule='polynomial', rho=7.0, t_min=0.006, t_max=80.0)
    t_old, _, _ = solvers.schedule_for(old)
    assert len(t_old) == 3 and float(t_old[-1]) == 0.006  # no trailing 0, no AFS: as the old reader
    grid = [80.0, 1.0, 0.0]
    guided_v0 = dict(solver='euler', nfe=2, afs=False, schedule='cosine', t_min=0.002, t_max=80.0,
                     ends_at_zero=True, t_steps=grid)
    t_g, _, _ = solvers.schedule_for(guided_v0)
    assert t_g.tolist() == grid
    with pytest.raises(ValueError, match='stored grid at NFE 2 only'):
        solvers.schedule_for(guided_v0, 4)
    z = torch.randn(4, 2, dtype=F64)
    torch.testing.assert_close(solvers.sample_with(lambda x, t: 0.5 * x, z, guided_v0),
                               sample(lambda x, t: 0.5 * x, 80 * z, torch.tensor(grid), 'euler'))
    with pytest.warns(UserWarning, match='NFE 4 was not trained'):
        assert solvers.schedule_for(sfdv, 4)[2] == {'step': 6}  # the number of timestamps, 4 + AFS + 1
    for bad, msg in ((dict(old, colour=1), 'unknown keys'), (dict(old, version=99), 'newer'), ({}, 'not a sampling')):
        with pytest.raises(ValueError, match=msg):
            solvers.Recipe.from_dict(bad)


@pytest.mark.parametrize('t_steps', [[80.0, math.inf, 1.0], [math.nan, 1.0], [80.0, 1.0, 2.0]])
def test_non_finite_or_unordered_schedules_are_refused(t_steps):
    with pytest.raises(ValueError, match='finite|decreasing'):
        sample(lambda x, t: x, torch.zeros(1, 2), torch.tensor(t_steps), 'euler')
    with pytest.raises(ValueError, match='t_max < inf'):
        time_schedule(3, t_max=math.inf)


def test_classifier_free_guidance_combination():
    """D_w = (1 + w) D(x, c) - w D(x, null); w = 0 is the conditional model (Meng Sec. 2)."""
    D = lambda x, t, class_labels=None: x + (0 if class_labels is None else class_labels.sum(1, keepdim=True))
    x, t = torch.zeros(2, 3), torch.ones(2)
    c = torch.tensor([[0., 1.], [1., 1.]])  # one-hot-like labels: D_c - D_null = label sum
    torch.testing.assert_close(solvers.guided(D, 0.0)(x, t, class_labels=c), D(x, t, c))
    torch.testing.assert_close(solvers.guided(D, 2.0)(x, t, class_labels=c), 3 * D(x, t, c) - 2 * x)
    w = torch.tensor([1.0, 3.0])  # one strength per sample
    torch.testing.assert_close(solvers.guided(D, w)(x, t, class_labels=c),
                               torch.tensor([[2.0] * 3, [8.0] * 3]))
    U = lambda x, t: x - 1.0  # a separate unconditional network (EDM's two CIFAR-10 models)
    torch.testing.assert_close(solvers.guided(D, 1.0, uncond=U)(x, t, class_labels=c),
                               2 * D(x, t, c) - (x - 1.0))


def test_an_explicit_step_overrides_without_a_warning():
    r = solvers.Recipe('euler', [2, 3], ends_at_zero=False, step_values={'2': 3, '3': 4})
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        solvers.sample_with(lambda x, t, step=None: seen.append(step) or x, torch.zeros(1, 2), r, nfe=5, step=9)
    assert set(seen) == {9}
