"""The try-it page at / in a real headless Chromium (Debian's /usr/bin/chromium, driven by
Playwright without any browser download), against real servers:

- `open_service`: no keys (as `make run` serves), tiny backbone, public adapters pub and zeta,
  default_adapter zeta: a fresh page captions on the first click.
- `service`: keys, tiny backbone, acme's news and sports and the public pub: no default, so the
  first listed is preselected; three ticked adapters share one encoder pass.
- `demo_service`: no keys, the reduced real demo (backbone and its count and colors adapters),
  default_adapter count: "Try a sample" hands out a synthetic scene the adapters caption.

Each state the issue asks for is saved as a screenshot (1-first-click.png, 2-sample-chosen.png,
3-sample-captioned.png, 4-sample-two-adapters.png, 5-three-adapters.png) into the folder named
by WEB_PAGE_SCREENSHOTS, else into the pytest temp folder (`<basetemp>/web-page-screenshots0/`).
With WEB_PAGE_DOCS_SCREENSHOT=1 the sample test also rewrites docs/web_page.png (the README's).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from playwright.sync_api import (
    Browser,
    BrowserContext,
    FilePayload,
    Page,
    Route,
    expect,
    sync_playwright,
)

from benchmarks.live_server import live_server
from service.api.app import create_app
from service.engine import Engine, EngineConfig
from service.metrics import ServiceMetrics
from service.store import AdapterStore
from tests.e2e.conftest import (
    ACME_ADMIN,
    DemoBuild,
    Service,
    bearer,
    image_file,
    noise_png,
    running_demo,
    running_service,
    scrape,
)
from tests.service.adapter_fixtures import put, random_adapter, tiny_backbone

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
IMAGE = noise_png(21)  # 32 x 32
SCREENSHOTS_ENV = "WEB_PAGE_SCREENSHOTS"
DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "web_page.png"
# A loaded machine captions slowly; these bound waits, they do not time anything.
expect.set_options(timeout=60_000)


@pytest.fixture(scope="module")
def service(tiny_store: Path) -> Iterator[Service]:
    with running_service(tiny_store) as running:  # read-only use of the shared store
        yield running


@pytest.fixture(scope="module")
def open_service(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    store = tmp_path_factory.mktemp("open-store") / "adapters"
    shutil.copytree(tiny_store / "public", store / "public")
    put(AdapterStore(store), "public", "zeta", random_adapter(tiny_backbone(), seed=7))
    with running_service(store, keys=None, default_adapter="zeta") as running:
        yield running


@pytest.fixture(scope="module")
def demo_service(
    reduced_demo: DemoBuild, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    with running_demo(
        reduced_demo,
        tmp_path_factory.mktemp("demo-page-store"),
        keys=None,
        default_adapter="count",
        default_max_new_tokens=32,
        max_new_tokens_limit=64,
    ) as running:
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


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    chosen = os.environ.get(SCREENSHOTS_ENV)
    if not chosen:
        return tmp_path_factory.mktemp("web-page-screenshots")
    folder = Path(chosen)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextmanager
def page_at(browser: Browser, url: str) -> Iterator[Page]:
    """A fresh page (its own browser context: no stored key) at the service's /."""
    context = browser.new_context(viewport={"width": 960, "height": 900})
    page = context.new_page()
    page.goto(f"{url}/")
    yield page
    context.close()


@pytest.fixture
def page(browser: Browser, service: Service) -> Iterator[Page]:
    with page_at(browser, service.url) as page:
        yield page


@pytest.fixture
def open_page(browser: Browser, open_service: Service) -> Iterator[Page]:
    with page_at(browser, open_service.url) as page:
        yield page


@pytest.fixture
def demo_page(browser: Browser, demo_service: Service) -> Iterator[Page]:
    with page_at(browser, demo_service.url) as page:
        yield page


