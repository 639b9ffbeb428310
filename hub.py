"""Diffusers models from the Hugging Face hub or a folder, and the folder format of distilled students.

latent.py makes a diffusers UNet an EDM-form denoiser; this file finds and reads one. A *spec* is a
hub id (owner/name, e.g. stable-diffusion-v1-5/stable-diffusion-v1-5 or google/ddpm-cifar10-32), a
folder written by pipeline.save_pretrained (it has model_index.json), or a student folder written
by `save_student` (it has diffdistill.json). `load` reads each component with diffusers' or
transformers' own from_pretrained -- the Hugging Face cache first, one download only when that
fails and downloads are allowed (HF_HUB_OFFLINE unset) -- and builds only the classes the
installed diffusers and transformers define, so no code from a model's files runs.

A distilled student (SFD, Zhou et al. 2024; Meng et al. 2023) is saved the way diffusers saves a
UNet (safetensors, `time_cond_proj_dim` in its config), next to its scheduler and a small JSON
file: the sampling recipe, the lineage, and the base pipeline whose VAE, text encoder and
tokenizer it shares. diffusers reads the UNet back with UNet2DConditionModel.from_pretrained.

diffusers and transformers are an optional extra (`pip install -r requirements-latent.txt`): this
file imports without them and `load` says which requirements file to install.

    python hub.py stable-diffusion-v1-5/stable-diffusion-v1-5    # load it, print its metadata
"""

import json
import os
import re
import shutil
from pathlib import Path

import torch

import cli
import latent
import solvers

# What load() takes from a pipeline; everything else (safety checker, feature extractor) is skipped.
COMPONENTS = ('unet', 'scheduler', 'vae', 'vqvae', 'text_encoder', 'tokenizer')
_HUB_ID = re.compile(r'[\w.-]+/[\w.-]+')

STUDENT_FILE = 'diffdistill.json'
STUDENT_FORMAT = 'diffdistill-diffusers-student-v1'


# ---------------------------------------------------------------------------------------------
# Which names are diffusers models
# ---------------------------------------------------------------------------------------------

def is_spec(spec):
    """Does `spec` name a diffusers model: a folder with model_index.json (a pipeline) or diffdistill.json
    (a student, `save_student`), or a hub id owner/name that is no local path and no model file?"""
    spec, path = str(spec), Path(str(spec)).expanduser()
    if path.exists():
        return (path / 'model_index.json').is_file() or is_student(path)
    return bool(_HUB_ID.fullmatch(spec)) and path.suffix not in ('.pt', '.pth', '.pkl')


def is_student(spec):
    """Is `spec` a folder written by `save_student`?"""
    return (Path(str(spec)).expanduser() / STUDENT_FILE).is_file()


# ---------------------------------------------------------------------------------------------
# Reading a pipeline: the cache first, then (hub ids, online) one download
# ---------------------------------------------------------------------------------------------

def _offline():
    """True when Hugging Face downloads are switched off (HF_HUB_OFFLINE, read at call time)."""
    import huggingface_hub.constants as c
    env = os.environ.get('HF_HUB_OFFLINE', '').strip().lower() in ('1', 'true', 'yes', 'on')
    return env or bool(c.HF_HUB_OFFLINE)


def _fetch(get, spec, hub):
    """get(local_files_only) from the cache first; then (hub ids, online) with a download; else one error."""
    try:
        return get(True)
    except (OSError, ValueError) as e:
        if not hub:
            raise ValueError(f'{spec}: cannot read the saved pipeline ({e})') from None
        first = e
    if not _offline():
        try:
            return get(False)
        except Exception as e:  # no network, unknown repo, gated repo: all end here
            first = e
            while first.__cause__ or first.__context__:  # the root cause (diffusers rewords it)
                first = first.__cause__ or first.__context__
    import huggingface_hub.constants as c
    why = 'HF_HUB_OFFLINE is set' if _offline() else f'{type(first).__name__}: {str(first)[:200]}'
    raise ValueError(f'{spec!r} is not (completely) in the Hugging Face cache {c.HF_HUB_CACHE} and could '
                     f'not be downloaded ({why}). Run the same command once with network access (it '
                     f'downloads only the components it uses), or `hf download {spec}` on another machine '
                     'and copy its cache here (HF_HOME or HF_HUB_CACHE choose the folder), or pass a folder '
                     'written by pipeline.save_pretrained') from None


def _where(spec):
    """(the name from_pretrained takes, is it a hub id?) of a spec, or one error for neither form."""
    spec = str(spec)
    folder = Path(spec).expanduser()
    hub = not folder.exists()
    if hub and not _HUB_ID.fullmatch(spec):
        raise ValueError(f'{spec!r} is neither a folder nor a Hugging Face hub id (owner/name)')
    if not hub and not (folder / 'model_index.json').is_file():
        raise ValueError(f'{spec}: not a diffusers pipeline folder (no model_index.json); write one with '
                         'pipeline.save_pretrained(folder)')
    return (spec if hub else str(folder)), hub


