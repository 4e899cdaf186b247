"""Every script on every mistake: one clean line ``<script>: error: ...``, exit 2, nothing written.

The matrix is ``SCRIPTS`` (how to run each script correctly on tiny inputs) × ``MISTAKES``
(how to spoil a correct command) plus ``EXTRA`` (mistakes of one script's own parameters).
A new script adds one :class:`Script` entry; a new mistake adds one entry to ``MISTAKES``
(a function of the script and the work folder returning the command line and the fragment
the one line must contain, or ``None`` where the mistake cannot be made with that script).

Mistakes of the operations issue: a read-only output folder, an output that is one of the
inputs (with ``--overwrite``), a second run writing the same output at the same time, an
HDF5 input that another process holds open for writing (HDF5 file locking), and a malformed
option. Every case also checks that the inputs are unchanged and no output or lock file is
left behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[2]
TEST_DATA = REPO / "test_data"
runner = CliRunner()


@dataclasses.dataclass
class Script:
    """How to run one script correctly.

    ``argv(w, out)`` is a correct command line writing to ``out`` (``w``: the work folder);
    ``written(out)`` the files it writes for ``-o out`` (the first one is locked by a second
    writer); ``as_input`` the input that ``output_is_input`` passes as ``-o`` (a value for
    ``-o`` that names an input); ``hdf5_input`` an HDF5 file the command reads (``None``:
    it reads none).
    """

    module: str
    argv: Callable
    out_name: str
    written: Callable = lambda out: [out]
    as_input: Callable = None
    hdf5_input: Callable = None
    input_as_output: Callable = None


def _kk_written(out):
    return [out.with_suffix(".csv"), out.with_suffix(".png"), out.with_suffix(".pdf")]


SCRIPTS = {
    "cache_sf": Script(
        "spread_tools.cli.cache_sf",
        lambda w, out: [w / "model.pdb", "-o", out, "sites=FE1=FES/FE1", "d_min=3.8", "d_max=4.0",
                        "route=direct", "energy.step_ev=20"],
        "sf.h5", as_input=lambda w: w / "model.pdb"),
    "simulate_data": Script(
        "spread_tools.cli.simulate_data",
        lambda w, out: [w / "sf_cache.h5", "-o", out, f"truth=FE1={w / 'ox.out'},FE2={w / 'red.out'}",
                        "lattices=1", "seed=3", "spectrum.step_ev=4", "crystal.n_domains=1",
                        "detector.pixel_size_mm=0.4", "detector.n_fast=256", "detector.n_slow=256"],
        "ds.h5", as_input=lambda w: w / "sf_cache.h5", hdf5_input=lambda w: w / "sf_cache.h5"),
    "import_dials": Script(
        "spread_tools.cli.import_dials",
        lambda w, out: [w / "sim" / "sim.expt", w / "sim" / "sim.refl", w / "spectra.h5", "-o", out,
                        "channels.min_ev=7070", "channels.max_ev=7170",
                        "crystal.domain_size_cells=48,48,24"],
        "imported.h5", as_input=lambda w: w / "sim" / "sim.refl",
        hdf5_input=lambda w: w / "spectra.h5"),
    "refine_fdp": Script(
        "spread_tools.cli.refine_fdp",
        lambda w, out: [w / "tiny.h5", "--sf-cache", w / "sf_cache.h5", "-o", out, "-q",
                        "optimizer.iterations=2", "optimizer.max_macrocycles=1"],
        "result.h5", written=lambda out: [out, out.with_suffix(".csv"),
                                          out.with_name(out.stem + ".ckpt.h5")],
        as_input=lambda w: w / "tiny.h5", hdf5_input=lambda w: w / "tiny.h5"),
    "refine_geometry": Script(
        "spread_tools.cli.refine_geometry",
        lambda w, out: [w / "tiny.h5", "--sf-cache", w / "sf_cache.h5", "-o", out, "-q",
                        "refine.energy_offset=off", "lattice.min_shoeboxes=3"],
        "refined.h5", written=lambda out: [out, out.with_name(out.stem + ".lattices.csv"),
                                           out.with_name(out.stem + ".ckpt.h5")],
        as_input=lambda w: w / "tiny.h5", hdf5_input=lambda w: w / "tiny.h5"),
    "plot_curves": Script(
        "spread_tools.cli.plot_curves",
        lambda w, out: [w / "result.h5", "-o", out, "-q"],
        "curves.png", hdf5_input=lambda w: w / "result.h5",
        # a result file named like a figure, given as the figure to write
        input_as_output=lambda w: [w / "result.png", "-o", w / "result.png", "-q"]),
    "kk_check": Script(
        "spread_tools.cli.kk_check",
        lambda w, out: [w / "result.h5", "-o", out, "site=FE1"],
        "kk", written=_kk_written, hdf5_input=lambda w: w / "result.h5",
        # -o PREFIX writes PREFIX.csv: "-o result" on the table result.csv
        input_as_output=lambda w: [w / "result.csv", "-o", w / "result", "site=FE1"]),
}


# --------------------------------------------------------------------------- the work folder

def _fake_result(path):
    """A small but complete refine_fdp result (no refinement needed)."""
    from spread_tools.physics.scattering import reference_fp_fdp
    from spread_tools.refine.s1 import RefineResult, write_result
    e = np.arange(7070.0, 7171.0, 4.0)
    fp, fdp = reference_fp_fdp("Fe", e, "chantler")
    res = RefineResult(
        energy_ev=e, site_names=["FE1", "FE2"], site_elements=["Fe", "Fe"],
        fp=np.array([fp, fp]), fdp=np.array([fdp, fdp]), fp_sigma=np.full((2, e.size), 0.2),
        fdp_sigma=np.full((2, e.size), 0.3), edge_ev=np.array([7120.0, 7118.0]),
        edge_sigma_ev=np.array([1.0, 1.0]), lattice_G=np.ones(2), shoebox_background=np.zeros((3, 3)),
        history={"objective": np.array([1.0]), "gradient_norm": np.array([0.0]),
                 "time_s": np.array([0.1])},
        covariance=np.eye(4 * e.size) * 0.01, converged=True, message="converged", objective=1.0,
        n_ranks=1, n_evaluations=1, restraints=[])
    write_result(path, res)


@pytest.fixture(scope="module")
def work():
    """A world-readable folder with copies of every input (so a bug cannot harm test_data/)."""
    import h5py

    from spread_tools.io.dataset import Dataset
    w = Path(tempfile.mkdtemp(prefix="spread_matrix_"))
    w.chmod(0o755)
    shutil.copy(TEST_DATA / "models" / "6lk1.pdb", w / "model.pdb")
    shutil.copy(TEST_DATA / "sf_cache.h5", w / "sf_cache.h5")
    shutil.copy(TEST_DATA / "spectra" / "pf-rd-ox_fftkk.out", w / "ox.out")
    # a table that stops short of the spectra (7000-7050 eV)
    (w / "ox_cut.out").write_text("".join(ln for ln in (w / "ox.out").read_text().splitlines(True)
                                          if ln.split() and ln.split()[0].replace(".", "").isdigit()
                                          and 7000 <= float(ln.split()[0]) <= 7050))
    shutil.copy(TEST_DATA / "spectra" / "pf-rd-red_fftkk.out", w / "red.out")
    shutil.copytree(TEST_DATA / "dials" / "sim", w / "sim")
    ds = Dataset.read(TEST_DATA / "dataset.h5").select_lattices([0])
    ds.select_shoeboxes(np.arange(ds.n_shoeboxes) % 4 == 0).write(w / "tiny.h5")
    with h5py.File(w / "spectra.h5", "w") as h5:
        e = ds.energy_ev
        h5["energy_ev"] = e
        h5["weight"] = np.tile(np.exp(-0.5 * ((e - 7120.0) / 10.0) ** 2), (4, 1))
    _fake_result(w / "result.h5")
    shutil.copy(w / "result.h5", w / "result.png")
    for p in w.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    for mod in {s.module for s in SCRIPTS.values()} | {
            "spread_tools.simulate.simulator", "spread_tools.structure.build",
            "spread_tools.io.dials.importer", "spread_tools.refine.s1", "spread_tools.plots",
            "spread_tools.physics.kk"}:
        importlib.import_module(mod)      # nothing left to import (or compile) as another user
    for name, script in SCRIPTS.items():  # ... also what option parsing imports lazily
        assert _invoke(name, script.argv(w, w / "unused") + ["--show-config"]).exit_code == 0
    yield w
    shutil.rmtree(w, ignore_errors=True)


def _digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- other processes

_HOLDER = r"""
import json, sys
from spread_tools.io.h5io import OutputLock
import h5py
held = []
for kind, path in json.loads(sys.argv[1]):
    held.append(OutputLock(path, script="other_run").acquire() if kind == "lock"
                else h5py.File(path, "r+"))
