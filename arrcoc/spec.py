"""Pipeline files: a pydantic ``PipelineSpec``, YAML loading, located errors.

A pipeline file has the sections ``encoder``, ``query_encoder``,
``compress``, ``score``, ``allocate`` and ``llm``; each stage is a mapping
``{use: <plugin name>, <param>: <value>, ...}`` validated against that
plugin's own ``Params``.  Errors name the file, the line, the stage and the
field, list the valid choices and suggest the nearest name.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from .plugin import KINDS, PluginRef
from .errors import (
    ParamsError, PluginLoadError, SpecError, UnknownPipelineError, UnknownPluginError, did_you_mean,
)

#: section -> (plugin kind, whether it holds a list of stages)
SECTIONS: dict[str, tuple[str, bool]] = {
    "encoder": ("encoder", False),
    "query_encoder": ("query_encoder", False),
    "compress": ("compressor", True),
    "score": ("scorer", True),
    "allocate": ("allocator", False),
    "llm": ("compressor", True),
}
SECTION_OF_KIND = {"encoder": "encoder", "query_encoder": "query_encoder", "compressor": "compress",
                   "scorer": "score", "allocator": "allocate"}


StageSpec = PluginRef


class PipelineSpec(BaseModel):
    """A validated pipeline: encode -> compress* -> score* -> allocate? -> llm*."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = "pipeline"
    description: str = ""
    encoder: StageSpec
    query_encoder: StageSpec | None = None
    compress: list[StageSpec] = Field(default_factory=list)
    score: list[StageSpec] = Field(default_factory=list)
    allocate: StageSpec | None = None
    llm: list[StageSpec] = Field(default_factory=list)

    _source: str = PrivateAttr(default="<spec>")

    @property
    def source(self) -> str:
        return self._source

    def stages(self) -> list[tuple[str, str, StageSpec]]:
        """``(label, section, stage)`` in run order, e.g. ``("compress[0]", "compress", ...)``."""
        out: list[tuple[str, str, StageSpec]] = []
        for section, (_, many) in SECTIONS.items():
            value = getattr(self, section)
            if value is None:
                continue
            if many:
                out.extend((f"{section}[{i}]", section, s) for i, s in enumerate(value))
            else:
                out.append((section, section, value))
        return out

    def as_yaml_dict(self) -> dict[str, Any]:
        """The pipeline as a file would write it (``parse_spec`` reads it back); empty sections left out."""
        data: dict[str, Any] = {"name": self.name, "description": self.description}
        for section, (_, many) in SECTIONS.items():
            value = getattr(self, section)
            if value is None or (many and not value):
                continue
            data[section] = [s.as_yaml_dict() for s in value] if many else value.as_yaml_dict()
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.as_yaml_dict(), sort_keys=False)


# ------------------------------------------------------------------ reading
#: A pipeline is a few hundred YAML nodes.  Aliases (``*name``) repeat their
#: anchor's nodes, so a file of a few hundred bytes can expand to billions
#: ("billion laughs"); anything that walks the expanded tree (the line map,
#: validation, error messages) would exhaust memory.  Files that expand past
#: this many nodes, or nest deeper than ``MAX_YAML_DEPTH``, are refused before
#: anything walks them.
MAX_YAML_NODES = 10_000
MAX_YAML_DEPTH = 50


