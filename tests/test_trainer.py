"""ncp.trainer / ncp.train on a real tiny SDXL pipeline saved to disk and real Parquet files: the CLI in a real
subprocess (adapter loads with stock diffusers and reproduces the trainer's outputs, alpha kept), resume, continuing
from an adapter, non-finite loss, the wall-clock limit, config validation, and a 2-process accelerate run (slow)."""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import ncp.losses
from ncp.adapters import (
    REFERENCE_ADAPTER,
    LoraSettings,
    add_lora,
    add_reference_adapter,
    lora_parameters,
    save_adapter,
)
from ncp.data import load_pairs
from ncp.latents import PairBatch
from ncp.losses import timestep_bounds
from ncp.pipelines import (
    build_tiny_sd15,
    build_tiny_sdxl,
    encode_prompts,
    is_sdxl,
    load_pipeline,
    sdxl_time_ids,
    uncond_conditioning,
)
from ncp.train import build_parser, config_from_args
from ncp.train import main as cli_main
from ncp.trainer import TrainConfig, TrainingError, batch_indices, pair_loss, probe_eps, train
from tests.helpers.logs import warning_lines

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(lora_rank=4, lora_alpha=8.0, lr=1e-3, batch_size=2, beta=5000.0)  # alpha != rank: a lost alpha shows
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def _png(rng: np.random.Generator, size: tuple[int, int] = (48, 64)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny SDXL pipeline folder and a Parquet file: 16 good pairs, 1 tie, 2 bad rows."""
    root = tmp_path_factory.mktemp("trainer")
    build_tiny_sdxl(seed=0).save_pretrained(root / "sdxl")
    rng = np.random.default_rng(0)
    rows = [(f"a red circle number {i}", _png(rng), _png(rng), float(i % 2), float(1 - i % 2)) for i in range(16)]
    rows += [("a tie", _png(rng), _png(rng), 0.5, 0.5), ("bad image", b"junk", _png(rng), 1.0, 0.0)]
    rows += [(None, _png(rng), _png(rng), 1.0, 0.0)]
    cols = list(zip(*rows, strict=True))
    table = pa.table({"caption": pa.array(cols[0], pa.string()), "jpg_0": pa.array(cols[1], pa.binary()),
                      "jpg_1": pa.array(cols[2], pa.binary()), "label_0": cols[3], "label_1": cols[4],
                      "vote_id": list(range(len(rows)))})  # fmt: skip
    pq.write_table(table, root / "pairs.parquet")
    return {"root": root, "model": root / "sdxl", "data": root / "pairs.parquet"}


def _events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "pytorch_lora_weights.safetensors"))


def _cli(world: dict[str, Path], out: Path, *extra: str, launcher: tuple[str, ...] = (sys.executable, "-m")) -> list:
    opts = {"--lora-rank": "4", "--lora-alpha": "8", "--lr": "1e-3", "--batch-size": "2", "--max-steps": "4"}
    args = [*launcher, "ncp.train", "--model", str(world["model"]), "--data", str(world["data"]), "--out", str(out)]
    return args + [x for kv in opts.items() for x in kv] + ["--threads", "1", "--no-progress-bar", *extra]


def test_cli_writes_an_adapter_that_stock_diffusers_loads_and_reproduces(world: dict[str, Path]) -> None:
    out, progress = world["root"] / "cli-adapter", world["root"] / "cli-progress.jsonl"
    proc = subprocess.run(_cli(world, out, "--progress-file", str(progress)), env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Every line is useful: no third-party notices, no "truncated to N tokens" (the tokenizer covers the captions);
    # the one warning is the data's own, about the two bad rows this world holds on purpose.
    noise = [w for w in warning_lines(proc.stdout + proc.stderr) if "WARNING ncp.data: Skipped 2 bad row(s)" not in w]
    assert not noise, "\n".join(noise)
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json", "metadata.json", "metrics.json", "pytorch_lora_weights.safetensors",
    ]  # fmt: skip
    assert not list(world["root"].glob(".cli-adapter.tmp-*"))  # the temporary folder was renamed, not left behind
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["stop_reason"] == "max_steps" and metrics["num_processes"] == 1
    assert metrics["data"]["kept"] == 16 and metrics["data"]["ties_dropped"] == 1
    assert metrics["data"]["bad_rows"] == {"missing_caption": 1, "undecodable_image": 1}
    assert set(metrics["final"]) == {"loss", "implicit_acc", "reward_margin", "chosen_err", "rejected_err"}

    events = _events(progress)
    assert [e["event"] for e in events] == ["start", "step", "step", "step", "step", "end"]
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4] and all(e["lr"] == 1e-3 for e in steps)
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # dpo at init: policy == reference
    assert steps[-1]["metrics"] == metrics["final"] and steps[-1]["seconds"] > 0

    fresh = load_pipeline(world["model"])
    fresh.load_lora_weights(str(out))  # the stock diffusers loader
    assert fresh.unet.peft_config["default_0"].lora_alpha == 8 and fresh.unet.peft_config["default_0"].r == 4
    probe = metrics["probe"]
    eps = probe_eps(fresh, probe["prompt"], seed=probe["seed"], timestep=probe["timestep"], side=probe["side"])
    torch.testing.assert_close(eps.flatten(), torch.tensor(probe["eps"]), atol=1e-5, rtol=1e-5)
    assert probe["delta_from_base_mean_abs"] > 1e-3  # the adapter matters, so a wrong scale would be caught


def test_resume_repeats_an_uninterrupted_run_and_init_adapter_continues(world: dict[str, Path]) -> None:
    root = world["root"] / "resume"
    kw = dict(model=str(world["model"]), data=str(world["data"]), show_progress=False)
    straight = train(TrainConfig(**FAST, max_steps=4), out=root / "straight", **kw)
    # A run that checkpoints at step 2 (and goes on to 3); then a new run resumes from its latest checkpoint.
    ckpt = root / "ckpt"
    train(TrainConfig(**FAST, max_steps=3, checkpoint_every=2, checkpoint_dir=str(ckpt)), out=root / "first", **kw)
    assert [p.name for p in ckpt.iterdir()] == ["step-00000002"]
    resumed = train(
        TrainConfig(**FAST, max_steps=4, checkpoint_dir=str(ckpt), resume="latest"), out=root / "resumed", **kw
    )
    assert resumed.metrics["resumed_from"] == str(ckpt / "step-00000002") and resumed.steps == 4
    a, b = _weights(root / "straight"), _weights(root / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.metrics["final"] == straight.metrics["final"]

    # Continue from the finished adapter: the first step no longer starts at policy == reference (loss != ln 2),
    # and one more step moves the weights only a little from where the adapter was.
    progress = root / "continue.jsonl"
    cont = TrainConfig(**{**FAST, "batch_size": 1}, max_steps=1, gradient_accumulation=2, gradient_checkpointing=True,
                       init_adapter=str(root / "straight"), progress_file=str(progress))  # fmt: skip
    train(cont, out=root / "continued", **kw)
    first = next(e for e in _events(progress) if e["event"] == "step")
    assert abs(first["loss"] - math.log(2)) > 1e-7
    c = _weights(root / "continued")
    b_keys = [k for k in a if "lora_B" in k or "lora.up" in k]
    assert b_keys and all(a[k].abs().sum() > 0 for k in b_keys)
    moved = sum((c[k] - a[k]).abs().sum() for k in a) / sum(a[k].abs().sum() for k in a)
    assert 0 < moved < 0.2

    # Iterative DPO: with the init adapter as the frozen reference, the first step starts at policy == reference again
    # (loss ln 2 exactly, as from the base), and the published weights are the trained adapter's alone.
    progress = root / "iterative.jsonl"
    train(dataclasses.replace(cont, reference="init", progress_file=str(progress)), out=root / "iterative", **kw)
    first = next(e for e in _events(progress) if e["event"] == "step")
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    it = _weights(root / "iterative")
    assert it.keys() == a.keys() and any(not torch.equal(it[k], a[k]) for k in a)
    assert json.loads((root / "iterative" / "metrics.json").read_text())["config"]["reference"] == "init"


def test_sd15_pipeline_trains_with_mid_block_and_normalized_ncp(world: dict[str, Path]) -> None:
    """The embedded shapes model is SD1.5-architecture: no pooled embeds, no time ids. Same loop, same stock loader."""
    build_tiny_sd15(seed=1).save_pretrained(world["root"] / "sd15")
    out = world["root"] / "sd15-adapter"
    config = TrainConfig(**{**FAST, "beta": 50.0}, max_steps=2, include_mid=True, normalize=True)
    result = train(config, model=str(world["root"] / "sd15"), data=str(world["data"]), out=out, show_progress=False)
    assert result.steps == 2 and math.isfinite(result.metrics["final"]["loss"])
    fresh = load_pipeline(world["root"] / "sd15")
    fresh.load_lora_weights(str(out))
    probe = result.metrics["probe"]
    torch.testing.assert_close(
        probe_eps(fresh, probe["prompt"]).flatten(), torch.tensor(probe["eps"]), atol=1e-5, rtol=1e-5
    )


def test_non_finite_loss_fails_clearly_and_writes_nothing(world: dict[str, Path], caplog) -> None:
    pipe = load_pipeline(world["model"])
    with torch.no_grad():
        pipe.unet.conv_in.weight[0, 0, 0, 0] = float("nan")  # a corrupt base model
    pipe.save_pretrained(world["root"] / "nan-model")
    out, progress = world["root"] / "nan-adapter", world["root"] / "nan.jsonl"
    argv = _cli(world, out, "--progress-file", str(progress), launcher=())[1:]
    argv[argv.index("--model") + 1] = str(world["root"] / "nan-model")
    assert cli_main(argv) == 2  # non-zero exit
    assert "Loss became nan at step 1" in caplog.text and "no adapter" in caplog.text
    assert not out.exists() and not list(world["root"].glob(".nan-adapter.tmp-*"))
    assert [e["event"] for e in _events(progress)] == ["start", "error"]
    with pytest.raises(TrainingError):
        train(TrainConfig(**FAST, max_steps=1), model=str(world["root"] / "nan-model"), data=str(world["data"]),
              out=world["root"] / "nan-2", show_progress=False)  # fmt: skip


def test_wall_clock_limit_stops_early_and_still_saves(world: dict[str, Path]) -> None:
    out = world["root"] / "timed"
    result = train(TrainConfig(**FAST, max_steps=50, max_seconds=1e-6, space="latent", objective="cpo"),
                   model=str(world["model"]), data=str(world["data"]), out=out, show_progress=False)  # fmt: skip
    assert result.steps == 1 and result.stop_reason == "max_seconds"
    assert json.loads((out / "metrics.json").read_text())["stop_reason"] == "max_seconds"
    with pytest.raises(FileExistsError, match="immutable"):
        train(TrainConfig(**FAST), model=str(world["model"]), data=str(world["data"]), out=out, show_progress=False)


def test_batches_are_deterministic_disjoint_and_cover_each_epoch() -> None:
    def epoch(e: int, seed: int = 3) -> list[int]:  # 12 pairs = 3 global micro-steps of 2 processes x 2 pairs
        return [i for g in range(3 * e, 3 * e + 3) for k in range(2) for i in batch_indices(12, 2, g, seed, 2, k)]

    assert sorted(epoch(0)) == sorted(epoch(1)) == list(range(12))  # every pair once per epoch, shards disjoint
    assert epoch(0) != epoch(1)  # reshuffled each epoch
    assert epoch(0) == epoch(0) and epoch(0, seed=4) != epoch(0)  # a pure function of the seed


def test_config_validation_and_generated_help() -> None:
    with pytest.raises(ValueError, match=r"objective='ppo' is not allowed; choose one of \('dpo', 'cpo', 'sft'\)"):
        TrainConfig(objective="ppo")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mixed_precision='fp8'"):
        TrainConfig(mixed_precision="fp8")  # type: ignore[arg-type]
    bad_values = (dict(beta=0.0), dict(lr=float("nan")), dict(batch_size=0), dict(resolution=30), dict(max_steps=0),
                  dict(noise_draws=0), dict(train_guidance=0.0), dict(dpo_anchor=-1.0), dict(timestep_low=-0.1), dict(timestep_high=1.5),
                  dict(timestep_low=0.6, timestep_high=0.5))  # fmt: skip
    for bad in bad_values:
        with pytest.raises(ValueError, match="out of range"):
            TrainConfig(**bad)
    with pytest.raises(ValueError, match="rank"):
        TrainConfig(lora_rank=0)
    with pytest.raises(ValueError, match="needs objective 'dpo'"):
        TrainConfig(objective="sft", dpo_anchor=5.0)
    with pytest.raises(ValueError, match="reference='init' needs init_adapter"):
        TrainConfig(reference="init")
    with pytest.raises(ValueError, match="reference='last'"):
        TrainConfig(reference="last")  # type: ignore[arg-type]
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(ValueError, match="pip install bitsandbytes"):
            TrainConfig(adam_8bit=True)
    parser = build_parser()
    text = parser.format_help()
    for name, f in TrainConfig.__dataclass_fields__.items():
        assert "--" + name.replace("_", "-") in text and f.metadata["help"][:30] in " ".join(text.split())
    argv = ["--model", "m", "--data", "a", "b", "--out", "o", "--objective", "cpo", "--lora-targets", "to_q", "to_v"]
    args = parser.parse_args([*argv, "--gradient-checkpointing", "--beta", "2.5"])
    config = config_from_args(args)
    assert (config.objective, config.lora_targets, config.gradient_checkpointing, config.beta) == (
        "cpo", ("to_q", "to_v"), True, 2.5,
    )  # fmt: skip
    assert args.data == ["a", "b"] and config_from_args(parser.parse_args(["--model", "m", "--data", "a", "--out",
                                                                           "o"])) == TrainConfig()  # fmt: skip


@pytest.mark.slow
def test_two_process_accelerate_launch(world: dict[str, Path]) -> None:
    """`accelerate launch` with 2 CPU processes (gloo, DDP): completes, same adapter shape and metrics file.

    accelerate's `--cpu` launcher starts ONE process whatever --num_processes says; `--multi_gpu` goes through
    torchrun, and the trainer asks for a CPU process group when there is no GPU."""
    single = world["root"] / "single"
    train(TrainConfig(**FAST, max_steps=4), model=str(world["model"]), data=str(world["data"]), out=single,
          show_progress=False)  # fmt: skip
    out = world["root"] / "ddp"
    launcher = ("accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "-m")  # fmt: skip
    proc = subprocess.run(_cli(world, out, launcher=launcher), env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _weights(single), _weights(out)
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    m1, m2 = (json.loads((f / "metrics.json").read_text()) for f in (single, out))
    assert m1.keys() == m2.keys() and m2["num_processes"] == 2 and m2["effective_batch"] == 4
    assert m2["replicas_in_sync"] is True and m2["steps"] == 4
    # The loop's iterative round under DDP: the continued version as the frozen reference adapter, and the
    # empty-prompt hold, which runs the wrapped UNet a second time per step (DDP must still reduce once).
    held = world["root"] / "ddp-held"
    extra = ("--init-adapter", str(single), "--reference", "init", "--uncond-weight", "1.0")
    proc = subprocess.run(_cli(world, held, *extra, launcher=launcher), env=ENV, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    m3 = json.loads((held / "metrics.json").read_text())
    assert m3["replicas_in_sync"] is True and m3["steps"] == 4 and m3["config"]["reference"] == "init"
    assert m3["final"]["uncond_drift"] > 0 and _weights(held).keys() == a.keys()


def _two_pairs_on_tiny_sd15() -> tuple:
    """A tiny SD1.5 with a fresh LoRA, a batch of 2 random-latent pairs and their prompts' conditioning."""
    torch.manual_seed(0)
    pipe = build_tiny_sd15(seed=1)
    add_lora(pipe.unet, LoraSettings(rank=4, alpha=4))
    batch = PairBatch(("a red circle", "a blue square"), torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8),
                      torch.zeros(2, 6))  # fmt: skip
    return pipe, batch, encode_prompts(pipe, list(batch.prompts))


