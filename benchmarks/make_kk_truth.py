"""KK-consistent truth curves for recovery runs: a measured f″ with its exact KK partner f′.

For each input table (three-column ``E f' f''``) the f″ column is kept and f′ is replaced by
C + KK[f″ of the table, the self-consistent Chantler reference beyond it]
(:func:`spread_tools.physics.kk_reference.kk_consistent_fp`), so that ``kk_check`` reports
only its 1 eV sampling floor on it and a refinement with Kramers–Kronig terms has a
consistent truth to recover. Prints one JSON line per table (the largest change of f′ in
7070–7170 eV).

Usage::

    python benchmarks/make_kk_truth.py test_data/spectra/pf-rd-ox_fftkk.out \\
        test_data/spectra/pf-rd-red_fftkk.out -o test_data/spectra
    # writes test_data/spectra/pf-rd-ox_kk.out, pf-rd-red_kk.out
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tables", nargs="+", type=Path)
    ap.add_argument("-o", "--outdir", type=Path, required=True)
    ap.add_argument("--element", default="Fe")
    args = ap.parse_args(argv)
    from spread_tools.physics.kk_reference import kk_consistent_fp, reference_curve
    from spread_tools.physics.scattering import read_table
    ref = reference_curve(args.element)
    for path in args.tables:
        t = read_table(path)
        fp = kk_consistent_fp(t.energy_ev, t.fdp, element=args.element)
        name = path.name.replace("_fftkk", "").rsplit(".", 1)[0] + "_kk.out"
        out = args.outdir / name
        head = (f"# f'' from {path.name}; f' = C + KK[f''] exactly, {ref.source} f'' beyond "
                f"{t.energy_ev[0]:g}-{t.energy_ev[-1]:g} eV, C = {ref.constant:+.5f} e- "
                f"(benchmarks/make_kk_truth.py)\n# E_eV f' f''\n")
        out.write_text(head + "".join(f"{e:.1f} {a:.6f} {b:.6f}\n"
                                      for e, a, b in zip(t.energy_ev, fp, t.fdp)))
        w = (t.energy_ev >= 7070) & (t.energy_ev <= 7170)
        print(json.dumps({"figure": "kk_truth", "table": str(out),
                          "max_change_fp_7070_7170": float(np.max(np.abs(fp - t.fp)[w])),
                          "rms_change_fp_7070_7170": float(np.sqrt(np.mean((fp - t.fp)[w] ** 2)))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
