"""The web pages in a real browser: Debian's chromium, driven by Playwright.

Skipped, saying so, only where no chromium is installed; `.ci/run` installs
it. A screenshot of the poll page is left in build/test-artifacts/.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import replace
from typing import Any

import asyncpg
import jwt
import orjson
from aiohttp import web
from aiohttp.test_utils import TestClient
from playwright.async_api import Page, expect

from ingest.app import create_app
from tests import browser
from tests.browser import LIVE_TIMEOUT, chromium, needs_chromium, screenshot
from tests.support import (
    ADMIN,
    InProcessWorker,
    ballot,
    create_poll,
    drain,
    edge_client,
    results,
    votes_by_option,
)
from voteflow.servers import free_port
from voteflow.settings import Settings

pytestmark = needs_chromium


async def stored_vote_ids(settings: Settings, poll_id: str) -> set[str]:
    conn = await asyncpg.connect(settings.database_url)
    try:
        rows = await conn.fetch("SELECT vote_id FROM votes WHERE poll_id = $1", poll_id)
    finally:
        await conn.close()
    return {str(row["vote_id"]) for row in rows}


def _count(page: Page, poll: dict[str, Any], option: int) -> Any:
    option_id = poll["options"][option]["id"]
    return page.locator(f'li[data-option-id="{option_id}"] .bar-count')


async def test_poll_page_follows_the_tally_live_and_casts_a_vote(
    edge: TestClient[Any, Any], worker: InProcessWorker
) -> None:
    poll = await create_poll(edge, question="Best colour?", options=["Red", "Green", "Blue"])
    base = str(edge.make_url("")).rstrip("/")
    async with chromium() as browser:
        page = await browser.new_page(viewport={"width": 800, "height": 1000})
        problems: list[str] = []
        page.on("pageerror", lambda error: problems.append(str(error)))

        await page.goto(f"{base}/polls/{poll['id']}")
        await expect(page.locator("h1")).to_have_text("Best colour?")
        await expect(page.locator("#status")).to_have_text("Live")

        for voter, option in (("ann", 0), ("bob", 0), ("cat", 2)):
            response = await edge.post("/api/vote", json=ballot(poll, voter, option))
            assert response.status == 202
        await expect(_count(page, poll, 0)).to_have_text("2 · 67%", timeout=LIVE_TIMEOUT)
        await expect(_count(page, poll, 2)).to_have_text("1 · 33%", timeout=LIVE_TIMEOUT)
        await expect(page.locator("#total")).to_have_text("3 ballots")

        # A vote from the page's own form, all the way to its bar.
        await page.get_by_label("Green").check()
        await page.get_by_role("button", name="Vote").click()
        await expect(page.locator("#vote-result")).to_contain_text("Vote received")
        await expect(page.locator("#voted")).to_have_text("You voted Green.")
        await expect(page.locator("#cast")).to_have_text("Change my vote")
        await expect(_count(page, poll, 1)).to_have_text("1 · 25%", timeout=LIVE_TIMEOUT)
        await expect(page.locator("#total")).to_have_text("4 ballots")
        red_bar = page.locator(f'li[data-option-id="{poll["options"][0]["id"]}"] .bar-fill')
        await expect(red_bar).to_have_attribute("style", re.compile(r"width: 50%"))

        # A ballot the edge refuses is said so on the page, and counts nothing.
        response = await edge.post(f"/api/polls/{poll['id']}/close", headers=ADMIN)
        assert response.status == 200
        await page.get_by_role("button", name="Vote").click()
        await expect(page.locator("#vote-result")).to_contain_text("Not counted: ")
        await expect(page.locator("#total")).to_have_text("4 ballots")

        # The page learned from the refusal that the poll is closed.
        await expect(page.locator("#status")).to_have_text("Closed · final results")
        await expect(page.locator("#cast")).to_be_disabled()

        # The ballots curve has been drawn from the history and the live
        # tallies: uPlot's canvas is there and not blank.
        await expect(page.locator("#chart")).not_to_have_attribute("data-points", "0")
        await page.wait_for_function(
            "() => { const c = document.querySelector('#chart canvas');"
            " return c && c.getContext('2d').getImageData(0, 0, c.width, c.height)"
            ".data.some((v) => v !== 0); }",
            timeout=LIVE_TIMEOUT,
        )
        await screenshot(page, "poll-page", full_page=True)

        # After a reload the page still says what this browser voted.
        await page.reload()
        await expect(page.locator("#voted")).to_have_text("You voted Green.")
        await expect(page.get_by_label("Green")).to_be_checked()

        # The list at / links to the open polls only; the closed ones, with
        # their ballots, are a tab away.
        other = await create_poll(edge, question="Tea or coffee?")
        await page.goto(f"{base}/")
        await expect(page.get_by_role("link", name="Tea or coffee?")).to_be_visible()
        await expect(page.get_by_role("link", name="Best colour?")).to_have_count(0)
        await page.get_by_role("link", name="Closed", exact=True).click()
        await expect(page.locator("h1")).to_have_text("Closed polls")
        closed = page.locator("ul.polls li").filter(has_text="Best colour?")
        await expect(closed.locator(".meta")).to_contain_text("4 ballots")
        await expect(page.get_by_role("link", name="Tea or coffee?")).to_have_count(0)
        await page.get_by_role("link", name="Open", exact=True).click()
        await page.get_by_role("link", name="Tea or coffee?").click()
        await expect(page).to_have_url(f"{base}/polls/{other['id']}")
        await expect(page.locator("#total")).to_have_text("0 ballots")
        assert problems == []


async def _serve(settings: Settings, port: int) -> web.AppRunner:
    """An edge on a fixed port, so that it can be stopped and started again there."""
    runner = web.AppRunner(create_app(settings))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


async def test_poll_page_says_when_disconnected_and_catches_up_after(
    edge: TestClient[Any, Any], worker: InProcessWorker, settings: Settings
) -> None:
    poll = await create_poll(edge, question="Still there?", options=["Yes", "No"])
    port = free_port()
    runner = await _serve(settings, port)
    async with chromium() as browser:
        try:
            page = await browser.new_page()
            await page.goto(f"http://127.0.0.1:{port}/polls/{poll['id']}")
            await expect(page.locator("#status")).to_have_text("Live")

            await runner.cleanup()  # the page's edge goes away
            await expect(page.locator("#status")).to_have_text(
                "Disconnected, reconnecting…", timeout=LIVE_TIMEOUT
            )
            # Votes committed while it is away, through another edge...
            for voter in ("ann", "bob"):
                response = await edge.post("/api/vote", json=ballot(poll, voter, 0))
                assert response.status == 202
            runner = await _serve(settings, port)
            # ...are on the page once it is back: it resumes from the snapshot.
            await expect(page.locator("#status")).to_have_text("Live", timeout=LIVE_TIMEOUT)
            await expect(_count(page, poll, 0)).to_have_text("2 · 100%", timeout=LIVE_TIMEOUT)
        finally:
            await runner.cleanup()


def _vote_ids(requests: list[Any]) -> list[str]:
    return [orjson.loads(request.post_data)["vote_id"] for request in requests]


async def test_poll_page_resends_a_ballot_with_its_vote_id_after_a_503(
    settings: Settings, redis_client: Any
) -> None:
    # One stream shard that holds one vote at most, and no worker yet: the
    # page's ballot meets a real 503 (shard full, Retry-After: 2) until a
    # worker drains the shard.
    full = replace(settings, stream_shards=1, max_backlog=1)
    async with edge_client(full) as edge:
        poll = await create_poll(edge, question="Once only?", options=["Yes", "No"])
        response = await edge.post("/api/vote", json=ballot(poll, "early", 0))
        assert response.status == 202
        base = str(edge.make_url("")).rstrip("/")
        async with chromium() as browser:
            page = await browser.new_page(viewport={"width": 800, "height": 1000})
            sent: list[Any] = []
            answers: list[int] = []
            page.on("request", lambda r: sent.append(r) if r.url.endswith("/api/vote") else 0)
            page.on(
                "response",
                lambda r: answers.append(r.status) if r.url.endswith("/api/vote") else 0,
            )
            await page.goto(f"{base}/polls/{poll['id']}")
            await expect(page.locator("#status")).to_have_text("Live")

            await page.get_by_label("No").check()
            async with page.expect_response(lambda r: r.url.endswith("/api/vote")) as first:
                await page.get_by_role("button", name="Vote").click()
            assert (await first.value).status == 503
            await expect(page.locator("#vote-result")).to_contain_text("sending it again")
            await screenshot(page, "poll-page-retrying")

            async with InProcessWorker(full):  # drains the shard: the retry fits
                await expect(page.locator("#vote-result")).to_contain_text(
                    "Vote received", timeout=LIVE_TIMEOUT
                )
                await expect(page.locator("#total")).to_have_text("2 ballots", timeout=LIVE_TIMEOUT)
                await drain(redis_client, full)
            assert answers[0] == 503 and answers[-1] == 202, answers
            vote_ids = _vote_ids(sent)
            assert len(vote_ids) >= 2 and len(set(vote_ids)) == 1, vote_ids
            # Counted once, under the vote_id the page chose.
            assert votes_by_option(await results(edge, poll["id"])) == {
                poll["options"][0]["id"]: 1,
                poll["options"][1]["id"]: 1,
            }
            assert await stored_vote_ids(full, poll["id"]) >= {vote_ids[0]}

            # A different choice is a new ballot, with a vote_id of its own.
            sent.clear()
            await page.get_by_label("Yes").check()
            await page.get_by_role("button", name="Vote").click()
            await expect(page.locator("#vote-result")).to_contain_text(
                "Vote received", timeout=LIVE_TIMEOUT
            )
            assert len(sent) == 1 and _vote_ids(sent)[0] != vote_ids[0]


async def test_poll_page_resends_a_ballot_with_its_vote_id_after_a_network_error(
    edge: TestClient[Any, Any], worker: InProcessWorker, settings: Settings
) -> None:
    poll = await create_poll(edge, question="Through the outage?", options=["Yes", "No"])
    port = free_port()
    runner = await _serve(settings, port)
    async with chromium() as browser:
        try:
            page = await browser.new_page()
            sent: list[Any] = []
            failed: list[Any] = []
            page.on("request", lambda r: sent.append(r) if r.url.endswith("/api/vote") else 0)
            page.on("requestfailed", lambda r: failed.append(r))
            await page.goto(f"http://127.0.0.1:{port}/polls/{poll['id']}")
            await expect(page.locator("#status")).to_have_text("Live")

            await runner.cleanup()  # the page's edge goes away: connection refused
            await page.get_by_label("Yes").check()
            await page.get_by_role("button", name="Vote").click()
            await expect(page.locator("#vote-result")).to_contain_text("sending it again")
            assert any(r.url.endswith("/api/vote") for r in failed)
            runner = await _serve(settings, port)  # back within the page's retries
            await expect(page.locator("#vote-result")).to_contain_text(
                "Vote received", timeout=LIVE_TIMEOUT
            )
            vote_ids = _vote_ids(sent)
            assert len(vote_ids) >= 2 and len(set(vote_ids)) == 1, vote_ids
            await expect(_count(page, poll, 0)).to_have_text("1 · 100%", timeout=LIVE_TIMEOUT)
        finally:
            await runner.cleanup()


async def test_poll_page_votes_with_the_voter_token_its_link_carries(
    settings: Settings, redis_client: Any
) -> None:
    """The bundled page, opened from an app's link ending in #voter_token=...,
    votes as that user, and drops the token from the address bar."""
    secret = "a-voter-token-secret-of-32-bytes-at-least"
    proven = replace(settings, voter_token_secret=secret)
    token = jwt.encode({"sub": "alice", "exp": int(time.time()) + 600}, secret, "HS256")
    async with edge_client(proven) as edge, InProcessWorker(proven):
        poll = await create_poll(edge, question="Members only?", require_voter_token=True)
        base = str(edge.make_url("")).rstrip("/")
        async with chromium() as browser:
            page = await browser.new_page(viewport={"width": 800, "height": 1000})
            await page.goto(f"{base}/polls/{poll['id']}#voter_token={token}")
            await expect(page.locator("#status")).to_have_text("Live")
            assert token not in page.url
            await page.get_by_label("B").check()
            await page.get_by_role("button", name="Vote").click()
            await expect(page.locator("#vote-result")).to_contain_text("Vote received")
            await expect(page.locator("#total")).to_have_text("1 ballot", timeout=LIVE_TIMEOUT)
            await drain(redis_client, proven)
        conn = await asyncpg.connect(proven.database_url)
        try:
            voters = await conn.fetch("SELECT voter FROM votes WHERE poll_id = $1", poll["id"])
        finally:
            await conn.close()
        assert [row["voter"] for row in voters] == ["u:alice"]


async def test_poll_page_reconnects_after_the_streams_lifetime_and_shows_the_latest_tally(
    settings: Settings, worker: InProcessWorker
) -> None:
    short = replace(settings, live_max_seconds=1.0)
    async with edge_client(short) as edge:
        poll = await create_poll(edge, question="Still live?", options=["Yes", "No"])
        base = str(edge.make_url("")).rstrip("/")
        async with chromium() as browser:
            page = await browser.new_page()
            streams: list[Any] = []
            page.on("request", lambda r: streams.append(r) if r.url.endswith("/live") else 0)
            await page.goto(f"{base}/polls/{poll['id']}")
            await expect(page.locator("#status")).to_have_text("Live")
            # The edge ends the first stream; the page opens the next by itself.
            async with asyncio.timeout(LIVE_TIMEOUT / 1000):
                while len(streams) < 2:
                    await asyncio.sleep(0.1)
            response = await edge.post("/api/vote", json=ballot(poll, "ann", 1))
            assert response.status == 202
            await expect(_count(page, poll, 1)).to_have_text("1 · 100%", timeout=LIVE_TIMEOUT)
            await expect(page.locator("#status")).to_have_text("Live", timeout=LIVE_TIMEOUT)


async def test_poll_page_refused_a_live_stream_opens_one_itself_once_there_is_room(
    settings: Settings, worker: InProcessWorker
) -> None:
    # One stream per address: a second tab is answered 429, and EventSource
    # gives up on that; the page must try again by itself.
    one = replace(settings, live_max_per_address=1, sse_heartbeat=0.5)
    async with edge_client(one) as edge:
        poll = await create_poll(edge, question="Room for me?", options=["Yes", "No"])
        url = f"{str(edge.make_url('')).rstrip('/')}/polls/{poll['id']}"
        async with chromium() as browser:
            first = await browser.new_page()
            await first.goto(url)
            await expect(first.locator("#status")).to_have_text("Live")
            second = await browser.new_page()
            async with second.expect_response(lambda r: r.url.endswith("/live")) as refused:
                await second.goto(url)
            assert (await refused.value).status == 429
            await expect(second.locator("#status")).to_have_text("Disconnected, reconnecting…")
            await first.close()
            await expect(second.locator("#status")).to_have_text("Live", timeout=LIVE_TIMEOUT)
            response = await edge.post("/api/vote", json=ballot(poll, "ann", 0))
            assert response.status == 202
            await expect(_count(second, poll, 0)).to_have_text("1 · 100%", timeout=LIVE_TIMEOUT)


async def test_voting_page_fits_a_phone_and_a_projector_in_both_themes_and_passes_axe(
    edge: TestClient[Any, Any], worker: InProcessWorker
) -> None:
    poll = await create_poll(
        edge, question="Which talks should run long?", options=["Streams", "Locks", "Tallies"],
        allow_multiple_votes=True, max_choices=2,
    )  # fmt: skip
    for voter, options in (("ann", [0, 1]), ("bob", [0]), ("cat", [2])):
        body = {
            "poll_id": poll["id"],
            "option_ids": [poll["options"][n]["id"] for n in options],
            "voter_fingerprint": voter,
        }
        assert (await edge.post("/api/vote", json=body)).status == 202
    url = f"{str(edge.make_url('')).rstrip('/')}/polls/{poll['id']}"
    problems: list[str] = []
    async with browser.chromium() as chromium:
        async for look in browser.looks(chromium, problems):
            page, size, theme = look.page, look.size, look.theme
            await page.goto(url)
            await expect(page.locator("html")).to_have_attribute("data-theme", theme)
            await expect(page.locator("#total")).to_have_text("3 ballots", timeout=LIVE_TIMEOUT)
            # Shares of ballots, and the page says so: 2 of 3 ballots name Streams.
            await expect(_count(page, poll, 0)).to_have_text("2 · 67%")
            await expect(page.locator("#shares")).to_contain_text("more than 100%")
            # The vote button is on the first screen, and nothing scrolls sideways.
            box = await page.locator("#cast").bounding_box()
            assert box is not None and box["y"] + box["height"] <= look.height
            assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
            # Touch targets of 48 px at least.
            choice = await page.locator(".choice").first.bounding_box()
            assert choice is not None and choice["height"] >= 48
            assert await browser.accessibility_problems(page) == [], (size, theme)
            await expect(page.locator("#chart canvas")).to_have_count(1)
            await browser.screenshot(page, f"vote-{size}-{theme}", full_page=True)
            assert problems == [], (size, theme)


async def test_every_page_fits_a_phone_and_a_projector_in_both_themes_and_passes_axe(
    edge: TestClient[Any, Any], worker: InProcessWorker
) -> None:
    """The pages the other tests drive in depth, and the rest (the lists at /,
    the page of an address that names none, the presenter view on a phone),
    as a person first sees them."""
    poll = await create_poll(edge, question="Which room?", options=["North", "South"])
    ended = await create_poll(edge, question="Which day?", options=["Monday", "Friday"])
    assert (await edge.post("/api/vote", json=ballot(ended, "ann", 1))).status == 202
    assert (await edge.post(f"/api/polls/{ended['id']}/close", headers=ADMIN)).status == 200
    base = str(edge.make_url("")).rstrip("/")
    pages = {
        "list-open": ("/", "Which room?"),
        "list-closed": ("/?state=closed", "Which day?"),
        "not-found": ("/polls/not-a-poll", "Nothing here"),
        "voting": (f"/polls/{poll['id']}", "Which room?"),
        "presenter": (f"/polls/{poll['id']}/present", "Which room?"),
        "organizer": ("/admin", "Organizer"),
    }
    problems: list[str] = []
    async with browser.chromium() as chromium:
        async for look in browser.looks(chromium, problems):
            page, size, theme = look.page, look.size, look.theme
            for name, (path, text) in pages.items():
                await page.goto(base + path + ("&" if "?" in path else "?") + f"theme={theme}")
                await expect(page.locator("body")).to_contain_text(text)
                if name in ("voting", "presenter"):  # the live tally is in
                    await expect(page.locator("#status")).to_have_text("Live")
                if name == "presenter":
                    # The bars take most of the width (not squeezed by the QR
                    # panel), which stands beside or under them, not on them.
                    bars = await page.locator("section.results").bounding_box()
                    join = await page.locator("aside.join").bounding_box()
                    assert bars is not None and join is not None
                    width = await page.evaluate("window.innerWidth")
                    assert bars["width"] >= 0.55 * width, (size, theme, bars)
                    assert (
                        join["x"] >= bars["x"] + bars["width"]
                        or join["y"] >= bars["y"] + bars["height"]
                    ), (size, theme, bars, join)
                where = (name, size, theme)
                assert await page.evaluate(
                    "document.documentElement.scrollWidth <= window.innerWidth"
                ), where
                assert await browser.accessibility_problems(page) == [], where
    assert problems == []