def _component_class(spec, name, entry, diffusers, transformers):
    """The class model_index.json names for one component: diffusers' or transformers' own, or None
    for a component the pipeline leaves out; anything else is refused (its code would have to run)."""
    if not isinstance(entry, (list, tuple)) or len(entry) != 2 or entry[1] is None:
        return None
    lib, cls_name = entry
    cls = getattr({'diffusers': diffusers, 'transformers': transformers}.get(lib), cls_name, None)
    if cls is None:
        raise ValueError(f'{spec}: component {name} is {lib}.{cls_name}; only classes of the installed '
                         'diffusers and transformers are loaded')
    return cls


def _read_pipeline(spec, dtype=None, names=COMPONENTS):
    """(components by name, model_index.json) of a hub id or pipeline folder, each component read with
    its own from_pretrained (cache first, then one download); only the named ones."""
    diffusers, transformers = latent._require()
    where, hub = _where(spec)
    index = _fetch(lambda lfo: diffusers.DiffusionPipeline.load_config(where, local_files_only=lfo),
                   str(spec), hub)
    parts = {}
    for name in names:
        cls = _component_class(spec, name, index.get(name), diffusers, transformers)
        if cls is None:
            continue
        kwargs = dict(subfolder=name)
        if isinstance(cls, type) and issubclass(cls, torch.nn.Module):
            kwargs['dtype'] = dtype or torch.float32
            if index[name][0] == 'diffusers':  # accelerate (optional) only speeds loading up
                kwargs['low_cpu_mem_usage'] = diffusers.utils.is_accelerate_available()
        get = lambda lfo, cls=cls, kwargs=kwargs: cls.from_pretrained(where, local_files_only=lfo, **kwargs)
        parts[name] = _fetch(get, str(spec), hub)
    return parts, index


def _assemble(unet, scheduler, parts, spec, use_fp16, prediction_type=None):
    """latent.wrap() with the pipeline's frozen parts, checked: a text UNet needs its text encoder."""
    net = latent.wrap(unet, scheduler, prediction_type, vae=parts.get('vae', parts.get('vqvae')),
                      text_encoder=parts.get('text_encoder'), tokenizer=parts.get('tokenizer'),
                      use_fp16=use_fp16)
    if net.text and net.text_encoder is None:
        raise ValueError(f'{spec}: a text-conditioned UNet without text_encoder and tokenizer')
    return net


def load(spec, device='cpu', dtype=None, use_fp16=True):
    """(latent.Denoiser, meta) for a diffusers pipeline: a hub id ('google/ddpm-cifar10-32', ...) or a
    folder with model_index.json; a student folder goes to `load_student`.

    Only diffusers/transformers classes named by model_index.json are built (no code from the
    model's files runs); the UNet, scheduler, VAE, text encoder and tokenizer are read one by one,
    so a safety checker is never downloaded. dtype: the weights' dtype (default float32);
    use_fp16: bf16 autocast for the UNet on CUDA. meta is a plain dict (`describe`).
    """
    if is_student(spec):
        return load_student(spec, device, dtype, use_fp16)
    parts, index = _read_pipeline(spec, dtype)
    if 'unet' not in parts or 'scheduler' not in parts:
        raise ValueError(f'{spec}: only UNet pipelines are supported (this one has {sorted(parts)})')
    net = _assemble(parts['unet'], parts['scheduler'], parts, spec, use_fp16)
    folder = Path(str(spec)).expanduser()
    net.base = str(folder.resolve()) if folder.exists() else str(spec)  # what a student points back to
    return net.to(device), describe(net, source=str(spec), pipeline=index.get('_class_name'))


# ---------------------------------------------------------------------------------------------
# Distilled students: saved the way diffusers saves a UNet, read back as a model spec
# ---------------------------------------------------------------------------------------------

def save_student(folder, net, prior=None, **meta):
    """Write a distilled diffusers model so that diffusers itself reads it (atomically: built under a
    temporary name, then swapped in); returns `folder` as a Path:

        folder/unet/              net.unet.save_pretrained: config.json (time_cond_proj_dim included)
                                  and diffusion_pytorch_model.safetensors, i.e.
                                  UNet2DConditionModel.from_pretrained(folder, subfolder='unet')
        folder/scheduler/         a student sampled with Euler steps over its own grid (SFD, Meng's
                                  stage two): stock_pipelines.StudentScheduler, which samples it in
                                  stock pipelines and holds the teacher's scheduler config (the noise
                                  levels); any other (Meng's stage one): the teacher's own scheduler
        folder/diffdistill.json   base (the pipeline whose VAE, text encoder and tokenizer it uses),
                                  condition, prior ('edm': sampled from t_max z; default net.prior),
                                  prediction type, and `meta`: plain data, the sampling recipe and lineage
    """
    if net._parts.scheduler is None or net.base is None:
        raise ValueError('save_student needs a denoiser made by hub.load (its scheduler and base known)')
    info = dict(format=STUDENT_FORMAT, base=net.base, condition=net.condition, prior=prior or net.prior,
                prediction_type=net.prediction_type, meta=meta)
    text = json.dumps(info, indent=1)  # TypeError now for anything that is not plain data
    folder = Path(folder)
    tmp, old = (folder.with_name(f'.{folder.name}.{what}{os.getpid()}') for what in ('tmp', 'old'))
    shutil.rmtree(tmp, ignore_errors=True)
    net.unet.save_pretrained(tmp / 'unet')
    _student_scheduler(net, prior or net.prior, meta.get('sampling')).save_pretrained(tmp / 'scheduler')
    (tmp / STUDENT_FILE).write_text(text)
    if folder.exists():  # swap: a reader sees the old folder or the new one, never half of one
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def _student_scheduler(net, prior, recipe):
    """The scheduler a student folder holds: stock_pipelines.StudentScheduler for a recipe of its
    solvers (imported here: it needs diffusers), else the teacher's own."""
    if recipe is None:
        return net._parts.scheduler
    import stock_pipelines
    if solvers.Recipe.from_dict(recipe).solver not in stock_pipelines.SOLVERS:
        return net._parts.scheduler  # Meng's stage one: sampled as its teacher, by the teacher's scheduler
    return stock_pipelines.for_student(net, recipe, prior)


