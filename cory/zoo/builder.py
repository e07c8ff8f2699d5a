"""Building zoo models into the cache: atomically, once, safely across processes.

A folder in the cache is either absent or complete: it is written under a temporary name in the
same directory and renamed into place with ``os.replace``. Builders of the same recipe take an
exclusive ``fcntl.flock`` on a lock file next to it, so concurrent builds wait for the first one
and then reuse its folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable, Iterator

from cory.zoo import registry
from cory.zoo.gguf import ZooSourceError, write_gguf_model
from cory.zoo.train import write_model


def build(name: str, force: bool = False, progress: bool = True, source: str | None = None) -> pathlib.Path:
    """The built folder of zoo model ``name``, building it first if it is not cached (or
    ``force``). Raises UnknownModelError for a name the zoo does not have. ``source``: a local
    wheel or GGUF for a model converted from one (see ``cory.zoo.gguf``)."""
    entry = registry.entry(name)
    if source and not isinstance(entry.recipe, registry.GGUFRecipe):
        raise ZooSourceError(f"{name} is built from its recipe; a source file applies only to converted models")

    def write(folder: pathlib.Path) -> None:
        if isinstance(entry.recipe, registry.GGUFRecipe):
            write_gguf_model(entry, folder, progress, source)
            return
        write_model(entry, folder, progress)

    return build_folder(registry.model_dir(name), write, force)


def resolve(name: str, progress: bool = True) -> str:
    """A path or hub id for ``from_pretrained``: the built folder for a ``cory:`` name, else
    ``name`` unchanged."""
    if registry.is_zoo_name(name):
        return str(build(name, progress=progress))
    return name


def build_folder(
    folder: pathlib.Path, write: Callable[[pathlib.Path], None], force: bool = False
) -> pathlib.Path:
    """Makes ``folder`` by calling ``write(tmp)`` on an empty temporary folder beside it, then
    renaming ``tmp`` to ``folder``. Skips the work when ``folder`` exists (unless ``force``).

    Concurrent callers for the same folder serialise on a lock file; all return a complete folder
    and, without ``force``, only the first one writes. If ``write`` raises, nothing is left behind
    (a killed process leaves its temporary folder, which the next build removes). A forced rebuild
    moves the old folder aside for the instant of the rename, so a reader that does not hold the
    lock may briefly find no folder.
    """
    if folder.is_dir() and not force:
        return folder  # published folders are always complete, so no lock is needed to read
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(folder.parent / f".{folder.name}.lock"):
        if folder.is_dir() and not force:
            return folder  # another process built it while we waited for the lock
        _remove_leftovers(folder)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
        try:
            write(tmp)
            _publish(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


@contextlib.contextmanager
def _exclusive_lock(path: pathlib.Path) -> Iterator[None]:
    # flock is released by the kernel if the process dies, so a crash never leaves a stale lock.
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_leftovers(folder: pathlib.Path) -> None:
    """Deletes temporary folders of earlier builds of ``folder`` that crashed; only called under
    the lock, when no build of this folder can be running."""
    for stale in folder.parent.glob(f".{folder.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in folder.parent.glob(f".{folder.name}.old-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _publish(tmp: pathlib.Path, folder: pathlib.Path) -> None:
    """Renames ``tmp`` to ``folder``, first moving an existing ``folder`` (a forced rebuild)
    aside, because ``os.replace`` cannot replace a non-empty directory."""
    # mkdtemp (and some writers) make owner-only files; a cache is readable like any folder.
    tmp.chmod(0o755)
    for path in tmp.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    old = None
    if folder.exists():
        old = folder.parent / f".{folder.name}.old-{os.getpid()}"
        os.replace(folder, old)
    os.replace(tmp, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
