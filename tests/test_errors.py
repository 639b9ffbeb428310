"""Bad input gets one clear error; no run, file or hour of work is ever lost (all CLIs).

Table-driven: each row is a command line, the exit status, a fragment of the one-line message,
and every row checks that no existing file changed. CLIs run in-process through cli.run(main,
argv) -- exactly what `python X.py` does -- and in a subprocess where signals matter.

Organised by class of mistake (issue 23), each class a table or a few tests:
    ROWS           flags and files of the first pass
    OUTPUT_ROWS    outputs, caches and run folders checked before anything slow starts
    full disk      atomic_write says "the disk is full" and names the file; nothing half-written
    EVAL_ROWS      evaluation sets that would be quietly wrong: mixed, interrupted, another size
    NONSENSE_ROWS  settings that used to "succeed" with zeros, NaN or a sampler of another model
    TRACEBACK_ROWS user errors that used to end in a traceback (models.py, corrupt images, offline)
"""
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cli
import data
import distill
import fid
import guided_pd
import models
import sample
import toy
import unet
from conftest import ROOT

TINY_UNET = dict(img_resolution=8, img_channels=3, model_channels=16, channel_mult=[1, 2], num_blocks=1,
                 attn_resolutions=[4], dropout=0.0)


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
    evaluation_files(d)
    return d


