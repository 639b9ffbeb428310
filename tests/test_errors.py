"""Bad input gets one clear error; no run, file or hour of work is ever lost (all CLIs).

Table-driven: each row is a command line, the exit status, a fragment of the one-line message,
and every row checks that no existing file changed. CLIs run in-process through cli.run(main,
argv) -- exactly what `python X.py` does -- and in a subprocess where signals matter.
"""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import cli
import distill
import guided_pd
import models
import sample
import toy
from conftest import ROOT


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """Small model files and runs to point the commands at (no training of toy teachers)."""
    d = tmp_path_factory.mktemp('errors')
    torch.manual_seed(0)
    models.save_model(d / 'teacher.pt', toy.toy_net(width=16, depth=1), shape=[2], kind='tiny')
    models.save_model(d / 'cond.pt', toy.toy_net(label_dim=3, width=16, depth=1), shape=[2], kind='tiny')
    nan = toy.toy_net(width=16, depth=1)
    with torch.no_grad():
        nan.model.out.bias.fill_(float('nan'))
    models.save_model(d / 'nan.pt', nan, shape=[2], kind='tiny')
    (d / 'random.pt').write_bytes(os.urandom(2048))
    (d / 'empty-run').mkdir()
    cfg = distill.SFDConfig(teacher=str(d / 'teacher.pt'), kimg=0.064, batch=32, lr=1e-4, tick_kimg=0.032,
                            snapshot_kimg=0.032, run_dir=str(d / 'run'), device='cpu')
    distill.distill(cfg, progress=False, log=lambda *_: None)
    (d / 'broken-run').mkdir()
    state = (d / 'run' / 'training-state.pt').read_bytes()
    (d / 'broken-run' / 'training-state.pt').write_bytes(state[:len(state) // 2])  # truncated
    return d


def snapshot(folder):
    """Every file under `folder` with its content hash: what 'nothing changed' compares."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob('*')) if p.is_file()}


def run_cli(main, argv, capsys):
    """(exit status, stderr) of `python X.py argv`, in-process."""
    with pytest.raises(SystemExit) as e:
        cli.run(main, argv)
        raise SystemExit(0)
    return e.value.code, capsys.readouterr().err


T = ['--teacher', '{d}/teacher.pt', '--device', 'cpu']
ROWS = [  # (CLI, argv, exit status, fragment of the message)
    # distill.py: unknown names
    ('distill', T + ['--method', 'sdf'], 2, "--method 'sdf': choose one of sfd, sfd-v"),
    ('distill', T + ['--teacher-solver', 'rk4'], 2, "--teacher-solver 'rk4': choose one of euler"),
    ('distill', T + ['--loss', 'l3'], 2, "--loss 'l3': choose one of l1"),
    ('distill', T + ['--schedule', 'cosine'], 2, "--schedule 'cosine': choose one of polynomial"),
    # numbers that cannot work
    ('distill', T + ['--t-min', '0'], 2, '--t-min 0.0: need 0 < t_min < t_max'),
    ('distill', T + ['--t-max', 'inf'], 2, '--t-max inf: need 0 < t_min < t_max < inf'),
    ('distill', T + ['--t-min', 'nan'], 2, '--t-min nan'),
    ('distill', T + ['--lr', '-1'], 2, '--lr -1.0: the learning rate must be positive'),
    ('distill', T + ['--batch', '-4'], 2, '--batch -4: the batch must hold at least one trajectory'),
    ('distill', T + ['--batch', '0'], 2, '--batch 0: the batch must hold'),
    ('distill', T + ['--K', '0'], 2, '--K 0: the teacher takes K >= 1 steps'),
    ('distill', T + ['--nfe', '0'], 2, '--nfe 0: the student needs at least one network call'),
    ('distill', T + ['--nfe-list', '2,0'], 2, '--nfe-list (2, 0): give NFE >= 1'),
    ('distill', T + ['--kimg', '0'], 2, '--kimg 0.0: must be positive'),
    ('distill', T + ['--tick-kimg', '-1'], 2, '--tick-kimg -1.0: must be positive'),
    ('distill', T + ['--snapshot-kimg', '0'], 2, '--snapshot-kimg 0.0: must be positive'),
    ('distill', T + ['--rho', '0'], 2, '--rho 0.0: must be positive'),
    ('distill', T + ['--seed', '-1'], 2, '--seed -1: must be a non-negative integer'),
    ('distill', ['--teacher', '{d}/teacher.pt', '--device', 'cuda:0'] * (not torch.cuda.is_available()),
     2, '--device cuda:0: no CUDA GPU is visible'),
    ('distill', T + ['--method', 'vanilla', '--teacher-solver', 'dpmpp3m'], 2, 'needs a single-step solver'),
    # flag values argparse refuses; abbreviations are honoured, not overridden by a recipe
    ('distill', T + ['--afs', 'ture'], 2, "argument --afs: expected true or false (yes/no, 1/0), got 'ture'"),
    ('distill', T + ['--kim', '0'], 2, '--kimg 0.0: must be positive'),
    ('distill', T + ['--bat', '-64'], 2, '--batch -64'),
    ('distill', T + ['--nfe', 'two'], 2, "argument --nfe: invalid int value: 'two'"),
    # missing or corrupt files
    ('distill', ['--teacher', '{d}/missing.pt'], 2, "unknown model '{d}/missing.pt' (no such file)"),
    ('distill', ['--teacher', '{d}/random.pt'], 2, 'random.pt is not a readable model file'),
    ('distill', ['--teacher', 'cifar100'], 2, "unknown model 'cifar100': expected toy:<name>"),
    ('distill', ['--resume', '{d}/empty-run'], 2, 'no training-state.pt there'),
    ('distill', ['--resume', '{d}/broken-run'], 2, 'training-state.pt is unreadable'),
    # runs: never two in one folder; resume refuses settings that conflict with the run
    ('distill', T + ['--run-dir', '{d}/run'], 2, 'already holds a run (training-state.pt, student.pt)'),
    ('distill', ['--resume', '{d}/run', '--lr', '1'], 2, 'the run was made with --lr 0.0001'),
    ('distill', ['--resume', '{d}/run', '--method', 'sfd-v', '--K', '2'], 2, "--K 4, --method 'sfd'"),
    ('distill', ['--method', 'second-stage', '--teacher', '{d}/teacher.pt'], 2, 'needs a first-stage SFD/SFD-v'),
    # guided_pd.py
    ('guided_pd', ['stage1', '--teacher', '{d}/teacher.pt'], 2, 'is not class-conditional'),
    ('guided_pd', ['stage1', '--iter', '0'], 2, '--iters 0: must be a positive integer'),
    ('guided_pd', ['stage1', '--w-min', '2', '--w-max', '1'], 2, '--w-max 1.0: need w_min <= w_max'),
    ('guided_pd', ['stage1', '--w-min', '-1'], 2, '--w-min -1.0: guidance strengths are >= 0'),
    ('guided_pd', ['stage1', '--lr', '0'], 2, '--lr 0.0: the learning rate must be positive'),
    ('guided_pd', ['stage1', '--ema', '1.5'], 2, '--ema 1.5'),
    ('guided_pd', ['stage1', '--sigma-min', '0'], 2, '--sigma-min 0.0'),
    ('guided_pd', ['stage1', '--weighting', 'snr2'], 2, "--weighting 'snr2': choose one of edm"),
    ('guided_pd', ['stage1', '--stochastic', 'maybe'], 2, "expected true or false"),
    ('guided_pd', ['stage2', '--teacher', 'toy:ring'], 2, 'stage two distils a stage-one (or stage-two) student'),
    ('guided_pd', ['stage2', '--teacher', '{d}/teacher.pt'], 2, 'has no guidance input: run stage1 first'),
    ('guided_pd', ['stage1', '--teacher', '{d}/cond.pt', '--uncond', '', '--run-dir', '{d}/run'], 2,
     'already holds a run'),
    ('guided_pd', ['stage1', '--device', 'cuda'] * (not torch.cuda.is_available()), 2, 'no CUDA GPU'),
    # sample.py
    ('sample', ['--model', '{d}/teacher.pt', '--npz', '{d}/s.npz', '--batch', '-1'], 2, '--batch -1'),
    ('sample', ['--model', '{d}/teacher.pt', '--npz', '{d}/s.npz', '--batch', '0'], 2, '--batch 0'),
    ('sample', ['--model', '{d}/teacher.pt', '--npz', '{d}/teacher.pt/s.npz'], 2, 'cannot write there'),
    ('sample', ['--model', '{d}/teacher.pt', '--grid', '{d}/random.pt/g.png'], 2, 'cannot write there'),
    ('sample', ['--model', '{d}/teacher.pt', '--npz', '{d}'], 2, 'is a folder; give a file name'),
    ('sample', ['--model', '{d}/teacher.pt'], 2, 'no output requested'),
    ('sample', ['--model', '{d}/random.pt', '--npz', '{d}/s.npz'], 2, 'random.pt is not a readable model file'),
    ('sample', ['--model', '{d}/nan.pt', '--npz', '{d}/s.npz', '--nfe', '3'], 2,
     'the model returned non-finite values at t=80 for seeds [0, 1, 2, 3, 4, 5, 6, 7] ...'),
    ('sample', ['--model', '{d}/teacher.pt', '--npz', '{d}/s.npz', '--seeds', '5-1'], 2, 'bad seed list'),
    ('sample', ['--model', '{d}/teacher.pt', '--npz', '{d}/s.npz', '--nfe', '0'], 2, '--nfe 0'),
    ('sample', ['--model', '{d}/teacher.pt', '--npz', '{d}/s.npz', '--t-max', 'inf'], 2, '--t-max inf'),
    ('sample', ['--model', '{d}/teacher.pt', '--npz', '{d}/s.npz', '--guidance', '-1'], 2, '--guidance -1.0'),
]
MAINS = {'distill': distill.main, 'guided_pd': guided_pd.main, 'sample': sample.main}


@pytest.mark.parametrize('script, argv, status, message', ROWS)
def test_user_errors_are_one_line_and_change_nothing(files, capsys, script, argv, status, message):
    if not argv:
        pytest.skip('a CUDA GPU is visible: --device cuda is valid here')
    before = snapshot(files)
    code, err = run_cli(MAINS[script], [a.format(d=files) for a in argv], capsys)
    assert code == status
    lines = err.strip().splitlines()
    assert len(lines) == 1 and ': error: ' in lines[0] and 'Traceback' not in err, err
    assert message.format(d=files) in lines[0]
    assert snapshot(files) == before  # nothing written, nothing lost


def test_batch_must_split_over_processes():
    with pytest.raises(ValueError, match='--batch 6: must split evenly over the 4 processes'):
        distill.validate(distill.SFDConfig(batch=6, device='cpu'), world=4)


def test_resume_may_extend_kimg_and_truncates_stats(files, tmp_path):
    """--kimg may grow on resume; the stats rows written after the last snapshot are dropped, so
    iterations never repeat or run backwards."""
    import shutil
    run = tmp_path / 'run'
    shutil.copytree(files / 'run', run)
    with open(run / 'stats.jsonl', 'a') as f:  # a row written after the snapshot, then a crash
        f.write(json.dumps({'iteration': 99}) + '\n')
    cfg = distill.SFDConfig(kimg=0.128)
    student, summary = distill.distill(cfg, resume=str(run), progress=False, log=lambda *_: None,
                                       explicit={'kimg'})
    its = [json.loads(line)['iteration'] for line in open(run / 'stats.jsonl')]
    assert summary['iterations'] == 4 and its == sorted(set(its)) and its[-1] == 4
    assert not list(run.glob('*.tmp*')) and not (run / '.lock').exists()


def test_a_second_writer_is_refused(files, tmp_path):
    run = tmp_path / 'locked'
    run.mkdir()
    (run / '.lock').write_text(f'{os.getpid()} {__import__("socket").gethostname()}\n')  # alive: this process
    cfg = distill.SFDConfig(teacher=str(files / 'teacher.pt'), kimg=0.032, batch=32, run_dir=str(run), device='cpu')
    with pytest.raises(ValueError, match='is being written by another process'):
        distill.distill(cfg, progress=False, log=lambda *_: None)
    (run / '.lock').write_text('999999999 ' + __import__('socket').gethostname())  # its process is gone
    distill.distill(cfg, progress=False, log=lambda *_: None)
    assert (run / 'student.pt').is_file() and not (run / '.lock').exists()


def test_default_run_folders_are_numbered_and_never_reused(files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = distill.SFDConfig(teacher=str(files / 'teacher.pt'), kimg=0.032, batch=32, device='cpu')
    a = distill.distill(cfg, progress=False, log=lambda *_: None)[1]['run_dir']
    b = distill.distill(cfg, progress=False, log=lambda *_: None)[1]['run_dir']
    assert a.startswith('runs/00000-sfd-') and b.startswith('runs/00001-sfd-')


@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGTERM])
def test_a_signal_writes_a_snapshot_and_the_run_resumes(files, tmp_path, sig):
    """SIGINT / SIGTERM mid-run: a snapshot of the current iteration, one line saying how to
    resume, exit status 130, no lock or temporary file left; --resume then finishes the run."""
    run = tmp_path / 'run'
    cmd = [sys.executable, str(ROOT / 'distill.py'), '--teacher', str(files / 'teacher.pt'), '--kimg', '200',
           '--batch', '32', '--tick-kimg', '0.032', '--snapshot-kimg', '100', '--device', 'cpu', '--quiet',
           '--run-dir', str(run)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS='1'))
    deadline = time.time() + 120
    while not (run / 'stats.jsonl').is_file() or not (run / 'stats.jsonl').read_text().count('\n') >= 2:
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert 'continue with --resume' in out and err.strip().endswith('distill.py: interrupted')
    state = torch.load(run / 'training-state.pt', weights_only=True)
    rows = [json.loads(line) for line in open(run / 'stats.jsonl')]
    assert state['iteration'] == rows[-1]['iteration'] >= 2
    assert sorted(p.name for p in run.iterdir()) == ['stats.jsonl', 'student.pt', 'training-state.pt']
    student, summary = distill.distill(distill.SFDConfig(kimg=(state['iteration'] + 1) * 0.032), resume=str(run),
                                       progress=False, log=lambda *_: None, explicit={'kimg'})
    assert summary['iterations'] == state['iteration'] + 1


def test_nan_teacher_stops_guided_training_at_the_first_update(files, tmp_path):
    nan = toy.toy_net(label_dim=3, width=16, depth=1)
    with torch.no_grad():
        nan.model.out.bias.fill_(float('nan'))
    models.save_model(tmp_path / 'nan-cond.pt', nan, shape=[2], kind='tiny')
    cfg = guided_pd.GuidedConfig(teacher=str(tmp_path / 'nan-cond.pt'), uncond='', iters=20, batch=8,
                                 run_dir=str(tmp_path / 'g'), device='cpu')
    data = (torch.randn(16, 2), torch.arange(16) % 3)
    with pytest.raises(FloatingPointError, match='stage1: non-finite loss at update 1'):
        guided_pd.stage_one(cfg, dataset=data, progress=False, log=lambda *_: None)


def test_an_empty_seed_list_is_refused():
    with pytest.raises(ValueError, match='bad seed list'):
        sample.parse_seeds('')
