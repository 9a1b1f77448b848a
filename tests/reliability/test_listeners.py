"""Every server a training stage starts listens on loopback: gloo's sockets between the ranks;
watched while the reference demo pipeline ran (all six stages, training on 2 ranks included:
conftest's `demo_local_run`), so no pipeline or training is run again for this. The CLI's
temporary Prefect server is checked where a stage runs with one (test_process_faults' killed
datatrove task). One known exception, asserted so that it is noticed when it changes: torchrun's
TCPStore (the rendezvous key-value store, process name `pt_elastic`) listens on all interfaces and
torch 2.13 has no option to bind it elsewhere (docs/RELIABILITY.md)."""

from __future__ import annotations

TORCHRUN_STORE = "pt_elastic"


def test_a_training_stage_listens_on_loopback_only(demo_local_run):
    seen = demo_local_run[1].listeners  # (address, process name) of every socket its processes listened on
    loopback = {(a, n) for a, n in seen if a.startswith(("127.0.0.1:", "[::1]:"))}
    exposed = seen - loopback
    names = {n for _, n in loopback}
    assert len(loopback) >= 2, seen  # one gloo socket per rank at least
    assert any(n.startswith("python") for n in names), seen
    assert {n for _, n in exposed} <= {TORCHRUN_STORE}, f"listening beyond loopback: {exposed}"
