"""The real Flower that `fleet up` starts, driven in headless Chromium (Playwright).

Flower learns about workers and tasks only from Celery events, so this checks that the
workers send them (-E, worker_send_task_events) and that a sample's label (the message's
argsrepr) reaches the tasks list.
"""

from __future__ import annotations

import base64
import re
import shutil
import socket
import urllib.request
from pathlib import Path

import pytest

from fleet.experiment import load_experiment
from tests.integration.conftest import LocalFleet, wait_for

pytestmark = pytest.mark.integration

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
TASK = "fleet.sample"


def _chromium_launch_options() -> dict:
    """Launch options for the Chromium a user has: Playwright's own (`python -m playwright install
    chromium`), launched the default way, else chromium / chromium-browser / google-chrome on PATH."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        bundled = pw.chromium.executable_path
    if bundled and Path(bundled).is_file():
        return {}
    for name in ("chromium", "chromium-browser", "google-chrome"):
        exe = shutil.which(name)
        if exe:
            return {"executable_path": exe}
    pytest.fail("no Chromium for the Flower test: run `python -m playwright install chromium` "
                "(or `apt-get install chromium`)", pytrace=False)


def _get(url: str, login: tuple[str, str] | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url)
    if login:
        req.add_header("Authorization", "Basic " + base64.b64encode(":".join(login).encode()).decode())
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, r.read().decode()


def test_flower_shows_the_worker_and_the_finished_samples(local_fleet: LocalFleet, video_experiment, tmp_path) -> None:
    from playwright.sync_api import expect, sync_playwright

    launch_options = _chromium_launch_options()
    f = local_fleet
    node = f"cpu0@{socket.gethostname()}"
    labels = ["c/v1 seed 42 prompt 0", "c/v1 seed 42 prompt 1"]
    exp = video_experiment(videos={"c": ["v1"]}, prompts={"*": ["a boat", "一只猫"]})
    exp_name = load_experiment(exp).name
    f.up()
    wait_for(f.worker_registered, 60, f"worker {node}\n{f.log_tails()}")
    assert f.enqueue(exp)["enqueued"] == 2
    wait_for(lambda: f.done_count() == 2, 60, f"2 samples done\n{f.log_tails()}")

    # The one endpoint left outside the login (test_security.py checks the others need it).
    assert _get(f.flower_url + "/healthcheck") == (200, "OK")
    user, password = f.flower_login()

    with sync_playwright() as pw:
        browser = pw.chromium.launch(**launch_options, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900},
                                    http_credentials={"username": user, "password": password})
            expect.set_options(timeout=30_000)

            # Workers dashboard (refreshes itself every second from Flower's event state).
            page.goto(f.flower_url + "/")
            row = page.locator("#workers-table tbody tr", has_text=node)
            expect(row).to_have_count(1)
            expect(row.locator("td").nth(1)).to_have_text("Online")
            expect(page.locator("#workers-online")).to_have_text("1")
            # Both task-succeeded events have reached Flower.
            expect(page.locator("#workers-succeeded")).to_have_text("2")
            expect(page.locator("#workers-failed")).to_have_text("0")
            page.screenshot(path=str(tmp_path / "flower-workers.png"), full_page=True)

            # Tasks list (filled by datatables from /tasks/datatable).
            page.goto(f.flower_url + "/tasks")
            rows = page.locator("#tasks-table tbody tr")
            expect(rows).to_have_count(2)
            expect(rows.first.locator("td")).not_to_have_count(1)  # not the "no tasks" placeholder row
            # The table's columns, in order (datatables shows a copy of this header when scrolling).
            cols = page.locator("#tasks-table thead th").evaluate_all("ths => ths.map(th => th.dataset.column)")
            assert {"name", "state", "args", "worker"} <= set(cols), cols
            for label in labels:
                row = rows.filter(has_text=label)
                expect(row).to_have_count(1)
                cells = row.locator("td")
                expect(cells.nth(cols.index("name"))).to_have_text(TASK)
                # The experiment, the sample's label and the start of its id (fleet.contract.task_label).
                expect(cells.nth(cols.index("args"))).to_have_text(
                    re.compile(rf"^{re.escape(exp_name)}: {re.escape(label)} \[[0-9a-f]{{12}}\]$"))
                expect(cells.nth(cols.index("state"))).to_have_text("SUCCESS")
                expect(cells.nth(cols.index("worker"))).to_have_text(node)
            shot = tmp_path / "flower-tasks.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()

    png = shot.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000

    # Prometheus metrics count the same events.
    status, metrics = _get(f.flower_url + "/metrics", (user, password))
    assert status == 200
    succeeded = re.search(
        r'^flower_events_total\{(?=[^}]*task="%s")(?=[^}]*type="task-succeeded")(?=[^}]*worker="%s")[^}]*\} (\S+)$'
        % (re.escape(TASK), re.escape(node)), metrics, re.M)
    assert succeeded and float(succeeded.group(1)) == 2.0, metrics[-3000:]