class _PipelineLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads YAML 1.2 floats with an exponent.

    YAML 1.1 (PyYAML's default) needs a dot and a signed exponent, so
    ``keep: 1e-9`` or ``1.0e5`` would be the *string* ``'1e-9'`` and fail
    validation with a puzzling message; YAML 1.2 (and JSON, and Python)
    read them as floats, and so does a pipeline file.
    """


_PipelineLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\.[0-9]+|[0-9][0-9_]*(?:\.[0-9_]*)?)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


def read_pipeline_text(path: Path) -> str:
    """A pipeline file's text; a file that is not UTF-8 is a :class:`SpecError` naming the byte."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        hint = " (it starts with a UTF-16 byte-order mark)" if raw.startswith((b"\xff\xfe", b"\xfe\xff")) else ""
        raise SpecError(
            f"{path}:{line}: a pipeline file must be UTF-8 text, but byte 0x{raw[exc.start]:02x} at offset "
            f"{exc.start} is not valid UTF-8{hint}; save the file as UTF-8"
        ) from None


def _label(path: tuple) -> str:
    """``("compress", 0, "r")`` -> ``compress[0].r``."""
    return "".join(f"[{p}]" if isinstance(p, int) else f"{'.' if i else ''}{p}" for i, p in enumerate(path))


def _read_yaml(text: str, source: str) -> tuple[Any, dict[tuple, int]]:
    """Parse ``text`` once: the data and a map of each YAML path (keys and list indices) to its 1-based line.

    The composed node tree is checked before anything is built from it: its
    expanded size and depth are bounded, and a key written twice in one
    mapping is an error (YAML keeps the last one silently).
    """
    loader = _PipelineLoader(text)
    try:
        try:
            root = loader.get_single_node()
        except RecursionError:
            raise SpecError(f"{source}: YAML nested too deeply to read (a pipeline needs a few levels)") from None
        lines = _check_nodes(root, source) if root is not None else {}
        return (loader.construct_document(root) if root is not None else None), lines
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(f"{at}: YAML syntax error: {problem}") from None
    finally:
        loader.dispose()


def _check_nodes(root: yaml.Node, source: str) -> dict[tuple, int]:
    """Walk the node tree as aliases expand it (iteratively, bounded); return the line map."""
    lines: dict[tuple, int] = {}
    stack: list[tuple[yaml.Node, tuple]] = [(root, ())]
    visited = 0
    while stack:
        node, path = stack.pop()
        visited += 1
        if visited > MAX_YAML_NODES:
            raise SpecError(
                f"{source}: the YAML expands to more than {MAX_YAML_NODES} nodes (each alias `*name` repeats "
                "everything under its anchor `&name`); a pipeline needs a few hundred: refusing to read it"
            )
        if len(path) > MAX_YAML_DEPTH:
            raise SpecError(f"{source}:{node.start_mark.line + 1}: YAML nested deeper than {MAX_YAML_DEPTH} levels")
        lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            first_line: dict[tuple[str, str], int] = {}
            children = []
            for key, value in node.value:
                child = path + (key.value,)
                line = key.start_mark.line + 1
                if isinstance(key, yaml.ScalarNode):
                    if (key.tag, key.value) in first_line:
                        what = f"section {key.value!r}" if not path else f"key {key.value!r} in {_label(path)}"
                        raise SpecError(
                            f"{source}:{line}: duplicate {what} (first at line {first_line[key.tag, key.value]}); "
                            "YAML would keep only the last one: remove or merge one of them"
                        )
                    first_line[key.tag, key.value] = line
                lines[child] = line
                children.append((value, child))
            stack.extend(reversed(children))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((value, path + (i,)) for i, value in reversed(list(enumerate(node.value))))
    return lines


class _Locator:
    def __init__(self, source: str, lines: dict[tuple, int]) -> None:
        self.source, self.lines = source, lines

    def __call__(self, path: Iterable[Any]) -> str:
        path = tuple(path)
        while path and path not in self.lines:
            path = path[:-1]
        line = self.lines.get(path)
        return f"{self.source}:{line}" if line else self.source


# ------------------------------------------------------------------- loading
def parse_spec(data: Any, *, source: str = "<dict>", lines: dict[tuple, int] | None = None) -> PipelineSpec:
    """Validate a mapping into a :class:`PipelineSpec` (sections, stages and params)."""
    where = _Locator(source, lines or {})
    if not isinstance(data, Mapping):
        got = "nothing (empty)" if data is None else type(data).__name__
        raise SpecError(f"{where(())}: a pipeline must be a mapping of sections, got {got}")
    valid_keys = ["name", "description", *SECTIONS]
    for key in data:
        if key not in valid_keys:
            raise SpecError(
                f"{where((key,))}: unknown section {key!r}{did_you_mean(str(key), valid_keys)}; "
                f"valid: {', '.join(valid_keys)}"
            )
    if "encoder" not in data:
        raise SpecError(f"{where(())}: missing section 'encoder' (e.g. `encoder: {{use: timm_vit}}`)")
    for section, (_, many) in SECTIONS.items():
        value = data.get(section)
        if many and value is not None and not isinstance(value, list):
            raise SpecError(f"{where((section,))}: section {section!r} must be a list of stages, got {type(value).__name__}")
        if not many and isinstance(value, list):
            raise SpecError(f"{where((section,))}: section {section!r} takes one stage, got a list")
    try:
        spec = PipelineSpec.model_validate(dict(data))
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(p for p in err["loc"] if p not in ("params",))
        label = _label(loc)
        message = err["msg"].removeprefix("Value error, ")  # pydantic's prefix for a validator's ValueError
        raise SpecError(f"{where(loc)}: {label or 'pipeline'}: {message}") from None
    spec._source = source
    validate_stages(spec, where)
    return spec


def validate_stages(spec: PipelineSpec, where: Callable[[Iterable[Any]], str] | None = None) -> None:
    """Check every stage names a plugin of the section's kind and its params validate."""
    from .registry import get_registry

    where = where or _Locator(spec.source, {})
    registry = get_registry()
    for label, section, stage in spec.stages():
        kind = SECTIONS[section][0]
        path = _path_of(label)
        try:
            cls = registry.get(kind, stage.use)
        except UnknownPluginError as exc:
            other = [k for k in SECTION_OF_KIND if stage.use in registry.names(k)]
            if other:
                raise SpecError(
                    f"{where(path + ('use',))}: {label}: {stage.use!r} is a {other[0]}; "
                    f"it belongs under '{SECTION_OF_KIND[other[0]]}:', not '{section}:'"
                ) from None
            raise UnknownPluginError(f"{where(path + ('use',))}: {label}: {exc}") from None
        except PluginLoadError as exc:  # two providers claim the name
            raise PluginLoadError(f"{where(path + ('use',))}: {label}: {exc}") from None
        if section == "llm" and cls.stage != "llm":
            raise SpecError(f"{where(path)}: {label}: {stage.use!r} runs at stage {cls.stage!r}; 'llm:' takes stage 'llm' plugins")
        if section == "compress" and cls.stage == "llm":
            raise SpecError(f"{where(path)}: {label}: {stage.use!r} runs inside the LLM; put it under 'llm:'")
        try:
            cls.validate_params(stage.params)
        except ParamsError as exc:
            field = _first_field(exc.__context__ or exc, stage.params)
            raise ParamsError(f"{where(path + field)}: {label} ({stage.use}): {str(exc).split(': ', 1)[-1]}") from None
        wide = _wide_integer(stage.params)
        if wide is not None:
            field, value = wide
            raise ParamsError(
                f"{where(path + field)}: {label} ({stage.use}): {_label(field)}: {value} does not fit in 64 bits; "
                f"an integer parameter lies in [{INT64_RANGE[0]}, {INT64_RANGE[1]}]"
            )


#: The integers a parameter can hold. Seeds, counts and sizes end up in int64 tensors or in
#: ``torch.Generator.manual_seed``, which fail on anything wider ("Overflow when unpacking long long") only
#: when the pipeline runs; YAML and pydantic take integers of any size, so the spec checks the range.
INT64_RANGE = (-(1 << 63), (1 << 63) - 1)


def _wide_integer(value: Any, path: tuple = ()) -> tuple[tuple, int] | None:
    """``(path, value)`` of the first integer in ``value`` (nested mappings, lists, plugins) outside int64."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return None if INT64_RANGE[0] <= value <= INT64_RANGE[1] else (path, value)
    if isinstance(value, PluginRef):  # a nested plugin's params sit beside its `use:`, as in the file
        value = value.as_yaml_dict()
    if isinstance(value, Mapping):
        items: Iterable[tuple[Any, Any]] = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = _wide_integer(item, path + (key,))
        if found is not None:
            return found
    return None


def _path_of(label: str) -> tuple:
    if "[" in label:
        section, index = label[:-1].split("[")
        return (section, int(index))
    return (label,)


def _first_field(exc: BaseException, params: Mapping[str, Any]) -> tuple:
    if isinstance(exc, ValidationError) and exc.errors():
        loc = exc.errors()[0]["loc"]
        return tuple(loc)
    return ()


def load_yaml(path: str | Path) -> PipelineSpec:
    """Load and validate a pipeline file (safe YAML, bounded; see :data:`MAX_YAML_NODES`)."""
    path = Path(path)
    try:
        text = read_pipeline_text(path)
    except FileNotFoundError:
        raise UnknownPipelineError(f"pipeline file {str(path)!r} does not exist") from None
    except OSError as exc:
        raise SpecError(f"{path}: cannot read pipeline file: {exc}") from None
    return parse_yaml_text(text, source=str(path))


def parse_yaml_text(text: str, *, source: str = "<string>") -> PipelineSpec:
    data, lines = _read_yaml(text, source)
    return parse_spec(data, source=source, lines=lines)


def available_pipelines() -> dict[str, Path]:
    """Pipeline names -> files: built-ins first, then third parties' directories."""
    from .registry import get_registry

    found: dict[str, Path] = {}
    for directory in get_registry().pipeline_dirs():
        if directory.is_dir():
            for file in sorted(directory.glob("*.yaml")):
                found.setdefault(file.stem, file)
    return found


def resolve_spec(spec: "str | Path | Mapping[str, Any] | PipelineSpec") -> PipelineSpec:
    """A spec from a ``PipelineSpec``, a dict, a file path or a pipeline name."""
    if isinstance(spec, PipelineSpec):
        return spec
    if isinstance(spec, Mapping):
        return parse_spec(spec)
    if isinstance(spec, (str, Path)):
        text = str(spec)
        path = Path(text).expanduser()
        if path.is_file() or text.endswith((".yaml", ".yml")) or "/" in text:
            return load_yaml(path)
        pipelines = available_pipelines()
        if text in pipelines:
            return load_yaml(pipelines[text])
        raise UnknownPipelineError(
            f"unknown pipeline {text!r}{did_you_mean(text, pipelines)}: not a file, "
            f"and not one of {', '.join(sorted(pipelines)) or '(none)'}"
        )
    raise SpecError(f"expected a pipeline name, path, dict or PipelineSpec, got {type(spec).__name__}")


def _link_nested(schema: Any) -> Any:
    """Point nested plugin fields (marked ``x-arrcoc-kind`` by ``nested_plugin``) at ``#/$defs/<kind>_stage``."""
    if isinstance(schema, dict):
        if "x-arrcoc-kind" in schema:
            return {"$ref": f"#/$defs/{schema['x-arrcoc-kind']}_stage"}
        return {k: _link_nested(v) for k, v in schema.items()}
    if isinstance(schema, list):
        return [_link_nested(v) for v in schema]
    return schema


def json_schema() -> dict[str, Any]:
    """JSON schema of a pipeline file, with every registered plugin's parameters."""
    from .registry import get_registry

    registry = get_registry()
    defs: dict[str, Any] = {}

    def stage_schema(kind: str) -> dict[str, Any]:
        options = []
        for info in registry.list(kind):
            params = _link_nested(info.cls.Params.model_json_schema(ref_template="#/$defs/{model}"))
            for name, sub in params.pop("$defs", {}).items():
                defs[name] = sub
            params.setdefault("properties", {})
            params["properties"] = {"use": {"const": info.name}, **params["properties"]}
            params["required"] = ["use", *params.get("required", [])]
            params["title"] = f"{kind}:{info.name}"
            if info.summary:
                params["description"] = info.summary
            options.append(params)
        if not options:
            return {"type": "object"}
        return {"oneOf": [{"enum": [o["properties"]["use"]["const"] for o in options]}, *options]}  # `- tome` too

    # Plugins nested in another's params (`in_blocks: {use: tome, r: 8}`) refer to "#/$defs/<kind>_stage".
    for kind in KINDS:
        defs[f"{kind}_stage"] = stage_schema(kind)
    props: dict[str, Any] = {"name": {"type": "string"}, "description": {"type": "string"}}
    for section, (kind, many) in SECTIONS.items():
        one = stage_schema(kind)
        props[section] = {"type": "array", "items": one} if many else one
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "arrcoc pipeline",
        "type": "object",
        "properties": props,
        "required": ["encoder"],
        "additionalProperties": False,
        "$defs": defs,
    }
