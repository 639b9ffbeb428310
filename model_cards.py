"""Model cards: a README.md in the Hugging Face hub's format beside every distilled student.

The hub reads a model card's YAML front matter (license, base_model, library_name, tags,
pipeline_tag, and the measured results as `model-index`) and shows its Markdown body. Every value
here is written in YAML's flow style, which is JSON, one key per line, so the card reads back with
`json.loads` line by line and no YAML library. The card's own facts (teacher, method, sampling
recipe, NFE, training trajectories and time, metrics with their protocol) sit under the key
`diffdistill`; the body is rendered from them, so `add_metric` re-renders a card keeping the rest.

The licence is the teacher's, followed back through students of students: NVIDIA's EDM networks
CC BY-NC-SA 4.0, Stable Diffusion v1.x CreativeML OpenRAIL-M, another diffusers model the
`license:` of its own card (a folder's README.md, or the hub's card in the Hugging Face cache),
else 'other' with a note. The project's toy teachers: the repository declares no licence.

    python fid.py calc --images samples.npz --ref cifar10-32x32 --card runs/<run>   # FID into the card
"""

import json
import re
import time
from pathlib import Path

CARD = 'README.md'
EDM_LICENCE = 'cc-by-nc-sa-4.0'      # NVlabs/edm: its networks are CC BY-NC-SA 4.0
SD1_LICENCE = 'creativeml-openrail-m'  # Stable Diffusion v1.x
_SD1 = re.compile(r'stable-diffusion-v1[-.]\d', re.I)
PROJECT_NOTE = ("a toy teacher trained by this project; the repository declares no licence (no LICENSE file, "
                'no licence in pyproject.toml): ask its authors before publishing')
METHODS = {'sfd': 'SFD (Zhou et al. 2024)', 'sfd-v': 'SFD-v (Zhou et al. 2024, Alg. 6)',
           'second-stage': 'SFD second stage (Zhou et al. 2024, Alg. 7)',
           'vanilla': 'vanilla trajectory distillation (Zhou et al. 2024, Alg. 3)',
           'guided-stage1': 'guided distillation, stage one (Meng et al. 2023)',
           'guided-stage2': 'guided distillation, stage two (Meng et al. 2023)'}


# ---------------------------------------------------------------------------------------------
# The licence a student inherits
# ---------------------------------------------------------------------------------------------

def _card_licence(text):
    """The `license:` of a model card's front matter, or None."""
    m = re.search(r'^license:\s*["\']?([\w.+-]+)', text or '', re.M)
    return m[1].lower() if m else None


def _diffusers_licence(spec):
    """(licence, note) of a diffusers pipeline: SD v1.x by name, else its own card's `license:`."""
    if _SD1.search(spec):
        return SD1_LICENCE, 'inherited from Stable Diffusion v1.x'
    folder = Path(spec).expanduser()
    text = None
    if folder.is_dir():
        text = (folder / CARD).read_text(errors='replace') if (folder / CARD).is_file() else None
    else:
        try:
            from huggingface_hub import try_to_load_from_cache
            path = try_to_load_from_cache(spec, CARD)
            text = Path(path).read_text(errors='replace') if isinstance(path, str) else None
        except Exception:  # no huggingface_hub, or a name it refuses: no card to read
            text = None
    found = _card_licence(text)
    if found:
        return found, f'inherited from {spec}'
    return 'other', f'{spec} states no licence here: check its model page before publishing'


def licence(spec, kind_of, read_meta, depth=0):
    """(licence id, note) of a teacher spec. kind_of(spec): models.KINDS' name; read_meta(spec): a
    student's stored metadata or None (its own teacher is followed)."""
    spec = str(spec)
    if depth > 8:
        return 'other', f'a chain of students too long to follow back from {spec}'
    meta = read_meta(spec)
    if meta and meta.get('teacher'):  # a student of a student: its licence is its first teacher's
        return licence(meta['teacher'], kind_of, read_meta, depth + 1)
    # A teacher: the licence comes with where its weights come from.
    try:
        kind = kind_of(spec)
    except ValueError:
        return 'other', f'{spec} is not a model this project knows'
    if kind in ('edm', 'pickle'):
        return EDM_LICENCE, "inherited from NVIDIA's EDM networks"
    if kind == 'diffusers':
        return _diffusers_licence(spec)
    return 'other', PROJECT_NOTE


# ---------------------------------------------------------------------------------------------
# The card's facts, from a student's metadata
# ---------------------------------------------------------------------------------------------

def training_seconds(run_dir):
    """The training time summed over stats.jsonl's ticks (kimg between ticks / img per s), or None."""
    path = Path(run_dir) / 'stats.jsonl'
    if not path.is_file():
        return None
    # Each tick logs the kimg reached and the speed since the last tick: time = images / speed.
    total, last = 0.0, 0.0
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if row.get('kimg', 0) < last:  # a resumed run restarts its rows: keep adding
            last = 0.0
        if row.get('img_per_s'):
            total += (row['kimg'] - last) * 1000 / row['img_per_s']
        last = row.get('kimg', last)
    return round(total, 1)


