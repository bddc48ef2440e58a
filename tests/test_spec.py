"""Pipeline files: YAML loading, located errors, resolution by name/path/dict, schema, round trip.

Nothing here builds a model: specs are only parsed and validated.
"""

from __future__ import annotations

import re
import textwrap
import time
from pathlib import Path

import pytest
import yaml

import arrcoc
from arrcoc.errors import ParamsError, SpecError, UnknownPipelineError, UnknownPluginError
from arrcoc.hookspecs import hookimpl
from arrcoc.plugin import Compressor, Scorer
from arrcoc.registry import Registry, using_registry
from arrcoc.spec import (
    MAX_YAML_DEPTH, MAX_YAML_NODES, PipelineSpec, available_pipelines, json_schema, parse_yaml_text, resolve_spec,
)


class Norm(Scorer):
    """Scores tokens by their norm."""

    name = "norm"

    def __call__(self, state):
        return state.with_per_token(scores=state.tokens.norm(dim=-1))


class LateDrop(Compressor):
    """A compressor that runs inside the LLM."""

    name = "late_drop"
    stage = "llm"

    def __call__(self, state):
        return state


class Provider:
    def __init__(self, *classes, pipeline_dirs=()):
        self.classes, self.dirs = classes, list(pipeline_dirs)

    @hookimpl
    def arrcoc_register_plugins(self, register):
        for cls in self.classes:
            register(cls)

    @hookimpl
    def arrcoc_pipeline_paths(self):
        return [str(d) for d in self.dirs]


@pytest.fixture
def registry():
    from arrcoc_plugins.compressors import tome
    from arrcoc_plugins.encoders import timm_vit
    from arrcoc_plugins.query_encoders import toy_text

    reg = Registry(load_entry_points=False)
    for name, module in [("timm_vit", timm_vit), ("tome", tome), ("toy_text", toy_text)]:
        reg.register(module, name=name)
    reg.register(Provider(Norm, LateDrop), name="testplugins")
    assert reg.failures == {}
    with using_registry(reg):
        yield reg


GOOD = """\
name: small
description: a tiny pipeline
encoder:
  use: timm_vit
  model: vit_tiny_patch16_224
  model_kwargs: {depth: 2}
  layer: -1
  in_blocks: {use: tome, r: 2}
query_encoder: {use: toy_text}
compress:
  - {use: tome, r: 4, metric: tokens}
score:
  - use: norm
llm:
  - use: late_drop
"""


def tome_fields() -> str:
    """ToMe's parameters as error messages list them (the plugin's own field order)."""
    return ", ".join(arrcoc.get_registry().get("compressor", "tome").Params.model_fields)


def write(tmp_path: Path, text: str, name: str = "pipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def load_error(tmp_path: Path, text: str, error: type[Exception] = SpecError) -> tuple[str, Path]:
    path = write(tmp_path, text)
    with pytest.raises(error) as info:
        resolve_spec(path)
    return str(info.value), path


# ------------------------------------------------------------------ loading
def test_a_good_file_loads_with_every_section(registry, tmp_path):
    path = write(tmp_path, GOOD)
    spec = resolve_spec(path)
    assert spec.name == "small" and spec.description == "a tiny pipeline"
    assert spec.source == str(path)
    assert [(label, section, s.use) for label, section, s in spec.stages()] == [
        ("encoder", "encoder", "timm_vit"),
        ("query_encoder", "query_encoder", "toy_text"),
        ("compress[0]", "compress", "tome"),
        ("score[0]", "score", "norm"),
        ("llm[0]", "llm", "late_drop"),
    ]
    assert spec.encoder.params["in_blocks"] == {"use": "tome", "r": 2}
    assert spec.compress[0].params == {"r": 4, "metric": "tokens"}


def test_a_stage_may_be_a_bare_name(registry):
    spec = parse_yaml_text("encoder: timm_vit\ncompress: [tome]\n")
    assert spec.encoder.use == "timm_vit" and spec.encoder.params == {}
    assert spec.compress[0].use == "tome"


def test_yaml_syntax_error_gives_file_line_and_column(registry, tmp_path):
    message, path = load_error(tmp_path, "encoder: {use: timm_vit\ncompress: [\n")
    assert re.match(rf"{re.escape(str(path))}:2:9: YAML syntax error: ", message), message


def test_unknown_section_suggests_the_nearest(registry, tmp_path):
    message, path = load_error(tmp_path, "encoder: {use: timm_vit}\ncompres:\n  - {use: tome}\n")
    assert message == (
        f"{path}:2: unknown section 'compres' (did you mean 'compress'?); "
        "valid: name, description, encoder, query_encoder, compress, score, allocate, llm"
    )


def test_missing_encoder(registry, tmp_path):
    message, path = load_error(tmp_path, "name: x\ncompress:\n  - {use: tome}\n")
    assert message == f"{path}:1: missing section 'encoder' (e.g. `encoder: {{use: timm_vit}}`)"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("encoder: {use: timm_vit}\ncompress: {use: tome}\n", ":2: section 'compress' must be a list of stages, got dict"),
        ("encoder: {use: timm_vit}\nscore: norm\n", ":2: section 'score' must be a list of stages, got str"),
        ("encoder:\n  - {use: timm_vit}\n", ":1: section 'encoder' takes one stage, got a list"),
    ],
)
def test_list_and_single_sections_are_checked(registry, tmp_path, text, expected):
    message, path = load_error(tmp_path, text)
    assert message == f"{path}{expected}"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ": a pipeline must be a mapping of sections, got nothing (empty)"),
        ("- {use: tome}\n", ":1: a pipeline must be a mapping of sections, got list"),
    ],
)
def test_a_pipeline_must_be_a_mapping(registry, tmp_path, text, expected):
    message, path = load_error(tmp_path, text)
    assert message == f"{path}{expected}"


