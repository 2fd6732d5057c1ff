"""Output files: the check of a target before any work starts, and the atomic writer every output goes through.

A target is written only when it is absent or a regular file: a symbolic link, FIFO, device or directory at the path
is refused with one line, never replaced and never written through. `check_output` (a file such as `--out`) and
`check_output_dir` (a run or catalog directory) run before a command does any work, so a bad target costs nothing;
they also try to create a file where the output will go, which is the only reliable "can I write here" test (root,
ACLs, read-only mounts).

`atomic_write` writes a temporary file beside the target, `.NAME.tmp-PID-HOST-RANDOM`, gives it the target's mode
(a new file gets the umask's default, not mkstemp's 0600), and renames it over the target only when complete; on
any exception the temporary file is removed. A kill (SIGKILL, OOM, power loss) can still leave one behind: the next
write of the same name, and `check_output_dir` on its directory, remove temporaries of this host whose process no
longer exists (a 190 MB checkpoint temporary used to stay forever).
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import socket
import stat
from pathlib import Path

from core.errors import UserError, quoted

NAME_ROOM = 200  # characters of the target's name kept in a temporary's name (file names stop at 255 bytes)
HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
TEMPORARY = re.compile(r"\.(?P<name>.+)\.tmp-(?P<pid>\d+)-(?P<host>[0-9a-f]{8})-[0-9a-f]{8}")
_KINDS = ((stat.S_ISLNK, "symbolic link"), (stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"),
          (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"))


def target_problem(path: Path) -> str | None:
    """Why `path` cannot be replaced by an output file, or None when it is absent or a regular file."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError as err:  # e.g. a path component is a regular file
        return f"cannot be used ({err.strerror})"
    if stat.S_ISREG(mode):
        return None
    kind = next((name for test, name in _KINDS if test(mode)), "special file")
    return f"is a {kind}; outputs go only to a new path or over a regular file"


def check_output(path: str | Path, label: str = "output") -> Path:
    """Before any work: `path` is absent or a regular file, and its directory exists (or can be created) and
    takes a new file. Raises UserError naming `label` and the path.  -> the path"""
    path = Path(path)
    problem = target_problem(path)
    if problem:
        raise UserError(f"{label} {quoted(str(path), 200)}: {problem}")
    _probe(path.parent, label, path)
    return path


def check_output_dir(directory: str | Path, names: tuple[str, ...] = (), label: str = "output directory") -> Path:
    """Before any work: `directory` is a directory (or can be created) that takes new files, and each of `names`
    inside it is absent or a regular file. Also removes stale temporaries of dead processes there.  -> directory"""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise UserError(f"{label} {quoted(str(directory), 200)}: is not a directory")
    for name in names:
        problem = target_problem(directory / name)
        if problem:
            raise UserError(f"{label} {quoted(str(directory), 200)}: {name} {problem}")
    _probe(directory, label, directory)
    if directory.is_dir():
        remove_stale_temporaries(directory)
    return directory


def _probe(directory: Path, label: str, shown: Path) -> None:
    """Create and remove a file in `directory`, or in its nearest existing ancestor when it is yet to be made."""
    place = directory
    while not place.exists() and place != place.parent:
        place = place.parent
    if not place.is_dir():
        raise UserError(f"{label} {quoted(str(shown), 200)}: {quoted(str(place), 200)} is not a directory")
    probe = temporary_path(place / "h2po-probe")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as err:
        where = "" if place == directory else f" ({quoted(str(place), 200)}, where it would be created)"
        raise UserError(f"{label} {quoted(str(shown), 200)}: cannot write there{where}: {err.strerror}") from None
    os.unlink(probe)


def temporary_path(path: Path) -> Path:
    """A fresh temporary name beside `path` that names this process and host (see `remove_stale_temporaries`)."""
    return path.with_name(f".{path.name[:NAME_ROOM]}.tmp-{os.getpid()}-{HOST}-{secrets.token_hex(4)}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's live process; a PID beyond the kernel's range
        return True
    return True


def remove_stale_temporaries(directory: Path, name: str | None = None) -> list[Path]:
    """Remove this host's temporary files and directories in `directory` (of target `name`, or of any) whose
    process is gone. -> the removed paths"""
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        match = TEMPORARY.fullmatch(entry.name)
        if not match or match["host"] != HOST or (name is not None and match["name"] != name[:NAME_ROOM]):
            continue
        if _alive(int(match["pid"])) or entry.is_symlink():
            continue
        try:
            if entry.is_dir():  # a directory written whole, then renamed (actors/train_state.py)
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(Path(entry.path))
        except FileNotFoundError:  # another writer removed it first
            pass
    return removed


def atomic_write(path: Path, write) -> None:
    """Call `write(tmp_path)` and move the result into `path` only when it succeeded. `path` must be absent or a
    regular file (anything else raises UserError, as does an OSError while writing); it keeps its mode; the
    temporary file never outlives this call (and one left by a killed process is removed here)."""
    path = Path(path)
    problem = target_problem(path)
    if problem:
        raise UserError(f"{quoted(str(path), 200)}: {problem}")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent, path.name)
    mode = stat.S_IMODE(os.stat(path).st_mode) if path.exists() else None
    tmp = temporary_path(path)
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask applies, as to any new file
        write(tmp)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as err:  # a full disk, a quota, a place that turned read-only: one line, not a traceback
        raise UserError(f"cannot write {quoted(str(path), 200)}: {err.strerror or err}") from err
    finally:
        tmp.unlink(missing_ok=True)  # gone already after the rename
