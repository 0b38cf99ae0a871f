"""Test-wide settings.

One intra-op thread: the suite is many small ops, where a second thread buys
little and a busy machine turns OpenMP spin-waits into minutes (seen here:
a 1 s spconv test took 127 s with two threads while another process ran).
"""

import torch

torch.set_num_threads(1)
