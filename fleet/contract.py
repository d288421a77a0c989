"""The contract between producer and workers: task names, queue names, Redis keys and
the versioned JSON payloads and records.

Both sides import this module and nothing else of each other. Every payload carries a
``schema`` string; a worker refuses one it does not know instead of guessing. No kind of
work appears here: a task names its kind, and each side looks the kind up in its own
registry (docs/ARCHITECTURE.md, "The kinds seam").
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# ---- task names -------------------------------------------------------------------------
# One Celery task for every kind: the payload's ``kind`` picks the job, the way dramatiq
# names the actor in the message. Flower still tells kinds apart by the message's label.
TASK_SAMPLE = "fleet.sample"

# ---- worker exit status (besides Celery's 0 and 1) -----------------------------------------
WORKER_EXIT_BROKEN = 3  # it stopped itself: several samples in a row failed with unexpected errors
WORKER_EXIT_INTERRUPTED = 130  # stopped at once (a second Ctrl-C); its sample went back to its queue

# ---- payload schemas ----------------------------------------------------------------------
TASK_SCHEMA = "fleet.task/1"
RECORD_SCHEMA = "fleet.record/2"
FAILURE_SCHEMA = "fleet.failure/2"

MetricValue = float | int | str | bool | None


# ---- queues -------------------------------------------------------------------------------
def queue_name(namespace: str, need: str = "gpu") -> str:
    """The queue for tasks that need ``need`` (see fleet.routing for the needs)."""
    return f"{namespace}.q.{need}"


class Keys:
    """The Redis key schema of one fleet namespace. Records never expire.

    docs/ARCHITECTURE.md ("Redis keys") gives the lifecycle of each key.
    """

    def __init__(self, namespace: str) -> None:
        ns = namespace
        self.namespace = ns
        self.done = f"{ns}:done"  # SET of sample ids whose record says done
        self.done_bytes = f"{ns}:done_bytes"  # HASH sample id -> its output's size in bytes (-1: a folder)
        # HASH 12-byte BLAKE2b of an output path (fleet.publisher.output_key) -> "<sample id>\t<experiment>":
        # who writes each output (enqueue refuses a second experiment writing the same path with other
        # parameters). ``outputs`` is its earlier form, path -> [sample id, experiment], still read.
        self.output_owners = f"{ns}:output_owners"
        self.outputs = f"{ns}:outputs"
        self.enqueue_lock = f"{ns}:lock:enqueue"  # held by one `fleet enqueue` of the namespace at a time
        self.records = f"{ns}:records"  # HASH sample id -> CompletionRecord JSON
        self.failed = f"{ns}:failed"  # HASH sample id -> FailureRecord JSON (cleared on success)
        # HASH sample id -> its mark, "<head id>\t<queue>\t<tail>": published, not started. The mark keeps
        # the sample's payload (fleet.kept_payloads): the worker expands a message's reference from
        # it, and a message Redis lost is published again from it. Earlier marks: [experiment, group].
        self.queued = f"{ns}:queued"
        # HASH sample id -> "<head id>\t<queue>\t<payload after its head>": the kept payloads of samples
        # published before marks kept them; read by recovery and cancel, written no more
        self.payloads = f"{ns}:payloads"
        self.payload_heads = f"{ns}:payload_heads"  # HASH head id -> the constant start of an experiment's payloads
        self.lost_suspects = f"{ns}:lost_suspects"  # HASH sample id -> unix time first seen without a message
        self.orphan_suspects = f"{ns}:orphan_suspects"  # HASH sample id -> unix time first seen without a lease
        self.running = f"{ns}:running"  # HASH sample id -> RunningEntry JSON
        self.deliveries = f"{ns}:deliveries"  # HASH sample id -> times the sample started
        self.workers = f"{ns}:workers"  # HASH worker name -> WorkerEntry JSON (heartbeat, current sample)
        self.reaper_lock = f"{ns}:lock:reaper"
        # LIST of JSON {reason, queue, worker, at, encoding, message}: what a worker popped from a
        # fleet queue that was not a fleet task (not JSON, pickle, another task), newest first
        self.dead_letters = f"{ns}:dead_letters"
        # ZSET of JSON [queue list, message] scored by the unix time it is due: retries waiting
        # out their back-off; the reaper moves due ones to the front of their queue lists
        self.delayed = f"{ns}:delayed"
        # SET of GPU time series names ("<hostname>/<NVML index>"); each is a STREAM (gpu_series)
        self.gpu_series_names = f"{ns}:gpu_series_names"
        # HASH experiment name -> JSON {file, kind, output_root, first_enqueued_at, last_enqueued_at
        # (unix s), published}: every experiment `fleet enqueue` published (fleet.experiment_index)
        self.experiments = f"{ns}:experiments"
        # HASH folder path -> "<inode>:<mtime ns>:<ctime ns> <digest>": folders whose done outputs were
        # all verified, trusted while unchanged (fleet.output_files.in_place, the done check's cache)
        self.verified_folders = f"{ns}:verified_folders"
        # HASH experiment -> "<length of its samples hash> <digest of planned ids>": the last status of that
        # plan found every sample the experiment published still planned (fleet.status._count_published), or
        # an enqueue of that plan kept it so (fleet.experiment_index.keep_checked)
        self.index_checked = f"{ns}:index_checked"

    # SET of series names ("<hostname>/<NVML index>") that have a GPU time series
    def gpu_series(self, name: str) -> str:
        """STREAM of one GPU's telemetry, one entry per bucket (id = bucket start in ms), capped
        to the settings' window (fleet.gpu_series)."""
        return f"{self.namespace}:gpu_series:{name}"

    def experiment_samples(self, experiment: str) -> str:
        """HASH sample id -> JSON [group, output path]: every sample the experiment has published,
        kept when it leaves the plan (a deleted input), so status and export still count it."""
        return f"{self.namespace}:experiment_samples:{experiment}"

    def lease(self, sample_id: str) -> str:
        """STRING, TTL lease_ttl_s: the worker token running the sample; gone = worker dead."""
        return f"{self.namespace}:lease:{sample_id}"

    def kind_cache(self, kind: str, name: str) -> str:
        """HASH a kind's planner keeps for itself (e.g. video content ids by file identity)."""
        return f"{self.namespace}:cache:{kind}:{name}"


