"""A writer killed with SIGKILL mid-run leaves no partial chunk behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from kvtier.core import KVLayout, KVTier

LAYOUT = KVLayout(num_layers=8, num_kv_heads=4, head_dim=64, dtype=torch.float16)
CHUNK = 64  # 512 KiB per chunk

WRITER = textwrap.dedent(
    """
    import sys, torch
    from kvtier.core import KVLayout, KVTier
    from tests.test_crash import CHUNK, LAYOUT, config, prompt

    with KVTier.open(config(sys.argv[1]), model="crash", layout=LAYOUT) as cache:
        for i in range(10_000):
            tokens, kv = prompt(i)
            cache.store(tokens, kv)
            cache.flush()
            print(i, flush=True)
    """
)


def config(root: str) -> dict:
    return {
        "chunk_tokens": CHUNK,
        "tiers": [{"url": f"file://{root}", "capacity": "1GiB"}],
    }


def prompt(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(i)
    tokens = torch.randint(0, 50_000, (4 * CHUNK,), generator=gen)
    kv = torch.randn(LAYOUT.chunk_shape(4 * CHUNK), generator=gen).to(LAYOUT.dtype)
    return tokens, kv


@pytest.mark.slow
def test_sigkill_mid_write_leaves_only_whole_chunks(tmp_path):
    root = str(tmp_path / "kv")
    child = subprocess.Popen(
        [sys.executable, "-c", WRITER, root],
        stdout=subprocess.PIPE,
        text=True,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert child.stdout is not None
    flushed = -1
    deadline = time.monotonic() + 120
    while flushed < 5 and time.monotonic() < deadline:
        line = child.stdout.readline()
        assert line, "the writer exited before storing anything"
        flushed = int(line)
    time.sleep(0.05)  # let it get into the middle of the next writes
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL

    with KVTier.open(config(root), model="crash", layout=LAYOUT) as cache:
        for i in range(flushed + 3):
            tokens, kv = prompt(i)
            n = cache.lookup(tokens)
            if i <= flushed:
                assert n == len(tokens), f"prompt {i} was flushed before the kill"
            got_n, got = cache.retrieve(tokens)
            assert got_n == n, "everything lookup reports can be retrieved"
            assert torch.equal(got, kv[:, :, :n]), f"prompt {i}: retrieved KV differs"
        stats = cache.stats().tier("file")
        assert stats.corrupt == 0, "no partial or corrupt chunk became visible"

    # The killed writer's temp files hold no lock; once they are a few seconds old
    # (younger ones may belong to a writer that is just starting) an open removes them.
    temps = list((tmp_path / "kv" / ".tmp").iterdir())
    for path in temps:
        os.utime(path, (time.time() - 60, time.time() - 60))
    with KVTier.open(config(root), model="crash", layout=LAYOUT):
        pass
    assert not any(p.exists() for p in temps), "stale temp files are cleaned on open"
