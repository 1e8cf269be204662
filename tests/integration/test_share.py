"""Sharing a poll (its links, short link and QR code), the HTML page of an
address that names none, the favicon, and the colours of the pages' themes."""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

from aiohttp.test_utils import TestClient

from ingest.pages import STATIC
from ingest.share import poll_of_code, short_code
from tests.support import create_poll, edge_client
from voteflow.settings import Settings

Client = TestClient[Any, Any]


async def test_a_poll_s_links_point_at_the_origin_the_request_named(edge: Client) -> None:
    poll = await create_poll(edge)
    response = await edge.get(f"/api/polls/{poll['id']}/share")
    assert response.status == 200
    links = await response.json()
    base = f"http://{edge.host}:{edge.port}"
    assert links == {
        "poll_id": poll["id"],
        "short_url": f"{base}/p/{short_code(poll['id'])}",
        "vote_url": f"{base}/polls/{poll['id']}",
        "present_url": f"{base}/polls/{poll['id']}/present",
        "qr_svg": f"/api/polls/{poll['id']}/qr.svg",
    }
    assert len(links["short_url"]) - len(base) == len("/p/") + 22


async def test_with_a_public_url_the_links_and_the_qr_code_point_there(settings: Settings) -> None:
    public = replace(settings, public_url="https://vote.example.com")
    async with edge_client(public) as edge:
        poll = await create_poll(edge)
        links = await (await edge.get(f"/api/polls/{poll['id']}/share")).json()
        short = f"https://vote.example.com/p/{short_code(poll['id'])}"
        assert links["short_url"] == short
        assert links["vote_url"] == f"https://vote.example.com/polls/{poll['id']}"
        response = await edge.get(links["qr_svg"])
        assert response.status == 200
        assert response.content_type == "image/svg+xml"
        svg = await response.text()
        assert svg.startswith("<svg") and "viewBox" in svg
        assert f"<title>QR code: {short}</title>" in svg


async def test_the_short_link_leads_to_the_voting_page(edge: Client) -> None:
    poll = await create_poll(edge)
    response = await edge.get(f"/p/{short_code(poll['id'])}", allow_redirects=False)
    assert response.status == 302
    assert response.headers["Location"] == f"/polls/{poll['id']}"


async def test_a_short_link_that_names_no_poll_is_the_not_found_page(edge: Client) -> None:
    unknown = short_code("00000000-0000-4000-8000-000000000000")
    for code in (unknown, "x" * 22, "short", "ijwHG_5DQKq4Sz1hUkGM0h"):
        response = await edge.get(f"/p/{code}", allow_redirects=False)
        assert response.status == 404, code
        assert response.content_type == "text/html", code


def test_a_short_code_names_one_poll_and_only_its_own_spelling() -> None:
    poll_id = "8a3c071b-fe43-40aa-b84b-3d6152418cd2"
    code = short_code(poll_id)
    assert poll_of_code(code) == poll_id
    # The last character carries 2 unused bits: other spellings are refused.
    assert poll_of_code(code[:-1] + "h") is None
    assert poll_of_code(code + "A") is None and poll_of_code("é" * 22) is None


async def test_an_address_that_names_no_page_is_an_html_page_and_an_api_one_json(
    edge: Client,
) -> None:
    for path in ("/nothing", "/polls/5a2e7f5e-3c1b-4f0e-9a53-7b1d2c9e8f10", "/static/x.css"):
        response = await edge.get(path)
        assert response.status == 404, path
        assert response.content_type == "text/html", path
        assert "default-src 'none'" in response.headers["Content-Security-Policy"]
        assert "Nothing here" in await response.text()
    response = await edge.get("/api/nothing")
    assert response.status == 404
    assert response.content_type == "application/json"


async def test_the_favicon_is_served(edge: Client) -> None:
    response = await edge.get("/favicon.ico", allow_redirects=False)
    assert response.status == 301
    assert response.headers["Location"] == "/static/favicon.svg"
    icon = await edge.get("/static/favicon.svg")
    assert icon.status == 200 and icon.content_type == "image/svg+xml"


def _luminance(hex_colour: str) -> float:
    channels = [int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5)]
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def _contrast(a: str, b: str) -> float:
    high, low = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def _themes() -> dict[str, dict[str, str]]:
    css = (STATIC / "voteflow.css").read_text()
    themes = {}
    for name in ("light", "dark"):
        block = re.search(r':root\[data-theme="' + name + r'"\] \{(.*?)\}', css, re.S)
        assert block is not None, name
        themes[name] = dict(re.findall(r"--([a-z0-9-]+):\s*(#[0-9a-f]{6});", block.group(1)))
    return themes


def test_each_theme_s_text_and_option_colours_have_enough_contrast() -> None:
    # WCAG 2.2: 4.5:1 for text (1.4.3), 3:1 for the parts of a chart (1.4.11).
    for name, colours in _themes().items():
        assert _contrast(colours["ink"], colours["paper"]) >= 7, name
        for text in ("muted", "bad", "good", "focus"):
            assert _contrast(colours[text], colours["paper"]) >= 4.5, (name, text)
        options = [colours[f"option-{n}"] for n in range(8)]
        assert len(set(options)) == 8, name
        for n, option in enumerate(options):
            for ground in ("paper", "track"):
                assert _contrast(option, colours[ground]) >= 3, (name, n, ground)
