"""manifests/samples: one valid object of every kind, all listed in the kustomization."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from secondsite.api import API_VERSION, KINDS, SiteSpec, kind_named

SAMPLES = Path(__file__).resolve().parents[3] / "manifests" / "samples"
SAMPLE_FILES = sorted(path for path in SAMPLES.glob("*.yaml") if path.name != "kustomization.yaml")


def load(path: Path) -> dict[str, Any]:
    (document,) = yaml.safe_load_all(path.read_text())
    assert isinstance(document, dict)
    return document


@pytest.mark.parametrize("path", SAMPLE_FILES, ids=[path.name for path in SAMPLE_FILES])
def test_sample_is_valid(path: Path) -> None:
    sample = load(path)
    assert sample["apiVersion"] == API_VERSION
    assert set(sample) == {"apiVersion", "kind", "metadata", "spec"}
    kind = kind_named(sample["kind"])
    kind.spec.model_validate(sample["spec"])
    assert "namespace" not in sample["metadata"], "the namespace is chosen when applying"


def test_kustomization_lists_every_sample() -> None:
    kustomization = load(SAMPLES / "kustomization.yaml")
    assert sorted(kustomization["resources"]) == sorted(path.name for path in SAMPLE_FILES)


def test_every_kind_has_a_sample() -> None:
    kinds = [load(path)["kind"] for path in SAMPLE_FILES]
    assert set(kinds) == {kind.kind for kind in KINDS}


def test_sites_select_their_nodes_by_the_site_label() -> None:
    sites = {
        sample["metadata"]["name"]: SiteSpec.model_validate(sample["spec"])
        for sample in map(load, SAMPLE_FILES)
        if sample["kind"] == "Site"
    }
    assert sorted(sites) == ["protected", "recovery"]
    for name, site in sites.items():
        assert site.node_selector == {"secondsite.io/site": name}


def test_samples_refer_to_each_other() -> None:
    samples = [load(path) for path in SAMPLE_FILES]
    names = {(sample["kind"], sample["metadata"]["name"]) for sample in samples}
    for sample in samples:
        spec = sample["spec"]
        for field, kind in [("vpg", "VirtualProtectionGroup"), ("site", "Site")]:
            if field in spec:
                assert (kind, spec[field]) in names, f"{sample['kind']} refers to a missing {kind}"
        for field in ("protectedSite", "recoverySite"):
            if field in spec:
                assert ("Site", spec[field]) in names
    operations = [
        sample["spec"]["operation"] for sample in samples if sample["kind"] == "RecoveryRequest"
    ]
    assert operations == ["FailoverTest"]
