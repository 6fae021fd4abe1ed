"""`python -m ncp.shapes.pretrain` end to end on a tiny budget: a loadable pipeline, checkpoints, and resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline

from ncp.shapes.model import IMAGE_SIZE

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run(tmp: Path, unet_steps: int) -> None:
    cmd = [
        sys.executable,
        "-m",
        "ncp.shapes.pretrain",
        "--out",
        str(tmp / "out"),
        "--work",
        str(tmp / "work"),
        "--vae-steps",
        "2",
        "--unet-steps",
        str(unet_steps),
        "--batch",
        "2",
        "--vae-batch",
        "2",
        "--ckpt-every",
        "2",
        "--decoder-steps",
        "2",
        "--cache-images",
        "64",
    ]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=600)


def test_pretrain_writes_a_loadable_pipeline_and_resumes(tmp_path: Path) -> None:
    run(tmp_path, 2)
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "out", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a small red circle on the left, white background", num_inference_steps=2).images[0]
    assert image.size == (IMAGE_SIZE, IMAGE_SIZE)
    assert type(pipe.unet).__name__ == "PositionalUNet2DConditionModel"  # loaded by its module path, coordinates on
    assert (tmp_path / "work" / "latest" / "step.txt").read_text() == "2"
    run(tmp_path, 4)  # resumes from the step-2 checkpoint instead of starting over
    assert (tmp_path / "work" / "latest" / "step.txt").read_text() == "4"
    log = [json.loads(x) for x in (tmp_path / "work" / "log.jsonl").read_text().splitlines()]
    assert sum(1 for r in log if r.get("stage") == "vae" and r.get("done")) == 1, "the VAE stage ran twice"
    done = next(r for r in log if r.get("stage") == "vae" and r.get("done"))
    # The latents are centred per channel (the pipeline decodes them with no shift): means ~0 on a fresh batch.
    assert max(abs(m) for m in done["channel_means_after"]) < 0.1, done
    scheduler = json.loads((tmp_path / "out" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["beta_schedule"] == "linear", "the shipped recipe's noise schedule"
    # A decoder refit (with the edge loss) changes the decoder only: the latents, and the UNet trained on them, hold.
    from diffusers import AutoencoderTiny

    before = AutoencoderTiny.from_pretrained(tmp_path / "out" / "vae").state_dict()
    refit = ["--refit-decoder-steps", "2", "--edge-weight", "2", "--vae-batch", "2", "--out", str(tmp_path / "out")]
    subprocess.run([sys.executable, "-m", "ncp.shapes.pretrain", *refit], cwd=ROOT, check=True, timeout=600)
    after = AutoencoderTiny.from_pretrained(tmp_path / "out" / "vae").state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("encoder."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))


def test_caption_noise_names_random_values_at_its_rate() -> None:
    """Noisy captions (`--caption-noise`): each listed attribute is redrawn uniformly with its probability, the rest
    of the prompt is untouched, p=0 is the clean prompt, and unknown attributes or bad probabilities are refused."""
    import random

    from ncp.shapes.grammar import COLORS, parse, random_scene
    from ncp.shapes.pretrain import noisy_caption, parse_caption_noise

    assert parse_caption_noise("color=0.7, background=0.5") == {"color": 0.7, "background": 0.5}
    for bad in ("weight=0.5", "color=1.5", "color"):
        with pytest.raises(ValueError, match="caption noise"):
            parse_caption_noise(bad)
    rng = random.Random(0)
    scenes = [random_scene(rng, 0.0) for _ in range(3000)]
    assert all(noisy_caption(s, {}, rng) == s.prompt for s in scenes[:50])
    noisy = [parse(noisy_caption(s, {"color": 0.6}, rng)) for s in scenes]
    wrong = sum(n.objects[0].color != s.objects[0].color for n, s in zip(noisy, scenes, strict=True)) / len(scenes)
    assert wrong == pytest.approx(0.6 * (1 - 1 / len(COLORS)), abs=0.03)  # a redraw can land on the true colour
    assert all(
        (n.objects[0].shape, n.objects[0].size, n.objects[0].position, n.background)
        == (s.objects[0].shape, s.objects[0].size, s.objects[0].position, s.background)
        for n, s in zip(noisy, scenes, strict=True)
    )
    # Position noise: one object moves to a random position; two objects get a random relation (and positions to match).
    two = [random_scene(rng, 1.0) for _ in range(2000)]
    moved = [parse(noisy_caption(s, {"position": 1.0}, rng)) for s in two]
    assert sum(m.relation != s.relation for m, s in zip(moved, two, strict=True)) / len(two) == pytest.approx(
        0.75, abs=0.04
    )
    assert all(m.objects[0].color == s.objects[0].color for m, s in zip(moved, two, strict=True))


def test_pretrain_continues_from_a_model_with_noisy_captions(tmp_path: Path) -> None:
    """`--init-model` starts from a trained pipeline (its VAE copied unchanged, no VAE training) and trains on."""
    cmd = [sys.executable, "-m", "ncp.shapes.pretrain", "--init-model", str(ROOT / "models" / "shapes-base"),
           "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), "--unet-steps", "2", "--batch", "2",
           "--ckpt-every", "2", "--caption-noise", "color=1.0", "--cache-images", "64"]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=600)
    for folder in (tmp_path / "out", ROOT / "models" / "shapes-base", ROOT / "models" / "shapes-ceiling"):
        for config in folder.glob("*/config.json"):  # no training work folder named in a published model's configs
            assert "_name_or_path" not in json.loads(config.read_text()), config
    shipped = (ROOT / "models" / "shapes-base" / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert (tmp_path / "out" / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == shipped
    log = [json.loads(x) for x in (tmp_path / "work" / "log.jsonl").read_text().splitlines()]
    assert not any(r.get("stage") == "vae" for r in log), "no VAE stage when continuing from a model"
    new = DiffusionPipeline.from_pretrained(tmp_path / "out", local_files_only=True).unet.state_dict()
    old = DiffusionPipeline.from_pretrained(ROOT / "models" / "shapes-base", local_files_only=True).unet.state_dict()
    drift = max((new[k] - old[k]).abs().max().item() for k in old)
    assert 0 < drift < 0.05, f"two small steps from the shipped UNet, not a fresh one (max change {drift})"


def test_high_share_oversamples_the_high_noise_slice() -> None:
    """The layout stage's timestep sampler: a share of each batch from [t_low T, T), the rest uniform over [0, T)."""
    import torch

    from ncp.shapes.pretrain import sample_timesteps

    torch.manual_seed(0)
    dev = torch.device("cpu")
    uniform = sample_timesteps(20000, 1000, 0.5, 0.0, dev)
    assert uniform.min() >= 0 and uniform.max() <= 999
    assert (uniform >= 500).float().mean().item() == pytest.approx(0.5, abs=0.02)
    only_high = sample_timesteps(20000, 1000, 0.5, 1.0, dev)
    assert only_high.min() >= 500 and only_high.max() <= 999
    mixed = sample_timesteps(20000, 1000, 0.5, 0.5, dev)  # half from the slice + half of the uniform rest: 75%
    assert (mixed >= 500).float().mean().item() == pytest.approx(0.75, abs=0.02)
    detail = sample_timesteps(20000, 1000, 0.5, 0.0, dev, t_high=0.3)  # a detail stage: low noise only
    assert detail.min() >= 0 and detail.max() <= 299 and detail.float().mean().item() == pytest.approx(149.5, abs=5)
    assert (mixed < 500).any()
