"""Writing files and folders so that a failure never leaves a half-written one: write
under a temporary name beside the target, rename onto it when complete. Used by every
writer of the project (saved models, resume progress, caches, benchmark sections).

An output folder is never allowed to destroy what the user put there: `atomic_folder`
(and `check_output_folder`, which writers call before any work) refuses a non-empty
folder that cospadi did not write, the folder a run reads from or any parent of it, the
current folder, and replaces an earlier cospadi output only with overwrite=True. The
temporary folder is named `.OUT.tmp-<pid>-<random>`, so a later run can tell a leftover
of a killed writer (its process is gone) from the work of a live one, and removes it.
Caches that any process may fill (the built-in models) build in `scratch_folder` and
`publish_folder` the result, the first finished process winning."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from .errors import CospadiError

# A folder holding one of these was written by cospadi: a saved model, a dense export.
OUTPUT_MARKERS = ("cospadi.json", "cospadi-export.json")
Inputs = Mapping[str, str | os.PathLike | None]  # label -> a path the run reads


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of the file at `path`, in hex (read in chunks, not into memory)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


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
def atomic_folder(out_dir: str | os.PathLike, *, overwrite: bool = False, inputs: Inputs | None = None,
                  what: str = "output folder") -> Iterator[Path]:
    """Yield a fresh temporary folder beside `out_dir` (after check_output_folder); on
    success it replaces `out_dir` (an earlier output there is removed only after the new
    one is complete); on error it is deleted and `out_dir` is left as it was."""
    out = check_output_folder(out_dir, overwrite=overwrite, inputs=inputs, what=what)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    except OSError as exc:
        raise CospadiError(f"cannot write beside {out}: {exc.strerror}; choose a writable {what}") from exc
    try:
        yield tmp
        _default_permissions(tmp)
        if out.exists():
            _check_replaceable(out, overwrite, what)  # again: something may have appeared meanwhile
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def scratch_folder(target: str | os.PathLike, what: str = "folder") -> Iterator[Path]:
    """Yield a fresh empty folder `.TARGET.tmp-<pid>-<random>` beside `target` to build it
    in (the leftovers of killed builders of `target` are removed first: see
    remove_stale_temporaries); it is deleted when the block ends, so move it onto
    `target` with publish_folder inside the block. CospadiError when the parent of
    `target` cannot be written (`what` names the folder in the message)."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    except OSError as exc:
        raise CospadiError(f"cannot write beside {target}: {exc.strerror}; choose a writable {what}") from exc
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_folder(tmp: Path, target: Path) -> bool:
    """Rename the finished folder `tmp` onto `target` (with the permissions a plain mkdir
    would give) unless a non-empty folder is already there: another process finished
    first, and `tmp` stays where it is. Whether `tmp` became `target`."""
    if target.is_dir() and any(target.iterdir()):
        return False
    _default_permissions(tmp)
    try:
        os.replace(tmp, target)  # atomic; refuses a non-empty folder that appeared meanwhile
    except OSError:
        if target.is_dir() and any(target.iterdir()):
            return False
        raise
    return True


def check_output_folder(out_dir: str | os.PathLike, *, overwrite: bool = False, inputs: Inputs | None = None,
                        what: str = "output folder") -> Path:
    """The resolved `out_dir` if a writer may put a folder there, else CospadiError: it
    must not be a file, one of `inputs` (label -> path; None entries are skipped) or a
    parent of one, the current folder or a parent of it, nor a non-empty folder without
    an OUTPUT_MARKERS file; an earlier cospadi output needs `overwrite`; the nearest
    existing parent must be writable. Removes stale temporaries of killed writers first."""
    if not str(out_dir).strip():
        raise CospadiError(f"the {what} is empty: give the path of a new folder")
    out = Path(out_dir).expanduser().resolve()
    labelled = {**{k: v for k, v in (inputs or {}).items() if v is not None and str(v).strip()},
                "the current folder": Path.cwd()}
    for label, path in labelled.items():
        source = Path(path).expanduser().resolve()
        if out == source or out in source.parents:
            relation = "is" if out == source else "contains"
            raise CospadiError(f"{what} {out} {relation} {label} ({source}); writing there would delete it: "
                               "choose another path")
    remove_stale_temporaries(out)
    if out.exists() and not out.is_dir():
        raise CospadiError(f"{what} {out} exists and is not a folder: choose another path")
    if out.is_dir():
        _check_replaceable(out, overwrite, what)
    _check_writable(out.parent, what)
    return out


