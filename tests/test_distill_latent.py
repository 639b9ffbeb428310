"""Tests for distilling diffusers models: SFD / SFD-v (distill.py) and Meng's guided distillation
(guided_pd.py) on a tiny random Stable Diffusion pipeline, and latent.py's students (the step and
w conditions, save_student -> from_pretrained -> sample.py), CLIP score and captions.

Everything is built from config (UNet 4x8x8 latents, 2x VAE, 2-layer CLIP text encoder, a letter
tokenizer) and saved as diffusers saves a pipeline; nothing is downloaded. Tests that need diffusers
skip without the extra.
"""
import copy
import dataclasses
import importlib.util
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT

import captions
import distill
import hub
import latent
import models
import presets
import solvers

pytestmark = [pytest.mark.filterwarnings('ignore:__array__ implementation:DeprecationWarning'),
              pytest.mark.filterwarnings('ignore:.*accelerate.*'),
              pytest.mark.filterwarnings('ignore:The `local_dir_use_symlinks`:UserWarning')]
HAVE = all(importlib.util.find_spec(m) is not None for m in ('diffusers', 'transformers'))
needs_diffusers = pytest.mark.skipif(not HAVE, reason=f'the optional extra is not installed ({latent.EXTRA})')
SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear')
PROMPTS = ['a red cat', 'a dog on a bench', 'two zebras', 'a bowl of soup', 'a train at night']


def _parts(dtype=torch.float32, seed=0):
    """Tiny random SD components (every weight random: default inits zero some outputs)."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                                down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
                                up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=('DownEncoderBlock2D',) * 2,
                        up_block_types=('UpDecoderBlock2D',) * 2, latent_channels=4, layers_per_block=1,
                        norm_num_groups=8, sample_size=16)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=60, hidden_size=32, intermediate_size=37,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                                        pad_token_id=1))
    vocab = {'<|startoftext|>': 0, '<|endoftext|>': 1}
    for token in [c + suffix for suffix in ('', '</w>') for c in 'abcdefghijklmnopqrstuvwxyz']:
        vocab[token] = len(vocab)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in (unet, vae, text):
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel() if p.ndim > 1 else 16))
            m.to(dtype).eval()
    sched = PNDMScheduler(**SD, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)  # SD v1.5's own
    return dict(unet=unet, vae=vae, text_encoder=text, scheduler=sched,
                tokenizer=CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77))


@pytest.fixture(scope='module')
def sd(tmp_path_factory):
    """A tiny StableDiffusionPipeline folder (float32) and a captions file, one prompt per line."""
    if not HAVE:
        pytest.skip(f'the optional extra is not installed ({latent.EXTRA})')
    from diffusers import StableDiffusionPipeline
    root = tmp_path_factory.mktemp('sd')
    StableDiffusionPipeline(**_parts(), safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(root / 'pipe')
    (root / 'captions.txt').write_text('\n'.join(PROMPTS) + '\n')
    return root


def _net64(sd):
    """The tiny pipeline as a float64 Denoiser (for tests that prove math)."""
    return hub.load(sd / 'pipe', dtype=torch.float64)[0]


class Recorder(torch.nn.Module):
    """Wraps a denoiser; records each call's noise level, input and whether gradients were on."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, []

    def forward(self, x, t, **cond):
        self.calls.append(dict(t=float(torch.as_tensor(t).flatten()[0]), x=x, grad=torch.is_grad_enabled()))
        return self.net(x, t, **cond)


# ---------------------------------------------------------------------------------------------
# The schedule, the conditions
# ---------------------------------------------------------------------------------------------

