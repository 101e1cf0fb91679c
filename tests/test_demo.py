"""`make demo` runs to the end and its facts hold: `python -m tests.lab.demo --fast` as a subprocess.

The demo checks each fact it shows and exits non-zero when one fails; this test also reads the lines that
say the lane reached the device, the other attempts were refused, the lane closed within 2 s of its end
and the controller received the signed evidence.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.lab
REPO = Path(__file__).resolve().parent.parent


def test_the_demo_runs_end_to_end_and_checks_what_it_shows():
    from tests.lab import unavailable_reason

    if reason := unavailable_reason():
        pytest.skip(reason)
    run = subprocess.run([sys.executable, "-m", "tests.lab.demo", "--fast"], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    out = run.stdout
    assert run.returncode == 0, f"exit {run.returncode}\n{out}\n{run.stderr}"
    assert "✘" not in out
    expected = [
        "✔ first administrator root created",
        "✔ enrolled over TLS",
        "✔ the same token a second time: refused",
        "✔ controller: site-1 at north-1 connected",
        ": pending_approval (the task needs one approver)",
        "approved by alex",
        "acknowledged the lane over the link",
        "PrivateKey = (redacted here",
        "✔ the lane reached RTU-17 tcp/2404",
        "the general interrogation returned its 3 points",
        "✔ RTU-17 tcp/502 (Modbus, not granted): refused",
        "✔ RTU-18 192.0.2.11 tcp/2404: refused by the router",
        "tcp/2404: refused by the router",  # the SCADA master
        "✔ the router itself",
        "✔ a second download of the config: refused (410",
        "✔ the lane was gone",
        "interrogations answered",
        "s after the end time (at most 2 s)",
        "✔ nothing of the lane is left on the router",
        "expired (end_time)",
        "✔ evidence received for s-",
        "the signature verifies with the key it enrolled",
        "✔ every refused attempt is in the evidence",
        "✔ request, approval, activation, opening, download, expiry and evidence are recorded",
        "✔ session.evidence record",
        "node evidence delivered",
        "✔ the bundle verifies offline with the pinned key",
        "✔ who had access to RTU-17, from the bundle alone: erin",
        "✔ the change is caught: record ",
        "the lab is removed",
    ]
    missing = [line for line in expected if line not in out]
    assert not missing, f"missing from the demo's output: {missing}\n{out}"
    assert "\033[" not in out, "colour codes when stdout is not a terminal"
    assert "PrivateKey = " not in out.replace("PrivateKey = (redacted here", ""), "a private key was printed"
