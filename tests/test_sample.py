"""Tests for sample.py: EDM's seeding and sampler, the true NFE, students' stored sampling,
guidance, every output format, torchrun's seed split and clear errors.

Models are tiny random U-Nets and untrained toy MLPs saved in temporary folders; nothing is
trained or downloaded. Parity with NVIDIA's generate.py itself was checked outside the suite.
"""
import dataclasses
import json
import math
import os
import runpy
import socket
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image

import models
import fid
import sample
import solvers
import toy
import unet

TINY = dict(img_resolution=8, img_channels=3, model_channels=16, channel_mult=[1, 2], num_blocks=1,
            attn_resolutions=[4], dropout=0.0)
FEW = solvers.Recipe(nfe=3)  # Heun, 2 timestamps + 0: one Heun and one Euler step


def tiny(label_dim=0, seed=0):
    """A tiny U-Net with every weight random (EDM's zero-initialised outputs would hide bugs)."""
    torch.manual_seed(seed)
    net = unet.EDMPrecond(**TINY, label_dim=label_dim).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) / math.sqrt(p[0].numel() if p.ndim > 1 else 9))
    return net


class Calls:
    """Records every call of a network: its noise levels and conditions."""

    def __init__(self, net):
        self.calls = []
        net.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.calls.append(dict(kwargs, sigma=torch.as_tensor(args[1]).clone()))


def edm_latents(seed, shape, label_dim=0):
    """EDM generate.py's draws, written out here: randn(shape), then a class, from one generator."""
    g = torch.Generator().manual_seed(seed % 2 ** 32)
    z = torch.randn(shape, generator=g)
    return z, (int(torch.randint(label_dim, size=[], generator=g)) if label_dim else None), g


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """Model files of ours: an unconditional and a conditional teacher, and an untrained toy MLP."""
    d = tmp_path_factory.mktemp('models')
    models.save_model(d / 'uncond.pt', tiny())
    models.save_model(d / 'cond.pt', tiny(label_dim=4, seed=1))
    torch.manual_seed(2)
    models.save_model(d / 'toy.pt', toy.toy_net(label_dim=3, width=32, depth=2))
    return d


# ---------------------------------------------------------------------------------------------
# Seeds and EDM's default sampler
# ---------------------------------------------------------------------------------------------

def test_parse_seeds():
    """EDM's seed syntax: comma-separated integers and inclusive ranges; anything else refused."""
    assert sample.parse_seeds('0-3,7') == [0, 1, 2, 3, 7]
    assert sample.parse_seeds('5') == [5] and sample.parse_seeds(' 2 - 3 ') == [2, 3]
    for bad in ('3-1', 'a', '', '1,,2', '-4', '1-2-3'):
        with pytest.raises(ValueError, match='bad seed list'):
            sample.parse_seeds(bad)