def test_a_stage_without_use(registry, tmp_path):
    message, path = load_error(tmp_path, "encoder: {use: timm_vit}\ncompress:\n  - r: 3\n")
    assert message == f"{path}:3: compress[0]: a stage needs `use: <plugin name>`, got keys ['r']"


def test_top_level_fields_are_typed(registry, tmp_path):
    message, path = load_error(tmp_path, "name: [a, b]\nencoder: {use: timm_vit}\n")
    assert message.startswith(f"{path}:1: name: Input should be a valid string")


# --------------------------------------------------------------- plugins
def test_unknown_plugin_names_the_line_of_use_and_suggests(registry, tmp_path):
    text = "encoder: {use: timm_vit}\ncompress:\n  - {use: tome, r: 2}\n  - use: tomee\n    r: 3\n"
    message, path = load_error(tmp_path, text, UnknownPluginError)
    assert message == f"{path}:4: compress[1]: unknown compressor 'tomee' (did you mean 'tome'?); available: late_drop, tome"


def test_a_stage_in_the_wrong_section_says_where_it_belongs(registry, tmp_path):
    message, path = load_error(tmp_path, "encoder: {use: timm_vit}\nscore:\n  - use: tome\n")
    assert message == f"{path}:3: score[0]: 'tome' is a compressor; it belongs under 'compress:', not 'score:'"
    message, path = load_error(tmp_path, "encoder: {use: timm_vit}\ncompress:\n  - norm\n")
    assert message == f"{path}:3: compress[0]: 'norm' is a scorer; it belongs under 'score:', not 'compress:'"


def test_llm_section_takes_llm_stage_plugins_only(registry, tmp_path):
    message, path = load_error(tmp_path, "encoder: {use: timm_vit}\nllm:\n  - {use: tome}\n")
    assert message == f"{path}:3: llm[0]: 'tome' runs at stage 'vision'; 'llm:' takes stage 'llm' plugins"
    message, path = load_error(tmp_path, "encoder: {use: timm_vit}\ncompress:\n  - {use: late_drop}\n")
    assert message == f"{path}:3: compress[0]: 'late_drop' runs inside the LLM; put it under 'llm:'"


def test_misspelt_param_names_line_stage_and_choices(registry, tmp_path):
    text = "encoder: {use: timm_vit}\ncompress:\n  - use: tome\n    metric: tokens\n    rr: 3\n"
    message, path = load_error(tmp_path, text, ParamsError)
    assert message == (
        f"{path}:5: compress[0] (tome): invalid parameters\n"
        f"  rr: unknown parameter (did you mean 'r'?); valid: {tome_fields()}"
    )


def test_mistyped_value_says_what_came(registry, tmp_path):
    message, path = load_error(tmp_path, "encoder: {use: timm_vit}\ncompress:\n  - use: tome\n    r: eight\n", ParamsError)
    assert message.startswith(f"{path}:4: compress[0] (tome): invalid parameters\n")
    assert "r.int: Input should be a valid integer, unable to parse string as an integer (got 'eight')" in message


def test_bad_literal_choice_lists_the_choices(registry, tmp_path):
    message, path = load_error(tmp_path, "encoder: {use: timm_vit}\ncompress:\n  - {use: tome, metric: values}\n", ParamsError)
    assert message == (
        f"{path}:3: compress[0] (tome): invalid parameters\n"
        "  metric: Input should be 'keys' or 'tokens' (got 'values')"
    )


