"""The contract between producer and workers: task names, queue names, Redis keys and
the versioned JSON payloads and records.

Both sides import this module and nothing else of each other. Every payload carries a
``schema`` string; a worker refuses one it does not know instead of guessing.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# ---- task names -------------------------------------------------------------------------
TASK_VIDEO = "fleet.video.generate"

# ---- payload schemas ----------------------------------------------------------------------
VIDEO_SCHEMA = "fleet.video/1"
RECORD_SCHEMA = "fleet.record/1"
FAILURE_SCHEMA = "fleet.failure/1"


# ---- queues -------------------------------------------------------------------------------
def queue_name(namespace: str, need: str = "gpu") -> str:
    """The queue for tasks that need ``need``.

    ``gpu``: any single GPU (or the CPU worker); ``pin.<category>``: only the GPUs
    the category is pinned to; ``mem<MiB>``: a GPU with at least that much memory;
    ``gpus<n>``: a worker holding n GPUs of one host.
    """
    return f"{namespace}.q.{need}"


class Keys:
    """The Redis key schema of one fleet namespace. Records never expire."""

    def __init__(self, namespace: str) -> None:
        ns = namespace
        self.namespace = ns
        self.done = f"{ns}:done"  # SET of sample ids whose record says done
        self.records = f"{ns}:records"  # HASH sample id -> CompletionRecord JSON
        self.failed = f"{ns}:failed"  # HASH sample id -> FailureRecord JSON (cleared on success)
        self.queued = f"{ns}:queued"  # HASH sample id -> [experiment, category] (published, not started)
        # HASH sample id -> {"queue", "task"} from publishing until done or failed for good: a
        # message Redis lost (killed between a worker's BRPOP and its reply) is published again
        self.payloads = f"{ns}:payloads"  # value: "<head id>\t<queue>\t<payload after its head>"
        self.payload_heads = f"{ns}:payload_heads"  # HASH head id -> the constant start of an experiment's payloads
        self.lost_suspects = f"{ns}:lost_suspects"  # HASH sample id -> unix time first seen without a message
        self.orphan_suspects = f"{ns}:orphan_suspects"  # HASH sample id -> unix time first seen without a lease
        self.running = f"{ns}:running"  # HASH sample id -> RunningEntry JSON
        self.deliveries = f"{ns}:deliveries"  # HASH sample id -> times the sample started
        self.probes = f"{ns}:probes"  # HASH video content id -> "ok" once it decoded
        # HASH "<path>|<size>|<mtime_ns>|<inode>" -> content id: re-plans hash no unchanged video
        self.content_ids = f"{ns}:content_ids"
        self.workers = f"{ns}:workers"  # HASH worker name -> WorkerEntry JSON (heartbeat, current sample)
        self.reaper_lock = f"{ns}:lock:reaper"

    def lease(self, sample_id: str) -> str:
        """STRING, TTL lease_ttl_s: the worker token running the sample; gone = worker dead."""
        return f"{self.namespace}:lease:{sample_id}"


# ---- payloads ------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    """A Wan model by local file paths (absolute once planned). Nothing is downloaded."""

    name: str = "wan2.1-t2v"
    dit: list[str] = Field(min_length=1, description="DiT weight files (safetensors), shards in order")
    text_encoder: str
    vae: str
    tokenizer: str = Field(description="Folder of the T5 tokenizer (tokenizer.json ...)")
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"

    def identity(self) -> dict[str, Any]:
        """What of the model decides a sample's output: the files as named and the dtype."""
        return self.model_dump()


class VideoTask(_Strict):
    """One video sample: everything a worker needs, with absolute paths."""

    schema_: Literal["fleet.video/1"] = Field(VIDEO_SCHEMA, alias="schema")
    sample_id: str
    experiment: str
    category: str
    video: str = Field(description="Reference video name (file stem)")
    video_path: str
    prompt: str
    prompt_index: int = Field(ge=0)
    negative_prompt: str = ""
    seed: int
    mode: Literal["t2v", "motion"]
    denoising_strength: float = Field(ge=0.0, le=1.0)
    width: int = Field(gt=0)
    height: int = Field(gt=0)
    frames: int = Field(gt=0)
    fps: int = Field(gt=0)
    steps: int = Field(gt=0)
    cfg_scale: float
    tiled: bool = True
    model: ModelSpec
    output_path: str
    memory_mib: int = Field(0, ge=0, description="GPU memory the sample declares it needs")
    attempt: int = Field(1, ge=1)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True)


def sample_id(fields: dict[str, Any]) -> str:
    """A deterministic id from everything that decides a sample's output.

    Canonical JSON (sorted keys, no whitespace) hashed with SHA-256; 32 hex chars.
    """
    blob = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


# ---- records -------------------------------------------------------------------------------
class CompletionRecord(_Strict):
    """Written when a sample's output is in place. Never expires."""

    schema_: Literal["fleet.record/1"] = Field(RECORD_SCHEMA, alias="schema")
    sample_id: str
    experiment: str
    category: str
    output_path: str
    duration_s: float = Field(description="Wall time of the sample on the worker, model load included")
    worker: str
    hostname: str
    gpu: str = Field(description="CUDA_VISIBLE_DEVICES of the worker, or 'cpu'")
    attempt: int
    deliveries: int
    model_loaded: bool = Field(description="Whether this sample paid for loading the model")
    model_load_s: float = Field(description="Seconds spent loading the model for this sample (0 when resident)")
    finished_at: float = Field(description="Unix time")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class FailureRecord(_Strict):
    """Written when a sample fails for good (or for now, when ``retryable`` and attempts remain)."""

    schema_: Literal["fleet.failure/1"] = Field(FAILURE_SCHEMA, alias="schema")
    sample_id: str
    experiment: str
    category: str
    error_type: str
    message: str
    traceback_tail: str
    retryable: bool = Field(description="True when another attempt was published (the failure is not final)")
    attempt: int
    worker: str
    hostname: str
    gpu: str
    failed_at: float

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class RunningEntry(_Strict):
    """A sample a worker has started; with its lease it tells running from orphaned."""

    task: dict[str, Any] = Field(description="The task payload, so an orphan can be published again")
    queue: str
    worker: str
    token: str
    started_at: float


class WorkerEntry(BaseModel):
    """A live worker, for `fleet gpus` and status: what it holds and what it runs."""

    model_config = ConfigDict(extra="forbid")

    name: str
    hostname: str
    pid: int
    gpu: str
    queues: list[str]
    sample_id: str | None = None
    category: str | None = None
    seen_at: float
