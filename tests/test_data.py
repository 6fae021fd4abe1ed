"""ncp.data on real Parquet files and a real (tiny, random) VAE: vocabulary mapping, ties, bad rows, the absolute
winners filter, crop geometry / SDXL micro-conditioning, and the latent cache (memory and disk)."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from ncp.data import load_pairs, parquet_files
from ncp.latents import LatentCache, PreferenceDataset, collate_pairs, crop_geometry, encode_pairs
from ncp.pipelines import build_tiny_sdxl


def png(
    color: tuple[int, int, int], size: tuple[int, int] = (32, 32), side: tuple[int, int, int] | None = None
) -> bytes:
    """A PNG of `size` (h, w) filled with `color`; with `side`, the left and right eighths are `side` instead."""
    h, w = size
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[:] = color
    if side is not None:
        arr[:, : w // 8] = side
        arr[:, w - w // 8 :] = side
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_parquet(path: Path, rows: list[dict]) -> Path:
    table = pa.table(
        {
            "caption": pa.array([r["caption"] for r in rows], pa.string()),
            "jpg_0": pa.array([r["jpg_0"] for r in rows], pa.binary()),
            "jpg_1": pa.array([r["jpg_1"] for r in rows], pa.binary()),
            "label_0": pa.array([r["label_0"] for r in rows], pa.float64()),
            "label_1": pa.array([r["label_1"] for r in rows], pa.float64()),
            "best_image_uid": pa.array(["lineage"] * len(rows)),  # extra columns are ignored
        }
    )
    pq.write_table(table, path)
    return path


def row(caption: str | None, a: bytes | None, b: bytes | None, l0: float | None, l1: float | None) -> dict:
    return {"caption": caption, "jpg_0": a, "jpg_1": b, "label_0": l0, "label_1": l1}


RED, GREEN, BLUE = png((255, 0, 0)), png((0, 255, 0)), png((0, 0, 255))


def test_vocabulary_ties_and_bad_rows(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = [
        row("left wins", RED, GREEN, 1.0, 0.0),
        row("right wins", RED, GREEN, 0.0, 1.0),
        row("tie", RED, BLUE, 0.5, 0.5),
        row(None, RED, GREEN, 1.0, 0.0),  # missing caption
        row("   ", RED, GREEN, 1.0, 0.0),  # empty caption
        row("broken image", b"not an image at all", GREEN, 1.0, 0.0),
        row("truncated image", RED[: len(RED) // 2], GREEN, 1.0, 0.0),
        row("no image", RED, None, 1.0, 0.0),
        row("odd labels", RED, GREEN, 0.7, 0.3),
        row("nan labels", RED, GREEN, float("nan"), 1.0),
        row("no labels", RED, GREEN, None, None),
    ]
    path = write_parquet(tmp_path / "votes.parquet", rows)
    with caplog.at_level(logging.WARNING, logger="ncp.data"):
        pairs, report = load_pairs(path)
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [("left wins", RED, GREEN), ("right wins", GREEN, RED)]
    assert report.rows == 11 and report.kept == 2 and report.ties_dropped == 1
    assert report.bad_rows == {"bad_labels": 3, "missing_caption": 2, "undecodable_image": 3}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "Skipped 8 bad row(s) of 11" in warnings[0].getMessage()

    kept, report = load_pairs(path, keep_ties=True)
    assert [p.prompt for p in kept] == ["left wins", "right wins", "tie"] and kept[2].is_tie
    assert (kept[2].chosen, kept[2].rejected) == (RED, BLUE) and report.ties_dropped == 0


def test_files_lists_and_shard_folders_read_the_same(tmp_path: Path) -> None:
    (tmp_path / "shards" / "replica-b").mkdir(parents=True)
    a = write_parquet(tmp_path / "shards" / "a.parquet", [row("one", RED, GREEN, 1.0, 0.0)])
    b = write_parquet(tmp_path / "shards" / "replica-b" / "b.parquet", [row("two", BLUE, GREEN, 0.0, 1.0)])
    assert parquet_files(tmp_path / "shards") == [a, b]
    from_folder, _ = load_pairs(tmp_path / "shards")
    from_list, report = load_pairs([str(a), str(b)])
    assert [p.prompt for p in from_folder] == [p.prompt for p in from_list] == ["one", "two"]
    assert report.files == (str(a), str(b))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pairs(tmp_path / "missing.parquet")
    pq.write_table(pa.table({"caption": ["x"], "jpg_0": [RED]}), tmp_path / "narrow.parquet")
    with pytest.raises(ValueError, match=r"lacks the Pick-a-Pic v2 column\(s\) \['jpg_1', 'label_0', 'label_1'\]"):
        load_pairs(tmp_path / "narrow.parquet")


def test_absolute_winners_rule(tmp_path: Path) -> None:
    imgs = {k: png((i * 30, 255 - i * 30, 7)) for i, k in enumerate("ABCDEFGHI")}
    A, B, C, D, E, F, G, H, I = (imgs[k] for k in "ABCDEFGHI")  # noqa: E741
    rows = [
        row("p", A, B, 1.0, 0.0),  # A: 2 wins, no loss, no draw -> absolute winner (both pairs kept)
        row("p", C, A, 0.0, 1.0),
        row("p", D, B, 1.0, 0.0),  # D: only one win -> out
        row("p", E, F, 1.0, 0.0),  # E: 2 wins but a draw -> out
        row("p", E, B, 1.0, 0.0),
        row("p", E, G, 0.5, 0.5),
        row("p", H, I, 1.0, 0.0),  # H: 2 wins and a loss -> out
        row("p", H, B, 1.0, 0.0),
        row("p", I, H, 1.0, 0.0),
        row("q", D, C, 1.0, 0.0),  # D under another prompt: its wins for "p" do not count here
        row("q", D, B, 1.0, 0.0),  # -> D is an absolute winner for "q"
    ]
    path = write_parquet(tmp_path / "votes.parquet", rows)
    pairs, report = load_pairs(path, absolute_winners=True)
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [("p", A, B), ("p", A, C), ("q", D, C), ("q", D, B)]
    assert report.not_absolute_winner == 7 and report.ties_dropped == 0 and report.kept == 4
    # keep_ties cannot bring a tie back: a tie has no winner.
    assert len(load_pairs(path, absolute_winners=True, keep_ties=True)[0]) == 4


def test_crop_geometry_matches_sdxl_convention() -> None:
    assert crop_geometry((64, 128), 64) == ((64, 128), (0, 32))
    assert crop_geometry((300, 200), 100) == ((150, 100), (25, 0))
    assert crop_geometry((32, 32), 64) == ((64, 64), (0, 0))


@pytest.fixture(scope="module")
def vae() -> torch.nn.Module:
    return build_tiny_sdxl(seed=0).vae.eval()


def test_encode_crops_shares_geometry_and_caches(tmp_path: Path, vae: torch.nn.Module) -> None:
    # The chosen image is 64x128: red centre, blue side eighths. Resized to 64 on the short side and centre-cropped,
    # only red remains. The rejected image is SQUARE with blue side eighths: cropped on its own it would keep the blue;
    # with the pair's shared geometry (stretched to the chosen image's 64x128 first) only red remains too.
    wide = png((255, 0, 0), (64, 128), side=(0, 0, 255))
    square = png((255, 0, 0), (96, 96), side=(0, 0, 255))
    pairs, _ = load_pairs(write_parquet(tmp_path / "v.parquet", [row("wide", wide, square, 1.0, 0.0)]))
    pairs += load_pairs(
        write_parquet(tmp_path / "w.parquet", [row("again", png((0, 255, 0), (64, 128)), wide, 0, 1)])
    )[0]
    cache = LatentCache(tmp_path / "cache")
    encoded = encode_pairs(pairs, vae, resolution=64, model_key="tiny-sdxl", cache=cache)
    first = encoded[0]
    assert first.chosen.shape == (4, 16, 16) and first.chosen.dtype == torch.float32
    assert first.time_ids.tolist() == [64.0, 128.0, 0.0, 32.0, 64.0, 64.0]
    with torch.no_grad():
        red = torch.tensor([1.0, -1.0, -1.0]).view(1, 3, 1, 1).expand(1, 3, 64, 64)
        expected = vae.encode(red).latent_dist.mean[0] * vae.config.scaling_factor
    torch.testing.assert_close(first.chosen, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(first.rejected, expected, atol=1e-4, rtol=1e-4)
    # "wide" is the chosen image of pairs 0 and 1 (label_1 wins there), same geometry: encoded once.
    assert len(cache.memory) == 3 and encoded[1].chosen is first.chosen and encoded[1].prompt == "again"
    assert encoded[1].time_ids.tolist() == first.time_ids.tolist()
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 3

    fresh = LatentCache(tmp_path / "cache")  # a new process: everything comes from disk
    again = encode_pairs(pairs, vae, resolution=64, model_key="tiny-sdxl", cache=fresh)
    assert fresh.hits == 4  # all four image slots served from the cache, nothing encoded
    torch.testing.assert_close(again[0].chosen, first.chosen, atol=0, rtol=0)
    other = LatentCache(tmp_path / "cache")  # another model or resolution never reads these entries
    encode_pairs(pairs, vae, resolution=32, model_key="tiny-sdxl", cache=other)
    encode_pairs(pairs, vae, resolution=64, model_key="another-vae", cache=other)
    assert other.hits == 0 and len(list((tmp_path / "cache").rglob("*.safetensors"))) == 9


def test_dataset_and_collate(tmp_path: Path, vae: torch.nn.Module) -> None:
    rows = [row(f"prompt {i}", png((i * 40, 0, 0)), png((0, i * 40, 0)), 1.0, 0.0) for i in range(3)]
    pairs, _ = load_pairs(write_parquet(tmp_path / "v.parquet", rows))
    dataset = PreferenceDataset(encode_pairs(pairs, vae, resolution=32, model_key="m"))
    batch = collate_pairs([dataset[i] for i in range(len(dataset))])
    assert batch.prompts == ("prompt 0", "prompt 1", "prompt 2")
    assert batch.chosen.shape == batch.rejected.shape == (3, 4, 8, 8) and batch.time_ids.shape == (3, 6)
    assert not torch.equal(batch.chosen, batch.rejected)
    with pytest.raises(ValueError, match="No preference pairs"):
        PreferenceDataset([])
