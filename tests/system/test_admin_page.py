"""The organizer's page at /admin, driven in Debian's chromium as an organizer
would: the token, the new poll form, the list, closing, sharing, exports.
Screenshots are left in build/test-artifacts/ (admin-light.png,
admin-phone-dark.png)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from playwright.async_api import Locator, Page, expect

from tests.browser import (
    PHONE,
    PROJECTOR,
    accessibility_problems,
    chromium,
    needs_chromium,
    screenshot,
)
from tests.support import ADMIN, ADMIN_TOKEN, InProcessWorker, ballot, create_poll, drain, expire
from voteflow.settings import Settings

pytestmark = needs_chromium

Client = TestClient[Any, Any]


async def test_admin_page_is_served_without_a_token_under_the_strict_policy(
    edge: Client,
) -> None:
    for path, kind in (
        ("/admin", "text/html"),
        ("/static/admin.js", "text/javascript"),
        ("/static/admin.css", "text/css"),
    ):
        response = await edge.get(path)
        assert response.status == 200, path
        assert response.content_type == kind, path
        assert "script-src 'self'" in response.headers["Content-Security-Policy"]
        again = await edge.get(path, headers={"If-None-Match": response.headers["ETag"]})
        assert again.status == 304, path
    page = await (await edge.get("/admin")).text()
    assert '<script src="/static/admin.js" defer></script>' in page
    assert "<script>" not in page and "style=" not in page


def _base(edge: Client) -> str:
    return str(edge.make_url("")).rstrip("/")


async def _all_polls(edge: Client) -> list[dict[str, Any]]:
    response = await edge.get("/api/polls", params={"state": "all", "limit": "100"})
    assert response.status == 200
    polls: list[dict[str, Any]] = (await response.json())["polls"]
    return polls


async def _sign_in(page: Page, token: str = ADMIN_TOKEN) -> None:
    await page.get_by_label("Admin token").fill(token)
    await page.get_by_role("button", name="Sign in").click()


async def _fill_options(page: Page, labels: list[str]) -> None:
    """The option fields hold `labels`, adding fields as needed (two to start)."""
    while await page.locator("#options input").count() < len(labels):
        await page.get_by_role("button", name="Add option").click()
    for index, label in enumerate(labels):
        await page.get_by_label(f"Option {index + 1}", exact=True).fill(label)


def _page_errors(page: Page) -> list[str]:
    """The uncaught script errors of `page`, as they happen."""
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    return errors


async def _shown(page: Page, image: Locator) -> None:
    """Wait until `image` has loaded and decoded."""
    await image.scroll_into_view_if_needed()
    await page.wait_for_function(
        "img => img.complete && img.naturalWidth > 0", arg=await image.element_handle()
    )


def _card(page: Page, question: str) -> Locator:
    return page.locator("li.admin-poll").filter(has=page.get_by_role("heading", name=question))


async def test_organizer_creates_lists_closes_and_shares_polls(
    edge: Client, worker: InProcessWorker, settings: Settings, redis_client: Any
) -> None:
    base = _base(edge)
    async with chromium() as browser:
        # New York: the closing time typed in is the browser's local time.
        context = await browser.new_context(
            viewport={"width": 1280, "height": 900}, timezone_id="America/New_York"
        )
        await context.grant_permissions(["clipboard-read", "clipboard-write"], origin=base)
        page = await context.new_page()
        errors = _page_errors(page)
        await page.goto(f"{base}/admin")

        # A wrong token is refused, with the API's 401 named.
        await _sign_in(page, "not-the-admin-token-at-all")
        await expect(page.locator("#signin-result")).to_contain_text("Wrong token")
        await expect(page.locator("#signin-result")).to_contain_text("401")
        await expect(page.locator("#desk")).to_be_hidden()

        # The right one opens the page; it is kept for this tab only.
        await _sign_in(page)
        await expect(page.get_by_role("heading", name="New poll")).to_be_visible()
        await expect(page.locator("#list-status")).to_contain_text("No polls yet")
        stored = await page.evaluate("[sessionStorage.length, localStorage.length]")
        assert stored == [1, 0]
        assert ADMIN_TOKEN not in page.url

        # Options can be added up to the API's 64, and removed down to two.
        await page.evaluate(
            "() => { const add = document.getElementById('add-option');"
            " for (let i = 0; i < 100 && !add.hidden; i++) add.click(); }"
        )
        await expect(page.locator("#options input")).to_have_count(64)
        await expect(page.get_by_role("button", name="Add option")).to_be_hidden()
        await page.evaluate(
            "() => { for (let i = 0; i < 100; i++) {"
            " const removes = document.querySelectorAll('#options button:not([hidden])');"
            " if (!removes.length) break; removes[removes.length - 1].click(); } }"
        )
        await expect(page.locator("#options input")).to_have_count(2)
        await expect(page.get_by_role("button", name="Remove option 1")).to_be_hidden()

        # One option only: the API's 422 is shown beside the options.
        await page.get_by_label("Question").fill("Only one?")
        await _fill_options(page, ["Alone"])
        await page.get_by_role("button", name="Create poll").click()
        await expect(page.locator("#options-error")).to_contain_text(
            "options must be a list of 2 to 64 distinct labels"
        )
        await expect(page.locator("#create-result")).to_contain_text("Not created")
        # More choices per vote than options: beside that field.
        await _fill_options(page, ["Alone", "Together"])
        await page.get_by_label("Most options one vote may pick").fill("3")
        await page.get_by_role("button", name="Create poll").click()
        await expect(page.locator("#max_choices-error")).to_contain_text(
            "max_choices must be at most the number of options"
        )
        await expect(page.locator("#options-error")).to_be_hidden()
        await expect(page.get_by_label("Most options one vote may pick")).to_have_attribute(
            "aria-invalid", "true"
        )
        assert await _all_polls(edge) == []

        # A single-vote poll.
        await page.get_by_label("Question").fill("Lunch: pizza or salad?")
        await _fill_options(page, ["Pizza", "Salad"])
        await page.get_by_label("Most options one vote may pick").fill("1")
        await page.get_by_role("button", name="Create poll").click()
        await expect(page.locator("#create-result")).to_contain_text("Created")
        await expect(_card(page, "Lunch: pizza or salad?")).to_be_visible()

        # A multiple-choice one with a closing time, in the browser's time zone.
        await page.get_by_label("Question").fill("Which talks did you like?")
        await _fill_options(page, ["Keynote", "Storage", "Streams", "Closing"])
        await page.get_by_role("button", name="Add option").click()
        await page.get_by_role("button", name="Remove option 5").click()
        await expect(page.locator("#options input")).to_have_count(4)
        await page.get_by_label("Several: every vote counts").check()
        await page.get_by_label("Most options one vote may pick").fill("2")
        await page.get_by_label("At a date and time").check()
        await page.get_by_label("Closing date and time").fill("2031-06-01T09:30")
        await page.get_by_role("button", name="Create poll").click()
        await expect(page.locator("#create-result")).to_contain_text("Created")

        # One that closes in 30 minutes.
        await page.get_by_label("Question").fill("Coffee break now?")
        await _fill_options(page, ["Yes", "In ten minutes"])
        await page.get_by_label("In a number of minutes").check()
        await page.get_by_label("Minutes from now").fill("30")
        await page.get_by_role("button", name="Create poll").click()
        await expect(page.locator("#create-result")).to_contain_text("Created")

        polls = {poll["question"]: poll for poll in await _all_polls(edge)}
        assert set(polls) == {
            "Lunch: pizza or salad?", "Which talks did you like?", "Coffee break now?",
        }  # fmt: skip
        lunch, talks, coffee = (
            polls["Lunch: pizza or salad?"],
            polls["Which talks did you like?"],
            polls["Coffee break now?"],
        )
        assert [o["label"] for o in lunch["options"]] == ["Pizza", "Salad"]
        assert (lunch["allow_multiple_votes"], lunch["max_choices"], lunch["expires_at"]) == (
            False, 1, None,
        )  # fmt: skip
        assert [o["label"] for o in talks["options"]] == [
            "Keynote", "Storage", "Streams", "Closing",
        ]  # fmt: skip
        assert (talks["allow_multiple_votes"], talks["max_choices"]) == (True, 2)
        # 09:30 in New York on 1 June (EDT, UTC-4) is 13:30 UTC.
        expires = datetime.fromisoformat(talks["expires_at"])
        assert expires == datetime(2031, 6, 1, 13, 30, tzinfo=UTC)
        in_30 = datetime.fromisoformat(coffee["expires_at"]) - datetime.now(UTC)
        assert timedelta(minutes=28) < in_30 <= timedelta(minutes=30)

        # Newest first.
        await expect(page.locator("li.admin-poll h3")).to_have_text(
            ["Coffee break now?", "Which talks did you like?", "Lunch: pizza or salad?"]
        )

        # Votes, once committed, are the ballots the list shows.
        for voter, option in (("ann", 0), ("bob", 0), ("cat", 1)):
            response = await edge.post("/api/vote", json=ballot(lunch, voter, option))
            assert response.status == 202
        two = {**ballot(talks, "dan", 0), "option_ids": [o["id"] for o in talks["options"][:2]]}
        for body in (two, ballot(talks, "dan", 2)):
            assert (await edge.post("/api/vote", json=body)).status == 202
        await drain(redis_client, settings)
        await page.get_by_role("button", name="Refresh").click()
        await expect(_card(page, "Lunch: pizza or salad?").locator(".ballots")).to_have_text(
            "3 ballots"
        )
        await expect(_card(page, "Which talks did you like?").locator(".ballots")).to_have_text(
            "2 ballots"
        )
        await expect(_card(page, "Coffee break now?").locator(".ballots")).to_have_text("0 ballots")

        # Each poll's pages, exports, QR code and share link.
        card = _card(page, "Lunch: pizza or salad?")
        await expect(card.locator(".state")).to_have_text("Open")
        lunch_id = lunch["id"]
        assert await card.get_by_role("link", name="Voting page").get_attribute("href") == (
            f"/polls/{lunch_id}"
        )
        assert await card.get_by_role("link", name="Presenter view").get_attribute("href") == (
            f"/polls/{lunch_id}/present"
        )
        csv_href = await card.get_by_role("link", name="Results CSV").get_attribute("href")
        csv = await edge.get(csv_href or "")
        assert csv.status == 200 and csv.content_type == "text/csv"
        assert "Pizza" in await csv.text()
        json_href = await card.get_by_role("link", name="Results JSON").get_attribute("href")
        exported = await edge.get(json_href or "")
        assert exported.status == 200 and (await exported.json())["total_ballots"] == 3
        qr = card.get_by_role("img", name="QR code of the share link of “Lunch: pizza or salad?”")
        await expect(qr).to_have_attribute("src", f"/api/polls/{lunch_id}/qr.svg")
        await _shown(page, qr)
        short = card.locator("a.short-url")
        await expect(short).to_have_text(re.compile(rf"^{re.escape(base)}/p/[A-Za-z0-9_-]{{22}}$"))
        short_url = await short.get_attribute("href") or ""
        assert short_url.startswith(f"{base}/p/")
        followed = await edge.get(short_url.removeprefix(base), allow_redirects=False)
        assert followed.status == 302
        assert followed.headers["Location"] == f"/polls/{lunch_id}"
        await card.get_by_role("button", name="Copy link").click()
        await expect(card.locator(".copied")).to_have_text("Copied")
        assert await page.evaluate("navigator.clipboard.readText()") == short_url

        # Closing asks first; Cancel leaves the poll open.
        await card.get_by_role("button", name="Close poll…").click()
        await card.get_by_role("button", name="Cancel").click()
        await expect(card.get_by_role("button", name="Yes, close it")).to_be_hidden()
        assert not (await (await edge.get(f"/api/polls/{lunch_id}")).json())["closed"]
        await card.get_by_role("button", name="Close poll…").click()
        await card.get_by_role("button", name="Yes, close it").click()
        await expect(card.locator(".state")).to_have_text("Closed")
        await expect(card.locator(".ballots")).to_have_text("3 ballots")
        await expect(card.get_by_role("button", name="Close poll…")).to_have_count(0)
        closed = await (await edge.get(f"/api/polls/{lunch_id}")).json()
        assert closed["closed"] and closed["closed_at"] is not None

        await screenshot(page, "admin-light", full_page=True)

        # A reload keeps the tab signed in, and the list says what is closed.
        await page.reload()
        await expect(_card(page, "Lunch: pizza or salad?").locator(".state")).to_have_text("Closed")
        await expect(_card(page, "Coffee break now?").locator(".state")).to_have_text("Open")

        # Forgetting the token signs the tab out.
        await page.get_by_role("button", name="Forget token").click()
        await expect(page.get_by_label("Admin token")).to_be_visible()
        await expect(page.locator("#desk")).to_be_hidden()
        assert await page.evaluate("sessionStorage.length") == 0
        assert errors == []


@pytest.mark.parametrize("theme", ["light", "dark"])
async def test_admin_page_fits_phone_and_projector_and_is_accessible(
    edge: Client, settings: Settings, theme: str
) -> None:
    """On a phone and a 1920x1080 screen, light and dark: no script errors, no
    sideways scrolling on the phone, and nothing axe-core calls serious."""
    base = _base(edge)
    closed = await create_poll(edge, question="A poll already closed, with a long question?")
    assert (await edge.post(f"/api/polls/{closed['id']}/close", headers=ADMIN)).status == 200
    later = (datetime.now(UTC) + timedelta(hours=2)).isoformat()
    await create_poll(
        edge, question="Which session next?", options=["Rust", "Go", "Python", "Zig"],
        allow_multiple_votes=True, max_choices=2, expires_at=later,
    )  # fmt: skip
    expired = await create_poll(edge, question="Expired already?", options=["Yes", "No"])
    await expire(settings.database_url, expired["id"])
    async with chromium() as browser:
        for name, device in (("phone", PHONE), ("projector", PROJECTOR)):
            page = await browser.new_page(**device)
            errors = _page_errors(page)
            await page.goto(f"{base}/admin?theme={theme}")
            assert await page.evaluate("document.documentElement.dataset.theme") == theme
            await _sign_in(page, "wrong-token-wrong-token-wrong")
            await expect(page.locator("#signin-result")).to_contain_text("401")
            assert await accessibility_problems(page) == [], (name, "sign in")

            await _sign_in(page)
            await expect(page.locator("li.admin-poll .state")).to_have_text(
                ["Expired", "Open", "Closed"]
            )
            # The states a reviewer sees too: an error beside a field, a close
            # being confirmed, a copied link's status.
            await page.get_by_role("button", name="Create poll").click()
            await expect(page.locator("#question-error")).to_be_visible()
            card = _card(page, "Which session next?")
            await card.get_by_role("button", name="Close poll…").click()
            await expect(card.get_by_role("button", name="Yes, close it")).to_be_visible()
            await expect(card.locator("a.short-url")).to_contain_text("/p/")
            for qr in await page.locator("img.qr").all():
                await _shown(page, qr)

            if name == "phone":
                sideways = await page.evaluate(
                    "document.documentElement.scrollWidth - document.documentElement.clientWidth"
                )
                assert sideways <= 0, f"{sideways} px of sideways scrolling on the phone"
            assert await accessibility_problems(page) == [], (name, theme)
            if name == "phone" and theme == "dark":
                await page.evaluate("window.scrollTo(0, 0)")
                await screenshot(page, "admin-phone-dark", full_page=True)
            if name == "projector" and theme == "dark":
                await page.evaluate("window.scrollTo(0, 0)")
                await screenshot(page, "admin-projector-dark")
            assert errors == [], (name, theme)
            await page.close()


async def test_admin_page_lists_more_polls_a_page_at_a_time(edge: Client) -> None:
    for n in range(22):
        await create_poll(edge, question=f"Poll number {n}", options=["Yes", "No"])
    async with chromium() as browser:
        page = await browser.new_page()
        errors = _page_errors(page)
        await page.goto(f"{_base(edge)}/admin")
        await _sign_in(page)
        await expect(page.locator("li.admin-poll")).to_have_count(20)
        await expect(page.locator("li.admin-poll h3").first).to_have_text("Poll number 21")
        await page.get_by_role("button", name="More").click()
        await expect(page.locator("li.admin-poll")).to_have_count(22)
        await expect(page.locator("li.admin-poll h3").last).to_have_text("Poll number 0")
        await expect(page.get_by_role("button", name="More")).to_be_hidden()
        # Refresh starts again from the newest.
        await page.get_by_role("button", name="Refresh").click()
        await expect(page.locator("li.admin-poll")).to_have_count(20)
        assert errors == []
