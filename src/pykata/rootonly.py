"""Is a file root's alone? The check behind every file root runs or obeys.

pykata runs as root the shim containerd starts, the Python code it imports, the
QEMU its configuration names; a user who can change any of them becomes root.
So such a file, and every directory on the way to it, must be changeable by
root only. The rule is the one sshd's StrictModes and sudo apply to their own
files, on the mode bits (POSIX ACLs are not read):

- every entry on the way (each directory from /, each symbolic link and what
  it leads to, the file itself) is owned by root: an entry's owner can chmod
  it, and a directory's owner can swap any entry in it;
- none is writable by others, nor by its group unless that group is root's
  (gid 0), as sudo allows: whoever can write a directory can rename the entry
  below it away and put their own in its place;
- except a root-owned sticky directory (like /tmp, mode 1777): there, only an
  entry's owner (or root) may rename or remove it, so a root-owned entry in it
  stays put, although anyone may add entries beside it.

That exception is about the one entry a path names. A directory Python imports
from is different: a file anyone adds to it is code (a module that shadows a
later one on sys.path, or a missing optional import), so `tree_problem` wants
every directory of an import root closed, sticky or not.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

_MAX_LINKS = 40  # as the kernel's path walk (ELOOP)


@dataclass(frozen=True)
class Problem:
    """An entry another user can change, and how."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path} is {self.reason}"


def _user(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _group(gid: int) -> str:
    try:
        return f"gid {gid} ({grp.getgrgid(gid).gr_name})"
    except KeyError:
        return f"gid {gid}"


def entry_problem(path: str, st: os.stat_result, *, sticky_ok: bool = True) -> Problem | None:
    """Why one entry (its lstat) is not root's alone, or None. `sticky_ok`:
    a root-owned sticky directory counts as closed (see the module's rule)."""
    if st.st_uid != 0:
        return Problem(path, f"owned by {_user(st.st_uid)}, not root")
    if stat.S_ISLNK(st.st_mode):
        return None  # a link's own mode means nothing; its directory guards it
    if sticky_ok and stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX:
        return None
    if st.st_mode & stat.S_IWOTH:
        return Problem(path, "writable by every user")
    if st.st_mode & stat.S_IWGRP and st.st_gid != 0:
        return Problem(path, f"writable by its group, {_group(st.st_gid)}")
    return None


def path_problem(path: str | os.PathLike[str]) -> Problem | None:
    """The first entry on the way to `path` that someone other than root can
    change, or None. Links are followed as the kernel follows them, and the
    entries on the way to each target are checked too. Raises OSError when the
    path cannot be walked (FileNotFoundError: some part does not exist)."""
    text = os.fspath(path)
    if not os.path.isabs(text):
        text = os.path.join(os.getcwd(), text)
    problem = entry_problem("/", os.lstat("/"))
    if problem is not None:
        return problem
    pending = _components(text)
    current = "/"
    links = 0
    while pending:
        name = pending.pop()
        if name == "..":
            current = os.path.dirname(current)  # checked on the way down
            continue
        candidate = os.path.join(current, name)
        st = os.lstat(candidate)
        problem = entry_problem(candidate, st)
        if problem is not None:
            return problem
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > _MAX_LINKS:
                raise OSError(40, "Too many levels of symbolic links", candidate)
            target = os.readlink(candidate)
            if os.path.isabs(target):
                current = "/"
            pending.extend(_components(target))
            continue
        current = candidate
    return None


def _components(path: str) -> list[str]:
    """A path's names, last first (a stack to pop), without empty ones and '.'."""
    return [part for part in reversed(path.split("/")) if part not in ("", ".")]


def nearest_existing(path: str | os.PathLike[str]) -> Path:
    """`path` if it exists, else its closest ancestor that does (what decides
    who can create it)."""
    candidate = Path(os.path.abspath(path))
    while not os.path.lexists(candidate) and candidate != candidate.parent:
        candidate = candidate.parent
    return candidate


def tree_problem(root: str | os.PathLike[str], *, skip: Iterable[str] = ()) -> Problem | None:
    """The first entry of a directory tree Python imports from (or the way to
    it) that someone other than root can change, or None. Directories must be
    closed even when sticky; a link inside leads to an entry that is checked
    the same way, and to a whole tree when it is a directory. `skip`: paths
    below `root` that are not part of it (another tree, checked on its own)."""
    skipped = {os.path.realpath(p) for p in skip}
    seen: set[str] = set()
    todo = [os.fspath(root)]
    while todo:
        top = todo.pop()
        problem = path_problem(top)
        if problem is not None:
            return problem
        real = os.path.realpath(top)
        if real in seen or not os.path.isdir(real):
            continue
        seen.add(real)
        problem, linked = _walk_tree(real, skipped)
        if problem is not None:
            return problem
        todo.extend(linked)
    return None


def _walk_tree(real: str, skipped: set[str]) -> tuple[Problem | None, list[str]]:
    """Check every entry below the directory `real`; return the first problem
    and the links found (checked by the caller, with what they lead to)."""
    problem = entry_problem(real, os.lstat(real), sticky_ok=False)
    if problem is not None:
        return problem, []
    links: list[str] = []
    for directory, dirs, files in os.walk(real):
        dirs[:] = [d for d in dirs if os.path.join(directory, d) not in skipped]
        for name in (*dirs, *files):
            path = os.path.join(directory, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                links.append(path)
                continue
            problem = entry_problem(path, st, sticky_ok=False)
            if problem is not None:
                return problem, []
    return None, links
