"""DIALS reflection tables (``.refl``, msgpack) without cctbx/DIALS: reader and writer.

File layout (DIALS ``reflection_table_msgpack_adapter.h``; one msgpack object)::

    ["dials::af::reflection_table", VERSION,            # VERSION 1 or 2
     {"identifiers": {int: str, ...},                   # experiment id -> identifier
      "nrows": N,
      "data": {column_name: [type_name, [N, payload]], ...}}]

For the fixed-size element types the payload is one msgpack ``bin`` holding the
N elements back to back, little-endian, C layout (x86 in practice):

=========================  ============  =========================================
type name                  element       numpy
=========================  ============  =========================================
``bool``                   1 byte        ``bool``
``int``                    int32         ``<i4``
``std::size_t``            uint64        ``<u8``
``double``                 float64       ``<f8``
``vec2<double>``           2 float64     ``<f8`` (N, 2)
``vec3<double>``           3 float64     ``<f8`` (N, 3)
``mat3<double>``           9 float64     ``<f8`` (N, 3, 3), row-major (scitbx mat3)
``int6``                   6 int32       ``<i4`` (N, 6)
``cctbx::miller::index<>`` 3 int32       ``<i4`` (N, 3)
=========================  ============  =========================================

``Shoebox<>`` (float shoeboxes) is one ``bin`` with, per row, back to back:
``uint32 panel``, ``int32 bbox[6]`` (x0, x1, y0, y1, z0, z1), ``uint8 present``;
when ``present`` is 1 or 2 the arrays follow, each of shape
(z1−z0, y1−y0, x1−x0) in C order (x fastest): ``float32 data``, the mask
(``int32`` when ``present`` is 1 — DIALS ≤ 3.x, table version 1 — and
``uint8`` when it is 2 — newer DIALS, table version 2), ``float32 background``.
``present`` = 0 means an unallocated shoebox (no arrays).
This follows the DIALS source read for this module; it was checked here only by
round trips through :func:`write_refl` (the shared real table has no shoebox
column). Mask bits (``dials/model/data/mask_code.h``): :data:`MASK_CODES`.

``std::string`` columns are accepted as a msgpack array of N strings (an
assumption: DIALS' adapter has no binary layout for them); other type names are
refused with :class:`~spread_tools.errors.InputError`, as are pickle-format
tables (detected by their header byte; never unpickled), truncated or
non-msgpack files and size mismatches.
"""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

import numpy as np

from spread_tools.errors import InputError

__all__ = ["MASK_CODES", "FLAGS", "Shoeboxes", "ReflectionTable", "read_refl", "write_refl",
           "flag_value"]

#: DIALS ``MaskCode`` bits of shoebox pixels.
MASK_CODES = {"valid": 1, "background": 2, "foreground": 4, "strong": 8,
              "background_used": 16, "overlapped": 32}

#: DIALS reflection ``flags`` bits (``dials/array_family/reflection_table.h``).
FLAGS = {
    "predicted": 1 << 0, "observed": 1 << 1, "indexed": 1 << 2, "used_in_refinement": 1 << 3,
    "strong": 1 << 5, "reference_spot": 1 << 6, "dont_integrate": 1 << 7,
    "integrated_sum": 1 << 8, "integrated_prf": 1 << 9, "integrated": (1 << 8) | (1 << 9),
    "overloaded": 1 << 10, "overlapped_bg": 1 << 11, "overlapped_fg": 1 << 12,
    "in_powder_ring": 1 << 13, "foreground_includes_bad_pixels": 1 << 14,
    "background_includes_bad_pixels": 1 << 15, "includes_bad_pixels": (1 << 14) | (1 << 15),
    "bad_shoebox": (1 << 10) | (1 << 11) | (1 << 12) | (1 << 13) | (1 << 14) | (1 << 15),
    "used_in_modelling": 1 << 16, "centroid_outlier": 1 << 17,
    "failed_during_background_modelling": 1 << 18, "failed_during_summation": 1 << 19,
    "failed_during_profile_fitting": 1 << 20, "bad_reference": 1 << 21,
}

