"""The helper go.mod files of the engine build, and the versions it must agree on."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from secondsite.devcluster import pulumi_build
from secondsite.devcluster.build import BuildError

CLIPBOARD = "github.com/tgummerer/clipboard v0.0.0-20241001131231-d02d263e614e"
PKG_GO_MOD = f"""module github.com/pulumi/pulumi/pkg/v3

go 1.26.6

replace github.com/pulumi/pulumi/sdk/v3 => ../sdk

replace github.com/atotto/clipboard => {CLIPBOARD}

require (
	github.com/pulumi/pulumi/sdk/v3 v3.260.0
	github.com/atotto/clipboard v0.1.4 // indirect
)

replace (
	example.com/a v1.0.0 => example.com/b v1.1.0 // a comment
	example.com/c => ./third_party/c
)
"""


def test_replacements_single_line_and_block() -> None:
    found = pulumi_build.replacements(PKG_GO_MOD)
    assert [(r.old, r.new, r.is_local) for r in found] == [
        ("github.com/pulumi/pulumi/sdk/v3", "../sdk", True),
        (
            "github.com/atotto/clipboard",
            "github.com/tgummerer/clipboard v0.0.0-20241001131231-d02d263e614e",
            False,
        ),
        ("example.com/a v1.0.0", "example.com/b v1.1.0", False),
        ("example.com/c", "./third_party/c", True),
    ]


def test_helper_go_mod_keeps_remote_replacements_and_publishes_local_ones() -> None:
    text = pulumi_build.helper_go_mod(
        "pulumibuild",
        {"github.com/pulumi/pulumi/pkg/v3": "v3.260.0"},
        PKG_GO_MOD,
        {"github.com/pulumi/pulumi/sdk/v3": "v3.260.0", "example.com/c": "v0.3.0"},
    )
    lines = text.splitlines()
    assert "module secondsite.local/pulumibuild" in lines
    assert "go 1.26.6" in lines
    assert "\tgithub.com/pulumi/pulumi/pkg/v3 v3.260.0" in lines
    assert "\tgithub.com/pulumi/pulumi/sdk/v3 => github.com/pulumi/pulumi/sdk/v3 v3.260.0" in lines
    assert (
        "\tgithub.com/atotto/clipboard => "
        "github.com/tgummerer/clipboard v0.0.0-20241001131231-d02d263e614e"
    ) in lines
    assert "\texample.com/a v1.0.0 => example.com/b v1.1.0" in lines
    assert "\texample.com/c => example.com/c v0.3.0" in lines


def test_helper_go_mod_refuses_a_local_replacement_without_a_published_version() -> None:
    with pytest.raises(BuildError, match=r"example\.com/c with the directory \./third_party/c"):
        pulumi_build.helper_go_mod(
            "x", {}, PKG_GO_MOD, {"github.com/pulumi/pulumi/sdk/v3": "v3.260.0"}
        )


def test_helper_go_mod_needs_a_go_directive() -> None:
    with pytest.raises(BuildError, match="go directive"):
        pulumi_build.helper_go_mod("x", {}, "module m\n", {})


def test_python_sdks_are_pinned_to_the_built_engine() -> None:
    # The SDK asks the engine for the kubernetes plugin of its own version, and the CLI should
    # be the release of the `pulumi` SDK: the pins in pyproject.toml and the build must agree.
    pyproject = tomllib.loads((Path(__file__).parents[3] / "pyproject.toml").read_text())
    pins = pyproject["project"]["optional-dependencies"]["pulumi"]
    assert f"pulumi=={pulumi_build.PULUMI_VERSION}" in pins
    assert f"pulumi-kubernetes=={pulumi_build.KUBERNETES_PLUGIN_VERSION}" in pins


def test_installed_sdks_match_the_pins() -> None:
    from importlib.metadata import version

    assert version("pulumi") == pulumi_build.PULUMI_VERSION
    assert version("pulumi-kubernetes") == pulumi_build.KUBERNETES_PLUGIN_VERSION
