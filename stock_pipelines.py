"""Distilled students in diffusers' stock pipelines: a scheduler that takes the student's own steps.

An SFD student (Zhou et al. 2024, Alg. 8) samples with Euler steps over its own grid, from t_max z,
and ends at t_min without a final denoise; a Meng et al. stage-two student takes DDIM (= Euler)
steps over its cosine grid. No diffusers scheduler has those grids, so `StudentScheduler` is one
of the project's: hub.save_student writes it into the student folder's scheduler/, and

    pipe = StableDiffusionPipeline.from_pretrained(BASE,
        unet=UNet2DConditionModel.from_pretrained(STUDENT, subfolder='unet'),
        scheduler=StudentScheduler.from_pretrained(STUDENT, subfolder='scheduler'))
    image = pipe(prompt, num_inference_steps=NFE, guidance_scale=1.0).images[0]

gives the latents `python sample.py --model STUDENT` gives from the same noise (diffusers cannot
import the class by name from a folder: pass it as above). The stock loop is

    set_timesteps(NFE); x = z * init_noise_sigma
    for t in timesteps: x = step(unet(scale_model_input(x, t), t), t, x)

so the scheduler keeps the state as the UNet's own input, the VP latent y = x / sqrt(1 + sigma^2)
of the EDM state x (SFD Eq. 2-4): scale_model_input is the identity, which DDPMPipeline (it calls
neither scale_model_input nor scales its noise) needs too. The start x = t_max z (or diffusers'
sqrt(1 + t_max^2) z) is init_noise_sigma, and so is SFD's analytical first step (Sec. 3.2): it
multiplies x by 1 + (t_1 - t_0) / sqrt(1 + t_0^2), so it saves its call in the stock loop as well.
The last step returns the latents sample.py decodes.

What a scheduler alone cannot carry, `export` folds into the UNet: SFD-v's step condition N at one
NFE (the pipeline feeds guidance through timestep_cond: the projection of the fixed N becomes a
bias of the time MLP) and, for DDPMPipeline, a start scale other than 1 (folded into conv_in).

    python stock_pipelines.py export runs/<run>/student out/ --nfe 3     # one NFE of an SFD-v student
"""

import json
import math
import os
import shutil
from pathlib import Path

import diffusers
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput

import latent
import solvers

SOLVERS = ('euler', 'stochastic')  # recipes whose students get this scheduler; others keep the teacher's
SAMPLE = 'python sample.py --model STUDENT_FOLDER --nfe N'  # the project's own sampler, shown in errors


def student_grids(net, recipe):
    """{str(NFE): t_steps as floats} of a recipe, every trained NFE (sample.py's make_plan grids)."""
    r = solvers.Recipe.from_dict(recipe)
    grids = {}
    for nfe in r.nfes():
        if r.t_steps is None and r.schedule not in solvers.SCHEDULES + ('discrete',):
            # a grid of the model's own kind (SFD App. D.2, uniform in the UNet's timestep)
            n = solvers.steps_for_nfe(r.solver, nfe, r.afs, r.ends_at_zero) - r.ends_at_zero
            t = net.schedule(n, r.t_min, r.t_max, r.schedule, r.rho)
            t = solvers.append_zero(t) if r.ends_at_zero else t
        else:
            t = solvers.schedule_for(r, nfe, warn=False)[0]
        grids[str(nfe)] = [float(v) for v in t]
    return grids


def for_student(net, recipe, prior):
    """The `StudentScheduler` of a latent.Denoiser student sampled by `recipe` from `prior`."""
    teacher = net._parts.scheduler
    r = solvers.Recipe.from_dict(recipe)
    return StudentScheduler(grids=student_grids(net, r), afs=r.afs, prior=prior, solver=r.solver,
                            prediction_type=net.prediction_type, step_values=r.step_values,
                            teacher_scheduler={'_class_name': type(teacher).__name__,
                                               **{k: v for k, v in teacher.config.items() if k[0] != '_'}})


