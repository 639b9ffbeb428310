"""Tests for distill.py: the SFD family on a 2-D toy teacher (CPU), and the loop's mechanics.

Metric A is the mean distance of a sample to the teacher's own fine ODE solution from the same
noise (toy.fidelity). Seeds: the runs below use seed 0; seeds 1 and 2 were also run by hand
(numbers in the README's toy table) and keep the asserted orderings with similar margins.
"""
import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import model_cards
import models
import distill
import solvers
import toy
import unet
from conftest import ROOT, Counter


@pytest.fixture(scope='session')
def teacher():
    return models.load('toy:ring')[0]


@pytest.fixture(scope='session')
def evaluation(teacher):
    """Fixed noise, the teacher's fine ODE solution from it, and data to compare with."""
    z = toy.eval_noise(2000)
    return z, toy.reference_solution(teacher, z), toy.toy_data('ring', 2000, torch.Generator().manual_seed(99))[0]


def metric_a(net, sampling, evaluation, nfe=None, **cond):
    z, ref, data_ref = evaluation
    return toy.evaluate(net.eval(), sampling, ref, data_ref, z, nfe=nfe, **cond)[0]


def toy_cfg(tmp_path, **kw):
    """A run on the toy teacher with the CLI's defaults for it (TOY_DEFAULTS) unless given."""
    kw = {'teacher': 'toy:ring', **kw}
    cfg = distill.SFDConfig(run_dir=str(tmp_path / 'run'), device='cpu', **kw)
    return distill.apply_defaults(cfg, explicit=set(kw))


# ------------------------------------------------------------------------------------------------
# Mechanics of one iteration
# ------------------------------------------------------------------------------------------------

def test_losses_by_hand():
    x = torch.tensor([[3.0, -1.0], [0.0, 0.5]])
    t = torch.zeros(2, 2)
    torch.testing.assert_close(distill.per_sample_loss('l1', x, t), torch.tensor([4.0, 0.5]))
    torch.testing.assert_close(distill.per_sample_loss('l2', x, t), torch.tensor([10.0, 0.25]))
    c = 0.00054 * math.sqrt(2)
    torch.testing.assert_close(distill.per_sample_loss('pseudo_huber', x, t),
                               torch.tensor([math.sqrt(10 + c * c) - c, math.sqrt(0.25 + c * c) - c]))
    with pytest.raises(ValueError, match='unknown loss'):
        distill.per_sample_loss('l3', x, t)


@pytest.mark.parametrize('afs', [True, False])
def test_iteration_costs_K_N_teacher_and_N_minus_afs_student_calls(teacher, afs, tmp_path):
    cfg = toy_cfg(tmp_path, afs=afs, nfe=3)
    t_steps = distill.student_schedule(cfg, cfg.nfe)
    N = len(t_steps) - 1
    assert N == cfg.nfe + afs
    t_teacher = solvers.time_schedule(cfg.K * N, cfg.t_min, cfg.t_max)
    T, S = Counter(teacher), Counter(copy.deepcopy(teacher).requires_grad_(True))
    opt = torch.optim.Adam(S.parameters(), lr=1e-4)
    x_N = 80 * torch.randn(16, 2)
    targets = distill.teacher_targets(T, x_N, t_teacher, cfg.K, 'dpmpp3m')
    assert T.calls == cfg.K * N and targets.shape == (N, 16, 2)
    # The targets are the teacher's states at the student's timestamps (SFD Alg. 4, line 5).
    traj = solvers.sample(teacher, x_N, t_teacher, 'dpmpp3m', trajectory=True)
    torch.testing.assert_close(targets, traj[cfg.K::cfg.K])
    losses = distill.sfd_iteration(S, opt, x_N, t_steps, targets, cfg)
    assert S.calls == N - afs and len(losses) == N
    assert opt.state_dict()['state'][0]['step'] == N - afs  # one Adam update per student step


