"""The OpenAPI 3 description of every HTTP route the app serves, built in code from the same constants the
handlers check (event types, link sources, periods, roles, loop actions), and served at `GET /openapi.json`.

Each operation says who may call it: `security` is the bearer token (or the dashboards' `ve_admin` cookie)
unless the route is public, and `x-roles` names the roles it admits (`any` for every signed-in user, `self`
for the user named in the path). `tests/reliability/test_api_input.py` checks that every route of the app
is described here, and runs schemathesis against a live server with this schema.
"""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from metrics.events import EVENT_TYPES, ID_PATTERN
from metrics.experiments import KEY, STATUSES, TRANSITIONS
from metrics.growth import PERIODS
from metrics.links import MAX_TTL, SOURCES

from .responses import MAX_JSON_DEPTH, ORJSONResponse

Schema = dict[str, Any]

JSON = "application/json"
USER_ID: Schema = {"type": "string", "pattern": ID_PATTERN.pattern, "minLength": 1, "maxLength": 64}
EXPERIMENT_KEY: Schema = {"type": "string", "pattern": KEY.pattern, "minLength": 1, "maxLength": 64}
TIMESTAMP: Schema = {"type": "string", "format": "date-time"}
NULLABLE_NUMBER: Schema = {"type": "number", "nullable": True}
OBJECT: Schema = {"type": "object", "additionalProperties": True}

ERROR: Schema = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {"type": "string", "description": "what was wrong, for a client developer"},
        "fields": {"type": "object", "additionalProperties": {"type": "string"}},
        "code": {"type": "string"},
    },
}

ERRORS = {
    "400": "the body is not valid JSON, or the URL holds a NUL character",
    "401": "no token, or a forged, expired or malformed one",
    "403": "the token's role or user may not do this",
    "404": "no such thing",
    "409": "the request conflicts with the current state",
    "413": "the body is larger than this route accepts",
    "415": "the body is not declared as JSON",
    "422": "the request is well-formed but its values are not acceptable (per-field messages)",
    "503": "a backing service is down; nothing was done; retry after `Retry-After` seconds",
}


def _json(schema: Schema, description: str = "") -> Schema:
    return {"description": description or "OK", "content": {JSON: {"schema": schema}}}


def _text(media: str, description: str) -> Schema:
    return {"description": description, "content": {media: {"schema": {"type": "string"}}}}


def _obj(required: list[str] | None = None, additional: bool = True, **properties: Schema) -> Schema:
    out: Schema = {"type": "object", "properties": properties, "additionalProperties": additional}
    if required:
        out["required"] = required
    return out


def _array(items: Schema, **extra: Any) -> Schema:
    return {"type": "array", "items": items, **extra}


def _errors(*codes: int) -> dict[str, Schema]:
    return {str(c): _json({"$ref": "#/components/schemas/Error"}, ERRORS[str(c)]) for c in codes}


def _path(name: str, schema: Schema, description: str = "") -> Schema:
    return {"name": name, "in": "path", "required": True, "schema": schema, "description": description}


def _query(name: str, schema: Schema, description: str = "") -> Schema:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


def _body(schema: Schema, required: bool = True) -> Schema:
    return {"required": required, "content": {JSON: {"schema": schema}}}


def _op(
    summary: str,
    roles: str | None,
    responses: dict[str, Schema],
    *,
    tag: str,
    parameters: list[Schema] | None = None,
    body: Schema | None = None,
) -> Schema:
    """One operation. `roles` None: public. Authenticated operations also answer 401 and 403; every
    operation may answer 400 (a NUL in the URL)."""
    op: Schema = {"summary": summary, "tags": [tag], "responses": dict(responses)}
    if roles is None:
        op["security"] = []
    else:
        op["x-roles"] = roles
        op["responses"].update({k: v for k, v in _errors(401, 403).items() if k not in responses})
    op["responses"].setdefault("400", _errors(400)["400"])
    if parameters:
        op["parameters"] = parameters
    if body is not None:
        op["requestBody"] = body
        for code in (413, 415, 422):
            op["responses"].setdefault(str(code), _errors(code)[str(code)])
    return op


