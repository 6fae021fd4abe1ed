"""Write one benchmark's section of docs/BENCHMARKS.md between `<!-- BEGIN name -->` / `<!-- END name -->` markers,
leaving every other section as it is (several benchmarks write the same file)."""

from __future__ import annotations

from pathlib import Path

HEADER = "# Benchmarks\n\nEvery figure below comes from a script in `bench/` that anyone can rerun.\n"


def write_section(path: Path, name: str, markdown: str) -> None:
    text = path.read_text() if path.exists() else HEADER
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{markdown.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)