def _check_replaceable(out: Path, overwrite: bool, what: str) -> None:
    """CospadiError unless the existing folder `out` is empty, or an earlier cospadi
    output and `overwrite` is set."""
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    if not any(name in entries for name in OUTPUT_MARKERS):
        more = f" and {len(entries) - 1} more" if len(entries) > 1 else ""
        raise CospadiError(f"{what} {out} already holds files that cospadi did not write ({entries[0]}{more}); "
                           "cospadi will not delete them: choose another path (a new or empty folder)")
    if not overwrite:
        raise CospadiError(f"{what} {out} holds an earlier cospadi output: pass --overwrite (API: overwrite=True) "
                           "to replace it, or choose another path")


def _check_writable(folder: Path, what: str) -> None:
    """CospadiError unless the nearest existing folder at or above `folder` lets us
    create entries (the missing ones are created when writing)."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise CospadiError(f"cannot create the {what} under {existing}: it is a file; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CospadiError(f"cannot write in {existing} (permission denied or read-only): choose a writable {what}")


def check_output_file(path: str | os.PathLike, what: str = "output file") -> Path:
    """The resolved `path` if a file can be written there (an existing file is replaced),
    else CospadiError: empty path, a folder, or a parent that cannot be written."""
    if not str(path).strip():
        raise CospadiError(f"the {what} path is empty: give a file path")
    target = Path(path).expanduser().resolve()
    if target.is_dir():
        raise CospadiError(f"{what} {target} is a folder: give a file path")
    _check_writable(target.parent, what)
    return target


_TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)(?:-[^/]*)?")


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Remove the folders a killed writer of `out` left beside it: `.OUT.tmp-<pid>-*`
    (an unfinished save) and `.OUT.old-<pid>` (the earlier output, moved aside just before
    the kill: put back when `out` is missing), only when process <pid> is gone. Returns
    what was removed or restored."""
    if not out.parent.is_dir():
        return []
    found = []
    for path in out.parent.glob(f".{_glob_escape(out.name)}.*-*"):
        match = _TEMPORARY.fullmatch(path.name)
        if (not match or match["name"] != out.name or not path.is_dir() or path.is_symlink()
                or _alive(int(match["pid"]))):
            continue
        if match["kind"] == "old" and not out.exists():
            os.replace(path, out)
        else:
            shutil.rmtree(path, ignore_errors=True)
        found.append(path)
    return found


def remove_stale_temporary_files(folder: Path) -> list[Path]:
    """Remove the `.NAME.tmp-<pid>` files atomic_file's writers left in `folder` when
    killed (process <pid> gone). Returns what was removed."""
    found = []
    for path in folder.glob(".*.tmp-*") if folder.is_dir() else []:
        pid = path.name.rpartition(".tmp-")[2]
        if pid.isdigit() and path.is_file() and not path.is_symlink() and not _alive(int(pid)):
            path.unlink(missing_ok=True)
            found.append(path)
    return found


def _glob_escape(name: str) -> str:
    """`name` with the glob metacharacters * ? [ matched literally."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def _alive(pid: int) -> bool:
    """Whether process `pid` exists (this one included); unknown counts as alive."""
    if pid <= 0 or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _default_permissions(folder: Path) -> None:
    """Give `folder` and everything in it the permissions a plain mkdir / open would
    (mkdtemp makes the folder private, some writers make files private)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
