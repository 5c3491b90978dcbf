"""Writing files so that an interruption never leaves half of one: the one atomic-write helper of the package.

Every file sleep-trl writes for the user (ledgers, reports, memory checkpoints, cached models) goes through
`atomic_write`: the content is written to a temporary name in the same folder, flushed to disk, then renamed over
the target (`os.replace` is atomic on POSIX and Windows). A folder is published the same way (`publish_dir`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp_path)` to produce the file, then move it onto `path` in one step.

    `write` receives a temporary path beside `path` (same file system, so the rename is atomic); if it raises, the
    temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, data, indent: int | None = 2) -> Path:
    """Write `data` as JSON to `path` atomically."""
    return atomic_write_text(path, json.dumps(data, indent=indent, ensure_ascii=False))


def publish_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Move a fully written temporary folder into place. When another process published `final` first (a race
    between two processes filling a cache), the temporary folder is discarded and theirs is kept."""
    tmp, final = Path(tmp), Path(final)
    try:
        os.replace(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes (checksums of checkpoints)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
