"""`fleet report` on a real run: a worker (on a fake GPU, computing on the CPU) makes a small
image experiment on the tiny Z-Image model, one sample fails, one record is then lost from
Redis (the manifest has it); the report is opened in headless Chromium with the network
blocked, and report.json is checked against the records in Redis."""

from __future__ import annotations

import csv
import json
import socket
import statistics
import time
from pathlib import Path

import pytest
import yaml

from fleet import gpu_series
from fleet.contract import CompletionRecord, FailureRecord
from fleet.gpu_series import GpuPoint
from tests.integration.conftest import Fleet, wait_for
from tests.integration.test_flower import CHROMIUM_ARGS, _chromium_launch_options

pytestmark = pytest.mark.integration

HOSTILE = "<img src=x onerror=alert(1)>"  # an image id: the label and file name carry it
ROWS = [("000001", "a red boat"), (HOSTILE, "a cat & \"quotes\""), ("000003", "blocked"), ("000004", "a tree")]
POWER_W = 120.0


def image_experiment(root: Path, model: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "prompts.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "prompt"])
        w.writerows(ROWS)
    doc = {"kind": "image", "name": "report <test>", "prompts": "prompts.csv", "seed_start": 42, "width": 64,
           "height": 48, "steps": 1, "cfg_scale": 1.0, "dtype": "fp32", "model": {"dir": str(model)}, "output": "out"}
    path = root / "experiment.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    return path


def fake_gpu(path: Path) -> str:
    path.write_text(json.dumps([{"index": 0, "uuid": "GPU-fake-0", "name": "FAKE", "memory_total_mib": 81559,
                                 "memory_used_mib": 2000, "memory_free_mib": 79559, "utilization_pct": 70,
                                 "power_w": POWER_W}]))
    return str(path)


def test_report_of_an_image_run_with_a_failure_opens_offline(fleet_ns: Fleet, tiny_image_model_dir: Path,
                                                             tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    f = fleet_ns
    exp = image_experiment(tmp_path / "exp", tiny_image_model_dir)
    out = exp.parent / "out"
    (out / "000003_seed44.png" / "in the way").mkdir(parents=True)  # the sample's file cannot be written: it fails
    f.start_named_worker("gpu0", "--gpu", "0", FLEET_FAKE_GPUS=fake_gpu(tmp_path / "gpus.json"),
                         FLEET_MAX_ATTEMPTS="1")
    assert f.enqueue(exp)["enqueued"] == 4
    wait_for(lambda: f.done_count() == 3 and f.client.hlen(f.keys.failed) == 1, 180, "3 images done and 1 failed")
    recs = [CompletionRecord.model_validate_json(v) for v in f.client.hvals(f.keys.records)]
    failure = FailureRecord.model_validate_json(f.client.hvals(f.keys.failed)[0])
    assert all(r.gpus == [0] and r.metrics.get("gpu_power_w") == POWER_W for r in recs), recs
    # The GPU's time series over the run (the worker side may write it too: a bucket is written once).
    host = socket.gethostname()
    t0, t1 = min(r.finished_at - r.duration_s for r in recs), max(r.finished_at for r in recs)
    for t in range(int(t0) - 5, int(t1) + 5, 5):
        gpu_series.write(f.client, f.keys, gpu_series.series_name(host, 0),
                         GpuPoint(t=t, util_pct=70.0, mem_used_mib=2000, mem_total_mib=81559, power_w=POWER_W))
    lost = recs[0].sample_id  # Redis loses a record; the manifest still has it
    f.client.hdel(f.keys.records, lost)

    r = f.fleet("report", str(exp), check=True)
    report_dir = out / "report"
    html_path, json_path = report_dir / "report.html", report_dir / "report.json"
    assert str(html_path) in r.stdout and "3 done, 1 failed of 4 planned" in r.stdout, r.stdout
    assert not [p for p in report_dir.iterdir() if p.name.startswith(".")]  # no temporary file left

    # report.json against the records in Redis (read before one was lost)
    fig = json.loads(json_path.read_text(encoding="utf-8"))
    durations = [x.duration_s for x in recs]
    tot = fig["totals"]
    assert (tot["planned"], tot["done"], tot["failed"], tot["left"]) == (4, 3, 1, 0)
    assert fig["groups"]["prompts.csv"] == tot
    assert tot["mean_s"] == pytest.approx(statistics.mean(durations))
    assert tot["median_s"] == pytest.approx(statistics.median(durations))
    assert tot["p95_s"] == pytest.approx(statistics.quantiles(durations, n=20, method="inclusive")[-1])
    # A sample whose tail ran beside the next one held the GPU for gpu_held_s of its duration.
    held = [min(float(x.metrics.get("gpu_held_s", x.duration_s)), x.duration_s) for x in recs]
    assert tot["gpu_hours"] == pytest.approx(sum(held) / 3600)
    assert tot["energy_kwh"] == pytest.approx(POWER_W * sum(held) / 3.6e6) and tot["energy_samples"] == 3
    assert fig["span"]["start"] == pytest.approx(t0) and fig["span"]["end"] == pytest.approx(t1)
    assert sum(fig["throughput"]["counts"]) == 3
    assert fig["workers"][recs[0].worker]["samples"] == 3
    assert fig["sources"]["manifest_only"] == 1 and fig["sources"]["redis_records"] == 2
    assert [(x["error_type"], x["count"], x["example"]["sample_id"]) for x in fig["failures"]] == [
        (failure.error_type, 1, failure.sample_id)]
    assert fig["gpu_series"][f"{host}/0"]["points"] >= 1
    assert fig["sample_telemetry"]["samples"] == 3
    assert fig["gallery"] == {"shown": 3, "media": 3, "left_out": 0, "missing": 0, "previews": 3}

    # The page in headless Chromium, the network blocked
    attempted, console_errors, page_errors = [], [], []

    def route(rt) -> None:
        if rt.request.url.startswith(("file:", "data:")):
            rt.continue_()
        else:
            attempted.append(rt.request.url)
            rt.abort()

    shot = tmp_path / "report.png"
    launch_options = _chromium_launch_options()  # its own Playwright session, before ours
    with sync_playwright() as pw:
        browser = pw.chromium.launch(**launch_options, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.route("**/*", route)
            page.on("request", lambda q: None if q.url.startswith(("file:", "data:")) else attempted.append(q.url))
            page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: page_errors.append(str(e)))
            page.goto(html_path.as_uri(), wait_until="load")
            row = page.locator('#group-table tbody tr[data-group="prompts.csv"] td')
            assert row.all_inner_texts()[:5] == ["prompts.csv", "4", "3", "1", "0"]
            assert page.locator("#group-table tfoot td").all_inner_texts()[:4] == ["all", "4", "3", "1"]
            imgs = page.locator("#gallery img")
            assert imgs.count() == 3
            wait_for(lambda: all(imgs.evaluate_all("xs => xs.map(i => i.complete && i.naturalWidth > 0)")), 10,
                     "the thumbnails decoded")
            hrefs = page.locator("#gallery a").evaluate_all("xs => xs.map(a => a.href)")
            from urllib.parse import unquote, urlparse

            assert sorted(Path(unquote(urlparse(h).path)) for h in hrefs) == sorted(Path(x.output_path) for x in recs)
            assert page.locator("figcaption", has_text=HOSTILE).count() == 1  # shown as text, not parsed
            assert page.locator("#failure-table").inner_text().count(failure.error_type) == 1
            assert page.locator("#timeline svg rect[fill]").count() >= 3
            assert page.locator("#gpus svg polyline").count() >= 3  # the series' util, memory, power
            assert page.title() == "fleet report: report <test>"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert not attempted, attempted
    assert not console_errors and not page_errors, (console_errors, page_errors)
    png = shot.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    assert time.time() - fig["generated_at"] < 600
