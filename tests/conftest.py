"""Shared test set-up: modules live at the repository root, tests run on the CPU."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / 'shared' / 'data'  # in-house CIFAR-10 zips; absent on users' machines

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _offline_cache(tmp_path_factory, monkeypatch):
    """Point the download cache at a temporary folder so no test reads or writes ~/.cache."""
    monkeypatch.setenv('SFD_CACHE', str(tmp_path_factory.getbasetemp() / 'sfd-cache'))
