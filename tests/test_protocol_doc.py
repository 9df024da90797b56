"""docs/protocol.md and the namespaces agree: every command and every channel is documented."""

from __future__ import annotations

import re
from pathlib import Path

import handlers

DOC = (Path(__file__).parent.parent / "docs" / "protocol.md").read_text()


def commands(namespace_class) -> set[str]:
    return {name[3:] for name in dir(namespace_class)
            if name.startswith("on_") and hasattr(getattr(namespace_class, name), "__hub_command__")}


def test_every_command_is_documented():
    for namespace_class in handlers.NAMESPACES:
        missing = sorted(c for c in commands(namespace_class) if f"`{c}`" not in DOC)
        assert not missing, f"{namespace_class.name}: undocumented commands {missing}"


def test_the_channel_table_matches_the_rules():
    documented = set(re.findall(r"^\| `(/[a-z]+)` \| `([^`]+)` \|", DOC, flags=re.MULTILINE))
    declared = {(ns.name, rule.pattern) for ns in handlers.NAMESPACES for rule in ns.channels}
    assert documented == declared
