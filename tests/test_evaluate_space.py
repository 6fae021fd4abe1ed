"""The gate's held-out implicit accuracy is measured in the space the candidate was trained in (ncp.margins,
ncp.evaluate --space, jobs.loop's evaluator command, jobs.gate's reason), on a tiny SD1.5 pipeline and real Parquet."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from jobs.gate import promotion_gate
from jobs.loop import LoopConfig, evaluator_command
from ncp.data import load_pairs
from ncp.evaluate import evaluate
from ncp.latents import encode_pairs
from ncp.margins import Z_SEED_OFFSET, accuracy, held_out_margins
from ncp.perception import per_sample_errors
from ncp.pipelines import build_tiny_sd15, encode_prompts, load_pipeline
from tests.helpers.adapters import random_adapter


def _png(rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evalspace")
    pipe = build_tiny_sd15(seed=0)
    pipe.save_pretrained(root / "model")
    random_adapter(pipe, root / "adapter", rank=4, std=0.3)
    rng = np.random.default_rng(1)
    rows = [(f"a red circle number {i}", _png(rng), _png(rng), 1.0, 0.0) for i in range(12)]
    cols = list(zip(*rows, strict=True))
    pq.write_table(pa.table(dict(zip(["caption", "jpg_0", "jpg_1", "label_0", "label_1"], cols, strict=True))),
                   root / "eval.parquet")  # fmt: skip
    return {"model": root / "model", "adapter": root / "adapter", "data": root / "eval.parquet"}


def test_ncp_margins_are_the_trainers_perceptual_errors(world: dict[str, Path]) -> None:
    """Each space's margin is -(E_c - E_ref,c) + (E_r - E_ref,r) with E exactly what training minimises
    (ncp.perception.per_sample_errors) on the same t, eps and z; the two spaces rank pairs differently."""
    pipe = load_pipeline(str(world["model"]))
    pipe.load_lora_weights(str(world["adapter"]), adapter_name="cand")
    got = held_out_margins(pipe, ["cand"], [world["data"]], draws=1, seed=3, timestep_low=0.3)
    # Replay the evaluator's draws (one chunk, one draw) through the trainer's error function.
    pairs, _ = load_pairs([world["data"]])
    size = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    enc = encode_pairs(pairs, pipe.vae, resolution=size, model_key="eval")
    lat = torch.cat([torch.stack([p.chosen for p in enc]), torch.stack([p.rejected for p in enc])])
    gen, b = torch.Generator().manual_seed(3), len(enc)
    eps = torch.randn((b, *lat.shape[1:]), generator=gen).repeat(2, 1, 1, 1)
    t = torch.randint(300, 1000, (b,), generator=gen).repeat(2)
    z = torch.randn((b, *lat.shape[1:]), generator=torch.Generator().manual_seed(3 + Z_SEED_OFFSET)).repeat(2, 1, 1, 1)
    ehs = encode_prompts(pipe, [p.prompt for p in enc]).repeat(2).encoder_hidden_states
    pipe.set_adapters(["cand"])
    for space in ("latent", "ncp"):
        with torch.no_grad():
            e = per_sample_errors(pipe.unet, pipe.scheduler, lat, eps, t, (ehs, None), space=space,
                                  with_reference=True, variance_noise=z)  # fmt: skip
        (pc, pr), (rc, rr) = e.policy.chunk(2), e.reference.chunk(2)
        want = (-(pc - rc) + (pr - rr)).numpy()
        np.testing.assert_allclose(got[space]["cand"], want, rtol=1e-4, atol=1e-12)
    assert np.abs(got["ncp"]["cand"]).max() < np.abs(got["latent"]["cand"]).max()  # PL ~ c_t^2 L (METHOD.md)


def test_evaluate_reports_both_spaces_and_reads_the_trained_one(world: dict[str, Path]) -> None:
    versions = {"candidate": world["adapter"]}
    for space in ("latent", "ncp"):
        ev = evaluate(str(world["model"]), versions, [world["data"]], draws=2, space=space)
        row = ev["versions"]["candidate"]
        assert ev["space"] == space and ev["eval_pairs"] == 12
        assert set(row["implicit_acc_by_space"]) == {"latent", "ncp"}
        assert row["implicit_acc"] == row["implicit_acc_by_space"][space]
        assert set(ev["paired_by_space"]) == {"latent", "ncp"}
    pipe = load_pipeline(str(world["model"]))
    pipe.load_lora_weights(str(world["adapter"]), adapter_name="candidate")
    m = held_out_margins(pipe, ["candidate"], [world["data"]], draws=2)
    assert row["implicit_acc_by_space"] == {s: accuracy(m[s]["candidate"]) for s in m}
    with pytest.raises(ValueError, match="space must be one of"):
        evaluate(str(world["model"]), versions, [world["data"]], space="pixel")


def test_the_loop_passes_its_space_and_the_gate_names_it(tmp_path: Path) -> None:
    for space, beta in (("ncp", 5e5), ("latent", 5e3)):
        cfg = LoopConfig(space=space, beta=beta, shapes_probes=4)
        cmd = evaluator_command(cfg, tmp_path / "e.json", tmp_path / "c", None, tmp_path / "h.parquet", tmp_path / "p")
        assert cmd[cmd.index("--space") + 1] == space and "--data" in cmd and "--version" in cmd
    ev = {"space": "ncp", "eval_pairs": 64, "versions": {"candidate": {"implicit_acc": 0.6, "implicit_acc_se": 0.05}}}
    ok, why = promotion_gate(ev)
    assert ok and why.startswith("implicit acc (ncp) 0.600")


def test_the_null_arm_scores_held_out_pairs_against_coin_flips(world: dict[str, Path], tmp_path: Path) -> None:
    """With coin-flip labels (the loop's null arm) a flipped pair's margin is the unflipped one negated, on the same
    (t, eps) draws, so the gate reads nothing of the raters' held-out labels; the loop passes the flag."""
    pipe = load_pipeline(str(world["model"]))
    pipe.load_lora_weights(str(world["adapter"]), adapter_name="cand")
    real = held_out_margins(pipe, ["cand"], [world["data"]], draws=1, seed=0, spaces=("latent",))["latent"]["cand"]
    null = held_out_margins(pipe, ["cand"], [world["data"]], draws=1, seed=0, spaces=("latent",),
                            coin_flip_labels=True)["latent"]["cand"]  # fmt: skip
    flipped = np.isclose(null, -real, rtol=1e-4, atol=1e-12) & ~np.isclose(real, 0, atol=1e-12)
    kept = np.isclose(null, real, rtol=1e-4, atol=1e-12)
    assert np.all(flipped | kept) and 0 < flipped.sum() < len(real)
    cfg = LoopConfig(coin_flip_labels=True)
    cmd = evaluator_command(cfg, tmp_path / "e.json", tmp_path / "c", None, tmp_path / "h.parquet", tmp_path / "p")
    assert "--coin-flip-labels" in cmd
    assert "--coin-flip-labels" not in evaluator_command(
        LoopConfig(), tmp_path / "e.json", tmp_path / "c", None, tmp_path / "h.parquet", tmp_path / "p"
    )


def test_any_version_name_loads_and_scores_like_a_plain_one(world: dict[str, Path]) -> None:
    """Version names are labels, not module names: one with a dot or a slash ("2.5x steps", "beta / 5") scores
    exactly as the same adapter under a plain name (peft refuses "." in the adapter name it is loaded under)."""
    names = {"plain": world["adapter"], "2.5x steps": world["adapter"], "beta / 5": world["adapter"]}
    ev = evaluate(str(world["model"]), names, [world["data"]], draws=2, space="ncp")
    assert set(ev["versions"]) == set(names) and ev["eval_pairs"] == 12
    accs = {n: ev["versions"][n]["implicit_acc_by_space"] for n in names}
    assert accs["2.5x steps"] == accs["plain"] == accs["beta / 5"]


def test_the_cli_refuses_a_version_whose_folder_is_missing(world: dict[str, Path], capsys) -> None:
    """NAME=FOLDER splits at the first "=": a name holding one leaves a folder that does not exist, refused in one line
    (exit 2) before the model loads, as is a plain missing folder."""
    from ncp.evaluate import main

    for spec, shown in ((f"t >= 0.5 T={world['adapter']}", " 0.5 T="), ("gone=/no/such/adapter", "/no/such/adapter")):
        with pytest.raises(SystemExit) as exit_info:
            main(["--model", str(world["model"]), "--out", "unused.json", "--version", spec])
        assert exit_info.value.code == 2, spec
        err = capsys.readouterr().err
        assert f"no adapter folder {shown!r}"[:-1] in err and "may not contain '='" in err, err
