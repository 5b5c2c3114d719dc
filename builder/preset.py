"""Preset file -> raw dict (with YAML line numbers) -> overrides merged -> schema and semantic
checks -> `Preset`.

Every problem of a file is collected and reported at once, one line each, sorted by line:
`FILE:LINE: model.hidden_act: 'qgelu' is not one of ['gelu', 'gelu_tanh', 'quick_gelu']`.
A problem caused by a command-line override names the override instead of a line.
"""

from __future__ import annotations

import copy
import difflib
import functools
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from . import families, inherit, plugins, registry, resources, vlm
from .config import (
    COMMON_TARGET_FIELDS,
    KIND_FIELDS,
    NATIVE_RESIZES,
    PreprocessConfig,
    Preset,
    preset_from_dict,
)
from .errors import InputError

if TYPE_CHECKING:
    from jsonschema.exceptions import ValidationError

MAX_PRESET_BYTES = 1 << 20
# Bounds the walk over YAML nodes, so anchors and aliases cannot expand exponentially.
MAX_YAML_NODES = 20_000

Path_ = tuple[str | int, ...]


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml's parser where built
    """SafeLoader that also reads `1e-6` as a float, as YAML 1.2 and JSON do."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


@dataclass
class Override:
    """One `KEY=VALUE` from the command line, in OmegaConf dotlist grammar."""

    text: str
    path: Path_
    value: Any


@dataclass
class RawPreset:
    """A preset as read, before it becomes a `Preset`: the merged dict and where each part
    came from, so that errors can point at a line or at an override."""

    file: str
    data: dict[str, Any]
    lines: dict[Path_, int] = field(default_factory=dict)
    overrides: list[Override] = field(default_factory=list)
    # The file that set each value in `lines`, where it is not `file` (an `extends` parent).
    files: dict[Path_, str] = field(default_factory=dict)
    # The `extends` chain, root parent first, this file last.
    chain: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.chain = self.chain or [self.file]


def format_path(path: Iterable[str | int]) -> str:
    out = ""
    for part in path:
        if isinstance(part, str) and (not part.isprintable() or not part.strip()):
            out += f"[{part!r}]"  # a control character would break the line it is printed on
        elif isinstance(part, int) or not isinstance(part, str):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out or "(top level)"


# --- reading -------------------------------------------------------------------------------


def find_preset(arg: str) -> Path:
    """A preset argument is a path, or the name of a shipped preset (`llava-clip`)."""
    path = Path(arg)
    if path.is_file():
        return path
    shipped = resources.presets_dir() / f"{arg}.yaml"
    if "/" not in arg and not path.suffix and shipped.is_file():
        return shipped
    if path.exists():
        raise InputError(f"{arg}: not a file")
    known = sorted(p.stem for p in resources.presets_dir().glob("*.yaml"))
    hint = registry.close_matches(arg, known)
    raise InputError(f"{arg}: no such file or shipped preset{hint}; shipped presets: {known}")


def _line_map(node: yaml.Node, file: str) -> dict[Path_, int]:
    lines: dict[Path_, int] = {}
    count = 0
    errors: list[str] = []

    def walk(n: yaml.Node, path: Path_) -> None:
        nonlocal count
        count += 1
        if count > MAX_YAML_NODES:
            raise InputError(
                f"{file}:{n.start_mark.line + 1}: more than {MAX_YAML_NODES} YAML nodes "
                "(aliases expanding?); a preset is a few dozen lines"
            )
        lines.setdefault(path, n.start_mark.line + 1)
        if isinstance(n, yaml.MappingNode):
            seen: set[Any] = set()
            for key, value in n.value:
                if not isinstance(key, yaml.ScalarNode):  # `? [a]` or `? {a: b}`: unhashable
                    errors.append(
                        f"{file}:{key.start_mark.line + 1}: {format_path(path)}: a key must be "
                        "a plain name, not a list or a mapping"
                    )
                    continue
                k = key.value
                if k in seen:
                    errors.append(
                        f"{file}:{key.start_mark.line + 1}: {format_path(path + (k,))}: "
                        "duplicate key"
                    )
                seen.add(k)
                lines[path + (k,)] = key.start_mark.line + 1
                walk(value, path + (k,))
        elif isinstance(n, yaml.SequenceNode):
            for i, item in enumerate(n.value):
                walk(item, path + (i,))

    walk(node, ())
    if errors:
        raise InputError(errors)
    return lines


def read_preset(path: Path) -> RawPreset:
    """Read a preset file and the presets it `extends`, merged, keeping the file and line of
    every key."""
    return inherit.resolve(_read_file(path), _read_file)


def _read_file(path: Path) -> RawPreset:
    """Read one preset file into a dict, keeping the line of every key."""
    file = str(path)
    try:
        blob = path.read_bytes()
    except OSError as e:
        raise InputError(f"{file}: cannot read: {e.strerror}") from e
    if len(blob) > MAX_PRESET_BYTES:
        raise InputError(f"{file}: {len(blob)} bytes; a preset is at most {MAX_PRESET_BYTES}")
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{file}: not UTF-8 text (bad byte at offset {e.start})") from e
    if "\x00" in text:
        raise InputError(f"{file}: binary data (a NUL byte); a preset is YAML text")
    try:
        loader = _Loader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                raise InputError(
                    f"{file}:1: empty preset; expected a mapping such as 'model: {{...}}'"
                )
            lines = _line_map(node, file)
            data = loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 1
        problem = " ".join(str(x) for x in (e.context, e.problem) if x)
        raise InputError(f"{file}:{line}: invalid YAML: {problem}") from e
    except yaml.reader.ReaderError as e:
        line = text.count("\n", 0, e.position) + 1
        raise InputError(
            f"{file}:{line}: invalid YAML: character {e.character!r} is not allowed"
        ) from e
    except yaml.YAMLError as e:
        raise InputError(f"{file}: invalid YAML: {' '.join(str(e).split())}") from e
    if not isinstance(data, dict):
        raise InputError(
            f"{file}:1: (top level): expected a mapping of fields, got {type(data).__name__}"
        )
    return RawPreset(file, data, lines)


# --- overrides -----------------------------------------------------------------------------


def parse_override(text: str) -> Override:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise InputError(f"override {text!r}: expected KEY=VALUE, e.g. model.image_size=224")
    parts: list[str | int] = []
    for part in key.split("."):
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*|\d+", part):
            raise InputError(
                f"override {text!r}: {key!r} is not a dotted key like model.image_size"
            )
        parts.append(int(part) if part.isdigit() else part)
    from omegaconf import OmegaConf  # only where there are overrides: 0.05 s to import
    from omegaconf.errors import OmegaConfBaseException

    try:
        parsed = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={value}"]), resolve=False)["v"]
    except OmegaConfBaseException as e:
        raise InputError(f"override {text!r}: cannot parse the value: {e}") from e
    return Override(text, tuple(parts), parsed)


def apply_overrides(raw: RawPreset, overrides: Sequence[str]) -> RawPreset:
    """Merge `KEY=VALUE` overrides into the raw preset (a list value replaces the list)."""
    out = RawPreset(
        raw.file, copy.deepcopy(raw.data), raw.lines, list(raw.overrides), raw.files, raw.chain
    )
    errors = []
    for text in overrides:
        try:
            ov = parse_override(text)
        except InputError as e:
            errors.extend(e.lines)
            continue
        node: Any = out.data
        for i, part in enumerate(ov.path[:-1]):
            nxt = ov.path[i + 1]
            if isinstance(node, dict):
                if not isinstance(node.get(part), (dict, list)):
                    node[part] = {}
                node = node[part]
            elif isinstance(node, list) and isinstance(part, int) and part < len(node):
                node = node[part]
                if isinstance(nxt, str) and isinstance(node, str):
                    errors.append(
                        f"override {text!r}: {format_path(ov.path[: i + 1])} is {node!r}, "
                        "not a map; replace the whole entry instead"
                    )
                    break
            else:
                errors.append(f"override {text!r}: {format_path(ov.path[: i + 1])}: no such entry")
                break
        else:
            last = ov.path[-1]
            if isinstance(node, list):
                if not isinstance(last, int) or last >= len(node):
                    errors.append(f"override {text!r}: {format_path(ov.path)}: no such entry")
                    continue
            elif not isinstance(node, dict):
                errors.append(f"override {text!r}: {format_path(ov.path[:-1])} is not a map")
                continue
            node[last] = ov.value
            out.overrides.append(ov)
    if errors:
        raise InputError(errors)
    return out


# --- validation ----------------------------------------------------------------------------


def schema(family: str | None = families.DEFAULT) -> dict[str, Any]:
    """The preset schema for a family: the shared fields, the family's model fields
    (`schemas/families/FAMILY.json`), block and activation choices from the live registry (so
    that plugin blocks are accepted). With family None, `model` is any map (the family is
    unknown, so its fields are too)."""
    data = json.loads(resources.schema_path().read_text())
    _choices(data["properties"]["family"], families.names())
    model = data["properties"]["model"]["properties"]
    if family is None:
        data["properties"]["model"] = {"type": "object"}
    else:
        for name, prop in family_properties(family).items():
            model[name] = {**model.get(name, {}), **prop}
    if "hidden_act" in model:
        _choices(model["hidden_act"], registry.names("activation"))
    for slot, prop in data["properties"]["blocks"]["properties"].items():
        # A slot whose default is null (the projector) may stay empty.
        _choices(prop, registry.names(slot) + ([None] if prop.get("default", "") is None else []))
    return data


def _choices(prop: dict[str, Any], names: list[Any]) -> None:
    """The file's name pattern becomes the list of what is registered now."""
    prop.pop("pattern", None)
    prop["enum"] = names


