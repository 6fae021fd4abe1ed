"""Hot-swap under load: 4 HTTP clients vote while the served adapter is swapped 10 times. No request fails, and
every image's recorded adapter version is the one that produced it (checked by regenerating it from its seed)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client
from PIL import Image

from app import build_demo, launch_kwargs
from jobs.registry import BASE
from tests.app_fixtures import free_port, make_adapter_version, tiny_runtime

pytestmark = pytest.mark.slow


def test_swaps_while_raters_vote_keep_every_image_honest(tmp_path) -> None:
    rt = tiny_runtime(tmp_path, steps=2, prefetch=2)
    versions = [
        make_adapter_version(rt.registry, tmp_path, rt.config.loop.lora_rank, rt.config.loop.lora_alpha, seed=s)
        for s in (1, 2)
    ]
    demo = build_demo(rt)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, **launch_kwargs(rt))
    url = f"http://127.0.0.1:{port}"
    stop, errors, vote_ids = threading.Event(), [], []

    def rater(i: int) -> None:
        c = Client(url, verbose=False, ssl_verify=False)
        while not stop.is_set():
            pair = c.predict(f"hot-{i}", "", api_name="/next_pair")
            res = c.predict(f"hot-{i}", pair.get("token", ""), "left", "", api_name="/vote")
            if "error" in pair or "error" in res:
                errors.append((pair, res))
            else:
                vote_ids.append(res["vote_id"])

    threads = [threading.Thread(target=rater, args=(i,), daemon=True) for i in range(4)]
    try:
        for t in threads:
            t.start()
        for k in range(10):  # 10 swaps: v1, v2, base, v1, ...
            target = [*versions, BASE][k % 3]
            rt.registry.set_current(target, reason="test swap")
            rt.serve(target)
            stop.wait(1.0)
        stop.wait(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
        demo.close()
    try:
        assert not errors, errors[:3]
        assert len(vote_ids) == len(set(vote_ids)) > 20
        # Regenerate a sample of recorded images from their seed with the recorded version: byte-identical PNGs.
        pipe_images = []
        for pair_id in range(1, rt.store.counts()["pairs"] + 1, 3):
            pair = rt.store.pair(pair_id)
            if pair is None or pair.kind == "control":
                continue
            pipe_images.append(rt.store.image(pair.left_image_id))
        checked = {img.adapter_version for img in pipe_images}
        assert len(checked) >= 2, checked
        # Batch size changes CPU float rounding, so compare pixels: the recorded version reproduces the image (to
        # rounding), every other version does not.
        for img in pipe_images[:12]:
            prompt = rt.store.prompt(img.prompt_id).text
            stored = np.asarray(Image.open(rt.arena.image_dir / Path(img.path).name), dtype=float)

            def diff(version: str, prompt=prompt, img=img, stored=stored) -> float:
                regen = rt.generation.generate(prompt, [img.seed], version=version)[0]
                return float(np.abs(np.asarray(regen.image, dtype=float) - stored).mean())

            own = diff(img.adapter_version)
            others = [diff(v) for v in [*versions, BASE] if v != img.adapter_version]
            assert own < 1.0 and min(others) > 5 * own + 1.0, (img.adapter_version, own, others)
    finally:
        rt.stop()
