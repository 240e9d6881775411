"""lexicon.toml: the loaded tables have the shapes the module declares, no duplicates, and a bad file fails clearly."""

from __future__ import annotations

import collections
import dataclasses
import typing
from pathlib import Path

import pytest

from dischargesum.data import lexicon
from dischargesum.data.lexicon import Lab, LexiconError, Medication, Vital, load_lexicon

pytestmark = pytest.mark.unit

TABLES = [f.name for f in dataclasses.fields(lexicon.Lexicon)]

# Known repeats of a first column (kept as they are today): two rows for one drug.
_REPEATED_KEYS = {"shorthand_medications": {"piperacillin-tazobactam"}}


def _assert_shape(value: object, hint: object, where: str) -> None:
    """``value`` is exactly of type ``hint``: tuples (never lists) at every depth, records, scalar types."""
    if hint is str:
        assert type(value) is str, where
    elif hint is int:
        assert type(value) is int, where
    elif hint is float:  # a float column holds floats and integers (Lab.low / high), as the tables always did
        assert type(value) in (int, float), where
    elif hint in (Medication, Lab, Vital):
        assert type(value) is hint, where
        hints = typing.get_type_hints(hint)
        for field in dataclasses.fields(hint):
            _assert_shape(getattr(value, field.name), hints[field.name], f"{where}.{field.name}")
    else:
        assert typing.get_origin(hint) is tuple, where
        assert type(value) is tuple, where
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            for i, item in enumerate(value):
                _assert_shape(item, args[0], f"{where}[{i}]")
        else:
            assert len(value) == len(args), where
            for i, (item, arg) in enumerate(zip(value, args)):
                _assert_shape(item, arg, f"{where}[{i}]")


def test_module_constants_are_the_loaded_tables_with_their_declared_types():
    module_hints = typing.get_type_hints(lexicon)
    table_hints = typing.get_type_hints(lexicon.Lexicon)
    assert len(TABLES) == 24
    loaded = load_lexicon()
    for name in TABLES:
        value = getattr(lexicon, name.upper())
        assert value, name
        assert module_hints[name.upper()] == table_hints[name]
        _assert_shape(value, table_hints[name], name.upper())
        assert value == getattr(loaded, name)


def test_record_columns_keep_their_scalar_types():
    assert all(type(lab.decimals) is int for lab in lexicon.LABS)
    # Written as 125 / 2.9 in the TOML: integers stay integers, decimals stay floats.
    sodium = next(lab for lab in lexicon.LABS if lab.name == "sodium")
    tsh = next(lab for lab in lexicon.LABS if lab.name == "TSH")
    assert (type(sodium.low), type(sodium.high)) == (int, int)
    assert (tsh.low, tsh.high) == (0.1, 12.0) and type(tsh.high) is float
    assert next(med for med in lexicon.MEDICATIONS if med.name == "aspirin").brands == ()


@pytest.mark.parametrize("name", TABLES)
def test_no_duplicate_entries(name):
    table = getattr(lexicon, name.upper())
    assert len(set(table)) == len(table)
    keys = [
        entry.name if dataclasses.is_dataclass(entry) else entry[0] if isinstance(entry, tuple) else entry
        for entry in table
    ]
    repeated = {key for key, count in collections.Counter(keys).items() if count > 1}
    assert repeated == _REPEATED_KEYS.get(name, set())
    for entry in table:
        columns = dataclasses.astuple(entry) if dataclasses.is_dataclass(entry) else entry
        for column in columns if isinstance(columns, tuple) else ():
            if isinstance(column, tuple):
                assert len(set(column)) == len(column), (name, entry)


def _packaged_text() -> str:
    return (Path(lexicon.__file__).parent / "lexicon.toml").read_text(encoding="utf-8")


def test_packaged_file_loads_from_an_explicit_path(tmp_path):
    path = tmp_path / "lexicon.toml"
    path.write_text(_packaged_text(), encoding="utf-8")
    assert load_lexicon(path) == load_lexicon()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda text: text.replace("diagnoses = [", "diagnoses = [[", 1), "not valid TOML"),
        (
            lambda text: text.replace('["acute kidney injury", ["AKI"]]', '["acute kidney injury", "AKI"]', 1),
            "diagnoses[1]",
        ),
        (lambda text: text.replace('"sodium", aliases', '"sodium", alias', 1), "unknown columns ['alias']"),
        (lambda text: text.replace("decimals = 0 }", "decimals = 0.5 }", 1), "labs[0].decimals"),
        (lambda text: text.replace("finding_heads = [", "finding_head = [", 1), "unknown tables ['finding_head']"),
    ],
    ids=["syntax", "alias-not-an-array", "unknown-column", "float-for-int", "renamed-table"],
)
def test_malformed_file_raises_an_error_naming_the_file_and_the_problem(tmp_path, edit, message):
    text = _packaged_text()
    broken = edit(text)
    assert broken != text
    path = tmp_path / "lexicon.toml"
    path.write_text(broken, encoding="utf-8")
    with pytest.raises(LexiconError) as excinfo:
        load_lexicon(path)
    assert str(path) in str(excinfo.value)
    assert message in str(excinfo.value)


def test_missing_file_raises_an_error_naming_the_file(tmp_path):
    path = tmp_path / "absent.toml"
    with pytest.raises(LexiconError, match="lexicon file not found") as excinfo:
        load_lexicon(path)
    assert str(path) in str(excinfo.value)
