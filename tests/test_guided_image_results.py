"""experiments/guided_image_results.py runs end to end on the quick image teacher and measures what it says.

No number of a real run is asserted (docs/results.md reports them): this keeps both modes of the
script from rotting, recomputes two of its numbers independently, and checks that students are reused.
"""
import json
import sys

import pytest
import torch
from conftest import ROOT, SHARED_DATA

import guided_pd
import guided_pd_run
import models
import toy

sys.path.insert(0, str(ROOT / 'experiments'))
import guided_image_results as gir  # noqa: E402

ZIP = SHARED_DATA / 'cifar10-jpeg-train.zip'
TINY = ['--n', '4', '--ref-steps', '6', '--eval-every', '1']


@pytest.mark.skipif(not ZIP.is_file(), reason=f'needs the in-house CIFAR-10 images in {SHARED_DATA}')
def test_guided_image_results_on_the_quick_teacher(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv('SFD_TOY_QUICK', '1')
    monkeypatch.setenv('SFD_CIFAR10', str(ZIP))
    out = ['--out', str(tmp_path)]
    # The search: one curve per candidate, a point per update after the untrained one.
    gir.main(['--search', '--candidates', 'official', 'w-lr-x10', '--search-updates', '2', *TINY, *out])
    found = json.loads((tmp_path / 'search.json').read_text())
    assert set(found) == {'official, 2 updates', 'w-lr-x10, 2 updates'}
    assert [r['updates'] for r in found['w-lr-x10, 2 updates']['rows']] == [0, 1, 2]
    assert found['official, 2 updates']['rows'][0]['w_sensitivity'] == 0  # zero-initialised: w-blind at first
    assert '| CFG teacher, 2 steps | 4 |' in (tmp_path / 'search.md').read_text()
    # The default mode: stage one, both stage-two chains from 4 steps, the Table 3 rows.
    argv = ['--stage1-updates', '2', '--start-n', '4', '--round-kimg', '0.064', '--final-round-kimg', '0.064',
            *TINY, *out]
    gir.main(argv)
    res = json.loads((tmp_path / 'results.json').read_text())
    rows = {r['sampler']: r['metric_a'] for r in res['table3']}
    assert {'student 1-step (D)', 'student 2-step (D)', 'student 2-step (S)', 'student 4-step (S)',
            'stage-one student, DDIM 4-step', 'DDIM with CFG 1x2-step', 'DDIM with CFG 2x2-step',
            'DDIM with CFG 4x2-step'} == set(rows)
    # DDIM with CFG, 1 step at w = 4, recomputed here: per-pixel RMSE to the guided fine solve.
    D_w, net, meta = guided_pd_run.load_guided_teacher('toy:cifar10-16:cond')
    z = toy.eval_noise(4, seed=777, shape=meta['shape'])
    labels = torch.eye(net.label_dim)[torch.arange(4)]
    ref = guided_pd.guided_reference(D_w, z, 4.0, steps=6, class_labels=labels)
    x = guided_pd.ddim(D_w, z, 1, 4.0, class_labels=labels)
    assert rows['DDIM with CFG 1x2-step']['4.0'] == pytest.approx(toy.rmse(x, ref), rel=1e-5)
    # The 1-step student at w = 2, from its file.
    student, m = models.load(res['students']['deterministic'][-1])
    assert m['N'] == 1 and not m['stochastic']
    ref2 = guided_pd.guided_reference(D_w, z, 2.0, steps=6, class_labels=labels)
    x = guided_pd.sample_student(student, m, z, 2.0, class_labels=labels)
    assert rows['student 1-step (D)']['2.0'] == pytest.approx(toy.rmse(x, ref2), rel=1e-5)
    assert 'stage-one student' in (tmp_path / 'results.md').read_text()
    # A second run trains nothing: every student is read back from its folder.
    for name in ('stage_one', 'stage_two'):
        monkeypatch.setattr(guided_pd, name, lambda *a, **k: pytest.fail('retrained a student'))
    # ... and, with --fid, adds Table 3's FIDs at one w (a stand-in network for Inception, as test_fid).
    import fid
    import sample
    from test_fid import FakeNet
    inception = FakeNet(pixels=3 * 16 * 16)
    monkeypatch.setattr(fid, 'load_inception', lambda *a, **k: inception)
    monkeypatch.setattr(fid, 'MIN_IMAGES', 16)  # 24 samples: the statistics' rank is not what is tested
    gir.main(argv + ['--fid', '24', '--fid-w', '2'])
    again = json.loads((tmp_path / 'results.json').read_text())
    assert again['table3'] == res['table3']
    fids = {r['sampler']: r['fid'] for r in again['fid']}
    assert {'real 16x16 images (another 24)', 'student 1-step (D)', 'student 4-step (S)',
            'DDIM with CFG 8x2-step'} <= set(fids)
    # One FID recomputed here: DDIM with CFG, 1 step, w = 2, from the script's noise and labels.
    z = toy.eval_noise(24, seed=4321, shape=meta['shape'])
    labels = torch.eye(net.label_dim)[torch.arange(24) % net.label_dim]
    x = guided_pd.ddim(D_w, z, 1, 2.0, class_labels=labels)
    stats = fid.compute_stats(sample.to_uint8(x), inception, batch_size=64, progress=False)
    ref = fid.load_stats(tmp_path / 'fid-ref-24.npz')
    assert fids['DDIM with CFG 1x2-step'] == pytest.approx(fid.fid_from_stats(stats, ref), rel=1e-6)
    assert 'FID of 24 16x16 samples, w = 2' in (tmp_path / 'results.md').read_text()
    gir.main(argv + ['--fid', '24', '--fid-w', '2', '--fid-rows', 'DDIM with CFG 1x2;student 1-step'])
    only = {r['sampler']: r['fid'] for r in json.loads((tmp_path / 'results.json').read_text())['fid']}
    assert only == {k: fids[k] for k in ('DDIM with CFG 1x2-step', 'student 1-step (D)')}
    assert 'thread(s)' in capsys.readouterr().out
