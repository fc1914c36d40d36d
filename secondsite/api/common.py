"""Building blocks shared by every SecondSite kind.

A kind's schema is written once, as pydantic models derived from `ApiModel`, and everything else is
derived from it: the CRD YAML (`secondsite.api.crd`), the operator's typed view of objects, the
Pulumi resources. The conventions that make that derivation work:

- Python attributes are snake_case; their JSON (and CRD) names are camelCase aliases.
- An attribute's docstring is its description in the CRD (`kubectl explain` shows it).
- `default=` is a default the API server applies; `default_factory=` is a Python-side convenience
  only (an empty list or map) and does not appear in the CRD.
- What a schema alone cannot say is a `Rule`: a CEL expression for the API server next to the same
  check in Python, so a spec the API server rejects is also rejected by `model_validate`.

Types shared across kinds live here too: names, durations and quantities with helpers that parse
them, label selectors, and Kubernetes-style conditions. Nothing here models ObjectMeta: objects are
handled as plain dicts by the operator, and only their spec and status are typed.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Callable
from decimal import Decimal
from typing import Annotated, Any, ClassVar, Self

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StringConstraints,
    WithJsonSchema,
    model_validator,
)
from pydantic.alias_generators import to_camel

GROUP = "secondsite.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"


@dataclasses.dataclass(frozen=True)
class Rule:
    """A validation the schema cannot express: CEL for the API server, Python for the models.

    `cel` runs with `self` bound to the object the rule is attached to (and `oldSelf` to its
    previous value on updates: such a transition rule has no `check`, since a model sees one
    version only). `field_path` (e.g. `.recoverySite`) is where the API server reports a failure,
    relative to that object. `message` is shown to the user by both sides, so it names the field.
    """

    cel: str
    message: str
    check: Callable[[Any], bool] | None = None
    field_path: str | None = None

    @property
    def is_transition(self) -> bool:
        """Whether the rule compares with the previous version (only checked on updates)."""
        return "oldSelf" in self.cel

    def to_validation(self) -> dict[str, str]:
        """The rule as an entry of `x-kubernetes-validations`."""
        validation = {"rule": self.cel, "message": self.message}
        if self.field_path is not None:
            validation["fieldPath"] = self.field_path
        return validation


def immutable(attribute: str, *, required: bool = True) -> Rule:
    """A transition rule that forbids changing `attribute` (a snake_case attribute) after creation.

    An optional attribute may also not be added or removed.
    """
    name = to_camel(attribute)
    if required:
        cel = f"self.{name} == oldSelf.{name}"
    else:
        cel = (
            f"has(self.{name}) == has(oldSelf.{name})"
            f" && (!has(self.{name}) || self.{name} == oldSelf.{name})"
        )
    return Rule(cel=cel, message=f"{name} is immutable", field_path=f".{name}")


def _add_rules(schema: dict[str, Any], model: type[Any]) -> None:
    rules: tuple[Rule, ...] = getattr(model, "cel_rules", ())
    if rules:
        schema["x-kubernetes-validations"] = [rule.to_validation() for rule in rules]


def _check_unique_entries(name: str, value: Any, schema: dict[str, Any]) -> None:
    """Entries of an `x-kubernetes-list-type` map (by its keys) or set must be unique."""
    list_type = schema.get("x-kubernetes-list-type")
    if value is None or list_type not in ("map", "set"):
        return
    if list_type == "map":
        keys: list[str] = schema["x-kubernetes-list-map-keys"]
        entries = [item.model_dump(mode="json") for item in value]
        value = [tuple(entry.get(key) for key in keys) for entry in entries]
    seen = set()
    for entry in value:
        if entry in seen:
            raise ValueError(f"{name} has a duplicate entry: {entry}")
        seen.add(entry)


class ApiModel(BaseModel):
    """Base of every spec and status model (see the module docstring for the conventions)."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        # The API server drops unknown fields (or rejects them, with strict field validation, as
        # kubectl asks for): a typo in a spec must not pass silently here either.
        extra="forbid",
        use_attribute_docstrings=True,
        json_schema_extra=_add_rules,
    )

    cel_rules: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def validate_rules(self) -> Self:
        """Check what the API server checks beyond types: unique list entries, `cel_rules`."""
        for name, field in type(self).model_fields.items():
            if isinstance(field.json_schema_extra, dict):
                _check_unique_entries(
                    field.alias or name, getattr(self, name), field.json_schema_extra
                )
        for rule in type(self).cel_rules:
            if rule.check is not None and not rule.check(self):
                raise ValueError(rule.message)
        return self


