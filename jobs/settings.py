"""The app's configuration: every environment variable (ENV_VARS, docs/CONFIG.md) mapped onto `ArenaConfig`.

`config_from_env(mapping)` is the one place that interprets the environment; app.py's `main()` passes `os.environ`
(library code never reads it). `python app.py --print-config` prints `config_markdown()`; `scripts/sync_config.py`
writes it into docs/CONFIG.md and lists the names in the README.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from jobs.abuse import AbuseConfig
from jobs.gpu_plan import PLAN_MODES
from jobs.hub_push import HubPushConfig
from jobs.loop_config import SPACE_BETA, LoopConfig
from jobs.runtime import SHAPES_MODEL, ArenaConfig, is_shapes_model
from ncp.serving import SamplingConfig
from ncp.shapes.model import DEFAULT_CONTINUE_REJECTED as SHAPES_CONTINUE_REJECTED
from ncp.shapes.model import DEFAULT_GATE_JUDGE_VETO as SHAPES_GATE_JUDGE_VETO
from ncp.shapes.model import DEFAULT_GATE_MIN_EVAL_PAIRS as SHAPES_GATE_MIN_EVAL_PAIRS
from ncp.shapes.model import DEFAULT_GATE_PAIRS as SHAPES_GATE_PAIRS
from ncp.shapes.model import DEFAULT_GUIDANCE as SHAPES_GUIDANCE
from ncp.shapes.model import DEFAULT_ROUND_EVERY_S as SHAPES_ROUND_EVERY_S
from ncp.shapes.model import DEFAULT_ROUND_LR as SHAPES_ROUND_LR
from ncp.shapes.model import DEFAULT_ROUND_MIN_VOTES as SHAPES_ROUND_MIN_VOTES
from ncp.shapes.model import DEFAULT_ROUND_STEPS as SHAPES_ROUND_STEPS
from ncp.shapes.model import DEFAULT_STEPS as SHAPES_STEPS
from ncp.shapes.model import DEFAULT_TIMESTEP_LOW as SHAPES_TIMESTEP_LOW


# -- configuration ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EnvVar:
    name: str
    default: str
    help: str


def default_data_dir() -> Path:
    """HF persistent storage (/data) when it is mounted and writable, else ./data."""
    return Path("/data/ncp-arena") if os.path.isdir("/data") and os.access("/data", os.W_OK) else Path("data")


_LOOP, _SAMPLING, _ABUSE = LoopConfig(), SamplingConfig(), AbuseConfig()
SPACE_ADDRESS_VOTES_PER_MINUTE = 120.0  # default per-address limit on a public Space: 4x the per-rater rate
ENV_VARS: tuple[EnvVar, ...] = (
    EnvVar("NCP_DATA_DIR", "/data/ncp-arena if /data is writable, else ./data", "DuckDB store, images, adapters"),
    EnvVar("NCP_MODEL", "models/shapes-base (embedded)", "diffusers pipeline folder or hub id (SDXL or SD1.5)"),
    EnvVar("GRADIO_SERVER_PORT", "7860", "HTTP port"),
    EnvVar("GRADIO_SERVER_NAME", "127.0.0.1 (the Dockerfile sets 0.0.0.0)", "interface to listen on"),
    EnvVar("NCP_ADMIN_TOKEN", "unset (no token admin)", "secret that unlocks the Admin tab and /admin"),
    EnvVar("NCP_ADMIN_USERS", "empty", "comma-separated HF usernames allowed to administer (with OAuth)"),
    EnvVar("NCP_RATER_SALT", "a public default: set a secret", "salt of the rater pseudonyms (HMAC)"),
    EnvVar(
        "NCP_TRAIN_EVERY_S",
        f"{_LOOP.train_every_s:g} (shapes model: {SHAPES_ROUND_EVERY_S:g})",
        "seconds between the schedule's looks for enough new votes to start a round",
    ),
    EnvVar(
        "NCP_MIN_NEW_VOTES",
        f"{_LOOP.min_new_votes} (shapes model: {SHAPES_ROUND_MIN_VOTES})",
        "new trainable votes needed before a round starts",
    ),
    EnvVar(
        "NCP_CONTINUE_REJECTED",
        f"{_LOOP.continue_rejected} (shapes model: {SHAPES_CONTINUE_REJECTED})",
        "rounds in a row a rejected candidate seeds the next round (0: always restart from the served version)",
    ),
    EnvVar(
        "NCP_TIMESTEP_LOW",
        f"{_LOOP.timestep_low:g} (shapes model: {SHAPES_TIMESTEP_LOW:g})",
        "lowest training timestep of a round, as a fraction of the noise schedule (0: uniform t, as the paper)",
    ),
    EnvVar(
        "NCP_ROUND_SPACE",
        _LOOP.space,
        "where a round measures its DPO errors: ncp (NCP-DPO, the UNet encoder's features) or latent (latent "
        "Diffusion-DPO); each has its own beta (docs/BENCHMARKS.md, section loop-arms, compares them in the loop; on "
        "the same votes a round gains the same in either: docs/research/round-space.md)",
    ),
    EnvVar(
        "NCP_DPO_REFERENCE",
        _LOOP.reference,
        "DPO reference of a round that continues a version: base (the paper) or init (that version: iterative DPO)",
    ),
    EnvVar(
        "NCP_TRAIN_WINDOW",
        _LOOP.train_window,
        "votes a round trains on: all, or serving (only pairs the served version drew: on-policy, for iterative DPO)",
    ),
    EnvVar("NCP_STEPS", f"{_SAMPLING.steps} (shapes model: {SHAPES_STEPS})", "diffusion steps per arena image"),
    EnvVar("NCP_GUIDANCE", str(_SAMPLING.guidance), "classifier-free guidance scale of arena images"),
    EnvVar(
        "NCP_SCHEDULER",
        "dpmpp-2m (shapes model: model)",
        "sampler of arena images: dpmpp-2m (DPM-Solver++ 2M, Karras sigmas: fast at 20 steps) or model (as shipped)",
    ),
    EnvVar(
        "NCP_GPU_PLAN",
        "auto",
        "GPU memory plan of a round: auto (from the card), shared (train beside generation) or exclusive (pause it)",
    ),
    EnvVar("NCP_SCHEDULE", "1", "1: train on a timer; 0: only when an admin runs a round"),
    EnvVar("NCP_PREFETCH", str(ArenaConfig().prefetch), "ready pairs kept in the prefetch queue"),
    EnvVar(
        "NCP_RATINGS_PER_PAIR",
        str(ArenaConfig().ratings_per_pair),
        "sessions a pool pair is shown to (several ratings give a consensus; 1 = every pair fresh); when raters "
        "outpace the generator a pair may be shown up to twice this often rather than make a rater wait (the admin "
        "status counts these overflow showings)",
    ),
    EnvVar(
        "NCP_GENERATION_WORKER",
        "1",
        "1: generate in a child process (keeps diffusion off the HTTP handlers' GIL); 0: in the app process",
    ),
    EnvVar(
        "NCP_GENERATION_NICE",
        str(ArenaConfig().generation_nice),
        "CPU priority of the generation process (0-19, higher yields more to HTTP handlers)",
    ),
    EnvVar("NCP_DEVICE", "auto (CUDA when available)", "where the arena's pipeline runs: auto, cpu, cuda, cuda:1"),
    EnvVar(
        "NCP_HUB_DATASET_REPO", "unset (no push)", "HF dataset repo (user/name) the export is pushed to periodically"
    ),
    EnvVar("NCP_HUB_TOKEN", "unset (falls back to HF_TOKEN)", "write token for NCP_HUB_DATASET_REPO"),
    EnvVar("NCP_HUB_PUSH_EVERY_S", "3600", "seconds between hub pushes (at least 60)"),
    EnvVar("NCP_ABUSE_DEFENCES", "1", "1: the vote-path defences below are on; 0: off (e.g. local simulated raters)"),
    EnvVar("NCP_VOTES_PER_MINUTE", f"{_ABUSE.votes_per_minute:g}", "votes per minute per rater (0: no rate limit)"),
    EnvVar("NCP_VOTE_BURST", str(_ABUSE.burst), "votes a rater may cast back to back before the rate limit applies"),
    EnvVar("NCP_DAILY_VOTE_CAP", str(_ABUSE.daily_cap), "votes per rater per UTC day (0: no cap)"),
    EnvVar(
        "NCP_ADDRESS_VOTES_PER_MINUTE",
        f"{SPACE_ADDRESS_VOTES_PER_MINUTE:g} on a Space (SPACE_ID set), else 0",
        "vote attempts per minute per client network address, whatever session they use (0: off; the address is "
        "kept only as an in-memory salted hash); several times NCP_VOTES_PER_MINUTE, as a network can hold many raters",
    ),
    EnvVar("NCP_ADDRESS_BURST", str(_ABUSE.address_burst), "attempts an address may make back to back"),
    EnvVar(
        "NCP_TRUSTED_PROXY_HOPS",
        "1 on a Space (SPACE_ID set), else 0",
        "proxies in front of the app that append the client's address to X-Forwarded-For (which entry to trust)",
    ),
    EnvVar(
        "NCP_MIN_VOTE_MS",
        str(_ABUSE.min_vote_ms),
        "a vote sooner after its pair was shown is stored flagged `too_fast` and never trained on",
    ),
    EnvVar(
        "NCP_MIN_TRUST",
        f"{_ABUSE.min_trust:g}",
        f"control-pair trust below which a rater is shadow-excluded (after {_ABUSE.min_control_votes} control votes)",
    ),
    EnvVar(
        "NCP_REVIEW_EVERY_VOTES",
        str(_ABUSE.review_every_votes),
        "votes between anomaly reviews of all raters (too fast, one side, disagreement); 0: never",
    ),
    EnvVar(
        "NCP_EXPORT_ACCESS",
        "public",
        "who may download the preference export (Data tab, /export API): public (an open dataset) or admin",
    ),
    EnvVar("OAUTH_CLIENT_ID", "unset", "set by Spaces with `hf_oauth: true`: shows the HF login button"),
)


def config_markdown() -> str:
    rows = [f"| `{v.name}` | {v.default} | {v.help} |" for v in ENV_VARS]
    return "\n".join(["| variable | default | meaning |", "|---|---|---|", *rows]) + "\n"


def env_value(env: Mapping[str, str], name: str, cast: Callable[[str], object], default: object) -> object:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return cast(raw)
    except ValueError:
        raise ValueError(
            f"{name}={raw!r} is not a valid {cast.__name__}; unset it or give e.g. {default!r}."
        ) from None


def config_from_env(env: Mapping[str, str]) -> ArenaConfig:
    """Map ENV_VARS onto ArenaConfig (the one place that reads the environment)."""
    model = env.get("NCP_MODEL", "").strip() or str(SHAPES_MODEL)
    schedule = str(env_value(env, "NCP_SCHEDULE", str, "1"))
    if schedule not in ("0", "1"):
        raise ValueError(f"NCP_SCHEDULE must be 0 or 1, got {schedule!r}.")
    shapes = is_shapes_model(model)  # the embedded model or one pretrained from it (the same tokenizer)
    round_space = str(env_value(env, "NCP_ROUND_SPACE", str, _LOOP.space))
    if round_space not in SPACE_BETA:
        raise ValueError(f"NCP_ROUND_SPACE must be one of {', '.join(SPACE_BETA)}, got {round_space!r}.")
    loop = LoopConfig(
        model=model,
        shapes_probes=24 if shapes else 0,  # the shapes world gates on the pixel judge too (fixed probe set)
        probe_steps=SHAPES_STEPS if shapes else _LOOP.probe_steps,
        probe_guidance=SHAPES_GUIDANCE if shapes else _LOOP.probe_guidance,
        # The shapes world promotes on evidence from held-out votes, the judge vetoing regressions only (a judge-only
        # gate promoted coin-flip rounds: ncp.shapes.model.DEFAULT_GATE_MIN_EVAL_PAIRS).
        gate_require_acc_gain=shapes,
        gate_min_eval_pairs=SHAPES_GATE_MIN_EVAL_PAIRS if shapes else _LOOP.gate_min_eval_pairs,
        gate_min_judge_delta=SHAPES_GATE_JUDGE_VETO if shapes else _LOOP.gate_min_judge_delta,
        lr=SHAPES_ROUND_LR if shapes else _LOOP.lr,  # the rounds `python -m bench.loop` measures
        max_steps=SHAPES_ROUND_STEPS if shapes else _LOOP.max_steps,
        eval_max_pairs=SHAPES_GATE_PAIRS if shapes else _LOOP.eval_max_pairs,
        train_every_s=float(
            env_value(env, "NCP_TRAIN_EVERY_S", float, SHAPES_ROUND_EVERY_S if shapes else _LOOP.train_every_s)
        ),
        min_new_votes=int(
            env_value(env, "NCP_MIN_NEW_VOTES", int, SHAPES_ROUND_MIN_VOTES if shapes else _LOOP.min_new_votes)
        ),
        continue_rejected=int(
            env_value(
                env, "NCP_CONTINUE_REJECTED", int, SHAPES_CONTINUE_REJECTED if shapes else _LOOP.continue_rejected
            )
        ),
        timestep_low=float(
            env_value(env, "NCP_TIMESTEP_LOW", float, SHAPES_TIMESTEP_LOW if shapes else _LOOP.timestep_low)
        ),
        space=round_space,
        beta=SPACE_BETA[round_space],
        reference=str(env_value(env, "NCP_DPO_REFERENCE", str, _LOOP.reference)),
        train_window=str(env_value(env, "NCP_TRAIN_WINDOW", str, _LOOP.train_window)),
    )
    sampling = SamplingConfig(
        steps=int(env_value(env, "NCP_STEPS", int, SHAPES_STEPS if shapes else _SAMPLING.steps)),
        guidance=float(env_value(env, "NCP_GUIDANCE", float, _SAMPLING.guidance)),
        scheduler=str(env_value(env, "NCP_SCHEDULER", str, "model" if shapes else "dpmpp-2m")),  # type: ignore[arg-type]
    )
    gpu_plan = str(env_value(env, "NCP_GPU_PLAN", str, "auto"))
    if gpu_plan not in PLAN_MODES:
        raise ValueError(f"NCP_GPU_PLAN must be one of {', '.join(PLAN_MODES)}, got {gpu_plan!r}.")
    salt = env.get("NCP_RATER_SALT") or ArenaConfig().rater_salt
    if len(salt.encode()) < 16:
        raise ValueError("NCP_RATER_SALT must be at least 16 bytes; generate one with `openssl rand -hex 16`.")
    users = tuple(u.strip() for u in env.get("NCP_ADMIN_USERS", "").split(",") if u.strip())
    defences = str(env_value(env, "NCP_ABUSE_DEFENCES", str, "1"))
    if defences not in ("0", "1"):
        raise ValueError(f"NCP_ABUSE_DEFENCES must be 0 or 1, got {defences!r}.")
    space = bool(env.get("SPACE_ID"))  # on a Hugging Face Space: public, behind one proxy
    abuse = AbuseConfig(
        votes_per_minute=float(env_value(env, "NCP_VOTES_PER_MINUTE", float, _ABUSE.votes_per_minute)),
        burst=int(env_value(env, "NCP_VOTE_BURST", int, _ABUSE.burst)),
        daily_cap=int(env_value(env, "NCP_DAILY_VOTE_CAP", int, _ABUSE.daily_cap)),
        min_vote_ms=int(env_value(env, "NCP_MIN_VOTE_MS", int, _ABUSE.min_vote_ms)),
        min_trust=float(env_value(env, "NCP_MIN_TRUST", float, _ABUSE.min_trust)),
        review_every_votes=int(env_value(env, "NCP_REVIEW_EVERY_VOTES", int, _ABUSE.review_every_votes)),
        address_votes_per_minute=float(
            env_value(env, "NCP_ADDRESS_VOTES_PER_MINUTE", float, SPACE_ADDRESS_VOTES_PER_MINUTE if space else 0.0)
        ),
        address_burst=int(env_value(env, "NCP_ADDRESS_BURST", int, _ABUSE.address_burst)),
        trusted_proxy_hops=int(env_value(env, "NCP_TRUSTED_PROXY_HOPS", int, 1 if space else 0)),
    )
    repo = env.get("NCP_HUB_DATASET_REPO", "").strip()
    hub = None
    if repo:  # off unless a repo is named; then a token is required (HubPushConfig says so clearly)
        hub = HubPushConfig(
            repo_id=repo,
            token=(env.get("NCP_HUB_TOKEN") or env.get("HF_TOKEN") or "").strip(),
            every_s=float(env_value(env, "NCP_HUB_PUSH_EVERY_S", float, 3600.0)),
        )
    worker = str(env_value(env, "NCP_GENERATION_WORKER", str, "1"))
    if worker not in ("0", "1"):
        raise ValueError(f"NCP_GENERATION_WORKER must be 0 or 1, got {worker!r}.")
    nice = int(env_value(env, "NCP_GENERATION_NICE", int, base_nice := ArenaConfig().generation_nice))
    if not 0 <= nice <= 19:
        raise ValueError(f"NCP_GENERATION_NICE must be in 0..19, got {nice} (default {base_nice}).")
    device = env.get("NCP_DEVICE", "").strip() or "auto"
    if device not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", device):
        raise ValueError(f"NCP_DEVICE must be auto, cpu, cuda or cuda:N, got {device!r}.")
    base = ArenaConfig()
    return ArenaConfig(
        data_dir=Path(env.get("NCP_DATA_DIR", "").strip() or default_data_dir()),
        model=model,
        sampling=sampling,
        loop=loop,
        schedule=schedule == "1",
        prefetch=int(env_value(env, "NCP_PREFETCH", int, base.prefetch)),
        ratings_per_pair=int(env_value(env, "NCP_RATINGS_PER_PAIR", int, base.ratings_per_pair)),
        admin_token=env.get("NCP_ADMIN_TOKEN") or None,
        admin_users=users,
        rater_salt=salt,
        abuse=abuse if defences == "1" else None,
        hub_push=hub,
        generation_worker=worker == "1",
        generation_nice=nice,
        device=device,
        gpu_plan=gpu_plan,
    )
