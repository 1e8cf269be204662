"""What the browser tests share: Debian's chromium driven by Playwright, the
viewports they try, an axe-core check of a page, and where screenshots go.

Skipped, saying so, only where no chromium is installed; `.ci/run` installs
it. axe-core is kept in tests/vendor (from the npm registry): it is run in
the page through the DevTools protocol, which the pages' Content-Security-
Policy does not govern, so the pages keep their policy while checked.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page, async_playwright

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parents[1] / "build" / "test-artifacts"
AXE = Path(__file__).parent / "vendor" / "axe-core-4.14.1.min.js"
# Milliseconds a page may take to show what a commit changed.
LIVE_TIMEOUT = 15_000

PHONE: dict[str, Any] = {
    "viewport": {"width": 390, "height": 844},
    "device_scale_factor": 2,
    "is_mobile": True,
    "has_touch": True,
}
PROJECTOR: dict[str, Any] = {"viewport": {"width": 1920, "height": 1080}}

needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)"
)


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield browser
        finally:
            await browser.close()


@dataclass(frozen=True, slots=True)
class Look:
    """One way a person sees the pages: a device and a colour scheme."""

    page: Page
    size: str  # "phone" or "1920"
    theme: str  # "light" or "dark"
    height: int  # of the viewport: what shows without scrolling


async def looks(browser: Browser, errors: list[str]) -> AsyncIterator[Look]:
    """A fresh page for a phone and a 1920x1080 screen, each light and dark,
    one after the other; the pages' script errors are added to `errors`."""
    for device, size in ((PHONE, "phone"), (PROJECTOR, "1920")):
        for theme in ("light", "dark"):
            context = await browser.new_context(**device, color_scheme=theme)
            try:
                page = await context.new_page()
                page.on("pageerror", lambda error: errors.append(str(error)))
                yield Look(page, size, theme, device["viewport"]["height"])
            finally:
                await context.close()


async def accessibility_problems(page: Page) -> list[str]:
    """axe-core's serious and critical violations of the page as it is now
    (WCAG 2.2 A and AA rules and axe's best practices), one line each."""
    await page.evaluate(AXE.read_text())
    result = await page.evaluate(
        "() => axe.run(document, {runOnly: {type: 'tag', values: "
        "['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa', 'wcag22aa', 'best-practice']}})"
    )
    return [
        f"{v['impact']}: {v['id']}: {v['help']} ({len(v['nodes'])} nodes, first: "
        f"{v['nodes'][0]['target']})"
        for v in result["violations"]
        if v["impact"] in ("serious", "critical")
    ]


async def screenshot(page: Page, name: str, full_page: bool = False) -> Path:
    """A screenshot in build/test-artifacts/<name>.png; the README's come from here."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    await page.screenshot(path=str(path), full_page=full_page)
    return path