def test_student_steps_from_its_own_detached_output():
    """SFD Alg. 4, lines 4-7 by hand for a one-parameter student D = a x (no AFS, SGD, L1):
    step 2 starts from step 1's (detached) output and uses the once-updated a."""
    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Parameter(torch.tensor(0.3))

        def forward(self, x, t):
            return self.a * x
    S = Linear()
    opt = torch.optim.SGD(S.parameters(), lr=0.01)
    cfg = distill.SFDConfig(afs=False, loss='l1')
    x0 = torch.tensor([[2.0, -1.0], [0.5, 1.5]])
    t = torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64)
    targets = torch.zeros(2, 2, 2)
    distill.sfd_iteration(S, opt, x0, t, targets, cfg)
    # By hand: x1 = x0 + (t1 - t0)(1 - a) x0 / t0; dL/da = mean_b sum_i sign(x1) * (t1 - t0)(-x0) / t0.
    a, expected = 0.3, x0
    for t_cur, t_next in ((4.0, 2.0), (2.0, 1.0)):
        x1 = expected + (t_next - t_cur) * (1 - a) * expected / t_cur
        grad = (torch.sign(x1) * (t_next - t_cur) * (-expected) / t_cur).sum(1).mean()
        a, expected = a - 0.01 * grad.item(), x1
    assert S.a.item() == pytest.approx(a, abs=1e-7)


def test_non_finite_loss_stops_with_iteration_and_step(tmp_path):
    net = toy.toy_net()
    with torch.no_grad():
        net.model.out.bias.fill_(float('nan'))  # a teacher (and so a student) whose outputs are NaN
    models.save_model(tmp_path / 'nan.pt', net, sampling=dict(solver='euler', nfe=5, afs=True, schedule='polynomial',
                                                            rho=7.0, t_min=0.006, t_max=80.0, step_values=None),
                      shape=[2], teacher='toy:ring')
    cfg = toy_cfg(tmp_path, teacher=str(tmp_path / 'nan.pt'), kimg=0.5, batch=32)
    with pytest.raises(FloatingPointError, match='iteration 0, student step 1'):
        distill.distill(cfg, progress=False, log=lambda *_: None)


# ------------------------------------------------------------------------------------------------
# What SFD must show on the toy
# ------------------------------------------------------------------------------------------------

def test_sfd_with_afs_at_2_nfe(teacher, evaluation, tmp_path):
    """SFD + AFS (Alg. 5) at 2 NFE: metric A falls during training and ends far below
    DPM-Solver++(3M) at 2 NFE, and below DPM-Solver++(3M) at 5 NFE. Measured (this machine, the
    code before and after the lr-switch fix alike): 0.398 -> 0.076 at the first tick (20 kimg),
    then a plateau 0.076-0.079 where the order of ticks is noise, so only the fall is asserted."""
    cfg = toy_cfg(tmp_path, kimg=60, tick_kimg=20)
    curve = []
    student, summary = distill.distill(cfg, progress=False, log=lambda *_: None,
                                       on_tick=lambda row, net: curve.append(
                                           metric_a(net, distill.sampling_recipe(cfg, net), evaluation)))
    net, meta = models.load_model(tmp_path / 'run' / 'student.pt')
    s = meta['sampling']
    assert s['nfe'] == 2 and s['afs'] and s['solver'] == 'euler' and meta['method'] == 'sfd'
    start = metric_a(teacher, s, evaluation)  # the untrained student is the teacher
    final = metric_a(net, s, evaluation)
    dpm2, dpm5 = (metric_a(teacher, toy.solver_config('dpmpp3m', k), evaluation) for k in (2, 5))
    print(f'\nSFD+AFS 2 NFE: metric A {start:.3f} -> {curve} -> {final:.4f}; DPM++(3M) 2 NFE {dpm2:.3f}, 5 NFE {dpm5:.3f}')
    assert max(curve) < start / 4 and final == pytest.approx(curve[-1])
    assert final < dpm2 / 5 and final < dpm5
    # An iteration costs K*N = 12 teacher calls and N - AFS = 2 student calls.
    its = summary['iterations']
    assert summary['teacher_nfe'] == 12 * its and summary['student_calls'] == 2 * its
    rows = [json.loads(line) for line in open(tmp_path / 'run' / 'stats.jsonl')]
    assert len(rows) == 3 and len(rows[0]['loss_per_step']) == 3 and rows[-1]['lr'] == cfg.lr / 10