# ---- payloads ------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class TaskPayload(_Strict):
    """One sample as published: what the core needs, plus the kind's own parameters.

    ``shared`` holds what every sample of the experiment shares (serialised once per
    experiment), ``body`` what is this sample's own; the kind's job reads both through
    ``params``. Paths are absolute.
    """

    schema_: Literal["fleet.task/1"] = Field(TASK_SCHEMA, alias="schema")
    kind: str = Field(min_length=1, description="Which job runs it (the worker's kind registry)")
    sample_id: str = Field(min_length=1)
    experiment: str
    group: str = Field(description="What the sample is counted under: a category, a CSV, a grid")
    label: str = Field("", description="A short human description (Flower, logs, fleet watch)")
    output_path: str = Field(min_length=1, description="The file (or folder) the sample makes")
    output_root: str = Field(min_length=1, description="The experiment's output folder; outputs stay inside it")
    memory_mib: int = Field(0, ge=0, description="GPU memory the sample declares it needs")
    gpus: int = Field(1, ge=0, description="GPUs the sample holds (0: CPU only)")
    attempt: int = Field(1, ge=1)
    retries: int | None = Field(
        None, ge=-1, description="Retries after a retryable failure: -1 forever, 0 none, N; None: the settings' "
        "max_attempts - 1")
    shared: dict[str, Any] = Field(default_factory=dict)
    body: dict[str, Any] = Field(default_factory=dict)

    @property
    def params(self) -> dict[str, Any]:
        """The kind's parameters: the experiment's shared ones, overridden by the sample's own."""
        return {**self.shared, **self.body}

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True)


# ---- records -------------------------------------------------------------------------------
class CompletionRecord(_Strict):
    """Written when a sample's output is in place. Never expires."""

    schema_: Literal["fleet.record/2"] = Field(RECORD_SCHEMA, alias="schema")
    sample_id: str
    experiment: str
    kind: str
    group: str
    label: str = ""
    output_path: str
    output_bytes: int = Field(-1, description="Size of the output file in bytes; -1 for a folder")
    duration_s: float = Field(description="Wall time of the sample on the worker, model load included")
    worker: str
    hostname: str
    gpus: list[int] = Field(description="The worker's GPUs (NVML indices); empty for a CPU worker")
    attempt: int
    deliveries: int
    model_loaded: bool = Field(description="Whether this sample paid for loading the model")
    model_load_s: float = Field(description="Seconds spent loading the model for this sample (0 when resident)")
    metrics: dict[str, MetricValue] = Field(default_factory=dict, description="What the job reported (units in names)")
    finished_at: float = Field(description="Unix time")


class FailureRecord(_Strict):
    """Written when a sample fails for good (or for now, when ``retryable`` and attempts remain)."""

    schema_: Literal["fleet.failure/2"] = Field(FAILURE_SCHEMA, alias="schema")
    sample_id: str
    experiment: str
    kind: str
    group: str
    label: str = ""
    error_type: str
    message: str
    traceback_tail: str
    retryable: bool = Field(description="True when another attempt was published (the failure is not final)")
    attempt: int
    worker: str
    hostname: str
    gpus: list[int]
    metrics: dict[str, MetricValue] = Field(default_factory=dict)
    failed_at: float


def task_label(experiment: str, label: str, sample_id: str, note: str = "") -> str:
    """What Flower shows as a message's args: the experiment, the sample's label and the start
    of its id (what `fleet status --failed` and `fleet logs` take), e.g.
    ``wan-t2v: dance/v1 seed 42 prompt 0 [3f4c607f0b9a]``; ``note`` says why it was published
    again ("retry", "attempt 2", ...)."""
    text = f"{experiment}: {label} [{sample_id[:12]}]"
    return f"{text} ({note})" if note else text


def record_group(raw: bytes | str) -> str:
    """The group of a completion or failure record of any schema (version 1 said ``category``)."""
    import json

    d = json.loads(raw)
    return str(d.get("group", d.get("category", "?")))


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
    gpus: tuple[int, ...] = Field(description="NVML indices of its GPUs; () for a CPU worker")
    host_gpus: int | None = Field(None, ge=0, description="GPUs its host has (NVML), for enqueue's feasibility check")
    queues: list[str]
    sample_id: str | None = None
    group: str | None = None
    label: str | None = None
    progress: float | None = Field(None, description="Fraction of the current sample done, when the job reports it")
    finishing: str | None = Field(None, description="The sample whose output and record it is writing in the "
                                  "background while it runs the next (docs/ARCHITECTURE.md, Overlapped finish)")
    done: int = Field(0, ge=0, description="Samples this worker process has made (the supervisor resets its restart back-off)")
    failed: int = Field(0, ge=0, description="Samples this worker process failed for good")
    peak_mib: int | None = Field(None, ge=0, description="GPU memory its samples took at their peak, MiB, model and "
                                 "CUDA context included (measured with `--slots auto`; fleet.slot_plans)")
    peak_samples: int = Field(0, ge=0, description="Samples peak_mib was measured over")
    seen_at: float
