"""The try-it page's training panel in a real headless Chromium, against a real server on the
reduced demo (no keys: the default tenant has every right): upload a small training file,
start a job, the loss chart draws from the job's events, and "Try it" captions a sample with
the new model. The finished panel is saved as 6-training.png beside the page's other
screenshots (WEB_PAGE_SCREENSHOTS, else the pytest temp folder).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from tests.e2e.conftest import DemoBuild, Service, running_demo
from tests.e2e.fine_tuning_helpers import chat_jsonl
from tests.e2e.test_web_page import (  # noqa: F401 (fixtures)  # noqa: F401
    api_caption,
    browser,
    card,
    page_at,
    payload,
    preview_bytes,
    pytestmark,
    shots,
)

expect.set_options(timeout=180_000)  # a training job on a loaded machine; a bound, not a timing


@pytest.fixture(scope="module")
def training_service(
    reduced_demo: DemoBuild, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    with running_demo(
        reduced_demo,
        tmp_path_factory.mktemp("page-training"),
        keys=None,
        default_adapter="count",
        jobs_backbone=str(reduced_demo.backbone_dir),
    ) as running:
        yield running


@pytest.fixture
def training_page(browser, training_service: Service) -> Iterator[Page]:  # noqa: F811
    with page_at(browser, training_service.url) as page:
        yield page


def test_upload_train_watch_the_loss_and_try_the_new_model(
    training_page: Page,
    training_service: Service,
    shots: Path,  # noqa: F811
) -> None:
    page = training_page
    panel = page.get_by_role("region", name="Train your own adapter")
    expect(panel).to_be_visible()
    start = page.get_by_role("button", name="Start training")
    expect(start).to_be_disabled()
    page.set_input_files(
        "#train-file",
        files=[
            payload(chat_jsonl("count", "train", 60, seed=4), "shapes.jsonl", "application/jsonl")
        ],
    )
    page.get_by_label("Name suffix (optional)").fill("page")
    page.get_by_label(re.compile("^Epochs")).fill("4")
    start.click()
    status = page.locator("#train-status")
    expect(status).to_contain_text(re.compile(r"Job ftjob-\w+: (queued|running|validating files)"))
    expect(status).to_contain_text("Succeeded: ft-page-")
    model = status.inner_text().split("Succeeded: ")[1].split(" ")[0]

    # The chart drew the metrics events: a line with a point per event, dots per epoch.
    chart = page.locator("#loss-chart")
    expect(chart).to_be_visible()
    points = page.locator("#loss-chart polyline.train").get_attribute("points") or ""
    assert len(points.split()) >= 3
    expect(page.locator("#loss-chart circle.valid")).to_have_count(4)
    expect(page.locator("#train-events")).to_contain_text("Fine-tuning job started")
    expect(page.locator("#train-events li").last).to_contain_text("successfully completed")

    # "Try it": the new model is ticked alone, a sample is fetched and captioned with it.
    page.get_by_role("button", name="Try it").click()
    result = page.locator(f"{card(page, model)} .caption")
    expect(page.locator(card(page, model))).to_contain_text(f"{model} · v1")
    boxes = page.locator("#adapter-list input[type=checkbox]:checked")
    expect(boxes).to_have_count(1)
    assert boxes.first.get_attribute("value") == model
    expected = api_caption(training_service.url, model, preview_bytes(page), key=None)
    expect(result).to_have_text(expected)
    panel.screenshot(path=str(shots / "6-training.png"))


def test_a_bad_training_file_shows_the_lines_at_fault(training_page: Page) -> None:
    page = training_page
    page.set_input_files(
        "#train-file",
        files=[payload(b'{"messages": 1}\nnot json\n', "bad.jsonl", "application/jsonl")],
    )
    page.get_by_role("button", name="Start training").click()
    problem = page.locator("#train-problem")
    expect(problem).to_contain_text(
        "2 invalid examples: line 1: 'messages' must be a non-empty list"
    )
    expect(problem).to_contain_text("line 2: not valid JSON")
    expect(problem).to_contain_text("invalid_training_file, HTTP 400")