def test_encoder_param_errors_are_located(registry, tmp_path):
    message, path = load_error(tmp_path, "encoder:\n  use: timm_vit\n  model: vit_tiny_patch16_22\n", ParamsError)
    assert message == (
        f"{path}:3: encoder (timm_vit): invalid parameters\n"
        "  model: unknown timm model 'vit_tiny_patch16_22' (did you mean 'vit_tiny_patch16_224'?) "
        "(got 'vit_tiny_patch16_22')"
    )


def test_nested_plugin_params_are_validated(registry, tmp_path):
    text = "encoder:\n  use: timm_vit\n  layer: -1\n  in_blocks: {use: tome, rr: 3}\n"
    message, path = load_error(tmp_path, text, ParamsError)
    assert message == (
        f"{path}:4: encoder (timm_vit): invalid parameters\n"
        "  in_blocks: compressor 'tome': invalid parameters\n"
        f"    rr: unknown parameter (did you mean 'r'?); valid: {tome_fields()}"
    )


def test_nested_plugin_must_exist(registry, tmp_path):
    text = "encoder:\n  use: timm_vit\n  in_blocks:\n    use: tomee\n"
    message, path = load_error(tmp_path, text, ParamsError)
    assert message.startswith(f"{path}:3: encoder (timm_vit): invalid parameters\n")
    assert "in_blocks: unknown compressor 'tomee' (did you mean 'tome'?); available: late_drop, tome" in message


@pytest.mark.parametrize("text, line, field, value", [
    ("encoder:\n  use: timm_vit\n  seed: 10000000000000000000000\n", 3, "seed", 10**22),
    ("encoder: {use: timm_vit}\nquery_encoder:\n  use: toy_text\n  seed: -9223372036854775809\n", 4, "seed",
     -(2**63) - 1),
    ("encoder:\n  use: timm_vit\n  in_blocks:\n    use: tome\n    r: 9223372036854775808\n", 5, "in_blocks.r",
     2**63),
])
def test_an_integer_wider_than_64_bits_is_refused_where_it_is_written(registry, tmp_path, text, line, field, value):
    """Such a seed passed validation and failed in ``run`` with 'Overflow when unpacking long long'."""
    message, path = load_error(tmp_path, text, ParamsError)
    stage = "query_encoder (toy_text)" if "toy_text" in text else "encoder (timm_vit)"
    assert message == (f"{path}:{line}: {stage}: {field}: {value} does not fit in 64 bits; an integer parameter "
                       "lies in [-9223372036854775808, 9223372036854775807]")


def test_64_bit_integers_at_the_edges_are_accepted(registry):
    spec = resolve_spec({"encoder": {"use": "timm_vit", "seed": 2**63 - 1},
                         "query_encoder": {"use": "toy_text", "seed": -(2**63)}})
    assert spec.encoder.params["seed"] == 2**63 - 1 and spec.query_encoder.params["seed"] == -(2**63)


def test_errors_from_a_dict_name_the_dict(registry):
    with pytest.raises(ParamsError, match=r"^<dict>: compress\[0\] \(tome\): invalid parameters\n  rr: unknown"):
        resolve_spec({"encoder": {"use": "timm_vit"}, "compress": [{"use": "tome", "rr": 1}]})


# ------------------------------------------------------------- resolution
def test_resolve_by_path_str_and_path(registry, tmp_path):
    path = write(tmp_path, GOOD)
    assert resolve_spec(path).model_dump() == resolve_spec(str(path)).model_dump()


def test_resolve_a_builtin_by_name(registry):
    spec = resolve_spec("tome")
    assert spec.name == "tome"
    assert spec.encoder.use == "timm_vit"
    assert spec.encoder.params["in_blocks"] == {"use": "tome", "r": 8}
    assert Path(spec.source) == available_pipelines()["tome"]


def test_resolve_a_dict_and_a_spec(registry):
    spec = resolve_spec({"name": "d", "encoder": {"use": "timm_vit", "layer": -1}, "compress": ["tome"]})
    assert spec.name == "d" and spec.source == "<dict>"
    assert resolve_spec(spec) is spec


def test_resolve_rejects_other_types(registry):
    with pytest.raises(SpecError, match="expected a pipeline name, path, dict or PipelineSpec, got int"):
        resolve_spec(42)


def test_unknown_pipeline_name_suggests(registry):
    with pytest.raises(UnknownPipelineError) as info:
        resolve_spec("tomme")
    assert str(info.value).startswith("unknown pipeline 'tomme' (did you mean 'tome'?): not a file, and not one of ")
    assert "tome" in str(info.value).split("not one of ")[1].split(", ")