def facts(meta, model, run_dir, licence_note):
    """The plain-data facts a card shows: model (its path in the run), teacher, method, recipe,
    NFE, trajectories, time, and an empty metrics list."""
    s = meta.get('sampling') or {}
    method = meta.get('method') or meta.get('kind') or 'distilled'
    lic, note = licence_note
    text = bool(meta.get('text') or meta.get('config', {}).get('captions'))
    return dict(model=model, teacher=meta.get('teacher'), method=method, base=meta.get('base'),
                nfe=s.get('nfe'), recipe={k: s.get(k) for k in ('solver', 'afs', 'schedule', 'rho', 't_min',
                                                                   't_max', 'ends_at_zero', 'step_values')},
                kimg=meta.get('kimg', meta.get('config', {}).get('kimg')),
                train_seconds=training_seconds(run_dir), shape=meta.get('shape'),
                diffusers=meta.get('diffusers', False), text=text, stock_pipeline=meta.get('stock_pipeline'),
                lora=meta.get('lora'),
                license=lic, license_note=note, written=time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()),
                metrics=[])


# ---------------------------------------------------------------------------------------------
# Rendering, reading back, updating
# ---------------------------------------------------------------------------------------------

def _front(f):
    """The front matter's keys (JSON values = YAML flow style)."""
    tags = ['diffusion-distillation', 'few-step-sampling', f['method']]
    if f['text']:
        tags.append('text-to-image')
    if f.get('lora'):
        tags.append('lora')
    head = dict(license=f['license'])
    # base_model only for a hub id (owner/name): the hub links it; a local path means nothing there.
    if f['teacher'] and re.fullmatch(r'[\w.-]+/[\w.-]+', f.get('base') or f['teacher']) \
            and not Path(f.get('base') or f['teacher']).exists():
        head['base_model'] = f.get('base') or f['teacher']
    head['library_name'] = 'diffusers' if f['diffusers'] else 'pytorch'
    head['tags'] = tags
    # The hub's task: text-to-image for prompts, unconditional for an image-shaped sample, else none.
    task = 'text-to-image' if f['text'] else ('unconditional-image-generation' if len(f['shape'] or []) == 3
                                              else None)
    if task:
        head['pipeline_tag'] = task
    if f['metrics']:  # the hub's results table: one entry per measured metric
        head['model-index'] = [dict(name=f['model'], results=[dict(
            task=dict(type=task or 'other'), dataset=dict(name=m.get('dataset', 'unknown'),
                                                          type=m.get('dataset', 'unknown')),
            metrics=[dict(type=m['type'], value=m['value'], name=m['name'])]) for m in f['metrics']])]
    head['diffdistill'] = f  # every fact, so that read_card / add_metric re-render the whole card
    return head


def _sampling(f):
    """How to sample it: sample.py's one line and, where the stock pipeline can, diffusers' three."""
    nfes = f['nfe'] if isinstance(f['nfe'], list) else [f['nfe']]
    flags = ' --nfe N' if len(nfes) > 1 else ''
    prompt = ' --prompt "a photo of a cat"' if f['text'] else ''
    lines = ['```sh', f'python sample.py --model {f["model"]}{flags}{prompt} --seeds 0-15 --grid samples.png',
             '```']
    if f.get('lora') and f['stock_pipeline'] == 'direct' and f['text']:  # adapters on the base pipeline
        lines += ['In the stock pipeline (`stock_pipelines.py` of this project on the path):', '```python',
                  'from diffusers import StableDiffusionPipeline',
                  'from stock_pipelines import StudentScheduler',
                  f"pipe = StableDiffusionPipeline.from_pretrained({f['base']!r}, scheduler=StudentScheduler."
                  "from_pretrained('.', subfolder='scheduler')); pipe.load_lora_weights('.')",
                  f"image = pipe('a photo of a cat', num_inference_steps={nfes[0]}, "
                  'guidance_scale=1.0).images[0]',
                  '```']
    elif f.get('lora'):
        lines.append(f"LoRA adapters (rank {f['lora'].get('rank')}): `pipe.load_lora_weights(FOLDER)` loads "
                     'them '
                     'into the base pipeline; its step/guidance projection loads only through this project '
                     f'(`python hub.py fuse {f["model"]} FULL` writes a full UNet).')
    elif f['diffusers'] and f['stock_pipeline'] == 'direct' and f['text']:
        lines += ['In the stock pipeline (`stock_pipelines.py` of this project on the path):', '```python',
                  'from diffusers import StableDiffusionPipeline, UNet2DConditionModel; '
                  'from stock_pipelines import StudentScheduler',
                  f"pipe = StableDiffusionPipeline.from_pretrained({f['base']!r}, unet=UNet2DConditionModel."
                  "from_pretrained('.', subfolder='unet'), scheduler=StudentScheduler.from_pretrained('.', "
                  "subfolder='scheduler'))",
                  f"image = pipe('a photo of a cat', num_inference_steps={nfes[0]}, "
                  'guidance_scale=1.0).images[0]',
                  '```']
    elif f['diffusers'] and f['stock_pipeline'] == 'teacher':
        lines.append(f"In the stock pipeline: its UNet (`unet=UNet2DConditionModel.from_pretrained(FOLDER, "
                     f"subfolder='unet')`) in `{f['base']}`'s pipeline with that pipeline's own scheduler.")
    elif f['diffusers'] and f['stock_pipeline'] == 'export':
        lines += ["For a stock diffusers pipeline, first fold one NFE (and a pixel model's start scale) "
                  'into '
                  f'the UNet: `python stock_pipelines.py export {f["model"]} out/ --nfe {nfes[0]}`.']
    return lines


