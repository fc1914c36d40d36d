"""Reverse protection: after a failover, protect the recovered volumes back to the site they came
from; reversing again later is the failback.

A VPG replicated from appliance P (a `protected` entry, in-path volumes) to appliance R (a journal
with `sources: [P]`) is failed over on R: promoted to a checkpoint and committed, so that each
replica on R holds the volume's state at that checkpoint. Reversing then swaps the roles, on
each appliance with its own call (:func:`plan_reverse` plans one appliance's side):

- on R (the former recovery appliance) the journal goes away (after the commit it holds nothing
  the replicas lack), each replica file becomes an in-path volume of that name (`backing` = the
  replica), and a `protected` entry streams them to P with a delta initial sync;
- on P (the former protected appliance) the volumes stop being served (the workload runs on R
  now) and the VPG gets a journal fed by R, whose replica of each volume is the file that was its
  backing store: a delta sync ships only the blocks that differ.

Every volume keeps its name and size; the data files stay where they are and only change roles,
so that failing back (promote and commit on P, reverse both again) returns each volume to its
original file. Stale state is discarded between stopping the VPG in its old role and starting it
in the new one (:meth:`ReversePlan.stale_journals`, :meth:`ReversePlan.stale_sync_states`): the
state of the role it leaves (R's journal: its positions and checkpoints; P's sync state: which
volumes are synced), and whatever an earlier role left in the new role's directory, so that a
later failback into the same directories starts clean.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel
from pydantic.alias_generators import to_camel

from secondsite.appliance.config import (
    ApplianceConfig,
    CaptureMode,
    InitialSync,
    JournalSpec,
    ProtectedVpgSpec,
    VolumeSpec,
)
from secondsite.appliance.control.errors import ApplyInvalid, ReverseRefused, UnknownVpgError

__all__ = ["RecoveredVpg", "ReversePlan", "ReverseRefused", "ReverseRole", "plan_reverse"]

_Spec = TypeVar("_Spec", bound=BaseModel)


class ReverseRole(enum.StrEnum):
    """The role this appliance takes for the VPG after reversing."""

    PROTECTED = "protected"
    """It was the recovery appliance: it now serves the volumes and streams them."""
    RECOVERY = "recovery"
    """It was the protected appliance: it now journals the other appliance's stream."""


@dataclasses.dataclass(frozen=True)
class RecoveredVpg:
    """What the runtime knows of a stream-fed VPG beyond its config."""

    failover_phase: str | None
    """The journal's failover phase (None, or `promoted` between promote and commit/rollback)."""
    committed_checkpoint: int | None
    """The id of the checkpoint of the newest failover committed in the journal (None: none)."""
    replicas: dict[str, Path]
    """The journal's replica file of each volume, by volume name."""
    images: list[str] = dataclasses.field(default_factory=list)
    """Ids of the PIT images pinned on the VPG through the API (their NBD clients would lose
    them with the journal)."""


@dataclasses.dataclass(frozen=True)
class ReversePlan:
    role: ReverseRole
    config: ApplianceConfig
    """The appliance's config with the VPG reversed: apply it like a `PUT /v1/config`."""
    former: ApplianceConfig
    """The config it was planned from; equal to ``config`` when the VPG had ``role`` already
    (a repeated call: nothing to do)."""
    vpg: str

    def stale_journals(self) -> list[Path]:
        """Directories whose journal files go before the VPG starts in its new role: the
        journal it leaves (becoming protected), or an old journal in the new journal's
        directory (becoming recovery). None when nothing changes."""
        if self.config == self.former:
            return []
        config = self.former if self.role is ReverseRole.PROTECTED else self.config
        return [config.journal_for(self.vpg).directory]

    def stale_sync_states(self) -> list[tuple[ProtectedVpgSpec, list[VolumeSpec]]]:
        """Protected entries (with their volumes) whose sync state goes before the VPG starts
        in its new role: the one it leaves (becoming recovery), or an old one in the new
        entry's directory (becoming protected). None when nothing changes."""
        if self.config == self.former:
            return []
        config = self.former if self.role is ReverseRole.RECOVERY else self.config
        return [(config.protected_for(self.vpg), config.volumes_of(self.vpg))]


