"""Hierarchical parameters: defaults with help and units, a TOML file, key=value words.

A *schema* is a nested ``dict`` whose leaves are :class:`P` objects::

    SCHEMA = {
        "restraints": {
            "fp": {"mean": P(0.0, "mean adjacent-point difference", units="e-", optional=True),
                   "sigma": P(0.04, "sigma of the difference", units="e-")},
        },
        "d_min": P(2.5, "high-resolution limit", units="Å"),
    }

:func:`resolve` applies, in order, the defaults, a TOML file, then
cctbx-style ``key=value`` words (``restraints.fp.sigma=0.04``,
``restraints.fdp.mean=None``). A word may use any unique tail of a dotted
name (``fp.sigma=0.04``). Unknown keys and values of the wrong type raise
:class:`~spread_tools.errors.InputError` naming the key.
"""

import difflib
import json
import tomllib
from pathlib import Path

from spread_tools.errors import InputError

_NONE_WORDS = {"none", "null"}
_TRUE_WORDS = {"true", "yes", "on", "1"}
_FALSE_WORDS = {"false", "no", "off", "0"}


class P:
    """One parameter: default value, help text, units, type.

    Parameters
    ----------
    default : object
        Default value (``None`` requires ``type``).
    help : str
        One-line description.
    units : str, optional
        Physical units shown in help, e.g. ``"eV"``, ``"Å"``, ``"e-"``.
    type : type, optional
        One of ``float``, ``int``, ``bool``, ``str``, ``list``; inferred from
        ``default`` when omitted. Lists hold ``item_type`` values.
    item_type : type, optional
        Element type of a list (default ``str``, or that of the first default item).
    choices : sequence, optional
        Allowed values.
    optional : bool
        ``None`` is an allowed value (switches the feature off).
    """

    def __init__(self, default, help, units=None, type=None, item_type=None,
                 choices=None, optional=False):
        if type is None:
            if default is None:
                raise ValueError("P(None, ...) needs an explicit type")
            type = list if isinstance(default, (list, tuple)) else default.__class__
        if type is list and item_type is None:
            item_type = default[0].__class__ if default else str
        self.default = list(default) if isinstance(default, tuple) else default
        self.help = help
        self.units = units
        self.type = type
        self.item_type = item_type
        self.choices = tuple(choices) if choices else None
        self.optional = optional or default is None

    def describe(self):
        """Type, units and choices as a short string for help text."""
        kind = f"list of {self.item_type.__name__}" if self.type is list else self.type.__name__
        bits = [kind]
        if self.units:
            bits.append(self.units)
        if self.choices:
            bits.append("one of " + "|".join(map(str, self.choices)))
        if self.optional:
            bits.append("None switches off")
        return ", ".join(bits)

    def coerce(self, key, value, from_text):
        """Convert ``value`` to this parameter's type or raise InputError naming ``key``."""
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS):
            if self.optional:
                return None
            raise InputError(f"parameter {key}: None is not allowed here")
        if self.type is list:
            if from_text:
                text = str(value).strip()
                if text.startswith("["):
                    try:
                        value = tomllib.loads(f"x = {text}")["x"]
                    except tomllib.TOMLDecodeError:
                        raise InputError(f"parameter {key}: cannot read list {text!r}") from None
                else:
                    value = [v.strip() for v in text.split(",") if v.strip()]
            if not isinstance(value, list):
                raise InputError(f"parameter {key}: expected a list, got {value!r}")
            return [self._scalar(key, self.item_type, v, from_text) for v in value]
        return self._scalar(key, self.type, value, from_text)

    def _scalar(self, key, kind, value, from_text):
        try:
            if kind is bool:
                if isinstance(value, bool):
                    out = value
                elif from_text and str(value).strip().lower() in _TRUE_WORDS:
                    out = True
                elif from_text and str(value).strip().lower() in _FALSE_WORDS:
                    out = False
                else:
                    raise ValueError
            elif kind is float:
                if isinstance(value, bool):
                    raise ValueError
                out = float(value)
            elif kind is int:
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError
                if from_text:
                    value = str(value).strip()
                out = int(value)
            elif kind is str:
                if not from_text and not isinstance(value, str):
                    raise ValueError
                out = str(value)
            else:
                raise ValueError
        except ValueError:
            raise InputError(f"parameter {key}: expected {kind.__name__}, got {value!r}") from None
        if self.choices and out not in self.choices:
            raise InputError(f"parameter {key}: {out!r} is not one of {', '.join(map(str, self.choices))}")
        return out


def _flatten(schema, prefix=""):
    out = {}
    for name, node in schema.items():
        key = f"{prefix}{name}"
        if isinstance(node, P):
            out[key] = node
        elif isinstance(node, dict):
            out.update(_flatten(node, key + "."))
        else:
            raise TypeError(f"schema entry {key} is neither P nor dict")
    return out


