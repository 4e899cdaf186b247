"""HDF5 and text output helpers: atomic writes, checked reads, overwrite policy, output locks.

Every file spread_tools writes carries a ``format`` and ``version`` attribute
at its root and is written to a temporary file in the destination folder,
then renamed, so a crash never leaves a half-written file under the final
name. Files that belong together (a result ``.h5`` and its ``.csv``) are
committed as one unit with :func:`atomic_files`.

A script runs inside :func:`script_run` (``spread_tools.cli.common.user_errors``
opens it). Inside a run

* every file read through :func:`check_readable` (and so :func:`open_checked`)
  is remembered as an *input*, and no output may replace an input;
* :func:`check_writable` also *claims* the output: it takes an exclusive lock
  ``<output>.lock`` next to it (:class:`OutputLock`), so that a second run that
  wants to write the same file is refused at once, with the host and PID of the
  run that holds it. The locks are released (and their files removed) when the
  run ends; a run killed with SIGKILL leaves a lock file that nobody holds, and
  the next run takes it over.

Outside a run (library use) nothing is remembered and nothing is locked.
"""

import contextlib
import contextvars
import errno
import json
import os
import socket
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from spread_tools import __version__
from spread_tools.errors import InputError

__all__ = ["check_writable", "check_readable", "open_checked", "read_array", "write_strings",
           "atomic_writer", "atomic_write_text", "atomic_output", "atomic_files", "init_h5",
           "OutputLock", "lock_path", "script_run", "note_input", "os_error_message", "open_h5"]


# --------------------------------------------------------------------------- runs, inputs, locks

class _Run:
    """What one script run has read and which outputs it holds locked."""

    def __init__(self, script):
        self.script = script
        self.inputs = {}          # (st_dev, st_ino) -> path as given
        self.locks = {}           # resolved output path -> OutputLock

    def note_input(self, path):
        try:
            st = os.stat(path)
        except OSError:
            return
        self.inputs.setdefault((st.st_dev, st.st_ino), str(path))

    def input_of(self, path):
        try:
            st = os.stat(path)
        except OSError:
            return None
        return self.inputs.get((st.st_dev, st.st_ino))

    def claim(self, path):
        key = str(Path(path).resolve())
        if key not in self.locks:
            lock = OutputLock(path, script=self.script)
            lock.acquire()
            self.locks[key] = lock
            _remove_stale_temporaries(path)

    def release(self):
        for lock in reversed(list(self.locks.values())):
            lock.release()
        self.locks.clear()


_RUN = contextvars.ContextVar("spread_tools_run", default=None)


@contextlib.contextmanager
def script_run(script):
    """Scope of one script run: inputs are remembered, outputs locked until the scope ends.

    Parameters
    ----------
    script : str
        Script name (written into the lock files).

    Yields
    ------
    object
        The run (opaque).
    """
    run = _Run(script)
    token = _RUN.set(run)
    try:
        yield run
    finally:
        _RUN.reset(token)
        run.release()


def note_input(path):
    """Remember ``path`` as an input of the current run (no-op outside a run)."""
    run = _RUN.get()
    if run is not None:
        run.note_input(path)


def lock_path(path):
    """The lock file of an output: ``<output>.lock`` in the same folder."""
    path = Path(path)
    return path.with_name(path.name + ".lock")


