"""Promotions by rounds and by admins, interleaved in any order, leave the served version equal to the registry's."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest
import torch

from jobs.registry import BASE
from tests.app_fixtures import ADMIN_TOKEN, make_adapter_version, tiny_runtime


# A promoting thread that raises (e.g. two threads renaming the same temp pointer file) must fail the test.
@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_interleaved_promotions_end_serving_the_pointer(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    rt = tiny_runtime(tmp_path, prefetch=1)
    try:
        rank, alpha = rt.config.loop.lora_rank, rt.config.loop.lora_alpha
        versions = [make_adapter_version(rt.registry, tmp_path, rank, alpha, seed=s) for s in (1, 2)]
        for v in versions:
            rt.store.register_adapter_version(v, BASE, None, {"test": True}, status="published")
        # A round publishes v2 and sets the pointer, but an admin rolls back to v1 before the round's swap runs:
        rt.registry.set_current(versions[1], reason="round")
        rt.admin_promote(versions[0], token=ADMIN_TOKEN)
        rt.loop.on_promote(versions[1])  # the round's late callback
        assert rt.generation.serving_version == rt.registry.current() == versions[0]

        rng = random.Random(0)

        def admin() -> None:
            for _ in range(6):
                rt.admin_promote(rng.choice([*versions, BASE]), token=ADMIN_TOKEN)

        def rounds() -> None:
            for _ in range(6):
                rt.registry.set_current(rng.choice(versions), reason="round")
                rt.loop.on_promote("ignored")

        threads = [threading.Thread(target=admin), threading.Thread(target=rounds)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rt.serve_current()  # what the next promotion of either kind ends with
        assert rt.generation.serving_version == rt.registry.current()
    finally:
        rt.stop()