_MAGIC = "dials::af::reflection_table"

# type name -> (numpy dtype, element shape)
_FIXED = {
    "bool": (np.dtype("u1"), ()),
    "int": (np.dtype("<i4"), ()),
    "std::size_t": (np.dtype("<u8"), ()),
    "double": (np.dtype("<f8"), ()),
    "vec2<double>": (np.dtype("<f8"), (2,)),
    "vec3<double>": (np.dtype("<f8"), (3,)),
    "mat3<double>": (np.dtype("<f8"), (3, 3)),
    "int6": (np.dtype("<i4"), (6,)),
    "cctbx::miller::index<>": (np.dtype("<i4"), (3,)),
}
_TYPE_OF_DTYPE = {"b": "bool", "i": "int", "u": "std::size_t", "f": "double"}


def flag_value(names, where="flags"):
    """OR of the DIALS flag bits named in ``names`` (list of names from :data:`FLAGS`)."""
    value = 0
    for name in names or []:
        key = str(name).strip().lower()
        if key not in FLAGS:
            raise InputError(f"{where}: unknown DIALS reflection flag {name!r} "
                             f"(known: {', '.join(FLAGS)})")
        value |= FLAGS[key]
    return value


@dataclasses.dataclass
class Shoeboxes:
    """A DIALS ``Shoebox<>`` column.

    Attributes
    ----------
    panel : ndarray of int64 (n,)
    bbox : ndarray of int32 (n, 6)
        x0, x1, y0, y1, z0, z1 (half-open, pixels/frames).
    data, mask, background : list of ndarray or None
        Per row: float32 (nz, ny, nx) counts, int32 mask bits (see
        :data:`MASK_CODES`), float32 background; ``None`` where the shoebox
        holds no pixels.
    """

    panel: np.ndarray
    bbox: np.ndarray
    data: list
    mask: list
    background: list

    def __len__(self):
        return len(self.panel)

    def has_data(self):
        """Boolean array: which rows hold pixel arrays."""
        return np.array([d is not None for d in self.data], dtype=bool)

    def select(self, index):
        """Rows ``index`` (integer array) as a new :class:`Shoeboxes`."""
        index = np.asarray(index, dtype=np.int64)
        return Shoeboxes(self.panel[index], self.bbox[index], [self.data[i] for i in index],
                         [self.mask[i] for i in index], [self.background[i] for i in index])


