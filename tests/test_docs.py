"""Docs that a test keeps true."""

from __future__ import annotations

import json
import re

import pytest

from builder import docgen, registry, resources

from .conftest import REPO

pytestmark = pytest.mark.unit

README = (REPO / "README.md").read_text()


def test_readme_starts_with_the_two_commands():
    block = re.search(r"```\n(.*?)```", README, re.S).group(1).splitlines()
    assert block == [
        "pip install . && build presets/llava-clip.yaml",
        "pip install '.[test]' && pytest",
    ]


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert "pip install '.[test]' && pytest" in ci


@pytest.mark.parametrize("page", sorted(docgen.PAGES))
def test_generated_reference_is_current(page):
    assert (REPO / page).read_text() == docgen.render(page), (
        f"{page} is stale: run `python -m builder.docgen`"
    )


def test_every_schema_field_has_a_description():
    def walk(node, path):
        if isinstance(node, dict):
            for name, prop in node.get("properties", {}).items():
                assert prop.get("description"), f"{path}.{name} has no description"
            for key, value in node.items():
                walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for item in node:
                walk(item, path)

    walk(json.loads(resources.schema_path().read_text()), "$")


def test_every_block_is_documented():
    table = (REPO / "docs" / "blocks.md").read_text()
    for block in registry.all_blocks():
        assert f"| `{block.name}` | {block.kind} |" in table, block.name
