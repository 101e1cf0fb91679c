"""Signed device passports: the device's identity and its type's baseline flows, signed with the
controller's Ed25519 key, so an agent can check a device policy came from its controller
(`nodeagent.wire.SignedPassport.verify`). Signing is deterministic: the same passport revision under
the same policy version always gives the same bytes and signature."""

from __future__ import annotations

import base64

from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from nodeagent.wire import (
    DevicePassport,
    PassportDestination,
    PassportFlow,
    SignedPassport,
    SimBinding,
    key_id,
)

from .models import Device
from .policy import Policy
from .security.keys import ControllerKeys


def passport(device: Device, policy: Policy) -> DevicePassport:
    doc = policy.document
    baseline = []
    dtype = doc.device_types.get(device.device_type)
    for flow in dtype.baseline if dtype else ():
        proto = doc.protocols[flow.protocol]
        to = [PassportDestination(name=n, addresses=list(doc.destinations[n].addresses), fqdn=doc.destinations[n].fqdn)
              for n in flow.to]
        baseline.append(PassportFlow(protocol=flow.protocol, transport=proto.transport, ports=flow.ports or proto.ports, to=to))
    return DevicePassport(
        asset_id=device.asset_id, device_type=device.device_type, site=device.site.name, addresses=list(device.addresses),
        mac=device.mac, sim=SimBinding(iccid=device.iccid, eid=device.eid, imsis=list(device.imsis or [])),
        firmware=device.firmware, lifecycle=device.lifecycle, revision=device.revision,
        baseline=baseline, policy_version=policy.version,
    )


def sign(p: DevicePassport, keys: ControllerKeys) -> SignedPassport:
    raw = keys.signing.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    signature = base64.b64encode(keys.signing.sign(p.canonical_bytes())).decode()
    return SignedPassport(passport=p, key_id=key_id(raw), signature=signature)