@dataclasses.dataclass
class ReflectionTable:
    """A DIALS reflection table in numpy arrays.

    Attributes
    ----------
    columns : dict
        Column name → ndarray (fixed-size types), list of str (``std::string``)
        or :class:`Shoeboxes` (``Shoebox<>``).
    types : dict
        Column name → DIALS type name (``"double"``, ``"vec3<double>"``, ...).
    identifiers : dict
        Experiment id (the ``id`` column's values) → experiment identifier string.
    path : str
        Where it was read from (for messages).
    """

    columns: dict
    types: dict
    identifiers: dict = dataclasses.field(default_factory=dict)
    path: str = "<memory>"

    @property
    def nrows(self):
        """Number of rows."""
        return len(next(iter(self.columns.values()))) if self.columns else 0

    def __contains__(self, name):
        return name in self.columns

    def __getitem__(self, name):
        if name not in self.columns:
            raise InputError(f"{self.path}: reflection table has no column '{name}' "
                             f"(columns: {', '.join(sorted(self.columns))})")
        return self.columns[name]

    def select(self, index):
        """Rows ``index`` (integer or boolean array) as a new table."""
        index = np.asarray(index)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        cols = {}
        for name, col in self.columns.items():
            if isinstance(col, Shoeboxes):
                cols[name] = col.select(index)
            elif isinstance(col, list):
                cols[name] = [col[i] for i in index]
            else:
                cols[name] = col[index]
        return ReflectionTable(cols, dict(self.types), dict(self.identifiers), self.path)

    @classmethod
    def from_columns(cls, columns, identifiers=None, types=None):
        """Build a table from arrays, inferring DIALS type names from dtype and shape.

        Parameters
        ----------
        columns : dict
            name → array (bool, int32, uint64, float64; trailing shape (), (2,), (3,),
            (3, 3), (6,)), list of str, or :class:`Shoeboxes`. ``miller_index``
            (int, (n, 3)) becomes ``cctbx::miller::index<>``.
        identifiers : dict, optional
        types : dict, optional
            Explicit type names for some columns.
        """
        types = dict(types or {})
        cols = {}
        n = None
        for name, col in columns.items():
            if isinstance(col, Shoeboxes):
                types.setdefault(name, "Shoebox<>")
            elif isinstance(col, list) and (not col or isinstance(col[0], str)):
                types.setdefault(name, "std::string")
            else:
                col = np.asarray(col)
                if name not in types:
                    kind = _TYPE_OF_DTYPE.get(col.dtype.kind)
                    shape = col.shape[1:]
                    if kind is None:
                        raise InputError(f"column {name}: dtype {col.dtype} has no DIALS type")
                    if shape == ():
                        types[name] = kind
                    elif kind == "double" and shape in ((2,), (3,), (3, 3)):
                        types[name] = {(2,): "vec2<double>", (3,): "vec3<double>",
                                       (3, 3): "mat3<double>"}[shape]
                    elif kind in ("int", "std::size_t") and shape == (6,):
                        types[name] = "int6"
                    elif kind in ("int", "std::size_t") and shape == (3,):
                        types[name] = "cctbx::miller::index<>"
                    else:
                        raise InputError(f"column {name}: shape {col.shape} has no DIALS type")
                dtype, shape = _FIXED[types[name]]
                col = col.astype(bool if types[name] == "bool" else dtype)
            cols[name] = col
            if n is None:
                n = len(col)
            elif len(col) != n:
                raise InputError(f"column {name}: {len(col)} rows, expected {n}")
        return cls(cols, types, dict(identifiers or {}))


# --------------------------------------------------------------------------- reading

def _decode_shoeboxes(blob, n, where):
    """Decode the binary payload of a ``Shoebox<>`` column (see module docstring)."""
    mv = memoryview(blob)
    pos = 0
    panel = np.zeros(n, dtype=np.int64)
    bbox = np.zeros((n, 6), dtype=np.int32)
    data, mask, background = [], [], []
    head = struct.Struct("<I6iB")
    for i in range(n):
        if pos + head.size > len(mv):
            raise InputError(f"{where}: shoebox column is truncated at row {i}")
        p, x0, x1, y0, y1, z0, z1, present = head.unpack_from(mv, pos)
        pos += head.size
        panel[i] = p
        bbox[i] = (x0, x1, y0, y1, z0, z1)
        if x1 < x0 or y1 < y0 or z1 < z0:
            raise InputError(f"{where}: shoebox {i} has an inverted bounding box {bbox[i].tolist()}")
        if present == 0:
            data.append(None)
            mask.append(None)
            background.append(None)
            continue
        if present not in (1, 2):
            raise InputError(f"{where}: shoebox {i} has unknown data marker {present} (expected 0, 1 or 2)")
        shape = (z1 - z0, y1 - y0, x1 - x0)
        m = shape[0] * shape[1] * shape[2]
        mask_dtype = np.dtype("<i4") if present == 1 else np.dtype("u1")
        need = m * (4 + mask_dtype.itemsize + 4)
        if pos + need > len(mv):
            raise InputError(f"{where}: shoebox column is truncated at row {i}")
        d = np.frombuffer(mv, dtype="<f4", count=m, offset=pos).reshape(shape)
        pos += 4 * m
        k = np.frombuffer(mv, dtype=mask_dtype, count=m, offset=pos).reshape(shape).astype(np.int32)
        pos += mask_dtype.itemsize * m
        b = np.frombuffer(mv, dtype="<f4", count=m, offset=pos).reshape(shape)
        pos += 4 * m
        data.append(d.astype(np.float32))
        mask.append(k)
        background.append(b.astype(np.float32))
    if pos != len(mv):
        raise InputError(f"{where}: shoebox column has {len(mv) - pos} bytes left over after {n} rows")
    return Shoeboxes(panel, bbox, data, mask, background)