@pytest.mark.parametrize("space", ["ncp", "latent"])
def test_a_reference_adapter_replaces_the_base_as_the_dpo_reference(tmp_path: Path, space: str) -> None:
    """With the version a round continues from loaded as the frozen reference adapter, DPO starts at policy ==
    reference (loss ln 2, zero margin) however far that version is from the base; with the base as reference the
    same policy starts elsewhere. Only the trained adapter gets gradients."""
    pipe, batch, cond = _two_pairs_on_tiny_sd15()
    settings = LoraSettings(rank=4, alpha=4)
    trained = lora_parameters(pipe.unet, "default")
    with torch.no_grad():
        for p in trained:
            p.add_(0.3 * torch.randn_like(p))  # a version far from the base
    save_adapter(pipe, pipe.unet, tmp_path / "v1", settings)
    config = TrainConfig(beta=5e5 if space == "ncp" else 5e3, space=space)

    def loss() -> ncp.losses.PreferenceLoss:
        return pair_loss(pipe.unet, pipe.scheduler, batch, cond, config, torch.Generator().manual_seed(0), sdxl=False)

    from_base = loss()
    assert abs(from_base.loss.item() - math.log(2)) > 1e-2
    add_reference_adapter(pipe.unet, settings, tmp_path / "v1")
    from_v1 = loss()
    # Equal up to float rounding: the policy pass (with autograd) and the no-grad reference pass run other kernels.
    assert from_v1.loss.item() == pytest.approx(math.log(2), abs=1e-4)
    assert abs(from_v1.metrics["reward_margin"]) < 1e-3 * abs(from_base.metrics["reward_margin"])
    from_v1.loss.backward()
    assert all(p.grad is not None for p in trained)
    assert all(p.grad is None for p in lora_parameters(pipe.unet, REFERENCE_ADAPTER))