def plan_reverse(
    config: ApplianceConfig,
    vpg: str,
    role: ReverseRole,
    *,
    peer: str,
    peer_stream: str | None = None,
    directory: Path | None = None,
    settings: Mapping[str, Any] | None = None,
    recovered: RecoveredVpg | None = None,
) -> ReversePlan:
    """``config`` with ``vpg`` reversed (module doc) so that this appliance takes ``role`` for
    it; a pure function. Idempotent: when the VPG has ``role`` here already, with ``peer`` at the
    other end, the plan changes nothing (a repeated call must not swap the direction back).

    ``peer``: the other appliance's name (its identity in replication streams); ``peer_stream``:
    its stream listener (`host:port`), needed where this appliance becomes the protected one;
    ``directory``: where the new role keeps its files (default: where the former role kept
    them); ``settings``: more settings of the new role's spec by their config names (a
    `ProtectedVpgSpec`'s `priority`, `bufferBytes`, `compression`, `initialSync`; a
    `JournalSpec`'s `history`, `hardLimit`, ...), for those the reverse does not decide
    (otherwise the defaults, and `initialSync: delta`); ``recovered``: what the runtime knows
    of a stream-fed VPG here.

    Raises :class:`UnknownVpgError` when the VPG is neither journaled nor protected here, and
    :class:`ReverseRefused` when it cannot be reversed: no committed failover, a promotion not
    yet committed, PIT images open on the journal, a journal of local capture or of several
    sources, mirror-target volumes (no local copy to become a replica), no stream listener to
    receive the reversed stream, or a peer that is not the other end of the VPG;
    :class:`ApplyInvalid` or pydantic's ``ValidationError`` for ``settings`` it does not take.
    """
    journaled = any(j.vpg == vpg for j in config.journals)
    protected = any(p.vpg == vpg for p in config.protected)
    if not journaled and not protected:
        raise UnknownVpgError(f"no VPG {vpg!r} journaled or protected on this appliance")
    if role is ReverseRole.PROTECTED and protected:
        recovery = config.protected_for(vpg).recovery
        if peer_stream is not None and peer_stream != recovery:
            raise ReverseRefused(
                f"VPG {vpg} is protected here already, streaming to {recovery}, not {peer_stream}"
            )
        return ReversePlan(role, config, config, vpg)
    if role is ReverseRole.RECOVERY and journaled:
        sources = config.journal_for(vpg).sources
        if sources != [peer]:
            raise ReverseRefused(
                f"VPG {vpg} is journaled here already, from {', '.join(sources) or 'local capture'}"
                f", not from {peer}"
            )
        return ReversePlan(role, config, config, vpg)
    if journaled:
        if recovered is None:
            raise ValueError("reversing a journaled VPG needs what the runtime knows of it")
        return _recovery_to_protected(
            config, vpg, peer, peer_stream, directory, settings or {}, recovered
        )
    return _protected_to_recovery(config, vpg, peer, directory, settings or {})