@pytest.fixture(scope='module')
def sfd_v(tmp_path_factory):
    """One SFD-v model (Alg. 6) for NFE 2..5, used by two tests."""
    d = tmp_path_factory.mktemp('sfdv')
    cfg = toy_cfg(d, method='sfd-v', kimg=160)
    distill.distill(cfg, progress=False, log=lambda *_: None)
    return d / 'run' / 'student.pt'


def test_sfd_v_beats_dpm_solver_at_every_nfe(teacher, evaluation, sfd_v):
    net, meta = models.load_model(sfd_v)
    s = meta['sampling']
    assert net.use_step_condition and s['nfe'] == [2, 3, 4, 5]
    assert s['step_values'] == {'2': 4, '3': 5, '4': 6, '5': 7}  # the official "number of timestamps"
    for k in (2, 3, 4, 5):
        a = metric_a(net, s, evaluation, nfe=k)
        dpm = metric_a(teacher, toy.solver_config('dpmpp3m', k), evaluation)
        print(f'SFD-v NFE {k}: metric A {a:.4f} vs DPM++(3M) {dpm:.4f}')
        assert a < dpm / 2


def test_second_stage_one_nfe_beats_first_stage(evaluation, sfd_v, tmp_path):
    """Alg. 7: a 1-NFE student whose teacher is the SFD-v model at 2K - 1 = 5 NFE (K = 3)."""
    cfg = toy_cfg(tmp_path, teacher=str(sfd_v), method='second-stage', kimg=40)
    assert cfg.K == 3 and cfg.nfe == 1 and cfg.lr == 5e-4
    distill.distill(cfg, progress=False, log=lambda *_: None)
    net, meta = models.load_model(tmp_path / 'run' / 'student.pt')
    first, first_meta = models.load_model(sfd_v)
    one = metric_a(net, meta['sampling'], evaluation)
    # The first-stage model at 1 NFE (an NFE it was not trained at): step value 1 + AFS + 1.
    first_one = metric_a(first, first_meta['sampling'], evaluation, nfe=1, step=3)
    print(f'second stage 1 NFE: metric A {one:.4f} vs first stage at 1 NFE {first_one:.4f}')
    assert meta['sampling']['nfe'] == 1 and meta['sampling']['step_values'] == {'1': 3}
    assert one < first_one / 2


def test_second_stage_refuses_an_untrained_teacher_nfe(sfd_v, tmp_path):
    cfg = toy_cfg(tmp_path, teacher=str(sfd_v), method='second-stage', K=4)  # would need 7 NFE
    with pytest.raises(ValueError, match='must sample at 7 NFE'):
        distill.distill(cfg, progress=False, log=lambda *_: None)


def test_vanilla_baseline_trains(teacher, evaluation, tmp_path):
    """Alg. 3 with a DPM-Solver-2 teacher over K = 4 sub-steps: it improves on its starting
    point. Compared with SFD at equal teacher calls in the README (not asserted: in 2-D the
    local method does as well or better)."""
    cfg = toy_cfg(tmp_path, method='vanilla', kimg=40)
    assert cfg.teacher_solver == 'dpm2'
    student, summary = distill.distill(cfg, progress=False, log=lambda *_: None)
    s = distill.sampling_recipe(cfg, student)
    before, after = metric_a(teacher, s, evaluation), metric_a(student, s, evaluation)
    print(f'vanilla 2 NFE: metric A {before:.3f} -> {after:.4f}, teacher NFE per sample {summary["teacher_nfe"]}')
    assert after < before / 4


# ------------------------------------------------------------------------------------------------
# Resume, data parallelism, command line
# ------------------------------------------------------------------------------------------------