def test_uniform_schedule_is_sfds_linear_schedule_and_nests():
    """Uniform in the timestep from sigma_max to 0.1 (sfd-main's 'discrete', rho = 1): the facts' grids
    (sfd code, 6 digits) to 2.8e-5 relative (measured; the two codes interpolate between levels in log
    sigma vs log alpha); refined K = 3 times it holds the coarse grid exactly (the teacher's grid)."""
    sig = latent.sigmas_from_alphas_cumprod(latent.scaled_linear_alphas_cumprod())
    t_max = float(sig[-1])
    for n, ref in ((3, [14.6146, 2.95742, 0.95432, 0.1]), (4, [14.6146, 4.13155, 1.64383, 0.7155, 0.1])):
        t = latent.uniform_schedule(n, 0.1, t_max, sig)
        assert ((t / torch.tensor(ref, dtype=torch.float64) - 1).abs().max()) < 1e-4
        assert t[0] == t_max and t[-1] == 0.1 and (t[1:] < t[:-1]).all()
        assert torch.equal(latent.uniform_schedule(3 * n, 0.1, t_max, sig)[::3], t)
    tau = latent.timestep_from_sigma(latent.uniform_schedule(4, 0.1, t_max, sig), sig)
    assert torch.allclose(tau[1:] - tau[:-1], (tau[1] - tau[0]).expand(4), atol=1e-9)  # uniform steps


@needs_diffusers
def test_step_and_guidance_conditions_are_exact_noops_at_initialisation(sd):
    """SFD-v's step and Meng's w through time_cond_proj_dim: the output is the teacher's bit for bit
    (float64) while the zeroed cond_proj gets a gradient; the sinusoids are diffusers' own (the
    pipeline's w embedding, so StableDiffusionPipeline samples a w-student the same way)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.models.embeddings import get_timestep_embedding
    teacher = _net64(sd)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) * 3
    h = teacher.encode_prompts(PROMPTS[:2])
    D0 = teacher(x, torch.tensor([3.0, 0.5], dtype=torch.float64), encoder_hidden_states=h)
    for kind, value in (('step', 4), ('guidance', torch.tensor([2.0, 7.5]))):
        student = copy.deepcopy(teacher).requires_grad_(True)
        getattr(student, f'enable_{kind}_condition')()
        assert student.unet.config.time_cond_proj_dim == latent.COND_DIM and teacher.condition is None
        D = student(x, torch.tensor([3.0, 0.5], dtype=torch.float64), encoder_hidden_states=h,
                    **{kind: value})
        assert torch.equal(D, D0)
        D.square().sum().backward()
        assert student.unet.time_embedding.cond_proj.weight.grad.norm() > 0
        with pytest.raises(ValueError, match='one time_cond_proj_dim'):
            student.enable_step_condition() if kind == 'guidance' else student.enable_guidance_condition()
    w = torch.tensor([0.0, 2.0, 6.5])
    assert torch.equal(latent.condition_embedding('guidance', w, 3, 256),
                       StableDiffusionPipeline.get_guidance_scale_embedding(None, w, 256))
    n = torch.tensor([3.0, 4.0, 6.0])
    assert torch.equal(latent.condition_embedding('step', n, 3, 256),
                       get_timestep_embedding(n, 256, flip_sin_to_cos=True, downscale_freq_shift=0))
    with pytest.raises(ValueError, match='step= is not a condition'):
        teacher(x, 1.0, encoder_hidden_states=h, step=3)


# ---------------------------------------------------------------------------------------------
# One SFD iteration, accumulation
# ---------------------------------------------------------------------------------------------

def _cfg(sd, **kw):
    """SFD Table 6's SD recipe (what apply_defaults gives a diffusers teacher), with kw on top."""
    kw = {'teacher': str(sd / 'pipe'), 'captions': str(sd / 'captions.txt'), **kw}
    return distill.apply_defaults(distill.SFDConfig(device='cpu', **kw), explicit=set(kw))