# --- names --------------------------------------------------------------------------------------

DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"

ObjectName = Annotated[str, StringConstraints(pattern=DNS_SUBDOMAIN_PATTERN, max_length=253)]
"""The name of an object (a DNS-1123 subdomain), e.g. of a VPG, a PVC or a Node."""

LabelValueName = Annotated[str, StringConstraints(pattern=DNS_LABEL_PATTERN, max_length=63)]
"""A name that is also used as a label value (a DNS-1123 label), e.g. a site's name."""


# --- durations ----------------------------------------------------------------------------------

DURATION_PATTERN = r"^[0-9]{1,9}[smhd]$"
"""A spec duration: a count and one unit, s, m, h or d (`90m`, `24h`, `30d`)."""

_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION_PARTS = re.compile(r"^(?:([0-9]+)d)?(?:([0-9]+)h)?(?:([0-9]+)m)?(?:([0-9]+)s)?$")

Duration = Annotated[str, StringConstraints(pattern=DURATION_PATTERN, max_length=10)]


def parse_duration(text: str) -> int:
    """Seconds in a duration: the spec form (`24h`) or the compound status form (`1d2h30m`)."""
    match = _DURATION_PARTS.match(text)
    if not text or match is None:
        raise ValueError(f"not a duration (like 90m, 24h or 30d): {text!r}")
    days, hours, minutes, seconds = (int(part or 0) for part in match.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def format_duration(seconds: int) -> str:
    """A number of seconds in the compound form, largest units first: 90061 -> `1d1h1m1s`."""
    if seconds < 0:
        raise ValueError(f"negative duration: {seconds}")
    parts = []
    for unit in "dhms":
        count, seconds = divmod(seconds, _UNIT_SECONDS[unit])
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0s"


def duration_range(attribute: str, minimum: str, maximum: str) -> Rule:
    """A rule bounding a `Duration` attribute (snake_case) to [minimum, maximum]."""
    name = to_camel(attribute)
    low, high = parse_duration(minimum), parse_duration(maximum)
    value = f"self.{name}"
    # A Duration is digits and one unit letter: the digits times the unit's seconds.
    seconds = (
        f"int({value}.substring(0, size({value}) - 1)) * ({value}.endsWith('d') ? 86400"
        f" : {value}.endsWith('h') ? 3600 : {value}.endsWith('m') ? 60 : 1)"
    )
    in_range = f"{seconds} >= {low} && {seconds} <= {high}"
    return Rule(
        # The pattern check makes a malformed value fail the schema's pattern only, not this too.
        cel=f"!{value}.matches('{DURATION_PATTERN}') || ({in_range})",
        message=f"{name} must be between {minimum} and {maximum}",
        check=lambda model: low <= parse_duration(getattr(model, attribute)) <= high,
        field_path=f".{name}",
    )


# --- quantities ---------------------------------------------------------------------------------

QUANTITY_PATTERN = (
    r"^(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
"""A non-negative Kubernetes quantity: `150Gi`, `500M`, `1.5e9`, `250m`."""

Quantity = Annotated[
    StrictInt | Annotated[str, StringConstraints(pattern=QUANTITY_PATTERN, max_length=64)],
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": QUANTITY_PATTERN,
            "x-kubernetes-int-or-string": True,
        }
    ),
]
"""A Kubernetes quantity, written as an integer or a string (`x-kubernetes-int-or-string`)."""

_QUANTITY_SUFFIXES = {
    "Ki": Decimal(2) ** 10,
    "Mi": Decimal(2) ** 20,
    "Gi": Decimal(2) ** 30,
    "Ti": Decimal(2) ** 40,
    "Pi": Decimal(2) ** 50,
    "Ei": Decimal(2) ** 60,
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "": Decimal(1),
    "k": Decimal("1e3"),
    "M": Decimal("1e6"),
    "G": Decimal("1e9"),
    "T": Decimal("1e12"),
    "P": Decimal("1e15"),
    "E": Decimal("1e18"),
}
_QUANTITY_PARTS = re.compile(
    r"^([0-9]+(?:\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?.+)?$"
)


def parse_quantity(quantity: int | str) -> Decimal:
    """The exact value of a quantity: `150Gi` -> 161061273600, `250m` -> 0.25."""
    if isinstance(quantity, int):
        return Decimal(quantity)
    match = _QUANTITY_PARTS.match(quantity)
    if match is None or re.match(QUANTITY_PATTERN, quantity) is None:
        raise ValueError(f"not a Kubernetes quantity (like 150Gi or 500M): {quantity!r}")
    number, suffix = match.group(1), match.group(2) or ""
    if suffix in _QUANTITY_SUFFIXES:
        return Decimal(number) * _QUANTITY_SUFFIXES[suffix]
    return Decimal(number) * Decimal(10) ** int(suffix[1:])  # an exponent: 1e3, 2E+2