def test_training_timesteps_stay_in_the_configured_slice_of_the_schedule(monkeypatch: pytest.MonkeyPatch) -> None:
    """`timestep_low`/`timestep_high` bound the t that pair_loss draws (all of 0..T-1 by default, as METHOD.md), and a
    pair's chosen and rejected image still share theirs."""
    assert timestep_bounds(TrainConfig(), 1000) == (0, 1000)
    assert timestep_bounds(TrainConfig(timestep_low=0.3), 1000) == (300, 1000)
    assert timestep_bounds(TrainConfig(timestep_low=0.5, timestep_high=0.5005), 1000) == (500, 501)  # never empty
    pipe, batch, cond = _two_pairs_on_tiny_sd15()
    seen: list[torch.Tensor] = []
    real = ncp.losses.per_sample_errors

    def spy(unet, scheduler, latents, noise, steps, *args, **kwargs):  # noqa: ANN001, ANN202
        seen.append(steps.clone())
        return real(unet, scheduler, latents, noise, steps, *args, **kwargs)

    monkeypatch.setattr(ncp.losses, "per_sample_errors", spy)
    for low, high in [(0.0, 1.0), (0.7, 1.0), (0.0, 0.2)]:
        seen.clear()
        config = TrainConfig(space="ncp", beta=5e5, noise_draws=32, timestep_low=low, timestep_high=high)
        pair_loss(pipe.unet, pipe.scheduler, batch, cond, config, torch.Generator().manual_seed(0), sdxl=False)
        steps = seen[0]
        chosen, rejected = steps.chunk(2)
        assert torch.equal(chosen, rejected)  # shared by the pair's two images
        t_max = pipe.scheduler.config.num_train_timesteps
        assert int(steps.min()) >= low * t_max and int(steps.max()) < high * t_max
        assert int(steps.max()) - int(steps.min()) > 0.5 * (high - low) * t_max  # spread over the slice, not one t


