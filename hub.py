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

A LoRA student (`--lora-rank R`: Hu et al.'s low-rank adapters on the frozen base UNet, as
diffusers' LCM-LoRA) is saved as its adapters only, in diffusers' LoRA format (SD v1.5: 14 MB at rank
8, 109 MB at rank 64, not 3.4 GB), so that pipe.load_lora_weights(folder) plugs it into its base or
any fine-tune of it; the project reads it back as base + adapters (`load_lora_student`), and `fuse`
folds it into a full student.

diffusers and transformers are an optional extra (`pip install -r requirements-latent.txt`), peft
another (`pip install -r requirements-lora.txt`, LoRA students only): this file imports without
them and each feature says which requirements file to install.

    python hub.py stable-diffusion-v1-5/stable-diffusion-v1-5    # load it, print its metadata
    python hub.py fuse runs/00000-sfd-x/student runs/00000-sfd-x/student-full   # LoRA -> full UNet
"""

import json
import os
import re
import shutil
import sys
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
    if getattr(net, 'lora', None):  # a LoRA student (add_lora): only its adapters, `save_lora_student`
        return save_lora_student(folder, net, prior, **meta)
    if net._parts.scheduler is None or net.base is None:
        raise ValueError('save_student needs a denoiser made by hub.load (its scheduler and base known)')
    info = dict(format=STUDENT_FORMAT, base=net.base, condition=net.condition, prior=prior or net.prior,
                prediction_type=net.prediction_type, meta=meta)
    text = json.dumps(info, indent=1)  # TypeError now for anything that is not plain data

    def write(tmp):
        net.unet.save_pretrained(tmp / 'unet')
        _student_scheduler(net, prior or net.prior, meta.get('sampling')).save_pretrained(tmp / 'scheduler')
        (tmp / STUDENT_FILE).write_text(text)
    return _write_folder(Path(folder), write)


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
    `base`. A LoRA student folder goes to `load_lora_student`."""
    if is_lora_student(folder):
        return load_lora_student(folder, device, dtype, use_fp16)
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


# ---------------------------------------------------------------------------------------------
# LoRA students: low-rank adapters on the frozen base UNet, saved in diffusers' LoRA format
# ---------------------------------------------------------------------------------------------

LORA_EXTRA = 'pip install -r requirements-lora.txt'
LORA_FORMAT = 'diffdistill-diffusers-lora-student-v1'
LORA_WEIGHTS = 'pytorch_lora_weights.safetensors'  # diffusers' file name: load_lora_weights' default
LORA_PROJECTION = 'condition_projection.safetensors'  # the step/guidance projection load_lora_weights lacks
PROJECTION_KEY = 'time_embedding.cond_proj.weight'
# The attention and feed-forward projections of every transformer block, the first 8 targets of
# diffusers' LCM-LoRA scripts (examples/consistency_distillation); those scripts also adapt the
# ResNet layers: --lora-targets LORA_TARGETS,conv1,conv2,conv_shortcut,downsamplers.0.conv,...
LORA_TARGETS = 'to_q,to_k,to_v,to_out.0,proj_in,proj_out,ff.net.0.proj,ff.net.2'


def require_peft():
    """The optional peft package, or one error naming its requirements file."""
    try:
        import peft
    except ImportError as e:
        raise latent.MissingExtra(f'LoRA students need the optional extra peft: {LORA_EXTRA} ({e})') from None
    return peft


def lora_targets(text):
    """'to_q,to_k' -> ['to_q', 'to_k']: module names (or name endings) of the UNet to adapt."""
    names = [t.strip() for t in str(text).split(',') if t.strip()]
    if not names:
        raise ValueError(f'--lora-targets {text!r}: name the modules to adapt, e.g. {LORA_TARGETS}')
    return names


def add_lora(net, rank, alpha=0.0, targets=''):
    """Make `net` (a student: latent.Denoiser, a copy of its teacher) a LoRA student (Hu et al. 2022).

    The UNet is frozen; each targeted layer W becomes W + (alpha / r) B A, A [r, in] random and B
    [out, r] = 0 (peft's initialisation), so the student is its teacher exactly until the first
    update (SFD Alg. 4's psi = theta; Meng's eta_1 = eta). A step/guidance projection already added
    (enable_*_condition, zero-initialised) stays trainable. alpha 0: alpha = rank; targets '':
    LORA_TARGETS. Returns net.
    """
    peft = require_peft()
    if int(rank) != rank or rank < 1:
        raise ValueError(f'--lora-rank {rank}: a LoRA student needs a rank >= 1 (0: full fine-tuning)')
    if not net.text or not hasattr(net.unet, 'add_adapter'):
        raise ValueError('--lora-rank: LoRA students are Stable Diffusion-style UNets (UNet2DConditionModel, '
                         f'as load_lora_weights serves); {type(net.unet).__name__} trains in full')
    alpha, targets = float(alpha or rank), targets or LORA_TARGETS
    net.requires_grad_(False)
    config = peft.LoraConfig(r=int(rank), lora_alpha=alpha, target_modules=lora_targets(targets),
                             lora_dropout=0.0, init_lora_weights=True)
    try:
        net.unet.add_adapter(config)
    except ValueError as e:  # peft: no module of the UNet matches the names
        raise ValueError(f'--lora-targets {targets}: {e}') from None
    if net.condition:  # the method's own new input (SFD-v's N, Meng's w) learns with the adapters
        net.unet.time_embedding.cond_proj.requires_grad_(True)
    net.lora = dict(rank=int(rank), alpha=alpha, targets=','.join(lora_targets(targets)))
    return net


def trainable(net):
    """The parameters an optimiser updates: all of them, or a LoRA student's adapters (+ projection)."""
    return [p for p in net.parameters() if p.requires_grad]


def save_lora_student(folder, net, prior=None, **meta):
    """Write a LoRA student (add_lora) as diffusers' pipe.load_lora_weights(folder) reads it, atomically:

        folder/pytorch_lora_weights.safetensors   the adapters A, B under diffusers' keys, 'unet.<module>.
                                                  lora_A.weight' (peft's naming), r and alpha in the
                                                  file's lora_adapter_metadata (StableDiffusionPipeline.
                                                  save_lora_weights writes it)
        folder/condition_projection.safetensors   SFD-v's / Meng's zero-initialised projection, if any: the
                                                  stock loader cannot add it (`load_lora_into` does)
        folder/diffdistill.json                   as save_student's, and `lora`: rank, alpha, targets
    """
    diffusers, _ = latent._require()
    peft = require_peft()
    if net.base is None:
        raise ValueError('save_lora_student needs a denoiser made by hub.load (its base known)')
    state = {k: v.detach().cpu().contiguous() for k, v in peft.get_peft_model_state_dict(net.unet).items()}
    config = dict(r=net.lora['rank'], lora_alpha=net.lora['alpha'],
                  target_modules=sorted({k.split('.lora_')[0] for k in state}))  # exactly the adapted layers
    lora = dict(net.lora, weights=LORA_WEIGHTS, projection=LORA_PROJECTION if net.condition else None)
    info = dict(format=LORA_FORMAT, base=net.base, condition=net.condition, prior=prior or net.prior,
                prediction_type=net.prediction_type, lora=lora, meta=meta)
    text = json.dumps(info, indent=1)  # TypeError now for anything that is not plain data

    def write(tmp):
        diffusers.StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=state,
                                                            unet_lora_adapter_metadata=config)
        if net.condition:
            import safetensors.torch
            w = net.unet.time_embedding.cond_proj.weight.detach().cpu().contiguous()
            safetensors.torch.save_file({PROJECTION_KEY: w}, tmp / LORA_PROJECTION)
        # The student's own sampler for stock pipelines (pipe.scheduler = StudentScheduler.from_pretrained(
        # folder, subfolder='scheduler')), as a full student folder holds it.
        _student_scheduler(net, prior or net.prior, meta.get('sampling')).save_pretrained(tmp / 'scheduler')
        (tmp / STUDENT_FILE).write_text(text)
    return _write_folder(Path(folder), write)


