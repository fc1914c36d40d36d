"""Validate a spec with its model before Pulumi sends anything, and say which field is wrong.

The models check what the API server checks (schema bounds and the `Rule`s it runs as CEL), so a
spec that passes here is one the API server accepts, and one that fails gets the same message,
with the path of the field in the object (`spec.recoverySite`), at `pulumi preview` already.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, TypeVar

import pulumi
import pydantic

from secondsite.api import ApiModel, Rule

M = TypeVar("M", bound=ApiModel)


class InvalidSpecError(pulumi.RunError, ValueError):
    """A spec the API server would reject; raised by the resource's constructor.

    A `pulumi.RunError`, so the CLI shows the message without a Python traceback.
    """

    def __init__(self, kind: str, name: str, problems: list[str]) -> None:
        self.kind = kind
        self.name = name
        self.problems = problems
        super().__init__(f"invalid {kind} {name!r}: " + "; ".join(problems))


@functools.cache
def _rule_fields() -> dict[str, str]:
    """Each rule's message -> the field it reports on (rules raise their message only)."""
    fields: dict[str, str] = {}
    pending: list[type[ApiModel]] = [ApiModel]
    while pending:
        model = pending.pop()
        pending.extend(model.__subclasses__())
        rules: tuple[Rule, ...] = model.cel_rules
        for rule in rules:
            if rule.field_path is not None:
                fields[rule.message] = rule.field_path
    return fields


def _problem(error: Mapping[str, Any]) -> str:
    path = "spec" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"])
    message = str(error["msg"]).removeprefix("Value error, ")
    field = _rule_fields().get(message)
    if field is not None and error["type"] == "value_error":
        path += field
    return f"{path}: {message}"


def validated_spec(model: type[M], spec: M | Mapping[str, Any], *, kind: str, name: str) -> M:
    """`spec` (a model or a mapping of camelCase or snake_case keys) checked by `model`.

    A model instance is checked again: pydantic does not re-validate assignments after
    construction. The result remembers which fields were set, so defaults stay unset.
    """
    if isinstance(spec, ApiModel):
        if not isinstance(spec, model):
            raise InvalidSpecError(
                kind, name, [f"spec: expected {model.__name__}, got {type(spec).__name__}"]
            )
        data: Any = spec.model_dump(mode="json", by_alias=True, exclude_unset=True)
    else:
        data = spec
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as e:
        raise InvalidSpecError(kind, name, [_problem(err) for err in e.errors()]) from None


def manifest_spec(spec: ApiModel) -> dict[str, Any]:
    """The spec as sent: camelCase, JSON values, only the fields the user set.

    Defaults are left to the API server, which applies those of the CRD (generated from the same
    models): so an object looks as it would after `kubectl apply` of the same YAML, and Pulumi's
    state records what the program said, not a copy of today's defaults.
    """
    return spec.model_dump(mode="json", by_alias=True, exclude_unset=True)
