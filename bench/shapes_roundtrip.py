"""How much shape does the shapes world's VAE carry, and does an edge loss on its decoder keep more?
(docs/research/shapes-layout.md, "The decoder rounded the corners of small shapes").

    python -m bench.shapes_roundtrip --vae models/shapes-ceiling/vae            # judge one VAE's round trip
    python -m bench.shapes_roundtrip --vae VAE --refit plain --steps 2000       # refit its decoder, judge every 500
    python -m bench.shapes_roundtrip --vae VAE --refit edge --steps 2000        # the same with the edge loss (weight 2)

The round trip (encode, decode) of clean renders of the 200 held-in single-object and 200 two-object prompts of
`bench/shapes_base.py`'s sets, judged like a sample (the judge reads clean renders right every time). A refit trains
the decoder alone (encoder frozen, so the latents and any UNet on them stay valid) as `ncp.shapes.pretrain
--refit-decoder-steps` does (batches of 16 renders, AdamW 3e-4 with warm-up and cosine, the foreground-weighted loss)
with the data seed 0 + 777. Held-in shape errors are broken down by shape and size. One thread, about 4 min per 500 steps.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderTiny

from ncp.shapes.grammar import parse, probe_prompts
from ncp.shapes.judge import score
from ncp.shapes.model import IMAGE_SIZE
from ncp.shapes.pretrain_vae import refit_decoder
from ncp.shapes.render import render

EDGE_WEIGHT = 2.0


def renders(prompts: list[str]) -> torch.Tensor:
    imgs = np.stack([render(parse(p), IMAGE_SIZE) for p in prompts])
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1


def judge(vae: AutoencoderTiny, sets: dict[str, tuple[list[str], torch.Tensor]]) -> dict:
    row: dict = {}
    for name, (prompts, x) in sets.items():
        with torch.no_grad():
            out = vae.decode(vae.encode(x).latents).sample.clamp(-1, 1)
        images = [np.rint((im.permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8) for im in out]
        scores = [score(im, p) for im, p in zip(images, prompts, strict=True)]
        row[f"{name}_shape"] = float(np.mean([s.attributes_correct["shape"] for s in scores]))
        row[f"{name}_color"] = float(np.mean([s.attributes_correct["color"] for s in scores]))
        if name == "held_in":  # wrong shapes by (shape, size): which objects lose their shape
            wrong, total = collections.Counter(), collections.Counter()
            for s, p in zip(scores, prompts, strict=True):
                o = parse(p).objects[0]
                total[f"{o.size} {o.shape}"] += 1
                wrong[f"{o.size} {o.shape}"] += not s.attributes_correct["shape"]
            row["held_in_wrong"] = {k: f"{wrong[k]}/{total[k]}" for k in sorted(total)}
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", type=Path, required=True, help="an AutoencoderTiny folder")
    p.add_argument("--refit", choices=["plain", "edge"], help="refit the decoder with this loss and judge every 500")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, help="also write the rows as JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    held_in = probe_prompts(200, seed=0, two_object_prob=0.0, held_out=False)
    two = probe_prompts(200, seed=2, two_object_prob=1.0, held_out=False)
    sets = {"held_in": (held_in, renders(held_in)), "two_object": (two, renders(two))}
    vae = AutoencoderTiny.from_pretrained(args.vae).eval()
    rows = [{"step": 0, **judge(vae, sets)}]
    print(json.dumps(rows[-1]), flush=True)
    if args.refit:  # the product's refit (ncp.shapes.pretrain --refit-decoder-steps), data seed 0 + 777

        def every_500(step: int) -> None:
            if step % 500 == 0:
                rows.append({"step": step, **judge(vae, sets)})
                print(json.dumps(rows[-1]), flush=True)

        recipe = argparse.Namespace(seed=0, vae_batch=16, two_object_prob=0.3, fg_weight=10.0,
                                    edge_weight=EDGE_WEIGHT if args.refit == "edge" else 0.0)  # fmt: skip
        refit_decoder(vae, recipe, lambda _: None, args.steps, 3e-4, after_step=every_500)
    if args.out:
        args.out.write_text(json.dumps({"vae": str(args.vae), "refit": args.refit, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
