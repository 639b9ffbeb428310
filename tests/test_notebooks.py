"""Tests for notebooks/: every notebook runs top to bottom, and none re-implements the modules.

Each notebook is executed with nbclient in a fresh `python3` kernel, with the working directory
notebooks/ (as Jupyter would), in its quick mode (NOTEBOOK_QUICK=1: the same cells, shorter
training; the image notebook 04 a tiny teacher on the in-house CIFAR-10 copy, skipped without it).
The executed copy is discarded: the committed outputs come from a full-settings run.
Notebooks teach by calling the project's code, so a code cell that defines a function or class
of the same name as one in a module (a copy that could drift from the real one) fails the
check below. Needs the notebook extra (requirements-dev.txt: nbformat, nbclient, ipykernel,
matplotlib); without it the execution tests skip, the static checks still run.
"""
import ast
import json

import pytest
from conftest import ROOT, SHARED_DATA

NOTEBOOKS = sorted((ROOT / 'notebooks').glob('*.ipynb'))
MODULES = sorted(ROOT.glob('*.py'))  # the project's modules live at the repository root


def code_cells(path):
    """The source of every code cell of a notebook (plain JSON: no notebook package needed)."""
    cells = json.loads(path.read_text(encoding='utf-8'))['cells']
    return [c for c in cells if c['cell_type'] == 'code']


def source(cell):
    text = cell['source']
    return text if isinstance(text, str) else ''.join(text)


def module_names():
    """Top-level function and class names of every project module, mapped to their file."""
    names = {}
    for path in MODULES:
        for node in ast.parse(path.read_text(encoding='utf-8')).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.setdefault(node.name, path.name)
    return names


def redefinitions(cell_source, names):
    """Names from `names` that a cell defines: def/class anywhere in the cell, or `name = lambda`.
    IPython magics and shell lines (% and !) are dropped before parsing."""
    lines = [line for line in cell_source.splitlines() if not line.lstrip().startswith(('%', '!'))]
    found = []
    for node in ast.walk(ast.parse('\n'.join(lines))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found.append(node.name)
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Lambda):
            found += [t.id for t in node.targets if isinstance(t, ast.Name)]
    return [n for n in found if n in names]


# ------------------------------------------------------------------------------------------------
# Static checks of the committed files (cheap, no kernel)
# ------------------------------------------------------------------------------------------------

def test_notebooks_exist():
    assert len(NOTEBOOKS) >= 2, f'expected the walkthrough notebooks in {ROOT / "notebooks"}'


def test_redefinition_check_catches_copies():
    """The checker itself: a copied solver or class is found, a helper with a new name is not."""
    names = module_names()
    assert {'time_schedule', 'SFDConfig', 'EDMPrecond'} <= set(names)
    assert redefinitions('%matplotlib inline\ndef time_schedule(n):\n    pass', names) == ['time_schedule']
    assert redefinitions('class SFDConfig:\n    pass\nfidelity = lambda a, b: 0', names) == ['SFDConfig', 'fidelity']
    assert redefinitions('def draw_paths(ax):\n    pass\nx = sample_with', names) == []


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_imports_instead_of_redefining(path):
    names = module_names()
    for i, cell in enumerate(code_cells(path)):
        copies = redefinitions(source(cell), names)
        assert not copies, (f'{path.name}, code cell {i}: defines {copies}, already defined in '
                            f'{[names[n] for n in copies]}; import it instead')


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.name)
def test_committed_outputs_are_clean(path):
    """The committed outputs hold no error, and were produced by one top-to-bottom run."""
    counts = []
    for i, cell in enumerate(code_cells(path)):
        errors = [o for o in cell.get('outputs', []) if o.get('output_type') == 'error']
        assert not errors, f'{path.name}, code cell {i}: committed with an error ({errors[0].get("ename")})'
        if cell.get('execution_count') is not None:
            counts.append(cell['execution_count'])
    assert counts == sorted(counts) and len(set(counts)) == len(counts), \
        f'{path.name}: cells were run out of order ({counts}); re-run it top to bottom before committing'


# ------------------------------------------------------------------------------------------------
# Execution in quick/smoke mode
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_top_to_bottom(path, monkeypatch, tmp_path):
    nbformat = pytest.importorskip('nbformat', reason='notebook extra not installed (pip install -r requirements-dev.txt)')
    nbclient = pytest.importorskip('nbclient', reason='notebook extra not installed (pip install -r requirements-dev.txt)')
    pytest.importorskip('ipykernel', reason='notebook extra not installed (pip install -r requirements-dev.txt)')
    # The kernel inherits this environment: the quick mode, the tests' download cache
    # (SFD_CACHE, set in conftest.py, so cached toy teachers are shared with the other tests), and
    # a temporary folder of this test for anything a notebook writes with tempfile.
    monkeypatch.setenv('NOTEBOOK_QUICK', '1')
    monkeypatch.setenv('TMPDIR', str(tmp_path))
    if path.name.startswith('04'):  # the image world needs CIFAR-10: the in-house copy, never a download
        if not (SHARED_DATA / 'cifar10-jpeg-train.zip').is_file():
            pytest.skip(f'needs the in-house CIFAR-10 images in {SHARED_DATA}')
        monkeypatch.setenv('SFD_CIFAR10', str(SHARED_DATA / 'cifar10-jpeg-train.zip'))
    if path.name.startswith('03'):  # its image section runs with the in-house copy, else says it skips
        monkeypatch.delenv('SFD_CIFAR10', raising=False)
        if (SHARED_DATA / 'cifar10-jpeg-train.zip').is_file():
            monkeypatch.setenv('SFD_CIFAR10', str(SHARED_DATA / 'cifar10-jpeg-train.zip'))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name='python3',
                                     resources={'metadata': {'path': str(path.parent)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on any error
    outputs = [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', [])]
    assert outputs and not [o for o in outputs if o.output_type == 'error']