def test_noise_draws_average_errors_over_draws_and_cut_the_loss_variance() -> None:
    """K (t, eps) draws per pair: the per-pair errors are means over K draws, so their spread over random streams
    shrinks about as 1 / sqrt(K) (here K = 8: ratio ~0.35), at K times the rows."""
    pipe, batch, cond = _two_pairs_on_tiny_sd15()

    def spread(k: int) -> float:
        config = TrainConfig(objective="dpo", space="ncp", noise_draws=k, beta=5e5)
        errs = [pair_loss(pipe.unet, pipe.scheduler, batch, cond, config, torch.Generator().manual_seed(s),
                          sdxl=False).metrics["chosen_err"] for s in range(16)]  # fmt: skip
        return float(np.std(errs))

    one, eight = spread(1), spread(8)
    assert 0 < eight < 0.6 * one


@pytest.mark.parametrize("build", [build_tiny_sd15, build_tiny_sdxl], ids=["sd15", "sdxl"])
def test_uncond_weight_adds_the_empty_prompt_drift_and_pulls_it_back(build) -> None:
    """The term is weight x mean (eps_policy(empty) - eps_reference(empty))^2: zero at init (LoRA B = 0), positive once
    the LoRA moved, and its gradient alone shrinks the drift."""
    torch.manual_seed(0)
    pipe = build(seed=1)
    add_lora(pipe.unet, LoraSettings(rank=4, alpha=4))
    sdxl = is_sdxl(pipe)
    uncond = uncond_conditioning(pipe)
    if sdxl:  # SDXL samples against zeros for an empty negative prompt (force_zeros_for_empty_prompt)
        assert not uncond.encoder_hidden_states.any() and not uncond.pooled.any()
    else:
        assert torch.equal(uncond.encoder_hidden_states, encode_prompts(pipe, [""]).encoder_hidden_states)
    ids = sdxl_time_ids((64, 64), (0, 0), (64, 64), 2) if sdxl else torch.zeros(2, 6)
    batch = PairBatch(("a red circle", "a blue square"), torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), ids)
    cond = encode_prompts(pipe, list(batch.prompts))
    plain, held = TrainConfig(space="ncp", beta=5e5), TrainConfig(space="ncp", beta=5e5, uncond_weight=10.0)
    with pytest.raises(ValueError, match="needs the empty prompt's conditioning"):
        pair_loss(pipe.unet, pipe.scheduler, batch, cond, held, torch.Generator().manual_seed(0), sdxl=sdxl)

    def losses() -> tuple:
        a = pair_loss(pipe.unet, pipe.scheduler, batch, cond, plain, torch.Generator().manual_seed(0), sdxl=sdxl)
        b = pair_loss(pipe.unet, pipe.scheduler, batch, cond, held, torch.Generator().manual_seed(0), sdxl=sdxl,
                      uncond=uncond)  # fmt: skip
        return a, b

    a, b = losses()
    assert b.metrics["uncond_drift"] == 0.0 and b.loss.item() == pytest.approx(a.loss.item())
    params = lora_parameters(pipe.unet)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    a, b = losses()
    drift = b.metrics["uncond_drift"]
    assert drift > 0 and b.loss.item() == pytest.approx(a.loss.item() + 10.0 * drift, rel=1e-5)
    (b.loss - a.loss).backward()  # the held term alone
    optimizer = torch.optim.SGD(params, lr=1e-2 / max(p.grad.abs().max().item() for p in params if p.grad is not None))
    optimizer.step()
    assert losses()[1].metrics["uncond_drift"] < drift


