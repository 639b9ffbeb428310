"""Tests for LoRA students (hub.add_lora, save_lora_student, load_lora_student, fuse, load_lora_into) on
the tiny random Stable Diffusion pipeline of test_distill_latent.py: only the adapters (and the step or
guidance projection) train, the student starts as its teacher bit for bit, the loss falls, the folder
holds a few kB in diffusers' LoRA format that StableDiffusionPipeline.load_lora_weights reads into the
same model the project samples, `fuse` folds it into a full UNet, and bad input gets one error each.
Tests that need diffusers and peft skip without them.
"""
import copy
import dataclasses
import importlib.util
import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from test_distill_latent import PROMPTS, SD, _parts

import distill
import guided_pd
import hub
import latent
import models
import presets
import solvers

pytestmark = [pytest.mark.filterwarnings('ignore:__array__ implementation:DeprecationWarning'),
              pytest.mark.filterwarnings('ignore:.*accelerate.*'),
              pytest.mark.filterwarnings('ignore:The `local_dir_use_symlinks`:UserWarning')]
HAVE = all(importlib.util.find_spec(m) is not None for m in ('diffusers', 'transformers', 'peft'))
needs_peft = pytest.mark.skipif(not HAVE, reason=f'the optional extras are not installed ({hub.LORA_EXTRA})')


