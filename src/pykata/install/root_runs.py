"""What containerd runs as root once pykata is installed, and who could change it.

containerd starts `containerd-shim-pykata-v2` as root for every pod. That
script's interpreter runs it, Python imports pykata and its dependencies from
the interpreter's standard library and the environment's site-packages (and,
for an editable install, from the source tree a .pth file or an `__editable__`
finder names), and the pykata configuration the handler names chooses the
QEMU binary root executes. Whoever can change any of these becomes root on the
node; with a checkout's `.venv`, that is the checkout's owner. So the installer
lists them here and refuses when one is not root's alone (`pykata.rootonly`).

The kernel and initrd a configuration names are checked too: QEMU only reads
them into the guest, so they do not reach the host, but whoever swaps them runs
their own code inside every pod's VM (and reads its containers' data).
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import shutil
import site
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from pykata.errors import PykataError
from pykata.rootonly import Problem, nearest_existing, path_problem, tree_problem

HINT = ("install pykata where only root can write, not editable: as root, "
        "python3 -m venv /opt/pykata && /opt/pykata/bin/pip install <checkout> && "
        "/opt/pykata/bin/pykata install containerd; or make every file and directory "
        "named root's alone (chown -R root:root, chmod -R go-w)")
CONFIG_HINT = ("make the file and every directory above it root's alone (chown root, "
               "chmod go-w), or name a configuration where only root can write "
               "(--pykata-config /etc/pykata/...)")


@dataclass(frozen=True)
class Item:
    """One thing root will run or obey: `what` says what it is to the reader."""

    what: str
    path: str
    tree: bool = False  # a directory Python imports from: every entry below counts
    skip: tuple[str, ...] = ()
    hint: str = HINT

    def problem(self) -> Problem | None:
        try:
            if not os.path.lexists(self.path):
                # Whoever can create it decides what it will be.
                return path_problem(nearest_existing(self.path))
            if self.tree:
                return tree_problem(self.path, skip=self.skip)
            return path_problem(self.path)
        except OSError as exc:
            return Problem(exc.filename or self.path, f"unreadable ({exc.strerror})")


def refuse_untrusted(items: list[Item]) -> None:
    """Raise naming the first item another user could change, and the entry that lets them."""
    for item in items:
        problem = item.problem()
        if problem is not None:
            raise PykataError(
                f"containerd would run pykata as root with {item.what} {item.path}, which "
                f"another user can change: {problem}",
                hint=item.hint)


def shim_items(shim: Path) -> list[Item]:
    """The shim, the interpreter that runs it and every directory its code comes from."""
    items = [Item("the shim", str(shim))]
    interpreter = script_interpreter(shim)
    if interpreter is None:
        return items  # not a script: nothing else runs it
    items.append(Item("the Python that runs the shim", interpreter))
    # Python puts the script's own directory (links resolved) first on sys.path.
    items.append(Item("the shim's directory (first on its sys.path)",
                      os.path.dirname(os.path.realpath(shim)), tree=True))
    items.extend(python_items(interpreter))
    return items


def script_interpreter(script: Path) -> str | None:
    """The interpreter of a script (its #! line, or pip's /bin/sh launcher for
    a path a #! line cannot hold); None for a program that is not a script."""
    with open(script, "rb") as file:
        head = file.read(4096)
    if not head.startswith(b"#!"):
        return None
    lines = head.decode("utf-8", "replace").split("\n")
    words = lines[0][2:].split()
    if words[:1] == ["/bin/sh"] and len(lines) > 1 and lines[1].startswith("'''exec'"):
        words = shlex.split(lines[1])[1:2]
    if not words or not os.path.isabs(words[0]) or os.path.basename(words[0]) == "env":
        raise PykataError(
            f"cannot tell which Python runs {script}: its first line is {lines[0]!r}",
            hint="install pykata with pip, whose scripts name their interpreter by its path")
    return words[0]


def python_items(interpreter: str) -> list[Item]:
    """The places `interpreter` imports from: its standard library, its
    environment's site directories and what their .pth files add."""
    venv = _venv_of(interpreter)
    items: list[Item] = []
    if venv is not None:
        cfg_path = os.path.join(venv, "pyvenv.cfg")
        items.append(Item("the venv's settings (they choose the Python it runs)", cfg_path))
        stdlib, sites = _venv_layout(venv, _read_pyvenv(cfg_path), interpreter)
    else:
        stdlib, sites = _running_layout(interpreter)
    skip = tuple(os.path.join(stdlib, name) for name in ("site-packages", "dist-packages"))
    items.append(Item("Python's standard library", stdlib, tree=True, skip=skip))
    for site_dir in sites:
        items.append(Item("the site-packages the shim imports from", site_dir, tree=True))
        items.extend(_pth_items(site_dir))
    return items


def _venv_of(interpreter: str) -> str | None:
    # Where Python itself looks for pyvenv.cfg: beside the executable, or one up.
    for directory in (os.path.dirname(interpreter),
                      os.path.dirname(os.path.dirname(interpreter))):
        if os.path.isfile(os.path.join(directory, "pyvenv.cfg")):
            return directory
    return None


def _read_pyvenv(path: str) -> dict[str, str]:
    values: dict[str, str] = {}
    with open(path, encoding="utf-8") as file:
        for line in file:
            key, sep, value = line.partition("=")
            if sep:
                values[key.strip().lower()] = value.strip()
    return values


def _venv_layout(venv: str, cfg: dict[str, str], interpreter: str) -> tuple[str, list[str]]:
    version = re.match(r"(\d+)\.(\d+)", cfg.get("version", cfg.get("version_info", "")))
    home = cfg.get("home", "")
    if version is None or not os.path.isabs(home):
        raise _cannot_tell(interpreter, f"{venv}/pyvenv.cfg names no home or version")
    short = f"{version[1]}.{version[2]}"
    base = os.path.dirname(home)
    stdlib = os.path.join(base, "lib", f"python{short}")
    if not os.path.isdir(stdlib):
        raise _cannot_tell(interpreter, f"its standard library is not at {stdlib}")
    sites = [os.path.join(venv, "lib", f"python{short}", "site-packages")]
    if cfg.get("include-system-site-packages", "false").lower() == "true":
        same_base = (os.path.realpath(base) == os.path.realpath(sys.base_prefix)
                     and short == f"{sys.version_info[0]}.{sys.version_info[1]}")
        if not same_base:
            raise _cannot_tell(interpreter, "its venv includes the system's site-packages "
                               "of a Python other than this one")
        sites += site.getsitepackages([sys.base_prefix])
    return stdlib, [s for s in sites if os.path.isdir(s)]


def _running_layout(interpreter: str) -> tuple[str, list[str]]:
    """An interpreter outside any venv: what it imports is known only when it
    is the one running this installer."""
    if (os.path.realpath(interpreter) != os.path.realpath(sys.executable)
            or sys.prefix != sys.base_prefix):
        raise _cannot_tell(interpreter, "it is not the Python running this installer")
    sites = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        sites.append(site.getusersitepackages())
    return sysconfig.get_path("stdlib"), [s for s in sites if os.path.isdir(s)]


def _cannot_tell(interpreter: str, why: str) -> PykataError:
    return PykataError(f"cannot tell what {interpreter} imports: {why}",
                       hint=f"run the installer with the pykata installed for {interpreter}")


def _pth_items(site_dir: str) -> list[Item]:
    """What the .pth files of a site directory add to sys.path, and what an
    editable install's finder maps its packages to (site.addpackage's rules:
    a line starting with `import` runs, any other names a directory)."""
    items: list[Item] = []
    for name in sorted(os.listdir(site_dir)):
        path = os.path.join(site_dir, name)
        if name.endswith(".pth"):
            for entry in _pth_paths(site_dir, path):
                items.append(Item(f"code {path} adds", entry, tree=True))
        elif name.startswith("__editable__") and name.endswith("finder.py"):
            for entry in _finder_paths(path):
                items.append(Item(f"code the editable install's {path} maps", entry,
                                  tree=True))
    return items


def _pth_paths(site_dir: str, pth: str) -> list[str]:
    found = []
    with open(pth, encoding="utf-8", errors="replace") as file:
        for line in file:
            line = line.rstrip()
            if not line or line.startswith("#") or re.match(r"import[ \t]", line):
                continue
            directory = os.path.join(site_dir, line)
            if os.path.exists(directory):
                found.append(directory)
    return found


def _finder_paths(finder: str) -> list[str]:
    """The paths in setuptools' editable finder: MAPPING (package: directory)
    and NAMESPACES (package: [directories])."""
    with open(finder, encoding="utf-8") as file:
        tree = ast.parse(file.read(), finder)
    paths: list[str] = []
    for name, expression in _assignments(tree):
        if name not in ("MAPPING", "NAMESPACES"):
            continue
        try:
            value = ast.literal_eval(expression) if expression is not None else {}
        except (ValueError, TypeError, SyntaxError, RecursionError):
            value = None
        if not isinstance(value, dict):
            raise PykataError(f"cannot tell where {finder} finds its packages", hint=HINT)
        for entry in value.values():
            paths.extend(entry if isinstance(entry, list) else [entry])
    return [str(p) for p in paths]


def _assignments(tree: ast.Module) -> list[tuple[str, ast.expr | None]]:
    """A module's top-level `NAME = value` and `NAME: type = value` statements."""
    found: list[tuple[str, ast.expr | None]] = []
    for node in tree.body:
        target: ast.expr
        value: ast.expr | None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign):
            target, value = node.target, node.value
        else:
            continue
        if isinstance(target, ast.Name):
            found.append((target.id, value))
    return found


def config_items(config_path: Path, qemu: str, kernel: str, initrd: str,
                 image: str = "") -> list[Item]:
    """The pykata configuration the handler names, and the files it names."""
    closed = "make it and every directory above it root's alone (chown root, chmod go-w)"
    items = [Item("the pykata configuration", str(config_path), hint=CONFIG_HINT)]
    qemu_found = qemu if os.path.isabs(qemu) else shutil.which(qemu)
    if qemu_found:
        items.append(Item("the QEMU binary the configuration names", qemu_found,
                          hint=f"{closed}, or set [hypervisor.qemu] path to a QEMU only "
                               "root can change (/usr/bin/qemu-system-x86_64)"))
    for key, path in (("kernel", kernel), ("initrd", initrd), ("image", image)):
        if path:
            items.append(Item(f"the guest {key} the configuration names", path,
                              hint=f"{closed}, or leave [hypervisor.qemu] {key} empty "
                                   "for the one `pykata assets build` makes"))
    return items