def _decode_column(name, value, nrows, where):
    w = f"{where}: column '{name}'"
    if not isinstance(value, (list, tuple)) or len(value) != 2 or not isinstance(value[0], str):
        raise InputError(f"{w}: not a [type, data] pair")
    tname, payload = value
    if not isinstance(payload, (list, tuple)) or len(payload) != 2 or not isinstance(payload[0], int):
        raise InputError(f"{w}: data is not a [size, values] pair")
    n, blob = payload
    if n != nrows:
        raise InputError(f"{w}: {n} rows, but the table has nrows={nrows}")
    if tname in _FIXED:
        dtype, shape = _FIXED[tname]
        if not isinstance(blob, (bytes, bytearray)):
            raise InputError(f"{w}: values are not binary")
        size = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
        if len(blob) != n * size:
            raise InputError(f"{w}: {len(blob)} bytes for {n} values of {tname} ({size} bytes each)")
        arr = np.frombuffer(blob, dtype=dtype).reshape((n, *shape)).copy()
        return (arr.astype(bool) if tname == "bool" else arr), tname
    if tname == "Shoebox<>":
        if not isinstance(blob, (bytes, bytearray)):
            raise InputError(f"{w}: values are not binary")
        return _decode_shoeboxes(blob, n, w), tname
    if tname == "std::string":
        if not isinstance(blob, (list, tuple)) or not all(isinstance(s, str) for s in blob) \
                or len(blob) != n:
            raise InputError(f"{w}: std::string values are not an array of {n} strings")
        return list(blob), tname
    raise InputError(f"{w}: unknown column type '{tname}' (supported: "
                     f"{', '.join(list(_FIXED) + ['Shoebox<>', 'std::string'])})")


def read_refl(path):
    """Read a DIALS msgpack reflection table.

    Parameters
    ----------
    path : str or Path
        ``.refl`` file.

    Returns
    -------
    ReflectionTable

    Raises
    ------
    InputError
        Pickle-format or non-msgpack file, truncated file, unknown column type,
        inconsistent sizes; one line naming the file.
    """
    import msgpack
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not raw:
        raise InputError(f"{path}: empty file, not a DIALS reflection table")
    if raw[:1] == b"\x80" or raw[:2] in (b"(d", b"(l", b"}q", b"]q", b"cc", b"(i"):
        raise InputError(f"{path}: old pickle-format reflection table; pickles are never loaded "
                         f"(they can run code) - re-save it as msgpack with a current DIALS "
                         f"(e.g. dials.python -c \"from dials.array_family import flex; "
                         f"flex.reflection_table.from_file('in.refl').as_file('out.refl')\")")
    if raw[:1] != b"\x93":
        raise InputError(f"{path}: not a DIALS msgpack reflection table (no msgpack header)")
    try:
        obj = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        kind = "truncated or damaged" if "incomplete" in str(exc).lower() else "damaged"
        raise InputError(f"{path}: {kind} msgpack reflection table ({exc})") from None
    if not isinstance(obj, (list, tuple)) or len(obj) != 3 or obj[0] != _MAGIC:
        raise InputError(f"{path}: not a DIALS reflection table (no '{_MAGIC}' header)")
    version, header = obj[1], obj[2]
    if version not in (1, 2):
        raise InputError(f"{path}: reflection table version {version} (supported: 1, 2)")
    if not isinstance(header, dict) or "nrows" not in header or "data" not in header:
        raise InputError(f"{path}: reflection table header lacks 'nrows' or 'data'")
    unknown = set(header) - {"nrows", "data", "identifiers"}
    if unknown:
        raise InputError(f"{path}: unknown key(s) {sorted(unknown)} in the reflection table header")
    nrows = header["nrows"]
    if not isinstance(nrows, int) or nrows < 0:
        raise InputError(f"{path}: bad nrows {nrows!r}")
    ids = header.get("identifiers") or {}
    if not isinstance(ids, dict):
        raise InputError(f"{path}: identifiers are not a map")
    identifiers = {}
    for k, v in ids.items():
        if not isinstance(k, int) or not isinstance(v, str):
            raise InputError(f"{path}: identifiers must map integers to strings")
        identifiers[k] = v
    data = header["data"]
    if not isinstance(data, dict):
        raise InputError(f"{path}: table data is not a map of columns")
    columns, types = {}, {}
    for name, value in data.items():
        columns[name], types[name] = _decode_column(str(name), value, nrows, str(path))
    return ReflectionTable(columns, types, identifiers, str(path))


