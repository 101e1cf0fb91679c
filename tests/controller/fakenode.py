"""An in-process stand-in for node agents, for controller tests only (the lab tests use the real agent).

It takes desired states the way the agent does: validated by the wire types, an older generation never
applied, one node key per lane made when the lane first appears. It can be cut off to play an
unreachable node, fail to open chosen lanes, and fail chosen grants (an error naming the grant, as the
agent reports one), or speak an older protocol (`versions`).
"""

from __future__ import annotations

import base64
import os
from datetime import UTC, datetime

from controller.nodelink import LinkError
from nodeagent.wire import AgentStatus, DesiredNodeState, ObservedLane, ReconcileReport


class FakeNodes:
    def __init__(self):
        self.desired: dict[str, DesiredNodeState] = {}
        self.keys: dict[tuple[str, str], str] = {}
        self.pushes: list[DesiredNodeState] = []
        self.unreachable: set[str] = set()
        self.refuse_lanes: set[str] = set()  # session IDs this node "fails" to open
        self.refuse_grants: set[str] = set()  # grants it reports an error for
        self.versions: dict[str, int] = {}  # node → the protocol version it reports (default: this one)

    def push(self, desired: DesiredNodeState) -> ReconcileReport:
        desired = DesiredNodeState.model_validate_json(desired.model_dump_json())  # the wire, both ways
        if desired.node_id in self.unreachable:
            raise LinkError(f"node {desired.node_id} is unreachable (fake)")
        self.pushes.append(desired)
        have = self.desired.get(desired.node_id)
        if have is not None and desired.generation < have.generation:
            return ReconcileReport(generation=have.generation, errors=[f"generation {desired.generation} is older than {have.generation}"])
        self.desired[desired.node_id] = desired
        for lane in desired.lanes:
            self.keys.setdefault((desired.node_id, lane.session_id), base64.b64encode(os.urandom(32)).decode())
        errors = [f"grant {g.session_id} for {g.device_id}: could not add its flows (fake)"
                  for g in desired.grants if g.session_id in self.refuse_grants]
        return ReconcileReport(generation=desired.generation, errors=errors)

    def status(self, node: str) -> AgentStatus:
        if node in self.unreachable:
            raise LinkError(f"node {node} is unreachable (fake)")
        now = datetime.now(UTC)
        d = self.desired.get(node)
        lanes = [] if d is None else [
            ObservedLane(session_id=lane.session_id, lane=f"wk{i}", listen_port=lane.listen_port,
                         node_public_key=self.keys[(node, lane.session_id)], engineer_address=str(lane.engineer_address),
                         device_address=str(lane.device_address), allowed=[f.label() for f in lane.flows],
                         end_time=lane.end_time, seconds_left=max(0.0, (lane.end_time - now).total_seconds()))
            for i, lane in enumerate(d.lanes) if lane.session_id not in self.refuse_lanes]
        return AgentStatus(node_id=node, agent_version="fake", backend="userspace", applied_generation=d.generation if d else None,
                           lanes=lanes, pending_evidence=0, clock_synchronized=True,
                           **({"protocol_version": self.versions[node]} if node in self.versions else {}))

    def lanes(self, node: str) -> set[str]:
        d = self.desired.get(node)
        return {lane.session_id for lane in d.lanes} if d else set()

    def grants(self, node: str) -> dict:
        """session ID → the GrantSpec the node was last handed."""
        d = self.desired.get(node)
        return {g.session_id: g for g in d.grants} if d else {}