def _g(v):
    return 'unknown' if v is None else f'{v:.6g}'


def render(f):
    """The whole card (front matter and body) of its facts."""
    lines = ['---'] + [f'{k}: {json.dumps(v)}' for k, v in _front(f).items()] + ['---', '']
    r = f['recipe']
    hours = f'{f["train_seconds"] / 3600:.2f} h' if f['train_seconds'] is not None else 'not recorded'
    lines += [f'# {f["method"]} student of {f["teacher"]}', '',
              f'Distilled with {METHODS.get(f["method"], f["method"])} by this project.', '',
              '| | |', '| --- | --- |', f'| model | `{f["model"]}` |', f'| teacher | `{f["teacher"]}` |',
              f'| method | {METHODS.get(f["method"], f["method"])} |', f'| NFE | {f["nfe"]} |',
              f'| sampling recipe | {r["solver"]}, AFS {r["afs"]}, schedule {r["schedule"]} '
              f'(rho {r["rho"]}), '
              f't {_g(r["t_max"])} -> {_g(r["t_min"])}{" -> 0" if r["ends_at_zero"] else ""}'
              f'{", step values " + json.dumps(r["step_values"]) if r["step_values"] else ""} |',
              f'| training | {f["kimg"]} kimg of trajectories ({hours}) |', '', '## Metrics', '']
    if f['metrics']:
        lines += ['| metric | value | protocol |', '| --- | --- | --- |']
        lines += [f'| {m["name"]} | {m["value"]:.4g} | {m.get("protocol", "")} |' for m in f['metrics']]
    else:
        lines.append('None measured yet: `python fid.py calc --images SAMPLES --ref REF --card FOLDER` '
                     'adds FID.')
    lines += ['', '## How to sample', ''] + _sampling(f)
    if f['method'].startswith('guided') and f['diffusers']:
        lines.append("Its guidance strength w is an input: diffusers' `guidance_scale` = 1 + w "
                     '(one call per step).')
    lines += ['', '## Licence', '', f'`{f["license"]}`: {f["license_note"]}.', '']
    return '\n'.join(lines)


def write_card(folder, meta, model, run_dir=None, licence_note=('other', 'unknown')):
    """Write folder/README.md for a student (its meta as saved); returns the path."""
    f = facts(meta, model, run_dir or folder, licence_note)
    path = Path(folder) / CARD
    path.write_text(render(f))
    return path


def read_card(folder):
    """The facts of a card written here, or one clear error."""
    path = Path(folder) / CARD
    try:
        head = path.read_text().split('\n---\n', 1)[0]
        line = next(x for x in head.splitlines() if x.startswith('diffdistill: '))
        return json.loads(line.removeprefix('diffdistill: '))
    except (OSError, StopIteration, ValueError) as e:
        raise ValueError(f'--card {folder}: no model card of this project there ({type(e).__name__}); '
                         'cards are written when a run saves its student') from None


def add_metric(folder, type, value, name, protocol, dataset='unknown', nfe=None):
    """Add (or replace: same name and NFE) one measured metric in a card, keeping everything else."""
    f = read_card(folder)
    m = dict(type=type, value=float(value), name=name, protocol=protocol, dataset=dataset, nfe=nfe)
    f['metrics'] = [x for x in f['metrics'] if (x['name'], x.get('nfe')) != (name, nfe)] + [m]
    (Path(folder) / CARD).write_text(render(f))
    return f


def table_metrics(table, n):
    """Metric A of the student's rows of toy.before_after_table (one per NFE), as add_metric's arguments."""
    rows = [line.split() for line in table.splitlines()]
    return [dict(type='metric-a', value=float(r[2]), name='metric A', nfe=int(r[0]),
                 protocol=f"mean distance to the teacher's fine ODE solution from the same noise, "
                 f'{n} samples (toy.before_after_table)') for r in rows if len(r) > 2 and r[1] == 'student']
