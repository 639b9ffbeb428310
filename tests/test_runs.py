"""Runs are never lost: run folders are claimed under their lock, numbered atomically, checked
before the teacher is loaded; a run that dies before its first snapshot blocks no retry; settings
that a method would ignore are refused (issue 23's classes for training runs)."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import ROOT

import cli
import distill
import models
import toy


@pytest.fixture(scope='module')
def teacher_file(tmp_path_factory):
    d = tmp_path_factory.mktemp('runs')
    torch.manual_seed(0)
    models.save_model(d / 'teacher.pt', toy.toy_net(width=16, depth=1), shape=[2], kind='tiny')
    return d / 'teacher.pt'


def quick(teacher, run_dir, **kw):
    return ['--teacher', str(teacher), '--kimg', '0.064', '--batch', '32', '--lr', '1e-4', '--quiet',
            '--device', 'cpu', '--eval-n', '0', '--run-dir', str(run_dir), *sum(([f'--{k}', str(v)]
                                                                                  for k, v in kw.items()), [])]


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.run(distill.main, argv)
        raise SystemExit(0)
    return e.value.code, capsys.readouterr().err


def test_a_second_run_into_a_held_folder_is_refused_before_loading(teacher_file, tmp_path, capsys):
    """Run A holds its folder (from before its teacher is loaded to its end); run B into the same
    folder is refused at once and A's files are untouched."""
    holder = textwrap.dedent(f'''
        import sys, time; sys.path.insert(0, {str(ROOT)!r})
        import cli
        with cli.run_folder({str(tmp_path / "conc")!r}, 'x'):
            print('held', flush=True); time.sleep(30)
    ''')
    a = subprocess.Popen([sys.executable, '-c', holder], stdout=subprocess.PIPE, text=True)
    try:
        assert a.stdout.readline().strip() == 'held'
        code, err = run_cli(quick(teacher_file, tmp_path / 'conc'), capsys)
        assert code == 2 and 'being written by another process' in err and len(err.strip().splitlines()) == 1
        assert sorted(p.name for p in (tmp_path / 'conc').iterdir()) == ['.lock']
    finally:
        a.kill()
        a.wait()


def test_numbered_folders_are_allocated_atomically(tmp_path, monkeypatch):
    """Two runs that compute the same next number get two folders (mkdir is the arbiter)."""
    (tmp_path / '00000-a').mkdir()
    first = cli._allocate(tmp_path, 'a')
    real, calls = cli.new_run_dir, []
    monkeypatch.setattr(cli, 'new_run_dir', lambda root, name: (calls.append(1), first if len(calls) == 1
                                                                 else real(root, name))[1])
    second = cli._allocate(tmp_path, 'a')  # its first guess is already taken
    assert first.name == '00001-a' and second.name == '00002-a' and len(calls) == 2


def test_a_run_that_died_before_its_first_snapshot_blocks_no_retry(teacher_file, tmp_path, capsys):
    nan = toy.toy_net(width=16, depth=1)
    with torch.no_grad():
        nan.model.out.bias.fill_(float('nan'))
    models.save_model(tmp_path / 'nan.pt', nan, shape=[2], kind='tiny')
    code, err = run_cli(quick(tmp_path / 'nan.pt', tmp_path / 'r'), capsys)
    assert code == 2 and 'non-finite' in err and not (tmp_path / 'r' / 'training-state.pt').exists()
    code, err = run_cli(quick(teacher_file, tmp_path / 'r'), capsys)  # the same folder, a good teacher
    assert code == 0, err
    rows = [json.loads(line) for line in open(tmp_path / 'r' / 'stats.jsonl')]
    assert rows and rows[-1]['kimg'] == pytest.approx(0.064)
    code, err = run_cli(['--resume', str(tmp_path / 'empty')], capsys)
    assert code == 2 and 'no training-state.pt' in err