@needs_diffusers
def test_sd_iteration_has_the_pixel_iterations_structure_and_lowers_its_loss(sd):
    """Table 6's SD recipe (DPM-Solver++(2M), K = 3, t_min 0.1, t_max = sigma_max, no AFS, the
    timestep-uniform grid); one iteration: the teacher K*N times under no-grad over the refined grid
    (its states at every K-th point are the targets), then N student calls and N Adam updates, each
    step from the previous step's detached output. Over 6 iterations on one batch at the paper's lr
    the loss falls (measured 123 -> 55; at lr 1e-4 the random tiny net already oscillates)."""
    cfg = _cfg(sd, nfe=2)
    assert (cfg.teacher_solver, cfg.K, cfg.t_min, cfg.afs, cfg.schedule, cfg.kimg, cfg.lr, cfg.batch,
            cfg.accumulate) == ('dpmpp2m', 3, 0.1, False, latent.UNIFORM, 100.0, 5e-5, 128, 8)
    net = _net64(sd)
    cfg = dataclasses.replace(presets.with_levels(cfg, net), accumulate=1)  # t_max 0: the model's sigma_max
    assert cfg.t_max == net.sigma_max and abs(cfg.t_max - 14.6146) < 1e-4
    T, S = Recorder(net), Recorder(copy.deepcopy(net).train().requires_grad_(True))
    opt = torch.optim.Adam(S.parameters(), lr=cfg.lr)
    t_steps = distill.student_schedule(cfg, cfg.nfe, net)
    t_teacher = distill.grid(cfg, cfg.K * 2, net)
    assert torch.equal(t_teacher[::3], t_steps) and len(t_steps) == 3
    x_N = cfg.t_max * torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    h = net.encode_prompts(PROMPTS[:4])
    targets = distill.teacher_targets(T, x_N, t_teacher, cfg.K, cfg.teacher_solver, encoder_hidden_states=h)
    assert [c['t'] for c in T.calls] == t_teacher[:-1].tolist() and not any(c['grad'] for c in T.calls)
    traj = solvers.sample(net, x_N, t_teacher, 'dpmpp2m', trajectory=True, encoder_hidden_states=h)
    assert torch.equal(targets, traj[3::3])
    first = distill.sfd_iteration(S, opt, x_N, t_steps, targets, cfg, encoder_hidden_states=h)
    assert len(S.calls) == 2 and opt.state_dict()['state'][0]['step'] == 2 and len(first) == 2
    x1 = S.calls[1]['x']
    assert not x1.requires_grad and S.calls[1]['t'] == float(t_steps[1])
    losses = [first] + [distill.sfd_iteration(S, opt, x_N, t_steps, targets, cfg, encoder_hidden_states=h)
                        for _ in range(5)]
    total = [sum(v) for v in losses]
    print('SD iteration losses:', [f'{v:.4g}' for v in total])
    assert total[-1] < 0.7 * total[0] and min(total[1:]) < total[0]


@needs_diffusers
def test_accumulation_2x2_equals_one_batch_of_4(sd):
    """Two rounds of 2 give the update of one batch of 4 (float64, Adam, SFD-v's step condition on):
    measured max |difference| 2.4e-13 and, on a busier machine (other thread scheduling, other
    reduction order), 1.1e-12 in the weights after two updates (Adam's m / sqrt(v) amplifies
    round-off where a gradient is near 0; the updates are 1e-3, so the bound 1e-10 is still seven
    orders below a wrong accumulation), 2e-16 relative in the losses, and
    3.6e-14 in the teacher targets (|x| <= 50), solved in two rounds."""
    net = _net64(sd)
    cfg = _cfg(sd, method='sfd-v', t_max=net.sigma_max)
    g = torch.Generator().manual_seed(2)
    x_N = cfg.t_max * torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64)
    h = net.encode_prompts(PROMPTS[:4])
    t_steps = distill.student_schedule(cfg, 2, net)
    t_teacher = distill.grid(cfg, cfg.K * 2, net)
    one = distill.teacher_targets(net, x_N, t_teacher, cfg.K, 'dpmpp2m', encoder_hidden_states=h)
    two = distill.teacher_targets(net, x_N, t_teacher, cfg.K, 'dpmpp2m', accumulate=2, encoder_hidden_states=h)
    assert (one - two).abs().max() < 1e-12
    student = copy.deepcopy(net).train().requires_grad_(True).enable_step_condition()
    with torch.no_grad():  # a trained-looking projection, so the step condition matters
        student.unet.time_embedding.cond_proj.weight.normal_(0, 0.05, generator=g)
    results = []
    for micro in (1, 2):
        s = copy.deepcopy(student)
        opt = torch.optim.Adam(s.parameters(), lr=1e-3)
        losses = distill.sfd_iteration(s, opt, x_N, t_steps, one, dataclasses.replace(cfg, accumulate=micro),
                                       encoder_hidden_states=h, step=3)
        results.append((losses, torch.cat([p.detach().flatten() for p in s.parameters()])))
    (l1, p1), (l2, p2) = results
    assert np.allclose(l1, l2, rtol=1e-12, atol=0) and (p1 - p2).abs().max() < 1e-10
    assert (p1 - torch.cat([p.flatten() for p in student.parameters()])).abs().max() > 1e-5  # it moved


