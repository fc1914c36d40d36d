"""The helper go.mod is derived from the kubernetes module's own go.mod."""

from __future__ import annotations

import pytest

from secondsite.devcluster import build

KUBE_GO_MOD = """module k8s.io/kubernetes

go 1.24.0

require (
	go.etcd.io/etcd/client/v3 v3.6.4
	go.etcd.io/etcd/server/v3 v3.6.4 // indirect
	k8s.io/api v0.0.0
	k8s.io/client-go v0.0.0
)

replace (
	k8s.io/api => ./staging/src/k8s.io/api
	k8s.io/client-go => ./staging/src/k8s.io/client-go
	k8s.io/kube-openapi => k8s.io/kube-openapi v0.0.0-2025
)
"""


def test_helper_go_mod_replaces_each_staging_module_with_published_version() -> None:
    text = build.helper_go_mod("1.34.4", KUBE_GO_MOD)
    assert "\tk8s.io/kubernetes v1.34.4" in text
    assert "\tgo.etcd.io/etcd/server/v3 v3.6.4" in text
    assert "\tk8s.io/api => k8s.io/api v0.34.4" in text
    assert "\tk8s.io/client-go => k8s.io/client-go v0.34.4" in text
    # Non-staging replacements of the kubernetes module are not ours to repeat.
    assert "kube-openapi" not in text


def test_helper_go_mod_refuses_a_go_mod_without_staging() -> None:
    with pytest.raises(build.BuildError, match="staging"):
        build.helper_go_mod("1.34.4", "module k8s.io/kubernetes\n")


@pytest.mark.parametrize(("version", "staging"), [("1.34.4", "v0.34.4"), ("1.35.0", "v0.35.0")])
def test_staging_version(version: str, staging: str) -> None:
    assert build.staging_version(version) == staging


def test_staging_version_rejects_other_majors() -> None:
    with pytest.raises(ValueError, match="unsupported"):
        build.staging_version("2.0.0")


def test_ldflags_stamp_the_release() -> None:
    flags = build._ldflags("1.34.4")
    assert "-X k8s.io/component-base/version.gitVersion=v1.34.4" in flags
    assert "-X k8s.io/client-go/pkg/version.gitMinor=34" in flags


def test_cache_root_honours_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECONDSITE_CACHE", "/somewhere/else")
    assert str(build.toolchain("1.34.4").bin_dir) == "/somewhere/else/k8s-v1.34.4/bin"