print("ready", flush=True)
sys.stdin.read()
for h in held:
    h.release() if isinstance(h, OutputLock) else h.close()
"""


@contextlib.contextmanager
def other_process_holding(items):
    """Another process that holds output locks ("lock", path) or HDF5 files open for writing
    ("h5", path) until the block ends."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, json.dumps([(k, str(p)) for k, p in items])],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


@contextlib.contextmanager
def unwritable(folder):
    """Make ``folder`` really unwritable for the code under test (root ignores permissions:
    then the test acts as user nobody while the block runs)."""
    folder.chmod(0o555)
    root = os.geteuid() == 0
    try:
        if root:
            os.seteuid(65534)
        try:
            assert not os.access(folder, os.W_OK, effective_ids=os.access in os.supports_effective_ids)
            with pytest.raises(PermissionError):
                (folder / "probe").write_text("x")
            yield
        finally:
            if root:
                os.seteuid(0)
    finally:
        folder.chmod(0o755)


# --------------------------------------------------------------------------- the mistakes

def read_only_folder(script, w, out):
    ro = w / "read_only"
    ro.mkdir(exist_ok=True)
    return script.argv(w, ro / script.out_name), "cannot write into folder", unwritable(ro)


def output_is_input(script, w, out):
    if script.input_as_output is not None:
        argv = [str(a) for a in script.input_as_output(w)]
    else:
        argv = [str(a) for a in script.argv(w, out)]
        i = argv.index("-o")
        argv[i + 1] = str(script.as_input(w))
    return argv + ["--overwrite"], "is also an input of this run", contextlib.nullcontext()


