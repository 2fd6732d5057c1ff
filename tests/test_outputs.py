"""Output targets (issue 14, "Outputs"): checked before any work, never a non-regular file, mode kept, no temporaries
left behind, also after a kill.

`atomic_write` refuses a symbolic link, FIFO or directory at the target (main replaced the link and the FIFO with
regular files); an existing file keeps its mode and a new one gets the umask's default (main: mkstemp's 0600); a
write killed with SIGKILL leaves its temporary, and the next write of that name (or the run-directory check) removes
it. The CLI checks `--out` / `out_dir` before it loads or trains anything. Device files are only ever inspected here,
never written (a regression must not replace /dev/null).
Run: `python -m pytest tests/test_outputs.py -q`.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.cli import main
from catalog.output import TEMPORARY, check_output, check_output_dir, remove_stale_temporaries, temporary_path
from catalog.schema import atomic_write
from core.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


def temporaries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp" in p.name)


def write_text(text: str):
    return lambda p: Path(p).write_text(text)


def make_target(tmp_path: Path, kind: str) -> Path:
    """A non-regular file at tmp_path/out.json: a symlink to a file, a FIFO or a directory."""
    target = tmp_path / "out.json"
    if kind == "symlink":
        (tmp_path / "elsewhere.json").write_text("keep")
        target.symlink_to(tmp_path / "elsewhere.json")
    elif kind == "fifo":
        os.mkfifo(target)
    else:
        target.mkdir()
    return target


def assert_untouched(tmp_path: Path, target: Path, kind: str) -> None:
    mode = os.lstat(target).st_mode
    assert {"symlink": stat.S_ISLNK, "fifo": stat.S_ISFIFO, "directory": stat.S_ISDIR}[kind](mode)
    if kind == "symlink":
        assert (tmp_path / "elsewhere.json").read_text() == "keep"
    assert temporaries(tmp_path) == []


@pytest.mark.parametrize("kind,word", [("symlink", "symbolic link"), ("fifo", "FIFO"), ("directory", "directory")])
def test_atomic_write_refuses_non_regular_targets(tmp_path, kind, word):
    target = make_target(tmp_path, kind)
    with pytest.raises(UserError, match=word):
        atomic_write(target, write_text("new"))
    assert_untouched(tmp_path, target, kind)


@pytest.mark.parametrize("device", ["/dev/null", "/dev/full"])
def test_device_targets_are_refused_without_being_touched(device):
    if not os.path.exists(device):
        pytest.skip(f"no {device}")
    with pytest.raises(UserError, match="character device"):
        check_output(device, "--out")
    assert stat.S_ISCHR(os.lstat(device).st_mode)


def test_write_keeps_the_targets_mode_and_a_new_file_gets_the_umask_default(tmp_path):
    old = os.umask(0o022)
    try:
        kept = tmp_path / "kept.json"
        kept.write_text("old")
        kept.chmod(0o640)
        atomic_write(kept, write_text("new"))
        fresh = tmp_path / "fresh.json"
        atomic_write(fresh, write_text("new"))
    finally:
        os.umask(old)
    assert kept.read_text() == "new" and stat.S_IMODE(kept.stat().st_mode) == 0o640
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o644  # mkstemp gave 0600
    assert temporaries(tmp_path) == []


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")

    def half_then_fail(p):
        Path(p).write_text("half")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old" and temporaries(tmp_path) == []


KILLED_WRITER = """
import sys, time
from pathlib import Path
from catalog.schema import atomic_write
def write(p):
    Path(p).write_bytes(b"x" * 1_000_000)
    print("ready", flush=True)
    time.sleep(60)
atomic_write(Path(sys.argv[1]), write)
"""


def kill_during_write(target: Path) -> None:
    """Start a writer of `target` in a child process and SIGKILL it while its temporary file is half written."""
    child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target)], cwd=ROOT, stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)


def test_temporary_of_a_killed_write_is_removed_by_the_next_write(tmp_path):
    target = tmp_path / "most.safetensors"
    kill_during_write(target)
    assert len(temporaries(tmp_path)) == 1 and not target.exists()  # the kill left its 1 MB temporary
    atomic_write(target, write_text("whole"))
    assert target.read_text() == "whole" and temporaries(tmp_path) == []


def test_run_directory_check_removes_temporaries_of_killed_writes(tmp_path):
    kill_during_write(tmp_path / "most.safetensors")
    kill_during_write(tmp_path / "results.json")
    assert len(temporaries(tmp_path)) == 2
    check_output_dir(tmp_path, ("most.safetensors",))
    assert temporaries(tmp_path) == []


def test_temporaries_of_live_processes_are_kept(tmp_path):
    """Only dead writers' files go: this process's, and another live process's (pid 1), stay."""
    mine = temporary_path(tmp_path / "out.json")
    mine.write_text("in progress")
    assert TEMPORARY.fullmatch(mine.name)
    theirs = tmp_path / mine.name.replace(f".tmp-{os.getpid()}-", ".tmp-1-")
    theirs.write_text("in progress")
    assert remove_stale_temporaries(tmp_path) == [] and mine.exists() and theirs.exists()


def test_check_output_names_what_is_wrong(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match="(?i)not a directory"):
        check_output(blocker / "out.json", "--out")
    with pytest.raises(UserError, match="out_dir .*: is not a directory"):
        check_output_dir(blocker, (), "out_dir")
    assert check_output(tmp_path / "new" / "out.json") == tmp_path / "new" / "out.json"
    assert not (tmp_path / "new").exists() and temporaries(tmp_path) == []


