"""Atomic writes: a file or folder is built beside its destination and moved over it only once complete,
so readers (and an earlier complete version) never see a half-written one, whatever interrupts the write.
And `FolderLayout`, the base of the classes that own a folder's file names."""
import glob
import json
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager, suppress
from pathlib import Path

from waveft.errors import UserError

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # reading the umask means setting it; this puts it back


def give_usual_permissions(path: str | Path) -> None:
    """mkstemp, mkdtemp and safetensors create private files and folders; give them what the umask allows."""
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~_UMASK)


def _temporary_prefix(path: Path) -> str:
    """A temporary of `path` is `.NAME.HOST-PID.RANDOM.tmp`: the writer it belongs to can be told from its name."""
    return f".{path.name}.{socket.gethostname()}-"


def _process_is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale_temporaries(path: Path) -> None:
    """Remove the temporaries of `path` left by a killed writer on this host (SIGKILL skips every cleanup);
    a live writer's, or another host's (a shared file system), are left alone. A folder writer killed between
    its two renames left the previous `path` in its temporary (`previous`) and no `path`: that is put back."""
    prefix = _temporary_prefix(path)
    for stale in path.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        pid = stale.name[len(prefix):].split(".", 1)[0]
        if not pid.isdigit() or _process_is_alive(int(pid)):
            continue
        with suppress(FileNotFoundError):  # another writer removed it first
            if not stale.is_dir():
                stale.unlink()
                continue
            if (stale / _PREVIOUS).exists() and not path.exists():
                os.replace(stale / _PREVIOUS, path)
            shutil.rmtree(stale)


def _temporary(path: Path, folder: bool = False) -> str:
    """A new temporary file (its descriptor, its path) or folder (its path) beside `path`, named as
    `remove_stale_temporaries` expects."""
    kwargs = {"dir": path.parent, "prefix": f"{_temporary_prefix(path)}{os.getpid()}.", "suffix": ".tmp"}
    return tempfile.mkdtemp(**kwargs) if folder else tempfile.mkstemp(**kwargs)


_PREVIOUS = "previous"  # inside a folder writer's temporary: the version being replaced, during the swap


def write_atomic(path: str | Path, write) -> None:
    """Call `write(binary_file)` on a temp file beside `path`, flush it to disk, then move it over `path`. A
    temporary a killed earlier writer left is removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = _temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        give_usual_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def check_can_write(path: str | Path, what: str, folder: bool = True) -> None:
    """Refuse, before any heavy work, a destination this process cannot write: a folder (or a file's folder) to
    be made under a file, a folder without write permission, a file where a folder goes or the reverse. Creates
    nothing. `what` names the flag or key, e.g. "--out"."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        raise UserError(f"{what} {path} is a {'file' if folder else 'folder'}; it must be a "
                        f"{'folder' if folder else 'file'}")
    existing = path if folder else path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{what} {path} cannot be written: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path} cannot be written: no write permission in {existing}")


def write_text_atomic(path: str | Path, text: str) -> None:
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def write_json_atomic(path: str | Path, data) -> None:
    """Strict JSON: a NaN or infinity (which json.dumps would write as the non-JSON NaN / Infinity that other
    readers refuse) is a ValueError here, before anything is written."""
    write_text_atomic(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


@contextmanager
def atomic_directory(path: str | Path):
    """Yield a temporary folder beside `path`; on success it replaces `path` whole, on failure it is removed.
    What a killed earlier writer of `path` left is cleaned up first (`remove_stale_temporaries`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    staging = _temporary(path, folder=True)
    give_usual_permissions(staging)
    try:
        yield staging
        _sync_tree(staging)
        if path.exists():
            old = _temporary(path, folder=True)
            os.replace(path, os.path.join(old, _PREVIOUS))
            os.replace(staging, path)
            shutil.rmtree(old)
        else:
            os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _sync_tree(folder: str) -> None:
    """Flush every file of `folder` to disk before it is renamed into place, so that after a power loss a
    folder that has its final name is complete."""
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


class FolderLayout:
    """A folder's layout: its file names as class constants, their paths under `root` as `inside(NAME)`
    properties (RunFolder, AdapterFolder)."""

    def __init__(self, root: str | os.PathLike):
        self.root = os.fspath(root)

    def _path(self, name: str) -> str:
        return os.path.join(self.root, name)


def inside(constant: str) -> property:
    """The path of the file named by the class constant `constant`, under the folder's root."""
    return property(lambda self: self._path(getattr(self, constant)))
