"""The manifests the resources send, field by field, and the specs they refuse to send."""

from __future__ import annotations

import typing

import pulumi
import pytest
from pulumi_mocks import Runner

import secondsite.pulumi_provider as ss
from secondsite.api import KINDS

TYPE_PREFIX = "kubernetes:secondsite.io/v1alpha1:"


def minimal_vpg_spec() -> ss.VirtualProtectionGroupSpec:
    return ss.VirtualProtectionGroupSpec(
        protected_site="east", recovery_site="west", volumes=ss.VpgVolumes(names=["db"])
    )


def test_every_kind_has_a_class_whose_spec_type_is_the_kinds_model() -> None:
    assert [cls.secondsite_kind for cls in ss.RESOURCE_CLASSES] == list(KINDS)
    for cls in ss.RESOURCE_CLASSES:
        (base,) = cls.__orig_bases__  # type: ignore[attr-defined]
        (spec_type,) = typing.get_args(base)
        assert spec_type is cls.secondsite_kind.spec, cls.__name__
        assert cls.__name__ == cls.secondsite_kind.kind


def test_vpg_manifest_carries_only_what_the_program_set(pulumi_run: Runner) -> None:
    regs = pulumi_run(
        lambda: ss.VirtualProtectionGroup(
            "shop", spec=minimal_vpg_spec(), metadata={"namespace": "shop", "labels": {"a": "b"}}
        )
    )
    vpg = pulumi_run.one(regs, "VirtualProtectionGroup")
    assert vpg.type == TYPE_PREFIX + "VirtualProtectionGroup"
    assert vpg.name == "shop"
    # Defaults (priority, rpoAlertSeconds, journal, ...) are the API server's to fill in, from
    # the CRD generated from the same models: none of them is sent.
    assert vpg.inputs == {
        "apiVersion": "secondsite.io/v1alpha1",
        "kind": "VirtualProtectionGroup",
        "metadata": {"name": "shop", "namespace": "shop", "labels": {"a": "b"}},
        "spec": {"protectedSite": "east", "recoverySite": "west", "volumes": {"names": ["db"]}},
    }


def test_nested_template_sends_the_fields_set_in_camel_case(pulumi_run: Runner) -> None:
    spec = minimal_vpg_spec()
    spec.journal = ss.JournalPolicy(history="48h", hard_limit="20Gi")
    spec.priority = ss.Priority.MEDIUM  # the default, but said explicitly: it is sent
    spec.workloads = [ss.Workload(kind=ss.WorkloadKind.STATEFUL_SET, name="db", boot_order=1)]
    regs = pulumi_run(lambda: ss.VirtualProtectionGroup("shop", spec=spec))
    sent = pulumi_run.one(regs, "VirtualProtectionGroup").inputs["spec"]
    assert sent["journal"] == {"history": "48h", "hardLimit": "20Gi"}
    assert sent["priority"] == "Medium"
    assert sent["workloads"] == [{"kind": "StatefulSet", "name": "db", "bootOrder": 1}]
    assert "rpoAlertSeconds" not in sent


@pytest.mark.parametrize(
    "spec",
    [
        {
            "protectedSite": "east",
            "recoverySite": "west",
            "volumes": {"selector": {"matchLabels": {"app": "shop"}}},
            "rpoAlertSeconds": 60,
        },
        {
            "protected_site": "east",
            "recovery_site": "west",
            "volumes": {"selector": {"match_labels": {"app": "shop"}}},
            "rpo_alert_seconds": 60,
        },
    ],
    ids=["camelCase", "snake_case"],
)
def test_a_mapping_spec_is_sent_in_the_apis_names(
    pulumi_run: Runner, spec: dict[str, object]
) -> None:
    regs = pulumi_run(lambda: ss.VirtualProtectionGroup("shop", spec=spec))
    assert pulumi_run.one(regs, "VirtualProtectionGroup").inputs["spec"] == {
        "protectedSite": "east",
        "recoverySite": "west",
        "volumes": {"selector": {"matchLabels": {"app": "shop"}}},
        "rpoAlertSeconds": 60,
    }


