"""Run one alignment round by hand, with the app stopped (the app owns the DuckDB file while it runs).

    python -m jobs.round --data-dir data [--model models/shapes-base] [--shapes-probes 32]

Exports a snapshot, trains a candidate from the serving adapter, evaluates, gates and, if it passes, publishes and
points the registry at it; the next app start serves it.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, fields, replace
from pathlib import Path

from feedback_store import FeedbackStore
from jobs.loop import AlignmentLoop
from jobs.loop_config import LoopConfig
from jobs.registry import AdapterRegistry


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, required=True, help="the app's data dir (NCP_DATA_DIR)")
    for f in fields(LoopConfig):
        if f.type in ("int", "float", "str"):
            p.add_argument(
                f"--{f.name.replace('_', '-')}",
                type={"int": int, "float": float, "str": str}[f.type],
                default=None,
                help=f"default: {f.default}",
            )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    overrides = {f.name: getattr(args, f.name) for f in fields(LoopConfig) if getattr(args, f.name, None) is not None}
    config = replace(LoopConfig(), **overrides)
    store = FeedbackStore(args.data_dir / "arena.duckdb")
    try:
        loop = AlignmentLoop(store, AdapterRegistry(args.data_dir / "adapters"), args.data_dir, config)
        result = loop.run_round(trigger="cli")
    finally:
        store.close()
    print(json.dumps(asdict(result), indent=2, default=str))
    return 0 if result.status in ("promoted", "rejected") else 1


if __name__ == "__main__":
    raise SystemExit(main())
