"""Shared test set-up: modules live at the repository root, tests run on the CPU, offline.

Every download and cached file (toy teachers included) goes to a fresh temporary folder, set
before any test or fixture runs, so no test reads or writes ~/.cache. To reuse trained toy
teachers across local runs, point SFD_TEST_CACHE at a folder of your choice.
"""
import os
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / 'shared' / 'data'  # in-house CIFAR-10 zips; absent on users' machines

os.environ['SFD_CACHE'] = os.environ.get('SFD_TEST_CACHE') or tempfile.mkdtemp(prefix='sfd-test-cache-')
torch.set_num_threads(min(2, torch.get_num_threads()))


class Counter(torch.nn.Module):
    """Wraps a denoiser network and counts calls (one call = one NFE for the batch)."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, x, t, **cond):
        self.calls += 1
        return self.net(x, t, **cond)
