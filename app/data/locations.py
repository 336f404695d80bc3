"""Where things are: a folder or a bucket URL (s3://, gs://, az://), and thresher's own folders.

A low-floor module: it imports nothing of the app (nor fsspec), so the config check, the runner
and the data sources name locations the same way without importing one another.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Union

# fsspec protocols thresher reads and writes, and the extra that installs each one's filesystem.
URL_PROTOCOLS = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs"),
                 "az": ("adlfs", "azure"), "abfs": ("adlfs", "azure"), "abfss": ("adlfs", "azure"),
                 "memory": (None, None)}
URL_PATTERN = re.compile(r"^(?P<protocol>[a-z][a-z0-9+.-]*)://")
# `Path("s3://b/k")` is `s3:/b/k`: artifacts that went through Path get their URL back.
_PATH_MANGLED_URL = re.compile(r"^(?P<protocol>[a-z][a-z0-9+.-]*):/(?!/)(?P<rest>.*)$")


def is_url(location: Any) -> bool:
    """An fsspec URL such as s3://bucket/prefix (a plain path is not one)."""
    return bool(URL_PATTERN.match(str(location or "")))


def as_location(root: Union[str, Path]) -> str:
    """`root` as a plain path string, or as its URL when it is (or was, before `Path`) one."""
    text = str(root)
    match = _PATH_MANGLED_URL.match(text)
    if match and match["protocol"] in URL_PROTOCOLS:
        return f"{match['protocol']}://{match['rest']}"
    return text


def shapes_cache_dir() -> Path:
    """Where generated datasets live: $THRESHER_CACHE_DIR, else $XDG_CACHE_HOME/thresher."""
    if os.environ.get("THRESHER_CACHE_DIR"):
        return Path(os.environ["THRESHER_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "thresher"


def staging_dir(work_dir_url: str) -> Path:
    """The local folder that stands in for a bucket work_dir: $THRESHER_STAGING_DIR, else
    `<cache>/staging`, then the URL as a path (`s3/bucket/prefix`)."""
    base = Path(os.environ["THRESHER_STAGING_DIR"]) if os.environ.get("THRESHER_STAGING_DIR") else (
        shapes_cache_dir() / "staging")
    match = URL_PATTERN.match(work_dir_url)
    return base / match["protocol"] / work_dir_url[match.end():].strip("/")
