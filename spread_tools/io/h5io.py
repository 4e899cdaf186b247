"""HDF5 and text output helpers: atomic writes, checked reads, overwrite policy.

Every file spread_tools writes carries a ``format`` and ``version`` attribute
at its root and is written to a temporary file in the destination folder,
then renamed, so a crash never leaves a half-written file under the final
name.
"""

import contextlib
import os
import tempfile
from pathlib import Path

import h5py
import numpy as np

from spread_tools import __version__
from spread_tools.errors import InputError


def check_writable(path, overwrite=False):
    """Refuse early to overwrite an existing output.

    Parameters
    ----------
    path : str or Path
        Output file that a job will write.
    overwrite : bool
        Allow replacing an existing file.

    Raises
    ------
    InputError
        If the file exists and ``overwrite`` is false, or its folder is missing.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise InputError(f"{path}: exists already (use --overwrite to replace it)")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"{path}: folder {parent} does not exist")


@contextlib.contextmanager
def _atomic_path(path, overwrite, suffix):
    path = Path(path)
    check_writable(path, overwrite)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix,
                               dir=path.parent if str(path.parent) else ".")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs are for the whole group
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_writer(path, fmt, version, overwrite=False):
    """Open an HDF5 file for writing that appears under ``path`` only on success.

    Parameters
    ----------
    path : str or Path
        Final file name.
    fmt : str
        Value of the root ``format`` attribute, e.g. ``"spread_tools.dataset"``.
    version : int
        Value of the root ``version`` attribute.
    overwrite : bool
        Allow replacing an existing file.

    Yields
    ------
    h5py.File
        The open temporary file; close happens on exit of the ``with`` block.
    """
    with _atomic_path(path, overwrite, ".h5.tmp") as tmp:
        with h5py.File(tmp, "w") as h5:
            h5.attrs["format"] = fmt
            h5.attrs["version"] = int(version)
            h5.attrs["spread_tools_version"] = __version__
            yield h5


def atomic_write_text(path, text, overwrite=False):
    """Write a text file (CSV, TOML, report) atomically.

    Parameters
    ----------
    path : str or Path
        Final file name.
    text : str
        Whole content.
    overwrite : bool
        Allow replacing an existing file.
    """
    with _atomic_path(path, overwrite, ".tmp") as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)


@contextlib.contextmanager
def atomic_output(path, overwrite=False, suffix=""):
    """Give a temporary file name for a writer that wants a path (e.g. matplotlib).

    Parameters
    ----------
    path : str or Path
        Final file name.
    overwrite : bool
        Allow replacing an existing file.
    suffix : str
        Extension the temporary name must end with (``".png"`` for savefig).

    Yields
    ------
    str
        Temporary path to write; renamed to ``path`` when the block succeeds.
    """
    with _atomic_path(path, overwrite, ".tmp" + suffix) as tmp:
        yield tmp


def check_readable(path):
    """Check that an input file exists and is a file.

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    Path

    Raises
    ------
    InputError
        ``"<path>: no such file"`` or ``"<path>: is a folder, not a file"``.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not a file")
    return path


def open_checked(path, fmt, max_version=1):
    """Open a spread_tools HDF5 file for reading and check what it is.

    Parameters
    ----------
    path : str or Path
        File to open.
    fmt : str
        Expected root ``format`` attribute.
    max_version : int
        Newest format version this code understands.

    Returns
    -------
    h5py.File
        Open read-only; use as a context manager.

    Raises
    ------
    InputError
        Missing, not HDF5, truncated, of another format or of a newer version.
    """
    path = check_readable(path)
    try:
        h5 = h5py.File(path, "r")
    except OSError as exc:
        with open(path, "rb") as fh:
            magic = fh.read(8)
        if magic == b"\x89HDF\r\n\x1a\n":
            raise InputError(f"{path}: damaged or truncated HDF5 file ({exc})") from None
        raise InputError(f"{path}: not an HDF5 file") from None
    found = h5.attrs.get("format")
    if isinstance(found, bytes):
        found = found.decode()
    if found != fmt:
        h5.close()
        raise InputError(f"{path}: is {found or 'not a spread_tools file'!s}, expected {fmt}")
    version = int(h5.attrs.get("version", 0))
    if version > max_version:
        h5.close()
        raise InputError(f"{path}: {fmt} version {version} is newer than this "
                         f"spread_tools understands ({max_version}); upgrade spread_tools")
    return h5


def read_array(h5, name, dtype=None, shape=None):
    """Read a dataset from an open file with a clear error when it is missing or damaged.

    Parameters
    ----------
    h5 : h5py.File or h5py.Group
        Open file.
    name : str
        Dataset path inside the file.
    dtype : numpy dtype, optional
        Convert to this type.
    shape : tuple, optional
        Expected shape; ``None`` entries match any length.

    Returns
    -------
    numpy.ndarray
    """
    where = f"{h5.file.filename}"
    if name not in h5:
        raise InputError(f"{where}: missing dataset '{name}'")
    try:
        data = h5[name][()]
    except (OSError, KeyError, ValueError) as exc:
        raise InputError(f"{where}: cannot read '{name}' (damaged or truncated file: {exc})") from None
    if isinstance(data, bytes):
        data = data.decode()
    elif getattr(data, "dtype", None) is not None and data.dtype.kind in "OS":
        data = np.array([d.decode() if isinstance(d, bytes) else d for d in data.ravel()],
                        dtype=object).reshape(data.shape).astype(str)
    if dtype is not None:
        data = np.asarray(data, dtype=dtype)
    if shape is not None:
        ok = data.ndim == len(shape) and all(s is None or s == d for s, d in zip(shape, data.shape))
        if not ok:
            raise InputError(f"{where}: '{name}' has shape {data.shape}, expected {shape}")
    return data


def write_strings(h5, name, values):
    """Store a list of strings as a variable-length UTF-8 dataset."""
    h5.create_dataset(name, data=np.array([str(v) for v in values], dtype=object),
                      dtype=h5py.string_dtype())
