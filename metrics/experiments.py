"""Experiments: definitions and their audited lifecycle, sticky GrowthBook-compatible assignment,
exposures and conversions from the one event stream, and results (SPEC §9b).

Lifecycle: `draft → running ⇄ paused → stopped`; `winner {variant}` may be declared while running,
paused or stopped and stops the experiment. Only these transitions are legal; every create, update
and transition is an `experiment_audit` row (who, when, what changed). Once an experiment has left
draft its variant keys are fixed (weights, names and config payloads may still change).

Assignment (`assignment`): draft → nobody (`variant: null`); running → a user already exposed keeps
their variant whatever the weights are now (sticky), anyone else gets GrowthBook's hash-v2 bucket
for (seed, user id, weights, coverage, namespace) — outside coverage or namespace → `null`; paused or
stopped → the winner if declared, else the control, with `in_experiment: false` and no exposure.

Exposures: an `experiment_exposure` event `{experiment, variant}` while the experiment runs; the
first one per user counts (later ones and duplicates change nothing). Conversions: an event whose
type is the target metric or a guardrail metric, of an exposed user, at or after their exposure
and within `window_days` of it, counts for that user (value = `props.value` when numeric, else 0).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from store import (
    Experiment,
    ExperimentAudit,
    ExperimentConversion,
    ExperimentExposure,
    dialect_insert,
)

from .assignment import assign
from .events import EVENT_TYPES
from .experiment_stats import VariantCounts, analyze, guardrail_results

KEY = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
STATUSES = ("draft", "running", "paused", "stopped")
TRANSITIONS: dict[str, tuple[frozenset[str], str]] = {
    "start": (frozenset({"draft", "paused"}), "running"),
    "pause": (frozenset({"running"}), "paused"),
    "stop": (frozenset({"running", "paused"}), "stopped"),
}
EXPOSURE = "experiment_exposure"


class ExperimentError(Exception):
    """A refused request: `code` is `invalid`, `not_found`, `conflict` or `illegal_transition`."""

    def __init__(self, code: str, message: str, fields: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.fields = fields or {}


@dataclass(frozen=True, slots=True)
class Assignment:
    variant: str | None
    in_experiment: bool
    config: dict[str, Any] | None
    new_exposure: bool  # the caller should emit `experiment_exposure` (first time this user sees it)

    def public(self) -> dict[str, Any]:
        return {"variant": self.variant, "in_experiment": self.in_experiment}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_definition(body: Any, *, creating: bool) -> dict[str, Any]:
    """The fields of a create or update body, checked; raises ExperimentError with per-field errors."""
    if not isinstance(body, dict):
        raise ExperimentError("invalid", "body must be a JSON object")
    known = {
        "key", "name", "hypothesis", "loop", "variants", "coverage", "seed", "hash_version", "namespace",
        "target_metric", "guardrail_metrics", "window_days", "sequential", "mde",
    }  # fmt: skip
    errors: dict[str, str] = {f: "unknown field" for f in sorted(set(body) - known)}
    out: dict[str, Any] = {}
    if creating or "key" in body:
        if not isinstance(body.get("key"), str) or not KEY.match(body["key"]):
            errors["key"] = "must be 1-64 letters, digits, '_', '.', '-'"
        else:
            out["key"] = body["key"]
    if "variants" in body or creating:
        variants = body.get("variants")
        if not isinstance(variants, list) or not 2 <= len(variants) <= 10:
            errors["variants"] = (
                "must list 2-10 variants {key, weight, name?, config?}; the first is the control"
            )
        else:
            clean = []
            for i, v in enumerate(variants):
                if not isinstance(v, dict) or not isinstance(v.get("key"), str) or not KEY.match(v["key"]):
                    errors[f"variants[{i}].key"] = "must be 1-64 letters, digits, '_', '.', '-'"
                    continue
                weight = v.get("weight", 1.0 / len(variants))
                if not _number(weight) or not 0 <= weight <= 1:
                    errors[f"variants[{i}].weight"] = "must be a number from 0 to 1"
                    continue
                config = v.get("config", {})
                if not isinstance(config, dict):
                    errors[f"variants[{i}].config"] = "must be a JSON object"
                    continue
                name = v.get("name", v["key"])
                clean.append(
                    {"key": v["key"], "name": str(name)[:80], "weight": float(weight), "config": config}
                )
            keys = [v["key"] for v in clean]
            if len(set(keys)) != len(keys):
                errors["variants"] = "variant keys must be unique"
            elif len(clean) == len(variants) and abs(sum(v["weight"] for v in clean) - 1.0) > 1e-6:
                errors["variants"] = "weights must add up to 1"
            out["variants"] = clean
    if creating or "target_metric" in body:
        if not isinstance(body.get("target_metric"), str) or body["target_metric"] not in EVENT_TYPES:
            errors["target_metric"] = f"must be an event type: {sorted(EVENT_TYPES)}"
        else:
            out["target_metric"] = body["target_metric"]
    if "guardrail_metrics" in body:
        g = body["guardrail_metrics"]
        if not isinstance(g, list) or not all(isinstance(m, str) and m in EVENT_TYPES for m in g):
            errors["guardrail_metrics"] = "must list event types (bad outcomes, e.g. opt_out)"
        else:
            out["guardrail_metrics"] = list(dict.fromkeys(g))
    if "coverage" in body:
        if not _number(body["coverage"]) or not 0 <= body["coverage"] <= 1:
            errors["coverage"] = "must be a number from 0 to 1"
        else:
            out["coverage"] = float(body["coverage"])
    if "namespace" in body and body["namespace"] is not None:
        ns = body["namespace"]
        if (
            not isinstance(ns, list)
            or len(ns) != 3
            or not isinstance(ns[0], str)
            or not all(_number(x) for x in ns[1:])
            or not 0 <= ns[1] < ns[2] <= 1
        ):
            errors["namespace"] = "must be [id, start, end] with 0 <= start < end <= 1"
        else:
            out["namespace"] = [ns[0], float(ns[1]), float(ns[2])]
    elif "namespace" in body:
        out["namespace"] = None
    for field, kind, check, message in (
        ("name", str, lambda v: 1 <= len(v) <= 120, "must be 1-120 characters"),
        ("hypothesis", str, lambda v: len(v) <= 2000, "must be at most 2,000 characters"),
        ("loop", str, lambda v: 1 <= len(v) <= 24, "must name a loop"),
        ("seed", str, lambda v: 1 <= len(v) <= 64, "must be 1-64 characters"),
        ("window_days", int, lambda v: 1 <= v <= 90, "must be whole days from 1 to 90"),
        ("hash_version", int, lambda v: v in (1, 2), "must be 1 or 2"),
        ("sequential", bool, lambda v: True, "must be true or false"),
        ("mde", float, lambda v: 0 < v < 1, "must be a fraction between 0 and 1"),
    ):
        if field not in body:
            continue
        value = body[field]
        ok = (
            _number(value)
            if kind is float
            else isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        )
        if not ok or not check(value):
            errors[field] = message
        else:
            out[field] = float(value) if kind is float else value
    if errors:
        raise ExperimentError("invalid", "invalid experiment", errors)
    return out


def to_json(exp: Experiment) -> dict[str, Any]:
    return {
        "key": exp.key,
        "name": exp.name,
        "hypothesis": exp.hypothesis,
        "loop": exp.loop,
        "variants": exp.variants,
        "coverage": exp.coverage,
        "seed": exp.seed,
        "hash_version": exp.hash_version,
        "namespace": exp.namespace,
        "target_metric": exp.target_metric,
        "guardrail_metrics": exp.guardrail_metrics,
        "window_days": exp.window_days,
        "sequential": exp.sequential,
        "mde": exp.mde,
        "status": exp.status,
        "winner": exp.winner,
        "created_at": exp.created_at.isoformat(),
        "updated_at": exp.updated_at.isoformat(),
        "started_at": exp.started_at.isoformat() if exp.started_at else None,
        "stopped_at": exp.stopped_at.isoformat() if exp.stopped_at else None,
    }


def _audit(
    session: AsyncSession, key: str, actor: str, action: str, changes: dict[str, Any], at: datetime
) -> None:
    session.add(ExperimentAudit(experiment_key=key, actor=actor, action=action, changes=changes, at=at))


async def get(session: AsyncSession, key: str, *, lock: bool = False) -> Experiment:
    exp = await session.get(Experiment, key, with_for_update=lock) if KEY.match(key) else None
    if exp is None:
        raise ExperimentError("not_found", f"no experiment {key!r}")
    return exp


async def create(session: AsyncSession, body: Any, actor: str, now: datetime) -> Experiment:
    fields = check_definition(body, creating=True)
    if await session.get(Experiment, fields["key"]) is not None:
        raise ExperimentError("conflict", f"experiment {fields['key']!r} exists")
    exp = Experiment(
        **{
            "name": fields["key"],
            "hypothesis": "",
            "coverage": 1.0,
            "seed": fields["key"],
            "hash_version": 2,
            "guardrail_metrics": [],
            "window_days": 14,
            "sequential": False,
            "mde": 0.02,
            **fields,
        },
        status="draft",
        created_at=now,
        updated_at=now,
    )
    session.add(exp)
    _audit(session, exp.key, actor, "create", to_json(exp), now)
    await session.flush()
    return exp


async def update(session: AsyncSession, key: str, body: Any, actor: str, now: datetime) -> Experiment:
    exp = await get(session, key, lock=True)
    fields = check_definition(body, creating=False)
    if "key" in fields and fields["key"] != key:
        raise ExperimentError("invalid", "an experiment's key cannot change", {"key": "cannot change"})
    if exp.status == "stopped":
        raise ExperimentError("conflict", "a stopped experiment cannot change")
    if "variants" in fields and exp.status != "draft":
        if [v["key"] for v in fields["variants"]] != [v["key"] for v in exp.variants]:
            raise ExperimentError(
                "conflict", "the variants of a started experiment cannot change (weights can)"
            )
    for locked in ("seed", "hash_version", "namespace"):
        if locked in fields and exp.status != "draft" and fields[locked] != getattr(exp, locked):
            raise ExperimentError("conflict", f"{locked} cannot change once the experiment has started")
    changes = {k: v for k, v in fields.items() if getattr(exp, k) != v}
    for name, value in changes.items():
        setattr(exp, name, value)
    exp.updated_at = now
    _audit(session, key, actor, "update", changes, now)
    await session.flush()
    return exp


async def transition(
    session: AsyncSession, key: str, action: str, actor: str, now: datetime, winner: Any = None
) -> Experiment:
    exp = await get(session, key, lock=True)
    before = exp.status
    if action == "winner":
        if exp.status == "draft":
            raise ExperimentError("illegal_transition", "a draft has no winner: start it first")
        if winner not in [v["key"] for v in exp.variants]:
            raise ExperimentError("invalid", "variant must be one of the experiment's variant keys")
        exp.winner, exp.status = winner, "stopped"
    else:
        allowed, target = TRANSITIONS[action]
        if exp.status not in allowed:
            raise ExperimentError("illegal_transition", f"cannot {action} an experiment that is {exp.status}")
        exp.status = target
    if exp.status == "running" and exp.started_at is None:
        exp.started_at = now
    if exp.status == "stopped" and exp.stopped_at is None:
        exp.stopped_at = now
    exp.updated_at = now
    _audit(session, key, actor, action, {"status": [before, exp.status], "winner": exp.winner}, now)
    await session.flush()
    return exp


async def listing(
    session: AsyncSession, status: str | None = None, loop: str | None = None
) -> list[Experiment]:
    query = select(Experiment).order_by(Experiment.created_at.desc(), Experiment.key)
    if status is not None:
        query = query.where(Experiment.status == status)
    if loop is not None:
        query = query.where(Experiment.loop == loop)
    return list((await session.scalars(query)).all())


def _variant(exp: Experiment, key: str | None) -> dict[str, Any] | None:
    return next((v for v in exp.variants if v["key"] == key), None)


async def assignment(session: AsyncSession, exp: Experiment, user_id: str) -> Assignment:
    if exp.status == "draft":
        return Assignment(None, False, None, False)
    if exp.status in ("paused", "stopped"):
        chosen = _variant(exp, exp.winner) or exp.variants[0]
        return Assignment(chosen["key"], False, chosen.get("config", {}), False)
    exposed = await session.get(ExperimentExposure, (exp.key, user_id))
    if exposed is not None and _variant(exp, exposed.variant) is not None:
        kept = _variant(exp, exposed.variant)
        assert kept is not None
        return Assignment(kept["key"], True, kept.get("config", {}), False)
    index = assign(
        user_id,
        seed=exp.seed,
        weights=[v["weight"] for v in exp.variants],
        coverage=exp.coverage,
        namespace=tuple(exp.namespace) if exp.namespace else None,
        hash_version=exp.hash_version,
    )
    if index is None:
        return Assignment(None, False, None, False)
    chosen = exp.variants[index]
    return Assignment(chosen["key"], True, chosen.get("config", {}), True)


class ExperimentConsumer:
    """Records first exposures and the exposed users' metric events (a consumer of the event stream)."""

    name = "experiments"

    def __init__(self, notify: Callable[[Sequence[str]], Awaitable[None]] | None = None) -> None:
        self.notify = notify  # told which experiments' numbers moved, after the commit

    async def handle(
        self, events: list[dict[str, Any]], session: AsyncSession
    ) -> Callable[[], Awaitable[None]] | None:
        running = {
            e.key: e
            for e in (await session.scalars(select(Experiment).where(Experiment.status == "running")))
        }
        if not running:
            return None
        touched: set[str] = set()
        insert = dialect_insert(session.get_bind().dialect.name)
        for event in events:
            if event["type"] == EXPOSURE:
                props = event["props"]
                exp = running.get(props.get("experiment"))
                if exp is None or _variant(exp, props.get("variant")) is None:
                    continue
                result = await session.execute(
                    insert(ExperimentExposure)
                    .values(
                        experiment_key=exp.key,
                        user_id=event["user_id"],
                        variant=props["variant"],
                        exposed_at=datetime.fromisoformat(event["ts"]),
                        event_id=event["id"],
                    )
                    .on_conflict_do_nothing(index_elements=["experiment_key", "user_id"])
                )
                if result.rowcount:  # type: ignore[attr-defined]
                    touched.add(exp.key)
        metric_events = [e for e in events if e["type"] != EXPOSURE]
        watching = {key: {exp.target_metric, *exp.guardrail_metrics} for key, exp in running.items()}
        relevant = [e for e in metric_events if any(e["type"] in m for m in watching.values())]
        if relevant:
            await session.flush()
            exposures = {
                (x.experiment_key, x.user_id): x
                for x in await session.scalars(
                    select(ExperimentExposure).where(
                        ExperimentExposure.experiment_key.in_(list(watching)),
                        ExperimentExposure.user_id.in_({e["user_id"] for e in relevant}),
                    )
                )
            }
            for event in relevant:
                at = datetime.fromisoformat(event["ts"])
                value = event["props"].get("value")
                value = float(value) if _number(value) else 0.0
                for key, metrics in watching.items():
                    exposure = exposures.get((key, event["user_id"]))
                    if event["type"] not in metrics or exposure is None:
                        continue
                    if (
                        not exposure.exposed_at
                        <= at
                        <= exposure.exposed_at + timedelta(days=running[key].window_days)
                    ):
                        continue
                    await self._count(session, insert, key, event["user_id"], event["type"], value, at)
                    touched.add(key)
        if not touched or self.notify is None:
            return None
        notify, keys = self.notify, sorted(touched)
        return lambda: notify(keys)

    @staticmethod
    async def _count(
        session: AsyncSession, insert: Any, key: str, user: str, metric: str, value: float, at: datetime
    ) -> None:
        stmt = insert(ExperimentConversion).values(
            experiment_key=key, user_id=user, metric=metric, events=1, value=value, first_at=at
        )
        await session.execute(
            stmt.on_conflict_do_update(
                index_elements=["experiment_key", "user_id", "metric"],
                set_={
                    "events": ExperimentConversion.events + 1,
                    "value": ExperimentConversion.value + stmt.excluded.value,
                },
            )
        )