_EFFECTIVE = os.access in os.supports_effective_ids     # permissions of the effective user
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class OutputLock:
    """Exclusive lock on an output file: a lock file ``<output>.lock`` next to it.

    The lock is an ``flock`` on the lock file, held while the run lives; the
    file holds the holder's host, PID, script and start time (JSON) for the
    message a second writer gets. The kernel drops the lock when the holder
    dies, even by SIGKILL, so a leftover file is taken over by the next run.
    Where the file system has no ``flock`` (some parallel file systems) the
    lock file is created exclusively instead; a leftover one from a dead PID of
    the same host is taken over, one from another host must be removed by hand
    (the message says so).

    Parameters
    ----------
    path : str or Path
        The output file to protect.
    script : str
        Name written into the lock file.
    """

    def __init__(self, path, script=""):
        self.target = Path(path)
        self.path = lock_path(path)
        self.script = script
        self._fd = None
        self._ino = None

    def _info(self):
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "script": self.script,
                           "started": time.strftime("%Y-%m-%d %H:%M:%S")})

    def _holder(self):
        try:
            info = json.loads(self.path.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            info = {}
        who = f"host {info.get('host', '?')}, PID {info.get('pid', '?')}"
        if info.get("script"):
            who = f"{info['script']} on {who}"
        if info.get("started"):
            who += f", started {info['started']}"
        return who, info

    def _busy(self, extra=""):
        who, _ = self._holder()
        return InputError(f"{self.target}: another run is writing it ({who}); wait for it to "
                          f"finish or choose another output{extra}")

    def acquire(self):
        """Take the lock or raise :class:`InputError` naming the run that holds it."""
        import fcntl
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._busy() from None
            except OSError as exc:
                os.close(fd)
                if exc.errno in _NO_FLOCK:
                    return self._acquire_exclusive()
                raise
            # the previous holder may have removed the file between our open and flock
            st = os.fstat(fd)
            try:
                now = os.stat(self.path)
            except FileNotFoundError:
                now = None
            if now is None or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, self._info().encode())
            self._fd, self._ino = fd, (st.st_dev, st.st_ino)
            return self
        raise self._busy()

    def _acquire_exclusive(self):
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                _, info = self._holder()
                same_host = info.get("host") == socket.gethostname()
                if same_host and not _pid_alive(info.get("pid")):
                    with contextlib.suppress(FileNotFoundError):
                        self.path.unlink()
                    continue
                raise self._busy("" if same_host else
                                 f"; if that run has ended, remove {self.path}") from None
            os.write(fd, self._info().encode())
            st = os.fstat(fd)
            self._fd, self._ino = fd, (st.st_dev, st.st_ino)
            return self
        raise self._busy()

    def release(self):
        """Remove the lock file (if it is still ours) and drop the lock."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._ino:
                self.path.unlink()
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _pid_alive(pid):
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def os_error_message(exc, path=None):
    """One line for an ``OSError``: ``"<path>: <reason>"``.

    Parameters
    ----------
    exc : OSError
    path : str or Path, optional
        File to name when the error does not carry one (h5py errors often do not).

    Returns
    -------
    str
    """
    name = path if path is not None else getattr(exc, "filename", None)
    text = _reason(exc)
    return f"{name}: {text}" if name is not None else text


# --------------------------------------------------------------------------- writing

def check_writable(path, overwrite=False, inputs=()):
    """Check before the work that ``path`` can be written; inside a run also lock it.

    Parameters
    ----------
    path : str or Path
        Output file that a job will write.
    overwrite : bool
        Allow replacing an existing file.
    inputs : sequence of str or Path
        Inputs of the job; the output may not be one of them (also the inputs
        the current run has read are checked).

    Raises
    ------
    InputError
        The path is a folder, its folder is missing or not writable, it is an
        input, another run is writing it, or it exists and ``overwrite`` is false.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a folder; give an output file name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"{path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK, effective_ids=_EFFECTIVE):
        raise InputError(f"{path}: cannot write into folder {parent} (permission denied or "
                         f"read-only file system)")
    if path.exists():
        for inp in inputs:
            with contextlib.suppress(OSError):
                if os.path.samefile(path, inp):
                    raise InputError(f"{path}: is also an input of this run; choose another "
                                     f"output name")
        run = _RUN.get()
        if run is not None and run.input_of(path) is not None:
            raise InputError(f"{path}: is also an input of this run; choose another output name")
    run = _RUN.get()
    if run is not None:
        run.claim(path)
    if path.exists() and not overwrite:
        raise InputError(f"{path}: exists already (use --overwrite to replace it)")


def _tmp_name(path, suffix):
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix,
                               dir=path.parent if str(path.parent) else ".")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs are for the whole group
    return tmp


@contextlib.contextmanager
def atomic_files(paths, overwrite=False, suffixes=None):
    """Write several files that appear together, or not at all.

    Each file is written to a temporary name in its folder; when the block
    succeeds they are renamed into place one after the other (each rename is
    atomic, so a reader sees the old or the new file, never a part). If a rename
    fails, the files already renamed are rolled back to their previous content
    (kept as hard links), so the set stays consistent.

    Parameters
    ----------
    paths : sequence of str or Path
        Final file names.
    overwrite : bool
        Allow replacing existing files.
    suffixes : sequence of str, optional
        Extension each temporary name must end with (default ``".tmp"``).

    Yields
    ------
    list of str
        Temporary paths to write, in the order of ``paths``.
    """
    paths = [Path(p) for p in paths]
    suffixes = list(suffixes) if suffixes is not None else [".tmp"] * len(paths)
    for p in paths:
        check_writable(p, overwrite)
    tmps = []
    try:
        for p, suf in zip(paths, suffixes):
            try:
                tmps.append(_tmp_name(p, suf))
            except OSError as exc:
                raise InputError(f"{p}: cannot write ({_reason(exc)})") from None
        try:
            yield list(tmps)
        except OSError as exc:
            name = getattr(exc, "filename", None)
            if name is not None and str(name) not in tmps:
                raise InputError(os_error_message(exc)) from None
            raise InputError(f"{', '.join(map(str, paths))}: cannot write ({_reason(exc)})") from None
        _commit(list(zip(tmps, paths)))
    finally:
        for tmp in tmps:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _reason(exc):
    return " ".join(str(getattr(exc, "strerror", None) or exc).split())


