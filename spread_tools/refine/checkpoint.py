"""Checkpoints of long refinements: signals, timed writes, resume (S1 and refine_geometry).

The reusable pieces (any long-running stage uses them the same way):

* :class:`StopSignals` — while active, SIGTERM (SLURM's time limit / requeue) and
  SIGINT (Ctrl-C) only *request* a stop (:attr:`StopSignals.requested`); the work
  goes on to a point where its state is consistent, writes a checkpoint and raises
  :class:`Interrupted`. A second Ctrl-C stops at once (``KeyboardInterrupt``).
* :class:`Checkpointer` — writes checkpoint files (atomically: a ``SIGKILL`` at any
  moment leaves the previous checkpoint intact) when a wall-time interval has passed
  (:meth:`Checkpointer.maybe_save`), when asked (:meth:`Checkpointer.save`) and when a
  stop was requested; reads them back for ``--resume``, refusing a checkpoint that
  was written for other input data (fingerprint) or with parameters that change the
  answer (configuration).
* :func:`answer_config` and :func:`fingerprint` — the two keys a checkpoint must match.

A checkpoint file (``format = "spread_tools.checkpoint"``, version 2) holds root
attributes ``kind`` (``"s1"``, ``"refine_geometry"``, ...), ``config`` (JSON of
:func:`answer_config`), ``fingerprint``, ``written_at`` plus the stage's own
attributes, and the stage's arrays as datasets (names may contain ``/``). Version 1
(S1 checkpoints written after a macrocycle only) is still read.

The S1 state (:func:`s1_state_arrays`) is what :mod:`spread_tools.refine.s1` saves:
after a macrocycle the parameter vector and history; inside a macrocycle also the
preconditioner of that macrocycle and the full state of the L-BFGS-B routine
(:class:`spread_tools.refine.lbfgsb.LbfgsbRun`), so that ``--resume`` from any
checkpoint follows exactly the path of an uninterrupted run (bit for bit on the
same machine and number of ranks).
"""

from __future__ import annotations

import hashlib
import json
import signal
import threading
import time
from pathlib import Path

import numpy as np

from spread_tools.errors import InputError

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "StopSignals", "Interrupted",
           "Checkpointer", "answer_config", "fingerprint", "signal_name"]

CHECKPOINT_FORMAT = "spread_tools.checkpoint"
CHECKPOINT_VERSION = 2

#: S1 parameters that do not change the answer (a checkpoint written with other values is accepted).
_OPERATIONAL = ("optimizer.max_macrocycles", "checkpoint.path", "checkpoint.keep",
                "checkpoint.interval_s", "uncertainty.calibrate", "backend")


def signal_name(signum):
    """``"SIGTERM"`` for 15, etc."""
    try:
        return signal.Signals(signum).name
    except (ValueError, TypeError):
        return f"signal {signum}"


class Interrupted(Exception):
    """A stop was requested by a signal; the state is saved in ``checkpoint``.

    Attributes
    ----------
    signum : int
    checkpoint : Path or None
    exit_code : int
        128 + signal number (143 for SIGTERM, 130 for SIGINT), the shell's convention.
    """

    def __init__(self, signum, checkpoint, detail=""):
        self.signum = int(signum)
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        self.detail = detail
        self.exit_code = 128 + self.signum
        super().__init__(f"interrupted by {signal_name(self.signum)}"
                         + (f"; checkpoint {self.checkpoint}" if self.checkpoint else "")
                         + (f" ({detail})" if detail else ""))


