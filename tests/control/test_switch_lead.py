"""The commit's switch lead: long enough for the slowest engine's delivery, never past its cap,
shrinking back when deliveries are quick."""

from __future__ import annotations

from hotswap.control.coordinator import SwitchLead


def test_the_switch_lead_follows_the_slowest_delivery() -> None:
    lead = SwitchLead()
    lead.learn([1_000, 30_000, 2_000])  # one engine got its commit 30 ms after it was sent
    assert lead.us == int(30_000 * SwitchLead.MARGIN) + 500
    for _ in range(50):  # quick deliveries from then on: the lead comes down, to the floor
        lead.learn([300, 400])
    assert lead.us == SwitchLead.FLOOR_US
    lead.learn([10_000_000])  # a stalled engine cannot push it past the cap
    assert lead.us == SwitchLead.CAP_US
