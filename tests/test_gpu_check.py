"""benchmarks/gpu_check.py --dry-run: every step of the GPU check runs on a CPU at tiny sizes.

The dry run measures no speed, so none is asserted. It keeps the script working until a GPU is
lent, and checks what the check claims: every step ran, every section is filled, every number
is finite, the table is printed, the NFE accounting matches SFD's, and the correctness
measurements behave as measured here. There, bf16 autocast is forced on the CPU, so bf16 and
fp32 really differ.
"""
import contextlib
import io
import json
import math
import re
import sys
import time

import pytest
import torch
from conftest import ROOT

import distill
import solvers

sys.path.insert(0, str(ROOT / 'benchmarks'))
import bench  # noqa: E402
import gpu_check  # noqa: E402


@pytest.fixture(scope='module')
def dry(tmp_path_factory):
    """One dry run for every test here: (returned results, the JSON file read back, printed text)."""
    out = tmp_path_factory.mktemp('gpu-check') / 'dry.json'
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        results = gpu_check.main(['--dry-run', '--out', str(out), '--peak', '1'])
    return results, json.loads(out.read_text()), printed.getvalue()


def numbers(tree, path=''):
    """Every (path, value) leaf of a JSON tree."""
    if isinstance(tree, dict):
        return [leaf for k, v in tree.items() for leaf in numbers(v, f'{path}/{k}')]
    if isinstance(tree, list):
        return [leaf for i, v in enumerate(tree) for leaf in numbers(v, f'{path}/{i}')]
    return [(path, tree)]


def test_every_step_runs_and_fills_every_section(dry):
    results, data, _ = dry
    assert data == json.loads(json.dumps(bench.plain(results)))
    names = [s[0] for s in gpu_check.steps(gpu_check.SIZES['dry'])]
    assert list(data['steps']) == names
    assert {n: s['status'] for n, s in data['steps'].items()} == dict.fromkeys(names, 'ok'), \
        {n: s.get('error') or s.get('reason') for n, s in data['steps'].items() if s['status'] != 'ok'}
    assert all(data[section] for section in gpu_check.SECTIONS)
    assert len(data['unet']) == 2 * len(gpu_check.EAGER)  # three variants at two batch sizes
    assert set(data['compile']) == {'bf16+compile, batch 2', 'bf16+compile, batch 4', 'distill', 'sample'}
    assert set(data['sampling']) == {'student', 'teacher'}
    assert set(data['correctness']) == {'non_finite', 'teacher_bf16_vs_fp32', 'first_update_bf16_vs_fp32',
                                        'code_paths'}


def test_numbers_are_finite_and_only_memory_is_missing_on_a_cpu(dry):
    _, data, _ = dry
    leaves = numbers({k: v for k, v in data.items() if k != 'meta'})
    for path, v in leaves:
        assert v not in ('nan', 'inf', '-inf'), path  # plain() writes non-finite floats as strings
        if isinstance(v, float):
            assert math.isfinite(v), path
        if v is None:  # the allocator's statistics exist on CUDA only
            assert path.endswith('mem_gib'), path
    unet = data['unet']['bf16, batch 4']
    assert unet['fwd_img_s'] > 0 and unet['fwd_bwd_tflops'] > 0 and unet['fwd_peak_fraction'] > 0
    run = data['distill']['run']
    assert run['kimg_s'] > 0 and run['projected_hours'] > 0
    assert run['paper_a100_hours'] == gpu_check.SFD_A100_HOURS


def test_distillation_counts_sfds_network_calls(dry):
    """SFD Alg. 4/5 at 2 NFE + AFS: the teacher solves the student grid refined K times (one call per
    multistep step), the student makes one call (and update) per step after the analytic first."""
    _, data, _ = dry
    cfg = distill.SFDConfig()
    N = len(distill.student_schedule(cfg, cfg.nfe)) - 1
    run, split = data['distill']['run'], data['distill']['split']
    assert run['teacher_nfe_per_it'] == split['teacher_calls'] == solvers.nfe(cfg.teacher_solver, cfg.K * N)
    assert run['student_calls_per_it'] == split['student_calls'] == cfg.nfe
    assert run['iterations'] == run['summary']['iterations'] >= gpu_check.SIZES['dry']['min_iters']
    assert data['sampling']['student']['nfe'] == 2 and data['sampling']['teacher']['nfe'] == 35


