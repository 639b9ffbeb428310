"""benchmarks/bench.py runs end to end at toy sizes and counts what it claims to count.

No timing is asserted (speed is reported by the benchmark, never tested); this only keeps the
script from rotting and checks its NFE accounting against the SFD configuration.
"""
import json
import sys

import distill
import solvers
from conftest import ROOT

sys.path.insert(0, str(ROOT / 'benchmarks'))
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
