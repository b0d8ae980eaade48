"""Settings help comes from one place (settings_help.HELP): the dashboard and README agree."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

from luna_daemon import settings
from luna_daemon.settings import Settings
from luna_daemon.settings_help import HELP, help_text, settings_table
from luna_daemon.web import settings_io

README = Path(__file__).resolve().parents[1] / "README.md"
REGEN = "python -c \"from luna_daemon.settings_help import settings_table; print(settings_table(), end='')\""


def test_every_setting_has_help():
    keys = [f.name for f in fields(Settings) if f.name not in settings._INTERNAL]
    assert sorted(keys) == sorted(HELP), "add a HELP entry for each new setting (and drop old ones)"
    for key in keys:
        assert help_text(key).strip(), key
        assert "`" not in help_text(key) and "](" not in help_text(key), "help_text is plain text"


def test_readme_settings_table_is_the_help_table():
    text = README.read_text(encoding="utf-8")
    m = re.search(r"<!-- settings-table:[^\n]*-->\n(.*?)<!-- /settings-table -->", text, re.DOTALL)
    assert m, "README.md lost its settings-table markers"
    assert m.group(1) == settings_table(), f"README's settings table differs from settings_help.HELP; regenerate it with {REGEN}"


def test_dashboard_settings_fields_carry_the_same_help(make_settings):
    desc = settings_io.describe(make_settings(), ["cpu"])
    assert set(desc["fields"]) == set(settings_io.EDITABLE) | set(settings_io.READ_ONLY)
    for key, f in desc["fields"].items():
        assert f["help"] == help_text(key) != "", key
