"""Tests for model_cards.py: the README.md every run writes beside its student (an EDM-format run
folder, a diffusers student folder), its front matter read back line by line, FID added by
`fid.py calc --card` keeping the rest, and the licence followed back to the first teacher.
"""
import importlib.util
import json

import numpy as np
import pytest
import torch
from test_fid import _images, fake_cli  # noqa: F401 (a fixture)

import distill
import fid
import model_cards
import models
import unet


def front_matter(path):
    """The front matter of a card as a dict: every line `key: value`, each value JSON (YAML flow style)."""
    text = path.read_text()
    assert text.startswith('---\n')
    head, body = text[4:].split('\n---\n', 1)
    out = {}
    for line in head.splitlines():
        key, _, value = line.partition(': ')
        out[key] = json.loads(value)
    return out, body


@pytest.fixture
def toy_run(tmp_path):
    """A 2-iteration SFD run on a tiny random EDM-style image teacher of ours (no download)."""
    torch.manual_seed(0)
    net = unet.EDMPrecond(img_resolution=8, img_channels=3, model_channels=16, channel_mult=[1, 2],
                          num_blocks=1, attn_resolutions=[4])
    models.save_model(tmp_path / 'teacher.pt', net)
    cfg = distill.apply_defaults(distill.SFDConfig(teacher=str(tmp_path / 'teacher.pt'), batch=4, kimg=0.008,
                                                   run_dir=str(tmp_path / 'run'), device='cpu'))
    distill.distill(cfg, progress=False, log=lambda *_: None)
    return tmp_path / 'run'


def test_card_of_a_run_and_fid_into_it(toy_run, fake_cli, tmp_path, capsys):  # noqa: F811
    head, body = front_matter(toy_run / 'README.md')
    f = head['diffdistill']
    assert head['license'] == 'other' and 'declares no licence' in f['license_note']  # our own teacher
    assert head['library_name'] == 'pytorch' and 'sfd' in head['tags'] and 'model-index' not in head
    assert head['pipeline_tag'] == 'unconditional-image-generation'
    assert f['model'].endswith('student.pt') and f['nfe'] == 2 and f['kimg'] == pytest.approx(0.008)
    assert f['recipe']['solver'] == 'euler' and f['recipe']['afs'] is True and f['train_seconds'] > 0
    assert f"python sample.py --model {f['model']}" in body and 'None measured yet' in body
    # fid.py calc --card: the FID and its protocol go in; nothing else changes; a second FID replaces it.
    ref = tmp_path / 'ref.npz'
    fid.main(['ref', '--data', 'cifar10', '--dest', str(ref), '--workers', '0'])
    np.savez(tmp_path / 's.npz', images=_images(2100, 17))
    model_cards.add_metric(toy_run, 'metric-a', 0.05, 'metric A', 'a test value', nfe=2)
    args = ['calc', '--images', str(tmp_path / 's.npz'), '--ref', str(ref), '--workers', '0',
            '--card', str(toy_run)]
    value = fid.main(args)
    fid.main(args)
    assert 'FID written into the model card' in capsys.readouterr().out
    head2, body2 = front_matter(toy_run / 'README.md')
    metrics = head2['diffdistill'].pop('metrics')
    assert [m['name'] for m in metrics] == ['metric A', 'FID (edm protocol)']
    assert metrics[1]['value'] == pytest.approx(value) and '2100 images vs ref' in metrics[1]['protocol']
    f.pop('metrics')
    assert head2['diffdistill'] == f  # everything else as the run wrote it
    scores = head2['model-index'][0]['results']
    assert [r['metrics'][0]['type'] for r in scores] == ['metric-a', 'fid']
    assert f'| FID (edm protocol) | {value:.4g} |' in body2
    with pytest.raises(ValueError, match='no model card of this project there'):
        fid.main(['calc', '--images', str(tmp_path / 's.npz'), '--ref', str(ref), '--card', str(tmp_path)])