@pytest.mark.parametrize('argv, message', [
    (['--kimg', '0.0001'], '--kimg 0.0001: must be at least 0.001'),
    (['--snapshot-kimg', '1e-9'], '--snapshot-kimg 1e-09: must be at least 0.001'),
    (['--method', 'sfd-v', '--nfe', '3'], '--nfe is not used by --method sfd-v'),
    (['--nfe-list', '2,3'], '--nfe-list is not used by --method sfd'),
    (['--data', 'x.zip'], '--data is not used by --method sfd'),
])
def test_settings_that_cannot_mean_anything_are_refused(teacher_file, tmp_path, capsys, argv, message):
    code, err = run_cli(quick(teacher_file, tmp_path / 'x') + argv, capsys)
    assert code == 2 and message in err and not (tmp_path / 'x').exists()


def test_an_impossible_run_folder_fails_before_the_teacher_is_loaded(teacher_file, tmp_path, capsys,
                                                                     monkeypatch):
    (tmp_path / 'file').write_text('in the way')
    loaded = []
    monkeypatch.setattr(models, 'load', lambda *a, **k: loaded.append(a))
    code, err = run_cli(quick(teacher_file, tmp_path / 'file' / 'run'), capsys)
    assert code == 2 and 'cannot write there' in err and not loaded


def test_pairings_that_cannot_be_meant(teacher_file, tmp_path, capsys):
    """A student as a fine-grid teacher: one warning line; a student whose samples are not finite
    (levels far beyond its teacher's): no table of inf, an error; a guidance partner of another
    world (other sample shape): refused before training."""
    code, err = run_cli(quick(teacher_file, tmp_path / 'first'), capsys)
    assert code == 0, err
    with pytest.warns(UserWarning) as record:
        code, err = run_cli(quick(tmp_path / 'first' / 'student.pt', tmp_path / 'again'), capsys)
    warns = [str(w.message) for w in record if 'student' in str(w.message)]
    assert code == 0 and len(warns) == 1 and 'is a sfd student' in warns[0] and '--method second-stage' in warns[0]
    student, meta = models.load_model(tmp_path / 'first' / 'student.pt')
    with torch.no_grad():
        student.model.out.bias.fill_(float('inf'))  # what levels far beyond a teacher's range give
    with pytest.raises(FloatingPointError, match='student at 2 NFE gives non-finite samples'):
        toy.before_after_table('ring', student, meta, models.load_model(teacher_file)[0], n=16, ref_steps=8)
    import guided_pd
    import unet
    models.save_model(tmp_path / 'cond.pt', toy.toy_net(label_dim=3, width=16, depth=1), shape=[2])
    models.save_model(tmp_path / 'img.pt', unet.EDMPrecond(img_resolution=8, img_channels=3, model_channels=16,
                                                           channel_mult=[1], num_blocks=1, attn_resolutions=[]))
    with pytest.raises(SystemExit) as e:
        cli.run(guided_pd.main, ['stage1', '--teacher', str(tmp_path / 'cond.pt'), '--uncond', str(tmp_path / 'img.pt'),
                                 '--kimg', '0.016', '--batch', '8', '--device', 'cpu', '--quiet',
                                 '--run-dir', str(tmp_path / 'g')])
    assert e.value.code == 2 and "the teacher's unconditional twin" in capsys.readouterr().err


def test_a_run_that_fails_before_writing_leaves_no_empty_numbered_folder(tmp_path):
    """A mistyped teacher must not litter runs/ with empty numbered folders; a folder the user named,
    or one the run already wrote into, stays."""
    root = tmp_path / 'runs'
    with pytest.raises(ValueError, match='no teacher'):
        with cli.run_folder('', 'sfd-x', root=str(root)):
            raise ValueError('no teacher')
    assert list(root.iterdir()) == []
    with pytest.raises(KeyboardInterrupt):
        with cli.run_folder('', 'sfd-x', root=str(root)) as path:
            (path / 'stats.jsonl').write_text('{}\n')
            raise KeyboardInterrupt
    assert [p.name for p in root.iterdir()] == [path.name] and (path / 'stats.jsonl').is_file()
    named = tmp_path / 'mine'
    named.mkdir()
    with pytest.raises(ValueError):
        with cli.run_folder(str(named), 'sfd-x'):
            raise ValueError('no teacher')
    assert named.is_dir()