def family_properties(family: str) -> dict[str, Any]:
    """The model fields of a family's schema file, after those of the family it `extends`."""
    own = json.loads(resources.family_schema_path(family).read_text())
    base = family_properties(own["extends"]) if "extends" in own else {}
    return {**base, **own["properties"]}


def _strict_integer(checker: Any, instance: Any) -> bool:
    # JSON Schema counts 1024.0 and 1e12 as integers; a float must never become a size.
    return isinstance(instance, int) and not isinstance(instance, bool)


@functools.cache
def _validator() -> Any:
    """JSON Schema 2020-12 with the strict integer; imported on first check, not by commands
    that only read presets (`build list`)."""
    import jsonschema

    return jsonschema.validators.extend(
        jsonschema.Draft202012Validator,
        type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
            "integer", _strict_integer
        ),
    )


def _non_finite(node: Any, path: Path_ = ()) -> list[tuple[Path_, str]]:
    # NaN passes every bound ('minimum', 'maximum') because it compares false.
    if isinstance(node, float) and not math.isfinite(node):
        return [(path, f"{node!r} is not a finite number")]
    if isinstance(node, dict):
        return [e for k, v in node.items() for e in _non_finite(v, path + (k,))]
    if isinstance(node, list):
        return [e for i, v in enumerate(node) for e in _non_finite(v, path + (i,))]
    return []


