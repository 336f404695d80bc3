"""Paths as the user's host sees them, in what a container prints.

In the image, the run directories live under /data/output and the images under /data/input, the
mounts `docker run -v` and the compose file make. A log line naming /data/output/2026-... is of
no use on the host; compose and the docker launcher pass the host folders in THRESHER_HOST_OUTPUT
and THRESHER_HOST_INPUT (`docker run -e THRESHER_HOST_OUTPUT="$PWD/runs" ...` does it by hand),
and every log line and the closing summary name those instead. Files thresher writes keep the
paths the run really used.
"""
from __future__ import annotations

import logging
import os
import re
from typing import List, Tuple

# The image's mount points (Dockerfile: THRESHER_WORK_DIR, THRESHER_INPUT_DIR) and the variables
# that name the host folder mounted there.
CONTAINER_OUTPUT = "/data/output"
CONTAINER_INPUT = "/data/input"
HOST_PATH_VARIABLES = (("THRESHER_HOST_OUTPUT", CONTAINER_OUTPUT), ("THRESHER_HOST_INPUT", CONTAINER_INPUT))


def host_mounts() -> List[Tuple[re.Pattern, str]]:
    """(container path pattern, host path) for each variable set; the pattern matches the path only
    as a whole path component (/data/output, /data/output/x, not /data/outputs)."""
    mounts = []
    for variable, container in HOST_PATH_VARIABLES:
        host = os.environ.get(variable, "").strip()
        if host:
            mounts.append((re.compile(re.escape(container) + r"(?![\w.-])"), host.rstrip("/") or "/"))
    return mounts


def on_host(text: str) -> str:
    """`text` with every container mount path replaced by the host folder mounted there."""
    for pattern, host in host_mounts():
        text = pattern.sub(lambda _: host, text)
    return text


class HostPathFilter(logging.Filter):
    """Rewrites each record's message with the host's paths."""

    def filter(self, record: logging.LogRecord) -> bool:
        if host_mounts():
            record.msg = on_host(record.getMessage())
            record.args = None
        return True


def install_host_paths() -> None:
    """Add the filter to every root-logger handler (the console and thresher.log)."""
    if not host_mounts():
        return
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, HostPathFilter) for f in handler.filters):
            handler.addFilter(HostPathFilter())