class StopSignals:
    """Context manager: SIGTERM and SIGINT request a stop instead of killing the process.

    Parameters
    ----------
    signals : sequence of int
        Signals to catch (default SIGTERM, SIGINT).

    Attributes
    ----------
    requested : int or None
        The first signal received, or ``None``.

    Notes
    -----
    Handlers are installed only in the main thread (elsewhere this is a no-op) and
    the previous handlers are restored on exit. A second SIGINT while a stop is
    pending raises ``KeyboardInterrupt`` (stop now, no checkpoint). Python runs the
    handler between bytecodes, so a long compiled kernel finishes its call first.
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.signals = tuple(signals)
        self.requested = None
        self._old = {}

    def _handler(self, signum, frame):
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.requested is None:
            self.requested = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()
        return False


def answer_config(cfg, operational=_OPERATIONAL):
    """The effective parameters that determine the answer (flat dict, sorted keys).

    Parameters
    ----------
    cfg : spread_tools.config.Config
    operational : sequence of str
        Dotted keys that do not change the answer (left out).

    Returns
    -------
    dict
    """
    flat = cfg.flat()
    return {k: v for k, v in sorted(flat.items()) if k not in operational}


def fingerprint(arrays):
    """SHA-256 (hex) over the bytes of some arrays: identifies the input data.

    Parameters
    ----------
    arrays : iterable of array_like

    Returns
    -------
    str
    """
    h = hashlib.sha256()
    for arr in arrays:
        a = np.ascontiguousarray(arr)
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


class Checkpointer:
    """Writes and reads the checkpoint file of one run.

    Parameters
    ----------
    path : str or Path or None
        Checkpoint file (``None``: no checkpoints; :meth:`maybe_save` then only
        honours a stop request).
    kind : str
        Stage name stored in the file; a checkpoint of another kind is refused.
    config : dict
        :func:`answer_config` of the run.
    fingerprint : str
        :func:`fingerprint` of the run's input data.
    interval_s : float or None
        Write at least this often (wall-clock seconds) through :meth:`maybe_save`;
        0 writes at every call; ``None`` never by time.
    stop : StopSignals, optional
        Where a stop request comes from.
    clock : callable
        Time source (``time.monotonic``; tests pass a fake one).

    Notes
    -----
    Typical loop of a long stage::

        with StopSignals() as stop:                     # in the script
            ck = Checkpointer(path, "refine_geometry", answer_config(cfg, OPERATIONAL),
                              fingerprint([ds.counts, ds.A]), cfg.checkpoint.interval_s, stop)
            saved = ck.load() if resume else None       # {"attrs": {...}, "arrays": {...}}
            for unit in work:                           # a consistent point after each unit
                ...
                ck.maybe_save(lambda: {"attrs": {...}, "arrays": {...}})
            ck.save({...})                              # final state
            ck.raise_if_stopped()                       # a stop that came after the last save

    ``maybe_save`` writes when the interval has passed or a stop was requested and,
    in the latter case, raises :class:`Interrupted` after writing. The state is
    built only when it is written (pass a function).
    """

    def __init__(self, path, kind, config, fingerprint, interval_s=None, stop=None,
                 clock=time.monotonic):
        self.path = None if path is None else Path(path)
        self.kind = kind
        self.config = config
        self.fingerprint = fingerprint
        self.interval_s = None if interval_s is None else float(interval_s)
        self.stop = stop
        self.clock = clock
        self.last_write = clock()
        self.n_written = 0

    @property
    def stop_requested(self):
        """The signal number of a pending stop request, or ``None``."""
        return None if self.stop is None else self.stop.requested

    def due(self):
        """True when the interval has passed since the last write (or a stop is pending)."""
        if self.stop_requested is not None:
            return True
        if self.interval_s is None or self.path is None:
            return False
        return self.clock() - self.last_write >= self.interval_s

    def maybe_save(self, make_state, detail=""):
        """Write ``make_state()`` if :meth:`due`; after a stop request raise :class:`Interrupted`.

        Parameters
        ----------
        make_state : callable
            Returns ``{"attrs": dict, "arrays": dict}``.
        detail : str
            Where the run stands, for the message of :class:`Interrupted`.

        Returns
        -------
        bool
            Whether a checkpoint was written.
        """
        if not self.due():
            return False
        if self.path is not None:
            self.save(make_state())
        self.raise_if_stopped(detail)
        return self.path is not None

    def raise_if_stopped(self, detail=""):
        """Raise :class:`Interrupted` when a stop was requested (the checkpoint is current)."""
        if self.stop_requested is not None:
            raise Interrupted(self.stop_requested, self.path, detail)

    def save(self, state):
        """Write a checkpoint now (atomically; replaces the previous one).

        Parameters
        ----------
        state : dict
            ``{"attrs": {name: scalar or str}, "arrays": {name: array}}``.
        """
        from spread_tools.io.h5io import atomic_writer
        if self.path is None:
            return
        with atomic_writer(self.path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, overwrite=True) as h5:
            h5.attrs["kind"] = self.kind
            h5.attrs["config"] = json.dumps(self.config, sort_keys=True)
            h5.attrs["fingerprint"] = self.fingerprint
            h5.attrs["written_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
            for k, v in state.get("attrs", {}).items():
                h5.attrs[k] = v
            for k, v in state.get("arrays", {}).items():
                if isinstance(v, (list, tuple)) and v and isinstance(v[0], str):
                    from spread_tools.io.h5io import write_strings
                    write_strings(h5, k, v)
                else:
                    h5.create_dataset(k, data=np.asarray(v))
        self.last_write = self.clock()
        self.n_written += 1

    def exists(self):
        """True when the checkpoint file exists."""
        return self.path is not None and self.path.exists()

    def load(self):
        """Read the checkpoint back, or ``None`` when there is none.

        Returns
        -------
        dict or None
            ``{"attrs": dict, "arrays": dict}`` (string arrays as lists of str).

        Raises
        ------
        InputError
            Not a checkpoint, of another kind, written with another configuration
            (the message names the differing keys) or for other input data.
        """
        from spread_tools.io.h5io import open_checked
        if not self.exists():
            return None
        path = self.path
        with open_checked(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, note=False) as h5:
            kind = str(h5.attrs.get("kind", "s1"))
            if kind != self.kind:
                raise InputError(f"{path}: is a {kind} checkpoint, not one of {self.kind}; "
                                 f"remove it or drop --resume")
            try:
                saved = json.loads(str(h5.attrs.get("config", "{}")))
            except json.JSONDecodeError:
                saved = None
            if saved != self.config:
                saved = saved or {}
                diff = sorted(k for k in set(saved) | set(self.config)
                              if saved.get(k, "?") != self.config.get(k, "?"))
                raise InputError(f"{path}: checkpoint was written with another configuration "
                                 f"(differs in: {', '.join(diff)}); remove it or drop --resume")
            if str(h5.attrs.get("fingerprint", "")) != self.fingerprint:
                raise InputError(f"{path}: checkpoint was written for other input data (datasets "
                                 f"or SF cache differ); remove it or drop --resume")
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in h5.attrs.items()}
            arrays = {}

            def visit(name, obj):
                import h5py
                if isinstance(obj, h5py.Dataset):
                    try:
                        data = obj[()]
                    except (OSError, ValueError) as exc:
                        raise InputError(f"{path}: cannot read '{name}' (damaged checkpoint: "
                                         f"{exc}); remove it or drop --resume") from None
                    if getattr(data, "dtype", None) is not None and data.dtype.kind in "OS":
                        data = [d.decode() if isinstance(d, bytes) else str(d) for d in data]
                    arrays[name] = data
            h5.visititems(visit)
        return {"attrs": attrs, "arrays": arrays}


# --------------------------------------------------------------------------- S1

def s1_fingerprint(prepared, cache):
    """Fingerprint of what determines an S1 answer: the prepared data and the SF cache."""
    ds = prepared.ds
    return fingerprint([ds.counts, ds.mask, ds.sb_miller_index, ds.spectrum_weight, ds.A,
                        ds.energy_ev, prepared.lattice_orig, prepared.shoebox_orig,
                        cache.hkl, cache.F_base, cache.S_site])


def s1_state(macrocycle, converged, message, x, history, site_names, n_eval, inner=None,
             convergence=None):
    """The S1 checkpoint content for :meth:`Checkpointer.save`.

    Parameters
    ----------
    macrocycle : int
        Macrocycles completed.
    converged : bool
        The optimisation has finished (converged or stopped).
    message : str
    x : array (n_x,)
        Parameters after the last completed macrocycle, or the current point inside one.
    history : dict of lists
        ``objective``, ``gradient_norm``, ``time_s``, ``macrocycle`` per iteration so far.
    site_names : list of str
    n_eval : int
        Objective evaluations so far.
    inner : dict, optional
        Inside a macrocycle: ``H_glob``, ``diag_loc`` (the macrocycle's preconditioner),
        ``f_before``, ``f_loc`` (after the local fit), ``n_eval0``, ``elapsed_s``, ``last_f``,
        ``last_g``, ``last_z`` and ``lbfgs`` (:meth:`LbfgsbRun.state`).
    convergence : dict of lists, optional
        The per-macrocycle record so far.

    Returns
    -------
    dict
    """
    arrays = {"x": np.asarray(x, dtype=np.float64), "site_names": list(site_names)}
    for k, v in history.items():
        arrays[f"history/{k}"] = np.asarray(v, dtype=np.float64)
    for k, v in (convergence or {}).items():
        arrays[f"convergence/{k}"] = np.asarray(v, dtype=np.float64)
    attrs = {"macrocycle": int(macrocycle), "converged": bool(converged), "message": str(message),
             "n_evaluations": int(n_eval), "phase": "macrocycle" if inner is None else "lbfgs"}
    if inner is not None:
        arrays["precond/H_glob"] = np.asarray(inner["H_glob"], dtype=np.float64)
        arrays["precond/diag_loc"] = np.asarray(inner["diag_loc"], dtype=np.float64)
        arrays["inner/f_before"] = np.float64(inner["f_before"])
        arrays["inner/last_f"] = np.float64(inner["last_f"])
        arrays["inner/last_g"] = np.asarray(inner["last_g"], dtype=np.float64)
        arrays["inner/last_z"] = np.asarray(inner["last_z"], dtype=np.float64)
        for k in ("f_loc", "elapsed_s"):
            arrays[f"inner/{k}"] = np.float64(inner[k])
        arrays["inner/n_eval0"] = np.int64(inner["n_eval0"])
        for k, v in inner["lbfgs"].items():
            arrays[f"lbfgs/{k}"] = np.asarray(v)
    return {"attrs": attrs, "arrays": arrays}


def s1_from_checkpoint(saved, n_x, path):
    """Unpack :func:`s1_state` read back by :meth:`Checkpointer.load`.

    Returns
    -------
    dict
        ``x``, ``macrocycle``, ``converged``, ``message``, ``history`` and ``convergence``
        (lists), ``n_evaluations`` and ``inner`` (``None`` after a macrocycle).
    """
    a, arr = saved["attrs"], saved["arrays"]
    x = np.asarray(arr.get("x", np.zeros(0)), dtype=np.float64)
    if x.shape != (n_x,):
        raise InputError(f"{path}: checkpoint holds {x.size} parameters, expected {n_x}")
    hist = {k: [float(v) for v in np.atleast_1d(arr.get(f"history/{k}", np.zeros(0)))]
            for k in ("objective", "gradient_norm", "time_s", "macrocycle")}
    conv = {k.split("/", 1)[1]: [float(v) for v in np.atleast_1d(val)]
            for k, val in arr.items() if k.startswith("convergence/")}
    inner = None
    if str(a.get("phase", "macrocycle")) == "lbfgs":
        lb = {k.split("/", 1)[1]: v for k, v in arr.items() if k.startswith("lbfgs/")}
        inner = {"H_glob": arr["precond/H_glob"], "diag_loc": arr["precond/diag_loc"],
                 "f_before": float(arr["inner/f_before"]), "last_f": float(arr["inner/last_f"]),
                 "last_g": np.asarray(arr["inner/last_g"], dtype=np.float64),
                 "last_z": np.asarray(arr.get("inner/last_z", np.zeros(0)), dtype=np.float64),
                 "f_loc": float(arr.get("inner/f_loc", arr["inner/f_before"])),
                 "n_eval0": int(arr.get("inner/n_eval0", 0)),
                 "elapsed_s": float(arr.get("inner/elapsed_s", 0.0)), "lbfgs": lb}
    return {"x": x, "macrocycle": int(a.get("macrocycle", 0)),
            "converged": bool(a.get("converged", False)), "message": str(a.get("message", "")),
            "history": hist, "convergence": conv, "n_evaluations": int(a.get("n_evaluations", 0)), "inner": inner}
