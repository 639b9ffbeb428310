"""The README stays true: its algorithm map names real functions, its commands are CI's.

The map in "Where each algorithm and equation lives" names `file:function` for every algorithm
and key equation of both papers; each must be a top-level function or class of that file (or a
method of a class there). The set-up and test commands at the top of the README must be the
exact lines .ci/run executes, and the file table's line counts must be the files' own.
"""
import ast
import re

from conftest import ROOT

README = (ROOT / 'README.md').read_text(encoding='utf-8')


def section(title):
    start = README.index(f'## {title}')
    end = README.find('\n## ', start + 1)
    return README[start:end if end > 0 else None]


def defined_names(path):
    """Top-level functions and classes of a file, and Class.method for their methods."""
    names = set()
    for node in ast.parse(path.read_text(encoding='utf-8')).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names |= {f'{node.name}.{n.name}' for n in node.body if isinstance(n, ast.FunctionDef)}
    return names


def test_algorithm_map_names_existing_functions():
    table = section('Where each algorithm and equation lives')
    refs = re.findall(r'`([a-z_]+\.py):([A-Za-z_][\w.]*)`', table)
    assert len(refs) >= 30, 'the algorithm map lost its entries'
    missing = [f'{f}:{name}' for f, name in refs if name not in defined_names(ROOT / f)]
    assert not missing, f'README names functions that do not exist: {missing}'
    for label in ['SFD Alg. 3', 'SFD Alg. 4', 'SFD Alg. 5', 'SFD Alg. 6', 'SFD Alg. 7', 'SFD Alg. 8',
                  'SFD Eq. 5', 'SFD Eq. 6', 'SFD Eq. 7', 'SFD Eq. 9', 'SFD App. D.1', 'Meng Eq. 1',
                  'Meng Eq. 2', 'Meng Eq. 3', 'Meng Eq. 4-7', 'Meng Alg. 1', 'Meng Alg. 3', 'Meng Alg. 4',
                  'Meng Alg. 5', 'Meng Alg. 6']:
        assert f'| {label}' in table, f'{label} is missing from the algorithm map'


def test_readme_commands_are_the_ones_ci_runs():
    ci = (ROOT / '.ci' / 'run').read_text(encoding='utf-8').splitlines()
    top = README.split('```')[1]  # the first code block: set-up and tests
    commands = [line.split('#')[0].strip() for line in top.splitlines()[1:] if line.strip()]
    setup = next(c for c in commands if c.startswith('pip install'))
    test = next(c for c in commands if 'pytest' in c)
    assert ci[ci.index('# --- README: set-up ---') + 1] == setup
    assert ci[ci.index('# --- README: tests ---') + 1] == test


def test_file_table_line_counts_are_current():
    rows = re.findall(r'^\| `([a-z_]+\.py)` \| (\d+) \|', section('Files'), flags=re.M)
    assert {f for f, _ in rows} == {p.name for p in ROOT.glob('*.py')}, 'every module has a row'
    for f, n in rows:
        actual = len((ROOT / f).read_text(encoding='utf-8').splitlines())
        assert int(n) == actual, f'README says {f} has {n} lines, it has {actual}'
