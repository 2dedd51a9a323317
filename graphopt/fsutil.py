"""Small file-system helpers: output paths checked up front, written atomically."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from graphopt.errors import UsageError


def check_output_path(path: str | os.PathLike, *, inputs: tuple[str | os.PathLike, ...] = (),
                      force: bool = False, what: str = "output") -> Path:
    """Fail early (before any work) when `path` cannot be written or would overwrite an input."""
    out = Path(path)
    if out.is_dir():
        raise UsageError(f"{what} {out} is a directory")
    if not out.resolve().parent.is_dir():
        raise UsageError(f"{what} {out}: folder {out.resolve().parent} does not exist")
    for item in inputs:
        src = Path(item)
        same = src.exists() and out.exists() and os.path.samefile(src, out)
        if (same or src.resolve() == out.resolve()) and not force:
            raise UsageError(f"{what} {out} is the input file; use --force to overwrite it")
    return out


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a text file through a temporary file and a rename, so it is never half-written."""
    write_bytes_atomic(path, text.encode())


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write a file through a temporary file and a rename, so it is never half-written."""
    target = Path(path)
    folder = target.resolve().parent
    if not folder.is_dir():
        raise UsageError(f"{path}: folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_figure_atomic(fig, path: str | os.PathLike, **savefig_options) -> None:
    """Save a matplotlib figure through a temporary file and a rename, then close it."""
    import matplotlib.pyplot as plt

    target = Path(path)
    folder = target.resolve().parent
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=target.suffix or ".png", dir=folder)
    os.close(fd)
    try:
        fig.savefig(tmp, **savefig_options)
        os.replace(tmp, target)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