# ---------------------------------------------------------------------------------------------
# End to end: distill.py -> diffusers' from_pretrained -> sample.py
# ---------------------------------------------------------------------------------------------

@needs_diffusers
def test_sfd_v_run_saves_a_diffusers_unet_that_samples_at_any_guidance(sd, tmp_path, capsys):
    """distill.py on the pipeline folder (SFD-v for 2 and 3 steps, 2 x 2 accumulation, gradient
    checkpointing): UNet2DConditionModel.from_pretrained reads the student (safetensors, its cond_proj,
    the trained weights); the folder is a model spec; sample.py samples it with and without guidance,
    on its own grid from t_max z (the same images as by hand)."""
    from diffusers import UNet2DConditionModel

    import sample
    run = tmp_path / 'run'
    distill.main(['--teacher', str(sd / 'pipe'), '--method', 'sfd-v', '--nfe-list', '2,3', '--captions',
                  str(sd / 'captions.txt'), '--batch', '4', '--kimg', '0.008', '--grad-checkpointing', 'true',
                  '--accumulate', '2', '--device', 'cpu', '--quiet', '--run-dir', str(run)])
    assert 'sfd-v' in capsys.readouterr().out
    folder = run / 'student'
    assert (folder / 'unet' / 'diffusion_pytorch_model.safetensors').is_file()
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder='unet', local_files_only=True,
                                                low_cpu_mem_usage=False)
    assert unet.config.time_cond_proj_dim == latent.COND_DIM
    state = torch.load(run / 'training-state.pt', weights_only=True)
    assert state['iteration'] == 2 and state['config']['t_max'] == pytest.approx(14.6146, abs=1e-4)
    trained = {k.removeprefix('unet.'): v for k, v in state['student'].items()}
    assert all(torch.equal(v, trained[k]) for k, v in unet.state_dict().items())
    assert trained['time_embedding.cond_proj.weight'].abs().max() > 0  # it learned through the projection
    assert models.kind_of(str(folder)) == 'diffusers'
    net, meta = models.load(folder)
    assert net.use_step_condition and net.prior == 'edm' and meta['method'] == 'sfd-v'
    assert meta['sampling']['nfe'] == [2, 3] and meta['sampling']['step_values'] == {'2': 3, '3': 4}
    args = ['--model', str(folder), '--seeds', '0-1', '--prompts', str(sd / 'captions.txt'), '--quiet',
            '--device', 'cpu', '--npz', str(tmp_path / 'x.npz')]
    sample.main(args + ['--nfe', '3', '--guidance', '6.5'])
    out = capsys.readouterr().out  # its own grid, its step value, CFG doubling the calls
    assert 'euler, 3 steps from t=14.6146 to 0.1, step=4, classifier-free guidance w=6.5' in out
    assert 'NFE 6 per image' in out
    x = sample.main(args + ['--nfe', '2'])
    assert 'NFE 2 per image' in capsys.readouterr().out and x.shape == (2, 3, 16, 16)
    # By hand: x = t_max z, Euler over the timestep-uniform grid with step = 3, the final x decoded.
    z = sample.noise([0, 1], net.shape, 0)[0].double()
    t = net.schedule(2, 0.1, net.sigma_max, latent.UNIFORM)
    h = net.encode_prompts(PROMPTS[:2])
    D = lambda x, s, **c: net(x.float(), s, **c)
    ref = solvers.sample(D, float(t[0]) * z, t, 'euler', encoder_hidden_states=h, step=3)
    ref = sample.to_uint8(net.decode(ref).double())
    assert (ref.int() - x.int()).abs().max() <= 1  # rounding of the uint8 conversion only