def _schema_errors(data: dict[str, Any]) -> list[tuple[Path_, str]]:
    found = [(path, msg, True) for path, msg in _non_finite(data)]
    family = data.get("family", families.DEFAULT)
    known = isinstance(family, str) and family in families.names()
    for err in _validator()(schema(family if known else None)).iter_errors(data):
        found.extend((path, msg, err.validator == "type") for path, msg in _describe(err))
    # A value of the wrong kind gets one line, not its bounds too ("1e12" is not an integer).
    typed = {path for path, _, is_type in found if is_type}
    out: list[tuple[Path_, str]] = []
    for path, msg, is_type in found:
        if path in typed and (not is_type or any(path == p for p, _ in out)):
            continue
        out.append((path, msg))
    return out


def _describe(err: ValidationError) -> list[tuple[Path_, str]]:
    path: Path_ = tuple(err.absolute_path)
    if err.validator in ("oneOf", "anyOf") and err.context:
        # Explain the branches of the instance's own type ("'cuda' is not one of ['llvm']"
        # rather than "'cuda' is not of type 'object'"), with every error they hold.
        wrong_type = {e.schema_path[0] for e in err.context if list(e.schema_path)[1:] == ["type"]}
        fitting = [e for e in err.context if e.schema_path[0] not in wrong_type]
        if fitting:
            return [found for e in fitting for found in _describe(e)]
        from jsonschema.exceptions import best_match

        return _describe(best_match(err.context))
    if err.validator == "additionalProperties":
        allowed = sorted(err.schema.get("properties", {}))
        out = []
        for key in sorted(set(err.instance) - set(allowed), key=str):
            near = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
            hint = f", did you mean {format_path(path + (near[0],))!r}?" if near else ""
            out.append((path + (key,), f"unknown key{hint or f'; allowed: {allowed}'}"))
        return out
    if (
        err.validator == "type"
        and isinstance(err.instance, float)
        and "integer" in str(err.validator_value)
    ):
        return [(path, f"{err.instance!r} is not an integer (write it without '.' or 'e')")]
    if err.validator == "enum":
        hint = registry.close_matches(str(err.instance), [str(x) for x in err.validator_value])
        return [(path, f"{err.instance!r} is not one of {err.validator_value}{hint}")]
    return [(path, err.message)]


