"""Shared by tests/ and bench/. On a machine without CUDA, Triton kernels run in its interpreter:
TRITON_INTERPRET must be set before triton is first imported (kernels read it when they are decorated),
hence here, at collection.

Randomness: ONE session seed, printed in the header (DSD_FAST_TEST_SEED=N replays it). Every test and every
module-scoped fixture seeds torch, numpy's legacy global RNG and Python's `random` from (session seed, its
node id), so a test replays exactly whether it runs alone or in the whole suite. Tests draw integer seeds
with random.getrandbits, never os.urandom. The seed is exported, so subprocesses can inherit it."""

import hashlib
import os
import random

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SEED_VAR = "DSD_FAST_TEST_SEED"


def _session_seed():
    value = os.environ.get(SEED_VAR, "").strip()
    if not value:
        return int.from_bytes(os.urandom(4), "little")
    try:
        return int(value)
    except ValueError:
        raise pytest.UsageError(f"{SEED_VAR}: expected an integer, got {value!r}") from None


SESSION_SEED = _session_seed()
os.environ[SEED_VAR] = str(SESSION_SEED)


def derived_seed(nodeid):
    """A 63-bit seed from (session seed, node id): independent of which other tests run."""
    digest = hashlib.sha256(f"{SESSION_SEED}:{nodeid}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _seed_all(nodeid):
    seed = derived_seed(nodeid)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    return seed


def pytest_report_header(config):
    return f"dsd_fast test seed {SESSION_SEED} (replay: {SEED_VAR}={SESSION_SEED} pytest ...)"


def pytest_collection_modifyitems(config, items):
    """@pytest.mark.gpu tests need CUDA: skipped (with the reason) on CPU-only machines such as CI."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_runtest_makereport(item, call):
    """A failing test's report names the seed that replays it."""
    if call.excinfo is not None and call.when in ("setup", "call"):
        item.add_report_section(call.when, "seed", f"replay: {SEED_VAR}={SESSION_SEED} pytest '{item.nodeid}'")


@pytest.fixture(autouse=True, scope="module")
def _module_seed(request):
    """Module-scoped fixtures run before the per-test seed: they draw from the module's own seed."""
    _seed_all(request.node.nodeid)


@pytest.fixture(autouse=True)
def _test_seed(request):
    _seed_all(request.node.nodeid)