@needs_diffusers
def test_guided_stage_one_and_two_on_a_tiny_sd(sd, tmp_path, capsys):
    """guided_pd.py on captioned images in MS-COCO's layout: stage one gives a w-conditioned student
    (diffusers' cond_proj; sampled with one call per step at any w, on its teacher's DPM-Solver++
    grid, and StableDiffusionPipeline with this UNet gives the same latents: 2.3e-7 relative in float32),
    stage two halves its steps 4 -> 2 on the cosine grid clipped to SD's levels."""
    from PIL import Image

    import guided_pd
    import sample
    images = tmp_path / 'images'
    images.mkdir()
    coco = dict(images=[], annotations=[])
    for i in range(4):  # non-square images: resized and centre-cropped to 16 x 16
        Image.fromarray(np.full((20, 24, 3), 40 * i, np.uint8)).save(images / f'{i}.png')
        coco['images'].append(dict(id=i, file_name=f'{i}.png'))
        coco['annotations'] += [dict(id=2 * i + k, image_id=i, caption=PROMPTS[(i + k) % 5]) for k in (0, 1)]
    (tmp_path / 'coco.json').write_text(json.dumps(coco))
    captions.main(['coco-subset', '--images', str(images), '--captions', str(tmp_path / 'coco.json'),
                 '--num', '3', '--size', '8', '--outdir', str(tmp_path / 'ref'),
                 '--prompts-out', str(tmp_path / 'ref.txt')])
    refs = sorted((tmp_path / 'ref').iterdir())  # FID reference images: the first 3 by id, 8 x 8 crops
    assert [q.name for q in refs] == ['000000.png', '000001.png', '000002.png']
    assert Image.open(refs[2]).size == (8, 8) and np.asarray(Image.open(refs[2])).max() == 80
    assert (tmp_path / 'ref.txt').read_text().splitlines() == PROMPTS[:3]  # each image's first caption
    common = ['--batch', '2', '--device', 'cpu', '--quiet', '--tick', '1']
    guided_pd.main(['stage1', '--teacher', str(sd / 'pipe'), '--data', str(images), '--captions',
                    str(tmp_path / 'coco.json'), '--iters', '2', '--run-dir', str(tmp_path / 's1'), *common])
    assert 'clipped to the trained levels [0.0291' in capsys.readouterr().out
    net, meta = models.load(tmp_path / 's1' / 'student')
    assert net.use_guidance_condition and meta['kind'] == 'guided-stage1'
    assert meta['guidance_range'] == [2, 14]
    # diffusers' own pipeline with this UNet (CFG off, w embedded) samples what our sampler does.
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    pipe = StableDiffusionPipeline.from_pretrained(
        sd / 'pipe', unet=UNet2DConditionModel.from_pretrained(tmp_path / 's1' / 'student', subfolder='unet'),
        scheduler=DPMSolverMultistepScheduler(**SD, steps_offset=1), safety_checker=None,
        local_files_only=True)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = pipe('a cat', num_inference_steps=4, guidance_scale=1 + 5.0, latents=z,
                   output_type='latent').images
    ours = solvers.sample(net, latent.init_scale(net.sigma_max) * z, net.discrete_grid(4), 'dpmpp2m',
                          guidance=5.0, encoder_hidden_states=net.encode_prompts(['a cat']))
    assert ((ours - ref).abs().max() / ref.abs().max()) < 1e-5  # measured 2.3e-7 (float32)
    guided_pd.main(['stage2', '--teacher', str(tmp_path / 's1' / 'student'), '--start-n', '4', '--end-n', '2',
                    '--round-iters', '1', '--final-round-iters', '1', '--run-dir', str(tmp_path / 's2'),
                    *common])
    two, meta2 = models.load(tmp_path / 's2' / 'student-n2')
    assert meta2['N'] == 2 and meta2['sampling']['t_steps'][0] == pytest.approx(two.sigma_max)
    args = ['--seeds', '0-1', '--prompt', 'a cat', '--guidance', '3', '--quiet', '--device', 'cpu',
            '--npz', str(tmp_path / 'x.npz')]
    x = sample.main(['--model', str(tmp_path / 's2' / 'student-n2'), *args])
    assert 'NFE 2 per image' in capsys.readouterr().out and x.shape == (2, 3, 16, 16)
    sample.main(['--model', str(tmp_path / 's1' / 'student'), '--nfe', '3', *args])
    assert 'guidance=3' in capsys.readouterr().out  # an input of the network, not CFG: 3 calls
    with pytest.raises(ValueError, match='--captions'):
        guided_pd.main(['stage1', '--teacher', str(sd / 'pipe'), '--data', str(images), '--iters', '1',
                        '--run-dir', str(tmp_path / 's3'), *common])


