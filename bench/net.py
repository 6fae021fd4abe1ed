"""A free localhost port: lives in `bench/harness.py`, re-exported here for the scripts that import `bench.net`."""

from bench.harness import free_port  # noqa: F401