def test_missing_pipeline_file(registry, tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(UnknownPipelineError, match=f"pipeline file '{re.escape(str(missing))}' does not exist"):
        resolve_spec(missing)


def test_a_third_partys_pipeline_directory(registry, tmp_path):
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    (shipped / "mine.yaml").write_text("name: mine\nencoder: {use: timm_vit}\ncompress: [{use: tome, r: 1}]\n")
    (shipped / "tome.yaml").write_text("name: not-the-builtin\nencoder: {use: timm_vit}\n")
    (shipped / "notes.txt").write_text("not a pipeline")
    registry.register(Provider(pipeline_dirs=[shipped, tmp_path / "missing_dir"]), name="shipper")
    assert "shipper" not in registry.failures

    found = available_pipelines()
    assert found["mine"] == shipped / "mine.yaml"
    assert found["tome"] != shipped / "tome.yaml"  # built-ins come first
    assert "notes" not in found
    spec = resolve_spec("mine")
    assert spec.name == "mine" and spec.compress[0].params == {"r": 1}
    assert resolve_spec("tome").name == "tome"


# ----------------------------------------------------------------- schema
def test_json_schema_lists_every_plugins_params(registry):
    schema = json_schema()
    assert schema["required"] == ["encoder"] and schema["additionalProperties"] is False
    assert set(schema["properties"]) == {"name", "description", "encoder", "query_encoder", "compress",
                                         "score", "allocate", "llm"}
    compress = schema["properties"]["compress"]
    assert compress["type"] == "array"
    options = {o["title"]: o for o in compress["items"]["oneOf"] if "title" in o}
    tome = options["compressor:tome"]
    assert tome["properties"]["use"] == {"const": "tome"}
    assert {"r", "inflection", "metric", "size_weighted", "class_token"} <= set(tome["properties"])
    assert tome["properties"]["metric"]["enum"] == ["keys", "tokens"]
    assert "Tokens merged per step" in tome["properties"]["r"]["description"]
    assert tome["additionalProperties"] is False
    assert tome["description"].startswith("Token Merging")
    encoder = {o["title"]: o for o in schema["properties"]["encoder"]["oneOf"] if "title" in o}
    in_blocks = encoder["encoder:timm_vit"]["properties"]["in_blocks"]
    assert {"$ref": "#/$defs/compressor_stage"} in in_blocks["anyOf"]
    assert schema["$defs"]["compressor_stage"] == compress["items"]


def test_json_schema_validates_pipeline_files(registry):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(yaml.safe_load(GOOD), schema)
    jsonschema.validate(yaml.safe_load(available_pipelines()["tome"].read_text()), schema)
    bad = [
        {"compress": [{"use": "tome"}]},  # no encoder
        {"encoder": {"use": "timm_vit"}, "compres": []},  # unknown section
        {"encoder": {"use": "timm_vit"}, "compress": [{"use": "tome", "rr": 3}]},  # unknown param
        {"encoder": {"use": "timm_vit"}, "compress": [{"use": "tome", "metric": "values"}]},  # bad choice
        {"encoder": {"use": "timm_vit", "in_blocks": {"use": "tome", "rr": 3}}},  # nested unknown param
        {"encoder": {"use": "timm_vit"}, "compress": ["tomee"]},  # unknown bare name
        {"encoder": {"use": "tome"}},  # a compressor as encoder
    ]
    for data in bad:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(data, schema)


# --------------------------------------------------------------- round trip
def test_to_yaml_round_trips(registry, tmp_path):
    spec = resolve_spec(write(tmp_path, GOOD))
    text = spec.to_yaml()
    again = parse_yaml_text(text, source="again.yaml")
    assert again.model_dump() == spec.model_dump()
    assert yaml.safe_load(text)["compress"] == [{"use": "tome", "r": 4, "metric": "tokens"}]
    assert "allocate" not in yaml.safe_load(text)  # empty sections are left out


def test_to_yaml_of_a_builtin_round_trips(registry):
    spec = resolve_spec("tome")
    assert parse_yaml_text(spec.to_yaml()).model_dump() == spec.model_dump()


def test_pipeline_spec_is_frozen(registry):
    spec = resolve_spec({"encoder": {"use": "timm_vit"}})
    with pytest.raises(Exception, match="frozen"):
        spec.name = "other"
    assert isinstance(spec, arrcoc.PipelineSpec) and isinstance(spec, PipelineSpec)


# ------------------------------------------------- hostile and odd files
BILLION_LAUGHS = """\
a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
encoder: {use: timm_vit, model_kwargs: {x: *i}}
"""


def test_a_billion_laughs_file_is_refused_fast(registry, tmp_path):
    assert len(BILLION_LAUGHS.encode()) < 500  # 9 ** 9 strings once the aliases expand
    start = time.perf_counter()
    message, path = load_error(tmp_path, BILLION_LAUGHS)
    assert time.perf_counter() - start < 2.0
    assert message == (
        f"{path}: the YAML expands to more than {MAX_YAML_NODES} nodes (each alias `*name` repeats everything "
        "under its anchor `&name`); a pipeline needs a few hundred: refusing to read it"
    )


def test_modest_anchors_and_merge_keys_still_work(registry, tmp_path):
    text = """\
    encoder: {use: timm_vit}
    compress:
      - &merge {use: tome, r: 2, metric: tokens}
      - {<<: *merge, r: 3}
      - *merge
    """
    spec = resolve_spec(write(tmp_path, text))
    assert [s.params for s in spec.compress] == [{"r": 2, "metric": "tokens"}, {"r": 3, "metric": "tokens"},
                                                 {"r": 2, "metric": "tokens"}]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("encoder: " + "[" * 1000 + "]" * 1000 + "\n", ": YAML nested too deeply to read (a pipeline needs a few levels)"),
        ("encoder: " + "[" * 60 + "]" * 60 + "\n", f":1: YAML nested deeper than {MAX_YAML_DEPTH} levels"),
    ],
)
def test_deep_nesting_is_refused(registry, tmp_path, text, expected):
    message, path = load_error(tmp_path, text)
    assert message == f"{path}{expected}"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("encoder: {use: timm_vit}\ncompress:\n  - use: tome\n    r: 2\n    metric: tokens\n    r: 4\n",
         ":6: duplicate key 'r' in compress[0] (first at line 4)"),
        ("encoder: {use: timm_vit}\ncompress:\n  - {use: tome, r: 2, r: 4}\n",
         ":3: duplicate key 'r' in compress[0] (first at line 3)"),
        ("encoder: {use: timm_vit}\ncompress: [tome]\nscore: []\ncompress:\n  - {use: tome, r: 1}\n",
         ":4: duplicate section 'compress' (first at line 2)"),
        ("encoder:\n  use: timm_vit\n  model_kwargs: {depth: 2, depth: 3}\n",
         ":3: duplicate key 'depth' in encoder.model_kwargs (first at line 3)"),
    ],
)
def test_duplicate_keys_are_errors_giving_both_lines(registry, tmp_path, text, expected):
    message, path = load_error(tmp_path, text)
    assert message == f"{path}{expected}; YAML would keep only the last one: remove or merge one of them"