# --------------------------------------------------------------------------- writing

def _encode_shoeboxes(sb, version):
    out = bytearray()
    head = struct.Struct("<I6iB")
    for i in range(len(sb)):
        x0, x1, y0, y1, z0, z1 = (int(v) for v in sb.bbox[i])
        d = sb.data[i]
        if d is None:
            out += head.pack(int(sb.panel[i]), x0, x1, y0, y1, z0, z1, 0)
            continue
        shape = (z1 - z0, y1 - y0, x1 - x0)
        arrays = [np.asarray(sb.data[i], dtype="<f4"), np.asarray(sb.mask[i]),
                  np.asarray(sb.background[i], dtype="<f4")]
        for a in arrays:
            if a.shape != shape:
                raise InputError(f"shoebox {i}: array shape {a.shape} does not match bbox {shape}")
        marker = 1 if version == 1 else 2
        out += head.pack(int(sb.panel[i]), x0, x1, y0, y1, z0, z1, marker)
        out += np.ascontiguousarray(arrays[0]).tobytes()
        out += np.ascontiguousarray(arrays[1], dtype="<i4" if version == 1 else "u1").tobytes()
        out += np.ascontiguousarray(arrays[2]).tobytes()
    return bytes(out)


def pack_refl(table, version=1):
    """The msgpack bytes of a reflection table (see :func:`write_refl`)."""
    import msgpack
    if version not in (1, 2):
        raise InputError(f"reflection table version {version}: only 1 and 2 exist")
    n = table.nrows
    data = {}
    for name, col in table.columns.items():
        tname = table.types[name]
        if tname == "Shoebox<>":
            payload = _encode_shoeboxes(col, version)
        elif tname == "std::string":
            payload = list(col)
        else:
            dtype, shape = _FIXED[tname]
            payload = np.ascontiguousarray(np.asarray(col).astype(dtype)).tobytes()
        data[name] = [tname, [n, payload]]
    obj = [_MAGIC, version, {"identifiers": {int(k): str(v) for k, v in table.identifiers.items()},
                             "nrows": n, "data": data}]
    return msgpack.packb(obj, use_bin_type=True)


def write_refl(path, table, version=1, overwrite=False):
    """Write a reflection table in DIALS' msgpack layout (tests and exports).

    Parameters
    ----------
    path : str or Path
    table : ReflectionTable
    version : int
        1 (shoebox masks as int32, as DIALS ≤ 3.x writes) or 2 (uint8 masks).
    overwrite : bool
        Replace an existing file.
    """
    from spread_tools.io.h5io import atomic_output
    blob = pack_refl(table, version)
    with atomic_output(path, overwrite) as tmp:
        Path(tmp).write_bytes(blob)