def second_writer(script, w, out):
    first = script.written(out)[0]
    return (script.argv(w, out), "another run is writing it (other_run on host",
            other_process_holding([("lock", first)]))


def locked_input(script, w, out):
    if script.hdf5_input is None:
        return None                                   # reads no HDF5 file
    return (script.argv(w, out), "is locked by another process",
            other_process_holding([("h5", script.hdf5_input(w))]))


def unknown_option(script, w, out):
    return script.argv(w, out) + ["--no-such-option"], "command line: No such option", \
        contextlib.nullcontext()


MISTAKES = {"read_only_folder": read_only_folder, "output_is_input": output_is_input,
            "second_writer": second_writer, "locked_input": locked_input,
            "unknown_option": unknown_option}

#: Mistakes in one script's own parameters: (script, extra words, fragment).
EXTRA = [
    ("simulate_data", ["--lattices", "abc"], "Invalid value for '--lattices'"),
    ("kk_check", ["--max-rms", "abc"], "Invalid value for '--max-rms'"),
    ("import_dials", ["d_min=5", "d_max=4"], "d_min=5, d_max=4"),
    ("refine_fdp", ["optimizer.iterations=-1"], "parameter optimizer.iterations"),
    # refine_fdp parameters of issues 12 and 13: controls, well-posed locals, the band cut
    ("refine_fdp", ["control=permute_hkl"], "control"),
    ("refine_fdp", ["lattice.min_shoeboxes=0"], "lattice.min_shoeboxes"),
    ("refine_fdp", ["lattice.ln_G_sigma=-1"], "lattice.ln_G_sigma"),
    ("refine_fdp", ["shoebox.slope_sigma=0"], "shoebox.slope_sigma"),
    ("refine_fdp", ["pixel_model.band_rtol=2"], "pixel_model.band_rtol"),
    ("refine_fdp", ["pixel_model.band_floor=-1"], "pixel_model.band_floor"),
    ("refine_fdp", ["uncertainty.geometry=maybe"], "uncertainty.geometry"),
    ("refine_fdp", ["restraints.fdp.edge_sigma=0"], "restraints.fdp.edge_sigma"),
    ("refine_fdp", ["restraints.fp.edge_sigma=-0.5"], "restraints.fp.edge_sigma"),
    ("plot_curves", ["energy.min_ev=7170", "energy.max_ev=7070"], "energy.min_ev=7170, energy.max_ev=7070"),
    # refine_geometry (issue 10): restraint sigma <= 0, an unknown family, bad bounds, a table
    # that does not cover the spectra
    ("refine_geometry", ["cell.sigma_fraction=0"], "cell.sigma_fraction"),
    ("refine_geometry", ["cell.sigma_edges_a=0.04,-1,0.15"], "must be positive"),
    ("refine_geometry", ["refine.strain=True"], "unknown parameter"),
    ("refine_geometry", ["refine.domain_size=both"], "refine.domain_size"),
    ("refine_geometry", ["mosaic.min_deg=1", "mosaic.max_deg=0.1"], "mosaic.min_deg"),
    ("refine_geometry", ["mosaic.log_sigma=0"], "mosaic.log_sigma"),
    ("refine_geometry", ["curves.tables=FE1=__ox_cut__"], "covers"),
    ("refine_geometry", ["curves.tables=FE7=__ox_cut__"], "not in the SF cache"),
    ("refine_geometry", ["curves.result=__ox_cut__"], "refine_fdp result"),
    ("refine_geometry", ["optimizer.max_macrocycles=0"], "optimizer.max_macrocycles"),
]


