"""The run forms Prefect's UI draws from each flow's parameter schema: no field for a key, the
required fields first in a stated order, help texts that render as written."""

from __future__ import annotations

import importlib
import pkgutil
import re
from typing import Any

import pytest
from prefect import Flow
from prefect.utilities.callables import parameter_schema
from pydantic import BaseModel, SecretStr, ValidationError

import flows
from flows.longbench_eval import EvalParams
from flows.params import BuildParams


def all_flows() -> list[Flow]:
    found = {}
    for module in pkgutil.iter_modules(flows.__path__):
        loaded = importlib.import_module(f"flows.{module.name}")
        found.update({obj.name: obj for obj in vars(loaded).values() if isinstance(obj, Flow)})
    return [found[name] for name in sorted(found)]


def schema_of(flow: Flow) -> dict[str, Any]:
    return parameter_schema(flow.fn).model_dump()


def objects(schema: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every object schema a form draws: the flow's parameters and each definition."""
    return [("parameters", schema)] + sorted(schema.get("definitions", {}).items())


def walk(node: Any, path: str = ""):
    """(path, property name, property schema) for every property, however deeply nested."""
    if isinstance(node, dict):
        for name, prop in (node.get("properties") or {}).items():
            yield path, name, prop
        for key, value in node.items():
            yield from walk(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, f"{path}/{i}")


# A property whose value would be a secret. Names ending in `_secret` name a Secret block instead.
SECRET_NAME = re.compile(r"(^|_)(api_?key|key|password|passwd|token|credentials?)$", re.I)


def secret_values(node: Any) -> list[str]:
    found = []
    for path, name, prop in walk(node):
        variants = [prop, *prop.get("anyOf", []), *prop.get("allOf", [])]
        if SECRET_NAME.search(name) or any(v.get("format") == "password" or v.get("writeOnly") for v in variants):
            found.append(f"{path}/{name}")
    return found


def test_the_flows_are_found():
    assert [f.name for f in all_flows()] == ["dpo-train", "longbench-eval", "preference-build"]


@pytest.mark.parametrize("flow", all_flows(), ids=lambda f: f.name)
def test_no_form_has_a_field_for_a_key(flow):
    assert secret_values(schema_of(flow)) == []


class Inner(BaseModel):
    api_key: SecretStr | None = None
    hf_token: str = ""
    max_tokens: int = 1
    judge_key_secret: str | None = None


class Outer(BaseModel):
    inner: list[Inner]


def with_keys(params: Outer) -> None: ...


def test_the_check_sees_a_key_field():
    """The walk above finds a SecretStr field, or a field named like a key, wherever it is nested."""
    assert sorted(secret_values(parameter_schema(with_keys).model_dump())) == [
        "/definitions/Inner/api_key", "/definitions/Inner/hf_token",
    ]


def test_a_key_given_as_a_parameter_is_refused_with_where_it_belongs(sample_paths):
    prompts, _ = sample_paths
    with pytest.raises(ValidationError, match="api_key is not a parameter .* in policy_key_secret"):
        BuildParams(prompts=str(prompts), policy={"model": "openai/x", "api_key": "sk-typed-into-the-form"})
    with pytest.raises(ValidationError, match="api_key is not a parameter .* in judge_key_secret"):
        BuildParams.model_validate_json(f'{{"prompts": "{prompts}", "judge": {{"api_key": "sk-typed-into-the-form"}}}}')
    with pytest.raises(ValidationError, match="api_key is not a parameter .* in model_key_secret"):
        EvalParams(models=[{"model": "openai/a"}, {"name": "b", "model": "openai/b", "api_key": "sk-typed-into-the-form"}])


def ordered(definition: dict[str, Any]) -> list[str]:
    properties = definition["properties"]
    assert all("position" in p for p in properties.values()), "every field states its place in the form"
    return sorted(properties, key=lambda name: properties[name]["position"])


@pytest.mark.parametrize("flow", all_flows(), ids=lambda f: f.name)
def test_every_form_shows_its_required_fields_first(flow):
    for name, definition in objects(schema_of(flow)):
        if "properties" not in definition:
            continue
        order = ordered(definition)
        required = set(definition.get("required", ()))
        assert order[: len(required)] == [p for p in order if p in required], name


def test_the_forms_open_with_their_inputs_and_output_folder():
    by_name = {f.name: schema_of(f) for f in all_flows()}
    assert ordered(by_name["preference-build"]["definitions"]["BuildParams"])[:4] == [
        "prompts", "output_dir", "candidates", "run_date",
    ]
    assert ordered(by_name["longbench-eval"]["definitions"]["EvalParams"])[:3] == ["models", "output_dir", "benchmarks"]
    assert ordered(by_name["dpo-train"]["definitions"]["TrainParams"])[:3] == ["pairs", "output_dir", "base_model"]
    # Nested configs keep their declared order, which PostgreSQL's jsonb would otherwise lose.
    assert ordered(by_name["preference-build"]["definitions"]["JudgeConfig"])[:2] == ["model", "api_base"]


def outside_code(text: str) -> str:
    return re.sub(r"`[^`]*`", "", text)


@pytest.mark.parametrize("flow", all_flows(), ids=lambda f: f.name)
def test_help_texts_render_as_written(flow):
    """The UI renders descriptions as Markdown: a raw <name> is taken for an HTML tag and vanishes,
    so placeholders are written as code (`<output_dir>/<run_date>`)."""
    raw = [
        f"{path}/{name}: {prop['description']}"
        for path, name, prop in walk(schema_of(flow))
        if re.search(r"<[^<>]*>", outside_code(prop.get("description", "")))
    ]
    assert raw == []
