"""The in-memory rails: the intake pacer that keeps the webhook answering during an alert storm."""

from __future__ import annotations

import pytest

from healer.healing.rails import IntakePacer


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def batch(pacer: IntakePacer, clock: Clock, seconds: float, *, delivery_during: bool) -> None:
    pacer.start_batch()
    clock.now += seconds / 2
    if delivery_during:
        pacer.delivered()
    clock.now += seconds / 2


def test_quiet_webhook_leaves_intake_at_full_speed() -> None:
    """With no delivery during a batch, the next batch may start at once and nothing is waiting."""
    clock = Clock()
    pacer = IntakePacer(0.25, clock)
    batch(pacer, clock, 0.010, delivery_during=False)
    pacer.end_batch()
    assert pacer.wait() == 0.0 and not pacer.waiting


def test_busy_webhook_pauses_intake_in_proportion() -> None:
    """A 10 ms batch during which deliveries arrived is followed by a 30 ms pause at a share of 0.25."""
    clock = Clock()
    pacer = IntakePacer(0.25, clock)
    batch(pacer, clock, 0.010, delivery_during=True)
    pacer.end_batch()
    assert pacer.waiting
    assert pacer.wait() == pytest.approx(0.030)
    clock.now += 0.029
    assert pacer.wait() == pytest.approx(0.001)
    clock.now += 0.001
    assert pacer.wait() == 0.0


def test_delivery_after_a_batch_is_waiting() -> None:
    """A delivery that lands after a batch began is reported as waiting until a later batch starts."""
    clock = Clock()
    pacer = IntakePacer(0.5, clock)
    batch(pacer, clock, 0.002, delivery_during=False)
    pacer.end_batch()
    clock.now += 1.0
    pacer.delivered()
    assert pacer.waiting and pacer.wait() == 0.0
    clock.now += 0.001
    pacer.start_batch()
    assert not pacer.waiting


@pytest.mark.parametrize("share", [0.0, -0.1, 1.5])
def test_share_outside_zero_to_one_is_refused(share: float) -> None:
    """A share of zero or less, or above one, is a programming error and says so."""
    with pytest.raises(ValueError, match="intake share"):
        IntakePacer(share)


def test_hold_keeps_intake_paused_after_a_failure() -> None:
    """After a failed batch, hold() keeps the next batch from starting for the given time."""
    clock = Clock()
    pacer = IntakePacer(0.25, clock)
    batch(pacer, clock, 0.001, delivery_during=False)
    pacer.end_batch()
    pacer.hold(1.0)
    assert pacer.wait() == pytest.approx(1.0)
    clock.now += 1.0
    assert pacer.wait() == 0.0