def _write_folder(folder, write):
    """write(tmp) fills a temporary folder, which then replaces `folder` (never half of one is seen)."""
    tmp, old = (folder.with_name(f'.{folder.name}.{what}{os.getpid()}') for what in ('tmp', 'old'))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def is_lora_student(spec):
    """Is `spec` a folder written by `save_lora_student`?"""
    try:
        info = json.loads((Path(str(spec)).expanduser() / STUDENT_FILE).read_text())
        return info.get('format') == LORA_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _read_lora_info(folder):
    """diffdistill.json of a LoRA student folder, checked, or one error naming the folder."""
    folder = Path(str(folder)).expanduser()
    try:
        info = json.loads((folder / STUDENT_FILE).read_text())
        missing = {'base', 'condition', 'prior', 'prediction_type', 'meta'} - set(info) or \
            {'rank', 'alpha', 'weights', 'projection'} - set(info.get('lora') or {})
        if info.get('format') != LORA_FORMAT or missing:
            raise ValueError(f'format {info.get("format")!r}, missing {sorted(missing)}')
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f'{folder}: not a readable LoRA student folder ({type(e).__name__}: {e})') from None
    return info


def _lora_base(folder, info, dtype):
    """(components, model_index.json) of a LoRA student's base pipeline, or one error saying it is gone."""
    base = info['base']
    local = base.startswith(('/', '.', '~')) or not _HUB_ID.fullmatch(base)
    if local and not (Path(base).expanduser() / 'model_index.json').is_file():
        raise ValueError(f'{folder}: its base pipeline {base} is missing (a LoRA student is only adapters on '
                         f'it): put the pipeline back there, or set "base" in {folder / STUDENT_FILE} to '
                         'where it is now (a folder with model_index.json, or a hub id)')
    return _read_pipeline(base, dtype)