class StudentScheduler(SchedulerMixin, ConfigMixin):
    """Euler steps over a distilled student's own grid, as sample.py takes them, for stock pipelines."""
    order = 1

    @register_to_config
    def __init__(self, grids=None, afs=False, prior='edm', solver='euler', prediction_type='epsilon',
                 step_values=None, input_scale=1.0, teacher_scheduler=None):
        if not grids or not teacher_scheduler:
            raise ValueError('StudentScheduler needs grids= and teacher_scheduler= (hub.save_student writes '
                             'them; read it with StudentScheduler.from_pretrained(folder, subfolder=...))')
        if prior not in ('vp', 'edm') or prediction_type not in latent.PREDICTIONS:
            raise ValueError(f'prior {prior!r} / prediction_type {prediction_type!r} unknown')
        self.alphas_cumprod = self.teacher().alphas_cumprod  # the teacher's noise levels
        self.timesteps, self.grid, self.calls = None, None, None
        self.init_noise_sigma = 1.0
        self._scaled = False

    def teacher(self):
        """The teacher's own diffusers scheduler (its noise levels alphas_cumprod, its config)."""
        config = dict(self.config.teacher_scheduler)
        cls = getattr(diffusers, config.pop('_class_name'), None)
        if not isinstance(cls, type) or not issubclass(cls, SchedulerMixin):
            name = self.config.teacher_scheduler.get('_class_name')
            raise ValueError(f'unknown teacher scheduler {name!r}: not one of the installed diffusers')
        return cls.from_config(config)

    # --- the stock loop's three calls ----------------------------------------------------------

    def set_timesteps(self, num_inference_steps=None, device=None, **kwargs):
        """The UNet timesteps tau(t_i) of the student's grid at this NFE (one per call)."""
        c = self.config
        if kwargs.get('timesteps') is not None or kwargs.get('sigmas') is not None:
            raise ValueError("a distilled student samples its own grid: pass num_inference_steps (its NFE), "
                             'not timesteps= or sigmas=')
        if c.solver != 'euler':
            raise ValueError(f"this student samples with Meng's stochastic sampler (fresh noise every step), "
                             f'which no stock pipeline loop expresses: {SAMPLE} --stochastic')
        if c.step_values:
            raise ValueError(f"this SFD-v student is told its NFE through the UNet's time_cond_proj_dim, "
                             f'where stock pipelines feed the guidance scale: fold one NFE into it with '
                             f'`python stock_pipelines.py export STUDENT_FOLDER OUT --nfe N` (N in '
                             f'{self.nfes()}), or sample it with {SAMPLE}')
        if str(num_inference_steps) not in c.grids:
            raise ValueError(f'num_inference_steps={num_inference_steps}: this student was distilled for NFE '
                             f'{self.nfes()} only; another NFE samples only with {SAMPLE} (with a warning)')
        self._select(str(num_inference_steps), device)

    def nfes(self):
        """The NFE the student was distilled for."""
        return sorted(int(n) for n in self.config.grids)

    def start_scale(self, nfe):
        """The VP latent y before the first call as a multiple of the unit noise z."""
        c, t = self.config, [float(v) for v in self.config.grids[str(nfe)]]
        start = math.sqrt(1 + t[0] ** 2) if c.prior == 'vp' else t[0]  # x_0 = start z
        if c.afs:  # x_1 = x_0 + (t_1 - t_0) x_0 / sqrt(1 + t_0^2) (solvers.afs_eps): a scale of z
            start *= 1 + (t[1] - t[0]) / math.sqrt(1 + t[0] ** 2)
        return start / math.sqrt(1 + t[int(c.afs)] ** 2)  # y = x / sqrt(1 + t^2) at the first call

    def _select(self, nfe, device):
        """Fix the grid t_0 > ... > t_n, its calls (t_1.. with AFS) and the start (init_noise_sigma)."""
        c = self.config
        t = self.grid = [float(v) for v in c.grids[nfe]]
        self.calls = list(range(int(c.afs), len(t) - 1))  # SFD Alg. 5: the first step is analytic, no call
        sigmas = latent.sigmas_from_alphas_cumprod(self.alphas_cumprod)
        levels = torch.tensor([t[i] for i in self.calls], dtype=torch.float64)
        tau = latent.timestep_from_sigma(levels, sigmas)
        self.timesteps = tau.to(torch.float32).to(device)  # what latent.Denoiser feeds the UNet
        # The noise is scaled here; what conv_in carries (an exported pixel UNet) is not.
        self.init_noise_sigma = self.start_scale(nfe) / c.input_scale
        self._scaled = False

    def scale_model_input(self, sample, timestep=None):
        """The identity: the state is the UNet's input already (noted: the pipeline scales)."""
        self._scaled = True
        return sample

    def step(self, model_output, timestep, sample, generator=None, return_dict=True, **kwargs):
        """x_next = x + (t_next - t) (x - D) / t (SFD Eq. 6), with D from the UNet's raw output."""
        if self.timesteps is None:
            raise ValueError('call set_timesteps(num_inference_steps) first')
        k = (self.timesteps == torch.as_tensor(timestep).to(self.timesteps)).nonzero().flatten()
        if len(k) != 1:
            raise ValueError(f'timestep {timestep} is not one of this schedule\'s {self.timesteps.tolist()}')
        k = int(k[0])
        c, i = self.config, self.calls[k]
        if k == 0 and self.init_noise_sigma != 1 and not self._scaled:
            raise ValueError(f'this pipeline neither scales its noise nor calls scale_model_input '
                             f'(DDPMPipeline): the student starts from {self.init_noise_sigma:.6g} z; fold '
                             f'that into its UNet with `python stock_pipelines.py export STUDENT_FOLDER OUT`')
        work = torch.float64 if sample.dtype == torch.float64 else torch.float32
        t, t_next = self.grid[i], self.grid[i + 1]
        x = sample.to(work) * (c.input_scale * math.sqrt(1 + t * t))  # the EDM state x = y sqrt(1 + t^2)
        out = model_output[:, :sample.shape[1]].to(work)  # learned-variance UNets append channels
        D = latent.denoised(x, torch.tensor(t, dtype=work, device=x.device), out, c.prediction_type)
        x = x + (t_next - t) / t * (x - D)
        if i + 1 == len(self.grid) - 1:  # the end: what sample.py decodes (x itself from t_max z)
            y = x / math.sqrt(1 + t_next ** 2) if c.prior == 'vp' else x
        else:
            y = x / (math.sqrt(1 + t_next ** 2) * c.input_scale)
        y = y.to(sample.dtype)
        return SchedulerOutput(prev_sample=y) if return_dict else (y,)


