"""Reference pages generated from the schema and the CLI: `python -m builder.docgen` rewrites
them, and `tests/test_docs.py` fails when the committed pages are stale."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path
from typing import Any

from . import resources

PAGES = {
    "docs/reference/preset-fields.md": "preset_fields",
    "docs/reference/cli.md": "cli",
}


def _type(prop: dict[str, Any]) -> str:
    if "enum" in prop:
        return " \\| ".join(f"`{json.dumps(v) if v is None else v}`" for v in prop["enum"])
    if "oneOf" in prop:
        return " or ".join(_type(p) for p in prop["oneOf"])
    t = prop.get("type", "")
    t = " or ".join(t) if isinstance(t, list) else t
    if t == "array" and "items" in prop:
        return f"list of {_type(prop['items'])}"
    bounds = [f"{k} {prop[k]}" for k in ("minimum", "exclusiveMinimum", "maximum") if k in prop]
    return t + (f" ({', '.join(bounds)})" if bounds else "")


def _flow(value: Any) -> str:
    """A value as YAML flow style writes it: `[sm_80, sm_90]`."""
    return f"[{', '.join(map(str, value))}]" if isinstance(value, list) else str(value)


def _rows(props: dict[str, Any], prefix: str) -> list[str]:
    rows = []
    for name, prop in props.items():
        default = f"`{json.dumps(prop['default'])}`" if "default" in prop else "(see meaning)"
        rows.append(
            f"| `{prefix}{name}` | {_type(prop)} | {default} | {prop.get('description', '')} |"
        )
    return rows


def preset_fields() -> str:
    from .preset import schema as preset_schema

    schema = preset_schema()
    out = [
        "# Preset fields",
        "",
        "Generated from `schemas/preset.schema.json` by `python -m builder.docgen`; do not edit.",
        "Block and activation choices list the built-in blocks; plugins add to them.",
        "",
    ]
    props = schema["properties"]
    top = {k: v for k, v in props.items() if v.get("type") != "object"}
    out += ["## Top level", "", "| field | type | default | meaning |", "|---|---|---|---|"]
    out += _rows(top, "")
    for section in ("model", "blocks", "weights", "preprocess"):
        out += ["", f"## {section}", "", props[section]["description"], ""]
        out += ["| field | type | default | meaning |", "|---|---|---|---|"]
        out += _rows(props[section]["properties"], f"{section}.")
        if section == "model":
            out += _family_sections()
    target = next(b for b in props["targets"]["items"]["oneOf"] if b["type"] == "object")
    out += ["", "## targets", "", props["targets"]["description"], ""]
    from .config import KNOWN_TARGETS

    out += ["A bare name expands to its entry:", ""]
    for name, entry in KNOWN_TARGETS.items():
        fields = ", ".join(f"{k}: {_flow(v)}" for k, v in entry.items())
        out.append(f"- `{name}` is `{{{fields}}}`")
    out.append("")
    out += ["| field | type | default | meaning |", "|---|---|---|---|"]
    out += _rows(target["properties"], "targets[].")
    return "\n".join(out) + "\n"


def _family_sections() -> list[str]:
    """Each family's own model fields (`schemas/families/FAMILY.json`) and default blocks."""
    from . import families, registry

    out = []
    for family in families.all_families():
        own = json.loads(resources.family_schema_path(family.name).read_text())
        if "hidden_act" in own["properties"]:
            own["properties"]["hidden_act"]["enum"] = registry.names("activation")
        blocks = family.default_blocks(family.config())
        changed = ", ".join(f"`{slot}: {name}`" for slot, name in blocks.items())
        out += ["", f"### model, family `{family.name}`", "", own["description"], ""]
        out += [f"Blocks other than the defaults below: {changed or 'none'}.", ""]
        if "extends" in own:
            out.append(f"The fields of family `{own['extends']}`, and:")
            out.append("")
        out += ["| field | type | default | meaning |", "|---|---|---|---|"]
        out += _rows(own["properties"], "model.")
    return out


def cli() -> str:
    from .cli import COMMANDS, _parser

    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal: fix the width
    out = [
        "# CLI reference",
        "",
        "Generated from `build --help` by `python -m builder.docgen`.",
        "",
    ]
    for args in [["--help"]] + [[c, "--help"] for c in COMMANDS]:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
            _parser().parse_args(args)
        out += [f"## build {' '.join(args)}", "", "```", buf.getvalue().rstrip(), "```", ""]
    return "\n".join(out)


def render(page: str) -> str:
    return globals()[PAGES[page]]()


def main(root: Path) -> None:
    for page in PAGES:
        path = root / page
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render(page))
        print(path)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path.cwd())