# ---------------------------------------------------------------------------------------------
# CLIP score, captions, bad input
# ---------------------------------------------------------------------------------------------

class FakeCLIP:
    """open_clip's interface with known features: an image's feature is its mean colour, a prompt's
    is (its length, 1, 0)."""

    def encode_image(self, x):
        return x.mean((2, 3))

    def encode_text(self, ids):
        return torch.stack([ids[:, 0], torch.ones(len(ids)), torch.zeros(len(ids))], 1)


def test_clip_score_formula_and_missing_open_clip(monkeypatch):
    """The mean over pairs of cos(f_image, f_text), by hand; without open_clip one error naming it."""
    images = torch.tensor([[10, 20, 30], [200, 0, 0]], dtype=torch.uint8)[:, :, None, None].expand(2, 3, 4, 4)
    prompts = ['ab', 'abcdef']
    preprocess = lambda im: torch.from_numpy(np.asarray(im, dtype=np.float64)).permute(2, 0, 1)
    tokenizer = lambda texts: torch.tensor([[float(len(t))] for t in texts])
    cos = lambda a, b: np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b)
    want = (cos([10, 20, 30], [2, 1, 0]) + cos([200, 0, 0], [6, 1, 0])) / 2
    got = captions.clip_score(images, prompts, clip=(FakeCLIP(), preprocess, tokenizer), batch=1)
    assert got == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match='N prompts'):
        captions.clip_score(images, prompts[:1], clip=(FakeCLIP(), preprocess, tokenizer))
    monkeypatch.setitem(sys.modules, 'open_clip', None)
    with pytest.raises(latent.MissingExtra, match='pip install open_clip_torch'):
        captions.clip_score(images, prompts)