@pytest.fixture(scope='module')
def sd(tmp_path_factory):
    """A tiny StableDiffusionPipeline folder (float32) and a captions file, one prompt per line."""
    if not HAVE:
        pytest.skip(f'the optional extras are not installed ({hub.LORA_EXTRA})')
    from diffusers import StableDiffusionPipeline
    root = tmp_path_factory.mktemp('sd')
    StableDiffusionPipeline(**_parts(), safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(root / 'pipe')
    (root / 'captions.txt').write_text('\n'.join(PROMPTS) + '\n')
    return root


def _net64(sd):
    return hub.load(sd / 'pipe', dtype=torch.float64)[0]


def _adapted(unet, targets=hub.LORA_TARGETS):
    """The Linear and Conv2d layers whose names end in one of the targets (what peft adapts)."""
    names = hub.lora_targets(targets)
    return [m for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
            and any(n == t or n.endswith('.' + t) for t in names)]


def _lora_size(layers, r):
    """A [r, in(, k, k)] and B [out, r(, 1, 1)] for every adapted layer: r (in k^2 + out) each."""
    return sum(r * (m.weight[0].numel() + m.weight.shape[0]) for m in layers)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _randomize_adapters(net, g, scale=0.05):
    """Trained-looking adapters (and projection): B != 0, so the student differs from its base."""
    with torch.no_grad():
        for p in net.unet.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def _inputs(net, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 8, 8, generator=g, dtype=torch.float64) * 3
    return x, torch.tensor([3.0, 0.5][:n], dtype=torch.float64), net.encode_prompts(PROMPTS[:n])


# ---------------------------------------------------------------------------------------------
# The student: what trains, step 0, the loss
# ---------------------------------------------------------------------------------------------

@needs_peft
def test_lora_student_is_its_teacher_at_step_zero_and_trains_only_adapters(sd):
    """Rank 4 on the 8 default targets (48 layers here): the trainable parameters are exactly r (in + out)
    per adapted Linear or 1x1 Conv2d (+ SFD-v's 256 x 32 projection); D equals the teacher's bit for bit
    (float64, B = 0); after a backward only B (A's gradient is B^T ... = 0) and the projection have
    gradients, the base none."""
    teacher = _net64(sd)
    x, sigma, h = _inputs(teacher)
    D0 = teacher(x, sigma, encoder_hidden_states=h)
    for step in (False, True):
        student = copy.deepcopy(teacher).train().requires_grad_(True)
        if step:
            student.enable_step_condition()
        hub.add_lora(student, 4, 8.0)
        layers = _adapted(teacher.unet)
        want = _lora_size(layers, 4)
        want += latent.COND_DIM * teacher.unet.time_embedding.linear_1.in_features if step else 0
        names = [n for n, p in student.named_parameters() if p.requires_grad]
        assert len(layers) == 48 and sum(p.numel() for p in hub.trainable(student)) == want
        assert all('.lora_A.' in n or '.lora_B.' in n or n.endswith('cond_proj.weight') for n in names)
        assert student.lora == dict(rank=4, alpha=8.0, targets=hub.LORA_TARGETS)
        D = student(x, sigma, encoder_hidden_states=h, **({'step': 4} if step else {}))
        assert torch.equal(D, D0)
        D.square().sum().backward()
        grads = {n: p.grad for n, p in student.named_parameters()}
        assert all(grads[n].norm() > 0 for n in names if '.lora_B.' in n or 'cond_proj' in n)
        assert all(g is None for n, g in grads.items() if n not in names)
    print(f'tiny UNet: {sum(p.numel() for p in teacher.parameters()):,} parameters, rank-4 adapters {want:,}')


@needs_peft
def test_sfd_iterations_on_a_lora_student_lower_the_loss(sd):
    """SD's SFD recipe (DPM-Solver++(2M), K = 3, the timestep-uniform grid) with a rank-8 LoRA student:
    6 iterations on one batch at lr 1e-3 (LoRA's usual, 20x SFD's full fine-tuning lr) lower the loss
    (measured 123.8 -> 75.7); the base UNet does not move."""
    net = _net64(sd)
    kw = dict(teacher=str(sd / 'pipe'), captions=str(sd / 'captions.txt'), nfe=2, lora_rank=8, lr=1e-3)
    cfg = distill.apply_defaults(distill.SFDConfig(device='cpu', **kw), explicit=set(kw))
    cfg = dataclasses.replace(presets.with_levels(cfg, net), accumulate=1)
    student = hub.add_lora(copy.deepcopy(net).train(), cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    opt = torch.optim.Adam(hub.trainable(student), lr=cfg.lr)
    t_steps = distill.student_schedule(cfg, cfg.nfe, net)
    t_teacher = distill.grid(cfg, cfg.K * 2, net)
    x_N = cfg.t_max * torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    h = net.encode_prompts(PROMPTS[:4])
    targets = distill.teacher_targets(net, x_N, t_teacher, cfg.K, cfg.teacher_solver, encoder_hidden_states=h)
    base = {n: p.clone() for n, p in student.unet.named_parameters() if not p.requires_grad}
    total = [sum(distill.sfd_iteration(student, opt, x_N, t_steps, targets, cfg, encoder_hidden_states=h))
             for _ in range(6)]
    print('LoRA SD iteration losses:', [f'{v:.4g}' for v in total])
    assert total[-1] < 0.7 * total[0] and min(total[1:]) < total[0]
    assert all(torch.equal(p, base[n]) for n, p in student.unet.named_parameters() if n in base)


# ---------------------------------------------------------------------------------------------
# The run, its folder, diffusers' loader, the resolver, fuse
# ---------------------------------------------------------------------------------------------

@needs_peft
def test_lora_run_folder_loads_in_stock_diffusers_samples_here_and_fuses(monkeypatch, sd, tmp_path, capsys):
    """distill.py --lora-rank 4: the student folder holds only pytorch_lora_weights.safetensors (diffusers'
    keys, r and alpha in its metadata; measured 102 kB, 3.2% of the UNet's 3.2 MB file) and
    diffdistill.json; Adam held only the adapters; the base did not move. StableDiffusionPipeline.
    load_lora_weights(folder) builds the UNet the resolver builds (float64, measured 0 difference; the
    adapters moved the output by 4%), and the pipeline's DPM-Solver++ latents equal solvers.sample's on
    the LoRA student (measured 1.5e-7: diffusers' float32 scheduler arithmetic); sample.py takes the
    folder as a model; `python hub.py fuse` writes a full UNet with the same outputs (1.4e-8: folded
    in float32)."""
    import safetensors
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel

    import sample
    run = tmp_path / 'run'
    distill.main(['--teacher', str(sd / 'pipe'), '--captions', str(sd / 'captions.txt'), '--lora-rank', '4',
                  '--lr', '1e-3', '--batch', '4', '--kimg', '0.008', '--accumulate', '1', '--device', 'cpu',
                  '--quiet', '--run-dir', str(run)])
    folder = run / 'student'
    assert sorted(p.name for p in folder.iterdir()) == ['README.md', hub.STUDENT_FILE, hub.LORA_WEIGHTS,
                                                         'scheduler']
    card = (folder / 'README.md').read_text()  # its model card shows the three stock lines, adapters loaded
    assert '"lora"' in card and "pipe.load_lora_weights('.')" in card and 'StudentScheduler' in card
    full = (sd / 'pipe' / 'unet' / 'diffusion_pytorch_model.safetensors').stat().st_size
    n = _lora_size(_adapted(_net64(sd).unet), 4)
    size = (folder / hub.LORA_WEIGHTS).stat().st_size
    assert 4 * n < size < 4 * n + 32_000 and size < 0.05 * full
    with safetensors.safe_open(folder / hub.LORA_WEIGHTS, 'pt') as f:
        keys, meta = list(f.keys()), json.loads(f.metadata()['lora_adapter_metadata'])
    assert len(keys) == 96 and all(k.startswith('unet.') and k.endswith(('.lora_A.weight', '.lora_B.weight'))
                                   for k in keys)
    assert (meta['unet.r'], meta['unet.lora_alpha'], len(meta['unet.target_modules'])) == (4, 4.0, 48)
    state = torch.load(run / 'training-state.pt', weights_only=True)
    assert len(state['optimizer']['param_groups'][0]['params']) == 96  # Adam saw the adapters only
    base = UNet2DConditionModel.from_pretrained(sd / 'pipe', subfolder='unet').state_dict()
    trained = {k.removeprefix('unet.').replace('.base_layer', ''): v for k, v in state['student'].items()}
    assert all(torch.equal(v, trained[k]) for k, v in base.items())
    # diffusers' own loader and pipeline, float64
    dpm = DPMSolverMultistepScheduler(**SD, steps_offset=1)
    pipe = StableDiffusionPipeline.from_pretrained(sd / 'pipe', dtype=torch.float64, safety_checker=None,
                                                   scheduler=dpm)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(folder)
    ours, meta = hub.load_lora_student(folder, dtype=torch.float64, fuse=False)
    fused = models.load(folder)[0].double()
    assert meta['lora']['rank'] == 4 and meta['method'] == 'sfd' and getattr(fused, 'lora', None) is None
    x, sigma, h = _inputs(ours)
    z, t = x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2).sqrt(), ours.timestep(sigma).float()
    out = lambda unet: unet(z, t, encoder_hidden_states=h).sample
    with torch.no_grad():
        assert _rel(out(pipe.unet), out(ours.unet)) < 1e-13
        assert _rel(out(ours.unet), out(_net64(sd).unet)) > 1e-4  # the adapters did learn something
        assert _rel(out(fused.unet), out(ours.unet)) < 1e-6  # folded in float32
        z_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        ref = pipe('a cat', num_inference_steps=4, guidance_scale=1.0, latents=z_T,
                   output_type='latent').images
    x = solvers.sample(ours, latent.init_scale(ours.sigma_max) * z_T, ours.discrete_grid(4), 'dpmpp2m',
                       encoder_hidden_states=ours.encode_prompts(['a cat']))
    assert _rel(x, ref) < 1e-6
    # The student's own sampler in the stock pipeline: the adapters plus its scheduler/ give sample.py's
    # latents from the same noise.
    from stock_pipelines import StudentScheduler
    pipe.scheduler = StudentScheduler.from_pretrained(folder, subfolder='scheduler')
    nfe = meta['sampling']['nfe']
    with torch.no_grad():
        stock = pipe('a cat', num_inference_steps=nfe, guidance_scale=1.0, latents=z_T,
                     output_type='latent').images
    with monkeypatch.context() as m:  # sample.py's latents from our z_T (its decode stopped at the latent)
        m.setattr(sample, 'noise', lambda seeds, *a, **k: (z_T, None, []))
        m.setattr(ours, 'decode', lambda x, sigma=0.0, batch=8: x / (1 + float(sigma) ** 2) ** 0.5)
        mine = sample.generate(ours, [0], sample.resolve_sampling(meta, None, ours), None, progress=False,
                               raw=True, prompts=['a cat'])
    assert _rel(mine, stock) < 1e-6
    y = sample.main(['--model', str(folder), '--seeds', '0-1', '--prompt', 'a cat', '--quiet', '--device',
                     'cpu', '--npz', str(tmp_path / 'x.npz')])
    assert 'NFE 2 per image' in capsys.readouterr().out and y.shape == (2, 3, 16, 16)
    hub.main(['fuse', str(folder), str(tmp_path / 'full')])
    assert 'written' in capsys.readouterr().out
    unet = UNet2DConditionModel.from_pretrained(tmp_path / 'full', subfolder='unet').double()
    full_net, full_meta = models.load(tmp_path / 'full')
    assert full_meta['fused_from'] == str(folder.resolve()) and full_meta['method'] == 'sfd'
    assert full_meta['sampling'] == meta['sampling'] and not hub.is_lora_student(tmp_path / 'full')
    with torch.no_grad():
        assert _rel(out(unet), out(ours.unet)) < 1e-6 and _rel(out(unet), out(fused.unet)) == 0


@pytest.fixture(scope='module')
def guided_lora(sd, tmp_path_factory):
    """A Meng stage-one student as a LoRA student (rank 4, alpha 2: scale 0.5), adapters and w projection
    randomised as if trained, float64, saved through hub.save_student (models.save_student's path)."""
    teacher = _net64(sd)
    student = hub.add_lora(guided_pd.make_student(teacher), 4, 2.0)
    _randomize_adapters(student, torch.Generator().manual_seed(5))
    folder = hub.save_student(tmp_path_factory.mktemp('guided') / 'student', student, prior='vp',
                              kind='guided-stage1', sampling=teacher.recipe(), guidance_range=[2.0, 14.0])
    return student.eval(), folder


@needs_peft
def test_projection_beside_the_adapters_and_load_lora_into(sd, guided_lora):
    """A w-conditioned LoRA student keeps its projection in condition_projection.safetensors; the resolver
    reads it back (D at several w: 1e-13, float64), and load_lora_into gives a stock pipeline's UNet the
    projection before load_lora_weights: the same UNet output with the pipeline's w embedding (alpha != r
    travels in the file's metadata: a wrong scale would differ by ~10%). Measured: 0 difference."""
    from diffusers import StableDiffusionPipeline
    student, folder = guided_lora
    assert (folder / hub.LORA_PROJECTION).is_file() and hub.is_lora_student(folder)
    net, meta = hub.load(folder, dtype=torch.float64)  # what models.load reads, in float64
    assert models.kind_of(str(folder)) == 'diffusers' and net.use_guidance_condition
    assert meta['kind'] == 'guided-stage1' and meta['lora']['alpha'] == 2.0
    x, sigma, h = _inputs(net)
    w = torch.tensor([2.0, 7.5])
    with torch.no_grad():
        assert _rel(net(x, sigma, encoder_hidden_states=h, guidance=w),
                    student(x, sigma, encoder_hidden_states=h, guidance=w)) < 1e-13
        pipe = StableDiffusionPipeline.from_pretrained(sd / 'pipe', dtype=torch.float64, safety_checker=None)
        hub.load_lora_into(pipe, folder)
        z, t = x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2).sqrt(), net.timestep(sigma).float()
        emb = pipe.get_guidance_scale_embedding(w, embedding_dim=latent.COND_DIM).double()
        ref = pipe.unet(z, t, encoder_hidden_states=h, timestep_cond=emb).sample
        ours = student.unet(z, t, encoder_hidden_states=h, timestep_cond=emb).sample
    assert _rel(ref, ours) < 1e-13


