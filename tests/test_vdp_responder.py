"""The bridge-side ECP/VDP state machine, driven with frames and a fake clock (no root)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from xfer.errors import UsageError
from xfer.vdp import frame as f
from xfer.vdp.config import VdpConfig, parse_section
from xfer.vdp.convert import Namer, message_for
from xfer.vdp.responder import ACK_TIMEOUT_S, RETRIES, Event, Responder
from xfer.vdp.sequence import BLOCK, SequenceCounter

PORT = "p1"
BRIDGE = bytes.fromhex("020000000001")
STATION = bytes.fromhex("ee684f162b22")
VM_MAC = bytes.fromhex("525400aabb01")
VSI_ID = uuid.UUID("a1b2c3d4-0000-4000-8000-000000000001").bytes


def vsi(mode: f.Mode = f.Mode.ASSOC, status: int = f.STATUS_M, vsi_id: bytes = VSI_ID) -> f.VsiTlv:
    return f.VsiTlv(mode, status, 1193046, 3, f.VSI_ID_UUID, vsi_id, f.FILTER_MAC_VID,
                    (f.FilterEntry(vid=0, mac=VM_MAC),), b"blade5".ljust(16, b"\0"))


def request(seq: int, *tlvs: f.VsiTlv, src: bytes = STATION) -> bytes:
    return f.encode(f.NEAREST_BRIDGE, src, f.EcpFrame(f.Op.REQUEST, seq, tlvs))


def ack(seq: int) -> bytes:
    return f.encode(f.NEAREST_BRIDGE, STATION, f.EcpFrame(f.Op.ACK, seq))


def decoded(frames: list[tuple[str, bytes]]) -> list[f.EcpFrame]:
    return [f.decode(raw, responses=True).frame for _, raw in frames]


@pytest.fixture
def responder() -> Responder:
    return Responder({PORT: BRIDGE}, SequenceCounter(None, start=100))


def test_request_is_acked_at_once_and_answered_after_the_outcome(responder: Responder) -> None:
    step = responder.receive(PORT, request(7, vsi()), now=0.0)
    assert decoded(step.frames) == [f.EcpFrame(f.Op.ACK, 7)]
    (event,) = step.events
    assert (event.indication, event.direction) == ("starting", "in")
    step = responder.resolved(event, f.VdpError.OK, now=0.1)
    (resp,) = decoded(step.frames)
    assert resp.op == f.Op.REQUEST and resp.seq == 100          # our own counter, not the station's
    assert resp.vsis == (vsi().response(f.VdpError.OK),)
    assert responder.receive(PORT, ack(100), now=0.2).frames == []
    assert responder.counters["acks-received"] == 1


def test_s_bit_on_assoc_and_deassoc_is_one_out_event(responder: Responder) -> None:
    (event,) = responder.receive(PORT, request(1, vsi(status=f.STATUS_S)), 0.0).events
    assert (event.indication, event.direction) == ("not-running", "out")
    responder.resolved(event, f.VdpError.OK, 0.1)
    responder.receive(PORT, ack(100), 0.1)
    step = responder.receive(PORT, request(2, vsi(f.Mode.DEASSOC, f.STATUS_S)), 1.0)
    assert step.events == []                                     # the same migration, already sent
    assert decoded(step.frames)[1].vsis[0].mode == f.Mode.DEASSOC


def test_keepalives_are_one_event_and_each_is_answered(responder: Responder) -> None:
    (event,) = responder.receive(PORT, request(1, vsi()), 0.0).events
    # A keep-alive while the manager is still deciding: ACKed, answered once the outcome is known.
    step = responder.receive(PORT, request(2, vsi()), 0.05)
    assert step.events == [] and decoded(step.frames) == [f.EcpFrame(f.Op.ACK, 2)]
    assert len(decoded(responder.resolved(event, f.VdpError.OK, 0.1).frames)) == 1
    responder.receive(PORT, ack(100), 0.1)
    for i, now in enumerate((10.5, 21.0, 31.5)):
        step = responder.receive(PORT, request(3 + i, vsi()), now)
        assert step.events == []
        frames = decoded(step.frames)
        assert frames[0] == f.EcpFrame(f.Op.ACK, 3 + i)
        assert frames[1].vsis[0].status == f.STATUS_RESPONSE
        responder.receive(PORT, ack(frames[1].seq), now)
    assert responder.counters["events"] == 1 and responder.counters["repeats"] == 4


def test_ecp_retransmission_is_acked_but_handled_once(responder: Responder) -> None:
    raw = request(9, vsi())
    assert len(responder.receive(PORT, raw, 0.0).events) == 1
    step = responder.receive(PORT, raw, 0.164)
    assert decoded(step.frames) == [f.EcpFrame(f.Op.ACK, 9)] and step.events == []
    assert responder.counters["ecp-retransmissions"] == 1
    # The same sequence number and bytes much later: a restarted station, a new request.
    assert responder.receive(PORT, raw, 30.0).frames


def test_unacked_response_is_retransmitted_then_given_up(responder: Responder) -> None:
    step = responder.receive(PORT, request(1, vsi(status=0)), 0.0)
    assert step.events == []                                     # no hint: answered at once
    first = decoded(step.frames)[1]
    # One response in flight per station: the next waits behind it.
    step = responder.receive(PORT, request(2, vsi(vsi_id=bytes(16), status=0)), 0.0)
    assert decoded(step.frames) == [f.EcpFrame(f.Op.ACK, 2)]
    now, resent = 0.0, []
    for _ in range(RETRIES):
        now += ACK_TIMEOUT_S + 0.001
        resent += decoded(responder.poll(now).frames)
    assert resent == [first] * RETRIES                           # same sequence number, same bytes
    now += ACK_TIMEOUT_S + 0.001
    (second,) = decoded(responder.poll(now).frames)              # given up: the queued one goes out
    assert second.seq == first.seq + 1 and second.vsis[0].vsi_id == bytes(16)
    assert responder.counters["responses-unacked"] == 1
    assert responder.counters["retransmissions"] == RETRIES


def test_error_outcome_is_sent_and_not_remembered(responder: Responder) -> None:
    (event,) = responder.receive(PORT, request(1, vsi()), 0.0).events
    (resp,) = decoded(responder.resolved(event, f.VdpError.NO_MANAGER, 0.1).frames)
    assert resp.vsis[0].status == f.STATUS_RESPONSE | f.VdpError.NO_MANAGER
    responder.receive(PORT, ack(resp.seq), 0.1)
    # The station's next try is a new attempt (the manager may be back).
    assert len(responder.receive(PORT, request(2, vsi()), 5.0).events) == 1


def test_new_direction_is_a_new_event_and_stale_outcomes_are_dropped(responder: Responder) -> None:
    (first,) = responder.receive(PORT, request(1, vsi()), 0.0).events
    (second,) = responder.receive(PORT, request(2, vsi(status=f.STATUS_S)), 0.5).events
    assert second.direction == "out"
    assert responder.resolved(first, f.VdpError.OK, 0.6).frames == []
    assert responder.counters["outcomes-stale"] == 1


def test_both_hints_is_a_bad_format_answer(responder: Responder) -> None:
    step = responder.receive(PORT, request(1, vsi(status=f.STATUS_M | f.STATUS_S)), 0.0)
    assert step.events == []
    assert decoded(step.frames)[1].vsis[0].status == f.STATUS_RESPONSE | f.STATUS_HARD | f.VdpError.BAD_FORMAT


def test_malformed_frames_are_counted_never_raised(responder: Responder) -> None:
    raw = request(1, vsi())
    for bad in (raw[:20], raw[:-3], b"", raw[:14] + b"\xff" * 40):
        step = responder.receive(PORT, bad, 0.0)
        assert step.frames == [] and step.events == []
    assert responder.counters["malformed"] == 4
    assert responder.counters["malformed:truncated"] == 3


def test_state_is_bounded() -> None:
    r = Responder({PORT: BRIDGE}, SequenceCounter(None, start=0), max_stations=2, max_vsis=2)
    for i in range(3):
        r.receive(PORT, request(1, vsi(vsi_id=bytes([i]) * 16)), 0.0)
    assert r.counters["refused:too-many-vsis"] == 1
    r.receive(PORT, request(1, vsi(), src=bytes.fromhex("020000000099")), 0.0)
    r.receive(PORT, request(1, vsi(), src=bytes.fromhex("020000000098")), 0.0)
    assert r.counters["ignored:too-many-stations"] == 1


def test_pending_messages_per_station_are_bounded(responder: Responder) -> None:
    from xfer.vdp.responder import MAX_PENDING_PER_STATION

    for i in range(MAX_PENDING_PER_STATION + 1):
        responder.receive(PORT, request(i, vsi(vsi_id=i.to_bytes(16, "big"))), 0.0)
    assert responder.counters["events"] == MAX_PENDING_PER_STATION
    assert responder.counters["refused:too-many-pending"] == 1
    # Another station is not held back by this one.
    assert responder.receive(PORT, request(1, vsi(), src=bytes.fromhex("020000000077")), 0.0).events


def test_silent_vsi_is_forgotten_then_a_new_event(responder: Responder) -> None:
    (event,) = responder.receive(PORT, request(1, vsi()), 0.0).events
    responder.resolved(event, f.VdpError.OK, 0.0)
    responder.receive(PORT, ack(100), 0.0)
    responder.poll(responder.forget_after_s + 1)
    assert len(responder.receive(PORT, request(2, vsi()), responder.forget_after_s + 2).events) == 1


def test_sequence_not_reused_after_restart(tmp_path: Path) -> None:
    path = tmp_path / "vdp.seq"
    first = SequenceCounter(path)
    used = [first.next() for _ in range(BLOCK + 10)]
    again = SequenceCounter(path)                 # a restart
    assert again.next() not in used[-BLOCK:]
    assert SequenceCounter(None, start=0xFFFF).next() == 0xFFFF


def test_message_names_vm_from_inventory(tmp_path: Path) -> None:
    inv = tmp_path / "inventory.toml"
    inv.write_text('[vm.web1]\nmac = "52:54:00:aa:bb:01"\n[vm.db1]\nmac = "52:54:00:00:00:09"\n'
                   'vsi = "a1b2c3d4-0000-4000-8000-000000000002"\n')
    namer = Namer(inv)
    ev = Event("starting", "in", PORT, STATION, vsi(), "vdp-1")
    assert message_for(ev, "hv7", namer).to_json() == {
        "vm": "web1", "indication": "starting", "direction": "in", "source": "", "destination": "hv7",
        "id": "vdp-1"}
    db1 = uuid.UUID("a1b2c3d4-0000-4000-8000-000000000002").bytes
    by_uuid = Event("not-running", "out", PORT, STATION, vsi(status=f.STATUS_S, vsi_id=db1), "v2")
    assert message_for(by_uuid, "hv7", namer).to_json()["vm"] == "db1"
    assert message_for(by_uuid, "hv7", namer).to_json()["source"] == "hv7"
    inv.write_text("")
    assert message_for(ev, "hv7", namer).vm == "52:54:00:aa:bb:01"      # re-read; named by its MAC


def test_config_checks() -> None:
    with pytest.raises(UsageError):
        VdpConfig(None, ("p1",), "hv7")                                 # neither manager nor udp
    with pytest.raises(UsageError):
        VdpConfig(None, ("p1",), "hv7", manager="https://m:8700/v1/migrations")   # no TLS files
    cfg = parse_section({"ports": ["p1"], "server": "hv7", "udp": "127.0.0.1:8702"}, Path("/etc"), "sw")
    assert cfg.udp == ("127.0.0.1", 8702) and cfg.netns == "sw"
    with pytest.raises(UsageError):
        parse_section({"ports": ["p1"], "server": "hv7", "udp": "x:1", "bogus": 1}, Path("/"), None)


def test_manager_down_gives_no_manager_status() -> None:
    from xfer.vdp.convert import HttpSender, UdpSender

    msg = message_for(Event("starting", "in", PORT, STATION, vsi(), "v"), "hv7", Namer(None))
    out = asyncio.run(HttpSender("http://127.0.0.1:9/m", None, 1.0).send(msg))
    assert out is not None and out[0] == f.VdpError.NO_MANAGER
    out = asyncio.run(UdpSender(("127.0.0.1", 9), timeout_s=0.3).send(msg))
    assert out is not None and out[0] == f.VdpError.NO_MANAGER