def test_default_is_edms_sampler_from_edms_latents():
    """35 NFE = EDM's Heun over 18 timestamps and a final 0, written out independently here
    (Karras et al. Alg. 1 without churn; schedule Eq. 5), from EDM's per-seed latents."""
    net = tiny()
    seeds = [0, 3, 2 ** 32 + 3]  # seeds are taken mod 2^32, as EDM does
    calls = Calls(net)
    x = sample.generate(net, seeds, sample.resolve_sampling({}), progress=False, raw=True)
    assert len(calls.calls) == 35
    i = torch.arange(18, dtype=torch.float64)
    t = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    t = torch.cat([t, torch.zeros(1, dtype=torch.float64)])
    x_ref = torch.stack([edm_latents(s, [3, 8, 8])[0] for s in seeds]).double() * t[0]
    with torch.no_grad():
        for k in range(18):
            d = (x_ref - net(x_ref.float(), t[k]).double()) / t[k]
            x_next = x_ref + (t[k + 1] - t[k]) * d
            if k < 17:  # the last step, to t = 0, is Euler
                d2 = (x_next - net(x_next.float(), t[k + 1]).double()) / t[k + 1]
                x_next = x_ref + (t[k + 1] - t[k]) * (d + d2) / 2
            x_ref = x_next
    torch.testing.assert_close(x, x_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(x[1], x[2], rtol=0, atol=0)
    assert x.std() > 0.1  # a non-trivial image
    u = sample.generate(net, seeds, sample.resolve_sampling({}), progress=False)
    assert u.dtype == torch.uint8 and torch.equal(u, (x * 127.5 + 128).clip(0, 255).to(torch.uint8))


def test_a_seeds_image_does_not_depend_on_the_batch():
    """Same noise and label per seed in any batch; in float64 the images agree to round-off.
    (A float32 network's batched arithmetic may round differently per batch size, by ~1e-4 here.)"""
    net = tiny(label_dim=4, seed=1).double()  # conditional: labels come from the per-seed generators
    seeds = [0, 1, 2, 7, 1000, 31]
    runs = [sample.generate(net, seeds, FEW, batch=b, progress=False, raw=True, return_labels=True)
            for b in (1, 4, 6)]
    for x, y in runs[1:]:
        torch.testing.assert_close(x, runs[0][0], rtol=0, atol=1e-10)
        assert torch.equal(y, runs[0][1])
    alone = sample.generate(net, [7], FEW, progress=False, raw=True)
    torch.testing.assert_close(alone[0], runs[0][0][3], rtol=0, atol=1e-10)
    assert runs[0][1].tolist() == [edm_latents(s, [3, 8, 8], 4)[1] for s in seeds]


def test_class_fixes_the_label_and_changes_the_image():
    """--class replaces every drawn label by one class; the network sees it and the image changes."""
    net = tiny(label_dim=4, seed=1)
    calls = Calls(net)
    x, y = sample.generate(net, [0, 1, 2], FEW, class_idx=2, progress=False, raw=True, return_labels=True)
    assert y.tolist() == [2, 2, 2]
    assert all(torch.equal(c['class_labels'], torch.eye(4)[[2, 2, 2]]) for c in calls.calls)
    other = sample.generate(net, [0, 1, 2], FEW, class_idx=3, progress=False, raw=True)
    assert (x - other).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# The NFE actually used is the one printed
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('solver, nfe', [('heun', 35), ('heun', 7), ('dpm2', 5), ('euler', 4),
                                         ('ipndm', 4), ('dpmpp3m', 5)])
def test_counted_calls_equal_the_printed_nfe(files, solver, nfe, capsys):
    """The plan's NFE, the printed NFE and the counted network calls agree for every solver;
    single-step solvers end at t = 0 as EDM does, multistep ones at t_min."""
    net = tiny()
    calls = Calls(net)
    s = sample.resolve_sampling({}, nfe, solver=solver)
    plan = sample.make_plan(net, s)
    sample.generate(net, [5], s, progress=False)
    assert plan.nfe == nfe == len(calls.calls) and f'NFE {nfe} per image' in plan.describe()
    assert (float(plan.t_steps[-1]) == 0) == (solver in ('heun', 'dpm2', 'euler'))
    sample.main(['--model', str(files / 'uncond.pt'), '--solver', solver, '--nfe', str(nfe), '--seeds', '0',
                 '--npz', str(files / f'{solver}.npz'), '--quiet'])
    assert f'NFE {nfe} per image' in capsys.readouterr().out


def test_an_impossible_nfe_is_refused_with_the_solvers_message():
    with pytest.raises(ValueError, match='heun cannot use exactly 4 NFE'):  # 2n - 1 ending at 0: odd
        sample.make_plan(tiny(), sample.resolve_sampling({}, 4))


def test_classifier_free_guidance_costs_two_calls_per_evaluation():
    """A conditional model with --guidance w: D_w at two calls per evaluation, reported as such."""
    net = tiny(label_dim=4, seed=1)
    calls = Calls(net)
    s = solvers.Recipe(nfe=5)
    w = 1.5
    x = sample.generate(net, [0, 1], s, guidance=w, progress=False, raw=True)
    plan = sample.make_plan(net, s, guidance=w)
    assert plan.nfe == 10 == len(calls.calls) and 'guidance w=1.5' in plan.describe()
    null = [c for c in calls.calls if not c['class_labels'].any()]
    assert len(null) == 5  # every evaluation: one conditional, one null-label call
    # D_w = (1 + w) D_c - w D_u, integrated by the same solver (Meng Sec. 2).
    z = torch.stack([edm_latents(s_, [3, 8, 8], 4)[0] for s_ in (0, 1)]).double()
    y = torch.eye(4)[[edm_latents(s_, [3, 8, 8], 4)[1] for s_ in (0, 1)]]
    D_w = lambda x_, t, **c: ((1 + w) * net(x_.float(), t, class_labels=y)
                              - w * net(x_.float(), t, class_labels=0 * y))
    ref = solvers.sample(D_w, 80 * z, solvers.schedule_for(s)[0], 'heun')
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-5)
    # An unconditional model as the unconditional branch (EDM's cond. CIFAR-10 had no label dropout).
    uncond = tiny(seed=3)
    u_calls, calls.calls = Calls(uncond), []
    sample.generate(net, [0], s, guidance=w, uncond=uncond, progress=False)
    assert len(calls.calls) == len(u_calls.calls) == 5
    # w = 0 is the conditional model itself: no second call is spent on it.
    calls.calls = []
    x0 = sample.generate(net, [0, 1], s, guidance=0, progress=False, raw=True)
    assert len(calls.calls) == 5 and sample.make_plan(net, s, guidance=0).nfe == 5
    torch.testing.assert_close(x0, sample.generate(net, [0, 1], s, progress=False, raw=True), rtol=0, atol=0)


