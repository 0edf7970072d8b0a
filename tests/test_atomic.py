"""nld_train.atomic: a folder is replaced completely or not at all, and a crash leaves nothing that
the next attempt trips over or that destroys the old version."""
import os

import pytest

from nld_train import atomic
from nld_train.atomic import atomic_dir


def files(d) -> dict:
    return {str(p.relative_to(d)): p.read_text() for p in sorted(d.rglob("*")) if p.is_file()}


def old_target(tmp_path):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "a.txt").write_text("old a")
    (out / "sub" / "b.txt").write_text("old b")
    return out


def test_success_replaces_the_old_folder_and_leaves_nothing_beside_it(tmp_path):
    out = old_target(tmp_path)
    with atomic_dir(out) as tmp:
        assert tmp == tmp_path / "tmp.out" and tmp.is_dir() and not any(tmp.iterdir())
        assert files(out) == {"a.txt": "old a", "sub/b.txt": "old b"}, "the old folder changed before the commit"
        (tmp / "c.txt").write_text("new")
    assert files(out) == {"c.txt": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_new_target_gets_its_parents(tmp_path):
    out = tmp_path / "x" / "y" / "out"
    with atomic_dir(out) as tmp:
        (tmp / "f").write_text("1")
    assert files(out) == {"f": "1"}
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]


def test_failure_mid_write_keeps_the_old_folder_and_removes_the_temporary_one(tmp_path):
    out = old_target(tmp_path)
    with pytest.raises(KeyboardInterrupt):  # BaseException too: a Ctrl-C mid-write
        with atomic_dir(out) as tmp:
            (tmp / "half.txt").write_text("half")
            raise KeyboardInterrupt
    assert files(out) == {"a.txt": "old a", "sub/b.txt": "old b"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failed_rename_moves_the_old_folder_back(tmp_path, monkeypatch):
    out = old_target(tmp_path)
    real = os.replace

    def replace(src, dst):
        if str(src).endswith("tmp.out"):
            raise OSError(5, "I/O error")
        real(src, dst)
    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(OSError, match="I/O error"):
        with atomic_dir(out) as tmp:
            (tmp / "c.txt").write_text("new")
    assert files(out) == {"a.txt": "old a", "sub/b.txt": "old b"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_leftovers_of_a_crashed_attempt_are_cleaned(tmp_path):
    out = old_target(tmp_path)
    (tmp_path / "tmp.out").mkdir()  # killed while writing
    (tmp_path / "tmp.out" / "stale.txt").write_text("stale")
    (tmp_path / "trash.out").mkdir()  # killed while deleting the version before (out was in place)
    (tmp_path / "trash.out" / "rest.txt").write_text("rest")
    with atomic_dir(out) as tmp:
        assert not any(tmp.iterdir()), "the new folder starts with a crashed attempt's files"
        (tmp / "c.txt").write_text("new")
    assert files(out) == {"c.txt": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_trash_without_target_is_reported_not_deleted(tmp_path):
    """Killed between the two renames: trash.<name> is the only copy of the old version."""
    out = old_target(tmp_path)
    os.replace(out, tmp_path / "trash.out")
    with pytest.raises(FileExistsError, match="trash.out exists but .*out does not"):
        with atomic_dir(out):
            pytest.fail("the block ran")
    assert files(tmp_path / "trash.out") == {"a.txt": "old a", "sub/b.txt": "old b"}
    assert not out.exists() and not (tmp_path / "tmp.out").exists()


def test_without_replace_a_non_empty_target_is_kept(tmp_path):
    out = old_target(tmp_path)
    with pytest.raises(FileExistsError, match="not an empty folder"):
        with atomic_dir(out, replace=False) as tmp:
            (tmp / "c.txt").write_text("new")
    assert files(out) == {"a.txt": "old a", "sub/b.txt": "old b"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_dir(empty, replace=False) as tmp:
        (tmp / "c.txt").write_text("new")
    assert files(empty) == {"c.txt": "new"}


def test_remove_renames_before_deleting(tmp_path, monkeypatch):
    out = old_target(tmp_path)
    seen = []
    real = atomic.shutil.rmtree
    monkeypatch.setattr(atomic.shutil, "rmtree", lambda p, **kw: (seen.append(os.path.basename(p)), real(p, **kw)))
    atomic.remove(out)
    assert seen == ["trash.out"], "deleted under the folder's own name"
    assert not any(tmp_path.iterdir())