# Bodies and answers.

EVENT: Schema = _obj(
    ["type", "user_id"],
    False,
    id={**USER_ID, "description": "idempotency key: the same id twice is one event"},
    type={"type": "string", "enum": sorted(EVENT_TYPES)},
    user_id=USER_ID,
    ts={
        "oneOf": [TIMESTAMP, {"type": "number"}],
        "description": "ISO 8601 with a zone, or epoch seconds; only admins may send past times",
    },
    props={**OBJECT, "description": "per type; see the README's event table (at most 4096 bytes as JSON)"},
)
VARIANT_IN: Schema = _obj(
    ["key"],
    True,
    key=EXPERIMENT_KEY,
    weight={"type": "number", "minimum": 0, "maximum": 1},
    name={"type": "string"},
    config=OBJECT,
)
EXPERIMENT_FIELDS: dict[str, Schema] = {
    "key": EXPERIMENT_KEY,
    "name": {"type": "string", "minLength": 1, "maxLength": 120},
    "hypothesis": {"type": "string", "maxLength": 2000},
    "loop": {"type": "string", "minLength": 1, "maxLength": 24},
    "variants": _array(VARIANT_IN, minItems=2, maxItems=10),
    "coverage": {"type": "number", "minimum": 0, "maximum": 1},
    "seed": {"type": "string", "minLength": 1, "maxLength": 64},
    "hash_version": {"type": "integer", "enum": [1, 2]},
    "namespace": {"type": "array", "nullable": True, "minItems": 3, "maxItems": 3},
    "target_metric": {"type": "string", "enum": sorted(EVENT_TYPES)},
    "guardrail_metrics": _array({"type": "string", "enum": sorted(EVENT_TYPES)}),
    "window_days": {"type": "integer", "minimum": 1, "maximum": 90},
    "sequential": {"type": "boolean"},
    "mde": {"type": "number", "exclusiveMinimum": True, "minimum": 0, "exclusiveMaximum": True, "maximum": 1},
}
EXPERIMENT: Schema = _obj(
    ["key", "name", "variants", "coverage", "seed", "target_metric", "status"],
    True,
    key=EXPERIMENT_KEY,
    name={"type": "string"},
    hypothesis={"type": "string", "nullable": True},
    loop={"type": "string", "nullable": True},
    variants=_array(_obj(["key", "weight"], key={"type": "string"}, weight={"type": "number"})),
    coverage={"type": "number"},
    seed={"type": "string"},
    hash_version={"type": "integer"},
    namespace={"type": "array", "nullable": True},
    target_metric={"type": "string"},
    guardrail_metrics=_array({"type": "string"}),
    window_days={"type": "integer"},
    sequential={"type": "boolean"},
    mde={"type": "number"},
    status={"type": "string", "enum": list(STATUSES)},
    winner={"type": "string", "nullable": True},
    created_at=TIMESTAMP,
    updated_at=TIMESTAMP,
    started_at={**TIMESTAMP, "nullable": True},
    stopped_at={**TIMESTAMP, "nullable": True},
)
PROFILE: Schema = _obj(
    None,
    False,
    display_name={"type": "string", "minLength": 1, "maxLength": 80, "nullable": True},
    role={"type": "string", "enum": ["student", "parent", "tutor", "admin"]},
    minor={"type": "boolean"},
    parent_id={**USER_ID, "nullable": True},
    timezone={"type": "string", "nullable": True, "description": "an IANA zone, e.g. Europe/London"},
    subjects=_array({"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"}),
)
REPORT: Schema = _obj(
    ["days", "k_factor", "invites_sent", "clicks", "signups", "by_source", "funnel", "cycle_time"],
    True,
    days={"type": "integer", "enum": list(PERIODS)},
    k_factor={"type": "number"},
    invites_sent={"type": "integer"},
    invites_per_user={"type": "number"},
    conversion_rate={"type": "number"},
    clicks={"type": "integer"},
    signups={"type": "integer"},
    activated={"type": "integer"},
    referrers={"type": "integer"},
    active_users={"type": "integer"},
    k_per_referrer={"type": "number"},
    by_source=_array(OBJECT),
    funnel=_array(OBJECT),
    cohorts=_array(OBJECT),
    timeline=_array(OBJECT),
    top_referrers=_array(OBJECT),
    cycle_time=_obj(median_hours=NULLABLE_NUMBER, p90_hours=NULLABLE_NUMBER),
)
GUARDRAILS: Schema = _obj(
    ["loops", "experiments", "global"], loops=OBJECT, experiments=OBJECT, **{"global": OBJECT}
)
ALERT: Schema = _obj(
    ["id", "metric", "scope", "level", "state"],
    id={"type": "integer"},
    metric={"type": "string"},
    scope={"type": "string"},
    level={"type": "string"},
    value=NULLABLE_NUMBER,
    threshold=NULLABLE_NUMBER,
    state={"type": "string", "enum": ["open", "resolved"]},
    created_at=TIMESTAMP,
    resolved_at={**TIMESTAMP, "nullable": True},
)
AUDIT_ROW: Schema = _obj(
    ["actor", "action", "at"], actor={"type": "string"}, action={"type": "string"}, at=TIMESTAMP
)
HTML_PAGE = _text("text/html", "an HTML page")
SEE_OTHER = {"description": "redirect (Location says where)"}


