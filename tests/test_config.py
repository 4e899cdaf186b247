"""Parameters: defaults, TOML, key=value words, errors naming the key."""

import pytest

from spread_tools.config import P, help_table, resolve
from spread_tools.errors import InputError

SCHEMA = {
    "restraints": {
        "fp": {"mean": P(0.0, "mean difference", units="e-", optional=True),
               "sigma": P(0.04, "sigma", units="e-")},
        "fdp": {"mean": P(0.03, "mean difference", units="e-", optional=True),
                "sigma": P(0.08, "sigma", units="e-")},
        "kramers_kronig": {"use": P(False, "switch KK on"), "pad": P(100.0, "pad", units="eV")},
    },
    "lattices": P(10, "number of lattices"),
    "sites": P(["FE1", "FE2"], "site names"),
    "method": P("auto", "route", choices=["auto", "direct", "fft"]),
}


def test_defaults_and_attribute_access():
    cfg = resolve(SCHEMA)
    assert cfg.restraints.fp.sigma == 0.04
    assert cfg["restraints.fdp.mean"] == 0.03
    assert cfg.sites == ["FE1", "FE2"]


def test_words_override_toml(tmp_path):
    toml = tmp_path / "p.toml"
    toml.write_text("lattices = 5\n[restraints.fp]\nsigma = 0.1\n")
    cfg = resolve(SCHEMA, toml_path=toml, overrides=["restraints.fp.sigma=0.2", "fdp.mean=None",
                                                     "kramers_kronig.use=true", "sites=FE1,FE2,FE3"])
    assert cfg.lattices == 5
    assert cfg.restraints.fp.sigma == 0.2
    assert cfg.restraints.fdp.mean is None
    assert cfg.restraints.kramers_kronig.use is True
    assert cfg.sites == ["FE1", "FE2", "FE3"]


def test_toml_round_trip(tmp_path):
    cfg = resolve(SCHEMA, overrides=["fdp.mean=None", "lattices=7", "method=fft"])
    text = cfg.to_toml()
    again = resolve(SCHEMA, toml_text=text)
    assert again.to_dict() == cfg.to_dict()
    assert 'mean = "None"' in text  # switched-off values stay visible


@pytest.mark.parametrize("word, fragment", [
    ("restraints.fp.sigmaa=1", "unknown parameter restraints.fp.sigmaa"),
    ("sigma=1", "ambiguous"),
    ("lattices=2.5", "parameter lattices: expected int"),
    ("restraints.fp.sigma=abc", "parameter restraints.fp.sigma: expected float"),
    ("restraints.fp.sigma=None", "None is not allowed"),
    ("method=gpu", "not one of"),
    ("lattices", "expected key=value"),
])
def test_bad_words_name_the_key(word, fragment):
    with pytest.raises(InputError, match=fragment):
        resolve(SCHEMA, overrides=[word])


def test_bad_toml_names_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("lattices = = 3\n")
    with pytest.raises(InputError, match="bad.toml: not valid TOML"):
        resolve(SCHEMA, toml_path=bad)
    wrong_type = tmp_path / "wt.toml"
    wrong_type.write_text('lattices = "many"\n')
    with pytest.raises(InputError, match="parameter lattices"):
        resolve(SCHEMA, toml_path=wrong_type)
    with pytest.raises(InputError, match="no such configuration file"):
        resolve(SCHEMA, toml_path=tmp_path / "missing.toml")


def test_help_table_lists_units():
    text = help_table(SCHEMA)
    assert "restraints.kramers_kronig.pad=100.0" in text and "eV" in text
