"""Run Pulumi programs against `pulumi.runtime.set_mocks`, recording what reaches the engine.

`pulumi_run(program)` runs `program` the way the engine would (in Pulumi's event loop, waiting for
every registration) and returns the registrations: type token, name, the inputs as serialized for
the engine (that is, the manifest the kubernetes provider receives), parent and dependencies.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pulumi
from pulumi.runtime import mocks


@dataclasses.dataclass
class Registration:
    type: str
    name: str
    urn: str
    inputs: dict[str, Any]
    parent: str
    dependencies: list[str]
    replace_on_changes: list[str]
    delete_before_replace: bool
    outputs: dict[str, Any] = dataclasses.field(default_factory=dict)


class _Mocks(mocks.Mocks):
    def new_resource(self, args: mocks.MockResourceArgs) -> tuple[str | None, dict[str, Any]]:
        metadata = args.inputs.get("metadata") or {}
        name = metadata.get("name", args.name)
        namespace = metadata.get("namespace")
        return (f"{namespace}/{name}" if namespace else name), dict(args.inputs)

    def call(self, args: mocks.MockCallArgs) -> tuple[dict[str, Any], list[tuple[str, str]]]:
        return {}, []


class RecordingMonitor(mocks.MockMonitor):
    """The mock monitor, also keeping what each registration asked for."""

    def __init__(self) -> None:
        super().__init__(_Mocks())
        self.registrations: list[Registration] = []

    def RegisterResource(self, request: Any) -> Any:
        response = super().RegisterResource(request)
        if request.type != "pulumi:pulumi:Stack":
            self.registrations.append(
                Registration(
                    type=request.type,
                    name=request.name,
                    urn=response.urn,
                    inputs=self.resources[response.urn].state if request.custom else {},
                    parent=request.parent,
                    dependencies=list(request.dependencies),
                    replace_on_changes=list(request.replaceOnChanges),
                    delete_before_replace=request.deleteBeforeReplace,
                )
            )
        return response

    def RegisterResourceOutputs(self, request: Any) -> Any:
        from pulumi.runtime import rpc

        for registration in self.registrations:
            if registration.urn == request.urn:
                registration.outputs = dict(rpc.deserialize_properties(request.outputs))
        return super().RegisterResourceOutputs(request)


class Runner:
    def __init__(self) -> None:
        self.monitor = RecordingMonitor()

    def __call__(
        self, program: Callable[[], object], *, preview: bool = False
    ) -> list[Registration]:
        mocks.set_mocks(self.monitor.mocks, preview=preview, monitor=self.monitor)
        self.monitor.registrations.clear()

        @pulumi.runtime.test  # type: ignore[untyped-decorator,unused-ignore]
        def run() -> None:
            program()

        run()
        return list(self.monitor.registrations)

    def one(self, registrations: list[Registration], type_suffix: str) -> Registration:
        found = [r for r in registrations if r.type.endswith(type_suffix)]
        assert len(found) == 1, f"expected one {type_suffix}, got {[r.name for r in found]}"
        return found[0]