def test_a_guided_student_takes_w_as_input_at_one_call_per_evaluation():
    """Meng's distilled student has w as a network input: no second (unconditional) call."""
    net = tiny(label_dim=4, seed=1).enable_guidance_condition()
    calls = Calls(net)
    sample.generate(net, [0, 1], FEW, guidance=2.0, progress=False)
    assert len(calls.calls) == 3 and all(float(c['guidance']) == 2.0 for c in calls.calls)
    with pytest.raises(ValueError, match='pass --guidance w'):
        sample.generate(net, [0], FEW, progress=False)


@pytest.mark.parametrize('solver', ['stochastic', 'euler'])
def test_a_stage_two_guided_student_samples_its_stored_grid(solver, tmp_path):
    """guided_pd.py's students store their grid (sigma of Meng's cosine schedule, ending at 0)
    and their sampler: N calls at the grid's first N points, w as an input, no other NFE."""
    grid = [80.0, 2.3549, 0.9896, 0.4123, 0.0]
    net = tiny(label_dim=4, seed=5).enable_guidance_condition()
    models.save_model(tmp_path / 's.pt', net, kind='guided-stage2', N=4, stochastic=solver == 'stochastic',
                    sampling=dict(solver=solver, nfe=4, afs=False, schedule='cosine', t_min=0.002, t_max=80.0,
                                  ends_at_zero=True, t_steps=grid))
    net, meta = models.load(tmp_path / 's.pt')
    calls = Calls(net)
    s = sample.resolve_sampling(meta)
    plan = sample.make_plan(net, s, guidance=0.5)
    x = sample.generate(net, [0, 1], s, guidance=0.5, progress=False, raw=True)
    assert plan.nfe == len(calls.calls) == 4 and all(float(c['guidance']) == 0.5 for c in calls.calls)
    torch.testing.assert_close(torch.stack([c['sigma'][0] for c in calls.calls]),
                               torch.tensor(grid[:4], dtype=torch.float64), rtol=0, atol=0)
    assert x.isfinite().all()
    with pytest.raises(ValueError, match='stored grid at NFE 4 only'):
        sample.make_plan(net, s, nfe=2, guidance=0.5)
    with pytest.raises(ValueError, match='cannot be changed'):
        sample.resolve_sampling(meta, t_min=0.01)


def test_stochastic_sampler_uses_each_seeds_own_generator():
    """Meng's N-step sampler draws its fresh noise from each image's generator, after the latents."""
    net = tiny()
    calls = Calls(net)
    s = solvers.Recipe(nfe=4)
    x = sample.generate(net, [0, 1, 2], s, stochastic=True, batch=2, progress=False, raw=True)
    assert len(calls.calls) == 4 * 2  # N calls per batch, two batches
    # Meng Eq. 4-7 over time_schedule(4), its fresh noise continuing each seed's generator.
    draws = [edm_latents(s_, [3, 8, 8]) for s_ in (0, 1, 2)]
    z, gens = torch.stack([d[0] for d in draws]).double(), [d[2] for d in draws]
    D = lambda x_, t, **c: net(x_.float(), t)
    ref = solvers.stochastic_sample(D, 80 * z, solvers.time_schedule(4), generator=gens)
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-5)
    ode = sample.generate(net, [0, 1, 2], dataclasses.replace(s, solver='euler'), progress=False, raw=True)
    assert (x - ode).abs().max() > 1e-3  # the re-noising matters


