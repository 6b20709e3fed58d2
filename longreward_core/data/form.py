"""How a config shows in a form generated from its JSON schema (Prefect's run form).

Prefect's UI orders a parameter object's fields by each property's `position` and, where there is
none, by the order its database returns the keys in (PostgreSQL's jsonb: shortest key first), so
every config that a flow's form shows states the order: required fields first, then the rest,
each in the order the class declares them.
"""

from __future__ import annotations

from typing import Any


def form_order(schema: dict[str, Any]) -> None:
    """A pydantic `json_schema_extra`: number the properties (`position`), required ones first."""
    properties = schema.get("properties", {})
    required = [name for name in properties if name in set(schema.get("required", ()))]
    optional = [name for name in properties if name not in required]
    for position, name in enumerate(required + optional):
        properties[name]["position"] = position