def test_resume_ends_where_an_uninterrupted_run_does(tmp_path):
    kw = dict(kimg=0.64, batch=64, snapshot_kimg=0.128, method='sfd-v')
    full, _ = distill.distill(toy_cfg(tmp_path / 'a', **kw), progress=False, log=lambda *_: None)
    cfg = toy_cfg(tmp_path / 'b', **kw)
    distill.distill(cfg, stop_at_iteration=4, progress=False, log=lambda *_: None)
    state = torch.load(tmp_path / 'b' / 'run' / 'training-state.pt', weights_only=True)
    assert state['iteration'] == 4
    resumed, _ = distill.distill(cfg, resume=cfg.run_dir, progress=False, log=lambda *_: None)
    for (k, p), q in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=k)
    lines = open(tmp_path / 'b' / 'run' / 'stats.jsonl').read().splitlines()
    assert json.loads(lines[-1])['iteration'] == 10


def test_two_process_ddp_matches_one_process(tmp_path):
    """torchrun with 2 CPU processes (gloo): each takes half of the same global batch, so the
    weights equal a 1-process run's up to float reduction order."""
    models.load('toy:ring')  # make sure the cached teacher exists before the workers start
    args = ['--teacher', 'toy:ring', '--kimg', '0.256', '--batch', '64', '--quiet', '--device', 'cpu']
    env = dict(os.environ, OMP_NUM_THREADS='1')
    subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_port=29517',
                    str(ROOT / 'distill.py'), *args, '--run-dir', str(tmp_path / 'ddp')],
                   check=True, env=env, cwd=tmp_path, capture_output=True)
    one, _ = distill.distill(toy_cfg(tmp_path, kimg=0.256, batch=64), progress=False, log=lambda *_: None)
    two, meta = models.load_model(tmp_path / 'ddp' / 'student.pt')
    assert meta['kimg'] == pytest.approx(0.256)
    for (k, p), q in zip(one.state_dict().items(), two.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-5, msg=k)


def test_cli_prints_the_before_after_table(tmp_path, capsys):
    distill.main(['--teacher', 'toy:ring', '--kimg', '1', '--quiet', '--run-dir', str(tmp_path / 'cli')])
    out = capsys.readouterr().out
    assert 'DPM-Solver++(3M)' in out and 'student' in out and (tmp_path / 'cli' / 'student.pt').exists()
    (a,) = model_cards.read_card(tmp_path / 'cli')['metrics']  # the table's metric A is in the run's card
    assert a['type'] == 'metric-a' and a['nfe'] == 2 and f'{a["value"]:.4f}' in out


def test_image_teacher_code_path(tmp_path):
    """The CIFAR-10 code path at toy scale: a tiny random class-conditional U-Net teacher file,
    SFD (random labels, Sec. 3.4) and vanilla (images from an EDM-style zip) run end to end."""
    import zipfile

    import numpy as np
    from PIL import Image
    torch.manual_seed(0)
    net = unet.EDMPrecond(img_resolution=8, img_channels=3, label_dim=4, model_channels=16,
                          channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])
    models.save_model(tmp_path / 'teacher.pt', net)
    with zipfile.ZipFile(tmp_path / 'images.zip', 'w') as z:
        labels = []
        for i in range(8):
            buf = __import__('io').BytesIO()
            Image.fromarray(np.full((8, 8, 3), 30 * i, dtype=np.uint8)).save(buf, format='PNG')
            z.writestr(f'img{i}.png', buf.getvalue())
            labels.append([f'img{i}.png', i % 4])
        z.writestr('dataset.json', json.dumps({'labels': labels}))
    for method in ('sfd', 'vanilla'):
        cfg = distill.SFDConfig(teacher=str(tmp_path / 'teacher.pt'), method=method, batch=4, kimg=0.008,
                                data=str(tmp_path / 'images.zip'), run_dir=str(tmp_path / method), device='cpu')
        cfg = distill.apply_defaults(cfg)
        student, summary = distill.distill(cfg, progress=False, log=lambda *_: None)
        assert summary['iterations'] == 2
        saved, meta = models.load_model(tmp_path / method / 'student.pt')
        assert meta['shape'] == [3, 8, 8] and saved.label_dim == 4
        x = solvers.sample_with(saved, torch.randn(2, 3, 8, 8), meta['sampling'],
                                class_labels=torch.eye(4)[:2])
        assert x.shape == (2, 3, 8, 8) and torch.isfinite(x).all()