def _recovery_to_protected(
    config: ApplianceConfig,
    vpg: str,
    peer: str,
    peer_stream: str | None,
    directory: Path | None,
    settings: Mapping[str, Any],
    recovered: RecoveredVpg,
) -> ReversePlan:
    journal = config.journal_for(vpg)
    if not journal.sources:
        raise ReverseRefused(
            f"VPG {vpg} is journaled from this appliance's own volumes (local capture): there is "
            "no other site to reverse to"
        )
    phase = recovered.failover_phase
    if phase == "promoted":
        raise ReverseRefused(
            f"VPG {vpg} is promoted to a checkpoint but not committed: commit the failover "
            "(or roll it back) first"
        )
    if phase is not None:
        raise ReverseRefused(f"VPG {vpg} is in failover phase {phase}; wait until it ends")
    if recovered.images:
        raise ReverseRefused(
            f"images {', '.join(recovered.images)} of VPG {vpg} are open, and the journal goes "
            "away with the reverse: delete them first"
        )
    if recovered.committed_checkpoint is None:
        raise ReverseRefused(
            f"no failover of VPG {vpg} was committed on this appliance: promote to a "
            "checkpoint and commit first, so that the replicas are the volumes"
        )
    if len(journal.sources) > 1:
        raise ReverseRefused(
            f"VPG {vpg} is fed by several appliances ({', '.join(journal.sources)}): reverse "
            "protection streams every volume back to the one appliance it came from"
        )
    if journal.sources != [peer]:
        raise ReverseRefused(
            f"{peer} is not the appliance VPG {vpg} came from (its source: {journal.sources[0]})"
        )
    if peer_stream is None:
        raise ReverseRefused(
            f"give the stream address of {peer} (its listen.stream): this appliance becomes "
            f"the protected side of VPG {vpg} and streams to it"
        )
    if config.source_name is None:
        raise ReverseRefused(
            "this appliance needs a `name` (or `node`) to stream under; restart it with one"
        )
    if not recovered.replicas:
        raise ReverseRefused(f"the journal of VPG {vpg} has no volumes yet: nothing to protect")
    taken = sorted({v.name for v in config.volumes} & recovered.replicas.keys())
    if taken:
        raise ReverseRefused(
            f"volumes {', '.join(taken)} of VPG {vpg} would clash with volumes of the same "
            "name served here"
        )
    volumes = [
        VolumeSpec(name=name, vpg=vpg, capture=CaptureMode.IN_PATH, backing=path)
        for name, path in sorted(recovered.replicas.items())
    ]
    protected = _new_spec(
        ProtectedVpgSpec,
        {"initialSync": InitialSync.DELTA.value, **settings},
        {"vpg": vpg, "recovery": peer_stream, "directory": directory or journal.directory},
    )
    reversed_config = config.model_copy(
        update={
            "journals": [j for j in config.journals if j.vpg != vpg],
            "protected": [*config.protected, protected],
            "volumes": [*config.volumes, *volumes],
        }
    )
    return ReversePlan(ReverseRole.PROTECTED, _validated(reversed_config), config, vpg)


def _protected_to_recovery(
    config: ApplianceConfig,
    vpg: str,
    peer: str,
    directory: Path | None,
    settings: Mapping[str, Any],
) -> ReversePlan:
    protected = config.protected_for(vpg)
    volumes = config.volumes_of(vpg)
    mirrored = [v.name for v in volumes if v.capture is CaptureMode.MIRROR_TARGET]
    if mirrored:
        raise ReverseRefused(
            f"volumes {', '.join(mirrored)} of VPG {vpg} are mirror targets: this appliance keeps "
            "no copy of them to become their replicas"
        )
    if config.listen.stream is None:
        raise ReverseRefused(
            f"this appliance has no stream listener (listen.stream) to receive VPG {vpg} from "
            f"{peer}; restart it with one"
        )
    if peer == config.source_name:
        raise ReverseRefused(f"{peer} is this appliance's own name, not its peer's")
    replicas: dict[str, Path] = {}
    for v in volumes:
        assert v.backing is not None, "in-path volumes have a backing store"
        replicas[v.name] = v.backing
    journal = _new_spec(
        JournalSpec,
        settings,
        {
            "vpg": vpg,
            "directory": directory or protected.directory,
            "sources": [peer],
            "replicas": replicas,
        },
    )
    reversed_config = config.model_copy(
        update={
            "journals": [*config.journals, journal],
            "protected": [p for p in config.protected if p.vpg != vpg],
            "volumes": [v for v in config.volumes if v.vpg != vpg],
        }
    )
    return ReversePlan(ReverseRole.RECOVERY, _validated(reversed_config), config, vpg)


def _new_spec(model: type[_Spec], settings: Mapping[str, Any], decided: dict[str, Any]) -> _Spec:
    """``model`` from the caller's ``settings`` and what the reverse ``decided`` (which the
    settings may not name)."""
    taken = sorted(k for k in settings if to_camel(k) in decided)
    if taken:
        raise ApplyInvalid(
            [
                {
                    "loc": ["body", "settings", k],
                    "msg": f"{to_camel(k)} is decided by the reverse, not a setting",
                    "type": "value_error",
                }
                for k in taken
            ]
        )
    return model.model_validate({**settings, **decided})


def _validated(config: ApplianceConfig) -> ApplianceConfig:
    """``model_copy`` skips validation: check the reversed config as a `PUT` would."""
    return ApplianceConfig.model_validate(config.model_dump(by_alias=True))
