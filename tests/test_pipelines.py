"""Tests for stock_pipelines.py: distilled students in diffusers' own StableDiffusionPipeline and
DDPMPipeline give the latents sample.py gives from the same noise (float64, 1e-6 relative; measured
~1e-15), and every student the stock loop cannot express gets one clear error.

The students are the tiny random teachers saved as students with the recipes distill.py and
guided_pd.py write (training does not change how a student samples); nothing is downloaded.
"""
import dataclasses
import importlib.util
import json
import math

import pytest
import torch

import distill
import guided_pd
import hub
import latent
import models
import sample

pytestmark = [pytest.mark.filterwarnings('ignore:__array__ implementation:DeprecationWarning'),
              pytest.mark.filterwarnings('ignore:.*accelerate.*'),
              pytest.mark.filterwarnings('ignore:There are modules in'),
              pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ('diffusers', 'transformers')),
                                 reason=f'the optional extra is not installed ({latent.EXTRA})')]
TOL = 1e-6
PROMPT = 'a red cat'


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _random(module, seed):
    """Random weights where a default init is zero (a zero cond_proj would hide a wrong fold)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) / math.sqrt(p[0].numel()))
    return module


@pytest.fixture(scope='module')
def sd(tmp_path_factory):
    """The tiny Stable Diffusion pipeline of test_distill_latent, saved; its float64 Denoiser."""
    from diffusers import StableDiffusionPipeline
    from test_distill_latent import _parts
    root = tmp_path_factory.mktemp('pipes')
    StableDiffusionPipeline(**_parts(), safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(root / 'sd')
    return root


def _sfd_recipe(net, nfe, afs, method='sfd', nfe_list=(2, 3)):
    """The recipe distill.py stores for a diffusers student (SFD Table 6's SD grid, t_min 0.1)."""
    cfg = dataclasses.replace(distill.SFDConfig(), method=method, nfe=nfe, nfe_list=nfe_list, afs=afs,
                              schedule=latent.UNIFORM, rho=1.0, t_min=0.1, t_max=net.sigma_max)
    return distill.sampling_recipe(cfg, net).to_dict()


def _student(spec, folder, name, recipe, condition=None, prior='edm', method='sfd'):
    """The teacher at `spec` saved as a student (models.save_student) with a recipe; its condition
    projection random, so that a fold that dropped it would show."""
    net = hub.load(spec, dtype=torch.float64)[0]
    if condition:
        getattr(net, f'enable_{condition}_condition')()
        _random(net.unet.time_embedding.cond_proj, 7)
    recipe = recipe(net) if callable(recipe) else recipe  # SFD-v's step values need the step condition
    return models.save_student(folder, name, net, prior=prior, sampling=recipe, method=method,
                               teacher=str(spec))


def _ours(folder, z, nfe=None, guidance=None, prompt=PROMPT, monkeypatch=None):
    """sample.generate's latents from unit noise z (its decode stopped at the VP latent)."""
    net, meta = models.load(folder)
    net = net.double()
    monkeypatch.setattr(sample, 'noise', lambda seeds, *a, **k: (z, None, []))  # our z
    if net.vae is not None:  # the latents the VAE would decode
        monkeypatch.setattr(net, 'decode', lambda x, sigma=0.0, batch=8: x / math.sqrt(1 + float(sigma) ** 2))
    return sample.generate(net, [0] * len(z), sample.resolve_sampling(meta, nfe, net), nfe, guidance=guidance,
                           progress=False, raw=True, prompts=[prompt] if net.text else None)


def _sd_pipe(sd, unet_folder, sched_folder):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from stock_pipelines import StudentScheduler
    pipe = StableDiffusionPipeline.from_pretrained(
        sd / 'sd', unet=UNet2DConditionModel.from_pretrained(unet_folder, subfolder='unet'),
        scheduler=StudentScheduler.from_pretrained(sched_folder, subfolder='scheduler'),
        safety_checker=None, local_files_only=True)
    return pipe.to(torch.float64)


def _theirs(pipe, z, nfe, guidance_scale=1.0):
    with torch.no_grad():
        return pipe([PROMPT] * len(z), num_inference_steps=nfe, guidance_scale=guidance_scale, latents=z,
                    output_type='latent').images


def _z(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_sfd_and_second_stage_students_in_stable_diffusion_pipeline(sd, tmp_path, monkeypatch):
    """SFD (3 NFE, AFS folded into init_noise_sigma; with and without classifier-free guidance) and a
    1-NFE second-stage student, each straight from its student folder."""
    net = hub.load(sd / 'sd')[0]
    z = _z((2, 4, 8, 8))
    for name, recipe, method in (('sfd', _sfd_recipe(net, 3, True), 'sfd'),
                                 ('second', _sfd_recipe(net, 1, True, 'second-stage'), 'second-stage')):
        folder = _student(sd / 'sd', tmp_path, name, recipe, method=method)
        config = json.loads((folder / 'scheduler' / 'scheduler_config.json').read_text())
        assert config['_class_name'] == 'StudentScheduler'
        pipe = _sd_pipe(sd, folder, folder)
        nfe = recipe['nfe']
        for w in (0.0, 2.0):  # guidance_scale = 1 + w: SD's CFG is SFD Eq. 9 in the eps form
            theirs = _theirs(pipe, z, nfe, 1 + w)
            ours = _ours(folder, z, guidance=w or None, monkeypatch=monkeypatch)
            assert _rel(theirs, ours) < TOL, (name, w, _rel(theirs, ours))
    # the folder still loads as the teacher's levels (a later run reads it as a teacher)
    assert torch.equal(models.load(folder)[0].sigmas, net.sigmas)


def test_sfd_v_exported_at_one_nfe_and_a_guided_student(sd, tmp_path, monkeypatch, capsys):
    """SFD-v (NFE 2, 3): its scheduler refuses, `export --nfe 3` folds step = 4 into the time MLP's bias
    (no time_cond_proj_dim left) and the pipeline gives sample.py's NFE-3 latents. A w-conditioned Meng
    stage-two student: the pipeline's own guidance embedding is its input (guidance_scale = 1 + w)."""
    import stock_pipelines
    net = hub.load(sd / 'sd')[0]
    z = _z((1, 4, 8, 8), 1)
    folder = _student(sd / 'sd', tmp_path, 'sfdv', lambda n: _sfd_recipe(n, 2, False, 'sfd-v'),
                      condition='step', method='sfd-v')
    pipe = _sd_pipe(sd, folder, folder)
    with pytest.raises(ValueError, match=r'SFD-v student .* export .* \(N in \[2, 3\]\)'):
        _theirs(pipe, z, 3)
    stock_pipelines.main(['export', str(folder), str(tmp_path / 'out'), '--nfe', '3'])
    assert 'wrote' in capsys.readouterr().out
    unet_config = json.loads((tmp_path / 'out' / 'unet' / 'config.json').read_text())
    assert unet_config['time_cond_proj_dim'] is None
    theirs = _theirs(_sd_pipe(sd, tmp_path / 'out', tmp_path / 'out'), z, 3)
    assert _rel(theirs, _ours(folder, z, nfe=3, monkeypatch=monkeypatch)) < TOL
    recipe = guided_pd.sampling_recipe(2, False, net.sigma_min, net.sigma_max).to_dict()
    folder = _student(sd / 'sd', tmp_path, 'meng', recipe, condition='guidance', method='guided-stage2')
    theirs = _theirs(_sd_pipe(sd, folder, folder), z, 2, guidance_scale=1 + 3.0)
    assert _rel(theirs, _ours(folder, z, guidance=3.0, monkeypatch=monkeypatch)) < TOL


def test_pixel_ddpm_student_in_ddpm_pipeline(tmp_path, monkeypatch):
    """A UNet2DModel DDPM teacher's SFD student (2 NFE + AFS, from t_max z): DDPMPipeline scales
    nothing, so the scheduler refuses until `export` folds the start scale into conv_in; then the
    stock DDPMPipeline gives sample.py's images from the same generator's noise."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    import stock_pipelines
    unet = UNet2DModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                       down_block_types=('DownBlock2D', 'AttnDownBlock2D'),
                       up_block_types=('AttnUpBlock2D', 'UpBlock2D'))
    DDPMPipeline(unet=_random(unet, 3).eval(), scheduler=DDPMScheduler()).save_pretrained(tmp_path / 'ddpm')
    net = hub.load(tmp_path / 'ddpm')[0]
    folder = _student(tmp_path / 'ddpm', tmp_path, 'student', _sfd_recipe(net, 2, True))
    load = lambda f: DDPMPipeline(
        unet=UNet2DModel.from_pretrained(f, subfolder='unet').double(),
        scheduler=stock_pipelines.StudentScheduler.from_pretrained(f, subfolder='scheduler'))
    with pytest.raises(ValueError, match='neither scales its noise .* export'):
        load(folder)(num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    stock_pipelines.export(folder, tmp_path / 'out')
    pipe, last = load(tmp_path / 'out'), []
    step = pipe.scheduler.step
    monkeypatch.setattr(pipe.scheduler, 'step', lambda *a, **k: last.append(step(*a, **k)) or last[-1])
    with torch.no_grad():  # the pipeline clamps its output to [0, 1]: compare the final state itself
        pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
             output_type='pt')
    z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert len(last) == 2 and _rel(last[-1].prev_sample, _ours(folder, z, monkeypatch=monkeypatch)) < TOL


def test_clear_errors(sd, tmp_path):
    """An NFE the student was not trained at, an export NFE missing, a stochastic student, a folder
    whose scheduler is the teacher's (older folders: they still load)."""
    import stock_pipelines
    net = hub.load(sd / 'sd')[0]
    folder = _student(sd / 'sd', tmp_path, 'sfd', _sfd_recipe(net, 2, False))
    sched = stock_pipelines.StudentScheduler.from_pretrained(folder, subfolder='scheduler')
    with pytest.raises(ValueError, match=r'num_inference_steps=4: this student was distilled for NFE \[2\]'):
        sched.set_timesteps(4)
    with pytest.raises(ValueError, match=r'--nfe 5: this student was distilled for NFE \[2\]'):
        stock_pipelines.export(folder, tmp_path / 'out', nfe=5)
    stochastic = guided_pd.sampling_recipe(2, True, net.sigma_min, net.sigma_max).to_dict()
    other = _student(sd / 'sd', tmp_path, 'stoch', stochastic, condition='guidance', method='guided-stage2')
    with pytest.raises(ValueError, match="stochastic sampler .* sample.py .* --stochastic"):
        stock_pipelines.StudentScheduler.from_pretrained(other, subfolder='scheduler').set_timesteps(2)
    old = json.loads((sd / 'sd' / 'scheduler' / 'scheduler_config.json').read_text())  # as folders were
    (folder / 'scheduler' / 'scheduler_config.json').write_text(json.dumps(old))
    assert torch.equal(models.load(folder)[0].sigmas, net.sigmas)
    with pytest.raises(ValueError, match='not a StudentScheduler'):
        stock_pipelines.export(folder, tmp_path / 'out')