@pytest.fixture
def unwritable_dir(tmp_path) -> Path:
    """A directory this process cannot create files in: a 0555 directory, or (as root, who ignores modes) /sys."""
    if os.geteuid() != 0:
        place = tmp_path / "read-only"
        place.mkdir()
        place.chmod(0o555)
        yield place
        place.chmod(0o755)
        return
    try:
        os.close(os.open("/sys/h2po-probe", os.O_WRONLY | os.O_CREAT | os.O_EXCL))
        os.unlink("/sys/h2po-probe")
    except OSError:
        yield Path("/sys")
        return
    pytest.skip("no unwritable directory here")


def test_unwritable_directory_is_one_line(unwritable_dir):
    with pytest.raises(UserError, match="cannot write there"):
        check_output(unwritable_dir / "out.json", "--out")


# ---------------------------------------------------------------- the CLI checks before any work


def run_cli(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()
    start = time.monotonic()
    code = main([str(a) for a in args])
    assert time.monotonic() - start < 10, "the output check must come before the work"
    return code, capsys.readouterr().err


def requests_file(tmp_path: Path) -> Path:
    path = tmp_path / "requests.jsonl"
    path.write_text(json.dumps({"seeds": [100, 101], "k": 3}) + "\n")
    return path


@pytest.mark.parametrize("kind,word", [("symlink", "symbolic link"), ("fifo", "FIFO"), ("directory", "directory")])
def test_retrieve_batch_refuses_a_non_regular_out(tiny_checkpoint, tmp_path, capsys, kind, word):
    target = make_target(tmp_path, kind)
    code, err = run_cli(capsys, "retrieve", "--checkpoint", tiny_checkpoint, "--requests", requests_file(tmp_path),
                        "--out", target)
    assert code == 2 and err.count("\n") == 1 and "--out" in err and word in err, err
    assert_untouched(tmp_path, target, kind)


def test_retrieve_batch_into_an_unwritable_place_is_one_line(tiny_checkpoint, tmp_path, capsys, unwritable_dir):
    code, err = run_cli(capsys, "retrieve", "--checkpoint", tiny_checkpoint, "--requests", requests_file(tmp_path),
                        "--out", unwritable_dir / "out.jsonl")
    assert code == 2 and err.count("\n") == 1 and "cannot write there" in err, err


def test_retrieve_batch_still_writes_a_regular_out(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    out.write_text("previous")
    capsys.readouterr()
    assert main(["retrieve", "--checkpoint", str(tiny_checkpoint), "--requests", str(requests_file(tmp_path)),
                 "--out", str(out)]) == 0
    assert len(json.loads(out.read_text())["items"]) == 3 and temporaries(tmp_path) == []


def test_eval_refuses_its_out_before_scoring(tiny_checkpoint, tmp_path, capsys):
    """main trained and scored for 28 s, then failed to write; now nothing is computed (no ease.json appears)."""
    run_dir = tmp_path / "run"
    code, err = run_cli(capsys, "eval", "--checkpoint", tiny_checkpoint, "--out", tmp_path, f"out_dir={run_dir}")
    assert code == 2 and err.count("\n") == 1 and "--out" in err and "directory" in err, err
    assert not run_dir.exists()


def test_preferences_refuse_a_fifo_out(tmp_path, capsys):
    target = make_target(tmp_path, "fifo")
    code, err = run_cli(capsys, "data", "preferences", "--out", target, f"out_dir={tmp_path / 'run'}")
    assert code == 2 and "FIFO" in err and err.count("\n") == 1, err
    assert_untouched(tmp_path, target, "fifo")


def test_pretrain_refuses_an_out_dir_that_is_a_file_or_holds_a_symlinked_checkpoint(tiny_checkpoint, tmp_path,
                                                                                     capsys):
    catalog = f"data.catalog={tiny_checkpoint.parent / 'catalog'}"
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, err = run_cli(capsys, "pretrain", f"out_dir={blocker}", catalog)
    assert code == 2 and "out_dir" in err and "not a directory" in err and err.count("\n") == 1, err
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "most.safetensors").symlink_to(tiny_checkpoint)
    code, err = run_cli(capsys, "pretrain", f"out_dir={run_dir}", catalog)
    assert code == 2 and "most.safetensors is a symbolic link" in err, err
    assert sorted(p.name for p in run_dir.iterdir()) == ["most.safetensors"]


def test_benchmark_out_is_checked_when_the_arguments_are_read(tmp_path, capsys):
    """benchmarks/*.py --out: refused by argparse before any measuring (main wrote through it at the end)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import harness

    parser = argparse.ArgumentParser(prog="bench")
    harness.add_common_arguments(parser)
    target = make_target(tmp_path, "fifo")
    with pytest.raises(SystemExit):
        parser.parse_args(["--out", str(target)])
    assert "FIFO" in capsys.readouterr().err
    assert_untouched(tmp_path, target, "fifo")
    out = tmp_path / "result.json"
    harness.write_result(parser.parse_args(["--out", str(out)]).out, {"x": 1})
    assert json.loads(out.read_text()) == {"x": 1} and temporaries(tmp_path) == []


def test_an_io_error_while_writing_is_one_line_and_leaves_nothing(tmp_path):
    """ENOSPC (the /dev/full case, or a full disk) from the writer: a UserError naming the path, no temporary."""
    target = tmp_path / "out.json"

    def disk_full(p):
        Path(p).write_text("part")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(UserError, match="cannot write .*out.json.*No space left on device"):
        atomic_write(target, disk_full)
    assert not target.exists() and temporaries(tmp_path) == []
