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