async def counts(session: AsyncSession, exp: Experiment, metric: str) -> list[VariantCounts]:
    """Per variant (in the experiment's order): exposed users, users with the metric, and the sums of
    their values and squared values — SQL aggregates over exposures left-joined to conversions."""
    c = ExperimentConversion
    joined = (
        select(
            ExperimentExposure.variant,
            func.count(),
            func.count(c.user_id),
            func.coalesce(func.sum(c.value), 0.0),
            func.coalesce(func.sum(c.value * c.value), 0.0),
        )
        .select_from(ExperimentExposure)
        .outerjoin(
            c,
            (c.experiment_key == ExperimentExposure.experiment_key)
            & (c.user_id == ExperimentExposure.user_id)
            & (c.metric == metric),
        )
        .where(ExperimentExposure.experiment_key == exp.key)
        .group_by(ExperimentExposure.variant)
    )
    rows = {
        v: (int(n), int(k), float(s), float(s2)) for v, n, k, s, s2 in (await session.execute(joined)).all()
    }
    return [VariantCounts(v["key"], v["weight"], *rows.get(v["key"], (0, 0, 0.0, 0.0))) for v in exp.variants]


async def results(session: AsyncSession, exp: Experiment) -> dict[str, Any]:
    """SPEC §9b's results, with the full statistics of metrics.experiment_stats.analyze. Guardrail
    metrics are bad outcomes (e.g. `opt_out`): harmed when a treatment's rate is significantly higher."""
    variants = await counts(session, exp, exp.target_metric)
    guardrails = [
        result
        for metric in exp.guardrail_metrics
        for result in guardrail_results(metric, await counts(session, exp, metric), sequential=exp.sequential)
    ]
    analysis = analyze(variants, sequential=exp.sequential, mde=exp.mde, guardrails=guardrails)
    return {
        "experiment": exp.key,
        "status": exp.status,
        "winner": exp.winner,
        "target_metric": exp.target_metric,
        **analysis,
    }
