"""Preference pairs to training batches: cached VAE latents of each pair's two images, stacked into `PairBatch`es.

`encode_pairs(pairs, vae, resolution=...)` takes the `PreferencePair`s of `ncp.data.load_pairs`, resizes and
center-crops each image once, VAE-encodes it once (an image that appears in several pairs is encoded once), caches the
latents in memory and optionally on disk (`LatentCache`), and records the SDXL micro-conditioning of each pair, shared
by its two images (METHOD.md, "Known pitfalls"). `PreferenceDataset` + `collate_pairs` turn encoded pairs into
`PairBatch`es of stacked tensors.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from ncp.data import PreferencePair

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class EncodedPair:
    """A pair ready for training. Latents are (C, h, w) float32, already scaled by the VAE's scaling factor.

    The SDXL micro-conditioning (original size, crop top-left, target size; all (height, width)) is computed once for
    the pair and shared by its two images: the rejected image goes through exactly the chosen image's geometry.
    """

    prompt: str
    chosen: torch.Tensor
    rejected: torch.Tensor
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_size: tuple[int, int]
    is_tie: bool = False

    @property
    def time_ids(self) -> torch.Tensor:
        """SDXL `add_time_ids` for this pair: (6,) = original_size + crop_top_left + target_size."""
        return torch.tensor([*self.original_size, *self.crop_top_left, *self.target_size], dtype=torch.float32)


def crop_geometry(size: tuple[int, int], resolution: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Resize so the shorter side is `resolution`, then center-crop a square.

    Returns (resized (h, w), crop (top, left)) in resized-image pixels, the convention of diffusers' SDXL scripts."""
    h, w = size
    scale = resolution / min(h, w)
    rh, rw = max(resolution, round(h * scale)), max(resolution, round(w * scale))
    return (rh, rw), ((rh - resolution) // 2, (rw - resolution) // 2)


def _pixels(data: bytes, source_size: tuple[int, int], resolution: int) -> torch.Tensor:
    """Decode, force to `source_size` (differs only for a partner of another size), resize, crop: (3, R, R) pixels."""
    (rh, rw), (top, left) = crop_geometry(source_size, resolution)
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        if (im.height, im.width) != source_size:
            im = im.resize((source_size[1], source_size[0]), Image.Resampling.BICUBIC)
        im = im.resize((rw, rh), Image.Resampling.BICUBIC).crop((left, top, left + resolution, top + resolution))
        arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def latent_cache_key(data: bytes, model_key: str, resolution: int, source_size: tuple[int, int]) -> str:
    """sha256 over the image bytes, the VAE's identity, the training resolution and the geometry source size."""
    h = hashlib.sha256(data)
    h.update(f"\0{model_key}\0{resolution}\0{source_size[0]}x{source_size[1]}".encode())
    return h.hexdigest()


class LatentCache:
    """Latents by key: always in memory, and under `folder/<key[:2]>/<key>.safetensors` when a folder is given.

    Disk writes are atomic (temp file + `os.replace`), so concurrent processes sharing the folder never read a
    half-written file."""

    def __init__(self, folder: str | Path | None = None) -> None:
        self.folder = Path(folder) if folder else None
        self.memory: dict[str, torch.Tensor] = {}
        self.hits = 0

    def _path(self, key: str) -> Path:
        return Path(self.folder or ".") / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> torch.Tensor | None:
        if key in self.memory:
            self.hits += 1
            return self.memory[key]
        if self.folder is not None and self._path(key).is_file():
            self.hits += 1
            self.memory[key] = load_file(self._path(key))["latent"]
            return self.memory[key]
        return None

    def put(self, key: str, latent: torch.Tensor) -> None:
        self.memory[key] = latent
        if self.folder is not None:
            path = self._path(key)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            save_file({"latent": latent.contiguous()}, str(tmp))
            os.replace(tmp, path)


@torch.no_grad()
def encode_pairs(
    pairs: Sequence[PreferencePair],
    vae: torch.nn.Module,
    *,
    resolution: int,
    model_key: str,
    cache: LatentCache | None = None,
    batch_size: int = 8,
) -> list[EncodedPair]:
    """VAE-encode every distinct image once and return `EncodedPair`s (latents on CPU, float32).

    Latents are the posterior MEAN (not a sample, as the reference DPO script draws), so the cache is deterministic;
    then `(z - shift_factor) * scaling_factor` as the pipelines decode. The VAE runs in its own dtype and device
    (keep an SDXL VAE in float32: the stock one overflows in fp16, METHOD.md pitfalls).
    """
    cache = cache or LatentCache()
    param = next(vae.parameters())
    scale = float(vae.config.scaling_factor)
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    todo: dict[str, tuple[bytes, tuple[int, int]]] = {}  # key -> (bytes, geometry source size), encoded below
    keys: list[tuple[str, str]] = []
    for p in pairs:
        kc = latent_cache_key(p.chosen, model_key, resolution, p.chosen_size)
        kr = latent_cache_key(p.rejected, model_key, resolution, p.chosen_size)
        keys.append((kc, kr))
        for key, data in ((kc, p.chosen), (kr, p.rejected)):
            if key not in todo and cache.get(key) is None:
                todo[key] = (data, p.chosen_size)
    items = list(todo.items())
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        pixels = torch.stack([_pixels(data, size, resolution) for _, (data, size) in chunk])
        encoded = vae.encode(pixels.to(param.device, param.dtype))
        # AutoencoderKL returns a posterior (use its mean); AutoencoderTiny (TAESD, the shapes model) plain latents.
        raw = encoded.latent_dist.mean if hasattr(encoded, "latent_dist") else encoded.latents
        latents = ((raw - shift) * scale).float().cpu()
        for (key, _), z in zip(chunk, latents, strict=True):
            cache.put(key, z.clone())
    logger.info(
        "Encoded %d image(s), %d from cache, for %d pair(s).", len(todo), len(pairs) * 2 - len(todo), len(pairs)
    )
    out = []
    for p, (kc, kr) in zip(pairs, keys, strict=True):
        _, crop = crop_geometry(p.chosen_size, resolution)
        out.append(
            EncodedPair(
                p.prompt, cache.memory[kc], cache.memory[kr], p.chosen_size, crop, (resolution, resolution), p.is_tie
            )
        )
    return out


@dataclass(frozen=True, eq=False)
class PairBatch:
    """B pairs stacked: `chosen`/`rejected` (B, C, h, w); `time_ids` (B, 6), one row per pair for both images."""

    prompts: tuple[str, ...]
    chosen: torch.Tensor
    rejected: torch.Tensor
    time_ids: torch.Tensor


class PreferenceDataset(torch.utils.data.Dataset):
    """A map-style dataset over encoded pairs (use with `collate_pairs`)."""

    def __init__(self, pairs: Sequence[EncodedPair]) -> None:
        if not pairs:
            raise ValueError("No preference pairs to train on (all rows were ties, filtered out or bad; see the log).")
        self.pairs = list(pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> EncodedPair:
        return self.pairs[index]


def collate_pairs(items: Sequence[EncodedPair]) -> PairBatch:
    return PairBatch(
        prompts=tuple(p.prompt for p in items),
        chosen=torch.stack([p.chosen for p in items]),
        rejected=torch.stack([p.rejected for p in items]),
        time_ids=torch.stack([p.time_ids for p in items]),
    )