def test_site_is_cluster_scoped(pulumi_run: Runner) -> None:
    regs = pulumi_run(
        lambda: ss.Site("east", spec=ss.SiteSpec(node_selector={"secondsite.io/site": "east"}))
    )
    site = pulumi_run.one(regs, "Site")
    assert site.type == TYPE_PREFIX + "Site"
    assert site.inputs == {
        "apiVersion": "secondsite.io/v1alpha1",
        "kind": "Site",
        "metadata": {"name": "east"},
        "spec": {"nodeSelector": {"secondsite.io/site": "east"}},
    }
    with pytest.raises(ss.InvalidSpecError, match=r"metadata.namespace: a Site is cluster-scoped"):
        ss.Site("west", spec={"nodeSelector": {"a": "b"}}, metadata={"namespace": "x"})


def test_other_kinds_manifests(pulumi_run: Runner) -> None:
    def program() -> None:
        ss.Checkpoint("before", spec=ss.CheckpointSpec(vpg="shop", tag="before-upgrade"))
        ss.RecoveryRequest(
            "test-1", spec={"vpg": "shop", "operation": "FailoverTest"}, metadata={"name": "t1"}
        )
        ss.Journal("shop-journal", spec={"vpg": "shop", "history": "2h"})
        ss.ReplicationAppliance("node-1", spec={"site": "east", "nodeName": "node-1"})

    regs = pulumi_run(program)
    assert pulumi_run.one(regs, ":Checkpoint").inputs["spec"] == {
        "vpg": "shop",
        "tag": "before-upgrade",
    }
    rr = pulumi_run.one(regs, ":RecoveryRequest")
    assert rr.inputs["metadata"] == {"name": "t1"}
    # The default checkpoint selector (latest) is left to the API server too.
    assert rr.inputs["spec"] == {"vpg": "shop", "operation": "FailoverTest"}
    assert pulumi_run.one(regs, ":Journal").inputs["spec"] == {"vpg": "shop", "history": "2h"}
    vra = pulumi_run.one(regs, ":ReplicationAppliance")
    assert vra.inputs["kind"] == "ReplicationAppliance"
    assert vra.inputs["spec"] == {"site": "east", "nodeName": "node-1"}


BAD_SPECS = [
    pytest.param(
        ss.VirtualProtectionGroup,
        {
            "protectedSite": "east",
            "recoverySite": "west",
            "volumes": {"names": ["db"]},
            "checkpointIntervalSeconds": 0,
        },
        "spec.checkpointIntervalSeconds: Input should be greater than or equal to 1",
        id="checkpointIntervalSeconds below 1",
    ),
    pytest.param(
        ss.VirtualProtectionGroup,
        {"protectedSite": "east", "recoverySite": "east", "volumes": {"names": ["db"]}},
        "spec.recoverySite: recoverySite must differ from protectedSite",
        id="protectedSite == recoverySite",
    ),
    pytest.param(
        ss.VirtualProtectionGroup,
        {
            "protectedSite": "east",
            "recoverySite": "west",
            "volumes": {"names": ["db"]},
            "rpoAlertSeconds": 10,
            "checkpointIntervalSeconds": 30,
        },
        "spec.rpoAlertSeconds: rpoAlertSeconds must be greater than checkpointIntervalSeconds",
        id="rpo alert not above interval",
    ),
    pytest.param(
        ss.VirtualProtectionGroup,
        {
            "protectedSite": "east",
            "recoverySite": "west",
            "volumes": {"names": ["db"], "selector": {"matchLabels": {"a": "b"}}},
        },
        "spec.volumes: volumes needs exactly one of names and selector",
        id="names and selector",
    ),
    pytest.param(
        ss.VirtualProtectionGroup,
        {
            "protectedSite": "east",
            "recoverySite": "west",
            "volumes": {"names": ["db"]},
            "journal": {"history": "31d"},
        },
        "spec.journal.history: history must be between 1h and 30d",
        id="history above 30d",
    ),
    pytest.param(
        ss.VirtualProtectionGroup,
        {
            "protectedSite": "east",
            "recoverySite": "west",
            "volumes": {"names": ["db"]},
            "rpoAlertSecond": 60,
        },
        "spec.rpoAlertSecond: Extra inputs are not permitted",
        id="typo in a field name",
    ),
    pytest.param(
        ss.RecoveryRequest,
        {
            "vpg": "shop",
            "operation": "Failover",
            "checkpoint": {"latest": True, "tag": "before-upgrade"},
        },
        "spec.checkpoint: checkpoint needs exactly one of latest: true, time, tag and id",
        id="two checkpoint selectors",
    ),
    pytest.param(
        ss.RecoveryRequest,
        {"vpg": "shop", "operation": "Clone", "action": "Commit"},
        "spec.action: action must be Stop for a FailoverTest",
        id="action on a Clone",
    ),
    pytest.param(
        ss.Checkpoint,
        {"vpg": "Shop_DB", "tag": "x"},
        "spec.vpg: String should match pattern",
        id="vpg not a name",
    ),
]


