"""Bad input: one clear line naming the file and the fault, exit non-zero, nothing enqueued."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from fleet.contract import queue_name
from fleet.priority import queue_length, queue_lists
from tests.integration.conftest import Fleet

pytestmark = pytest.mark.integration


def rejected(f: Fleet, exp: Path, must_name: str | Path, fault: str, *args: str) -> str:
    r = f.fleet("enqueue", str(exp), *args)
    assert r.returncode != 0, r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert str(must_name) in lines[0] and fault in lines[0], lines[0]
    assert queue_length(f.client, queue_name(f.namespace, "gpu")) == 0
    assert f.client.hlen(f.keys.queued) == 0
    return lines[0]


def test_experiment_that_does_not_validate(fleet_ns: Fleet, video_experiment) -> None:
    exp = video_experiment(width=100)
    rejected(fleet_ns, exp, exp, "width: must be a multiple of 16")
    exp = video_experiment(seeds="forty-two")
    rejected(fleet_ns, exp, exp, "seeds")
    exp = video_experiment(colour="blue")
    rejected(fleet_ns, exp, exp, "colour")
    exp.write_text("kind: video\ndataset: [unclosed\n", encoding="utf-8")
    rejected(fleet_ns, exp, exp, "not valid YAML")


def test_missing_dataset_folder(fleet_ns: Fleet, video_experiment) -> None:
    exp = video_experiment(dataset="no such folder")
    rejected(fleet_ns, exp, exp, "dataset: folder")


def test_prompts_not_json(fleet_ns: Fleet, video_experiment) -> None:
    exp = video_experiment()
    prompts = exp.parent / "prompts.json"
    prompts.write_text('{"v1": ["a cat",]', encoding="utf-8")
    rejected(fleet_ns, exp, prompts, "not valid JSON")


def test_prompts_name_a_missing_video(fleet_ns: Fleet, video_experiment) -> None:
    exp = video_experiment(videos={"c": ["v1"]}, prompts={"v1": ["a"], "v_typo": ["b"]})
    rejected(fleet_ns, exp, exp.parent / "prompts.json", "'v_typo'")


def test_video_without_prompts(fleet_ns: Fleet, video_experiment) -> None:
    exp = video_experiment(videos={"c": ["v1", "v2"]}, prompts={"v1": ["a"]})
    rejected(fleet_ns, exp, exp.parent / "prompts.json", "no prompts for video 'v2'")


def test_undecodable_reference_video(fleet_ns: Fleet, video_experiment) -> None:
    exp = video_experiment(videos={"c": ["good", "zz broken"]})
    broken = exp.parent / "dataset" / "c" / "zz broken.mp4"
    broken.write_bytes(b"this is not a video at all\n" * 20)
    rejected(fleet_ns, exp, broken, "cannot decode video")


def test_unknown_category(fleet_ns: Fleet, video_experiment) -> None:
    exp = video_experiment()
    rejected(fleet_ns, exp, exp.parent / "dataset", "no category folder 'nope'", "--category", "nope")


def test_malformed_settings_file(fleet_ns: Fleet, video_experiment, tmp_path: Path) -> None:
    exp = video_experiment()
    cfg = tmp_path / "fleet.yaml"
    cfg.write_text("visibilty_timeout_s: 100\n", encoding="utf-8")
    r = fleet_ns.fleet("--config", str(cfg), "enqueue", str(exp))
    assert r.returncode != 0 and str(cfg) in r.stderr and "visibilty_timeout_s" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_no_reachable_broker(fleet_ns: Fleet, video_experiment) -> None:
    exp = video_experiment()
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    r = fleet_ns.fleet("enqueue", str(exp), FLEET_BROKER_URL=f"redis://127.0.0.1:{port}/0")
    assert r.returncode != 0
    (line,) = r.stderr.strip().splitlines()
    assert f"cannot reach Redis at redis://127.0.0.1:{port}/0" in line and "FLEET_BROKER_URL" in line


def test_dry_run_publishes_nothing(fleet_ns: Fleet, video_experiment) -> None:
    exp = video_experiment()
    d = json.loads(fleet_ns.fleet("enqueue", str(exp), "--dry-run", "--json", check=True).stdout)
    assert d["planned"] == 4 and d["enqueued"] == 0 and len(d["would_enqueue"]) == 4
    assert queue_length(fleet_ns.client, queue_name(fleet_ns.namespace, "gpu")) == 0


def test_a_purged_queue_does_not_leave_samples_in_flight_forever(fleet_ns: Fleet, video_experiment) -> None:
    exp = video_experiment()
    assert fleet_ns.enqueue(exp)["enqueued"] == 4
    fleet_ns.client.delete(*queue_lists(queue_name(fleet_ns.namespace, "gpu")))  # `celery purge`, or a lost queue
    again = fleet_ns.enqueue(exp)
    assert (again["in_flight"], again["enqueued"]) == (0, 4)
    assert fleet_ns.enqueue(exp)["in_flight"] == 4  # and the marks are right again


@pytest.mark.parametrize("seeds, fault", [([2**64], "outside 0 .. 2**64-1"), ([True], "seeds.0"), ([-1], "outside")])
def test_seeds_the_generator_cannot_take(fleet_ns: Fleet, video_experiment, seeds: list, fault: str) -> None:
    exp = video_experiment(seeds=seeds)
    rejected(fleet_ns, exp, exp, fault)


def test_empty_dataset_or_category_and_a_dataset_that_is_a_file(fleet_ns: Fleet, video_experiment) -> None:
    exp = video_experiment(videos={"c": ["v1"]})
    (exp.parent / "dataset" / "empty one").mkdir()
    rejected(fleet_ns, exp, exp.parent / "dataset" / "empty one", "has no videos")
    (exp.parent / "dataset" / "empty one").rmdir()
    (exp.parent / "a file").write_text("not a folder")
    exp = video_experiment(videos={"c": ["v1"]}, dataset="a file")
    rejected(fleet_ns, exp, exp, "is a file")
    (exp.parent / "nothing").mkdir()
    exp = video_experiment(videos={"c": ["v1"]}, dataset="nothing")
    rejected(fleet_ns, exp, exp.parent / "nothing", "no category folders")


def test_model_file_named_in_model_json_is_missing(fleet_ns: Fleet, video_experiment) -> None:
    exp = video_experiment()
    (exp.parent / "model" / "vae.safetensors").unlink()
    rejected(fleet_ns, exp, exp.parent / "model" / "vae.safetensors", "model.vae: file")


def test_output_folder_that_cannot_be_created(fleet_ns: Fleet, video_experiment) -> None:
    exp = video_experiment()
    (exp.parent / "blocker").write_text("a file where the output folder's parent should be")
    exp = video_experiment(output="blocker/out")
    rejected(fleet_ns, exp, exp, "output: cannot create")
