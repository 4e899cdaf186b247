"""Progress bars for long loops (tqdm), silent when output is not a terminal."""

import sys

from tqdm.auto import tqdm


def progress(iterable=None, total=None, desc=None, quiet=False, unit="it"):
    """Wrap an iterable in a progress bar written to stderr.

    Parameters
    ----------
    iterable : iterable, optional
        What to iterate over.
    total : int, optional
        Number of items, when ``iterable`` has no length.
    desc : str, optional
        Short label shown before the bar.
    quiet : bool
        Force the bar off.
    unit : str
        Name of one item.

    Returns
    -------
    tqdm.tqdm
        The wrapped iterable (also usable as a manual bar with ``update``).
    """
    disable = quiet or not sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, disable=disable, unit=unit,
                file=sys.stderr, dynamic_ncols=True)
