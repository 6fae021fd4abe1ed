"""Publishing a benchmark's section of docs/BENCHMARKS.md: lives in `bench/harness.py`, re-exported here for the
scripts that import it from `bench.docs`."""

from bench.harness import HEADER, ROOT, repo_path, write_section  # noqa: F401
