"""The figures of `fleet report` on records built here: percentiles, GPU-hours, energy,
grouping, throughput, idle time, merging Redis with the manifest; and the page: every user
string escaped, nothing fetched, thumbnails of an image and a video linked relatively."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from fleet import manifest
from fleet.contract import CompletionRecord, FailureRecord
from fleet.report import (
    bucket_width,
    by_group,
    failure_types,
    percentile,
    sample_energy_j,
    sample_gpu_s,
    throughput,
    worker_figures,
)
from fleet.report_charts import Bar, timeline
from fleet.report_gallery import gallery, relative_href
from fleet.report_html import page
from fleet.report_sources import ReportInput, merge
from fleet.report_writer import figures

T0 = 1_700_000_000.0
EVIL = '<script>alert("x")</script> & \'q\''


def rec(sid: str, group: str = "g", duration_s: float = 10.0, end: float = T0, gpus: list[int] | None = None,
        worker: str = "gpu0@h", power_w: float | None = None, output: str = "/nowhere/x.png",
        label: str = "") -> CompletionRecord:
    metrics = {} if power_w is None else {"gpu_power_w": power_w, "gpu_util_pct": 50.0, "gpu_mem_mib": 1000}
    return CompletionRecord(sample_id=sid, experiment="e", kind="image", group=group, label=label or f"sample {sid}",
                            output_path=output, duration_s=duration_s, worker=worker, hostname="h",
                            gpus=[0] if gpus is None else gpus, attempt=1, deliveries=1, model_loaded=False,
                            model_load_s=0.0, metrics=metrics, finished_at=end)


def fail(sid: str, group: str = "g", error_type: str = "InputError", message: str = "bad") -> FailureRecord:
    return FailureRecord(sample_id=sid, experiment="e", kind="image", group=group, label=f"failed {sid}",
                         error_type=error_type, message=message, traceback_tail="", retryable=False, attempt=1,
                         worker="gpu0@h", hostname="h", gpus=[0], failed_at=T0)


def test_a_sample_finished_in_the_background_counts_its_gpu_held_time() -> None:
    # Its duration runs to its record; its encoding overlapped the next sample's GPU time.
    r = rec("a", duration_s=10.0, power_w=100.0, gpus=[0, 1])
    r.metrics["gpu_held_s"] = 6.0
    assert (sample_gpu_s(r), sample_energy_j(r)) == (12.0, 1200.0)
    r.metrics["gpu_held_s"] = True  # not a number: the duration counts
    assert sample_gpu_s(r) == 20.0


def test_percentiles_interpolate_between_ranks_like_numpy() -> None:
    xs = [4.0, 1.0, 3.0, 2.0]
    assert percentile(xs, 50) == 2.5
    assert percentile(xs, 95) == pytest.approx(3.85)
    assert percentile(xs, 0) == 1.0 and percentile(xs, 100) == 4.0
    assert percentile([7.0], 95) == 7.0 and percentile([], 50) is None
    assert percentile(list(map(float, range(1, 101))), 95) == pytest.approx(95.05)


def test_gpu_hours_and_energy_per_group_and_in_all() -> None:
    done = [rec("a", "g1", 3600, gpus=[0], power_w=250.0),  # 1 GPU-h, 0.25 kWh
            rec("b", "g1", 1800, gpus=[0, 1], power_w=200.0),  # 1 GPU-h, 2 GPUs x 200 W x 0.5 h = 0.2 kWh
            rec("c", "g2", 7200, gpus=[], worker="cpu0@h"),  # a CPU worker: no GPU-hours, no energy
            rec("d", "g2", 3600, gpus=[3])]  # power unknown: GPU-hours, no energy
    assert sample_energy_j(done[0]) == 250.0 * 3600 and sample_energy_j(done[3]) is None
    per, total = by_group(done, [fail("x", "g2"), fail("y", "g3")], planned={"g1": 2, "g2": 5, "g3": 1})
    assert list(per) == ["g1", "g2", "g3"]
    g1, g2, g3 = (per[g].as_dict() for g in ("g1", "g2", "g3"))
    assert (g1["gpu_hours"], g1["energy_kwh"], g1["energy_samples"]) == (pytest.approx(2.0), pytest.approx(0.45), 2)
    assert (g2["gpu_hours"], g2["energy_kwh"], g2["energy_samples"]) == (pytest.approx(1.0), None, 0)
    assert (g2["planned"], g2["done"], g2["failed"], g2["left"]) == (5, 2, 1, 2)
    assert (g3["done"], g3["failed"], g3["left"], g3["mean_s"]) == (0, 1, 0, None)
    t = total.as_dict()
    assert (t["planned"], t["done"], t["failed"], t["left"]) == (8, 4, 2, 2)
    assert t["gpu_hours"] == pytest.approx(3.0) and t["energy_kwh"] == pytest.approx(0.45)
    assert (t["mean_s"], t["median_s"]) == (pytest.approx(4050.0), pytest.approx(3600.0))
    assert t["p95_s"] == pytest.approx(3600 + 0.85 * 3600)


def test_throughput_buckets_and_idle_share_per_worker() -> None:
    assert bucket_width(50) == 1 and bucket_width(61) == 5 and bucket_width(3600) == 60 and bucket_width(10 * 86400) > 0
    done = [rec("a", end=T0 + 10, duration_s=10), rec("b", end=T0 + 30, duration_s=10),  # gpu0: busy 20 of 30 s
            rec("c", end=T0 + 30, duration_s=30, worker="gpu1@h")]
    tp = throughput(done)
    assert tp is not None and tp.bucket_s == 1 and sum(tp.counts) == 3 and tp.start <= T0
    assert tp.counts[int(T0 + 30 - tp.start)] == 2 and tp.as_dict()["peak_per_minute"] == 120.0
    w = worker_figures(done)
    assert w["gpu0@h"]["samples"] == 2 and w["gpu0@h"]["busy_s"] == 20 and w["gpu0@h"]["idle_pct"] == pytest.approx(100 / 3)
    assert w["gpu1@h"]["idle_pct"] == 0.0


def test_failures_by_type_with_the_first_as_example() -> None:
    fails = [fail("1", error_type="InputError", message="first"), fail("2", error_type="OOM"),
             fail("3", error_type="InputError", message="second")]
    out = failure_types(fails)
    assert [(f["error_type"], f["count"]) for f in out] == [("InputError", 2), ("OOM", 1)]
    assert out[0]["example"]["message"] == "first" and out[0]["example"]["sample_id"] == "1"


def test_the_later_record_wins_and_redis_wins_a_tie(tmp_path: Path) -> None:
    r_old, r_new = rec("a", end=T0), rec("a", end=T0 + 5, duration_s=3)
    assert merge({"a": r_old}, {"a": r_new})["a"] is r_new
    assert merge({"a": r_new}, {"a": r_old})["a"] is r_new
    same = rec("b")
    assert merge({"b": same}, {"b": rec("b")})["b"] is same
    lines = [json.dumps({**json.loads(r.model_dump_json(by_alias=True)), "params": {"seed": 1}}) for r in (r_old, r_new)]
    (tmp_path / manifest.MANIFEST_NAME).write_text("\n".join([lines[0], "{not json", lines[1], '{"sample_id": "z"}']) + "\n")
    got = manifest.records(tmp_path)
    assert list(got) == ["a"] and got["a"].finished_at == T0 + 5  # the damaged and foreign lines left out


def test_a_long_timeline_draws_a_bounded_number_of_bars() -> None:
    bars = [Bar(T0 + i, T0 + i + 0.9, "#000", f"s{i}") for i in range(20_000)]
    svg = timeline({"w": bars}, T0, T0 + 20_000, "t")
    assert 0 < svg.count("<rect") < 1000


@dataclass
class _Exp:
    name: str
    kind: str
    output: Path
    path: Path


def test_every_user_string_is_escaped_and_nothing_is_fetched(tmp_path: Path, make_video) -> None:
    from PIL import Image

    out = tmp_path / f"out {EVIL[:8]}"
    img_path, vid_path = out / "a b ü.png", out / "clip.mp4"
    out.mkdir()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(img_path)
    make_video(vid_path, frames=2, width=32, height=32)
    done = [rec("s1", group=EVIL, label=EVIL, worker=EVIL, output=str(img_path), power_w=100.0),
            rec("s2", group="plain", output=str(vid_path), end=T0 + 20),
            rec("s3", group="plain", output=str(out / "gone.png"), end=T0 + 30)]
    inp = ReportInput(_Exp(EVIL, "image", out, out / "e.yaml"), Counter({EVIL: 2, "plain": 2}),  # type: ignore[arg-type]
                      {r.sample_id: r for r in done}, [fail("f", EVIL, error_type=EVIL, message=EVIL)], {},
                      {"redis": True, "redis_records": 3, "manifest_records": 0, "manifest_only": 0, "manifest": EVIL})
    report_dir = tmp_path / "report"
    g = gallery(done, report_dir)
    assert (len(g.items), g.media, g.missing) == (2, 2, 1) and all(t.data_uri for t in g.items)
    folder = "../out%20%3Cscript%3E"
    assert [t.href for t in g.items] == [f"{folder}/a%20b%20%C3%BC.png", f"{folder}/clip.mp4"]  # by group: '<' < 'p'
    assert relative_href(str(vid_path), report_dir) == f"{folder}/clip.mp4"
    assert [t.media for t in g.items] == ["image", "video"]
    html = page(inp, figures(inp, g), g)
    assert "<script" not in html and EVIL not in html
    assert html.count("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#x27;q&#x27;") >= 6
    # nothing the browser would fetch: only data: images, no src/href to the network
    assert not re.search(r'(src|href)="(https?:)?//', html) and "url(" not in html and "@import" not in html
    assert len(re.findall(r'<img src="data:image/jpeg;base64,', html)) == 2
    assert 'id="no-gpu-series"' in html
    assert "%20" in html and "%C3%BC" in html  # the image's link, percent-encoded
    assert g.as_dict() == {"shown": 2, "media": 2, "left_out": 0, "missing": 1, "previews": 2}
    capped = gallery(done, report_dir, limit=1)
    assert (len(capped.items), capped.left_out) == (1, 1)


def test_nothing_done_yet_still_makes_a_page(tmp_path: Path) -> None:
    inp = ReportInput(_Exp("empty", "image", tmp_path, tmp_path / "e.yaml"), Counter({"g": 3}), {}, [], None,  # type: ignore[arg-type]
                      {"redis": False, "redis_records": 0, "manifest_records": 0, "manifest_only": 0, "manifest": "m"})
    g = gallery([], tmp_path / "report")
    fig = figures(inp, g)
    assert fig["span"] is None and fig["throughput"] is None and fig["gpu_series"] is None
    assert (fig["totals"]["planned"], fig["totals"]["left"], fig["totals"]["gpu_hours"]) == (3, 3, 0.0)
    html = page(inp, fig, g)
    assert "No sample of this experiment is done yet" in html and "Redis was not reachable" in html
    json.dumps(fig, allow_nan=False)  # report.json stays strict JSON