def png(path, seed, size=8):
    """A random RGB image at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)


def stats_file(path, image_size=(8, 8), nan=False, n=4096):
    """A statistics file as fid.py ref writes it (16-d features; image_size None: an old file)."""
    rng = np.random.default_rng(n)
    f = rng.standard_normal((64, 16))
    stats = dict(mu=f.mean(0) * (np.nan if nan else 1), sigma=np.cov(f.T), num_images=n, protocol='edm',
                 image_size=image_size)
    fid.save_stats(path, stats)


def evaluation_files(d):
    """Image sets and statistics for the evaluation rows: a real data set (no marker), sets that
    sample.py left unfinished or that were changed since, a corrupt image, 16x16 samples and an 8x8
    reference."""
    torch.manual_seed(3)
    models.save_model(d / 'img.pt', unet.EDMPrecond(**TINY_UNET))  # an 8x8 image model
    for i in range(4):
        png(d / 'imgs' / f'{i:06d}.png', i)  # a plain image folder: a real data set
    for i in range(3):
        png(d / 'partial' / '000000' / f'{i:06d}.png', i)
    data.mark_sample_set(d / 'partial', complete=False, model='img.pt', seeds='0-5')  # interrupted
    with zipfile.ZipFile(d / 'partial.zip', 'w') as z:
        for f in sorted((d / 'partial').rglob('*')):
            if f.is_file():
                z.write(f, f.relative_to(d / 'partial').as_posix())
    for i in range(3):
        png(d / 'tampered' / '000000' / f'{i:06d}.png', i)
    data.mark_sample_set(d / 'tampered', complete=True, model='img.pt', seeds='0-3', count=4)  # one removed
    for i in range(4):
        png(d / 'corrupt' / f'{i:06d}.png', i)
    (d / 'corrupt' / 'zz.png').write_bytes(b'\x89PNG\r\n\x1a\n not really')  # sorts last: read in the loop
    np.savez(d / 'big16.npz', images=np.zeros((2048, 16, 16, 3), np.uint8))  # 16x16 samples
    stats_file(d / 'ref8.npz')  # an 8x8 reference
    stats_file(d / 'nan-stats.npz', nan=True)


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
    ('distill', T + ['--method', 'sfd-v', '--nfe-list', '2,0'], 2, '--nfe-list (2, 0): give NFE >= 1'),
    ('distill', T + ['--kimg', '0'], 2, '--kimg 0.0: must be'),
    ('distill', T + ['--tick-kimg', '-1'], 2, '--tick-kimg -1.0: must be'),
    ('distill', T + ['--snapshot-kimg', '0'], 2, '--snapshot-kimg 0.0: must be'),
    ('distill', T + ['--rho', '0'], 2, '--rho 0.0: must be positive'),
    ('distill', T + ['--seed', '-1'], 2, '--seed -1: must be a non-negative integer'),
    ('distill', ['--teacher', '{d}/teacher.pt', '--device', 'cuda:0'] * (not torch.cuda.is_available()),
     2, '--device cuda:0: no CUDA GPU is visible'),
    ('distill', T + ['--method', 'vanilla', '--teacher-solver', 'dpmpp3m'], 2, 'needs a single-step solver'),
    # flag values argparse refuses; abbreviations are honoured, not overridden by a recipe
    ('distill', T + ['--afs', 'ture'], 2, "argument --afs: expected true or false (yes/no, 1/0), got 'ture'"),
    ('distill', T + ['--kim', '0'], 2, '--kimg 0.0: must be'),
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
MAINS = {'distill': distill.main, 'guided_pd': guided_pd.main, 'sample': sample.main, 'fid': fid.main,
         'models': models.main, 'toy': toy.main}


def check_row(files, capsys, script, argv, status, message):
    """Run one row: its exit status, one line `X.py: error: <message>`, and no file changed."""
    if not argv:
        pytest.skip('a CUDA GPU is visible: --device cuda is valid here')
    before = snapshot(files)
    code, err = run_cli(MAINS[script], [a.format(d=files) for a in argv], capsys)
    assert code == status
    lines = [line for line in err.strip().splitlines() if line.strip() and not PROGRESS_BAR.search(line)]
    assert len(lines) == 1 and ': error: ' in lines[0] and 'Traceback' not in err, err
    assert message.format(d=files) in lines[0]
    assert snapshot(files) == before  # nothing written, nothing lost


PROGRESS_BAR = re.compile(r'\d+%\|.*\|')  # tqdm's lines on stderr are not part of an error


@pytest.mark.parametrize('script, argv, status, message', ROWS)
def test_user_errors_are_one_line_and_change_nothing(files, capsys, script, argv, status, message):
    check_row(files, capsys, script, argv, status, message)


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
    assert sorted(p.name for p in run.iterdir()) == ['README.md', 'stats.jsonl', 'student.pt',
                                                     'training-state.pt']
    student, summary = distill.distill(distill.SFDConfig(kimg=(state['iteration'] + 1) * 0.032), resume=str(run),
                                       progress=False, log=lambda *_: None, explicit={'kimg'})
    assert summary['iterations'] == state['iteration'] + 1


def test_nan_teacher_stops_guided_training_at_the_first_update(files, tmp_path):
    nan = toy.toy_net(label_dim=3, width=16, depth=1)
    with torch.no_grad():
        nan.model.out.bias.fill_(float('nan'))
    models.save_model(tmp_path / 'nan-cond.pt', nan, shape=[2], kind='tiny')
    cfg = guided_pd.GuidedConfig(teacher=str(tmp_path / 'nan-cond.pt'), uncond='', kimg=0.16, batch=8,
                                 run_dir=str(tmp_path / 'g'), device='cpu')
    points = (torch.randn(16, 2), torch.arange(16) % 3)
    with pytest.raises(FloatingPointError, match='non-finite loss or gradient at iteration 0'):
        guided_pd.stage_one(cfg, dataset=points, progress=False, log=lambda *_: None)


def test_an_empty_seed_list_is_refused():
    with pytest.raises(ValueError, match='bad seed list'):
        sample.parse_seeds('')


# =============================================================================================
# Issue 23, by class of mistake
# =============================================================================================

class FakeInception(torch.nn.Module):
    """Stands in for the Inception network: 16 'features' of the pixels, no classifier."""

    def forward(self, x, protocol='edm'):
        f = x.float().flatten(1)[:, :16] / 255
        return f, torch.full((len(x), 1008), float('nan'))


@pytest.fixture
def no_slow_work(monkeypatch):
    """Everything slow (a model, the Inception network, features, CIFAR-10's download) fails the
    test if it starts: the rows' errors must come before it."""
    def slow(*args, **kwargs):
        raise AssertionError('slow work started before the check')
    for owner, name in ((models, 'load'), (fid, 'load_inception'), (fid, 'compute_features'),
                        (data, 'load_cifar10')):
        monkeypatch.setattr(owner, name, slow)


# ---------------------------------------------------------------------------------------------
# 1. Output locations, caches: checked before anything slow, one line, exit 2
# ---------------------------------------------------------------------------------------------

S = ['--model', '{d}/img.pt', '--nfe', '3']
OUTPUT_ROWS = [  # (CLI, argv, exit status, fragment): a file in the way, a folder, a wrong suffix
    ('sample', S + ['--grid', '{d}/teacher.pt/g.png'], 2, 'cannot write there ({d}/teacher.pt is a file'),
    ('sample', S + ['--grid', '{d}/random.pt/sub/g.png'], 2, '{d}/random.pt is a file, not a folder'),
    ('sample', S + ['--npz', '{d}/teacher.pt/s.npz'], 2, 'cannot write there'),
    ('sample', S + ['--outdir', '{d}/teacher.pt'], 2, '--outdir {d}/teacher.pt: cannot write there ({d}/teacher.pt '
                                                      'is a file, not a folder)'),
    ('sample', S + ['--outdir', '{d}/teacher.pt/imgs'], 2, 'cannot write there'),
    ('sample', S + ['--grid', '{d}'], 2, 'is a folder; give a file name'),
    ('sample', S + ['--grid', '{d}/g.npz'], 2, "--grid {d}/g.npz: give an image file name PIL can write"),
    ('sample', S + ['--grid', '{d}/grid'], 2, "not 'no suffix'"),
    ('sample', S + ['--npz', '{d}/s.png'], 2, '--npz {d}/s.png: an npz of samples needs a name ending in .npz'),
    ('sample', S + ['--npz', '{d}/s'], 2, 'needs a name ending in .npz'),
    ('fid', ['ref', '--data', 'cifar10', '--dest', '{d}/teacher.pt/ref.npz'], 2, '--dest {d}/teacher.pt/ref.npz: '
                                                                                 'cannot write there'),
    ('fid', ['ref', '--data', 'cifar10', '--dest', '{d}'], 2, 'needs a name ending in .npz'),
    ('fid', ['ref', '--data', 'cifar10', '--dest', '{d}/run.npz'], 2, '--dest {d}/run.npz is a folder'),
    ('fid', ['ref', '--data', 'cifar10', '--dest', '{d}/ref.png'], 2, 'a statistics file needs a name ending in .npz'),
]


@pytest.mark.parametrize('script, argv, status, message', OUTPUT_ROWS)
def test_outputs_are_checked_before_anything_slow(files, capsys, no_slow_work, script, argv, status, message):
    if 'run.npz' in ''.join(argv):
        (files / 'run.npz').mkdir(exist_ok=True)  # a folder that has an .npz name
    check_row(files, capsys, script, argv, status, message)


@pytest.mark.parametrize('script, argv', [
    ('sample', ['--model', 'toy:ring', '--npz', '{d}/s.npz']),
    ('sample', ['--model', '{d}/teacher.pt', '--uncond', 'cifar10', '--npz', '{d}/s.npz']),
    ('models', ['toy:moons']),
    ('distill', ['--teacher', 'toy:checkerboard', '--device', 'cpu']),
])
def test_a_cache_that_is_a_file_is_refused_naming_sfd_cache(files, capsys, monkeypatch, script, argv):
    """SFD_CACHE pointing at a file: one line naming SFD_CACHE, before a teacher is trained or a
    network downloaded (it used to be found after 20 minutes of teacher training)."""
    monkeypatch.setenv('SFD_CACHE', str(files / 'teacher.pt'))
    monkeypatch.setattr(toy, 'train_teacher', lambda *args, **kwargs: pytest.fail('the teacher was trained'))
    monkeypatch.setattr(data, 'download', lambda *args, **kwargs: pytest.fail('a download started'))
    check_row(files, capsys, script, argv, 2, 'the download cache {d}/teacher.pt (SFD_CACHE) cannot be used: '
                                              '{d}/teacher.pt is a file, not a folder; set SFD_CACHE')


def test_the_cache_checks(tmp_path, monkeypatch):
    """check_cache: a file, or a file on the way, is refused; a cache still to be made is fine and
    is not created by the check; reading a cache needs no write permission (check_writable looks)."""
    (tmp_path / 'f').write_text('x')
    for bad in (tmp_path / 'f', tmp_path / 'f' / 'cache'):
        monkeypatch.setenv('SFD_CACHE', str(bad))
        with pytest.raises(ValueError, match=f'{tmp_path / "f"} is a file, not a folder; set SFD_CACHE'):
            data.check_cache()
        with pytest.raises(ValueError, match='SFD_CACHE'):
            data.cache_root()  # a file is never a cache, even for reading
    monkeypatch.setenv('SFD_CACHE', str(tmp_path / 'new' / 'cache'))
    assert data.check_cache() == tmp_path / 'new' / 'cache' and not (tmp_path / 'new').exists()
    with pytest.raises(ValueError, match="--dest .*: cannot write there .*broken link"):
        (tmp_path / 'link').symlink_to(tmp_path / 'nowhere')
        data.check_writable(tmp_path / 'link' / 'x.npz', '--dest')


@pytest.mark.skipif(os.geteuid() == 0, reason='root ignores permissions: chmod cannot make a folder read-only')
def test_read_only_folders_are_refused_before_anything_slow(files, tmp_path, capsys, monkeypatch, no_slow_work):
    ro = tmp_path / 'ro'
    ro.mkdir()
    ro.chmod(0o555)
    try:
        for script, argv in (('sample', S + ['--npz', f'{ro}/s.npz']), ('sample', S + ['--outdir', f'{ro}/imgs']),
                             ('sample', S + ['--grid', f'{ro}/deeper/g.png']),
                             ('fid', ['ref', '--data', 'cifar10', '--dest', f'{ro}/ref.npz'])):
            check_row(files, capsys, script, argv, 2, f'cannot write there (no permission to write in {ro})')
        monkeypatch.setenv('SFD_CACHE', str(ro))
        with pytest.raises(ValueError, match=f'no permission to write in {ro}; set SFD_CACHE'):
            data.check_cache()
        assert data.cache_root() == ro  # reading a read-only cache (files put there by hand) is fine
    finally:
        ro.chmod(0o755)


# ---------------------------------------------------------------------------------------------
# 2. A full disk: one error that says so and names the file; the temporary file is removed
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('code', [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_is_named_and_leaves_the_old_file(tmp_path, code):
    target = tmp_path / 'out' / 'student.pt'
    data.atomic_write(target, lambda tmp: tmp.write_bytes(b'old'))

    def write(tmp):
        tmp.write_bytes(b'half')
        raise OSError(code, os.strerror(code))
    with pytest.raises(data.DiskFullError, match=f'could not write {target}: the disk is full'):
        data.atomic_write(target, write)
    assert os.listdir(target.parent) == ['student.pt'] and target.read_bytes() == b'old'


def test_a_writer_that_does_not_say_disk_full_is_recognised(tmp_path, monkeypatch):
    """torch.save on a full disk raises a RuntimeError about stream positions, no errno: with no
    space left, that is a full disk too; with space left, or a ValueError, it is what it said."""
    def save(obj, tmp):
        Path(tmp).write_bytes(b'half')
        raise RuntimeError('[enforce fail at inline_container.cc:595] . unexpected pos 64 vs 0')
    monkeypatch.setattr(torch, 'save', save)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(data.shutil, 'disk_usage', lambda p: usage._replace(free=4096))
    with pytest.raises(data.DiskFullError, match=rf'could not write {tmp_path / "m.pt"}: the disk is full '
                                                 r'\(0.0 MiB free; RuntimeError: \[enforce'):
        models.save_model(tmp_path / 'm.pt', toy.toy_net(width=8, depth=1))

    def bad(tmp):
        raise ValueError('bad value')
    with pytest.raises(ValueError, match='^bad value$'):  # the writer's own error, not a disk's
        data.atomic_write(tmp_path / 'x.pt', bad)
    monkeypatch.setattr(data.shutil, 'disk_usage', lambda p: usage._replace(free=1 << 40))
    with pytest.raises(RuntimeError, match='unexpected pos'):  # space left: not the disk
        models.save_model(tmp_path / 'm.pt', toy.toy_net(width=8, depth=1))
    assert not os.listdir(tmp_path)


def test_a_full_disk_ends_a_cli_in_one_line(files, tmp_path, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(sample.np, 'savez', full)
    code, err = run_cli(sample.main, ['--model', str(files / 'teacher.pt'), '--nfe', '3', '--seeds', '0-3',
                                      '--quiet', '--npz', str(tmp_path / 's.npz')], capsys)
    assert code == 2 and err.count('\n') == 1, err
    assert f'could not write {tmp_path / "s.npz"}: the disk is full (No space left on device)' in err
    assert not os.listdir(tmp_path)


# ---------------------------------------------------------------------------------------------
# 3. Evaluation sets that would be quietly wrong
# ---------------------------------------------------------------------------------------------

EVAL_ROWS = [
    # sampling into a folder of images would mix two sets
    ('sample', S + ['--outdir', '{d}/imgs'], 2, '--outdir {d}/imgs already holds 4 images (e.g. 000000.png): '
                                                'choose an empty folder or delete it'),
    ('sample', S + ['--outdir', '{d}/partial'], 2, 'already holds 3 images'),
    # an interrupted --outdir (a folder or a zip of it), a set changed since: never scored
    ('fid', ['calc', '--images', '{d}/partial', '--ref', '{d}/ref8.npz'], 2,
     '{d}/partial is an unfinished sample set (img.pt, seeds 0-5): sample.py was interrupted after 3 images'),
    ('fid', ['calc', '--images', '{d}/partial.zip', '--ref', '{d}/ref8.npz'], 2, 'is an unfinished sample set'),
    ('fid', ['ref', '--data', '{d}/partial', '--dest', '{d}/new-ref.npz'], 2, 'is an unfinished sample set'),
    ('fid', ['prdc', '--images', '{d}/partial', '--ref-images', '{d}/imgs', '--k', '1'], 2, 'unfinished sample set'),
    ('fid', ['calc', '--images', '{d}/tampered', '--ref', '{d}/ref8.npz'], 2,
     '{d}/tampered holds 3 images, but sample.py wrote 4 there'),
    # samples of one size against a reference (or real images) of another
    ('fid', ['calc', '--images', '{d}/big16.npz', '--ref', '{d}/ref8.npz'], 2,
     'the images are 16x16, but the reference {d}/ref8.npz is of 8x8 images'),
    ('fid', ['prdc', '--images', '{d}/big16.npz', '--ref-images', '{d}/imgs', '--k', '1'], 2,
     'the images are 16x16, but the real image set {d}/imgs is of 8x8 images'),
]


@pytest.mark.parametrize('script, argv, status, message', EVAL_ROWS)
def test_evaluation_sets_that_would_be_wrong_are_refused(files, capsys, no_slow_work, script, argv, status, message):
    check_row(files, capsys, script, argv, status, message)


def test_outdir_is_marked_complete_last_and_an_interrupted_one_is_never_scored(files, tmp_path, monkeypatch):
    out = tmp_path / 'out'
    save, calls = sample.save_images, []

    def interrupted(*args):  # Ctrl-C after the first batch's images
        if calls:
            raise KeyboardInterrupt
        calls.append(save(*args))
    monkeypatch.setattr(sample, 'save_images', interrupted)
    with pytest.raises(KeyboardInterrupt):
        sample.main(S[:1] + [str(files / 'img.pt'), '--nfe', '3', '--seeds', '0-5', '--batch', '2', '--quiet',
                             '--outdir', str(out)])
    marker = json.loads((out / data.SAMPLE_SET).read_text())
    assert marker['complete'] is False and len(data.image_files(out)) == 2
    with pytest.raises(ValueError, match='unfinished sample set'):
        data.ImageZipDataset(out)
    monkeypatch.setattr(sample, 'save_images', save)
    with pytest.raises(ValueError, match='already holds 2 images'):  # resampling into it is refused too
        sample.main(['--model', str(files / 'img.pt'), '--nfe', '3', '--seeds', '0-5', '--outdir', str(out)])
    shutil.rmtree(out)
    sample.main(['--model', str(files / 'img.pt'), '--nfe', '3', '--seeds', '0-5', '--batch', '2', '--quiet',
                 '--outdir', str(out)])
    marker = json.loads((out / data.SAMPLE_SET).read_text())
    assert marker['complete'] is True and marker['count'] == 6 and marker['image_shape'] == [3, 8, 8]
    assert marker['model'] == str(files / 'img.pt') and marker['seeds'] == '0-5'
    assert len(data.ImageZipDataset(out)) == 6  # complete: scored
    assert len(data.ImageZipDataset(files / 'imgs')) == 4  # a folder without our marker: a data set


def test_reference_statistics_record_size_and_count_and_old_ones_warn(files, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fid, 'load_inception', lambda *args, **kwargs: FakeInception())
    rng = np.random.default_rng(0)
    folder = tmp_path / 'data'
    for i in range(2100):
        png(folder / f'{i // 1000:06d}' / f'{i:06d}.png', int(rng.integers(1 << 30)))
    fid.main(['ref', '--data', str(folder), '--dest', str(tmp_path / 'ref.npz'), '--workers', '0', '--batch', '700'])
    ref = fid.load_stats(tmp_path / 'ref.npz')
    assert ref['image_size'] == (8, 8) and ref['num_images'] == 2100
    assert '2100 images' in capsys.readouterr().out
    stats = {**ref, 'protocol': 'edm'}
    old = tmp_path / 'old.npz'  # a file from before sizes were recorded
    np.savez(old, mu=ref['mu'], sigma=ref['sigma'], num_images=2100, protocol=fid.PROTOCOLS['edm'])
    fid.save_stats(tmp_path / 'mine.npz', stats)
    with pytest.warns(UserWarning, match='old.npz records no image size'):
        value = fid.main(['calc', '--images', str(tmp_path / 'mine.npz'), '--ref', str(old)])
    assert value == pytest.approx(0, abs=1e-6)
    # EDM's published files record no size, but their names do: cifar10-32x32 is of 32x32 images
    monkeypatch.setattr(fid.data, 'download', lambda url, sha256=None: old)
    assert fid.load_reference('cifar10-32x32')['image_size'] == (32, 32)
    with pytest.raises(ValueError, match='the images are 8x8, but the reference cifar10-32x32 is of 32x32'):
        fid.main(['calc', '--images', str(tmp_path / 'mine.npz'), '--ref', 'cifar10-32x32'])


# ---------------------------------------------------------------------------------------------
# 4. Nonsense that used to succeed
# ---------------------------------------------------------------------------------------------

P = ['prdc', '--images', '{d}/imgs', '--ref-images', '{d}/imgs']
NONSENSE_ROWS = [
    ('fid', P + ['--k', '0'], 2, '--k 0: PRDC needs 1 <= k < --num'),
    ('fid', P + ['--k', '-3'], 2, '--k -3'),
    ('fid', P + ['--k', '10', '--num', '10'], 2, '--k 10: PRDC needs 1 <= k < --num (10)'),
    ('fid', P + ['--k', '5'], 2, '--k 5: PRDC needs more than k images in each set, got 4 generated and 4 real'),
    ('fid', P + ['--num', '0'], 2, '--num 0: must be at least 1'),
    ('fid', P + ['--batch', '0'], 2, '--batch 0: must be at least 1'),
    ('fid', ['calc', '--images', '{d}/big16.npz', '--ref', '{d}/ref8.npz', '--batch', '-1'], 2, '--batch -1'),
    ('fid', ['ref', '--data', 'cifar10', '--dest', '{d}/r.npz', '--batch', '0'], 2, '--batch 0'),
    ('fid', ['calc', '--images', '{d}/big16.npz', '--ref', '{d}/ref8.npz', '--splits', '0'], 2, '--splits 0'),
    ('fid', ['calc', '--images', '{d}/big16.npz', '--ref', '{d}/ref8.npz', '--workers', '-1'], 2, '--workers -1'),
    ('fid', ['calc', '--images', '{d}/big16.npz', '--ref', '{d}/ref8.npz', '--device', 'cuda:7'] *
     (torch.cuda.device_count() < 8), 2, '--device cuda:7'),
    # a non-finite number is never a result
    ('fid', ['calc', '--images', '{d}/nan-stats.npz', '--ref', '{d}/ref8.npz'], 2,
     'the image statistics hold NaN or inf values'),
    ('fid', ['calc', '--images', '{d}/ref8.npz', '--ref', '{d}/nan-stats.npz'], 2,
     'the reference statistics hold NaN or inf values'),
]


@pytest.mark.parametrize('script, argv, status, message', NONSENSE_ROWS)
def test_nonsense_is_refused_not_computed(files, capsys, no_slow_work, script, argv, status, message):
    check_row(files, capsys, script, argv, status, message)


def test_non_finite_scores_raise_instead_of_returning():
    nan = np.full(4, np.nan)
    with pytest.raises(FloatingPointError, match='the Frechet distance is nan'):
        fid.frechet_distance(nan, np.eye(4), np.zeros(4), np.eye(4))
    with pytest.raises(FloatingPointError, match='PRDC is not finite'):
        fid.prdc(np.random.default_rng(0).standard_normal((20, 3)), np.full((20, 3), np.nan), k=2)
    with pytest.raises(ValueError, match='--k 0'):
        fid.prdc(np.zeros((20, 3)), np.zeros((20, 3)), k=0)

    class NaNFeatures(FakeInception):
        def forward(self, x, protocol='edm'):
            return super().forward(x)[0] * np.nan, None
    with pytest.raises(FloatingPointError, match='non-finite features'):
        fid.compute_features(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), NaNFeatures(), progress=False)


def stage_two_student(path, stochastic):
    """A (random) stage-two guided student file, as guided_pd_run writes one."""
    net = toy.toy_net(label_dim=3, width=16, depth=1).enable_guidance_condition()
    models.save_model(path, net, kind='guided-stage2', N=2, stochastic=stochastic, shape=[2],
                      sampling=guided_pd.sampling_recipe(2, stochastic, 0.002, 80.0))


def test_stochastic_sampler_on_a_deterministic_student_is_warned_about(files, tmp_path):
    """--stochastic belongs to a teacher or a stage-two student distilled for it (Meng Alg. 4); an
    SFD student (Euler over its own grid) or a DDIM stage-two student was not trained for it."""
    stage_two_student(tmp_path / 'sto.pt', True)
    stage_two_student(tmp_path / 'ddim.pt', False)
    run = lambda model, *more: sample.main(['--model', str(model), '--stochastic', '--seeds', '0-3', '--quiet',
                                            '--npz', str(tmp_path / 's.npz'), *more])
    for model, name, more in ((files / 'run' / 'student.pt', 'sfd', []), (tmp_path / 'ddim.pt', 'guided-stage2',
                                                                        ['--guidance', '1'])):
        with pytest.warns(UserWarning, match=f'--stochastic: this {name} student was distilled for its '
                                             'deterministic euler grid') as caught:
            run(model, *more)
        assert all('\n' not in str(w.message) for w in caught)  # one line
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        run(tmp_path / 'sto.pt', '--guidance', '1')  # trained for it: silent
        run(files / 'teacher.pt', '--nfe', '4')  # a teacher takes any sampler


# ---------------------------------------------------------------------------------------------
# 5. User errors that used to end in a traceback
# ---------------------------------------------------------------------------------------------

TRACEBACK_ROWS = [
    ('models', ['{d}/missing.pt'], 2, "unknown model '{d}/missing.pt' (no such file): expected toy:<name>"),
    ('models', ['cifar100'], 2, "unknown model 'cifar100': expected toy:<name>[:cond]"),
    ('models', ['toy:spiral'], 2, "unknown toy spec 'toy:spiral'"),
    ('models', ['{d}/random.pt'], 2, 'random.pt is not a readable model file'),
    ('models', ['{d}/teacher.pt', '--device', 'cuda'] * (not torch.cuda.is_available()), 2,
     '--device cuda: no CUDA GPU is visible'),
    ('models', ['{d}/teacher.pt', '--device', 'tpu'], 2, '--device tpu'),
    ('toy', ['ring', '--device', 'cuda'] * (not torch.cuda.is_available()), 2, '--device cuda: no CUDA GPU'),
    ('toy', ['spiral'], 2, "invalid choice: 'spiral'"),
    ('toy', ['ring', '--real-npz', '{d}/r.npz'], 2, '--real-npz needs an image world'),
    ('toy', ['cifar10-16', '--real-npz', '{d}/r.png'], 2, '--real-npz {d}/r.png: an npz of images needs a name'),
    # offline (a file:// URL that is not there stands for an unreachable server): one line, where to put it
    ('models', ['file:///nowhere/edm-x.pkl'], 2, 'If this machine is offline, fetch the file elsewhere and put it at'),
    ('distill', ['--teacher', 'file:///nowhere/edm-x.pkl', '--device', 'cpu'], 2, 'If this machine is offline'),
    ('fid', ['calc', '--images', '{d}/big16.npz', '--ref', 'file:///nowhere/ref.npz'], 2, 'put it at'),
    ('fid', ['calc', '--images', '{d}/big16.npz', '--ref', '{d}/teacher.pt'], 2, 'teacher.pt holds no FID statistics'),
    ('fid', ['calc', '--images', '{d}/big16.npz', '--ref', '{d}/random.pt'], 2, 'random.pt is not a readable .npz'),
    ('fid', ['calc', '--images', '{d}/random.pt', '--ref', '{d}/ref8.npz'], 2,
     '{d}/random.pt is neither a folder nor a readable zip of images'),
    # a corrupt image: the error names the file (in the main process and in a DataLoader worker)
    ('fid', P[:2] + ['{d}/corrupt', '--ref-images', '{d}/imgs', '--k', '1', '--workers', '0'], 2,
     '{d}/corrupt/zz.png is not an image PIL can read'),
    ('fid', P[:2] + ['{d}/corrupt', '--ref-images', '{d}/imgs', '--k', '1', '--workers', '1'], 2,
     '{d}/corrupt/zz.png is not an image PIL can read'),
]


@pytest.mark.parametrize('script, argv, status, message', TRACEBACK_ROWS)
def test_user_errors_that_were_tracebacks(files, capsys, monkeypatch, script, argv, status, message):
    monkeypatch.setattr(fid, 'load_inception', lambda *args, **kwargs: FakeInception())
    check_row(files, capsys, script, argv, status, message)


def test_models_help_lists_every_spec_form(capsys):
    with pytest.raises(SystemExit) as e:
        models.main(['-h'])
    out = ' '.join(capsys.readouterr().out.split())
    assert e.value.code == 0
    for kind, (form, _, _) in models.KINDS.items():
        assert f'{kind} {" ".join(form.split())}' in out


def test_corrupt_images_name_the_file(tmp_path):
    zpath = tmp_path / 'ds.zip'
    with zipfile.ZipFile(zpath, 'w') as z:
        z.writestr('a.png', (ROOT / 'tests' / 'test_errors.py').read_bytes()[:100])
    for path, where in ((zpath, f'a.png in {zpath}'), (tmp_path / 'x.zip', f'{tmp_path / "x.zip"}')):
        if not path.exists():
            path.write_bytes(b'not a zip')
        with pytest.raises(ValueError, match=f'^{where} is (not an image|neither a folder nor a readable zip)'):
            data.ImageZipDataset(path)


def test_models_py_as_a_script_is_one_line(files):
    """The real `python models.py SPEC`, not only its main()."""
    result = subprocess.run([sys.executable, str(ROOT / 'models.py'), str(files / 'missing.pt')],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count('\n') == 1
    assert result.stderr.startswith("models.py: error: unknown model")