def test_held_out_margins_read_the_rounds_slice_and_the_newest_pairs(
    world: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """ncp.margins.held_out_margins draws t from [timestep_low T, T) (the loop passes its own floor), a finite margin
    per held-out pair either way; with `max_pairs` it scores only the newest pairs."""
    import ncp.margins

    out = world["root"] / "margins-adapter"
    train(TrainConfig(**FAST, max_steps=2), model=str(world["model"]), data=str(world["data"]), out=out,
          show_progress=False)  # fmt: skip
    pipe = load_pipeline(str(world["model"]))
    pipe.load_lora_weights(str(out), adapter_name="cand")
    seen: list[torch.Tensor] = []
    real = ncp.margins.noisy_latents
    monkeypatch.setattr(ncp.margins, "noisy_latents", lambda s, x, e, t: seen.append(t) or real(s, x, e, t))
    for low in (0.0, 0.6):
        seen.clear()
        margins = ncp.margins.held_out_margins(pipe, ["cand"], [world["data"]], draws=3, timestep_low=low,
                                               spaces=("latent",))["latent"]["cand"]  # fmt: skip
        assert margins.shape == (16,) and np.isfinite(margins).all()
        steps = torch.cat(seen)
        t_max = pipe.scheduler.config.num_train_timesteps
        assert int(steps.min()) >= low * t_max and int(steps.max()) < t_max
        assert (int(steps.min()) < 0.3 * t_max) == (low == 0.0)  # 48 uniform draws reach the low-noise end
    # A cap keeps the newest pairs (the snapshot's last rows), so a round's evaluation stops growing with the arena.
    encoded: list[list[str]] = []
    real_encode = ncp.margins.encode_pairs
    monkeypatch.setattr(ncp.margins, "encode_pairs", lambda pairs, *a, **k: encoded.append([p.prompt for p in pairs])
                        or real_encode(pairs, *a, **k))  # fmt: skip
    capped = ncp.margins.held_out_margins(pipe, ["cand"], [world["data"]], draws=1, max_pairs=5)["ncp"]["cand"]
    assert capped.shape == (5,) and np.isfinite(capped).all()
    assert encoded == [[p.prompt for p in load_pairs([world["data"]])[0][-5:]]]


@pytest.mark.parametrize("build", [build_tiny_sd15, build_tiny_sdxl], ids=["sd15", "sdxl"])
def test_train_guidance_needs_the_empty_prompt_and_scores_the_guided_prediction(build) -> None:
    """--train-guidance g: the pair loss reads errors of eps_u + g (eps_c - eps_u), the prediction the sampler follows
    (docs/research/loop-plateau.md). At LoRA init policy = reference, so DPO's loss is ln 2 either way; once the LoRA
    moved, the guided loss is not the conditional one."""
    torch.manual_seed(0)
    pipe = build(seed=1)
    add_lora(pipe.unet, LoraSettings(rank=4, alpha=4))
    sdxl = is_sdxl(pipe)
    ids = sdxl_time_ids((64, 64), (0, 0), (64, 64), 2) if sdxl else torch.zeros(2, 6)
    batch = PairBatch(("a red circle", "a blue square"), torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), ids)
    cond, uncond = encode_prompts(pipe, list(batch.prompts)), uncond_conditioning(pipe)
    plain, guided = TrainConfig(space="latent"), TrainConfig(space="latent", train_guidance=4.0)
    with pytest.raises(ValueError, match="needs the empty prompt's conditioning"):
        pair_loss(pipe.unet, pipe.scheduler, batch, cond, guided, torch.Generator().manual_seed(0), sdxl=sdxl)

    def loss(config: TrainConfig) -> float:
        g = torch.Generator().manual_seed(0)
        return pair_loss(pipe.unet, pipe.scheduler, batch, cond, config, g, sdxl=sdxl, uncond=uncond).loss.item()

    assert loss(guided) == pytest.approx(math.log(2), abs=1e-6) == loss(plain)
    with torch.no_grad():
        for p in lora_parameters(pipe.unet):
            p.add_(0.05 * torch.randn_like(p))
    assert abs(loss(guided) - loss(plain)) > 1e-4
