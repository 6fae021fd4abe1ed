"""What counts as a warning line in a process's output: a logging record at WARNING or above, a Python warning, a
traceback, or one of the third-party notices this project drops at their source (`ncp.notices`)."""

from __future__ import annotations

import re

WARNING_LINE = re.compile(
    r"\b(WARNING|ERROR|CRITICAL)\b|\w*Warning\b|warn|deprecat|Traceback|Expected types for|not expected and will be "
    r"ignored|truncated to \d+ tokens|requires torchvision|peft_config",
    re.IGNORECASE,
)


def warning_lines(output: str) -> list[str]:
    """The lines of `output` that read as warnings (progress-bar carriage returns split lines too)."""
    return [line for line in re.split(r"[\r\n]+", output) if WARNING_LINE.search(line)]