# ---------------------------------------------------------------------------------------------
# Bad input: one error each
# ---------------------------------------------------------------------------------------------

@needs_peft
def test_lora_bad_input_one_error_each(sd, guided_lora, tmp_path):
    """LoRA on a toy/EDM teacher, a negative rank, alpha or targets without a rank, a student folder as
    the base, stage two, unknown targets, a LoRA folder whose base is gone, peft missing."""
    pipe, caps = str(sd / 'pipe'), str(sd / 'captions.txt')
    need_diffusers = '--lora-rank 4: LoRA students need a diffusers'
    for kw, match in ((dict(teacher='toy:ring', lora_rank=4), need_diffusers),
                      (dict(teacher='cifar10', lora_rank=4), need_diffusers),
                      (dict(teacher=pipe, captions=caps, lora_rank=-2), '--lora-rank -2: a rank >= 1'),
                      (dict(teacher=pipe, captions=caps, lora_alpha=8.0), '--lora-alpha 8.0: applies to'),
                      (dict(teacher=pipe, captions=caps, lora_targets='to_q'), '--lora-targets .*applies to'),
                      (dict(teacher=str(guided_lora[1]), captions=caps, lora_rank=4), 'is a student folder')):
        with pytest.raises(ValueError, match=match):
            distill.validate(distill.SFDConfig(**kw))
    with pytest.raises(ValueError, match='--lora-rank 4: LoRA students are for stage one'):
        cfg = guided_pd.GuidedConfig(teacher=str(guided_lora[1]), lora_rank=4)
        presets.validate_guided(cfg, stage='stage2')
    with pytest.raises(ValueError, match='--lora-rank 2: LoRA students need a diffusers'):
        presets.validate_guided(guided_pd.GuidedConfig(teacher='toy:ring', lora_rank=2))
    with pytest.raises(ValueError, match='--lora-targets nothing_here: .*not found'):
        hub.add_lora(_net64(sd), 4, targets='nothing_here')
    moved = tmp_path / 'lora'
    shutil.copytree(guided_lora[1], moved)
    info = json.loads((moved / hub.STUDENT_FILE).read_text())
    (moved / hub.STUDENT_FILE).write_text(json.dumps(dict(info, base=str(tmp_path / 'gone'))))
    with pytest.raises(ValueError, match=r'its base pipeline .*gone is missing .*set "base" in'):
        models.load(moved)
    code = ('import sys; sys.modules["peft"] = None\n'
            'import cli, distill, hub, guided_pd_run, models\n'
            f'cli.run(distill.main, ["--teacher", {pipe!r}, "--captions", {caps!r}, "--lora-rank", "4"])')
    out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.count('\n') == 1, out.stderr
    assert 'error: LoRA students need the optional extra peft: pip install -r requirements-lora.txt' \
        in out.stderr
