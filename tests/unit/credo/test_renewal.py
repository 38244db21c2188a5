"""One function decides when every SVID is renewed: half-life, +-10% jitter, arrival time."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from credo._renewal import RENEWAL_JITTER, renew_at


def test_half_life_without_jitter() -> None:
    """With the jitter at its midpoint, renewal is exactly at half the lifetime."""
    assert renew_at(1000.0, 2000.0, rng=lambda: 0.5) == 1500.0


def test_jitter_bounds_are_ten_percent_of_the_half_life() -> None:
    """The earliest and latest renewals are half-life -10% and +10% of the half."""
    assert renew_at(0.0, 3600.0, rng=lambda: 0.0) == 1800.0 * (1 - RENEWAL_JITTER)
    assert renew_at(0.0, 3600.0, rng=lambda: 1.0) == 1800.0 * (1 + RENEWAL_JITTER)


def test_counts_from_arrival_when_not_before_is_backdated() -> None:
    """An SVID backdated 10 s with a 20 s TTL is renewed 10 s after it arrived, not at once."""
    not_before, arrived = 990.0, 1000.0
    assert renew_at(not_before, 1020.0, received_at=arrived, rng=lambda: 0.5) == 1010.0
    # arrival before NotBefore changes nothing
    assert renew_at(1000.0, 1020.0, received_at=900.0, rng=lambda: 0.5) == 1010.0


def test_arrival_after_expiry_renews_at_once() -> None:
    """A credential that arrives already expired is renewed immediately (at NotAfter)."""
    assert renew_at(0.0, 100.0, received_at=500.0) == 100.0


@given(
    start=st.floats(0, 2e9),
    ttl=st.floats(1, 1e7),
    arrived=st.none() | st.floats(0, 2e9),
    r=st.floats(0, 1, exclude_max=True),
)
def test_renewal_always_inside_the_validity_window(
    start: float, ttl: float, arrived: float | None, r: float
) -> None:
    """Whatever the inputs, renewal falls after the counted start and never after expiry."""
    end = start + ttl
    at = renew_at(start, end, received_at=arrived, rng=lambda: r)
    counted = start if arrived is None else max(start, min(arrived, end))
    assert counted <= at <= end
