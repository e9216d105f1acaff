"""The date range every dashboard is filtered by: ``?from=YYYY-MM-DD&to=YYYY-MM-DD``, both days included."""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from django.utils import timezone
from django.utils.dateparse import parse_date

DEFAULT_WEEKS = 12
MAX_DAYS = 3661  # ten years: enough for any report, and no date arithmetic at the calendar's ends


class BadPeriod(ValueError):
    """The range asked for cannot be used; the message says why (shown with a 400)."""


@dataclass(frozen=True)
class Period:
    start: datetime.date  # first day, included
    end: datetime.date  # last day, included

    @property
    def since(self) -> datetime.datetime:
        """Midnight at the start of the first day, in the platform's time zone (TIME_ZONE)."""
        return _midnight(self.start)

    @property
    def until(self) -> datetime.datetime:
        """Midnight after the last day: the range is ``since <= t < until``."""
        return _midnight(self.end + datetime.timedelta(days=1))

    @property
    def days(self) -> int:
        return (self.end - self.start).days + 1

    def params(self) -> dict[str, str]:
        return {"from": self.start.isoformat(), "to": self.end.isoformat()}


def _midnight(day: datetime.date) -> datetime.datetime:
    return timezone.make_aware(datetime.datetime.combine(day, datetime.time.min))


def _date(params, name: str) -> datetime.date | None:
    raw = (params.get(name) or "").strip()
    if not raw:
        return None
    try:
        value = parse_date(raw)
    except ValueError:  # well-formed but impossible, e.g. 2026-02-31
        value = None
    if value is None:
        shown = raw if len(raw) <= 40 else raw[:40] + "..."
        raise BadPeriod(f"'{shown}' is not a date: give '{name}' as YYYY-MM-DD, e.g. 2026-03-31.")
    return value


def period_from(params, *, today: datetime.date | None = None) -> Period:
    """The period of the request's ``from`` and ``to`` (GET parameters); by default the last
    ``DEFAULT_WEEKS`` weeks up to today. BadPeriod for a date that is not one, a start after the
    end, or a range over MAX_DAYS."""
    today = today or timezone.localdate()
    end = _date(params, "to") or today
    start = _date(params, "from") or end - datetime.timedelta(weeks=DEFAULT_WEEKS)
    if start > end:
        raise BadPeriod(f"The start date ({start.isoformat()}) is after the end date ({end.isoformat()}).")
    if (end - start).days + 1 > MAX_DAYS or end >= datetime.date.max or start.year < 1900:
        raise BadPeriod(f"A period may span at most {MAX_DAYS} days (ten years), from 1900 on.")
    return Period(start=start, end=end)
