"""The README's key table against the one definition of the plugin's keys (config.py): a row per
plugin key showing its default, every value of the enumerated keys, no key the plugin does not read,
and the table as a whole is ``config.key_table_markdown()``."""

import json
import re
from pathlib import Path

from cim_plugin.config import (
    BILEVEL_MODES,
    MASK_SOURCES,
    MODULE_HPARAM_KEYS,
    PLUGIN_FIELDS,
    PLUGIN_KEYS,
    PLUGIN_PREFIXES,
    key_table_markdown,
)

README = Path(__file__).resolve().parent.parent / "README.md"


def key_section() -> str:
    text = README.read_text()
    return text[text.index("### Keys"):text.index("### LUCIR")]


def table_lines() -> list[str]:
    return [line for line in key_section().splitlines() if line.startswith("|")]


def default_cells() -> dict[str, str]:
    """The default cell of the row of each key the table names in its first column."""
    cells = {}
    for line in table_lines()[2:]:
        names, default = (c.strip() for c in line.strip("|").split("|")[:2])
        cells.update({name: default for name in re.findall(r"`(\w+)`", names)})
    return cells


def test_every_plugin_key_has_a_row_showing_its_default():
    cells = default_cells()
    assert [f.name for f in PLUGIN_FIELDS if f.name not in cells] == []
    for f in PLUGIN_FIELDS:
        shown = f.metadata["shown"] or ("–" if f.default is None else f"`{json.dumps(f.default)}`")
        assert cells[f.name] == shown, f.name


def test_every_value_of_the_enumerated_keys_is_in_the_table():
    assert [m for m in (*MASK_SOURCES, *BILEVEL_MODES) if f'`"{m}"`' not in key_section()] == []


def test_the_table_names_no_key_the_plugin_does_not_read():
    assert sorted(set(default_cells()) - set(PLUGIN_KEYS) - set(MODULE_HPARAM_KEYS)) == []
    named = set(re.findall(r"`((?:%s)[a-z_]+)`" % "|".join(PLUGIN_PREFIXES), key_section()))
    assert sorted(named - set(PLUGIN_KEYS)) == []


def test_the_table_is_the_one_the_definitions_give():
    assert "\n".join(table_lines()) + "\n" == key_table_markdown()
