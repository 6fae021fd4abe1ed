"""`python app.py` for the reliability benchmark, with a smaller training round (bench/reliability.py starts it).

    NCP_BENCH_LOOP='{"max_steps": 10, "shapes_probes": 8, "probe_seeds": 1}' python -m bench.reliability_server

It runs app.py's own `main()` (environment -> ArenaConfig, Runtime, Gradio launch, SIGTERM handling) unchanged; the
only difference is that the LoopConfig fields named in the JSON of NCP_BENCH_LOOP replace the ones app.py chose,
because the round's size (training steps, judge probes) has no environment variable. With NCP_BENCH_LOOP unset the
benchmark runs `python app.py` itself.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping

import app
from jobs.runtime import ArenaConfig


def with_loop_overrides(config: ArenaConfig, overrides: Mapping[str, object]) -> ArenaConfig:
    """`config` with the named LoopConfig fields replaced (unknown names raise TypeError from dataclasses)."""
    return dataclasses.replace(config, loop=dataclasses.replace(config.loop, **dict(overrides)))


def main() -> int:
    overrides = json.loads(os.environ.get("NCP_BENCH_LOOP") or "{}")
    from_env = app.config_from_env
    app.config_from_env = lambda env: with_loop_overrides(from_env(env), overrides)
    return app.main([])


if __name__ == "__main__":
    raise SystemExit(main())
