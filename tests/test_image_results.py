"""experiments/image_results.py runs end to end on the quick image teacher and measures what it says.

No number of the real run is asserted (the README reports them); this keeps the script from
rotting, recomputes one of its metric A values independently, and checks that students are reused.
"""
import json
import sys

import pytest
import torch
from conftest import ROOT, SHARED_DATA

import distill
import models
import solvers
import toy

sys.path.insert(0, str(ROOT / 'experiments'))
import image_results  # noqa: E402

ZIP = SHARED_DATA / 'cifar10-jpeg-train.zip'


@pytest.mark.skipif(not ZIP.is_file(), reason=f'needs the in-house CIFAR-10 images in {SHARED_DATA}')
def test_image_results_on_the_quick_teacher(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv('SFD_TOY_QUICK', '1')
    monkeypatch.setenv('SFD_CIFAR10', str(ZIP))
    argv = ['--kimg', '0.008', '--batch', '4', '--n', '4', '--ref-steps', '8', '--guided-iters', '2',
            '--seeds', '0', '1', '--time-teacher-kimg', '0.008', '--out', str(tmp_path)]
    image_results.main(argv)
    rows = {(r['label'], r['nfe']): r for r in json.loads((tmp_path / 'results.json').read_text())}
    assert len(rows['SFD + AFS', 2]['metric_a']) == 2 and len(rows['SFD-v', 5]['metric_a']) == 1
    assert len(rows['vanilla (Alg. 3), DPM-2, t_min 0.002, L2', 2]['metric_a']) == 1  # first seed only
    assert {('second stage (L1)', 1), ('Euler', 5), ('Heun (EDM)', 35)} <= set(rows)
    assert sum(label.startswith('stage-one student') for label, _ in rows) == 4  # w = 0, 1, 2, 4
    # DPM-Solver++(3M) at 2 NFE, recomputed here: per-pixel RMSE to a fine solve from the same noise.
    teacher, meta = models.load('toy:cifar10-16')
    z = toy.eval_noise(4, seed=1234, shape=meta['shape'])
    ref = toy.reference_solution(teacher, z, t_min=0.006, steps=8)
    with torch.no_grad():
        x = solvers.sample_with(teacher, z, toy.solver_config('dpmpp3m', 2))
    assert rows['DPM-Solver++(3M)', 2]['metric_a'] == [pytest.approx(toy.rmse(x, ref), rel=1e-6)]
    out = capsys.readouterr().out
    assert 'targets: teacher <= 15 min' in out and '| SFD + AFS | 2 |' in out
    assert (tmp_path / 'results.md').read_text().count('\n') == len(rows) + 2
    # A second run trains nothing: every student is read back from its folder.
    monkeypatch.setattr(distill, 'distill', lambda *a, **k: pytest.fail('retrained a student'))
    image_results.main(argv + ['--time-teacher-kimg', '0'])
    again = json.loads((tmp_path / 'results.json').read_text())
    again = {(r['label'], r['nfe']): r['metric_a'] for r in again}
    assert again == {k: r['metric_a'] for k, r in rows.items()}