def _load_adapters(unet, folder, lora):
    """Inject peft's LoRA layers into `unet` and fill them from the folder's diffusers-format file."""
    import safetensors.torch
    peft = require_peft()
    state = safetensors.torch.load_file(folder / lora['weights'])
    if not state or not all(k.startswith('unet.') for k in state):
        raise ValueError(f'{folder / lora["weights"]}: expected UNet adapters only (unet.<module>.lora_*)')
    state = {k.removeprefix('unet.'): v for k, v in state.items()}
    unet.add_adapter(peft.LoraConfig(r=lora['rank'], lora_alpha=lora['alpha'], lora_dropout=0.0,
                                     target_modules=sorted({k.split('.lora_')[0] for k in state})))
    result = peft.set_peft_model_state_dict(unet, state)
    missing = [k for k in result.missing_keys if '.lora_' in k]
    if missing or result.unexpected_keys:
        raise ValueError(f'{folder}: its adapters do not fit the base UNet (missing {missing[:3]}, '
                         f'unexpected {result.unexpected_keys[:3]}): is "base" the pipeline they were '
                         'trained on?')


def load_lora_student(folder, device='cpu', dtype=None, use_fp16=True, fuse=True):
    """(latent.Denoiser, meta) of a `save_lora_student` folder: its base pipeline's UNet (read from the
    Hugging Face cache or that folder), the step/guidance projection, and the adapters folded in,
    W + (alpha / r) B A (fuse=True: one plain UNet, as fast as the base), or kept as peft's layers
    (fuse=False: what pipe.load_lora_weights builds). meta as load_student's, with `lora`."""
    latent._require()
    folder = Path(str(folder)).expanduser()
    info = _read_lora_info(folder)
    lora = info['lora']
    parts, index = _lora_base(folder, info, dtype)
    net = _assemble(parts['unet'], parts['scheduler'], parts, folder, use_fp16, info['prediction_type'])
    if info['condition']:  # SFD-v's N or Meng's w: the projection, then its trained weight
        import safetensors.torch
        w = safetensors.torch.load_file(folder / lora['projection'])[PROJECTION_KEY]
        getattr(net, f'enable_{info["condition"]}_condition')(w.shape[1])
        with torch.no_grad():
            net.unet.time_embedding.cond_proj.weight.copy_(w)
    _load_adapters(net.unet, folder, lora)
    if fuse:
        net.unet.fuse_lora()    # W <- W + (alpha / r) B A in every adapted layer (diffusers' own merge)
        net.unet.unload_lora()  # ... and peft's layers replaced by the merged plain ones
    else:
        net.lora = lora
    net.condition, net.prior, net.base = info['condition'], info['prior'], info['base']
    meta = describe(net, source=str(folder), pipeline=index.get('_class_name'))
    return net.to(device), {**meta, **info['meta'], 'base': info['base'], 'lora': lora}


def fuse(folder, out):
    """A LoRA student folded into a full student folder `out` (save_student's format: diffusers reads
    its UNet without peft); the recipe and lineage are kept, plus `fused_from`. Returns out."""
    net, meta = load_lora_student(folder)
    info = _read_lora_info(folder)
    extra = dict(fused_from=str(Path(folder).expanduser().resolve()), lora=meta['lora'])
    return save_student(out, net, prior=info['prior'], **info['meta'], **extra)


def load_lora_into(pipe, folder):
    """pipe.load_lora_weights(folder) for a diffusers pipeline of the student's base, preceded by what
    the stock loader cannot do: give pipe.unet the student's step/guidance projection (time_cond_proj_dim)."""
    info = _read_lora_info(folder)
    if info['condition']:
        import safetensors.torch
        path = Path(folder).expanduser() / info['lora']['projection']
        w = safetensors.torch.load_file(path)[PROJECTION_KEY]
        latent.add_condition_projection(pipe.unet, w.shape[1])
        with torch.no_grad():
            pipe.unet.time_embedding.cond_proj.weight.copy_(w)
    pipe.load_lora_weights(str(folder), weight_name=info['lora']['weights'])
    return pipe


def main(argv=None):
    """`python hub.py SPEC`: load a pipeline or student folder and print its metadata;
    `python hub.py fuse LORA_FOLDER OUT`: a LoRA student folded into a full student folder."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ['fuse']:
        p = cli.parser(fuse.__doc__, prog='hub.py fuse')
        p.add_argument('lora', help='a LoRA student folder (runs/<run>/student of a --lora-rank run)')
        p.add_argument('out', help='the full student folder to write')
        args = p.parse_args(argv[1:])
        return print(f'written: {fuse(args.lora, args.out)}')
    p = cli.parser(__doc__)
    p.add_argument('spec', help='a hub id owner/name, a pipeline folder or a student folder')
    for key, value in load(p.parse_args(argv).spec)[1].items():
        print(f'{key:>16}: {json.dumps(value)}')


if __name__ == '__main__':
    cli.run(main)
