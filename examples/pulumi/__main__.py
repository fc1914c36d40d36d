"""Protect a web shop with SecondSite: its database and media volumes, replicated from the east
site to the west site, with a 48 h journal and a tagged checkpoint before each upgrade.

Config (see Pulumi.yaml for defaults): namespace, app, protectedSite, recoverySite,
rpoAlertSeconds, checkpointTags, waitForReady, readyTimeoutSeconds.
"""

import pulumi
import pulumi_kubernetes as k8s

import secondsite.pulumi_provider as ss

config = pulumi.Config()  # defaults are in Pulumi.yaml
namespace_name = config.require("namespace")
app = config.require("app")
protected_site = config.require("protectedSite")
recovery_site = config.require("recoverySite")
rpo_alert_seconds = config.require_int("rpoAlertSeconds")
checkpoint_tags = [
    tag.strip() for tag in config.require("checkpointTags").split(",") if tag.strip()
]
wait = None
if config.require_bool("waitForReady"):
    wait = ss.ReadyWait(timeout_seconds=config.require_int("readyTimeoutSeconds"))

# A site is a pool of nodes, chosen by label.
sites = [
    ss.Site(name, spec=ss.SiteSpec(node_selector={"secondsite.io/site": name}))
    for name in (protected_site, recovery_site)
]

namespace = k8s.core.v1.Namespace(namespace_name, metadata={"name": namespace_name})

shop = ss.ProtectedApplication(
    app,
    ss.VirtualProtectionGroupSpec(
        protected_site=protected_site,
        recovery_site=recovery_site,
        volumes=ss.VpgVolumes(names=[f"{app}-db", f"{app}-media"]),
        workloads=[
            ss.Workload(kind=ss.WorkloadKind.STATEFUL_SET, name=f"{app}-db", boot_order=0),
            ss.Workload(kind=ss.WorkloadKind.DEPLOYMENT, name=f"{app}-web", boot_order=1),
        ],
        priority=ss.Priority.HIGH,
        rpo_alert_seconds=rpo_alert_seconds,
        journal=ss.JournalPolicy(history="48h", hard_limit="200Gi"),
    ),
    namespace=namespace.metadata.name,
    checkpoint_tags=checkpoint_tags,
    wait_for_ready=wait,
    opts=pulumi.ResourceOptions(depends_on=[*sites, namespace]),
)

pulumi.export("sites", [site.object_name for site in sites])
pulumi.export("vpg", shop.vpg.id)
pulumi.export("checkpoints", {tag: c.id for tag, c in shop.checkpoints.items()})
if shop.ready is not None:
    pulumi.export("ready", shop.ready)