def build_paths(loop_actions: list[str]) -> dict[str, dict[str, Schema]]:
    user = _path("user_id", USER_ID, "the user's id")
    key = _path("key", EXPERIMENT_KEY, "the experiment's key")
    days = _query("days", {"type": "integer", "enum": list(PERIODS), "default": 7})
    opted_out = _obj(["user_id", "opted_out"], user_id={"type": "string"}, opted_out={"type": "boolean"})
    opted_out_by = _obj(
        ["user_id", "opted_out", "opted_out_by"],
        user_id={"type": "string"},
        opted_out={"type": "boolean"},
        opted_out_by={
            "type": "string",
            "enum": ["self", "parent", "admin"],
            "description": "who made the opt-out that stands (a parent's or an admin's is kept)",
        },
    )
    return {
        "/api/publish": {
            "post": _op(
                "Push an event to every socket joined to a topic, on every node (SPEC §9a)",
                "admin",
                {
                    "202": _json(
                        _obj(
                            ["topic", "event", "local_subscribers"],
                            topic={"type": "string"},
                            event={"type": "string"},
                            local_subscribers={"type": "integer", "minimum": 0},
                        ),
                        "accepted",
                    ),
                    **_errors(503),
                },
                tag="realtime",
                body=_body(
                    _obj(
                        ["topic", "event"],
                        topic={"type": "string", "minLength": 1},
                        event={"type": "string", "minLength": 1},
                        payload=OBJECT,
                    )
                ),
            )
        },
        "/healthz": {
            "get": _op(
                "The process is alive",
                None,
                {"200": _json(_obj(["status"], status={"type": "string"}))},
                tag="ops",
            )
        },
        "/readyz": {
            "get": _op(
                "The database and the broker are reachable",
                None,
                {
                    code: _json(
                        _obj(["ready", "checks"], ready={"type": "boolean"}, checks=OBJECT), description
                    )
                    for code, description in (("200", "ready"), ("503", "a check failed"))
                },
                tag="ops",
            )
        },
        "/metrics": {
            "get": _op(
                "Prometheus metrics", None, {"200": _text("text/plain", "Prometheus text format")}, tag="ops"
            )
        },
        "/openapi.json": {
            "get": _op("This description", None, {"200": _json(OBJECT, "an OpenAPI 3 document")}, tag="ops")
        },
        "/socket/websocket": {
            "get": _op(
                "The Phoenix socket, asked for over plain HTTP: says how to connect",
                None,
                {"400": _text("text/plain", "use a WebSocket upgrade")},
                tag="realtime",
            )
        },
        "/api/events": {
            "post": _op(
                "Ingest one event or a batch of up to 1000, all or nothing (SPEC §8)",
                "any",
                {
                    "202": _json(
                        _obj(
                            ["accepted"],
                            accepted=_array(
                                _obj(
                                    ["id", "duplicate"], id={"type": "string"}, duplicate={"type": "boolean"}
                                )
                            ),
                        ),
                        "stored",
                    ),
                    **_errors(503),
                },
                tag="events",
                body=_body({"oneOf": [EVENT, _array(EVENT, minItems=1, maxItems=1000)]}),
            )
        },
        "/api/feeds/{feed}": {
            "get": _op(
                "A page of a feed (global, subject:{subject}, or user:{id} for that user), oldest first",
                "any",
                {
                    "200": _json(
                        _obj(
                            ["items", "next_before"],
                            items=_array(OBJECT),
                            next_before={"type": "integer", "nullable": True},
                        )
                    ),
                    **_errors(404, 422),
                },
                tag="events",
                parameters=[
                    _path("feed", {"type": "string"}, "global, subject:{subject} or user:{id}"),
                    _query("limit", {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}),
                    _query("before", {"type": "integer", "minimum": 0}, "the offset to page back from"),
                ],
            )
        },
        "/api/users/{user_id}": {
            "put": _op(
                "Create or update a user's profile (SPEC §8a)",
                "admin",
                {
                    "200": _json(
                        _obj(["id", "created"], id={"type": "string"}, created={"type": "boolean"}), "updated"
                    ),
                    "201": _json(
                        _obj(["id", "created"], id={"type": "string"}, created={"type": "boolean"}), "created"
                    ),
                },
                tag="users",
                parameters=[user],
                body=_body(PROFILE),
            ),
            "delete": _op(
                "Delete everything held about a user (COPPA/FERPA), in one transaction (the parent named "
                "in their profile, or an admin; audited): their sockets close and their tokens issued "
                "before `deleted_at` are refused",
                "parent or admin",
                {
                    "200": _json(
                        _obj(
                            ["pseudonym", "deleted", "anonymised", "deleted_at"],
                            pseudonym={"type": "string"},
                            deleted=OBJECT,
                            anonymised=OBJECT,
                            leaderboard_subjects=_array({"type": "string"}),
                            deleted_at=TIMESTAMP,
                        )
                    ),
                    **_errors(404, 422),
                },
                tag="users",
                parameters=[user],
            ),
        },
        "/api/users/{user_id}/export": {
            "get": _op(
                "Everything held about a user, as a JSON download (the user, the parent named in their "
                "profile, or an admin; audited)",
                "self, parent or admin",
                {"200": _json(_obj(["tables"], tables=OBJECT)), **_errors(404, 422)},
                tag="users",
                parameters=[user],
            )
        },
        "/api/users/{user_id}/consent": {
            "post": _op(
                "Record verified parental consent (an admin, or the parent named in the child's profile)",
                "admin or parent",
                {
                    "200": _json(
                        _obj(["user_id", "consent"], user_id={"type": "string"}, consent={"type": "boolean"})
                    )
                },
                tag="users",
                parameters=[user],
                body=_body(
                    _obj(
                        ["method"],
                        method={"type": "string", "minLength": 1, "maxLength": 32},
                        parent_id=USER_ID,
                    )
                ),
            ),
            "delete": _op(
                "Revoke parental consent",
                "admin or parent",
                {
                    "200": _json(
                        _obj(["user_id", "consent"], user_id={"type": "string"}, consent={"type": "boolean"})
                    ),
                    **_errors(404, 422),
                },
                tag="users",
                parameters=[user],
            ),
        },
        "/api/users/{user_id}/opt-out": {
            "post": _op(
                "Turn a user's social features off (the user, the parent named in their profile, or an "
                "admin; audited); stored before the answer",
                "self, parent or admin",
                {
                    "200": _json(opted_out_by),
                    **_errors(422, 503),
                },
                tag="users",
                parameters=[user],
            )
        },
        "/api/users/{user_id}/opt-in": {
            "post": _op(
                "Turn a user's social features back on: an opt-out a parent or an admin made is lifted "
                "only by a parent or an admin (403 for the user); audited",
                "self, parent or admin",
                {
                    "200": _json(opted_out),
                    **_errors(409, 422),
                },
                tag="users",
                parameters=[user],
            )
        },
        "/api/admin/parked": {
            "get": _op(
                "Events a consumer gave up on, with the error",
                "admin",
                {"200": _json(_obj(["parked"], parked=_array(OBJECT)))},
                tag="events",
            )
        },
        "/api/admin/conversions/{user_id}/review": {
            "post": _op(
                "Release or reject a conversion held by the fraud signals",
                "admin",
                {
                    "200": _json(
                        _obj(["user_id", "status"], user_id={"type": "string"}, status={"type": "string"})
                    ),
                    **_errors(404),
                },
                tag="growth",
                parameters=[user],
                body=_body(_obj(["approve"], approve={"type": "boolean"})),
            )
        },
        "/api/links": {
            "post": _op(
                "Make an invite link for the caller",
                "any",
                {
                    "201": _json(
                        _obj(
                            ["url", "token", "expires_at", "source"],
                            url={"type": "string"},
                            token={"type": "string"},
                            expires_at=TIMESTAMP,
                            source={"type": "string"},
                        ),
                        "made",
                    )
                },
                tag="growth",
                body=_body(
                    _obj(
                        ["source"],
                        source={"type": "string", "enum": sorted(SOURCES)},
                        target={"type": "string", "description": "an app path from the allow-list (README)"},
                        campaign={"type": "string", "minLength": 1, "maxLength": 64},
                        ttl={"type": "integer", "minimum": 60, "maximum": MAX_TTL},
                    )
                ),
            )
        },
        "/r/{token}": {
            "get": _op(
                "Follow an invite link: records the click and redirects to the link's app path",
                None,
                {
                    "302": SEE_OTHER,
                    "400": _text("text/html", "a malformed or altered link"),
                    "404": _text("text/html", "a link we have no record of"),
                    "410": _text("text/html", "an expired link"),
                },
                tag="growth",
                parameters=[_path("token", {"type": "string"}, "the link's token")],
            )
        },
        "/api/metrics/k-factor": {
            "get": _op(
                "The K-factor report (SPEC §9)",
                "admin",
                {
                    "200": {
                        "description": "the report",
                        "content": {JSON: {"schema": REPORT}, "text/csv": {"schema": {"type": "string"}}},
                    },
                    **_errors(422),
                },
                tag="growth",
                parameters=[days, _query("format", {"type": "string", "enum": ["json", "csv"]})],
            )
        },
        "/api/metrics/loops": {
            "get": _op(
                "K, conversion and a recommendation per loop",
                "admin",
                {
                    "200": _json(_obj(["days", "loops"], days={"type": "integer"}, loops=_array(OBJECT))),
                    **_errors(422),
                },
                tag="growth",
                parameters=[days],
            )
        },
        "/api/loops/{action}": {
            "post": _op(
                "A loop action as the token's user (README: Viral loops)",
                "any",
                {"200": _json(OBJECT, "the action's result"), **_errors(404, 422, 503)},
                tag="loops",
                parameters=[_path("action", {"type": "string", "enum": loop_actions})],
                body=_body(OBJECT),
            )
        },
        "/api/experiments": {
            "post": _op(
                "Create an experiment (as a draft)",
                "admin",
                {"201": _json(EXPERIMENT, "created"), **_errors(409)},
                tag="experiments",
                body=_body(_obj(["key", "variants", "target_metric"], False, **EXPERIMENT_FIELDS)),
            ),
            "get": _op(
                "List experiments",
                "admin",
                {"200": _json(_obj(["experiments"], experiments=_array(EXPERIMENT))), **_errors(422)},
                tag="experiments",
                parameters=[
                    _query("status", {"type": "string", "enum": list(STATUSES)}),
                    _query("loop", {"type": "string"}),
                ],
            ),
        },
        "/api/experiments/{key}": {
            "get": _op(
                "One experiment",
                "admin",
                {"200": _json(EXPERIMENT), **_errors(404)},
                tag="experiments",
                parameters=[key],
            ),
            "patch": _op(
                "Change an experiment (some fields only while it is a draft)",
                "admin",
                {"200": _json(EXPERIMENT), **_errors(404, 409)},
                tag="experiments",
                parameters=[key],
                body=_body(_obj(None, False, **EXPERIMENT_FIELDS)),
            ),
        },
        "/api/experiments/{key}/assignment": {
            "get": _op(
                "A user's variant (yourself, or anyone for an admin); records no exposure",
                "self",
                {
                    "200": _json(
                        _obj(
                            ["variant", "in_experiment"],
                            variant={"type": "string", "nullable": True},
                            in_experiment={"type": "boolean"},
                        )
                    ),
                    **_errors(404),
                },
                tag="experiments",
                parameters=[key, _query("user_id", USER_ID)],
            )
        },
        "/api/experiments/{key}/results": {
            "get": _op(
                "An experiment's results and statistics (SPEC §9b)",
                "admin",
                {
                    "200": _json(
                        _obj(
                            ["srm_p_value", "variants"], srm_p_value=NULLABLE_NUMBER, variants=_array(OBJECT)
                        )
                    ),
                    **_errors(404),
                },
                tag="experiments",
                parameters=[key],
            )
        },
        "/api/experiments/{key}/audit": {
            "get": _op(
                "Every change to an experiment, oldest first",
                "admin",
                {
                    "200": _json(
                        _obj(["experiment", "audit"], experiment={"type": "string"}, audit=_array(AUDIT_ROW))
                    )
                },
                tag="experiments",
                parameters=[key],
            )
        },
        "/api/experiments/{key}/{action}": {
            "post": _op(
                "Start, pause, stop an experiment, or declare its winner (`winner` takes {variant})",
                "admin",
                {"200": _json(EXPERIMENT), **_errors(404, 409)},
                tag="experiments",
                parameters=[
                    key,
                    _path("action", {"type": "string", "enum": sorted({*TRANSITIONS, "winner"})}),
                ],
                body=_body(_obj(None, variant={"type": "string"}), required=False),
            )
        },
        "/api/guardrails": {
            "get": _op("The guardrails report", "admin", {"200": _json(GUARDRAILS)}, tag="guardrails")
        },
        "/api/guardrails/check": {
            "post": _op("Evaluate the guardrails now", "admin", {"200": _json(GUARDRAILS)}, tag="guardrails")
        },
        "/api/guardrails/unpause": {
            "post": _op(
                "Switch a paused loop or experiment back on",
                "admin",
                {
                    "200": _json(
                        _obj(["scope", "paused"], scope={"type": "string"}, paused={"type": "boolean"})
                    ),
                    **_errors(409),
                },
                tag="guardrails",
                body=_body(_obj(["scope"], scope={"type": "string", "pattern": "^(loop|experiment):"})),
            )
        },
        "/api/guardrails/summary": {
            "get": _op(
                "The weekly summary for the last 7 days",
                "admin",
                {
                    "200": {
                        "description": "the summary",
                        "content": {
                            JSON: {"schema": OBJECT},
                            "text/csv": {"schema": {"type": "string"}},
                            "text/html": {"schema": {"type": "string"}},
                        },
                    }
                },
                tag="guardrails",
                parameters=[_query("format", {"type": "string", "enum": ["json", "csv", "html"]})],
            )
        },
        "/api/alerts": {
            "get": _op(
                "Guardrail alerts, newest first",
                "admin",
                {"200": _json(_obj(["alerts"], alerts=_array(ALERT))), **_errors(422)},
                tag="guardrails",
                parameters=[_query("state", {"type": "string", "enum": ["open", "resolved"]})],
            )
        },
        "/api/audit": {
            "get": _op(
                "The compliance audit log, newest first",
                "admin",
                {"200": _json(_obj(["audit"], audit=_array(AUDIT_ROW)))},
                tag="guardrails",
                parameters=[_query("subject", {"type": "string"})],
            )
        },
        # The dashboards (HTML pages over the admin API and the socket).
        **{
            path: {
                "get": _op(
                    summary, None, {"200": HTML_PAGE, "303": SEE_OTHER, "307": SEE_OTHER}, tag="dashboards"
                )
            }
            for path, summary in (
                ("/dashboard", "To the K-factor dashboard (or sign in with ?token=)"),
                ("/dashboard/", "To the K-factor dashboard (or sign in with ?token=)"),
            )
        },
        **{
            path: {
                "get": _op(
                    f"The {name} dashboard page for an admin's session cookie, else to the login page",
                    None,
                    {
                        "200": HTML_PAGE,
                        "303": SEE_OTHER,
                        "401": _text("text/html", "the login page: a refused token"),
                        "403": _text("text/html", "the login page: not an admin's token"),
                    },
                    tag="dashboards",
                    parameters=[_path("key", EXPERIMENT_KEY)] if "{key}" in path else None,
                )
            }
            for path, name in (
                ("/dashboard/k-factor", "K-factor"),
                ("/dashboard/experiments", "experiments"),
                ("/dashboard/experiments/{key}", "experiment"),
                ("/dashboard/guardrails", "guardrails"),
            )
        },
        "/dashboard/login": {
            "get": _op(
                "The login page",
                None,
                {"200": HTML_PAGE, "303": SEE_OTHER, "401": HTML_PAGE, "403": HTML_PAGE},
                tag="dashboards",
                parameters=[_query("next", {"type": "string"}), _query("reason", {"type": "string"})],
            ),
            "post": _op(
                "Sign in with an admin token (form or JSON fields `token`, `next`): the session cookie",
                None,
                {"303": SEE_OTHER, "401": HTML_PAGE, "403": HTML_PAGE, "413": _errors(413)["413"]},
                tag="dashboards",
                body={
                    "required": True,
                    "content": {
                        "application/x-www-form-urlencoded": {
                            "schema": _obj(None, token={"type": "string"}, next={"type": "string"})
                        },
                        JSON: {"schema": _obj(None, token={"type": "string"}, next={"type": "string"})},
                    },
                },
            ),
        },
        "/dashboard/logout": {
            "post": _op(
                "Sign out: clears the cookie", None, {"303": SEE_OTHER, "403": HTML_PAGE}, tag="dashboards"
            )
        },
        "/dashboard/session": {
            "get": _op(
                "Who is signed in (the session cookie or a bearer token); admins only",
                "admin",
                {"200": _json(_obj(["sub", "role"], sub={"type": "string"}, role={"type": "string"}))},
                tag="dashboards",
            )
        },
        "/dashboard/static/{path}": {
            "get": _op(
                "The dashboards' own scripts, styles and images (a fixed list)",
                None,
                {"200": {"description": "the file"}, **_errors(404)},
                tag="dashboards",
                parameters=[_path("path", {"type": "string"})],
            )
        },
    }


