"""The evaluator's probe-score cache: a published version is recognised by its weights alone (publishing adds lineage
files), the base entry survives eviction, and a damaged cache file is an empty cache, never an error."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from ncp.evaluate import ProbeCache, adapter_identity


def _adapter(folder, payload: bytes):
    folder.mkdir(parents=True)
    (folder / "pytorch_lora_weights.safetensors").write_bytes(payload)
    (folder / "metrics.json").write_text("{}")
    return folder


def test_identity_follows_the_weights_not_the_lineage_files(tmp_path) -> None:
    cand = _adapter(tmp_path / "cand", b"weights-1")
    published = tmp_path / "v0001"
    shutil.copytree(cand, published)
    (published / "lineage.json").write_text('{"parent": "base"}')
    assert adapter_identity(published) == adapter_identity(cand)
    other = _adapter(tmp_path / "other", b"weights-2")
    assert adapter_identity(other) != adapter_identity(cand)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError):
        adapter_identity(tmp_path / "empty")  # no weights: refuse rather than hash nothing


def test_cache_round_trip_eviction_and_damage(tmp_path) -> None:
    path = tmp_path / "probe_scores.json"
    cache = ProbeCache(path, keep=2)
    base_key = '["m", 4, 1, 12, 4.0, 7, "base"]'
    cache.put(base_key, np.array([[0.5], [0.6]]))
    for i in range(4):
        cache.put(f'["m", 4, 1, 12, 4.0, 7, "v{i}"]', np.full((2, 1), i / 10))
    reread = ProbeCache(path, keep=2)
    np.testing.assert_allclose(reread.get(base_key), [[0.5], [0.6]])
    assert reread.get('["m", 4, 1, 12, 4.0, 7, "v0"]') is None  # evicted: only the newest 2 versions stay
    np.testing.assert_allclose(reread.get('["m", 4, 1, 12, 4.0, 7, "v3"]'), [[0.3], [0.3]])
    path.write_text("{not json")
    assert ProbeCache(path).get(base_key) is None
    assert ProbeCache(None).get(base_key) is None