def test_correctness_checks_behave_as_measured(dry):
    """The limits come from seeds 0-4 of the dry net on this CPU: the bf16 trajectory's max
    difference was 0.014-0.029 (mean 0.0021-0.0026; state RMS ~0.7), the first update's gradient
    cosine 0.9978-0.9996, its sign agreement 96.3-98.3%. fp32 reruns are bit-identical on a CPU."""
    _, data, _ = dry
    c = data['correctness']
    assert c['non_finite'] and not any(c['non_finite'].values())
    teacher = c['teacher_bf16_vs_fp32']
    assert teacher['fp32_rerun']['max_abs'] == 0
    assert 0 < teacher['bf16']['max_abs'] < 0.06 and teacher['bf16']['mean_abs'] < 0.005
    update = c['first_update_bf16_vs_fp32']
    assert update['gradient_fp32_rerun']['rel_l2'] == 0 and update['delta_fp32_rerun']['max_abs'] == 0
    assert 0.99 < update['gradient_bf16']['cosine'] < 1 and update['delta_bf16']['same_sign'] > 0.9
    # dynamo's eager backend runs the captured graph with the same kernels: identical outputs.
    assert data['compile']['bf16+compile, batch 4']['max_abs_diff_vs_eager'] == 0
    assert data['compile']['sample']['pixels_differing'] == 0


def test_code_paths_are_recorded_as_they_ran(dry):
    _, data, _ = dry
    paths = data['correctness']['code_paths']
    assert all(p['ok'] for p in paths.values()), paths
    assert paths['teacher under inference_mode']['teacher'] == [True]
    assert paths['student outside inference_mode']['student'] == [False]
    autocast = paths['autocast bf16 (CUDA only)']  # off on a CPU, as solvers.autocast('auto') says
    assert autocast == dict(expected=[False], teacher=[False], student=[False], ok=True)
    for name, p in paths.items():
        if name.startswith('torch.compile'):
            assert p['graph_breaks'] == 0 and p['graphs'] >= p['graphs_expected'], (name, p)


def test_table_is_printed_with_every_check(dry):
    """Every step's status, then each section's results, one line each, named as in the JSON."""
    _, data, printed = dry
    assert 'GPU check: CPU' in printed and 'DRY RUN' in printed and 'FAILED' not in printed
    line = lambda section, name: re.search(rf'^{section}\s+{re.escape(name)}', printed, re.M)
    for name in data['steps']:
        assert line('steps', f'{name} '), name
    for section, name in [('unet', 'fp32, batch 2'), ('unet', 'bf16+channels_last, batch 4'),
                          ('compile', 'bf16+compile, batch 4'), ('compile', 'distill'), ('compile', 'sample'),
                          ('distill', 'split'), ('distill', 'run'), ('sampling', 'student'),
                          ('sampling', 'teacher'),
                          ('fid', 'fid'), ('correctness', 'teacher_bf16_vs_fp32'),
                          ('correctness', 'first_update_bf16_vs_fp32'), ('correctness', 'NaN/inf scan'),
                          ('code path', 'autocast bf16'), ('code path', 'torch.compile: compile/distill')]:
        assert line(section, name), (section, name)
    assert 'kimg_s' in printed and 'projected_hours' in printed and 'fwd_bwd_img_s' in printed


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the refusal without a GPU')
def test_bad_input_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match='--dry-run'):
        gpu_check.main(['--out', str(tmp_path / 'x.json')])
    with pytest.raises(ValueError, match='--budget'):
        gpu_check.main(['--dry-run', '--budget', '-1', '--out', str(tmp_path / 'x.json')])
    assert not (tmp_path / 'x.json').exists()


def test_budget_skips_steps_and_the_hard_limit_interrupts_one(tmp_path, monkeypatch, capsys):
    """A step overrunning budget + margin is stopped by SIGALRM and reported; the rest is skipped."""
    def endless(ck):  # stands in for a step that hangs (a compilation, say)
        time.sleep(30)
        return []
    monkeypatch.setattr(gpu_check, 'teacher_precision', endless)
    monkeypatch.setattr(gpu_check, 'HARD_MARGIN', 0.0)
    t0 = time.perf_counter()
    out = tmp_path / 'a.json'
    res = gpu_check.main(['--dry-run', '--budget', '3', '--only', 'correctness', '--out', str(out)])
    assert time.perf_counter() - t0 < 15
    status = [(n, s['status']) for n, s in res['steps'].items()]
    failed = [i for i, (n, s) in enumerate(status) if s == 'failed']
    assert len(failed) == 1 and 'hard time limit' in res['steps'][status[failed[0]][0]]['error']
    assert all(s == 'skipped' for _, s in status[failed[0] + 1:])
    assert json.loads(out.read_text())['steps'] == bench.plain(res['steps'])
    assert 'FAILED' in capsys.readouterr().out
