"""Change windows (`controller.policy.windows`) by named example: across midnight, across DST changes,
whole days, dated windows with and without a zone, merging, and the next opening.

Dates used: in Europe/Berlin clocks go forward on Sun 29 Mar 2026 (02:00 CET → 03:00 CEST) and back on
Sun 25 Oct 2026 (03:00 CEST → 02:00 CET). 9 Mar 2026 is a Monday."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from controller.policy.model import ChangeWindow
from controller.policy.windows import containing, next_opening, openings

BERLIN = "Europe/Berlin"


def window(*weekly: tuple[list[str], str, str], once: list[tuple[str, str]] = (), timezone: str | None = None) -> ChangeWindow:
    return ChangeWindow.model_validate({
        "timezone": timezone,
        "weekly": [{"days": days, "start": start, "end": end} for days, start, end in weekly],
        "once": [{"start": start, "end": end} for start, end in once],
    })


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def span(windows: dict[str, ChangeWindow], at: str, tz: str = BERLIN) -> tuple[datetime, datetime] | None:
    found = containing(windows, tz, utc(at))
    return (found.start, found.end) if found else None


MONDAY_NIGHT = {"mon-night": window((["mon"], "22:00", "04:00"))}
EVERY_NIGHT = {"nights": window((["mon", "tue", "wed", "thu", "fri", "sat", "sun"], "22:00", "04:00"))}


# ---- across midnight ---------------------------------------------------------------------------------


@pytest.mark.parametrize("at, inside", [
    ("2026-03-09 20:59:59", False),  # Mon 21:59:59 CET
    ("2026-03-09 21:00", True),      # Mon 22:00 CET: the start belongs to the window
    ("2026-03-09 23:30", True),      # Tue 00:30 CET: past midnight, still Monday's window
    ("2026-03-10 02:59:59", True),   # Tue 03:59:59 CET
    ("2026-03-10 03:00", False),     # Tue 04:00 CET: the end does not
    ("2026-03-10 21:30", False),     # Tue 22:30 CET: Tuesday is not listed
    ("2026-03-08 23:30", False),     # Mon 00:30 CET: Sunday's night is not listed
])
def test_monday_night_runs_past_midnight(at: str, inside: bool) -> None:
    expected = (utc("2026-03-09 21:00"), utc("2026-03-10 03:00")) if inside else None
    assert span(MONDAY_NIGHT, at) == expected


def test_monday_night_follows_the_clock_across_the_dst_changes() -> None:
    # The same 22:00–04:00 local is 21:00–03:00 UTC in winter and 20:00–02:00 UTC in summer.
    assert span(MONDAY_NIGHT, "2026-03-23 22:00") == (utc("2026-03-23 21:00"), utc("2026-03-24 03:00"))  # before the change
    assert span(MONDAY_NIGHT, "2026-03-30 22:00") == (utc("2026-03-30 20:00"), utc("2026-03-31 02:00"))  # after
    assert span(MONDAY_NIGHT, "2026-10-19 22:00") == (utc("2026-10-19 20:00"), utc("2026-10-20 02:00"))
    assert span(MONDAY_NIGHT, "2026-10-26 22:00") == (utc("2026-10-26 21:00"), utc("2026-10-27 03:00"))
    assert span(MONDAY_NIGHT, "2026-03-30 20:30") == (utc("2026-03-30 20:00"), utc("2026-03-31 02:00"))  # 22:30 CEST
    assert span(MONDAY_NIGHT, "2026-03-23 20:30") is None  # 21:30 CET


def test_the_night_the_clocks_go_forward_is_an_hour_shorter() -> None:
    opened = containing(EVERY_NIGHT, BERLIN, utc("2026-03-29 00:30"))  # Sun 01:30 CET
    assert (opened.start, opened.end) == (utc("2026-03-28 21:00"), utc("2026-03-29 02:00"))  # 22:00 CET → 04:00 CEST
    assert opened.end - opened.start == timedelta(hours=5)
    assert span(EVERY_NIGHT, "2026-03-29 01:59:59") is not None  # 03:59:59 CEST
    assert span(EVERY_NIGHT, "2026-03-29 02:00") is None          # 04:00 CEST


def test_the_night_the_clocks_go_back_is_an_hour_longer() -> None:
    for at in ("2026-10-25 00:30", "2026-10-25 01:30"):  # 02:30 CEST and, an hour later, 02:30 CET
        opened = containing(EVERY_NIGHT, BERLIN, utc(at))
        assert (opened.start, opened.end) == (utc("2026-10-24 20:00"), utc("2026-10-25 03:00"))  # 22:00 CEST → 04:00 CET
    assert opened.end - opened.start == timedelta(hours=7)


def test_the_dst_example_of_docs_policy_md() -> None:
    sunday = {"w": window((["sun"], "01:00", "05:00"))}
    spring = containing(sunday, BERLIN, utc("2026-03-29 01:30"))
    autumn = containing(sunday, BERLIN, utc("2026-10-25 01:30"))
    assert spring.end - spring.start == timedelta(hours=3)
    assert autumn.end - autumn.start == timedelta(hours=5)


def test_an_edge_in_the_skipped_hour_is_read_with_the_offset_before_the_change() -> None:
    # Sunday 02:30 does not exist in Berlin on 29 Mar 2026; windows.py reads it as 02:30 CET = 01:30 UTC,
    # which the clock shows as 03:30 CEST. So a window 02:30–05:00 that day opens at 03:30 CEST.
    skipped = {"w": window((["sun"], "02:30", "05:00"))}
    assert span(skipped, "2026-03-29 01:15") is None  # 03:15 CEST
    assert span(skipped, "2026-03-29 01:30") == (utc("2026-03-29 01:30"), utc("2026-03-29 03:00"))
    # …and a window that lies wholly in the skipped hour is empty that day.
    assert span({"w": window((["sun"], "02:00", "03:00"))}, "2026-03-29 01:00") is None


def test_an_edge_in_the_repeated_hour_is_read_as_its_first_occurrence() -> None:
    # Sunday 02:30 happens twice in Berlin on 25 Oct 2026: at 00:30 UTC (CEST) and at 01:30 UTC (CET).
    ends = {"w": window((["sun"], "01:00", "02:30"))}
    assert span(ends, "2026-10-25 00:15") == (utc("2026-10-24 23:00"), utc("2026-10-25 00:30"))
    assert span(ends, "2026-10-25 01:15") is None  # 02:15 CET: the window closed at the first 02:30
    starts = {"w": window((["sun"], "02:30", "05:00"))}
    assert span(starts, "2026-10-25 00:30") == (utc("2026-10-25 00:30"), utc("2026-10-25 04:00"))


# ---- whole days ------------------------------------------------------------------------------------------


def test_00_00_to_24_00_is_the_whole_day() -> None:
    saturday = {"sat": window((["sat"], "00:00", "24:00"))}
    whole = (utc("2026-03-13 23:00"), utc("2026-03-14 23:00"))  # Sat 14 Mar, CET
    assert span(saturday, "2026-03-13 23:00") == whole
    assert span(saturday, "2026-03-14 22:59:59") == whole
    assert span(saturday, "2026-03-14 23:00") is None  # Sunday 00:00
    assert span(saturday, "2026-03-13 22:59:59") is None


def test_a_whole_day_on_a_dst_change_has_23_or_25_hours() -> None:
    sunday = {"sun": window((["sun"], "00:00", "24:00"))}
    spring = containing(sunday, BERLIN, utc("2026-03-29 12:00"))
    autumn = containing(sunday, BERLIN, utc("2026-10-25 12:00"))
    assert spring.end - spring.start == timedelta(hours=23)
    assert autumn.end - autumn.start == timedelta(hours=25)


def test_consecutive_whole_days_merge_into_one_opening() -> None:
    weekend = {"weekend": window((["sat", "sun"], "00:00", "24:00"))}
    assert span(weekend, "2026-03-14 12:00") == (utc("2026-03-13 23:00"), utc("2026-03-15 23:00"))


# ---- dated windows ---------------------------------------------------------------------------------------


def test_once_without_a_zone_is_in_the_window_zone_else_the_site_zone() -> None:
    naive = [("2026-12-27T06:00:00", "2026-12-28T18:00:00")]
    own_zone = {"outage": window(once=naive, timezone=BERLIN)}
    site_zone = {"outage": window(once=naive)}
    berlin = (utc("2026-12-27 05:00"), utc("2026-12-28 17:00"))
    assert span(own_zone, "2026-12-27 05:00", tz="America/New_York") == berlin
    assert span(site_zone, "2026-12-27 05:00", tz=BERLIN) == berlin
    assert span(site_zone, "2026-12-27 05:00", tz="America/New_York") is None
    assert span(site_zone, "2026-12-27 11:00", tz="America/New_York") == (utc("2026-12-27 11:00"), utc("2026-12-28 23:00"))


def test_once_with_a_zone_keeps_it() -> None:
    aware = {"outage": window(once=[("2026-12-27T06:00:00+01:00", "2026-12-27T08:00:00Z")], timezone="Australia/Sydney")}
    for tz in (BERLIN, "UTC", "America/New_York"):
        assert span(aware, "2026-12-27 07:00", tz=tz) == (utc("2026-12-27 05:00"), utc("2026-12-27 08:00"))
    assert span(aware, "2026-12-27 08:00") is None


def test_once_across_a_dst_change_counts_real_hours() -> None:
    night = {"n": window(once=[("2026-10-25T01:00:00", "2026-10-25T04:00:00")], timezone=BERLIN)}
    opened = containing(night, BERLIN, utc("2026-10-25 01:30"))
    assert opened.end - opened.start == timedelta(hours=4)  # 01:00 CEST → 04:00 CET


def test_a_long_once_window_that_began_long_ago_still_contains_now() -> None:
    maintenance = {"m": window(once=[("2026-03-01T00:00:00Z", "2026-04-01T00:00:00Z")])}
    assert span(maintenance, "2026-03-20 12:00") == (utc("2026-03-01 00:00"), utc("2026-04-01 00:00"))


# ---- merging ---------------------------------------------------------------------------------------------


def test_windows_that_touch_merge_and_name_both() -> None:
    windows = {"evening": window((["mon"], "20:00", "22:00")), **MONDAY_NIGHT}
    opened = containing(windows, BERLIN, utc("2026-03-09 20:00"))
    assert (opened.start, opened.end, opened.windows) == (utc("2026-03-09 19:00"), utc("2026-03-10 03:00"), ("evening", "mon-night"))


def test_friday_evening_runs_into_saturday_morning() -> None:
    windows = {"fri": window((["fri"], "18:00", "24:00")), "sat": window((["sat"], "00:00", "06:00"))}
    opened = containing(windows, BERLIN, utc("2026-03-13 22:30"))  # Fri 23:30 CET
    assert (opened.start, opened.end, opened.windows) == (utc("2026-03-13 17:00"), utc("2026-03-14 05:00"), ("fri", "sat"))


def test_rules_of_one_window_merge_too() -> None:
    one = {"w": window((["mon"], "20:00", "22:00"), (["mon"], "22:00", "23:00"), (["mon"], "21:00", "21:30"))}
    opened = containing(one, BERLIN, utc("2026-03-09 21:45"))
    assert (opened.start, opened.end, opened.windows) == (utc("2026-03-09 19:00"), utc("2026-03-09 22:00"), ("w",))


def test_windows_a_minute_apart_do_not_merge() -> None:
    windows = {"evening": window((["mon"], "20:00", "21:59")), **MONDAY_NIGHT}
    assert span(windows, "2026-03-09 20:30") == (utc("2026-03-09 19:00"), utc("2026-03-09 20:59"))
    assert span(windows, "2026-03-09 20:59:30") is None


def test_openings_are_sorted_and_disjoint() -> None:
    windows = {"evening": window((["mon", "wed"], "20:00", "22:00")), **EVERY_NIGHT,
               "outage": window(once=[("2026-03-11T12:00:00", "2026-03-11T21:00:00")])}
    found = openings(windows, BERLIN, utc("2026-03-09 12:00"))
    assert all(a.end < b.start for a, b in zip(found, found[1:], strict=False))
    wednesday = next(o for o in found if o.start <= utc("2026-03-11 12:00") < o.end)
    assert wednesday.windows == ("evening", "nights", "outage")
    assert (wednesday.start, wednesday.end) == (utc("2026-03-11 11:00"), utc("2026-03-12 03:00"))


# ---- the next opening ------------------------------------------------------------------------------------


def test_next_opening_from_outside() -> None:
    nxt = next_opening(MONDAY_NIGHT, BERLIN, utc("2026-03-10 10:00"))  # Tuesday morning: six days to go
    assert (nxt.start, nxt.end) == (utc("2026-03-16 21:00"), utc("2026-03-17 03:00"))


def test_next_opening_skips_the_one_we_are_in() -> None:
    nxt = next_opening(MONDAY_NIGHT, BERLIN, utc("2026-03-09 22:00"))
    assert nxt.start == utc("2026-03-16 21:00")


def test_next_opening_at_the_very_end_of_one() -> None:
    assert containing(MONDAY_NIGHT, BERLIN, utc("2026-03-10 03:00")) is None
    assert next_opening(MONDAY_NIGHT, BERLIN, utc("2026-03-10 03:00")).start == utc("2026-03-16 21:00")


def test_next_opening_crosses_the_dst_change() -> None:
    # From Sunday noon, 29 Mar, the next Monday 22:00 is in summer time.
    assert next_opening(MONDAY_NIGHT, BERLIN, utc("2026-03-29 10:00")).start == utc("2026-03-30 20:00")


def test_no_next_opening_when_every_window_is_over() -> None:
    past = {"outage": window(once=[("2025-12-27T06:00:00Z", "2025-12-28T18:00:00Z")])}
    assert containing(past, BERLIN, utc("2026-03-10 10:00")) is None
    assert next_opening(past, BERLIN, utc("2026-03-10 10:00")) is None
