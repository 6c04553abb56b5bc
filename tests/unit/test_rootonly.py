"""`pykata.rootonly`: the walk that decides whether a path is root's alone."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pykata import rootonly

NOBODY = 65534
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="giving files to nobody needs root")


def test_links_are_followed_where_the_kernel_follows_them(tmp_path: Path) -> None:
    """A link's target is walked from where the link points, `..` after a
    link included (not the lexical parent): the directory it really passes
    through is the one named."""
    theirs = tmp_path / "theirs"
    (theirs / "sub").mkdir(parents=True)
    (theirs / "file").write_text("")
    os.chown(theirs, NOBODY, NOBODY)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "link").symlink_to(theirs / "sub")
    (mine / "file").write_text("")
    assert rootonly.path_problem(mine / "file") is None
    problem = rootonly.path_problem(f"{mine}/link/../file")  # theirs/file, not mine/file
    assert problem is not None and problem.path == str(theirs)
    assert "owned by uid 65534" in problem.reason


def test_in_a_sticky_directory_only_roots_entries_pass(tmp_path: Path) -> None:
    """In a root-owned sticky directory another user cannot swap root's entry,
    but their own link there is theirs to change."""
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    (sticky / "file").write_text("")
    assert rootonly.path_problem(sticky / "file") is None
    (sticky / "link").symlink_to(sticky / "file")
    os.chown(sticky / "link", NOBODY, NOBODY, follow_symlinks=False)
    problem = rootonly.path_problem(sticky / "link")
    assert problem is not None and problem.path == str(sticky / "link")
    sticky.chmod(0o777)
    problem = rootonly.path_problem(sticky / "file")
    assert problem is not None and problem.reason == "writable by every user"


def test_a_tree_wants_every_entry_closed_and_follows_its_links(tmp_path: Path) -> None:
    """Below an import root, a sticky directory does not pass (anyone could add
    a module), and a link leads to a tree that is checked too."""
    root = tmp_path / "site"
    (root / "pkg").mkdir(parents=True)
    assert rootonly.tree_problem(root) is None
    (root / "pkg").chmod(0o1777)
    problem = rootonly.tree_problem(root)
    assert problem is not None and problem.path == str(root / "pkg")
    (root / "pkg").chmod(0o755)
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "deep").mkdir(parents=True)
    (elsewhere / "deep" / "mod.py").write_text("")
    os.chown(elsewhere / "deep" / "mod.py", NOBODY, NOBODY)
    (root / "linked").symlink_to(elsewhere)
    problem = rootonly.tree_problem(root)
    assert problem is not None and problem.path == str(elsewhere / "deep" / "mod.py")
