"""Tests for guided_pd.py: Meng et al.'s guidance distillation on a toy CFG teacher (CPU).

The teacher is models.load('toy:ring:cond'): an MLP trained jointly on 8 labelled Gaussians
with label dropout 0.1, so its null label is its own unconditional model. Metric A is the mean
distance of a sample to the guided teacher's own fine ODE solution from the same noise. The runs
below use seed 0; seeds 1 and 2 were run by hand with the same settings and pass every test; each
test's docstring gives the range measured over the three seeds next to what it asserts.
"""
import copy
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import guided_pd as gp
import guided_pd_run
import models
import presets
import solvers
import toy
import train
import unet
from conftest import ROOT, Counter

WS = (0.0, 1.0, 2.0, 4.0)
# Scaled-down runs: 600 updates of batch 128 (76.8 kimg) for stage one and per stage-two round,
# a stats row every 200 updates (25.6 kimg).
RUN = dict(teacher='toy:ring', uncond='', device='cpu', seed=0, lr=1e-3, batch=128, ema=0.99,
           kimg=76.8, round_kimg=76.8, final_round_kimg=76.8, tick_kimg=25.6)


def stage2(**kw):
    """Stage-two settings: the fields given, stage two's preset (SNR truncation) for the others."""
    return gp.apply_defaults(gp.GuidedConfig(**kw), 'stage2', explicit=kw)


@pytest.fixture(scope='session')
def teacher():
    """(D_w, the jointly trained conditional net): trained once per session (cached in SFD_CACHE)."""
    D_w, net, _ = guided_pd_run.load_guided_teacher('toy:ring')
    return D_w, net


