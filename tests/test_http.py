"""The connection gate's bookkeeping (pure logic: a Clock and stand-in ports)."""

from __future__ import annotations

from twisted.internet.task import Clock

from emojistream.http import ConnectionGate


class FakePort:
    def __init__(self) -> None:
        self.reading = True

    def stopReading(self) -> None:
        self.reading = False

    def startReading(self) -> None:
        self.reading = True


def test_connections_per_address_are_capped_and_freed():
    gate = ConnectionGate(per_ip=2)
    assert gate.admit("a") and gate.admit("a")
    assert not gate.admit("a")
    assert gate.admit("b")
    gate.release("a")
    assert gate.admit("a")
    assert gate.refused_per_ip == 1 and gate.open == 3


def test_accepting_pauses_near_the_limit_and_resumes_below_it(logs):
    clock = Clock()
    gate = ConnectionGate(fd_limit=ConnectionGate.MARGIN + 20, clock=clock)
    port = FakePort()
    gate.add_port(port)
    for n in range(20):
        assert gate.admit(f"10.0.0.{n}")
    assert gate.paused and not port.reading and gate.accept_pauses == 1
    # Accepted in the same batch: closed at once.
    assert not gate.admit("10.0.1.1") and gate.refused_at_limit == 1
    for n in range(ConnectionGate.HYSTERESIS + 1):
        assert gate.paused
        gate.release(f"10.0.0.{n}")
    assert not gate.paused and port.reading
    # Paused again at once (the queue taken in): counted, not logged again this minute.
    for n in range(ConnectionGate.HYSTERESIS + 1):
        gate.admit(f"10.0.2.{n}")
    assert gate.paused and gate.accept_pauses == 2
    lines = [line for line in logs.ours() if "Open-file limit" in line]
    assert len(lines) == 1
    clock.advance(ConnectionGate.LOG_EVERY)
    for n in range(ConnectionGate.HYSTERESIS + 1):
        gate.release(f"10.0.2.{n}")
    assert not gate.paused
    for n in range(ConnectionGate.HYSTERESIS + 1):
        gate.admit(f"10.0.4.{n}")
    assert gate.paused and gate.accept_pauses == 3
    assert len([line for line in logs.ours() if "Open-file limit" in line]) == 2