@pytest.mark.parametrize(("cls", "spec", "message"), BAD_SPECS)
def test_bad_spec_is_refused_before_anything_is_sent(
    pulumi_run: Runner, cls: type[ss.SecondSiteResource[typing.Any]], spec: object, message: str
) -> None:
    caught: list[ss.InvalidSpecError] = []

    def program() -> None:
        with pytest.raises(ss.InvalidSpecError) as info:
            cls("bad", spec=spec)  # type: ignore[arg-type]
        caught.append(info.value)

    regs = pulumi_run(program)
    assert regs == [], "nothing may reach the engine"
    (error,) = caught
    assert message in str(error)
    assert str(error).startswith(f"invalid {cls.__name__} 'bad': ")
    # A RunError prints without a traceback in the CLI; a ValueError for plain Python callers.
    assert isinstance(error, pulumi.RunError)
    assert isinstance(error, ValueError)


def test_a_model_changed_after_construction_is_checked_again() -> None:
    spec = minimal_vpg_spec()
    spec.checkpoint_interval_seconds = 0  # pydantic does not validate assignments
    with pytest.raises(ss.InvalidSpecError, match=r"spec.checkpointIntervalSeconds"):
        ss.VirtualProtectionGroup("shop", spec=spec)


def test_a_spec_model_of_another_kind_is_refused() -> None:
    with pytest.raises(ss.InvalidSpecError, match="expected VirtualProtectionGroupSpec"):
        ss.VirtualProtectionGroup("shop", spec=ss.CheckpointSpec(vpg="a", tag="b"))  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["Shop", "shop_db", "-shop", "a" * 254])
def test_object_names_must_be_dns_subdomains(name: str) -> None:
    with pytest.raises(ss.InvalidSpecError, match=r"metadata\.name"):
        ss.VirtualProtectionGroup("shop", spec=minimal_vpg_spec(), metadata={"name": name})


@pytest.mark.parametrize(
    ("cls", "spec", "immutable"),
    [
        (ss.Checkpoint, {"vpg": "shop", "tag": "t"}, ["spec.vpg", "spec.tag"]),
        (
            ss.VirtualProtectionGroup,
            {"protectedSite": "a", "recoverySite": "b", "volumes": {"names": ["db"]}},
            ["spec.protectedSite", "spec.recoverySite"],
        ),
        (
            ss.RecoveryRequest,
            {"vpg": "shop", "operation": "Failover"},
            # Not `action`: it may be given later, once; only changing it is refused.
            [
                "spec.vpg",
                "spec.operation",
                "spec.checkpoint",
                "spec.sourceShutdown",
                "spec.reverseProtection",
            ],
        ),
        (ss.Journal, {"vpg": "shop"}, ["spec.vpg"]),
        (ss.ReplicationAppliance, {"site": "a", "nodeName": "n"}, ["spec.site", "spec.nodeName"]),
        (ss.Site, {"nodeSelector": {"a": "b"}}, []),
    ],
)
def test_a_change_of_an_immutable_field_replaces_the_object(
    pulumi_run: Runner,
    cls: type[ss.SecondSiteResource[typing.Any]],
    spec: dict[str, object],
    immutable: list[str],
) -> None:
    regs = pulumi_run(lambda: cls("x", spec=spec))
    (reg,) = regs
    assert sorted(reg.replace_on_changes) == sorted(immutable)
    # Same name, so the old object must go first.
    assert reg.delete_before_replace is bool(immutable)


def test_the_programs_options_still_apply(pulumi_run: Runner) -> None:
    regs = pulumi_run(
        lambda: ss.Checkpoint(
            "x",
            spec={"vpg": "shop", "tag": "t"},
            opts=pulumi.ResourceOptions(delete_before_replace=False, replace_on_changes=["*"]),
        )
    )
    (reg,) = regs
    assert reg.delete_before_replace is False
    assert "*" in reg.replace_on_changes