# ---------------------------------------------------------------------------------------------
# Export: what the scheduler cannot carry, folded into the UNet
# ---------------------------------------------------------------------------------------------

def fold_step(unet, step):
    """SFD-v's fixed step condition N into the time MLP: linear_1(s + P c) = W s + (b + W P c), c the
    step's sinusoids (latent.condition_embedding); the UNet loses time_cond_proj_dim."""
    emb = unet.time_embedding
    P, W, b = emb.cond_proj.weight, emb.linear_1.weight, emb.linear_1.bias
    c = latent.condition_embedding('step', step, 1, P.shape[1]).to(P.dtype)[0]
    with torch.no_grad():
        b.copy_((b.double() + W.double() @ (P @ c).double()).to(b.dtype))
    emb.cond_proj = None
    unet.register_to_config(time_cond_proj_dim=None)


def fold_input_scale(unet, scale):
    """A pixel UNet2DModel's first convolution takes inputs `scale` times larger: conv_in(s y) with
    the weight times s, so DDPMPipeline's unscaled noise is the student's first input."""
    skips = any(hasattr(b, 'skip_conv') for b in unet.down_blocks)
    if unet.config.get('center_input_sample') or skips:
        raise ValueError('this UNet uses its input beyond conv_in (center_input_sample or skip blocks): its '
                         f'start scale cannot be folded; sample it with {SAMPLE}')
    with torch.no_grad():
        unet.conv_in.weight.mul_(scale)


def export(folder, out, nfe=None):
    """A folder for stock pipelines from a student folder: unet/ (SFD-v's step at `nfe` folded; a pixel
    student's start scale folded) and scheduler/ (that NFE only). Written atomically; returns `out`."""
    folder, out = Path(folder).expanduser(), Path(out).expanduser()
    if (folder / 'pytorch_lora_weights.safetensors').is_file() and not (folder / 'unet').is_dir():
        raise ValueError(f'{folder} is a LoRA student: fold its adapters into a full UNet first '
                         f'(python hub.py fuse {folder} FULL), then export FULL')
    try:
        config = json.loads((folder / 'scheduler' / 'scheduler_config.json').read_text())
        unet_class = json.loads((folder / 'unet' / 'config.json').read_text())['_class_name']
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f'{folder}: not a student folder ({type(e).__name__}: {e})') from None
    if config.get('_class_name') != StudentScheduler.__name__:
        raise ValueError(f'{folder}: its scheduler is {config.get("_class_name")}, not a StudentScheduler (a '
                         'student that samples as its teacher, or one saved before stock-pipeline support): '
                         'use it with the teacher\'s scheduler, or sample it with sample.py')
    sched = StudentScheduler.from_pretrained(folder, subfolder='scheduler')
    nfes = sched.nfes()
    nfe = nfe if nfe is not None else (nfes[0] if len(nfes) == 1 else None)
    if nfe not in nfes:
        raise ValueError(f'--nfe {nfe}: this student was distilled for NFE {nfes}: choose one of them')
    unet = getattr(diffusers, unet_class).from_pretrained(folder, subfolder='unet', low_cpu_mem_usage=False)
    c = dict(sched.config)
    if c['step_values']:
        fold_step(unet, c['step_values'][str(nfe)])
    c.update(grids={str(nfe): c['grids'][str(nfe)]}, step_values=None)
    scale = sched.start_scale(nfe)
    if unet_class == 'UNet2DModel' and scale != 1:  # DDPMPipeline scales nothing: conv_in does
        fold_input_scale(unet, scale / c['input_scale'])
        c['input_scale'] = scale
    tmp = out.with_name(f'.{out.name}.tmp{os.getpid()}')
    shutil.rmtree(tmp, ignore_errors=True)
    unet.save_pretrained(tmp / 'unet')
    StudentScheduler(**c).save_pretrained(tmp / 'scheduler')
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def main(argv=None):
    """`python stock_pipelines.py export STUDENT OUT [--nfe N]`."""
    import cli
    p = cli.parser(__doc__)
    sub = p.add_subparsers(dest='command', required=True)
    e = sub.add_parser('export', help='a folder for stock pipelines, one NFE folded into the UNet')
    e.add_argument('student', help='a student folder (hub.save_student: runs/<run>/student)')
    e.add_argument('out', help='the folder to write (unet/, scheduler/)')
    e.add_argument('--nfe', type=int, help='the NFE (required when the student has several)')
    args = p.parse_args(argv)
    out = export(args.student, args.out, args.nfe)
    print(f'wrote {out}: give the stock pipeline its unet/ and '
          f'scheduler=StudentScheduler.from_pretrained({str(out)!r}, subfolder="scheduler")')


if __name__ == '__main__':
    import cli
    cli.run(main)