def api_caption(url: str, adapter: str, image: bytes = IMAGE, key: str | None = ACME_ADMIN) -> str:
    response = httpx.post(
        f"{url}/caption",
        files=image_file(image),
        data={"adapter": adapter},
        headers=bearer(key) if key else {},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    caption: str = response.json()["caption"]
    return caption


def payload(data: bytes, name: str, mime: str = "image/png") -> FilePayload:
    return {"name": name, "mimeType": mime, "buffer": data}


def choose(page: Page, data: bytes = IMAGE, name: str = "shapes.png") -> None:
    page.set_input_files("#file", files=[payload(data, name)])


def enter_key(page: Page) -> None:
    page.fill("#key", ACME_ADMIN)
    page.press("#key", "Tab")  # "change": the page lists the adapters this key sees
    expect(page.locator("#adapter-hint")).to_have_text("3 available")


def ticked(page: Page) -> list[str]:
    boxes = page.locator("#adapter-list input[type=checkbox]")
    return [boxes.nth(i).get_attribute("value") or "" for i in range(boxes.count()) if
            boxes.nth(i).is_checked()]  # fmt: skip


def card(page: Page, adapter: str) -> str:
    return f'#cards .result-card[data-adapter="{adapter}"]'


def preview_bytes(page: Page) -> bytes:
    """The image the page holds, read back from its preview's blob URL."""
    encoded = page.evaluate(
        """async () => {
            const response = await fetch(document.getElementById("preview").src);
            const bytes = new Uint8Array(await response.arrayBuffer());
            let text = "";
            for (const b of bytes) text += String.fromCharCode(b);
            return btoa(text);
        }"""
    )
    return base64.b64decode(encoded)


# --- the first click ------------------------------------------------------------------------
def test_fresh_page_first_click_captions_with_the_services_default(
    open_page: Page, open_service: Service, shots: Path
) -> None:
    page = open_page
    expect(page).to_have_title("ctxpeft: caption an image")
    expect(page.locator("#adapter-hint")).to_have_text("2 available")
    labels = page.locator("#adapter-list label").all_text_contents()
    assert labels == ["pub (v1) · public", "zeta (v1) · public · default"]
    assert ticked(page) == ["zeta"]  # the default, not the first listed
    expect(page.locator("#sample")).to_be_hidden()  # not the demo backbone: no samples
    expect(page.locator("#about")).to_be_hidden()

    choose(page)
    page.click("#submit")
    caption = page.locator(f"{card(page, 'zeta')} .caption")
    expect(caption).to_have_text(api_caption(open_service.url, "zeta", key=None))
    expect(page.locator("#error")).to_be_empty()
    # The caption streamed in: the page drew it from one token event per generated token.
    expect(caption).to_have_attribute("data-tokens", "4")
    meta = page.locator(f"{card(page, 'zeta')} .meta").text_content() or ""
    assert re.fullmatch(
        r"4 tokens · queue [\d.]+ ms · encode [\d.]+ ms · generate [\d.]+ ms · total [\d.]+ ms",
        meta,
    )
    assert page.text_content(f"{card(page, 'zeta')} h3") == "zeta · v1"
    assert re.fullmatch(r"request id: [0-9a-f]{32}", page.text_content("#request-id") or "")
    page.screenshot(path=shots / "1-first-click.png", full_page=True)


def test_a_small_image_is_shown_scaled_up_without_smoothing(open_page: Page) -> None:
    choose(open_page, IMAGE, "noise.png")
    preview = open_page.locator("#preview")
    expect(preview).to_be_visible()
    size = len(IMAGE)
    assert 1024 < size < 10 * 1024
    expect(open_page.locator("#drop-text")).to_have_text(
        f"noise.png ({size / 1024:.1f} KiB, 32 × 32 px, shown 8×): click or drop to change"
    )
    box = preview.bounding_box()
    assert box is not None and (box["width"], box["height"]) == (256, 256)
    rendering = preview.evaluate("(img) => getComputedStyle(img).imageRendering")
    assert rendering == "pixelated"
    # A large image is shown as it is (scaled down by the browser, smoothed).
    big = io.BytesIO()
    Image.new("RGB", (600, 400), (40, 90, 200)).save(big, format="PNG")
    choose(open_page, big.getvalue(), "big.png")
    expect(open_page.locator("#drop-text")).to_have_text(
        f"big.png ({len(big.getvalue()) / 1024:.1f} KiB, 600 × 400 px): click or drop to change"
    )
    assert preview.evaluate("(img) => getComputedStyle(img).imageRendering") == "auto"


def test_without_a_default_the_first_listed_is_preselected(page: Page, service: Service) -> None:
    # Without a key the adapter list says why it is empty, in the service's own words.
    expect(page.locator("#adapter-hint")).to_contain_text(
        "missing API key (unauthorized, HTTP 401)"
    )
    enter_key(page)
    labels = page.locator("#adapter-list label").all_text_contents()
    assert labels == ["news (v1)", "sports (v1)", "pub (v1) · public"]
    assert ticked(page) == ["news"]
    choose(page)
    page.click("#submit")
    expect(page.locator(f"{card(page, 'news')} .caption")).to_have_text(
        api_caption(service.url, "news")
    )
    expect(page.locator("#error")).to_be_empty()


# --- samples --------------------------------------------------------------------------------
def test_try_a_sample_then_caption(demo_page: Page, demo_service: Service, shots: Path) -> None:
    page = demo_page
    expect(page.locator("#adapter-hint")).to_have_text("2 available")
    assert ticked(page) == ["count"]  # the default (colors is listed first)
    about = page.locator("#about")
    expect(about).to_contain_text(
        "were trained only on synthetic 64x64 pictures of 1 to 3 coloured shapes"
    )
    expect(about).to_contain_text("A photo of anything else still gets a caption about shapes")

    with page.expect_response("**/samples/random") as answer:
        page.click("#sample")
    truth = json.loads(answer.value.headers["x-sample-captions"])
    drop_text = page.locator("#drop-text")
    expect(drop_text).to_have_text(
        re.compile(r"sample-1\.png \(\d+ bytes, 64 × 64 px, shown 4×\): click or drop to change")
    )
    sample = preview_bytes(page)
    assert Image.open(io.BytesIO(sample)).size == (64, 64)
    page.screenshot(path=shots / "2-sample-chosen.png", full_page=True)

    page.click("#submit")
    expected = api_caption(demo_service.url, "count", sample, key=None)
    expect(page.locator(f"{card(page, 'count')} .caption")).to_have_text(expected)
    verdict = "(matches)" if expected == truth["count"] else "(differs)"
    expect(page.locator(f"{card(page, 'count')} .expected")).to_have_text(
        f"the scene's true count caption: “{truth['count']}” {verdict}"
    )
    expect(page.locator("#error")).to_be_empty()
    page.screenshot(path=shots / "3-sample-captioned.png", full_page=True)

    # Both demo adapters on the same sample, side by side. The first use of colors loads it:
    # its row may run in a batch of its own (the page then lists each batch's encode time).
    page.check("#adapter-list input[value=colors]")
    page.click("#submit")
    expect(page.locator("#cards .result-card .meta")).to_have_count(2)
    expect(page.locator(f"{card(page, 'colors')} .caption")).to_have_text(
        api_caption(demo_service.url, "colors", sample, key=None)
    )
    expect(page.locator(f"{card(page, 'count')} .caption")).to_have_text(expected)
    # A new sample with both adapters loaded: one batch, one encoder pass.
    page.click("#sample")
    expect(drop_text).to_contain_text("sample-2.png")
    page.click("#submit")
    expect(page.locator("#summary")).to_contain_text("One encoder pass for 2 adapters")
    sample = preview_bytes(page)
    for name in ("count", "colors"):
        expect(page.locator(f"{card(page, name)} .caption")).to_have_text(
            api_caption(demo_service.url, name, sample, key=None)
        )
    expect(page.locator("#history li")).to_have_count(3)
    page.screenshot(path=shots / "4-sample-two-adapters.png", full_page=True)
    if os.environ.get("WEB_PAGE_DOCS_SCREENSHOT") == "1":
        write_docs_screenshot(page)


def write_docs_screenshot(page: Page) -> None:
    """The README's picture: the page from the top through the results, as a small palette
    PNG (a few tens of KB)."""
    bottom = page.locator("#result").bounding_box()
    assert bottom is not None
    height = bottom["y"] + bottom["height"] + 16
    shot = page.screenshot(full_page=True, clip={"x": 0, "y": 0, "width": 960, "height": height})
    image = Image.open(io.BytesIO(shot)).convert("RGB")
    image.quantize(colors=64, method=Image.Quantize.MEDIANCUT).save(
        DOCS_SCREENSHOT, format="PNG", optimize=True
    )


def test_each_sample_is_fresh(demo_page: Page) -> None:
    expect(page_ready := demo_page.locator("#sample")).to_be_visible()
    page_ready.click()
    expect(demo_page.locator("#drop-text")).to_contain_text("sample-1.png")
    first = preview_bytes(demo_page)
    page_ready.click()
    expect(demo_page.locator("#drop-text")).to_contain_text("sample-2.png")
    assert preview_bytes(demo_page) != first


# --- several adapters on one image -----------------------------------------------------------
def sse_events(body: str) -> list[tuple[str, Any]]:
    """(event name, JSON data) of each Server-Sent Event of a stream's body."""
    events = []
    for block in body.split("\n\n"):
        lines = block.splitlines()
        name = next((line[7:] for line in lines if line.startswith("event: ")), "message")
        data = [line[6:] for line in lines if line.startswith("data: ")]
        if data:
            events.append((name, json.loads("\n".join(data))))
    return events


def test_three_adapters_three_captions_one_encoder_pass(
    page: Page, service: Service, shots: Path
) -> None:
    enter_key(page)
    for name in ("sports", "pub"):
        page.check(f"#adapter-list input[value={name}]")
    assert ticked(page) == ["news", "sports", "pub"]
    # Every adapter loaded first (a cold load can put a row in a batch of its own), on an
    # image the encoder cache has not seen.
    for name in ("news", "sports", "pub"):
        api_caption(service.url, name, noise_png(4241))
    image = noise_png(4242)
    choose(page, image)
    runs = service.engine.stats().encoder_runs
    scraped = scrape(service.url).value("ctxpeft_encoder_runs_total")
    with page.expect_response("**/caption") as answer:
        page.click("#submit")
    # One request naming the three (`adapters=news,sports,pub`), streamed: token events, then
    # one result event with one result each, in order.
    events = sse_events(answer.value.text())
    assert {name for name, _ in events} == {"token", "result"}
    result = next(data for name, data in events if name == "result")
    assert [r["adapter"] for r in result["results"]] == ["news", "sports", "pub"]
    tokens = [
        data["adapter"] for name, data in events if name == "token" and data["token_id"] is not None
    ]
    assert {a: tokens.count(a) for a in set(tokens)} == {
        r["adapter"]: r["tokens"] for r in result["results"]
    }
    expect(page.locator("#cards .result-card")).to_have_count(3)
    for name in ("news", "sports", "pub"):
        expect(page.locator(f"{card(page, name)} .meta")).to_contain_text("total")
    # One encoder pass: the engine and /metrics count one image through the encoder, and the
    # page reports the encode time once, for all three.
    assert service.engine.stats().encoder_runs - runs == 1
    assert scrape(service.url).value("ctxpeft_encoder_runs_total") - scraped == 1
    expect(page.locator("#summary")).to_contain_text("One encoder pass for 3 adapters")
    assert len(re.findall(r"encode [\d.]+ ms", page.text_content("#results") or "")) == 1
    page.screenshot(path=shots / "5-three-adapters.png", full_page=True)
    for name in ("news", "sports", "pub"):
        expect(page.locator(f"{card(page, name)} .caption")).to_have_text(
            api_caption(service.url, name, image)
        )
    titles = page.locator("#cards .result-card h3").all_text_contents()
    assert titles == ["news · v1", "sports · v1", "pub · v1"]


def test_history_keeps_the_last_five_results(open_page: Page) -> None:
    for seed in range(6):
        choose(open_page, noise_png(900 + seed), f"image-{seed}.png")
        open_page.click("#submit")
        expect(open_page.locator("#history li").first).to_contain_text(f"image-{seed}.png: zeta:")
    items = open_page.locator("#history li")
    expect(items).to_have_count(5)
    names = [re.findall(r"image-\d", text) for text in items.all_text_contents()]
    assert names == [["image-5"], ["image-4"], ["image-3"], ["image-2"], ["image-1"]]


# --- keyboard and screen readers -------------------------------------------------------------
def test_labels_roles_and_the_announced_result_region(demo_page: Page) -> None:
    page = demo_page
    expect(page.locator("#adapter-hint")).to_have_text("2 available")
    expect(page.get_by_label("API key")).to_have_id("key")
    expect(page.get_by_role("group", name="Adapters")).to_be_visible()
    expect(page.get_by_role("checkbox", name="count (v1) · public · default")).to_be_checked()
    expect(page.get_by_role("checkbox", name="colors (v1) · public")).not_to_be_checked()
    # The file input is named by its label, the drop zone (Chromium gives it the button role).
    expect(page.get_by_role("button", name=re.compile("^Drop an image here, or click"))).to_have_id(
        "file"
    )
    expect(page.get_by_role("button", name="Try a sample")).to_be_visible()
    expect(page.get_by_role("button", name="Caption")).to_be_disabled()
    expect(page.locator("#results")).to_have_attribute("aria-live", "polite")
    expect(page.get_by_role("alert")).to_have_id("error")
    announce = page.locator("#announce")  # present from the start, so its changes are read
    expect(announce).to_have_attribute("role", "status")
    expect(announce).to_have_attribute("aria-live", "polite")
    expect(announce).to_be_empty()


def test_usable_with_the_keyboard_alone(demo_page: Page, demo_service: Service) -> None:
    page = demo_page
    expect(page.locator("#adapter-hint")).to_have_text("2 available")
    # Playwright intercepts file choosers once a listener exists; made (and flushed by a round
    # trip) before the key press, so that the first chooser cannot slip past it.
    page.on("filechooser", lambda _: None)
    page.evaluate("0")

    def tab_to(element_id: str) -> None:
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.id") == element_id

    tab_to("key")
    tab_to("adapter-0")  # colors
    page.keyboard.press("Space")
    tab_to("adapter-1")  # count, preselected
    tab_to("file")
    # Enter on the file input opens the chooser, as a click would.
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Enter")
    chooser.value.set_files(files=[payload(IMAGE, "keys.png")])
    expect(page.locator("#drop-text")).to_contain_text("keys.png")
    tab_to("sample")
    page.keyboard.press("Enter")  # a sample replaces the chosen file
    expect(page.locator("#drop-text")).to_contain_text("sample-1.png")
    tab_to("submit")
    page.keyboard.press("Enter")
    expect(page.locator("#cards .result-card")).to_have_count(2)
    sample = preview_bytes(page)
    captions = {name: api_caption(demo_service.url, name, sample, key=None)
                for name in ("colors", "count")}  # fmt: skip
    for name, caption in captions.items():
        expect(page.locator(f"{card(page, name)} .caption")).to_have_text(caption)
    # What a screen reader reads out once the captions are in.
    expect(page.locator("#announce")).to_have_text(
        f"colors: {captions['colors']}. count: {captions['count']}."
    )


# --- while the backbone loads ----------------------------------------------------------------
def test_a_page_opened_while_the_backbone_loads_fills_in_once_it_is_ready(
    browser: Browser, open_service: Service
) -> None:
    """`make run` prints its address before the backbone is loaded: a page opened then says so,
    and lists the adapters and preselects the default by itself once the service is ready."""
    gate = threading.Event()
    settings = open_service.settings

    def slow_engine(metrics: ServiceMetrics) -> Engine:
        gate.wait(timeout=120)
        store = AdapterStore(settings.resolved_store_dir())
        return Engine(tiny_backbone(), store, EngineConfig.from_settings(settings), metrics)

    metrics = ServiceMetrics(backbone=settings.backbone)
    app = create_app(settings, metrics=metrics, engine_factory=slow_engine)
    with live_server(app) as url, page_at(browser, url) as page:
        try:
            expect(page.locator("#adapter-hint")).to_have_text(
                "The service is still loading its backbone: the adapters appear here when it "
                "is ready."
            )
            expect(page.locator("#sample")).to_be_hidden()
            assert ticked(page) == []
        finally:
            gate.set()  # never leave the loader waiting, whatever failed above
        expect(page.locator("#adapter-hint")).to_have_text("2 available")
        assert ticked(page) == ["zeta"]
        choose(page)
        page.click("#submit")
        expect(page.locator(f"{card(page, 'zeta')} .caption")).to_have_text(
            api_caption(open_service.url, "zeta", key=None)
        )


# --- errors and other ways in ---------------------------------------------------------------
def test_drop_an_image_and_see_its_caption(page: Page, service: Service) -> None:
    enter_key(page)
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
    expect(page.locator(f"{card(page, 'news')} .caption")).to_have_text(
        api_caption(service.url, "news")
    )


def test_a_bad_upload_shows_the_services_error(page: Page) -> None:
    enter_key(page)
    page.set_input_files("#file", files=[payload(b"not an image", "notes.txt", "text/plain")])
    expect(page.locator("#drop-text")).to_contain_text("notes.txt (12 bytes)")
    page.click("#submit")
    expect(page.locator("#error")).to_contain_text("(unsupported_media_type, HTTP 415)")
    expect(page.locator("#error")).to_contain_text("request id: ")
    expect(page.locator("#result")).to_be_hidden()


def test_no_adapter_ticked_and_no_default_shows_the_services_message(page: Page) -> None:
    enter_key(page)
    page.uncheck("#adapter-list input[value=news]")
    assert ticked(page) == []
    choose(page)
    page.click("#submit")
    expect(page.locator("#error")).to_contain_text(
        "this service has no default_adapter (invalid_parameter, HTTP 422)"
    )


def only_these_hosts(context: BrowserContext, *prefixes: str) -> list[str]:
    """Let the context's requests through only to URLs starting with one of `prefixes`; the
    list it returns fills with every other URL requested (each refused)."""
    elsewhere: list[str] = []

    def route(route: Route) -> None:
        if route.request.url.startswith(prefixes):
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    context.route("**/*", route)
    return elsewhere


def test_api_docs_render_offline(browser: Browser, service: Service) -> None:
    """/docs (Swagger UI) renders the OpenAPI with every script served by the service: any
    request to another host is refused and counted."""
    context = browser.new_context()
    elsewhere = only_these_hosts(context, service.url)
    page = context.new_page()
    page.goto(f"{service.url}/docs")
    expect(page.locator(".opblock-summary-path", has_text="/caption")).to_be_visible()
    expect(page.locator("button.authorize")).to_be_visible()  # the Bearer security scheme
    paths = page.locator(".opblock-summary-path").all_text_contents()
    assert {
        "/caption",
        "/adapters",
        "/adapters/{name}",
        "/adapters/{name}/versions",
        "/info",
        "/samples/random",
    } <= set(p.replace("\u200b", "") for p in paths)
    assert elsewhere == []
    context.close()


def test_the_page_contacts_no_other_host(browser: Browser, demo_service: Service) -> None:
    context = browser.new_context()
    elsewhere = only_these_hosts(context, demo_service.url, "blob:", "data:")
    page = context.new_page()
    page.goto(f"{demo_service.url}/")
    page.click("#sample")
    page.click("#submit")
    expect(page.locator("#cards .result-card .meta")).to_contain_text("total")
    assert elsewhere == []
    context.close()