def format_quantity(size: int) -> str:
    """A byte count for people, in binary units to one decimal: 40265318400 -> `37.5Gi`.

    The result is a valid quantity, but rounded: use it for display (status), not for limits.
    """
    for suffix in ("Ei", "Pi", "Ti", "Gi", "Mi", "Ki"):
        unit = _QUANTITY_SUFFIXES[suffix]
        if size >= unit:
            return f"{Decimal(size) / unit:.1f}".removesuffix(".0") + suffix
    return str(size)


# --- label selectors ----------------------------------------------------------------------------

LabelValue = Annotated[str, StringConstraints(max_length=63)]


class SelectorOperator(enum.StrEnum):
    """How a label selector requirement relates a label's key to its values."""

    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


class LabelSelectorRequirement(ApiModel):
    """One requirement of a label selector: a key, an operator and values."""

    cel_rules = (
        Rule(
            cel="(self.operator in ['In', 'NotIn']) == (has(self.values) && size(self.values) > 0)",
            message="values must be given for In and NotIn, and only for them",
            check=lambda r: (
                (r.operator in (SelectorOperator.IN, SelectorOperator.NOT_IN)) == bool(r.values)
            ),
            field_path=".values",
        ),
    )

    key: Annotated[str, StringConstraints(min_length=1, max_length=317)]
    """The label key the requirement applies to."""
    operator: SelectorOperator
    """In, NotIn, Exists or DoesNotExist."""
    values: list[LabelValue] = Field(default_factory=list, max_length=64)
    """Label values: non-empty for In and NotIn, empty for Exists and DoesNotExist."""


class LabelSelector(ApiModel):
    """A Kubernetes label selector; all of its requirements must match. Empty matches everything."""

    match_labels: dict[str, LabelValue] = Field(default_factory=dict, max_length=64)
    """Labels that must be present with exactly these values."""
    match_expressions: list[LabelSelectorRequirement] = Field(default_factory=list, max_length=16)
    """Further requirements on labels."""


# --- conditions ---------------------------------------------------------------------------------


class ConditionStatus(enum.StrEnum):
    """Whether a condition holds."""

    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class ConditionType(enum.StrEnum):
    """The condition types every kind with conditions reports, with the meaning tools give them.

    They follow kstatus (sigs.k8s.io/cli-utils), which Flux, `kubectl wait` and Argo CD's health
    checks (manifests/gitops/) read: `Ready` is the summary a person or a pipeline waits for;
    `Reconciling` and `Stalled` are "abnormal-true" (absent means False). Together with
    `status.observedGeneration` they tell a client whether the status describes the current spec:
    kstatus reads an object as InProgress while its observedGeneration lags metadata.generation or
    Reconciling is True, as Failed while Stalled is True, and as Current otherwise. Kinds add their
    own types beside these (e.g. a VPG's RPOMet).
    """

    READY = "Ready"
    """True when the object is what its spec asks for; False says why not (reason, message)."""
    RECONCILING = "Reconciling"
    """True while the operator works toward the spec (e.g. a VPG's initial sync)."""
    STALLED = "Stalled"
    """True when the operator cannot make progress until someone changes something (e.g. the
    spec names a Site that does not exist); Ready is then False with the same reason."""


class Condition(ApiModel):
    """The state of one aspect of an object, following the Kubernetes API conventions."""

    type: Annotated[
        str,
        StringConstraints(
            pattern=r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
            r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$",
            max_length=316,
        ),
    ]
    """The aspect, in CamelCase, e.g. Ready."""
    status: ConditionStatus
    """True, False or Unknown."""
    observed_generation: Annotated[int, Field(ge=0)] | None = None
    """The metadata.generation the condition was computed from."""
    last_transition_time: AwareDatetime
    """When the status last changed."""
    reason: Annotated[
        str,
        StringConstraints(
            pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$", min_length=1, max_length=1024
        ),
    ]
    """Why, as a CamelCase word a program can match, e.g. JournalFull."""
    message: Annotated[str, StringConstraints(max_length=32768)]
    """Why, for people: what happened and what to do about it."""


Conditions = Annotated[
    list[Condition],
    Field(
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]}
    ),
]
"""A list of conditions, at most one of each type."""
