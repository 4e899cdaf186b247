"""Pieces shared by the benchmark scripts: the machine description of every JSON line.

Each script in ``benchmarks/`` prints one JSON line per figure with the machine
(no host names), the versions doing the work and the problem size, so that
``RESULTS.md`` rows can be compared over time. Scripts are run as
``python benchmarks/<script>.py``, which puts this folder on ``sys.path``.
"""

import os
import platform
import sys

import numpy as np


def machine(backend=None):
    """Machine description without host names.

    Parameters
    ----------
    backend : {"cpu", "cuda"}, optional
        Kernel backend of the run; with ``"cuda"`` the GPU (name, compute
        capability, numba-cuda version) is described too.

    Returns
    -------
    dict
        ``python``, ``platform``, ``system``, ``cpu_count``, ``cpu`` (model name),
        ``numpy``, ``numba``, ``numba_threads``, ``spread_tools`` and, when given,
        ``backend`` (+ ``gpu``, ``compute_capability``, ``numba_cuda``).
    """
    import numba
    info = {"python": platform.python_version(), "platform": platform.platform(terse=True),
            "system": platform.system(), "cpu_count": os.cpu_count(),
            "cpu": _cpu_model() or platform.processor() or platform.machine()}
    if backend is not None:
        info["backend"] = backend
    info["numpy"] = np.__version__
    info["numba"] = numba.__version__
    info["numba_threads"] = numba.get_num_threads()
    try:
        import spread_tools
        info["spread_tools"] = spread_tools.__version__
    except Exception:
        pass
    if backend == "cuda":
        from numba import cuda
        dev = cuda.get_current_device()
        name = getattr(dev, "name", "CUDA simulator")
        info["gpu"] = name.decode() if isinstance(name, bytes) else str(name)
        info["compute_capability"] = list(getattr(dev, "compute_capability", ()))
        info["numba_cuda"] = (getattr(sys.modules.get("numba_cuda"), "__version__", None)
                              or _numba_cuda_version())
    return info


def _cpu_model():
    """CPU model name from /proc/cpuinfo (Linux), or None."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _numba_cuda_version():
    try:
        from importlib.metadata import version
        return version("numba-cuda")
    except Exception:
        return None
