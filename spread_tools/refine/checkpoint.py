"""Checkpoints of the S1 refinement: written after every macrocycle, read by ``--resume``.

A checkpoint is accepted only for the same input data (fingerprint) and the same
parameters that determine the answer (operational ones may differ).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from spread_tools.errors import InputError

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION"]

CHECKPOINT_FORMAT = "spread_tools.checkpoint"
CHECKPOINT_VERSION = 1

#: Parameters that do not change the answer (a checkpoint written with other values is accepted).
_OPERATIONAL = ("optimizer.max_macrocycles", "checkpoint.path", "checkpoint.keep", "backend")


def _fingerprint(prepared, cache, cfg):
    """Hash of what determines the answer: data, cache, effective non-operational parameters."""
    h = hashlib.sha256()
    ds = prepared.ds
    for arr in (ds.counts, ds.mask, ds.sb_miller_index, ds.spectrum_weight, ds.A, ds.energy_ev,
                prepared.lattice_orig, prepared.shoebox_orig):
        h.update(np.ascontiguousarray(arr).tobytes())
    for arr in (cache.hkl, cache.F_base, cache.S_site):
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def _answer_config(cfg):
    flat = cfg.flat()
    return {k: v for k, v in sorted(flat.items()) if k not in _OPERATIONAL}


def _write_checkpoint(path, state):
    from spread_tools.io.h5io import atomic_writer, write_strings
    with atomic_writer(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, overwrite=True) as h5:
        h5.attrs["config"] = json.dumps(state["config"], sort_keys=True)
        h5.attrs["fingerprint"] = state["fingerprint"]
        h5.attrs["macrocycle"] = int(state["macrocycle"])
        h5.attrs["converged"] = bool(state["converged"])
        h5.attrs["message"] = state["message"]
        h5.create_dataset("x", data=state["x"])
        for k, v in state["history"].items():
            h5.create_dataset(f"history/{k}", data=np.asarray(v, dtype=np.float64))
        for k, v in state.get("convergence", {}).items():
            h5.create_dataset(f"convergence/{k}", data=np.asarray(v, dtype=np.float64))
        write_strings(h5, "site_names", state["site_names"])


def _read_checkpoint(path, config, fingerprint, n_x):
    from spread_tools.io.h5io import open_checked, read_array
    with open_checked(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION) as h5:
        saved = json.loads(str(h5.attrs.get("config", "{}")))
        if saved != config:
            diff = sorted(k for k in set(saved) | set(config) if saved.get(k, "?") != config.get(k, "?"))
            raise InputError(f"{path}: checkpoint was written with another configuration "
                             f"(differs in: {', '.join(diff)}); remove it or drop --resume")
        if str(h5.attrs.get("fingerprint", "")) != fingerprint:
            raise InputError(f"{path}: checkpoint was written for other input data (datasets or "
                             f"SF cache differ); remove it or drop --resume")
        x = read_array(h5, "x", np.float64)
        if x.shape != (n_x,):
            raise InputError(f"{path}: checkpoint holds {x.size} parameters, expected {n_x}")
        hist = {k: list(read_array(h5, f"history/{k}", np.float64)) for k in h5["history"]}
        conv = {k: list(read_array(h5, f"convergence/{k}", np.float64))
                for k in (h5["convergence"] if "convergence" in h5 else ())}
        return {"x": x, "macrocycle": int(h5.attrs["macrocycle"]), "history": hist,
                "convergence": conv,
                "converged": bool(h5.attrs.get("converged", False)),
                "message": str(h5.attrs.get("message", ""))}