def test_captions_files(tmp_path):
    """One per line, MS-COCO's captions JSON, SFD's csv; empty or missing files: one error each."""
    (tmp_path / 'a.txt').write_text('a cat\n\n  a dog \n')
    coco = dict(annotations=[dict(caption='a cat '), dict(caption='x')])
    (tmp_path / 'b.json').write_text(json.dumps(coco))
    (tmp_path / 'c.csv').write_text('id,text\n0,a cat\n1,"a dog, running"\n')
    assert captions.read_captions(tmp_path / 'a.txt') == ['a cat', 'a dog']
    assert captions.read_captions(tmp_path / 'b.json') == ['a cat', 'x']
    assert captions.read_captions(tmp_path / 'c.csv') == ['a cat', 'a dog, running']
    (tmp_path / 'e.txt').write_text('\n\n')
    for bad, match in (('e.txt', 'no prompts found'), ('none.txt', 'no such file')):
        with pytest.raises(ValueError, match=f'--captions .*{match}'):
            captions.read_captions(tmp_path / bad)


@needs_diffusers
def test_bad_input_one_error_each(sd, tmp_path):
    """No captions for a text teacher, an unknown spec, settings that cannot work, a missing extra."""
    run = lambda **kw: distill.distill(distill.validate(_cfg(sd, run_dir=str(tmp_path / 'r'), kimg=0.004,
                                                             batch=2, accumulate=1, **kw)),
                                       progress=False, log=lambda *_: None)
    with pytest.raises(ValueError, match='--captions: this model is text-conditioned'):
        run(captions='')
    with pytest.raises(ValueError, match='unknown model'):
        models.kind_of(str(tmp_path / 'no-run' / 'student'))
    for kw, match in ((dict(method='vanilla'), '--method .*sfd or sfd-v only'),
                      (dict(accumulate=3), '--batch 128: must split evenly'),
                      (dict(t_max=20.0), None), (dict(captions=str(tmp_path / 'none.txt')), 'no such file')):
        cfg = _cfg(sd, **kw)
        if match is None:  # beyond the model's levels: refused when the teacher's range is known
            with pytest.raises(ValueError, match=r'--t-max 20: this model knows the noise levels \[0.0291'):
                _net64(sd).check_levels(cfg.t_min, cfg.t_max)
            continue
        with pytest.raises(ValueError, match=match):
            distill.validate(cfg)
    with pytest.raises(ValueError, match='--schedule .*choose one of polynomial, logsnr, time_uniform$'):
        distill.validate(distill.SFDConfig(teacher='toy:ring', schedule=latent.UNIFORM))
    with pytest.raises(ValueError, match='--grad-checkpointing .*diffusers teachers'):
        distill.validate(distill.SFDConfig(teacher='toy:ring', grad_checkpointing=True))
    code = ('import sys; sys.modules["diffusers"] = None; sys.modules["transformers"] = None\n'
            'import cli, distill\n'
            f'cli.run(distill.main, ["--teacher", "nobody/nothing", "--captions", '
            f'{str(sd / "captions.txt")!r}])')
    out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.count('\n') == 1, out.stderr
    assert 'error: diffusers models need the optional extra: pip install -r requirements-latent.txt' \
        in out.stderr


@needs_diffusers
def test_benchmark_runs_on_the_cpu_labelled_and_computes_sd_sizes(capsys):
    """benchmarks/sd_iteration.py: a tiny UNet on the CPU, said so; SD v1.5's parameter counts from the
    configs equal the facts' (859,520,964 UNet, 83,653,863 VAE, 123,060,480 CLIP text)."""
    sys.path.insert(0, str(ROOT / 'benchmarks'))
    import sd_iteration
    lines = sd_iteration.main(['--device', 'cpu', '--batch', '2', '--repeat', '1', '--no-estimate'])
    assert 'TINY UNet' in lines[0] and '6 teacher calls + 2 student steps' in lines[1]
    counts = (sd_iteration.count(__import__('diffusers').UNet2DConditionModel, **sd_iteration.SD_UNET),
              sd_iteration.count(__import__('diffusers').AutoencoderKL, **sd_iteration.SD_VAE))
    assert counts == (859_520_964, 83_653_863)
    assert sd_iteration.saved_bytes(1, True) < sd_iteration.saved_bytes(1, False)  # checkpointing saves less