# ---------------------------------------------------------------------------------------------
# Students sample as their metadata says (SFD Alg. 8)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def student(tmp_path_factory):
    """A fake SFD-v student: AFS, two trained NFE, the step condition switched on."""
    net = tiny(seed=4).enable_step_condition()
    sampling = dict(solver='euler', nfe=[2, 3], afs=True, schedule='polynomial', rho=7.0, t_min=0.006,
                    t_max=80.0, step_values={'2': 4, '3': 5})
    path = tmp_path_factory.mktemp('student') / 'student.pt'
    models.save_model(path, net, sampling=sampling, method='sfd-v', teacher='x', shape=[3, 8, 8])
    return path


def test_sfd_v_student_sampling_is_honoured(student, capsys):
    """SFD Alg. 8: Euler over the student's own schedule, AFS, and the trained step value."""
    net, meta = models.load(student)
    calls = Calls(net)
    s = sample.resolve_sampling(meta, 3)
    x = sample.generate(net, [0, 9], s, nfe=3, progress=False, raw=True)
    t = solvers.time_schedule(4, 0.006, 80.0)  # N = NFE + AFS = 4 Euler steps
    assert len(calls.calls) == 3 and all(c['step'] == 5 for c in calls.calls)
    # AFS: the first step is analytic, so the calls are at t_1, t_2, t_3 (SFD Alg. 5).
    torch.testing.assert_close(torch.stack([c['sigma'][0] for c in calls.calls]), t[1:4], rtol=0, atol=0)
    z = torch.stack([edm_latents(s_, [3, 8, 8])[0] for s_ in (0, 9)]).double()
    ref = solvers.sample_with(lambda x_, t_, **c: net(x_.float(), t_, **c), z, meta['sampling'], nfe=3)
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r'NFE \[2, 3\]: choose one with --nfe'):
        sample.generate(net, [0], s, progress=False)
    sample.main(['--model', str(student), '--nfe', '2', '--seeds', '0-1', '--quiet',
                 '--npz', str(student.with_suffix('.npz'))])
    assert 'euler, 3 steps from t=80 to 0.006, AFS, step=4: NFE 2 per image' in capsys.readouterr().out


def test_student_overrides_and_untrained_nfe_warn(student):
    """Sampling a student off its trained configuration works, but never silently."""
    net, meta = models.load(student)
    with pytest.warns(UserWarning, match='overriding the sfd-v student'):
        s = sample.resolve_sampling(meta, 3, solver='heun')
    assert s.solver == 'heun' and s.nfe == [2, 3]
    with pytest.warns(UserWarning, match='distilled for NFE'):
        s = sample.resolve_sampling(meta, 4)
    calls = Calls(net)
    with pytest.warns(UserWarning, match='NFE 4 was not trained'):
        sample.generate(net, [0], s, nfe=4, progress=False)
    assert len(calls.calls) == 4 and all(c['step'] == 6 for c in calls.calls)  # NFE + AFS + 1
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        sample.resolve_sampling(meta, 2)  # a trained NFE: silent


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------

def test_grid_folder_and_npz_agree(files, tmp_path):
    """One CLI run writes all three outputs; each holds exactly the images generate() returns."""
    seeds = [0, 1, 2, 1500, 7]
    out = sample.main(['--model', str(files / 'cond.pt'), '--seeds', '0-2,1500,7', '--nfe', '3',
                       '--batch', '2', '--grid', str(tmp_path / 'g.png'), '--outdir', str(tmp_path / 'imgs'),
                       '--npz', str(tmp_path / 's.npz'), '--quiet'])
    net, _ = models.load(files / 'cond.pt')
    x, y = sample.generate(net, seeds, FEW, progress=False, return_labels=True)
    assert torch.equal(out, x)
    with np.load(tmp_path / 's.npz') as f:
        assert f[fid.IMAGES_KEY].dtype == np.uint8 and f[fid.IMAGES_KEY].shape == (5, 8, 8, 3)
        assert f['seeds'].tolist() == seeds and f['labels'].tolist() == y.tolist()
    assert torch.equal(fid.load_images_npz(tmp_path / 's.npz'), x)
    names = sorted(str(p.relative_to(tmp_path / 'imgs')) for p in (tmp_path / 'imgs').rglob('*'))
    assert names == ['000000', '000000/000000.png', '000000/000001.png', '000000/000002.png',
                     '000000/000007.png', '001000', '001000/001500.png', 'sample-set.json']
    marker = json.loads((tmp_path / 'imgs' / 'sample-set.json').read_text())  # the complete set's marker
    assert marker['complete'] and marker['count'] == 5 and marker['image_shape'] == [3, 8, 8]
    for s, img in zip(seeds, x, strict=True):
        png = np.asarray(Image.open(sample.image_path(tmp_path / 'imgs', s)))
        assert png.shape == (8, 8, 3) and np.array_equal(png, img.permute(1, 2, 0).numpy())
    grid = np.asarray(Image.open(tmp_path / 'g.png'))  # 5 images: 3 columns, 2 rows, black padding
    assert grid.shape == (16, 24, 3)
    assert np.array_equal(grid[8:, 8:16], x[4].permute(1, 2, 0).numpy()) and not grid[8:, 16:].any()
    assert not [p for p in tmp_path.rglob('*') if '.tmp' in p.name]  # atomic writes leave nothing


