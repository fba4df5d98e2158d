"""Files and folders rankdown writes: atomic writes, which output folders it may replace, the
cache root, and recovery after a kill. The one home of these rules:

- every write goes to a hidden sibling (``.NAME.tmp-PID-…``) and is renamed into place, so a
  reader never sees half of it;
- a folder is replaced (``force``) only when everything in it is something rankdown writes and it
  holds one of rankdown's index files (a plan, an analysis, a checkpoint's meta): a project folder,
  the current folder or a folder with a user's file in it is refused, whatever ``force`` says;
- a replace renames the old folder aside (``.NAME.old-PID-…``), renames the new one in, then
  deletes the old one. A kill between the two renames leaves the old folder aside; the next write
  (or :func:`recover`) renames it back, and deletes temporaries whose process is gone.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from rankdown.errors import OutputExistsError

# Every name rankdown writes inside a folder of its own (compress/finetune output, analysis,
# checkpoints). A folder holding any other name was not written by rankdown alone.
OWN_NAMES = frozenset(
    {
        "plan.json",
        "model.safetensors",
        "report.json",
        "checkpoints",
        "last",
        "state.pt",
        "meta.json",
        "analysis.json",
        "spectra.png",
        "energy.png",
        "sensitivity.png",
        "model.onnx",  # rankdown export (rankdown.deployment.export.FORMATS)
        "model.torchscript.pt",
        "model.pt2",
    }
)
INDEX_NAMES = ("plan.json", "analysis.json", "meta.json")


def default_cache_dir() -> Path:
    """Where sweeps, latency tables and rendered data are cached: $RANKDOWN_CACHE_DIR, else
    $XDG_CACHE_HOME/rankdown, else ~/.cache/rankdown."""
    base = os.environ.get("RANKDOWN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "rankdown"
    )
    return Path(base)


def _prefix(name: str, kind: str) -> str:
    return f".{name}.{kind}-{os.getpid()}-"


def _owner_alive(entry: Path) -> bool:
    """Whether the process that made a temporary (its pid is in the name) still runs."""
    try:
        pid = int(entry.name.rsplit(".", 1)[1].split("-")[1])
    except (IndexError, ValueError):
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _only_ours(folder: Path) -> bool:
    try:
        return all(e.name in OWN_NAMES for e in folder.iterdir())
    except OSError:
        return False


def is_rankdown_folder(folder: Path) -> bool:
    """True when everything in ``folder`` is something rankdown writes and it holds an index file."""
    return folder.is_dir() and _only_ours(folder) and any((folder / n).is_file() for n in INDEX_NAMES)


def _stale(parent: Path, name: str, kind: str) -> list[Path]:
    try:
        entries = list(parent.glob(f".{name}.{kind}-*"))
    except OSError:
        return []
    return [e for e in entries if not _owner_alive(e)]


def recover(out: Path) -> None:
    """After a kill: put an old folder renamed aside back where it was (when nothing replaced it),
    and delete temporaries left by processes that are gone. Touches only rankdown's own names."""
    out = Path(out)
    parent, name = out.parent, out.name
    if not parent.is_dir():
        return
    olds = sorted(_stale(parent, name, "old"), key=lambda p: p.stat().st_mtime)
    if olds and not out.exists() and olds[-1].is_dir() and _only_ours(olds[-1]):
        os.replace(olds.pop(), out)
    for entry in olds + _stale(parent, name, "tmp"):
        if entry.is_dir() and _only_ours(entry):
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.is_file():
            with contextlib.suppress(OSError):
                entry.unlink()


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_writable(path: Path, what: str) -> None:
    """Refuse, before any work, a path whose folder cannot be created or written."""
    anc = _nearest_existing(Path(path).absolute().parent)
    if not anc.is_dir():
        raise OutputExistsError(f"{what} {path}: cannot create it, {anc} is a file")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise OutputExistsError(f"{what} {path}: {anc} is not writable")


def check_output_dir(out: str | Path, force: bool, what: str = "output folder") -> Path:
    """Refuse, before any work, an output folder that rankdown may not write or replace."""
    out = Path(out)
    resolved, cwd = out.resolve(), Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise OutputExistsError(f"{what} {out} is the current folder or one above it: name a new folder")
    recover(out)
    if out.exists():
        if not out.is_dir():
            raise OutputExistsError(f"{what} {out} exists and is not a folder")
        entries = sorted(e.name for e in out.iterdir())
        if entries and not force:
            raise OutputExistsError(f"{what} {out} is not empty; pass --force (force=True) to replace it")
        if entries and not is_rankdown_folder(out):
            foreign = [e for e in entries if e not in OWN_NAMES][:3] or entries[:3]
            raise OutputExistsError(
                f"{what} {out} is not a rankdown output (it holds {', '.join(foreign)}): "
                "--force only replaces folders rankdown wrote"
            )
    check_writable(out, what)
    return out


def check_output_file(path: str | Path, what: str, *, ours: Callable[[Path], bool]) -> Path:
    """Refuse, before any work, a file path rankdown may not write: a folder, a file it did not
    write (``ours`` says which are its own), or an unwritable place."""
    path = Path(path)
    if path.is_dir():
        raise OutputExistsError(f"{what} {path} is a folder")
    if path.exists() and not ours(path):
        raise OutputExistsError(f"{what} {path} exists and was not written by rankdown: choose another name")
    check_writable(path, what)
    return path


def atomic_write_dir(out: str | Path, write: Callable[[Path], None], force: bool, *, keep: Iterable[str] = ()) -> Path:
    """Write a folder through a hidden sibling and renames (see the module docstring). ``keep``:
    entries of the folder being replaced that the new one carries over (hard links when possible),
    e.g. a fine-tuned folder's checkpoints."""
    out = check_output_dir(out, force)
    parent = out.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(out.name, "tmp"), dir=parent))
    try:
        write(tmp)
        for name in keep:
            src = out / name
            if src.is_dir() and not (tmp / name).exists():
                shutil.copytree(src, tmp / name, copy_function=_link_or_copy)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=_prefix(out.name, "old"), dir=parent))
            os.replace(out, old)  # onto the empty folder just made: a unique name, atomically
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file through a temp file and a rename: readers never see half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in _stale(path.parent, path.name, "tmp"):
        if stale.is_file():
            with contextlib.suppress(OSError):
                stale.unlink()
    fd, tmp = tempfile.mkstemp(prefix=_prefix(path.name, "tmp"), dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def is_rankdown_report(path: Path) -> bool:
    """A JSON report rankdown wrote (``--json``): it names rankdown's version at its top level."""
    import json

    try:
        if path.stat().st_size > 256 * 2**20:
            return False
        data = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and "rankdown" in data
