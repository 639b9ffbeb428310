"""benchmarks/bench.py runs end to end at toy sizes and counts what it claims to count;
benchmarks/before_after.py times an old tree and this one and prints a table that parses.

No timing is asserted (speed is reported by the benchmarks, never tested); this only keeps the
scripts from rotting and checks bench.py's NFE accounting against the SFD configuration.
"""
import json
import re
import shutil
import subprocess
import sys

import pytest

import distill
import solvers
from conftest import ROOT

sys.path.insert(0, str(ROOT / 'benchmarks'))
import before_after  # noqa: E402
import bench  # noqa: E402


def test_benchmark_runs_at_tiny_sizes_and_counts_calls(tmp_path, capsys):
    rows = bench.main(['--device', 'cpu', '--channels', '8', '--batches', '2', '--small-batch', '2',
                       '--repeat', '1', '--json', str(tmp_path / 'b.json')])
    assert json.loads((tmp_path / 'b.json').read_text()) == json.loads(json.dumps(rows))
    kinds = [r['bench'] for r in rows]
    assert kinds.count('unet') == 2 and kinds.count('sampling') == len(solvers.SOLVERS)
    sfd = next(r for r in rows if r['bench'] == 'sfd_iteration')
    cfg = distill.SFDConfig()
    # SFD Alg. 4/5: the teacher solves the student grid refined K times without AFS (one call per
    # multistep step); the student is called once per step after its analytical first step.
    N = len(distill.student_schedule(cfg, cfg.nfe)) - 1
    assert sfd['student_calls'] == cfg.nfe
    assert sfd['teacher_calls'] == solvers.nfe(cfg.teacher_solver, cfg.K * N, afs=False, ends_at_zero=False)
    unet_row = next(r for r in rows if r['bench'] == 'unet')
    assert unet_row['gflop_per_img'] > 0 and unet_row['fwd_img_s'] > 0
    out = capsys.readouterr().out
    assert 'sfd_iteration' in out and 'fid_features' in out


def has_rev(rev):
    """Whether git is here and knows `rev` (a shallow clone may not)."""
    if shutil.which('git') is None or shutil.which('tar') is None:
        return False
    return subprocess.run(['git', '-C', str(ROOT), 'cat-file', '-e', f'{rev}^{{commit}}'],
                          capture_output=True).returncode == 0


REV = 'dd9fd06'  # the script's default: the last commit before issue 22's redesign


@pytest.mark.skipif(not has_rev(REV), reason=f'needs git and commit {REV} (a clone with full history)')
def test_before_after_tiny_mode_prints_a_table_that_parses(tmp_path, capsys):
    """Two measuring processes (the old tree, this one) at tiny sizes, one thread: about 15 s on two
    quiet cores, well under a minute on busy ones."""
    rows = before_after.main(['--rev', REV, '--tiny', '--repeat', '1', '--threads', '1', '--batch', '4',
                              '--json', str(tmp_path / 'ba.json')])
    out = capsys.readouterr().out
    assert f'{REV} vs the working tree' in out and 'TINY' in out
    for _, label in before_after.ROWS:  # per wall-clock second and per CPU second
        m = re.search(rf'^{re.escape(label)}\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$', out, re.M)
        assert m, (label, out)
        before, after, ratio = map(float, m.groups())
        assert before > 0 and after > 0 and ratio == pytest.approx(after / before, rel=0.01)
    assert len(rows) == len(before_after.ROWS) == 4
    saved = json.loads((tmp_path / 'ba.json').read_text())
    assert saved['rows'] == json.loads(json.dumps(rows)) and len(saved['runs']['before']) == 1
    assert saved['runs']['before'][0]['threads'] == saved['runs']['after'][0]['threads'] == 1


def test_before_after_refuses_an_unknown_rev():
    with pytest.raises(ValueError, match='--rev'):
        before_after.main(['--rev', 'no-such-rev-0123', '--tiny'])
