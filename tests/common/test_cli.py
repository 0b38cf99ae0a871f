"""The command lines' shared flags: --threads."""

from __future__ import annotations

import argparse

import pytest
import torch

from common.cli import DEFAULT_THREADS, add_threads_argument, configure_threads


@pytest.fixture
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_threads_flag_and_count(_restore_threads):
    p = argparse.ArgumentParser()
    add_threads_argument(p)
    assert p.parse_args([]).threads is None
    assert p.parse_args(["--threads", "2"]).threads == 2
    assert configure_threads(None) == DEFAULT_THREADS
    assert configure_threads(2) == 2
    assert configure_threads(0) == 2  # torch's own choice: left as it is
    for bad in (-1, 1.5, "2"):
        with pytest.raises(ValueError, match="threads must be an int >= 0"):
            configure_threads(bad)
