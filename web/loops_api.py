"""Loop actions over HTTP: `POST /api/loops/{action}` (bearer token; acts as the token's user).

The same actions as the `user:{id}` socket messages (README "Viral loops"): `challenge`,
`accept_challenge`, `decline_challenge`, `submit_challenge`, `invite_buddy`, `accept_nudge`,
`start_rally`, `invite_to_rally`, `join_rally`, `request_rescue`, `join_rescue`.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from loops import ActionError, LoopEngine
from metrics import IngestUnavailable

from .auth import claims_from_request
from .responses import ORJSONResponse, read_json

STATUS = {"unknown_action": 404, "not_found": 404, "forbidden": 403, "invalid_link": 403, "refused": 403}


async def act(request: Request) -> Response:
    claims = claims_from_request(request)
    body = await read_json(request, 16 * 1024)
    engine: LoopEngine = request.app.state.loops
    try:
        reply = await engine.act(claims, request.path_params["action"], body)
    except ActionError as exc:
        return ORJSONResponse({"error": str(exc), **exc.as_dict()}, status_code=STATUS.get(exc.code, 422))
    except IngestUnavailable:
        return ORJSONResponse(
            {"error": "storage unavailable; retry"}, status_code=503, headers={"retry-after": "2"}
        )
    return ORJSONResponse(reply)


routes = [Route("/api/loops/{action}", act, methods=["POST"])]
