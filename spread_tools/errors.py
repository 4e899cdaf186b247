"""Exceptions that mean "the user gave us something wrong"."""


class InputError(Exception):
    """A user mistake: bad file, bad parameter, inconsistent inputs.

    The message is one line that names the file (or parameter key) and the
    problem, e.g. ``"sf_cache.h5: not an HDF5 file"``. Scripts print it
    without a traceback and exit with status 2.
    """
