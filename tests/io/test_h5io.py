"""Atomic writes, overwrite policy and checked reads."""

import h5py
import numpy as np
import pytest

from spread_tools.errors import InputError
from spread_tools.io.h5io import (
    atomic_write_text,
    atomic_writer,
    open_checked,
    read_array,
)


def test_atomic_writer_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "x.h5"
    with pytest.raises(RuntimeError):
        with atomic_writer(out, "spread_tools.test", 1) as h5:
            h5["a"] = np.arange(3)
            raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []


def test_overwrite_policy(tmp_path):
    out = tmp_path / "x.csv"
    atomic_write_text(out, "a\n")
    with pytest.raises(InputError, match="exists already"):
        atomic_write_text(out, "b\n")
    atomic_write_text(out, "b\n", overwrite=True)
    assert out.read_text() == "b\n"


def test_open_checked_errors(tmp_path):
    good = tmp_path / "good.h5"
    with atomic_writer(good, "spread_tools.test", 1) as h5:
        h5["a"] = np.arange(1000.0)
    with open_checked(good, "spread_tools.test") as h5:
        assert read_array(h5, "a").sum() == np.arange(1000.0).sum()
        with pytest.raises(InputError, match="missing dataset 'b'"):
            read_array(h5, "b")
    with pytest.raises(InputError, match="expected spread_tools.other"):
        open_checked(good, "spread_tools.other")
    with pytest.raises(InputError, match="no such file"):
        open_checked(tmp_path / "none.h5", "spread_tools.test")
    text = tmp_path / "text.h5"
    text.write_text("hello")
    with pytest.raises(InputError, match="not an HDF5 file"):
        open_checked(text, "spread_tools.test")
    truncated = tmp_path / "trunc.h5"
    truncated.write_bytes(good.read_bytes()[:1200])
    with pytest.raises(InputError, match="trunc.h5: damaged or truncated"):
        with open_checked(truncated, "spread_tools.test") as h5:
            read_array(h5, "a")
    newer = tmp_path / "newer.h5"
    with h5py.File(newer, "w") as h5:
        h5.attrs["format"] = "spread_tools.test"
        h5.attrs["version"] = 99
    with pytest.raises(InputError, match="newer"):
        open_checked(newer, "spread_tools.test")


def test_outputs_follow_the_umask(tmp_path):
    import os
    old = os.umask(0o022)
    try:
        out = tmp_path / "perm.csv"
        atomic_write_text(out, "a\n")
    finally:
        os.umask(old)
    assert (out.stat().st_mode & 0o777) == 0o644


# --------------------------------------------------------------------------- checks, locks, units

import os  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from spread_tools.io.h5io import (  # noqa: E402
    OutputLock,
    atomic_files,
    check_readable,
    check_writable,
    lock_path,
    open_h5,
    script_run,
)

REPO = Path(__file__).resolve().parents[2]


def test_check_writable_refuses_folder_missing_folder_and_inputs(tmp_path):
    with pytest.raises(InputError, match="is a folder"):
        check_writable(tmp_path)
    with pytest.raises(InputError, match="folder .* does not exist"):
        check_writable(tmp_path / "no" / "x.h5")
    inp = tmp_path / "in.h5"
    inp.write_text("x")
    link = tmp_path / "link.h5"
    link.symlink_to(inp)
    with pytest.raises(InputError, match="is also an input"):
        check_writable(link, overwrite=True, inputs=[inp])          # same file under another name
    with script_run("demo"):
        check_readable(inp)                                          # read: now an input of the run
        with pytest.raises(InputError, match="is also an input"):
            check_writable(inp, overwrite=True)
        with pytest.raises(InputError, match="is also an input"):
            atomic_write_text(inp, "destroyed", overwrite=True)      # the late safety net
    assert inp.read_text() == "x"


def _holder(path):
    code = ("import sys; from spread_tools.io.h5io import OutputLock; "
            f"l = OutputLock({str(path)!r}, script='holder').acquire(); print('ready', flush=True); "
            "sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, cwd=REPO)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_output_lock_refuses_a_second_writer_and_is_freed_by_sigkill(tmp_path):
    out = tmp_path / "r.h5"
    proc = _holder(out)
    try:
        with pytest.raises(InputError) as info:
            OutputLock(out).acquire()
        msg = str(info.value)
        assert msg.startswith(f"{out}: another run is writing it (holder on host "
                              f"{socket.gethostname()}, PID {proc.pid}")
        with script_run("demo"):                                     # what every script does
            with pytest.raises(InputError, match="another run is writing it"):
                check_writable(out)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert lock_path(out).exists()                                   # left behind by the killed run ...
    with script_run("demo"):
        check_writable(out)                                          # ... and taken over
        assert str(os.getpid()) in lock_path(out).read_text()
        check_writable(out)                                          # the same run may claim twice
    assert not lock_path(out).exists()                               # released at the end of the run


def test_lock_cleans_temporaries_of_a_killed_writer(tmp_path):
    out = tmp_path / "r.h5"
    stale = tmp_path / ".r.h5.abc123.h5.tmp"
    stale.write_text("half a file")
    other = tmp_path / ".other.h5.x.h5.tmp"
    other.write_text("not ours")
    with script_run("demo"):
        check_writable(out)
    assert not stale.exists() and other.exists()


def test_atomic_files_commit_together_or_roll_back(tmp_path, monkeypatch):
    a, b = tmp_path / "r.h5", tmp_path / "r.csv"
    with atomic_files([a, b]) as (ta, tb):
        Path(ta).write_text("A1")
        Path(tb).write_text("B1")
    assert a.read_text() == "A1" and b.read_text() == "B1"
    real = os.replace
    calls = []

    def failing_second(src, dst):
        calls.append(dst)
        if Path(dst) == b:
            raise OSError(28, "No space left on device", str(dst))
        return real(src, dst)
    monkeypatch.setattr(os, "replace", failing_second)
    with pytest.raises(InputError, match="r.csv: No space left on device"):
        with atomic_files([a, b], overwrite=True) as (ta, tb):
            Path(ta).write_text("A2")
            Path(tb).write_text("B2")
    monkeypatch.setattr(os, "replace", real)
    assert a.read_text() == "A1" and b.read_text() == "B1"           # the pair is unchanged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.csv", "r.h5"]


def test_write_error_names_the_output(tmp_path):
    out = tmp_path / "x.h5"
    with pytest.raises(InputError, match=r"x.h5: cannot write \(No space left on device\)"):
        with atomic_writer(out, "spread_tools.test", 1):
            raise OSError(28, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_hdf5_locked_by_another_process_is_not_called_damaged(tmp_path):
    import h5py
    path = tmp_path / "busy.h5"
    with atomic_writer(path, "spread_tools.test", 1) as h5:
        h5["a"] = np.arange(3)
    code = (f"import h5py, sys; f = h5py.File({str(path)!r}, 'r+'); print('ready', flush=True); "
            "sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        try:
            h5py.File(path, "r").close()
            pytest.skip("HDF5 file locking is off here (HDF5_USE_FILE_LOCKING)")
        except OSError:
            pass
        with pytest.raises(InputError, match="busy.h5: is locked by another process") as info:
            open_checked(path, "spread_tools.test")
        assert "damaged" not in str(info.value).split("(")[0]
        with pytest.raises(InputError, match="is locked by another process"):
            open_h5(path, "HDF5 spectrum file")
    finally:
        proc.stdin.close()
        proc.wait()
    with open_checked(path, "spread_tools.test") as h5:                # free again: readable
        assert h5["a"].shape == (3,)