def test_compile_flag_gives_the_same_images(files, monkeypatch, tmp_path):
    """--compile wraps the network in torch.compile (here its 'eager' backend: dynamo's graph
    capture without a C++ toolchain) and generation reads the model's attributes through it."""
    compiled = []
    real_compile = torch.compile

    def eager_compile(model, **kw):
        compiled.append(model)
        return real_compile(model, backend='eager')
    monkeypatch.setattr(torch, 'compile', eager_compile)
    args = ['--model', str(files / 'cond.pt'), '--seeds', '0-3', '--nfe', '3', '--guidance', '1.5',
            '--npz', str(tmp_path / 's.npz'), '--quiet']
    plain = sample.main(args)
    assert not compiled
    assert torch.equal(sample.main(args + ['--compile']), plain) and len(compiled) == 1


def test_save_grid_is_near_square_and_grayscale_works(tmp_path):
    """ceil(sqrt N) columns and as many rows as needed; one-channel images are written as 'L'."""
    for n, (rows, cols) in {1: (1, 1), 4: (2, 2), 10: (3, 4), 64: (8, 8)}.items():
        sample.save_grid(torch.full((n, 1, 4, 5), 200, dtype=torch.uint8), tmp_path / f'{n}.png')
        img = Image.open(tmp_path / f'{n}.png')
        assert img.mode == 'L' and img.size == (5 * cols, 4 * rows)
    with pytest.raises(ValueError, match='uint8 images'):
        sample.save_grid(torch.zeros(2, 3, 4, 4), tmp_path / 'f.png')


def test_point_models_write_float_points(files, tmp_path):
    """Toy models make 2-D points: kept as floats (no pixel conversion), written to npz only."""
    net, _ = models.load(files / 'toy.pt')
    pts = [sample.generate(net, [0, 1, 2], FEW, batch=b, progress=False) for b in (1, 3)]
    assert pts[0].shape == (3, 2) and pts[0].is_floating_point()
    torch.testing.assert_close(pts[0], pts[1], rtol=0, atol=1e-6)
    sample.main(['--model', str(files / 'toy.pt'), '--seeds', '0-2', '--nfe', '3', '--quiet',
                 '--npz', str(tmp_path / 'p.npz')])
    with np.load(tmp_path / 'p.npz') as f:
        torch.testing.assert_close(torch.from_numpy(f['points']), pts[0])
        assert f['labels'].shape == (3,) and 'images' not in f
    with pytest.raises(ValueError, match='2-D points, not images'):
        sample.main(['--model', str(files / 'toy.pt'), '--grid', str(tmp_path / 'g.png')])


# ---------------------------------------------------------------------------------------------
# Errors and torchrun
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('args, message', [
    (['--model', 'no-such-model'], 'unknown model'),
    (['--model', '{d}/cond.pt', '--class', '4'], r'class index 4 is out of range: this model has 4 classes'),
    (['--model', '{d}/uncond.pt', '--class', '0'], 'needs a class-conditional model'),
    (['--model', '{d}/uncond.pt', '--guidance', '1'], 'this one is unconditional'),
    (['--model', '{d}/uncond.pt', '--uncond', '{d}/uncond.pt'], 'add --guidance w'),
    (['--model', '{d}/uncond.pt', '--nfe', '8'], 'heun cannot use exactly 8 NFE'),
    (['--model', '{d}/uncond.pt', '--seeds', '9-3'], 'bad seed list'),
])
def test_bad_arguments_raise_one_clear_error(files, tmp_path, args, message):
    """Each bad request fails with a message saying what is wrong, before anything is written."""
    args = [a.format(d=files) for a in args] + ['--nfe', '3'] * ('--nfe' not in args)
    with pytest.raises(ValueError, match=message):
        sample.main(args + ['--npz', str(tmp_path / 'x.npz'), '--quiet'])
    assert not (tmp_path / 'x.npz').exists()
    with pytest.raises(ValueError, match='no output requested'):
        sample.main(['--model', str(files / 'uncond.pt')])