class Config:
    """Resolved parameter values, read with attributes: ``cfg.restraints.fp.sigma``."""

    def __init__(self, values, schema):
        object.__setattr__(self, "_values", values)
        object.__setattr__(self, "_schema", schema)

    def __getattr__(self, name):
        values = object.__getattribute__(self, "_values")
        if name not in values:
            raise AttributeError(name)
        value = values[name]
        if isinstance(value, dict):
            return Config(value, self._schema[name])
        return value

    def __getitem__(self, dotted):
        node = self
        for part in dotted.split("."):
            node = getattr(node, part)
        return node

    def __setattr__(self, name, value):
        raise AttributeError("Config is read-only; use resolve() with overrides")

    def to_dict(self):
        """Nested plain-dict copy of the values."""
        return json.loads(json.dumps(self._values))

    def to_json(self):
        """JSON text of the values (stored in every output file)."""
        return json.dumps(self._values, sort_keys=True)

    def flat(self):
        """Dictionary of dotted key -> value."""
        out = {}

        def walk(d, prefix):
            for k, v in d.items():
                if isinstance(v, dict):
                    walk(v, f"{prefix}{k}.")
                else:
                    out[f"{prefix}{k}"] = v
        walk(self._values, "")
        return out

    def to_toml(self, with_help=True):
        """TOML text of the values, readable back with ``resolve(schema, toml_path=...)``.

        ``None`` values (switched-off features) are written as the string ``"None"``.
        """
        lines = []

        def fmt(v):
            if isinstance(v, bool):
                return "true" if v else "false"
            if isinstance(v, str):
                return json.dumps(v, ensure_ascii=False)
            if isinstance(v, list):
                return "[" + ", ".join(fmt(x) for x in v) + "]"
            return repr(v)

        def walk(values, schema, prefix):
            leaves = [(k, v) for k, v in values.items() if not isinstance(v, dict)]
            tables = [(k, v) for k, v in values.items() if isinstance(v, dict)]
            if leaves and prefix:
                lines.append(f"\n[{prefix}]")
            for k, v in leaves:
                p = schema[k]
                if with_help:
                    lines.append(f"# {p.help} ({p.describe()})")
                lines.append(f'{k} = "None"' if v is None else f"{k} = {fmt(v)}")
            for k, v in tables:
                walk(v, schema[k], f"{prefix}.{k}" if prefix else k)
        walk(self._values, self._schema, "")
        return "\n".join(lines).lstrip("\n") + "\n"


def _nest(flat_values):
    out = {}
    for key, value in flat_values.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def _find_key(word_key, params, source):
    if word_key in params:
        return word_key
    tails = [k for k in params if k.endswith("." + word_key)]
    if len(tails) == 1:
        return tails[0]
    if len(tails) > 1:
        raise InputError(f"{source}: parameter {word_key} is ambiguous: {', '.join(sorted(tails))}")
    close = difflib.get_close_matches(word_key, list(params), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise InputError(f"{source}: unknown parameter {word_key}{hint}")


def resolve(schema, toml_path=None, overrides=(), toml_text=None, presets=None):
    """Build the effective configuration.

    Parameters
    ----------
    schema : dict
        Nested dict of :class:`P` leaves.
    toml_path : str or Path, optional
        TOML file with values for some parameters.
    overrides : sequence of str
        ``key=value`` words, applied after the file.
    toml_text : str, optional
        TOML content given directly (e.g. a configuration stored in a checkpoint).
    presets : dict, optional
        Name → {dotted key: value}: named sets of defaults, chosen with the schema's
        ``preset`` parameter (from the words, else the file, else its default). A preset
        replaces the defaults it names; the file and the words still win over it.

    Returns
    -------
    Config

    Raises
    ------
    InputError
        Unreadable TOML, unknown keys, values of the wrong type.
    """
    params = _flatten(schema)
    values = {k: p.default for k, p in params.items()}
    data = None
    if toml_path is not None:
        path = Path(toml_path)
        if not path.is_file():
            raise InputError(f"{path}: no such configuration file")
        try:
            toml_text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"{path}: cannot read ({exc})") from None
        source = str(path)
    else:
        source = "configuration"
    if toml_text is not None:
        try:
            data = tomllib.loads(toml_text)
        except tomllib.TOMLDecodeError as exc:
            raise InputError(f"{source}: not valid TOML ({exc})") from None
    if presets:
        _apply_preset(values, params, presets, data, overrides)
    if data is not None:

        def walk(d, prefix):
            for k, v in d.items():
                key = f"{prefix}{k}"
                if isinstance(v, dict) and key not in params:
                    walk(v, key + ".")
                    continue
                full = _find_key(key, params, source)
                values[full] = params[full].coerce(full, v, from_text=False)
        walk(data, "")
    for word in overrides:
        if "=" not in word:
            raise InputError(f"command line: expected key=value, got {word!r}")
        key, _, text = word.partition("=")
        full = _find_key(key.strip(), params, "command line")
        values[full] = params[full].coerce(full, text.strip(), from_text=True)
    return Config(_nest(values), schema)


def _apply_preset(values, params, presets, data, overrides):
    """Overlay the chosen preset's values on the defaults (in place)."""
    name = values.get("preset")
    if data is not None and "preset" in data:
        name = params["preset"].coerce("preset", data["preset"], from_text=False)
    for word in overrides:
        key, eq, text = word.partition("=")
        if eq and key.strip() == "preset":
            name = params["preset"].coerce("preset", text.strip(), from_text=True)
    if name not in presets:
        raise InputError(f"parameter preset: unknown preset {name!r} (one of {', '.join(presets)})")
    for key, value in presets[name].items():
        values[key] = params[key].coerce(key, value, from_text=False)


def help_table(schema):
    """Parameter list for ``--help``: one line per key with default, type and units.

    Parameters
    ----------
    schema : dict
        Nested dict of :class:`P` leaves.

    Returns
    -------
    str
    """
    rows = []
    for key, p in _flatten(schema).items():
        rows.append(f"{key}={p.default!s}  ({p.describe()}): {p.help}")
    return "\n".join(rows)