def test_metric_a_rows_of_the_before_after_table():
    table = ('NFE  method            RMSE (A)\n  -  teacher ODE         0.0000\n'
             '  2  student             0.0492\n  2  DPM-Solver++(3M)    0.1234\n'
             '  3  first stage         0.0700')
    assert [(m['nfe'], m['value']) for m in model_cards.table_metrics(table, 500)] == [(2, 0.0492)]


def test_licences_follow_the_teacher(tmp_path):
    lic = lambda spec: model_cards.licence(spec, models.kind_of, models.stored_meta)[0]
    assert lic('cifar10') == lic('https://host/edm-ffhq-64x64-uncond-vp.pkl') == 'cc-by-nc-sa-4.0'
    assert lic('stable-diffusion-v1-5/stable-diffusion-v1-5') == 'creativeml-openrail-m'
    assert lic('toy:ring') == 'other' and lic('some/unknown-model') == 'other'
    net = unet.EDMPrecond(img_resolution=8, img_channels=3, model_channels=16, channel_mult=[1], num_blocks=1,
                          attn_resolutions=[])
    models.save_model(tmp_path / 'first.pt', net, teacher='cifar10', method='sfd')
    models.save_model(tmp_path / 'second.pt', net, teacher=str(tmp_path / 'first.pt'), method='second-stage')
    assert lic(str(tmp_path / 'second.pt')) == 'cc-by-nc-sa-4.0'  # a student of a student of EDM


@pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ('diffusers', 'transformers')),
                    reason='the optional extra is not installed')
@pytest.mark.filterwarnings('ignore:.*accelerate.*')
def test_card_of_a_diffusers_student(tmp_path):
    """A tiny SD student folder: a card inside, the licence from its base folder's own card, the stock
    pipeline's three lines."""
    from diffusers import StableDiffusionPipeline
    from test_distill_latent import _parts
    from test_pipelines import _sfd_recipe

    import hub
    StableDiffusionPipeline(**_parts(), safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(tmp_path / 'sd')
    (tmp_path / 'sd' / 'README.md').write_text('---\nlicense: creativeml-openrail-m\n---\n# a base\n')
    net = hub.load(tmp_path / 'sd')[0]
    folder = models.save_student(tmp_path / 'run', 'student', net, prior='edm',
                                 sampling=_sfd_recipe(net, 2, False), method='sfd',
                                 teacher=str(tmp_path / 'sd'), kimg=1.0)
    head, body = front_matter(folder / 'README.md')
    assert head['license'] == 'creativeml-openrail-m' and head['library_name'] == 'diffusers'
    assert head['pipeline_tag'] == 'text-to-image' and head['diffdistill']['stock_pipeline'] == 'direct'
    assert 'StudentScheduler.from_pretrained' in body and 'num_inference_steps=2' in body
    assert models.load(folder)[1]['method'] == 'sfd'  # the card does not disturb the folder


def test_clip_score_into_a_card(tmp_path, monkeypatch, capsys):
    """`captions.py clip-score --card` (open_clip replaced by a fixed score): the metric goes in."""
    import captions
    model_cards.write_card(tmp_path, dict(teacher='toy:ring', method='sfd', sampling={'nfe': 2}, kimg=1.0),
                           'student.pt')
    np.savez(tmp_path / 'x.npz', images=np.zeros((2, 8, 8, 3), np.uint8))
    (tmp_path / 'p.txt').write_text('a cat\n')
    monkeypatch.setattr(captions, 'clip_score', lambda images, prompts, **_: 0.3125)
    captions.main(['clip-score', '--images', str(tmp_path / 'x.npz'), '--prompts', str(tmp_path / 'p.txt'),
                   '--device', 'cpu', '--card', str(tmp_path), '--card-nfe', '2'])
    (m,) = model_cards.read_card(tmp_path)['metrics']
    assert (m['type'], m['value'], m['nfe']) == ('clip-score', 0.3125, 2)
    assert '2 images of p.txt' in m['protocol']
