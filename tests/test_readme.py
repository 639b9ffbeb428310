"""The README and docs/ stay true: the algorithm map names real functions, the commands are CI's,
the file table's line counts are the files' own, and every relative link leads somewhere.

The map in "Where each algorithm and equation lives" names `file:function` for every algorithm
and key equation of both papers; each must be a top-level function or class of that file (or a
method of a class there). The set-up and test commands at the top of the README must be the
exact lines .ci/run executes. Every relative link in README.md and docs/*.md must name an existing
file and, with a #fragment, a heading of that file (GitHub's anchor rule); every docs page must be
linked from the README, and the README must stay a front page.
"""
import ast
import re

from conftest import ROOT

README = (ROOT / 'README.md').read_text(encoding='utf-8')
DOCS = sorted((ROOT / 'docs').glob('*.md'))
MAP_TITLE = 'Where each algorithm and equation lives'
FILES_TITLE = 'Files and layers'


def section(title, text=README):
    """The text of the `## title` section, up to the next `## ` heading."""
    start = text.index(f'## {title}')
    end = text.find('\n## ', start + 1)
    return text[start:end if end > 0 else None]


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
    table = section(MAP_TITLE)
    refs = re.findall(r'`([a-z_]+\.py):([A-Za-z_][\w.]*)`', table)
    assert len(refs) >= 30, 'the algorithm map lost its entries'
    missing = [f'{f}:{name}' for f, name in refs
               if not (ROOT / f).exists() or name not in defined_names(ROOT / f)]
    assert not missing, f'README names functions that do not exist: {missing}'
    for label in ['SFD Alg. 3', 'SFD Alg. 4', 'SFD Alg. 5', 'SFD Alg. 6', 'SFD Alg. 7', 'SFD Alg. 8',
                  'SFD Eq. 5', 'SFD Eq. 6', 'SFD Eq. 7', 'SFD Eq. 9', 'SFD App. D.1', 'Meng Eq. 1',
                  'Meng Eq. 2', 'Meng Eq. 3', 'Meng Eq. 4-7', 'Meng Alg. 1', 'Meng Alg. 3', 'Meng Alg. 4',
                  'Meng Alg. 5', 'Meng Alg. 6']:
        assert f'| {label}' in table, f'{label} is missing from the algorithm map'


def test_algorithm_map_is_near_the_top():
    """A reader meets the map on the first screens, before the file table and the results."""
    at = README.index(f'## {MAP_TITLE}')
    assert at < README.index(f'## {FILES_TITLE}'), 'the algorithm map comes after the file table'
    assert README[:at].count('\n') < 120, 'the algorithm map starts too far down the README'


def test_readme_commands_are_the_ones_ci_runs():
    ci = (ROOT / '.ci' / 'run').read_text(encoding='utf-8').splitlines()
    top = README.split('```')[1]  # the first code block: set-up and tests
    commands = [line.split('#')[0].strip() for line in top.splitlines()[1:] if line.strip()]
    setup = next(c for c in commands if c.startswith('pip install'))
    test = next(c for c in commands if 'pytest' in c)
    assert ci[ci.index('# --- README: set-up ---') + 1] == setup
    assert ci[ci.index('# --- README: tests ---') + 1] == test


def test_file_table_line_counts_are_current():
    rows = re.findall(r'^\|[^|\n]*\| `([a-z_]+\.py)` \| ([^|\n]*?) \|', section(FILES_TITLE), flags=re.M)
    actual = {p.name: len(p.read_text(encoding='utf-8').splitlines()) for p in ROOT.glob('*.py')}
    fix = ', '.join(f'{f} {n}' for f, n in sorted(actual.items()))  # what to paste when a count is stale
    assert {f for f, _ in rows} == set(actual), (
        f'every module has a row and every row a module: extra {sorted({f for f, _ in rows} - set(actual))}, '
        f'missing {sorted(set(actual) - {f for f, _ in rows})}')
    for f, n in rows:
        assert n == str(actual[f]), f'README says {f} has {n!r} lines, it has {actual[f]} (all: {fix})'


def test_readme_is_a_front_page():
    """About 350 lines at most; the long documentation lives in docs/ (issue 22)."""
    n = len(README.splitlines())
    assert n <= 400, f'README.md is {n} lines: move the details into docs/'


# ---------------------------------------------------------------------------------------------
# Links
# ---------------------------------------------------------------------------------------------

def prose(text):
    """The text without fenced code blocks (a `[x](y)` inside code is not a link)."""
    return re.sub(r'^```.*?^```', '', text, flags=re.M | re.S)


def anchors(text):
    """The #fragments GitHub gives a file's headings: lower case, punctuation dropped (word
    characters, '-' and ' ' stay), spaces -> '-'; a repeated heading gets -1, -2, ..."""
    seen, out = {}, set()
    for heading in re.findall(r'^#{1,6} +(.+?) *#* *$', prose(text), flags=re.M):
        slug = re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')
        out.add(slug if slug not in seen else f'{slug}-{seen[slug]}')
        seen[slug] = seen.get(slug, 0) + 1
    return out


def relative_links(path):
    """(target file, fragment) of every relative markdown link in the file."""
    links = re.findall(r'\[[^\]]*\]\(([^)\s]+)\)', prose(path.read_text(encoding='utf-8')))
    out = []
    for link in links:
        if re.match(r'[a-z][a-z0-9+.-]*:', link):  # http:, https:, mailto: ... are not checked
            continue
        target, _, fragment = link.partition('#')
        out.append(((path.parent / target).resolve() if target else path, fragment))
    return out


def test_anchor_rule():
    """The slug rule itself, on headings this README and docs/ use."""
    assert anchors('## The sigma -> timestep map, and why') == {'the-sigma---timestep-map-and-why'}
    assert anchors("## CIFAR-10: the papers' numbers\n## x\n## x") == {'cifar-10-the-papers-numbers', 'x', 'x-1'}
    assert anchors('```\n## not a heading\n```\n## Parity with diffusers (tests/test_latent.py)') == {
        'parity-with-diffusers-teststest_latentpy'}


def test_relative_links_lead_somewhere():
    assert DOCS, 'docs/ holds the long documentation'
    broken = []
    for page in [ROOT / 'README.md', *DOCS]:
        for target, fragment in relative_links(page):
            where = f'{page.relative_to(ROOT)} -> {target.name}{"#" + fragment if fragment else ""}'
            if not target.exists():
                broken.append(f'{where}: no such file')
            elif fragment and target.suffix == '.md' and fragment not in anchors(target.read_text(encoding='utf-8')):
                broken.append(f'{where}: no such heading')
    assert not broken, 'broken links:\n' + '\n'.join(broken)


def test_every_docs_page_is_linked_from_the_readme():
    linked = {target for target, _ in relative_links(ROOT / 'README.md')}
    unlinked = [p.name for p in DOCS if p.resolve() not in linked]
    assert not unlinked, f'docs pages the README does not link: {unlinked}'
