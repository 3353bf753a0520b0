"""Presence over real sockets: Phoenix shapes, tabs, updates, privacy, and two nodes on a real Redis."""

from __future__ import annotations

import asyncio

from servers import FAST_PRESENCE, TOPIC, Roster, is_event


async def test_state_then_diffs_with_phoenix_shapes(server_factory, clients):
    server = server_factory(FAST_PRESENCE)
    maya = await clients(server, "maya", name="Maya")
    assert (await maya.join(TOPIC))["status"] == "ok"
    state = (await maya.wait_for(is_event(TOPIC, "presence_state")))[4]
    meta = state["maya"]["metas"][0]
    assert set(meta) == {"phx_ref", "online_at", "status", "role", "name"}
    assert meta["name"] == "Maya" and meta["status"] == "online"

    sam = await clients(server, "sam")
    await sam.join(TOPIC)
    diff = (await maya.wait_for(lambda f: f[3] == "presence_diff" and "sam" in f[4]["joins"]))[4]
    assert set(diff) == {"joins", "leaves"}
    assert diff["joins"]["sam"]["metas"][0]["status"] == "online"
    roster = Roster(maya, TOPIC)
    await roster.until({"maya": 1, "sam": 1})


async def test_two_tabs_are_one_key_and_closing_one_leaves_only_its_meta(server_factory, clients):
    server = server_factory(FAST_PRESENCE)
    watcher = await clients(server, "watcher")
    await watcher.join(TOPIC)
    roster = Roster(watcher, TOPIC)
    tab1, tab2 = await clients(server, "sam"), await clients(server, "sam")
    await tab1.join(TOPIC)
    await tab2.join(TOPIC)
    await roster.until({"watcher": 1, "sam": 2})
    await tab1.close()
    await roster.until({"watcher": 1, "sam": 1})
    leave = next(f for f in watcher.frames if f[3] == "presence_diff" and "sam" in f[4]["leaves"])
    assert len(leave[4]["leaves"]["sam"]["metas"]) == 1


async def test_meta_update_and_leave(server_factory, clients):
    server = server_factory(FAST_PRESENCE)
    watcher, sam = await clients(server, "watcher"), await clients(server, "sam")
    await watcher.join(TOPIC)
    await sam.join(TOPIC)
    roster = Roster(watcher, TOPIC)
    await roster.until({"watcher": 1, "sam": 1})
    reply = await sam.request(TOPIC, "presence_update", {"status": "in_session"})
    assert reply["status"] == "ok"
    async with asyncio.timeout(5):
        while roster.current()["sam"][0]["status"] != "in_session":
            await asyncio.sleep(0.02)
    assert roster.current()["sam"][0]["phx_ref"] == reply["response"]["phx_ref"]
    bad = await sam.request(TOPIC, "presence_update", {"status": "partying"})
    assert bad["status"] == "error" and "status must be one of" in bad["response"]["reason"]
    await sam.request(TOPIC, "phx_leave", {})
    await roster.until({"watcher": 1})


async def test_hidden_users_disappear_from_lists_but_still_count(server_factory, clients):
    server = server_factory(FAST_PRESENCE)
    watcher, sam = await clients(server, "watcher"), await clients(server, "sam")
    await watcher.join(TOPIC)
    await watcher.join("presence:global")
    await sam.join(TOPIC)
    roster = Roster(watcher, TOPIC)
    await roster.until({"watcher": 1, "sam": 1})
    await sam.request(TOPIC, "presence_update", {"hidden": True})
    await roster.until({"watcher": 1})
    await watcher.wait_for(
        lambda f: f[3] == "presence_counts" and f[4] == {"total": 2, "by_subject": {"algebra": 2}}
    )
    await sam.request(TOPIC, "presence_update", {"hidden": False})
    await roster.until({"watcher": 1, "sam": 1})


async def test_minors_appear_without_name_id_or_role(server_factory, clients):
    server = server_factory(FAST_PRESENCE)
    watcher = await clients(server, "watcher")
    await watcher.join(TOPIC)
    kid = await clients(server, "kid-42", minor=True, name="Timmy")
    await kid.join(TOPIC)
    kid_tab2 = await clients(server, "kid-42", minor=True, name="Timmy")
    await kid_tab2.join(TOPIC)
    roster = Roster(watcher, TOPIC)
    async with asyncio.timeout(5):  # both tabs, each in its own diff
        while sorted(len(m) for m in roster.current().values()) != [1, 2]:
            await asyncio.sleep(0.02)
    (key,) = [k for k in roster.current() if k != "watcher"]
    assert key.startswith("anon-") and "kid-42" not in key
    metas = roster.current()[key]
    assert len(metas) == 2  # both tabs under the one pseudonymous key
    for meta in metas:
        assert set(meta) == {"phx_ref", "online_at", "status", "name"}
        assert meta["name"] == "A student"
    assert "Timmy" not in str(watcher.frames) and "kid-42" not in str(watcher.frames)


async def test_opted_out_users_are_counted_but_never_listed(server_factory, clients):
    server = server_factory(FAST_PRESENCE)
    watcher = await clients(server, "watcher")
    await watcher.join(TOPIC)
    await watcher.join("presence:global")
    shy = await clients(server, "shy", opted_out=True)
    await shy.join(TOPIC)
    state = (await shy.wait_for(is_event(TOPIC, "presence_state")))[4]
    assert "shy" not in state
    await watcher.wait_for(lambda f: f[3] == "presence_counts" and f[4]["by_subject"] == {"algebra": 2})
    assert "shy" not in str([f for f in watcher.frames if f[2] == TOPIC])


async def test_global_counts_are_throttled_and_pushed_only_on_change(server_factory, clients):
    server = server_factory(FAST_PRESENCE)
    watcher = await clients(server, "watcher")
    await watcher.join("presence:global")
    first = (await watcher.wait_for(is_event("presence:global", "presence_counts")))[4]
    assert first == {"total": 1, "by_subject": {}}
    students = [await clients(server, f"s{i}") for i in range(20)]
    for i, student in enumerate(students):
        await student.join(f"presence:subject:{'math' if i % 2 else 'art'}")
    await watcher.wait_for(
        lambda f: f[3] == "presence_counts" and f[4] == {"total": 21, "by_subject": {"art": 10, "math": 10}}
    )
    pushes = watcher.events("presence:global", "presence_counts")
    assert len(pushes) <= 4  # 20 joins, at most one push a second (plus the join's own)
    await asyncio.sleep(1.5)
    assert watcher.events("presence:global", "presence_counts") == pushes  # nothing changed: nothing sent


async def test_invalid_subject_is_refused(server_factory, clients):
    server = server_factory(FAST_PRESENCE)
    client = await clients(server, "u1")
    reply = await client.join("presence:subject:no spaces!")
    assert reply["status"] == "error" and "invalid subject" in reply["response"]["reason"]
