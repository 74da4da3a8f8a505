"""Writing files and folders so that a failure never leaves a half-written one: write
under a temporary name beside the target, rename onto it when complete. Used by every
writer of the project (saved models, resume progress, caches, benchmark sections)."""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import CospadiError


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` (its folder is created) to write the file to;
    when the block succeeds it is renamed onto `path`, when it fails it is removed and
    `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_folder(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `out_dir`; on success it replaces `out_dir`
    (an existing folder there is removed only after the new one is complete); on error
    it is deleted and `out_dir` is left as it was."""
    out = Path(out_dir).resolve()
    if out.exists() and not out.is_dir():
        raise CospadiError(f"output path {out} exists and is not a folder: choose another --out")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise CospadiError(f"cannot write beside {out}: {exc.strerror}; choose a writable --out") from exc
    try:
        yield tmp
        _default_permissions(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _default_permissions(folder: Path) -> None:
    """Give `folder` and everything in it the permissions a plain mkdir / open would
    (mkdtemp makes the folder private, some writers make files private)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