def build_schema(loop_actions: list[str]) -> Schema:
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "viral-engine",
            "version": "1",
            "description": (
                "The HTTP API of the real-time growth backend (the WebSocket protocol is in the README). "
                "Bodies are JSON (`Content-Type: application/json`, or none), nested at most "
                f'{MAX_JSON_DEPTH} levels, with no NUL characters; errors are `{{"error": …}}`.'
            ),
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}, {"session": []}],
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT (HS256, SPEC §5)"},
                "session": {"type": "apiKey", "in": "cookie", "name": "ve_admin"},
            },
            "schemas": {"Error": ERROR},
        },
        "paths": build_paths(loop_actions),
    }


def documented(schema: Schema) -> set[tuple[str, str]]:
    """(METHOD, starlette path) for every operation in `schema`."""
    out = set()
    for path, item in schema["paths"].items():
        starlette = path.replace("{feed}", "{feed:path}").replace("/static/{path}", "/static/{path:path}")
        out.update((method.upper(), starlette) for method in item)
    return out


def served(app: Starlette) -> set[tuple[str, str]]:
    """(METHOD, path) for every HTTP route of `app` (HEAD goes with GET)."""
    return {
        (method, route.path)
        for route in app.routes
        if isinstance(route, Route)
        for method in (route.methods or {"GET"})
        if method != "HEAD"
    }


async def openapi_json(request: Request) -> Response:
    state = request.app.state
    if getattr(state, "openapi", None) is None:
        state.openapi = build_schema(state.loops.action_names)
    return ORJSONResponse(state.openapi)