def _semantic_errors(data: dict[str, Any]) -> list[tuple[Path_, str]]:
    """Checks the schema cannot express; run on schema-valid data only."""
    preset = preset_from_dict(data)
    m = preset.model
    found: list[tuple[Path_, str]] = []
    if m.hidden_size % m.num_attention_heads:
        found.append(
            (
                ("model", "hidden_size"),
                f"{m.hidden_size} is not divisible by model.num_attention_heads "
                f"({m.num_attention_heads})",
            )
        )
    if m.patch_size > m.image_size:
        found.append(
            (
                ("model", "patch_size"),
                f"{m.patch_size} is larger than model.image_size ({m.image_size})",
            )
        )
    total = m.num_hidden_layers + 1
    layers = m.feature_layer if isinstance(m.feature_layer, list) else [m.feature_layer]
    for i, layer in enumerate(layers):
        if not -total <= layer < total:
            where: Path_ = ("model", "feature_layer") + (
                (i,) if isinstance(m.feature_layer, list) else ()
            )
            found.append(
                (
                    where,
                    f"{layer} is out of range: there are {total} hidden states "
                    f"(num_hidden_layers {m.num_hidden_layers} + embeddings), so "
                    f"-{total} <= feature_layer <= {total - 1}",
                )
            )
    if not found and m.post_layernorm and not m.selects_final_state:
        found.append(
            (
                ("model", "post_layernorm"),
                f"post_layernorm applies to the final hidden state only, but feature_layer "
                f"{m.feature_layer} stops at layer {m.num_layers_computed} of "
                f"{m.num_hidden_layers}; set post_layernorm: false or select the last layer",
            )
        )
    if not found:
        found += m.errors()
    found += _token_errors(preset, reported={path for path, _ in found})
    if not found:
        found += vlm.projector_errors(preset)
    found += vlm.crop_errors(preset)
    found.extend(_preprocess_errors(preset))
    seen: dict[str, int] = {}
    for i, target in enumerate(preset.targets):
        if target.name in seen:
            found.append(
                (
                    ("targets", i),
                    f"target name {target.name!r} repeats targets[{seen[target.name]}]",
                )
            )
        seen.setdefault(target.name, i)
    found.extend(_target_field_errors(data.get("targets", [])))
    return found


def _target_field_errors(entries: list[Any]) -> list[tuple[Path_, str]]:
    """Options that the entry's kind does not read, and a cuda entry without `arch`."""
    found: list[tuple[Path_, str]] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            continue
        kind = entry.get("kind", "llvm")
        allowed = COMMON_TARGET_FIELDS + KIND_FIELDS.get(kind, ())
        for key in entry:
            if key not in allowed:
                found.append(
                    (
                        ("targets", i, key),
                        f"does not apply to a {kind} target; its options: {sorted(allowed)}",
                    )
                )
        if kind == "cuda" and entry.get("precision") == "bfloat16":
            found.append(
                (
                    ("targets", i, "precision"),
                    "bfloat16 is for llvm targets; a cuda target takes float32 or float16",
                )
            )
        if kind == "cuda" and not entry.get("arch"):
            found.append(
                (
                    ("targets", i),
                    "a cuda target needs arch, e.g. [sm_80, sm_90] (no default: code for the "
                    "wrong architecture does not load)",
                )
            )
    return found


