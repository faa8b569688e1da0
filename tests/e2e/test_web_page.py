"""The try-it page at / in a real headless Chromium (Debian's /usr/bin/chromium, driven by
Playwright without any browser download): enter a key, pick an adapter, upload or drop an
image, read the caption the page shows.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, Route, expect, sync_playwright

from tests.e2e.conftest import (
    ACME_ADMIN,
    Service,
    bearer,
    image_file,
    noise_png,
    running_service,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium; CI has it)",
)
IMAGE = noise_png(21)


@pytest.fixture(scope="module")
def service(tiny_store: Path) -> Iterator[Service]:
    with running_service(tiny_store) as running:  # read-only use of the shared store
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    # headless, with a fresh temporary profile (Playwright's own user-data-dir per launch).
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS
        )
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Browser, service: Service) -> Iterator[Page]:
    context = browser.new_context()
    page = context.new_page()
    page.goto(f"{service.url}/")
    yield page
    context.close()


def api_caption(service: Service, adapter: str) -> str:
    response = httpx.post(
        f"{service.url}/caption",
        files=image_file(IMAGE),
        data={"adapter": adapter},
        headers=bearer(ACME_ADMIN),
        timeout=30,
    )
    assert response.status_code == 200, response.text
    caption: str = response.json()["caption"]
    return caption


def enter_key_and_pick(page: Page, adapter: str) -> None:
    page.fill("#key", ACME_ADMIN)
    page.press("#key", "Tab")  # "change": the page lists the adapters this key sees
    expect(page.locator("#adapter-hint")).to_have_text("3 available")
    page.select_option("#adapter", adapter)


def test_upload_an_image_and_see_its_caption(page: Page, service: Service) -> None:
    expect(page).to_have_title("ctxpeft: caption an image")
    # Without a key the adapter list says why it is empty, in the service's own words.
    expect(page.locator("#adapter-hint")).to_contain_text(
        "missing API key (unauthorized, HTTP 401)"
    )
    enter_key_and_pick(page, "sports")
    options = page.locator("#adapter option").all_text_contents()
    assert options == ["(service default)", "news (v1)", "sports (v1)", "pub (v1) · public"]

    page.set_input_files("#file", files=[{"name": "shapes.png", "mimeType": "image/png",
                                          "buffer": IMAGE}])  # fmt: skip
    expect(page.locator("#preview")).to_be_visible()
    page.click("#submit")
    expect(page.locator("#result")).to_be_visible()

    assert page.text_content("#caption") == api_caption(service, "sports")
    assert page.text_content("#result-adapter") == "sports"
    assert page.text_content("#result-version") == "1"
    timings = page.text_content("#timings") or ""
    assert timings.startswith("queue ") and timings.endswith(" ms") and "total" in timings
    assert len(page.text_content("#result-request-id") or "") == 32
    expect(page.locator("#error")).to_be_empty()


def test_drop_an_image_and_see_its_caption(page: Page, service: Service) -> None:
    enter_key_and_pick(page, "news")
    # A real drop event carrying a File, as a browser makes when a file is dragged in.
    page.evaluate(
        """(b64) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], "dropped.png", { type: "image/png" }));
            const target = document.getElementById("drop");
            target.dispatchEvent(new DragEvent("drop", { dataTransfer: transfer, bubbles: true }));
        }""",
        base64.b64encode(IMAGE).decode(),
    )
    expect(page.locator("#drop-text")).to_contain_text("dropped.png")
    page.click("#submit")
    expect(page.locator("#result")).to_be_visible()
    assert page.text_content("#caption") == api_caption(service, "news")


def test_a_bad_upload_shows_the_services_error(page: Page) -> None:
    enter_key_and_pick(page, "news")
    page.set_input_files("#file", files=[{"name": "notes.txt", "mimeType": "text/plain",
                                          "buffer": b"not an image"}])  # fmt: skip
    page.click("#submit")
    expect(page.locator("#error")).to_contain_text("(unsupported_media_type, HTTP 415)")
    expect(page.locator("#error")).to_contain_text("request id: ")
    expect(page.locator("#result")).to_be_hidden()


def test_api_docs_render_offline(browser: Browser, service: Service) -> None:
    """/docs (Swagger UI) renders the OpenAPI with every script served by the service: any
    request to another host is refused and counted."""
    context = browser.new_context()
    elsewhere: list[str] = []

    def only_this_server(route: Route) -> None:
        if route.request.url.startswith(service.url):
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    context.route("**/*", only_this_server)
    page = context.new_page()
    page.goto(f"{service.url}/docs")
    expect(page.locator(".opblock-summary-path", has_text="/caption")).to_be_visible()
    expect(page.locator("button.authorize")).to_be_visible()  # the Bearer security scheme
    paths = page.locator(".opblock-summary-path").all_text_contents()
    assert {"/caption", "/adapters", "/adapters/{name}", "/adapters/{name}/versions"} <= set(
        p.replace("\u200b", "") for p in paths
    )
    assert elsewhere == []
    context.close()
