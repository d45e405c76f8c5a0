"""The README's configuration table stays in step with GuardConfig."""

from __future__ import annotations

import re
from pathlib import Path

from inference_safeguard import GuardConfig

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_starts_with_the_demo_and_test_commands():
    first_block = README.read_text().split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in first_block.strip().splitlines()]
    assert commands == ["make demo", "make test"]


def test_readme_config_table_lists_every_field_with_its_default():
    rows = {
        match[1]: match[2]
        for match in re.finditer(r"^\| `(\w+)` \| `([^`]*)` \|", README.read_text(), re.M)
    }
    defaults = GuardConfig()
    assert set(rows) == set(GuardConfig.model_fields)
    for name, shown in rows.items():
        value = getattr(defaults, name)
        expected = f'"{value}"' if isinstance(value, str) else repr(value)
        assert shown == expected, name
