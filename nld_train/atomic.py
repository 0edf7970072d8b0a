"""Folders that appear complete or not at all: write beside the target, then rename into place.

The folders nld-train publishes (checkpoints, HF exports and imports, add-on checkpoints, data and
installed artifacts) go through :func:`atomic_dir`::

    with atomic_dir(out) as tmp:      # tmp.<name>, empty, next to out (same filesystem)
        write(tmp / "model.safetensors")
    # here out holds the new files; an older out was renamed to trash.<name> and deleted

A rename within one filesystem is atomic, a recursive delete is not. So nothing is ever deleted
under the target's own name: an old version is first renamed to ``trash.<name>`` and only then
removed, and a failure before the rename removes only ``tmp.<name>``, leaving the old target as
it was. Writers whose publication is split in time or across processes (a collective or
background checkpoint save) call the two halves, :func:`begin` and :func:`publish`, themselves.

One writer per target at a time: the temporary name is fixed, so that a leftover of a crashed
attempt is found (and removed) by the next one. Standard library only: every layer imports it.
(The LoRA adapter and the learned sampler are saved by modules the HF export ships as remote code,
which imports nothing but torch and transformers; they keep their own copy of the sequence.)
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

TMP_PREFIX, TRASH_PREFIX = "tmp.", "trash."


def tmp_path(target) -> Path:
    """Where the next version of ``target`` is written: ``tmp.<name>`` beside it."""
    target = Path(target)
    return target.with_name(TMP_PREFIX + target.name)


def trash_path(target) -> Path:
    """Where an old ``target`` waits for its deletion: ``trash.<name>`` beside it."""
    target = Path(target)
    return target.with_name(TRASH_PREFIX + target.name)


def begin(target) -> Path:
    """An empty ``tmp.<name>`` beside ``target`` (parents created); returns it.

    Leftovers of a crashed earlier attempt: its ``tmp.<name>`` is removed (never the only copy of
    anything: the target is replaced only by a rename); a ``trash.<name>`` is removed if the target
    exists (a delete that was cut short). A ``trash.<name>`` without the target means a crash
    between the two renames of :func:`publish`: that folder is the only copy of the old version,
    so it is reported, not deleted.
    """
    target = Path(target)
    tmp, trash = tmp_path(target), trash_path(target)
    if trash.exists():
        if not target.exists():
            raise FileExistsError(f"{trash} exists but {target} does not: an earlier replacement of {target} was "
                                  f"interrupted and {trash} may be its only copy; move it back to {target.name} "
                                  "or delete it")
        shutil.rmtree(trash)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp, target, replace: bool = True) -> None:
    """Rename the complete ``tmp`` to ``target``. With ``replace`` an existing ``target`` is renamed
    to ``trash.<name>`` first and deleted after; if the second rename fails it is moved back.
    Without ``replace`` only an absent or empty ``target`` is replaced (one atomic rename), and a
    non-empty one raises ``FileExistsError`` and is left as it is."""
    tmp, target = Path(tmp), Path(target)
    if not replace:
        try:
            os.replace(tmp, target)
        except OSError as e:  # ENOTEMPTY / EEXIST (a folder with files), ENOTDIR (a file)
            raise FileExistsError(f"{target} exists and is not an empty folder: not replacing it ({e.strerror})") from e
        return
    trash = trash_path(target)
    moved = False
    if target.exists() or target.is_symlink():
        os.replace(target, trash)
        moved = True
    try:
        os.replace(tmp, target)
    except BaseException:
        if moved:
            os.replace(trash, target)
        raise
    if moved:  # the new version is in place: a failed delete leaves a trash.* that begin() removes
        shutil.rmtree(trash, ignore_errors=True)


def remove(path, ignore_errors: bool = False) -> None:
    """Delete the folder ``path`` without a moment in which a partial copy carries its name: rename
    it to ``trash.<name>`` (unless it is one already), then delete that (``ignore_errors`` as for
    ``shutil.rmtree``)."""
    path = Path(path)
    if not path.name.startswith(TRASH_PREFIX):
        trash = trash_path(path)
        if trash.exists():  # an earlier delete cut short: finish it first
            shutil.rmtree(trash, ignore_errors=ignore_errors)
        os.replace(path, trash)
        path = trash
    shutil.rmtree(path, ignore_errors=ignore_errors)


@contextlib.contextmanager
def atomic_dir(target, replace: bool = True) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; when the block completes, publish it as
    ``target`` (:func:`publish`). If the block or the publication fails, the temporary folder is
    removed and ``target`` is left exactly as it was (or, with ``replace``, moved back)."""
    tmp = begin(target)
    try:
        yield tmp
        publish(tmp, target, replace=replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
