"""The README's key table documents every plugin key and every value of the enumerated ones, and
names no plugin-prefixed key the plugin does not read."""

import re
from pathlib import Path

from cim_plugin.config import BILEVEL_MODES, MASK_SOURCES, PLUGIN_KEYS, PLUGIN_PREFIXES

README = Path(__file__).resolve().parent.parent / "README.md"


def key_table() -> str:
    text = README.read_text()
    return text[text.index("### Keys"):text.index("### LUCIR")]


def test_every_plugin_key_and_value_is_in_the_readme_table():
    table = key_table()
    assert [k for k in PLUGIN_KEYS if f"`{k}`" not in table] == []
    assert [m for m in (*MASK_SOURCES, *BILEVEL_MODES) if f'`"{m}"`' not in table] == []


def test_the_readme_table_names_no_unknown_plugin_key():
    named = set(re.findall(r"`((?:%s)[a-z_]+)`" % "|".join(PLUGIN_PREFIXES), key_table()))
    assert sorted(named - set(PLUGIN_KEYS)) == []
