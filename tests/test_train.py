"""Tests for train.py (the one training loop) and for the paper files copying alone.

A tiny regression job exercises every mechanism of the loop: EMA, gradient clipping,
accumulation, the lr schedule, the finite check, stats rows, snapshots and bit-exact resume.
"""
import ast
import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import ROOT

import train


class Regression:
    """Fit y = 3 x with a 1-parameter model; R micro-batches per update; the loss of the mean."""

    def __init__(self, R=1, seed=0):
        torch.manual_seed(seed)
        self.student = torch.nn.Linear(1, 1, bias=False)
        self.optimizer = torch.optim.Adam(self.student.parameters(), lr=0.1)
        self.R, self.config, self.saved = R, {'R': R}, 0

    def iteration(self, loop):
        x = torch.randn(loop.s.batch, 1, generator=loop.gen)[slice(*loop.part)]
        parts = x.tensor_split(self.R)
        fns = [lambda p=p: ((loop.model(p) - 3 * p) ** 2).sum() / len(x) for p in parts]
        return [float(loop.update(fns))]

    def save(self, net, loop):
        self.saved += 1
        return None


def settings(**kw):
    return train.Settings(**{**dict(iterations=12, batch=8, lr=0.1, device='cpu', tick_kimg=0.032,
                                    snapshot_kimg=0.032, progress=False), **kw})


def test_accumulation_sums_to_the_update_of_one_batch():
    one, four = Regression(R=1), Regression(R=4)
    train.fit(one, settings())
    train.fit(four, settings())
    torch.testing.assert_close(one.student.weight, four.student.weight, rtol=0, atol=1e-6)


def test_ema_follows_its_formula_and_the_lr_schedule_is_set_before_each_iteration():
    job = Regression()
    seen = []
    lr = lambda it: seen.append(it) or 0.1 / (1 + it)
    start = job.student.weight.detach().clone()
    weights = []
    orig = job.iteration
    job.iteration = lambda loop: (orig(loop), weights.append(job.student.weight.detach().clone()))[0]
    loop = train.fit(job, settings(lr=lr, ema=0.5))
    assert seen == list(range(12)) and job.optimizer.param_groups[0]['lr'] == pytest.approx(0.1 / 12)
    ema = start
    for w in weights:
        ema = ema + 0.5 * (w - ema)
    torch.testing.assert_close(loop.ema.weight, ema)


def test_gradient_clipping_bounds_the_update():
    class SGDJob(Regression):
        def __init__(self):
            super().__init__()
            self.optimizer = torch.optim.SGD(self.student.parameters(), lr=1.0)
    job = SGDJob()
    w0 = job.student.weight.item()
    train.fit(job, settings(iterations=1, lr=1.0, grad_clip=1e-3))
    assert abs(job.student.weight.item() - w0) == pytest.approx(1e-3, rel=1e-4)


def test_non_finite_loss_stops_naming_the_iteration():
    job = Regression()
    with torch.no_grad():
        job.student.weight.fill_(float('nan'))
    with pytest.raises(FloatingPointError, match='iteration 0'):
        train.fit(job, settings())


def test_resume_is_bit_exact_and_stats_are_cut_back(tmp_path):
    full = Regression()
    train.fit(full, settings(ema=0.9), tmp_path / 'a')
    part = Regression()
    loop = train.fit(part, settings(ema=0.9), tmp_path / 'b', stop_at_iteration=5)
    assert loop.it == 5 and (tmp_path / 'b' / 'training-state.pt').is_file()
    again = Regression(seed=1)  # other initial weights: all of them come from the state
    loop = train.fit(again, settings(ema=0.9), tmp_path / 'b', state=train.read_state(tmp_path / 'b'))
    assert torch.equal(full.student.weight, again.student.weight)
    rows = [json.loads(line) for line in open(tmp_path / 'b' / 'stats.jsonl')]
    assert [r['iteration'] for r in rows] == [4, 5, 9, 12]  # a tick per 4 iterations, counted from the (re)start
    state = train.read_state(tmp_path / 'b')
    assert state['iteration'] == 12 and state['config'] == {'R': 1} and 'ema' in state


def test_unreadable_state_is_one_clear_error(tmp_path):
    (tmp_path / 'training-state.pt').write_bytes(b'not a state')
    with pytest.raises(ValueError, match='unreadable'):
        train.read_state(tmp_path)
    assert train.read_state(tmp_path / 'none') is None


# ------------------------------------------------------------------------------------------------
# Each paper file copies alone next to solvers.py
# ------------------------------------------------------------------------------------------------

def module_imports(path):
    """The project modules a file imports at module level (not inside functions)."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names |= {a.name.split('.')[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add((node.module or '').split('.')[0])
    return {n for n in names if (ROOT / f'{n}.py').exists()}


@pytest.mark.parametrize('paper', ['distill', 'guided_pd'])
def test_paper_files_import_only_solvers(paper):
    assert module_imports(ROOT / f'{paper}.py') == {'solvers'}


def test_distill_copied_alone_runs_an_sfd_iteration(tmp_path):
    for name in ('distill.py', 'solvers.py'):
        shutil.copy(ROOT / name, tmp_path / name)
    script = textwrap.dedent('''
        import torch, distill
        class D(torch.nn.Module):                       # any denoiser: D(x, t) = a x
            use_step_condition = False
            def __init__(self):
                super().__init__()
                self.a = torch.nn.Parameter(torch.tensor(0.5))
            def forward(self, x, t, **cond):
                t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1)  # a float or [B]
                return self.a * x / (1 + t ** 2) ** 0.5
        cfg = distill.SFDConfig(nfe=2, K=2)
        teacher, student = D().eval(), D()
        t = distill.student_schedule(cfg, cfg.nfe)
        t_teacher = distill.grid(cfg, cfg.K * (len(t) - 1))
        x_N = cfg.t_max * torch.randn(4, 3)
        targets = distill.teacher_targets(teacher, x_N, t_teacher, cfg.K, cfg.teacher_solver)
        opt = torch.optim.Adam(student.parameters(), lr=1e-2)
        losses = distill.sfd_iteration(student, opt, x_N, t, targets, cfg)
        assert len(losses) == 3 and student.a.item() != 0.5
        print('ok', distill.sampling_recipe(cfg, student).nfe)
    ''')
    out = subprocess.run([sys.executable, '-c', script], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ['ok', '2']