def _token_errors(preset: Preset, reported: set[Path_]) -> list[tuple[Path_, str]]:
    """Checks between the output, the tokens before the patches and the head; `reported`:
    paths the family's own checks already explained."""
    m, b = preset.model, preset.blocks
    found: list[tuple[Path_, str]] = []
    cls = registry.class_tokens(b.embeddings)
    default = m.feature_select_strategy == "default"
    if default and not registry.prefix_tokens(m, b) and m.output == "features":
        found.append(
            (
                ("model", "feature_select_strategy"),
                f"'default' drops the CLS token, but blocks.embeddings {b.embeddings!r} "
                "has none; use 'full'",
            )
        )
    if m.normalize_embeds and m.output != "embeds":
        found.append(
            (
                ("model", "normalize_embeds"),
                f"normalizes the embedding, but model.output is {m.output!r}; "
                "set model.output: embeds",
            )
        )
    if m.pools and m.native:
        found.append(
            (
                ("model", "output"),
                f"{m.output!r}, but the {preset.family} tower takes one image at its own size "
                "and returns its features only (no pooling head is built); set output: features",
            )
        )
    elif m.pools:
        if b.projector:
            found.append(
                (
                    ("blocks", "projector"),
                    f"{b.projector!r} projects the selected features, but model.output is "
                    f"{m.output!r}; set blocks.projector: null or model.output: features",
                )
            )
        if not (m.final_norm and m.selects_final_state) and ("model", "output") not in reported:
            found.append(
                (
                    ("model", "output"),
                    f"{m.output!r} pools the normed final state (HF's pooler_output); "
                    "set model.post_layernorm: true and model.feature_layer: -1",
                )
            )
        if registry.get(b.head, "head").attr("requires_class_token", False) and not cls:
            found.append(
                (
                    ("blocks", "head"),
                    f"{b.head!r} pools the CLS token, but blocks.embeddings {b.embeddings!r} "
                    "has none; choose another head",
                )
            )
    return found


# The preprocess fields that one native resize rule alone reads.
NATIVE_FIELDS = {
    "min_pixels": "smart_resize",
    "max_pixels": "smart_resize",
    "max_num_patches": "max_num_patches",
}


def _native_errors(steps: PreprocessConfig) -> list[tuple[Path_, str]]:
    """A native resize's budget, fields that only such a resize reads, and the steps of a
    fixed-size image that it leaves out."""
    found: list[tuple[Path_, str]] = []
    if steps.min_pixels > steps.max_pixels:
        found.append(
            (
                ("preprocess", "min_pixels"),
                f"{steps.min_pixels} is more than preprocess.max_pixels {steps.max_pixels}",
            )
        )
    defaults = PreprocessConfig()
    for name, rule in NATIVE_FIELDS.items():
        if steps.resize != rule and getattr(steps, name) != getattr(defaults, name):
            found.append(
                (
                    ("preprocess", name),
                    f"read by resize: {rule} only, but preprocess.resize is {steps.resize!r}",
                )
            )
    if not steps.native:
        return found
    fixed = {
        "center_crop": (steps.center_crop, "false"),
        "longest_edge": (steps.longest_edge is not None, "null"),
        "image_grid_pinpoints": (steps.image_grid_pinpoints is not None, "null"),
        "crop_to_patches": (steps.crop_to_patches, "false"),
        "do_image_splitting": (steps.do_image_splitting, "false"),
    }
    for name, (on, off) in fixed.items():
        if on:
            found.append(
                (
                    ("preprocess", name),
                    f"a step for images of a fixed size, but resize {steps.resize!r} keeps the "
                    f"image's own size in patches: set {name}: {off}",
                )
            )
    budget = " and ".join(name for name, rule in NATIVE_FIELDS.items() if rule == steps.resize)
    if steps.size is not None and budget:
        found.append(
            (
                ("preprocess", "size"),
                f"not read by resize {steps.resize!r} (its budget is {budget}): set size: null",
            )
        )
    return found