def _read_student_info(folder):
    """(diffdistill.json, the class names of its UNet and scheduler), or one error naming the folder."""
    try:
        info = json.loads((folder / STUDENT_FILE).read_text())
        if info.get('format') != STUDENT_FORMAT:
            raise ValueError(f'format {info.get("format")!r}, expected {STUDENT_FORMAT!r}')
        classes = {name: json.loads((folder / name / file).read_text())['_class_name']
                   for name, file in (('unet', 'config.json'), ('scheduler', 'scheduler_config.json'))}
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f'{folder}: not a readable student folder ({type(e).__name__}: {e})') from None
    return info, classes


def load_student(folder, device='cpu', dtype=None, use_fp16=True):
    """(latent.Denoiser, meta) of a `save_student` folder: its UNet and scheduler, and the VAE, text
    encoder and tokenizer of its base pipeline (read from the Hugging Face cache or that folder; its
    UNet is not read). meta = `describe` updated with the stored meta (recipe, method, lineage) and
    `base`."""
    diffusers, _ = latent._require()
    folder = Path(str(folder)).expanduser()
    info, classes = _read_student_info(folder)
    cls = {name: getattr(diffusers, c, None) for name, c in classes.items()}
    own = classes['scheduler'] == 'StudentScheduler'  # stock_pipelines' (older folders: the teacher's)
    if own:
        import stock_pipelines
        cls['scheduler'] = stock_pipelines.StudentScheduler
    if None in cls.values():
        raise ValueError(f'{folder}: unknown diffusers classes {classes}')
    unet = cls['unet'].from_pretrained(folder, subfolder='unet', local_files_only=True,
                                       dtype=dtype or torch.float32,
                                       low_cpu_mem_usage=diffusers.utils.is_accelerate_available())
    scheduler = cls['scheduler'].from_pretrained(folder, subfolder='scheduler', local_files_only=True)
    scheduler = scheduler.teacher() if own else scheduler  # the teacher's levels, as the teacher had them
    parts, index = _read_pipeline(info['base'], dtype, ('vae', 'vqvae', 'text_encoder', 'tokenizer'))
    net = _assemble(unet, scheduler, parts, folder, use_fp16, info['prediction_type'])
    net.condition, net.prior, net.base = info['condition'], info['prior'], info['base']
    meta = describe(net, source=str(folder), pipeline=index.get('_class_name'))
    return net.to(device), {**meta, **info['meta'], 'base': info['base']}


# ---------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------

def describe(net, source=None, pipeline=None):
    """The plain-dict metadata of a latent.Denoiser (what load returns next to it).

    kind 'diffusers'; source, pipeline; shape [C, H, W] of x; latent (has a VAE) and image_shape
    [3, H', W'] of the decoded images; text (takes prompts); prediction_type; sigma_min/sigma_max;
    timesteps T; init_scale 'vp' (start from x = sqrt(1 + t_max^2) z, diffusers' prior) or 'edm'
    (t_max z, a student trained so; its final state is decoded as it is);
    guidance: the default Meng w for text models (6.5 = SD's guidance_scale 7.5), else None;
    sampling: the default recipe (`latent.Denoiser.recipe`), the keys of solvers.Recipe.
    """
    return dict(kind='diffusers', source=source, pipeline=pipeline, shape=list(net.shape),
                latent=net.vae is not None, image_shape=list(net.image_shape), text=net.text,
                prediction_type=net.prediction_type,
                sigma_min=net.sigma_min, sigma_max=net.sigma_max, timesteps=net.T, init_scale=net.prior,
                guidance=6.5 if net.text else None, sampling=net.recipe())


def main(argv=None):
    """`python hub.py SPEC`: load a pipeline or student folder and print its metadata."""
    p = cli.parser(__doc__)
    p.add_argument('spec', help='a hub id owner/name, a pipeline folder or a student folder')
    for key, value in load(p.parse_args(argv).spec)[1].items():
        print(f'{key:>16}: {json.dumps(value)}')


if __name__ == '__main__':
    cli.run(main)
