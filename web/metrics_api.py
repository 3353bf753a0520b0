"""Growth metrics over HTTP: `GET /api/metrics/k-factor?days=7|14|30|90[&format=csv]` (admin)."""

from __future__ import annotations

from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from metrics.growth import PERIODS, k_factor_report, loop_efficiency, to_csv
from store import utcnow

from .auth import require_role
from .responses import ORJSONResponse


def report_csv(report: dict[str, Any]) -> str:
    """The report as CSV: the headline numbers, then one table per section (cells neutralised: a
    referrer's invite `source` is theirs to choose)."""
    rows: list[list[Any]] = [["metric", "value"]]
    rows += [[key, value] for key, value in report.items() if not isinstance(value, (list, dict))]
    rows += [[f"cycle_time_{key}", value] for key, value in report["cycle_time"].items()]
    for section in ("by_source", "funnel", "cohorts", "timeline", "top_referrers"):
        rows += [[], [section]]
        if report[section]:
            rows.append(list(report[section][0]))
            rows += [list(row.values()) for row in report[section]]
    return to_csv(rows)


async def k_factor(request: Request) -> Response:
    require_role(request, "admin")
    raw = str(_days(request))
    async with request.app.state.database.session() as session:
        report = await k_factor_report(session, int(raw), utcnow())
    if request.query_params.get("format") == "csv":
        return Response(
            report_csv(report),
            media_type="text/csv",
            headers={"content-disposition": f'attachment; filename="k-factor-{raw}d.csv"'},
        )
    return ORJSONResponse(report)


async def loops(request: Request) -> Response:
    require_role(request, "admin")
    days = _days(request)
    async with request.app.state.database.session() as session:
        return ORJSONResponse({"days": days, "loops": await loop_efficiency(session, days, utcnow())})


def _days(request: Request) -> int:
    raw = request.query_params.get("days", "7")
    if not raw.isdigit() or int(raw) not in PERIODS:
        raise HTTPException(422, f"days must be one of {list(PERIODS)}")
    return int(raw)


routes = [Route("/api/metrics/k-factor", k_factor), Route("/api/metrics/loops", loops)]
