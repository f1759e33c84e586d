"""Atomic writes: a file or folder is built beside its destination and moved over it only once complete,
so readers (and an earlier complete version) never see a half-written one, whatever interrupts the write.
And `FolderLayout`, the base of the classes that own a folder's file names."""
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # reading the umask means setting it; this puts it back


def give_usual_permissions(path: str | Path) -> None:
    """mkstemp, mkdtemp and safetensors create private files and folders; give them what the umask allows."""
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~_UMASK)


def write_atomic(path: str | Path, write) -> None:
    """Call `write(binary_file)` on a temp file beside `path`, flush it to disk, then move it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
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


def write_text_atomic(path: str | Path, text: str) -> None:
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def write_json_atomic(path: str | Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


@contextmanager
def atomic_directory(path: str | Path):
    """Yield a temporary folder beside `path`; on success it replaces `path` whole, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    give_usual_permissions(staging)
    try:
        yield staging
        _sync_tree(staging)
        if path.exists():
            old = tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent)
            os.replace(path, os.path.join(old, "previous"))
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