def _invoke(name, argv):
    app = importlib.import_module(SCRIPTS[name].module).app
    return runner.invoke(app, [str(a) for a in argv])


def _check(name, result, fragment, w, before, outputs):
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith(f"{name}: error:") and fragment in lines[0], lines[0]
    assert _digest(w) == before, "an input changed (or a file was left behind)"
    for o in outputs:
        assert not o.exists(), o


CASES = [(s, m) for s in SCRIPTS for m in MISTAKES]


@pytest.mark.parametrize("name,mistake", CASES, ids=[f"{s}-{m}" for s, m in CASES])
def test_mistake_gives_one_clean_line(name, mistake, work, tmp_path):
    script = SCRIPTS[name]
    out_dir = work / f"out_{name}_{mistake}"
    out_dir.mkdir()
    out = out_dir / script.out_name
    case = MISTAKES[mistake](script, work, out)
    if case is None:
        pytest.skip(f"{name} reads no HDF5 file")
    argv, fragment, context = case
    with context:
        before = _digest(work)                      # with the other run's lock file, if any
        result = _invoke(name, argv)
        _check(name, result, fragment, work, before, script.written(out)[1:] if
               mistake == "second_writer" else script.written(out))
    assert not list(work.rglob("*.lock"))
    shutil.rmtree(out_dir)


@pytest.mark.parametrize("name,words,fragment", EXTRA, ids=[f"{e[0]}-{e[1][0]}" for e in EXTRA])
def test_parameter_mistake_gives_one_clean_line(name, words, fragment, work):
    script = SCRIPTS[name]
    out_dir = work / f"out_{name}_extra"
    out_dir.mkdir(exist_ok=True)
    out = out_dir / script.out_name
    before = _digest(work)
    words = [wd.replace("__ox_cut__", str(work / "ox_cut.out")) for wd in words]
    _check(name, _invoke(name, script.argv(work, out) + words), fragment, work, before,
           script.written(out))
    shutil.rmtree(out_dir)


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_the_correct_command_works(name, work):
    """The base command of every script runs, so each mistake above is the only thing wrong."""
    script = SCRIPTS[name]
    out_dir = work / f"out_{name}_ok"
    out_dir.mkdir()
    out = out_dir / script.out_name
    result = _invoke(name, script.argv(work, out))
    assert result.exit_code == 0, result.output
    assert script.written(out)[0].exists()
    assert not list(work.rglob("*.lock"))
    shutil.rmtree(out_dir)