@pytest.mark.parametrize(
    ("written", "value"), [("1e-1", 0.1), ("-1e-1", -0.1), ("1.0e-1", 0.1), ("+.5E0", 0.5), ("0.5", 0.5)]
)
def test_floats_with_an_exponent_are_floats_as_in_yaml_1_2(registry, written, value):
    spec = parse_yaml_text(f"encoder: timm_vit\ncompress:\n  - {{use: tome, inflection: {written}}}\n")
    assert spec.compress[0].params == {"inflection": value}
    assert isinstance(spec.compress[0].params["inflection"], float)
    assert parse_yaml_text(spec.to_yaml()).model_dump() == spec.model_dump()


def test_ints_and_strings_are_not_taken_for_floats(registry):
    spec = parse_yaml_text("name: 1e5x\nencoder: {use: timm_vit, model_kwargs: {a: 10, b: e5, c: '1e5'}}\n")
    assert spec.name == "1e5x" and spec.encoder.params["model_kwargs"] == {"a": 10, "b": "e5", "c": "1e5"}


def test_a_pipeline_file_that_is_not_utf8_names_the_byte(registry, tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: café\nencoder: {use: timm_vit}\n".encode("latin-1"))
    with pytest.raises(SpecError) as info:
        resolve_spec(path)
    assert str(info.value) == (
        f"{path}:1: a pipeline file must be UTF-8 text, but byte 0xe9 at offset 9 is not valid UTF-8; "
        "save the file as UTF-8"
    )
    path.write_bytes("encoder: {use: timm_vit}\n".encode("utf-16"))
    with pytest.raises(SpecError, match=r":1: .* byte 0xff at offset 0 .* \(it starts with a UTF-16 byte-order mark\)"):
        resolve_spec(path)


def test_a_utf8_file_with_a_byte_order_mark_loads(registry, tmp_path):
    path = tmp_path / "bom.yaml"
    path.write_bytes("name: café\nencoder: {use: timm_vit}\n".encode("utf-8-sig"))
    assert resolve_spec(path).name == "café"
