"""A trainer entry point with an injected fault, for the loop's fault tests.

    python -m tests.helpers.fault_trainer MODE <ncp.train arguments>

MODE: raise (crash at start), nan (the real trainer with a loss that turns NaN), sigkill (the process kills itself
mid-run), hang (never finishes: the loop's time limit must kill it), corrupt (the real trainer, then the adapter's
weights file is truncated). Everything except the injected fault is the real `ncp.train`.
"""

import os
import signal
import sys
import time
from pathlib import Path


def main() -> None:
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "raise":
        raise RuntimeError("injected trainer crash")
    if mode == "hang":
        time.sleep(3600)
    if mode == "sigkill":
        time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGKILL)
    import ncp.losses
    from ncp import objectives

    if mode == "nan":
        real = objectives.preference_loss

        def nan_loss(*a, **k):
            out = real(*a, **k)
            return objectives.PreferenceLoss(out.loss * float("nan"), out.metrics)

        ncp.losses.preference_loss = nan_loss  # where pair_loss looks it up
    from ncp.train import main as train_main

    rc = train_main(args)
    if rc:
        sys.exit(rc)
    if mode == "corrupt":
        out = Path(args[args.index("--out") + 1])
        weights = out / "pytorch_lora_weights.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])


if __name__ == "__main__":
    main()