@pytest.fixture(scope='session')
def stage1(teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp('guided')
    cfg = gp.GuidedConfig(**RUN, run_dir=str(root / 's1'))
    net, meta = gp.stage_one(cfg, progress=False, log=lambda *a: None)
    return net, meta, root / 's1' / 'student.pt'


@pytest.fixture(scope='session')
def deterministic(stage1):
    """Alg. 3 from the stage-one student: the 8-step DDIM teacher -> 4 -> 2 -> 1 step students."""
    cfg = stage2(**{**RUN, 'teacher': str(stage1[2]), 'start_n': 8},
                 run_dir=str(stage1[2].parent.parent / 'det'))
    assert cfg.weighting == 'snr_trunc' and cfg.ema == 0.99
    return gp.stage_two(cfg, progress=False, log=lambda *a: None)


@pytest.fixture(scope='session')
def evaluation():
    """Fixed unit noise, labels, and class-labelled data to compare with (n = 800, 100 per class)."""
    x_data, y = toy.toy_data('ring', 800, generator=torch.Generator().manual_seed(99))
    return toy.eval_noise(800), torch.eye(8)[y], y, x_data


# ------------------------------------------------------------------------------------------------
# The schedule and the EDM form of Meng's equations (float64, exact)
# ------------------------------------------------------------------------------------------------

def test_cosine_schedule_spans_the_edm_range_and_nests():
    grid = gp.cosine_grid(8)
    assert grid[0] == 80.0 and grid[-1] == 0 and len(grid) == 9
    assert (grid[:-1] > grid[1:]).all()
    assert gp.cosine_sigma(1e-12) == pytest.approx(0.002, rel=1e-6)  # sigma(0+) = sigma_min; sigma(0) = 0
    torch.testing.assert_close(gp.cosine_grid(16)[::2], grid, rtol=0, atol=0)
    # It is Meng's cosine schedule (alpha, sigma) = (cos phi, sin phi), phi = a t + b, read in EDM form:
    # sigma_EDM = sigma / alpha, and logsnr = log(alpha^2 / sigma^2) = -2 log sigma_EDM.
    t = torch.linspace(0.01, 1, 50, dtype=torch.float64)
    b = math.atan(0.002)
    phi = (math.atan(80.0) - b) * t + b
    torch.testing.assert_close(gp.cosine_sigma(t), phi.sin() / phi.cos())
    torch.testing.assert_close(-2 * gp.cosine_sigma(t).log(), (phi.cos() ** 2 / phi.sin() ** 2).log())


def vp(sigma):
    """Meng's (alpha, sigma_VP) for an EDM sigma: alpha = 1 / sqrt(1 + sigma^2), sigma_VP = alpha sigma."""
    alpha = 1 / (1 + sigma ** 2).sqrt()
    return alpha, alpha * sigma


def test_ddim_step_is_meng_eq_2_divided_by_alpha():
    g = torch.Generator().manual_seed(0)
    x, D = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    s_t, s_s = torch.rand(2, 5, dtype=torch.float64, generator=g) * torch.tensor([[5.0], [1.0]]) + 0.1
    (a_t, v_t), (a_s, v_s) = vp(s_t), vp(s_s)
    z_t = a_t[:, None] * x
    z_s = a_s[:, None] * D + v_s[:, None] * (z_t - a_t[:, None] * D) / v_t[:, None]   # Meng Eq. 2
    torch.testing.assert_close(gp.ddim_step(D, x, s_t, s_s), z_s / a_s[:, None])


def test_two_step_target_is_the_one_step_equivalent_of_two_teacher_steps():
    """Alg. 3's x~ on a closed-form Gaussian teacher, float64: (i) Meng's VP formula in EDM form,
    (ii) one student DDIM step with D = x~ lands exactly on the teacher's x'', (iii) it is the
    convex mixture of the teacher's two D's, (iv) the edge cases give the teacher's D."""
    D = solvers.gaussian_denoiser(0.3, 0.5)
    g = torch.Generator().manual_seed(1)
    N, i = 1024, torch.tensor([2.0, 17.0, 500.0, 1024.0], dtype=torch.float64)
    s, s1, s2 = (gp.cosine_sigma((i - k / 2) / N) for k in (0, 1, 2))
    x = 0.3 + s[:, None] * torch.randn(4, 2, generator=g, dtype=torch.float64)
    target = gp.two_step_target(D, x, s, s1, s2)
    D1 = D(x, s)
    x1 = gp.ddim_step(D1, x, s, s1)
    D2 = D(x1, s1)
    x2 = gp.ddim_step(D2, x1, s1, s2)
    (a, v), (a2, v2) = vp(s), vp(s2)
    z, z2 = a[:, None] * x, a2[:, None] * x2
    meng = (z2 - (v2 / v)[:, None] * z) / (a2 - (v2 / v) * a)[:, None]   # Alg. 3, "Teacher x_hat target"
    torch.testing.assert_close(target, meng, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gp.ddim_step(target, x, s, s2), x2, rtol=1e-12, atol=1e-12)
    mix = (((1 - s2 / s1)[:, None] * D2 + (s2 / s1 - s2 / s)[:, None] * D1) / (1 - s2 / s)[:, None])
    torch.testing.assert_close(target, mix, rtol=1e-9, atol=1e-9)
    # Alg. 3 at i = 1 (t'' = 0): the teacher's second D; Alg. 4 at i = 1 (t' = 0): its first D.
    one = torch.ones(1, dtype=torch.float64)
    s, s1 = gp.cosine_sigma(one / N), gp.cosine_sigma(0.5 * one / N)
    x = torch.randn(1, 2, dtype=torch.float64, generator=g)
    second_D = D(gp.ddim_step(D(x, s), x, s, s1), s1)
    torch.testing.assert_close(gp.two_step_target(D, x, s, s1, 0 * one), second_D)
    torch.testing.assert_close(gp.two_step_target(D, x, s, 0 * one, 0 * one), D(x, s))


def test_the_target_keeps_float32_teacher_precision():
    """x~ = (x'' - r x) / (1 - r) amplifies round-off by 1/(1 - r) ~ 330 near sigma = 1 at N = 1024.
    With a float32 teacher, our float64 combination stays at float32 precision; the same formula
    evaluated in float32 is ~1000x worse."""
    D = solvers.gaussian_denoiser(0.3, 0.5)
    D32 = lambda x, s, **_: D(x.float(), s.float()).float()  # a float32 teacher
    N, i = 1024, torch.full((256,), 512.0, dtype=torch.float64)
    s, s1, s2 = (gp.cosine_sigma((i - k / 2) / N) for k in (0, 1, 2))
    assert 1 - (s2 / s).max() < 0.004
    eps = torch.randn(256, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x = (0.3 + s[:, None] * eps).float()
    exact = gp.two_step_target(D, x.double(), s, s1, s2)
    resolution = torch.finfo(torch.float32).eps * exact.abs().max()
    assert (gp.two_step_target(D32, x, s, s1, s2).double() - exact).abs().max() < 5 * resolution
    x1 = gp.ddim_step(D32(x, s), x, s.float(), s1.float())
    x2 = gp.ddim_step(D32(x1, s1), x1, s1.float(), s2.float())
    r = (s2 / s).float()[:, None]
    assert ((x2 - r * x) / (1 - r) - exact).abs().max() > 100 * resolution


# ------------------------------------------------------------------------------------------------
# Teacher, student initialisation, weights
# ------------------------------------------------------------------------------------------------

def test_cfg_teacher_by_hand(teacher):
    D_w, net = teacher
    x, s = torch.randn(6, 2), torch.rand(6) + 0.1
    y = torch.eye(8)[torch.arange(6)]
    w = torch.tensor([0.0, 0.5, 1.0, 2.0, 3.0, 4.0])
    D_c, D_u = net(x, s, class_labels=y), net(x, s, class_labels=torch.zeros_like(y))
    expected = (1 + w[:, None]) * D_c - w[:, None] * D_u  # Meng Sec. 2, one w per sample
    torch.testing.assert_close(D_w(x, s, class_labels=y, guidance=w), expected)
    assert torch.equal(D_w(x, s, class_labels=y, guidance=0.0), D_c)  # w = 0: the conditional model
    # Two networks (CIFAR-10: EDM's cond net + its uncond net): the uncond branch is the second net.
    other = copy.deepcopy(net)
    torch.nn.init.zeros_(other.model.out.weight)
    D_u2 = other(x, s, class_labels=None)
    torch.testing.assert_close(gp.cfg_teacher(net, other)(x, s, class_labels=y, guidance=w),
                               (1 + w[:, None]) * D_c - w[:, None] * D_u2)


def test_student_starts_as_the_conditional_teacher_without_dropout(teacher, tmp_path):
    _, net = teacher
    student = gp.make_student(net)
    x, s, y = torch.randn(5, 2), torch.rand(5) + 0.1, torch.eye(8)[torch.arange(5)]
    assert torch.equal(student(x, s, class_labels=y, guidance=torch.rand(5) * 4), net(x, s, class_labels=y))
    # An EDM U-Net (dropout 0.13 in CIFAR-10's nets): the student's blocks drop nothing, also rebuilt.
    cond = unet.EDMPrecond(img_resolution=8, img_channels=3, label_dim=10, model_channels=16,
                           channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.13)
    student = gp.make_student(cond)
    xi, yi = torch.randn(2, 3, 8, 8), torch.eye(10)[:2]
    assert student.training
    assert torch.equal(student(xi, 1.0, yi, guidance=2.0), student(xi, 1.0, yi, guidance=2.0))
    assert torch.equal(student.eval()(xi, 1.0, yi, guidance=2.0), cond.eval()(xi, 1.0, yi))
    models.save_model(tmp_path / 's.pt', student)
    rebuilt = models.load_model(tmp_path / 's.pt')[0].train()
    assert all(m.dropout == 0 for m in rebuilt.modules() if isinstance(m, unet.UNetBlock))


def test_loss_weights_in_sigma_terms():
    sigma = torch.tensor([0.002, 0.1, 0.5, 1.0, 3.0, 80.0], dtype=torch.float64)
    sd = 0.5
    c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
    # EDM's lambda makes the loss a plain MSE on the network's raw output: lambda c_out^2 = 1.
    torch.testing.assert_close(gp.loss_weight('edm', sigma, sd) * c_out ** 2, torch.ones_like(sigma))
    torch.testing.assert_close(gp.loss_weight('snr', sigma, sd), sigma ** -2)
    torch.testing.assert_close(gp.loss_weight('snr_trunc', sigma, sd), (sigma ** -2).clamp(min=1))
    with pytest.raises(ValueError, match='unknown weighting'):
        gp.loss_weight('v', sigma, sd)


def test_stage_two_round_plan_and_errors():
    cfg = gp.GuidedConfig(start_n=1024)
    assert gp.rounds(cfg) == [512, 256, 128, 64, 32, 16, 8, 4, 2, 1]  # App. B.3: 1024 DDIM steps -> 1
    assert gp.rounds(gp.GuidedConfig(start_n=8, stochastic=True)) == [8, 4, 2]
    with pytest.raises(ValueError, match='power of two'):
        gp.rounds(gp.GuidedConfig(start_n=12))
    with pytest.raises(ValueError, match='cosine'):
        gp.sample_sigma('uniform', 4, None)


# ------------------------------------------------------------------------------------------------
# Stage one (Alg. 1/2)
# ------------------------------------------------------------------------------------------------

def weighted_error(net, D_w, w, n=4000, **cond_net_kwargs):
    """E lambda_edm(sigma) ||net - D_w||^2 over data, noise and t ~ U[0, 1] on the cosine schedule."""
    g = torch.Generator().manual_seed(123)
    x0, y = toy.toy_data('ring', n, g)
    Y = torch.eye(8)[y]
    s = gp.sample_sigma('cosine', n, g)
    x = x0 + s[:, None].float() * torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        target = D_w(x, s, class_labels=Y, guidance=w)
        err = (net(x, s, class_labels=Y, **cond_net_kwargs) - target).square().sum(1)
    return (gp.loss_weight('edm', s, 0.5).float() * err).mean().item()


def test_stage_defaults_come_from_the_presets():
    """Stage one: the paper's EDM weighting and EMA 0.9999; stage two: SNR truncation, no EMA
    (App. B.3); a toy teacher: its CPU recipe, EMA 0.99 in both stages; a flag given is kept."""
    one, two = (gp.apply_defaults(gp.GuidedConfig(), stage) for stage in guided_pd_run.STAGES)
    assert (one.weighting, one.ema, two.weighting, two.ema) == ('edm', 0.9999, 'snr_trunc', 0.0)
    toy1 = gp.apply_defaults(gp.GuidedConfig(teacher='toy:ring', lr=3e-4), 'stage1')
    assert (toy1.ema, toy1.batch, toy1.lr, toy1.kimg) == (0.99, 256, 3e-4, 768.0)
    assert train.iterations_for(toy1.kimg, toy1.batch) == 3000  # the old recipe's 3000 updates
    with pytest.raises(dataclasses.FrozenInstanceError):
        toy1.lr = 1.0  # resolved once, then frozen


def test_default_run_folders_are_numbered_and_keep_both_stage_two_chains_apart(teacher, tmp_path,
                                                                               monkeypatch):
    monkeypatch.chdir(tmp_path)
    quick = dict(device='cpu', batch=8, kimg=0.016, round_kimg=0.008, final_round_kimg=0.008)
    gp.stage_one(gp.GuidedConfig(teacher='toy:ring', **quick), progress=False, log=lambda *a: None)
    first = Path('runs/00000-guided-stage1-toy-ring')
    assert (first / 'student.pt').is_file()
    for stochastic in (False, True):
        gp.stage_two(stage2(teacher=str(first / 'student.pt'), start_n=2, stochastic=stochastic, **quick),
                     progress=False, log=lambda *a: None)
    assert sorted(p.name for p in Path('runs').iterdir())[1:] == [
        '00001-guided-stage2-00000-guided-stage1-toy-ring',
        '00002-guided-stage2-00000-guided-stage1-toy-ring-stochastic']
    with pytest.raises(ValueError, match='already holds a run'):  # an explicit folder of another run
        gp.stage_one(gp.GuidedConfig(teacher='toy:ring', run_dir=str(first), **quick), log=lambda *a: None)


def test_stage_one_student_learns_the_guided_denoiser(teacher, stage1):
    """The EDM-weighted error to D_w (t ~ U[0, 1]): the student's is 81-172x below the un-distilled
    conditional model's at w = 1, 2, 4 (seeds 0-2); asserted 20x. At w = 0 the conditional model
    is exact (no factor); the student's error there (0.06) is as small as at w = 1, 2 (0.03-0.07)."""
    D_w, net = teacher
    student, meta, path = stage1
    errors = {w: weighted_error(student, D_w, w, guidance=w) for w in WS}
    baseline = {w: weighted_error(net, D_w, w) for w in WS}
    assert baseline[0.0] == 0
    for w in WS[1:]:
        assert errors[w] * 20 < baseline[w], (w, errors[w], baseline[w])
    assert errors[0.0] * 20 < baseline[1.0]  # at w = 0 as small as elsewhere
    assert meta['guidance_range'] == [0.0, 4.0] and meta['kind'] == 'guided-stage1' and meta['uncond'] == ''
    rows = [json.loads(line) for line in open(path.parent / 'stats.jsonl')]
    assert [r['iteration'] for r in rows] == [200, 400, 600] and rows[-1]['loss'] < rows[0]['loss']


# ------------------------------------------------------------------------------------------------
# Stage two (Alg. 3, Alg. 4) and sampling
# ------------------------------------------------------------------------------------------------

def test_stage_two_students_beat_ddim_with_cfg_at_equal_nfe(teacher, deterministic, evaluation):
    """4-, 2- and 1-step students against DDIM-with-CFG at equal NFE (N/2 steps; a 1-step student
    against 1 CFG step, i.e. twice its NFE), metric A, same noise and labels, w in {0, 1, 2, 4}.
    Measured ratios (seeds 0-2): 1.5-2.1x at w = 0 (the class-conditional ring is nearly a point
    per class, so even one step is close), 11-24x at w = 1, 15-44x at w = 2, 6-33x at w = 4.
    Against DDIM-with-CFG at twice the NFE (N steps) the smallest ratios are 1.5x (w = 0) and 1.7x
    (w = 1, the 4-step student). Asserted: 1.3x for both."""
    D_w, _ = teacher
    z, Y, _, _ = evaluation
    assert [models.load_model(p)[1]['N'] for p in deterministic] == [4, 2, 1]
    for w in WS:
        ref = gp.guided_reference(D_w, z, w, steps=128, class_labels=Y)
        for path in deterministic:
            net, meta = models.load_model(path)
            N = meta['N']
            a = toy.fidelity(gp.sample_student(net, meta, z, w, class_labels=Y), ref)
            for k in {max(N // 2, 1), N}:  # CFG steps: equal NFE, and twice the NFE
                base = toy.fidelity(gp.ddim(D_w, z, k, w, class_labels=Y), ref)
                assert a * 1.3 < base, (w, N, k, a, base)


def test_student_file_round_trip_and_sampling(deterministic, evaluation):
    z, Y, _, _ = evaluation
    net, meta = models.load_model(deterministic[0])
    assert meta['sampling']['t_steps'] == gp.cosine_grid(4).tolist() and meta['stochastic'] is False
    assert meta['guidance_range'] == [0.0, 4.0] and net.use_guidance_condition
    counted = Counter(net)
    x = gp.sample_student(counted, meta, z[:50], 2.0, class_labels=Y[:50])
    assert counted.calls == 4  # 4 steps, one network call each (DDIM-with-CFG: two)
    torch.testing.assert_close(x, gp.ddim(net, z[:50], 4, 2.0, class_labels=Y[:50]))
    # Per-sample guidance strengths give each sample its own w.
    w = torch.tensor([0.0, 4.0]).repeat(25)
    x_w = gp.sample_student(net, meta, z[:50], w, class_labels=Y[:50])
    torch.testing.assert_close(x_w[1::2], gp.ddim(net, z[1:50:2], 4, 4.0, class_labels=Y[1:50:2]))


def test_toy_table_lists_students_and_each_baseline_once(deterministic):
    """The CLI's evaluation table: per w the teacher (its reference solve: 33 CFG evaluations, the
    step to 0 included), every student, and DDIM-with-CFG at each needed step count once."""
    rows = guided_pd_run.toy_table(deterministic, ws=(1.0,), n=160, ref_steps=32)
    labels = [r[10:34].strip() for r in rows[1:]]
    assert labels == ['teacher ODE (DPM++3M)', 'student euler N=4', 'student euler N=2', 'student euler N=1',
                      'DDIM-CFG 4 steps', 'DDIM-CFG 2 steps', 'DDIM-CFG 1 steps']
    nfe = [int(r[4:9]) for r in rows[1:]]
    assert nfe == [66, 4, 2, 1, 8, 4, 2]
    assert float(rows[1].split()[-3]) == 0  # the teacher against itself


def jump_denoiser(teacher, N):
    """The ideal Alg. 4 student on the N-step grid: at t = k/N it returns the x-target of its
    teacher's two steps of 1/N (one step, to 0, at t = 1/N). Sampled with the stochastic sampler
    it is the chain the stochastic student is trained to reproduce."""
    grid = gp.cosine_grid(N)

    def D(x, sigma, **cond):
        k = (grid[None, :] - sigma.double()[:, None]).abs().argmin(1)  # position on the grid
        at = lambda j: grid[(k + j).clamp(max=N)]
        return gp.two_step_target(teacher, x, at(0), at(1), at(2), **cond).clone()
    return D


def test_stochastic_stage_two_and_sampler(teacher, stage1, evaluation):
    """Alg. 4 from the stage-one student: a 4-step teacher grid -> 4 -> 2 stochastic students.

    Each student reproduces its teacher's stochastic chain (same noise, same sampler noise) far
    better than the teacher's own N-step stochastic chain does (measured 2.9-8.5x at w = 1, 2, 4,
    seeds 0-2; asserted 2x). How close that chain is to the ODE's distribution is the sampler's
    business: with 4 steps at w >= 1 it is far even with D_w itself (class-conditional SW2 to the
    ODE samples 0.21 at w = 1), the 2-step student is close (0.04-0.05). At w = 0 the raw chain
    is already close to the ideal one, so there is nothing to assert."""
    D_w, _ = teacher
    z, Y, _, _ = evaluation
    cfg = stage2(**{**RUN, 'teacher': str(stage1[2]), 'start_n': 4, 'stochastic': True},
                 run_dir=str(stage1[2].parent.parent / 'stochastic'))
    paths = gp.stage_two(cfg, progress=False, log=lambda *a: None)
    prev = stage1[0]
    for path in paths:
        net, meta = models.load_model(path)
        N = meta['N']
        assert meta['stochastic'] and meta['sampling']['solver'] == 'stochastic'
        assert meta['sampling']['t_steps'] == gp.cosine_grid(N).tolist()
        gen = lambda: torch.Generator().manual_seed(0)
        counted = Counter(net)
        x = gp.sample_student(counted, meta, z, 1.0, gen(), class_labels=Y)
        assert counted.calls == N and torch.isfinite(x).all()
        assert torch.equal(x, gp.stochastic(net, z, N, 1.0, gen(), class_labels=Y))  # reproducible
        for w in WS[1:]:
            ideal = gp.stochastic(jump_denoiser(prev, N), z, N, w, gen(), class_labels=Y)
            student = toy.fidelity(gp.stochastic(net, z, N, w, gen(), class_labels=Y), ideal)
            undistilled = toy.fidelity(gp.stochastic(prev, z, N, w, gen(), class_labels=Y), ideal)
            assert student * 2 < undistilled, (N, w, student, undistilled)
        prev = net


# ------------------------------------------------------------------------------------------------
# Command line, continuation and the image code path
# ------------------------------------------------------------------------------------------------

def test_cli_runs_both_stages_down_to_one_step(teacher, tmp_path):
    """Both stages through the command line, with the old flags (updates, hidden aliases that
    count at the toy batch of 256): 20 stage-one updates, 5 per round."""
    quick = ['--iters', '20', '--round-iters', '5', '--final-round-iters', '5', '--tick', '5', '--quiet']
    gp.main(['stage1', '--teacher', 'toy:ring', '--run-dir', str(tmp_path / 's1'), *quick])
    gp.main(['stage2', '--teacher', str(tmp_path / 's1' / 'student.pt'), '--start-n', '4',
             '--run-dir', str(tmp_path / 's2'), '--eval-n', '0', *quick])
    assert sorted(p.name for p in (tmp_path / 's2').glob('student*.pt')) == ['student-n1.pt', 'student-n2.pt']
    rows = [json.loads(line) for line in open(tmp_path / 's1' / 'stats.jsonl')]
    assert [r['iteration'] for r in rows] == [5, 10, 15, 20]  # 20 updates, not 20 x 256 / 1000 kimg
    rows = [json.loads(line) for line in open(tmp_path / 's2' / 'stats.jsonl')]
    assert [r['stage'] for r in rows] == ['stage2-n2', 'stage2-n1']
    assert rows[0]['lr'] == pytest.approx(1e-3 / 5)  # the toy's lr, annealed linearly to 0 in 5 updates
    # A stage-two file continues the chain: its step count becomes start_n.
    cfg = gp.GuidedConfig(**{**RUN, 'teacher': str(tmp_path / 's2' / 'student-n2.pt'), 'round_kimg': 0.256,
                             'final_round_kimg': 0.256}, run_dir=str(tmp_path / 's3'))
    paths = gp.stage_two(cfg, progress=False, log=lambda *a: None)
    assert [models.load_model(p)[1]['N'] for p in paths] == [1]
    with pytest.raises(ValueError, match='stage-one .or stage-two. student file'):
        gp.stage_two(gp.GuidedConfig(teacher='toy:ring', run_dir=str(tmp_path / 'x')), log=lambda *a: None)


def test_w_embedding_init_options_and_their_lr(tmp_path):
    """w_init 'zero' keeps the student equal to the teacher, 'random' (Meng's fresh layer) makes it
    depend on w at once; w_lr_scale gives the new embedding its own lr: Adam's first update moves
    each weight by about lr, the embedding's by about lr x w_lr_scale (train.py's 'lr_scale')."""
    kw = dict(img_resolution=8, img_channels=3, model_channels=16, channel_mult=[1, 2], num_blocks=1,
              attn_resolutions=[4], label_dim=10)
    torch.manual_seed(0)
    cond = unet.EDMPrecond(**kw).eval()
    with torch.no_grad():  # a fresh U-Net's zero-initialised layers would hide the embedding: as if trained
        for p in cond.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, y = torch.randn(2, 3, 8, 8), torch.eye(10)[:2]
    zero, rand = gp.make_student(cond).eval(), gp.make_student(cond, 'random').eval()
    assert torch.equal(zero(x, 1.0, y, guidance=4.0), cond(x, 1.0, y))
    assert not torch.allclose(rand(x, 1.0, y, guidance=4.0), rand(x, 1.0, y, guidance=0.0))
    with pytest.raises(ValueError, match='--w-init'):
        gp.make_student(cond, 'ones')
    with pytest.raises(ValueError, match='--w-lr-scale'):
        presets.validate_guided(gp.GuidedConfig(w_lr_scale=0.0))
    groups = gp.param_groups(zero, 10.0)
    assert groups[1]['lr_scale'] == 10.0
    assert {id(p) for p in groups[1]['params']} == {id(p) for p in zero.model.map_guidance.parameters()}
    models.save_model(tmp_path / 'cond.pt', cond)
    images, labels = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8), torch.arange(8) % 10
    cfg = gp.GuidedConfig(teacher=str(tmp_path / 'cond.pt'), uncond='', run_dir=str(tmp_path / 's1'),
                          device='cpu', batch=4, kimg=0.004, ema=0.0, grad_clip=0.0, lr=1e-3, w_lr_scale=10.0)
    net, _ = gp.stage_one(cfg, dataset=(images, labels), progress=False, log=lambda *a: None)
    # The embedding's last layer started at 0 (its first layer, random, gets no gradient through it).
    moved = {k: (v - zero.state_dict()[k]).abs().max().item() for k, v in net.state_dict().items()
             if 'map_guidance.layer0' not in k}
    new = [v for k, v in moved.items() if 'map_guidance' in k]
    old = [v for k, v in moved.items() if 'map_guidance' not in k]
    assert max(old) <= 1.001e-3 and max(new) == pytest.approx(1e-2, rel=1e-3)


def test_image_teacher_code_path(tmp_path):
    """A tiny class-conditional U-Net of ours with a separate unconditional net, on labelled
    uint8 images: both stages run end to end and write students that sample at any w."""
    kw = dict(img_resolution=8, img_channels=3, model_channels=16, channel_mult=[1, 2], num_blocks=1,
              attn_resolutions=[4], dropout=0.13)
    torch.manual_seed(0)
    models.save_model(tmp_path / 'cond.pt', unet.EDMPrecond(label_dim=10, **kw))
    models.save_model(tmp_path / 'uncond.pt', unet.EDMPrecond(**kw))
    images = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(32) % 10
    run = dict(device='cpu', batch=4, kimg=0.012, round_kimg=0.008, final_round_kimg=0.008, tick_kimg=0.008)
    cfg = gp.GuidedConfig(teacher=str(tmp_path / 'cond.pt'), uncond=str(tmp_path / 'uncond.pt'),
                          run_dir=str(tmp_path / 's1'), **run)
    net, meta = gp.stage_one(cfg, dataset=(images, labels), progress=False, log=lambda *a: None)
    assert meta['shape'] == [3, 8, 8] and meta['uncond'].endswith('uncond.pt')
    paths = gp.stage_two(gp.GuidedConfig(teacher=str(tmp_path / 's1' / 'student.pt'), start_n=4,
                                         run_dir=str(tmp_path / 's2'), **run), dataset=(images, labels),
                         progress=False, log=lambda *a: None)
    student, m = models.load_model(paths[-1])
    x = gp.sample_student(student, m, torch.randn(2, 3, 8, 8), 1.5, class_labels=torch.eye(10)[:2])
    assert x.shape == (2, 3, 8, 8) and torch.isfinite(x).all()
    cfg = gp.GuidedConfig(teacher=str(tmp_path / 'cond.pt'), uncond='', run_dir=str(tmp_path / 'y'), **run)
    with pytest.raises(ValueError, match='labels in'):
        gp.stage_one(cfg, dataset=(images, labels + 5), log=lambda *a: None)


def test_old_flags_are_hidden_aliases_that_keep_the_update_counts(capsys):
    """--iters N (updates) is kimg = N x batch / 1000 exactly, so the run makes N updates at any batch;
    -h shows the new names and says the old ones still work, without listing them as flags."""
    for batch in (1, 3, 4, 16, 32, 100, 128, 256, 512, 1000, 4096):
        for n in (1, 2, 3, 7, 20, 100, 200, 600, 1500, 2000, 3000, 50_000, 100_000, 123_457):
            kimg = guided_pd_run.kimg_of(n, batch)
            assert kimg * 1000 == n * batch and train.iterations_for(kimg, batch) == n, (n, batch, kimg)
    with pytest.raises(SystemExit):
        gp.main(['-h'])
    text = ' '.join(capsys.readouterr().out.split())
    assert '--t-min' in text and '--round-kimg' in text and 'old names --sigma-min / --sigma-max' in text
    assert '--iters N (updates)' in text
    assert '--sigma-min SIGMA_MIN' not in text and '--iters ITERS' not in text  # hidden


def test_guided_pd_copied_alone_computes_both_losses(tmp_path):
    """guided_pd.py next to solvers.py in an empty folder: one stage-one and one stage-two loss on
    a denoiser that is neither EDM's nor diffusers' (any D(x, sigma, class_labels, guidance))."""
    for name in ('guided_pd.py', 'solvers.py'):
        shutil.copy(ROOT / name, tmp_path / name)
    script = textwrap.dedent('''
        import torch, guided_pd
        class D(torch.nn.Module):                       # D(x, sigma) = a x / (1 + sigma^2) + b w + c y
            use_guidance_condition, sigma_data = True, 0.5
            def __init__(self):
                super().__init__()
                self.a, self.b, self.c = (torch.nn.Parameter(torch.tensor(v)) for v in (0.5, 0.0, 0.1))
            def forward(self, x, sigma, class_labels=None, guidance=None):
                s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1)
                g = torch.as_tensor(0.0 if guidance is None else guidance, dtype=x.dtype).reshape(-1, 1)
                return self.a * x / (1 + s ** 2) + self.b * g + self.c * class_labels[:, :2]
        cfg, gen = guided_pd.GuidedConfig(), torch.Generator().manual_seed(0)
        x0, y = torch.randn(8, 2, generator=gen), torch.eye(3)[torch.arange(8) % 3]
        teacher = guided_pd.guided_teacher(D().eval())
        student = guided_pd.make_student(D())
        one = guided_pd.stage_one_loss(student, teacher, x0, y, cfg, gen)
        one.backward()
        two = guided_pd.stage_two_loss(student, student, x0, y, 4, cfg, gen, 'snr_trunc')
        print('ok', one.item() > 0, student.b.grad.item() != 0, two.item() >= 0, guided_pd.rounds(cfg)[-1])
    ''')
    out = subprocess.run([sys.executable, '-c', script], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ['ok', 'True', 'True', 'True', '1']


TINY = dict(device='cpu', seed=3, lr=1e-3, batch=32, ema=0.99, kimg=0.192, round_kimg=0.096,
            final_round_kimg=0.096, tick_kimg=0.064, snapshot_kimg=0.032)  # 6 stage-one updates, 3 per round


def weights(path):
    return models.load_model(path)[0].state_dict()


def test_both_stages_resume_bit_for_bit(stage1, tmp_path):
    """train.py's resume: stage one stopped half-way and continued (its kimg may grow on resume),
    stage two stopped inside a round and at a round's end: every student file is bit-identical to
    an uninterrupted run's, and stats.jsonl never repeats an iteration."""
    quiet = dict(progress=False, log=lambda *a: None)
    one = dict(TINY, teacher='toy:ring', uncond='')
    gp.stage_one(gp.GuidedConfig(**one, run_dir=str(tmp_path / 'a1')), **quiet)
    gp.stage_one(gp.GuidedConfig(**dict(one, kimg=0.096), run_dir=str(tmp_path / 'b1')), **quiet)
    gp.stage_one(gp.GuidedConfig(kimg=0.192), resume=str(tmp_path / 'b1'), explicit={'kimg'}, **quiet)
    a, b = weights(tmp_path / 'a1' / 'student.pt'), weights(tmp_path / 'b1' / 'student.pt')
    assert all(torch.equal(a[k], b[k]) for k in a)
    two = dict(TINY, teacher=str(stage1[2]), start_n=8)  # rounds of 4, 2 and 1 steps, 3 updates each
    full = gp.stage_two(stage2(**two, run_dir=str(tmp_path / 'a2')), **quiet)
    assert [p.name for p in full] == ['student-n4.pt', 'student-n2.pt', 'student-n1.pt']
    for stop in (4, 6):  # inside the 2-step round; at its end
        run = tmp_path / f'b2-{stop}'
        gp.stage_two(stage2(**two, run_dir=str(run)), stop_at_iteration=stop, **quiet)
        assert not (run / 'student-n1.pt').exists()
        paths = gp.stage_two(gp.GuidedConfig(), resume=str(run), explicit=set(), **quiet)
        for p, q in zip(full, paths):
            a, b = weights(p), weights(q)
            assert all(torch.equal(a[k], b[k]) for k in a), (stop, q)
        its = [json.loads(line)['iteration'] for line in open(run / 'stats.jsonl')]
        assert its == sorted(set(its)) and its[-1] == 9
    with pytest.raises(ValueError, match='a stage2 run; continue it with python guided_pd.py stage2'):
        gp.stage_one(gp.GuidedConfig(), resume=str(run), explicit=set(), **quiet)
    with pytest.raises(ValueError, match='the run was made with --round-kimg 0.096'):
        gp.stage_two(gp.GuidedConfig(round_kimg=1.0), resume=str(run), explicit={'round_kimg'}, **quiet)


def test_accumulation_makes_the_same_updates(stage1, tmp_path):
    """--accumulate 2: each update sums two half-batches' gradients, the update of the whole batch
    (equal up to float summation order) in half the memory; both stages."""
    quiet = dict(progress=False, log=lambda *a: None)
    for R in (1, 2):
        one = dict(TINY, teacher='toy:ring', uncond='', accumulate=R)
        gp.stage_one(gp.GuidedConfig(**one, run_dir=str(tmp_path / f's1-{R}')), **quiet)
        gp.stage_two(stage2(**dict(TINY, teacher=str(stage1[2]), start_n=4, accumulate=R),
                            run_dir=str(tmp_path / f's2-{R}')), **quiet)
    for f in ('s1-{}/student.pt', 's2-{}/student-n2.pt', 's2-{}/student-n1.pt'):
        a, b = weights(tmp_path / f.format(1)), weights(tmp_path / f.format(2))
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=f'{f} {k}')


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_two_process_ddp_matches_one_process(stage1, tmp_path):
    """torchrun with 2 CPU processes (gloo): each takes half of the same global batch drawn from one
    generator, so both stages' students equal a 1-process run's up to float reduction order."""
    quiet = dict(progress=False, log=lambda *a: None)
    flags = ['--device', 'cpu', '--seed', '3', '--lr', '1e-3', '--batch', '32', '--ema', '0.99', '--quiet',
             '--kimg', '0.096', '--round-kimg', '0.064', '--final-round-kimg', '0.064']
    env = dict(os.environ, OMP_NUM_THREADS='1')
    for stage, extra in (('stage1', ['--teacher', 'toy:ring', '--uncond', '']),
                         ('stage2', ['--teacher', str(stage1[2]), '--start-n', '4', '--eval-n', '0'])):
        out = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2',
                              f'--master_port={free_port()}', str(ROOT / 'guided_pd.py'), stage, *extra,
                              *flags, '--run-dir', str(tmp_path / f'ddp-{stage}')], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
    one = dict(device='cpu', seed=3, lr=1e-3, batch=32, ema=0.99, kimg=0.096, round_kimg=0.064,
               final_round_kimg=0.064)
    gp.stage_one(gp.apply_defaults(gp.GuidedConfig(**one, teacher='toy:ring', uncond='', run_dir=str(
        tmp_path / 'one-stage1')), 'stage1', explicit=[*one, 'teacher', 'uncond', 'run_dir']), **quiet)
    gp.stage_two(stage2(**one, teacher=str(stage1[2]), start_n=4, run_dir=str(tmp_path / 'one-stage2')),
                 **quiet)
    for f in ('{}-stage1/student.pt', '{}-stage2/student-n2.pt', '{}-stage2/student-n1.pt'):
        a, b = weights(tmp_path / f.format('one')), weights(tmp_path / f.format('ddp'))
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=f'{f} {k}')
