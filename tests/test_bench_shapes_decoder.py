"""bench/shapes_decoder.py: the decoder refit leaves the encoder (so the latents and the UNet) untouched, and a tiny
run judges renders right and writes every row for both prompt sets."""

from __future__ import annotations

import json

import torch

from bench import shapes_decoder
from jobs.runtime import SHAPES_CEILING
from ncp.pipelines import load_pipeline


def test_refit_trains_the_decoder_only() -> None:
    vae = load_pipeline(str(SHAPES_CEILING)).vae
    new = shapes_decoder.refit(vae, steps=2, batch=4)
    enc_old, enc_new = vae.encoder.state_dict(), new.encoder.state_dict()
    assert all(torch.equal(enc_old[k], enc_new[k]) for k in enc_old)
    dec_old, dec_new = vae.decoder.state_dict(), new.decoder.state_dict()
    assert any(not torch.equal(dec_old[k], dec_new[k]) for k in dec_old)


def test_tiny_run_judges_renders_right_and_writes_every_row(tmp_path) -> None:
    out = tmp_path / "decoder.json"
    shapes_decoder.main(["--model", str(SHAPES_CEILING), "--n", "3", "--refit-steps", "1", "--threads", "1",
                         "--out", str(out)])  # fmt: skip
    result = json.loads(out.read_text())
    assert set(result["sets"]) == {"held_in", "two_object"}
    for rows in result["sets"].values():
        assert set(rows) == {"renders", "vae_round_trip", "refit_round_trip", "samples", "samples_refit_decoder"}
        assert rows["renders"] == {a: 1.0 for a in shapes_decoder.ATTRS}  # the judge reads its own renders right
        assert all(0.0 <= v <= 1.0 for row in rows.values() for v in row.values())