def _remove_stale_temporaries(path):
    """Temporary files of ``path`` left by a killed run (only called while holding its lock)."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    prefix = f".{path.name}."
    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            if name.startswith(prefix) and (name.endswith(".tmp") or ".tmp." in name
                                            or name.endswith(".bak")):
                with contextlib.suppress(OSError):
                    os.unlink(folder / name)


def _commit(pairs):
    """Rename temporary files into place; on failure put back what was there."""
    backups = {}
    done = []
    try:
        if len(pairs) > 1:
            for _, final in pairs:
                if final.exists():
                    bak = _tmp_name(final, ".bak")
                    os.unlink(bak)
                    try:
                        os.link(final, bak)
                        backups[final] = bak
                    except OSError:
                        pass
        for tmp, final in pairs:
            os.replace(tmp, final)
            done.append(final)
    except OSError as exc:
        for final in done:
            with contextlib.suppress(OSError):
                if final in backups:
                    os.replace(backups.pop(final), final)
                else:
                    final.unlink()
        raise InputError(os_error_message(exc, pairs[len(done)][1] if len(done) < len(pairs)
                                          else None)) from None
    finally:
        for bak in backups.values():
            with contextlib.suppress(OSError):
                os.unlink(bak)


@contextlib.contextmanager
def _atomic_path(path, overwrite, suffix):
    with atomic_files([path], overwrite, [suffix]) as (tmp,):
        yield tmp


def init_h5(h5, fmt, version):
    """Write the root attributes every spread_tools HDF5 file carries."""
    h5.attrs["format"] = fmt
    h5.attrs["version"] = int(version)
    h5.attrs["spread_tools_version"] = __version__


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
            init_h5(h5, fmt, version)
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


# --------------------------------------------------------------------------- reading

def check_readable(path, note=True):
    """Check that an input file exists and is a readable file; remember it as an input.

    Parameters
    ----------
    path : str or Path
    note : bool
        Remember the file as an input of the current run (:func:`script_run`), so that
        no output replaces it. Checkpoints, which a run reads and then rewrites, pass False.

    Returns
    -------
    Path

    Raises
    ------
    InputError
        ``"<path>: no such file"``, ``"<path>: is a folder, not a file"`` or
        ``"<path>: cannot read (permission denied)"``.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not a file")
    if not os.access(path, os.R_OK, effective_ids=_EFFECTIVE):
        raise InputError(f"{path}: cannot read (permission denied)")
    if note:
        note_input(path)
    return path


def _is_lock_error(exc):
    text = str(exc).lower()
    return ("unable to lock file" in text or "resource temporarily unavailable" in text
            or getattr(exc, "errno", None) in (errno.EAGAIN, errno.EWOULDBLOCK))


def open_h5(path, what="HDF5 file"):
    """Open any HDF5 input read-only; failures become one line that says what is wrong.

    Parameters
    ----------
    path : str or Path
    what : str
        What the file should be, for the message (``"HDF5 spectrum file"``).

    Returns
    -------
    h5py.File

    Raises
    ------
    InputError
        ``"<path>: is locked by another process ..."`` (HDF5 file locking: another
        program has it open for writing; the file is not damaged),
        ``"<path>: damaged or truncated <what> (...)"``, ``"<path>: not an <what>"``,
        or the operating system's reason (permission denied, ...).
    """
    path = Path(path)
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        if _is_lock_error(exc):
            raise InputError(f"{path}: is locked by another process (HDF5 file locking: a "
                             f"program has it open for writing; the file is not damaged); wait "
                             f"until it has closed the file") from None
        try:
            with open(path, "rb") as fh:
                magic = fh.read(8)
        except OSError as exc2:
            raise InputError(os_error_message(exc2, path)) from None
        if magic == b"\x89HDF\r\n\x1a\n":
            raise InputError(f"{path}: damaged or truncated {what} ({_reason(exc)})") from None
        raise InputError(f"{path}: not an {what}") from None


def open_checked(path, fmt, max_version=1, note=True):
    """Open a spread_tools HDF5 file for reading and check what it is.

    Parameters
    ----------
    path : str or Path
        File to open.
    fmt : str
        Expected root ``format`` attribute.
    max_version : int
        Newest format version this code understands.
    note : bool
        Remember the file as an input of the current run (see :func:`check_readable`).

    Returns
    -------
    h5py.File
        Open read-only; use as a context manager.

    Raises
    ------
    InputError
        Missing, unreadable, locked by another process (HDF5 file locking: another
        program has it open for writing), not HDF5, truncated, of another format or
        of a newer version.
    """
    path = check_readable(path, note=note)
    h5 = open_h5(path)
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
