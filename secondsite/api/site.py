"""Site: where volumes live, and where appliances keep journals and replicas.

A site is a pool of nodes of this cluster, chosen by a node selector (conventionally the label
`secondsite.io/site=<site name>`). The operator runs one ReplicationAppliance on every node of a
site. A VPG replicates from its protected site to its recovery site.
"""

from typing import Annotated

from pydantic import Field, StringConstraints

from secondsite.api.common import ApiModel, Conditions


class SiteStorage(ApiModel):
    """Where the appliances of a site keep their data."""

    path: Annotated[str, StringConstraints(pattern=r"^/", max_length=4096)] = "/var/lib/secondsite"
    """Directory on each node of the site for journals and replica volumes."""


class SiteSpec(ApiModel):
    """The nodes of a site and where they keep data."""

    node_selector: dict[str, Annotated[str, StringConstraints(max_length=63)]] = Field(
        min_length=1, max_length=16
    )
    """Labels a node must have to belong to the site, e.g. `secondsite.io/site: protected`."""
    storage: SiteStorage = SiteStorage()
    """Where the site's appliances keep journals and replica volumes."""


class SiteStatus(ApiModel):
    """What the operator observes of a site."""

    observed_generation: int | None = None
    """The metadata.generation this status describes."""
    conditions: Conditions = Field(default_factory=list)
    """Ready: every node of the site runs a ready appliance; Reconciling and Stalled
    (kstatus conventions)."""
    appliances: int | None = None
    """Appliances of the site (one per selected node)."""
    ready_appliances: int | None = None
    """Appliances whose Ready condition is True."""
