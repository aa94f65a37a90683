"""Output folders that appear whole or not at all, and that never replace somebody else's folder.

Everything loraprune writes goes to a hidden temporary sibling first and is renamed into place at the end:
an interruption (Ctrl-C, SIGTERM, an error) leaves the previous folder or none, never a half-written one.
`--force` replaces only an empty folder or one that carries our marker file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["check_target", "staged_folder"]


def check_target(out_dir: Path, force: bool, marker: str) -> None:
    """Refuse an existing `out_dir` unless `force` and it is empty or has `marker` (a relative path)."""
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if not force:
        raise FileExistsError(f"{out_dir} already exists; pass force=True (--force) to replace it")
    if not _replaceable(out_dir, marker):
        raise FileExistsError(f"{out_dir} exists and was not written by loraprune (no {marker}); "
                              "refusing to replace it even with force")


def _replaceable(path: Path, marker: str) -> bool:
    """An empty folder, or one of ours. Never a file, a link, or anybody else's folder."""
    if path.is_symlink() or not path.is_dir():
        return False
    return not any(path.iterdir()) or (path / marker).is_file()


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def _move_into_place(tmp: Path, out_dir: Path, force: bool, marker: str) -> None:
    if not out_dir.exists() and not out_dir.is_symlink():
        os.rename(tmp, out_dir)
        return
    check_target(out_dir, force, marker)  # re-checked: the folder may have changed while we were writing
    old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
    os.rename(out_dir, old / "d")
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(old / "d", out_dir)  # put the previous folder back
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_folder(out_dir: str | os.PathLike, force: bool, marker: str) -> Iterator[Path]:
    """Yield an empty temporary folder beside `out_dir`; on success it becomes `out_dir` (after an fsync),
    on any failure it is removed. The target is checked before and again at the rename."""
    out_dir = Path(out_dir)
    check_target(out_dir, force, marker)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        yield tmp
        if not (tmp / marker).is_file():
            raise RuntimeError(f"internal error: {out_dir} would be written without its marker {marker}")
        _fsync_tree(tmp)
        _move_into_place(tmp, out_dir, force, marker)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