def _preprocess_errors(preset: Preset) -> list[tuple[Path_, str]]:
    """The preprocessing must produce the square image the tower takes, or patches by a
    native resize."""
    m = preset.model
    found = _native_errors(preset.preprocess)
    steps = preset.preprocess.resolved(m.image_size)
    native = families.get(preset.family).native
    rule = native.resize if native else None
    if (steps.native or rule) and steps.resize != rule:
        if rule:
            why = f"each image at its own size: set resize: {rule} (its HF processor's rule)"
        else:
            natives = [f.name for f in families.all_families() if f.native]
            why = (
                f"images of model.image_size: the native rules ({', '.join(NATIVE_RESIZES)}) "
                f"are for the native-resolution families ({', '.join(natives)})"
            )
        return found + [
            (
                ("preprocess", "resize"),
                f"{steps.resize!r}, but the {preset.family} tower takes {why}",
            )
        ]
    if steps.native or steps.output_size == m.image_size:
        return found
    if steps.output_size is None:
        return found + [
            (
                ("preprocess", "center_crop"),
                "a shortest_edge resize without a center crop gives images of any aspect "
                "ratio; the tower takes a square: set center_crop: true or resize: square",
            )
        ]
    field = "crop_size" if steps.center_crop else "size"
    return found + [
        (
            ("preprocess", field),
            f"{steps.output_size} pixels, but model.image_size is {m.image_size}: the "
            f"preprocessing must produce the image the tower takes",
        )
    ]


def _where(raw: RawPreset, path: Path_) -> tuple[int, str]:
    """(sort key, 'FILE:LINE: path' or "override 'K=V': path") for what set `path`."""
    for ov in reversed(raw.overrides):
        if path[: len(ov.path)] == ov.path:
            return (0, f"override {ov.text!r}: {format_path(path)}")
    probe = path
    while probe not in raw.lines and probe:
        probe = probe[:-1]
    line = raw.lines.get(probe, 1)
    file = raw.files.get(probe, raw.file)
    # Sorted by line within a file; errors in an inherited file sort after the child's.
    return (line + (0 if file == raw.file else 1 << 20), f"{file}:{line}: {format_path(path)}")


def _locate(raw: RawPreset, path: Path_, message: str) -> tuple[int, str]:
    """(sort key, line): an override that set `path` or a parent of it, else the file line."""
    for ov in reversed(raw.overrides):
        if path == ov.path and message.startswith("unknown key"):
            return (0, f"override {ov.text!r}: {message}")
    key, where = _where(raw, path)
    return (key, f"{where}: {message}")


def _load_plugins(raw: RawPreset, extra: Sequence[str]) -> list[str]:
    """Import the preset's `plugins` and the command line's, before the schema is built from
    the registry. A malformed `plugins` entry is left to the schema to report."""
    listed = raw.data.get("plugins")
    listed = [m for m in listed if isinstance(m, str)] if isinstance(listed, list) else []
    modules = [(m, _where(raw, ("plugins", i))[1]) for i, m in enumerate(listed)]
    modules += [(m, f"--plugin {m!r}") for m in extra]
    plugins.load_plugins(modules, [Path(f).parent for f in reversed(raw.chain)])
    return list(dict.fromkeys([*listed, *extra]))


def validate(raw: RawPreset, plugins: Sequence[str] = ()) -> Preset:
    """Import plugins, then schema checks, then semantic checks; every problem at once as an
    `InputError`. `plugins` are module names from the command line (`--plugin`)."""
    loaded = _load_plugins(raw, plugins)
    data = copy.deepcopy(raw.data)
    data.setdefault("name", Path(raw.file).stem)
    found = _schema_errors(data)
    if not found:
        found = _semantic_errors(data)
    if found:
        located = sorted({_locate(raw, p, msg) for p, msg in found})
        raise InputError([line for _, line in located])
    data["plugins"] = loaded
    preset = preset_from_dict(data)
    _resolve_weights_path(raw, preset)
    return preset


def _resolve_weights_path(raw: RawPreset, preset: Preset) -> None:
    # A relative path in a preset file is relative to that file; on the command line, to the
    # working directory.
    path = preset.weights.path
    if path is None or Path(path).is_absolute():
        return
    if any(("weights", "path")[: len(ov.path)] == ov.path for ov in raw.overrides):
        return
    preset.weights.path = str(Path(raw.files.get(("weights", "path"), raw.file)).parent / path)


def load_preset(
    arg: str | Path, overrides: Sequence[str] = (), plugins: Sequence[str] = ()
) -> Preset:
    """Read, merge overrides, import plugins, validate: the one entry point from a file to a
    `Preset`. `plugins` are block-plugin modules given outside the preset (`--plugin`)."""
    raw = read_preset(find_preset(str(arg)))
    return validate(apply_overrides(raw, overrides), plugins)