def test_two_processes_split_seeds_and_rank_0_gathers_them(files, tmp_path):
    """Two CPU processes (gloo) set up as torchrun sets them up (WORLD_SIZE, RANK, LOCAL_RANK,
    MASTER_ADDR/PORT; the launcher itself is skipped to save its start-up): each samples
    seeds[rank::2] and writes its PNGs; rank 0 writes the npz and grid in seed order, equal to
    one process's output."""
    seeds = '0-4,1001'
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    args = [sys.executable, str(ROOT / 'sample.py'), '--model', str(files / 'cond.pt'), '--seeds', seeds,
            '--nfe', '3', '--batch', '2', '--device', 'cpu', '--quiet', '--npz', str(tmp_path / 'two.npz'),
            '--outdir', str(tmp_path / 'imgs'), '--grid', str(tmp_path / 'g.png')]
    procs = [subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS='1', WORLD_SIZE='2', RANK=str(r),
                                       LOCAL_RANK=str(r), MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port)))
             for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert 'NFE 3 per image' in outs[0][0] and 'NFE' not in outs[1][0]  # rank 0 prints
    one = sample.main(['--model', str(files / 'cond.pt'), '--seeds', seeds, '--nfe', '3', '--quiet',
                       '--npz', str(tmp_path / 'one.npz')])
    with np.load(tmp_path / 'two.npz') as two, np.load(tmp_path / 'one.npz') as ref:
        assert two['seeds'].tolist() == ref['seeds'].tolist() and np.array_equal(two['labels'], ref['labels'])
        assert np.array_equal(two['images'], ref['images'])
    assert len(list((tmp_path / 'imgs').rglob('*.png'))) == 6  # each rank wrote its own three
    assert Image.open(tmp_path / 'g.png').size == (24, 16)
    assert torch.equal(fid.load_images_npz(tmp_path / 'two.npz'), one)


def test_command_line_errors_are_one_line(files, monkeypatch, capsys):
    """Run as a script, a bad request ends with one 'sample.py: error: ...' line, no traceback."""
    monkeypatch.setattr(sys, 'argv', ['sample.py', '--model', str(files / 'cond.pt')])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(ROOT / 'sample.py'), run_name='__main__')
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith('sample.py: error: no output requested')


# ---------------------------------------------------------------------------------------------
# Files of every kind, as the code before sampling recipes wrote them (tests/fixtures/)
# ---------------------------------------------------------------------------------------------

V0 = ROOT / 'tests' / 'fixtures'


@pytest.mark.parametrize('name', sorted(json.load(open(V0 / 'v0-expected.json'))))
def test_old_files_of_every_kind_load_and_sample_identically(name):
    """Written by the pre-recipe code (make_v0_fixtures.py, run on that commit): a toy teacher,
    SFD and SFD-v students, guided stage-one and stage-two (DDIM and stochastic) students. They
    load through models.load and sample exactly as that code's sample.generate did; students
    also through solvers.sample_with (what notebooks and distill's evaluation use)."""
    case = json.load(open(V0 / 'v0-expected.json'))[name]
    net, meta = models.load(V0 / name)
    s = sample.resolve_sampling(meta, case['nfe'] if 'method' in meta else None)
    x = sample.generate(net, case['seeds'], s, nfe=case['nfe'], guidance=case.get('guidance'), progress=False,
                        raw=True)
    torch.testing.assert_close(x, torch.tensor(case['samples'], dtype=x.dtype), rtol=0, atol=1e-6)
    if 'method' in meta or 'N' in meta:
        z, labels, gens = sample.noise(case['seeds'], [2], net.label_dim)
        cond = {'class_labels': labels} if net.label_dim else {}
        cond.update({'guidance': case['guidance']} if 'guidance' in case else {})
        y = solvers.sample_with(lambda x_, t_, **c: net(x_.float(), t_, **c), z.double(), meta['sampling'],
                                nfe=case['nfe'], generator=gens, **cond)
        torch.testing.assert_close(y, x, rtol=0, atol=1e-6)
