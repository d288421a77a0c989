"""The one typed settings object of the fleet.

Sources, highest precedence first: explicit overrides (CLI flags), ``FLEET_*``
environment variables, the config file (``--config`` or ``FLEET_CONFIG``; YAML or
JSON), the defaults below. Unknown keys are rejected in the file and in the
environment alike, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

from fleet.credentials import REDIS_PASSWORD_FILE, read_secret, with_password
from fleet.documents import read_mapping
from fleet.errors import ConfigError
from fleet.kinds import KindModules
from fleet.placement import PlacementPolicy

ENV_PREFIX = "FLEET_"
CONFIG_ENV = "FLEET_CONFIG"
# Environment variables with the prefix that are not settings fields.
_NON_SETTING_ENV = {CONFIG_ENV, "FLEET_FAKE_GPUS", "FLEET_TEST_REDIS_URL"}  # the last: the test suite's Redis


class FleetSettings(BaseSettings):
    """Everything a fleet process needs to know; loaded once at the edge and passed down."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", validate_default=True, env_nested_delimiter="__"
    )

    broker_url: str | None = Field(
        None, description="Redis URL (broker and records). None: `fleet up` starts an embedded redis-server."
    )
    namespace: str = Field("fleet", description="Prefix of every Redis key and queue; lets several fleets share one Redis.")
    state_dir: Path = Field(Path("~/.fleet"), description="Pid files, the embedded Redis's data, the launcher's state.")
    log_dir: Path | None = Field(None, description="One log file per process; default <state_dir>/logs.")
    log_max_mib: float = Field(
        50.0, gt=0, description="A worker's, the supervisor's or Flower's log file is rotated at this size (MiB).")
    log_backups: int = Field(
        5, ge=0, description="Rotated log files kept per process (<name>.log.1 newest ... .N oldest); 0: none kept.")
    output_dir: Path | None = Field(None, description="Default output root for experiments that do not name one.")
    output_roots: list[Path] = Field(
        [], description="Folders a worker may write outputs under (symlinks resolved); empty: output_dir if set, "
        "else the folder the worker was started in (never /). A task whose output lies elsewhere is refused.",
    )
    embedded_redis_port: int = Field(6399, ge=1, le=65535)
    flower_port: int = Field(5555, ge=1, le=65535)
    flower_address: str = "127.0.0.1"
    flower_user: str = Field("fleet", min_length=1, description="Flower's login name.")
    flower_password: str | None = Field(
        None, min_length=1, repr=False,
        description="Flower's login password. None: generated once, kept in <state_dir>/flower.password (mode 0600).",
    )
    visibility_timeout_s: int = Field(
        6 * 3600, ge=60, description="Redis redelivers an unacked task after this; keep it above the longest sample."
    )
    lease_ttl_s: float = Field(30.0, gt=0, description="A running sample's lease; a worker that stops renewing it is dead.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Log level of workers, the supervisor and the CLI (fleet -v: DEBUG, -q: WARNING).")
    heartbeat_s: float = Field(5.0, gt=0, description="How often a worker renews its lease and looks for dead ones.")
    max_attempts: int = Field(3, ge=1, description="Attempts per sample for retryable errors (OOM, lost connection).")
    retry_backoff_s: float = Field(
        5.0, ge=0, description="Wait before a sample's second attempt on the same queue; doubles per attempt (0: none).")
    retry_backoff_max_s: float = Field(300.0, ge=0, description="The longest wait between two attempts.")
    allow_commands: bool = Field(
        False, description="This worker runs shell commands (kind commands). Off: it refuses them with a record.")
    command_grace_s: float = Field(
        10.0, ge=0, description="A stopped command's process group gets SIGTERM, then SIGKILL after this.")
    max_deliveries: int = Field(
        3, ge=1, description="Times a sample may start; one that keeps killing its worker fails after this many."
    )
    max_consecutive_errors: int = Field(
        3, ge=1, description="A worker whose samples fail this many times in a row with unexpected errors "
        "(broken CUDA, full disk) stops taking work instead of failing the whole queue",
    )
    torch_threads: int = Field(
        0, ge=0, description="torch.set_num_threads per worker; 0 = auto: 1 for a CPU worker, and for a GPU worker "
        "its share of the host's CPUs (CPUs // workers on the host), for the CPU stages of its samples "
        "(tiled VAE blending, frame conversion).")
    finish_in_background: bool = Field(
        True, description="A video or image sample's CPU tail (encoding, writing, its record) runs in a thread of "
        "the worker while the next sample computes; at most one pending (off: one sample after the other).")
    text_cache_entries: int = Field(
        32, ge=0, description="Text embeddings a diffusion worker keeps (LRU; prompts shared by its samples are "
        "encoded once; Wan: 4 MiB of GPU memory each); 0: none.")
    placement: PlacementPolicy = Field(
        default_factory=PlacementPolicy,
        description="Which GPUs, how many slots each, reserve, exclusive/shared, pinned categories (fleet.placement).",
    )
    memory_classes_mib: list[int] = Field(
        [], description="Memory classes (MiB) samples are routed by; an OOM moves a sample to the next one."
    )
    kinds: dict[str, KindModules] = Field(
        {}, description="Kinds of work beyond the built-in ones: name -> {planner: module, job: module} "
        "(fleet.kinds); producers and workers need the same entry",
    )
    placement_interval_s: float = Field(3.0, gt=0, description="How often `fleet up` re-reads the GPUs.")
    gpu_series_bucket_s: float = Field(
        5.0, gt=0, description="Seconds per point of each GPU's time series in Redis (fleet.gpu_series): a GPU "
        "worker writes its GPUs' mean utilisation, peak memory, mean power and temperature once per bucket.")
    gpu_series_window_s: float = Field(
        86400.0, gt=0, description="Seconds of history each GPU's time series keeps (older points are trimmed).")
    metrics_port: int = Field(
        9464, ge=1, le=65535, description="Port of the Prometheus /metrics endpoint `fleet up` starts on "
        "127.0.0.1 (`fleet metrics`), behind Flower's login.")
    metrics_address: str = Field(
        "127.0.0.1", description="Address `fleet metrics` listens on: loopback, or 0.0.0.0 in a container whose "
        "port only the host publishes (docker/compose.yaml); the login guards every address.")
    metrics_cache_s: float = Field(
        5.0, ge=0, description="How long /metrics reuses its sample counts (they read every record) before "
        "reading Redis again.")
    worker_pool: Literal["threads", "solo"] = Field(
        "threads", description="threads (one slot) keeps the worker answering control commands while a sample runs."
    )

    @field_validator("state_dir", "log_dir", "output_dir", mode="after")
    @classmethod
    def _expand(cls, v: Path | None) -> Path | None:
        return None if v is None else v.expanduser()

    @field_validator("broker_url", mode="after")
    @classmethod
    def _broker_scheme(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a Redis URL: redis://HOST:PORT/DB, rediss://... or unix:///path")
        return v

    @field_validator("output_roots", mode="after")
    @classmethod
    def _expand_roots(cls, v: list[Path]) -> list[Path]:
        return [p.expanduser() for p in v]

    def allowed_output_roots(self, cwd: Path | None = None) -> list[Path]:
        """The folders outputs may be written under, resolved (see output_roots)."""
        roots = list(self.output_roots) or ([self.output_dir] if self.output_dir is not None else [cwd or Path.cwd()])
        resolved = [Path(os.path.realpath(r)) for r in roots]
        return [r for r in resolved if r != Path(r.anchor)]  # the file system's root would allow everything

    @field_validator("flower_user", "flower_password", mode="after")
    @classmethod
    def _flower_login(cls, v: str | None, info: Any) -> str | None:
        # Flower reads its logins as a comma-separated list of user:password.
        bad = ",:" if info.field_name == "flower_user" else ","
        if v is not None and any(c in v for c in bad):
            raise ValueError(f"must not contain {' or '.join(repr(c) for c in bad)}")
        return v

    @property
    def logs(self) -> Path:
        """The log folder, resolved."""
        return self.log_dir if self.log_dir is not None else self.state_dir / "logs"

    @property
    def embedded_broker_url(self) -> str:
        """The embedded Redis, with the password `fleet up` generated (none before the first up)."""
        password = read_secret(self.state_dir / REDIS_PASSWORD_FILE)
        return with_password(f"redis://127.0.0.1:{self.embedded_redis_port}/0", password)

    @property
    def effective_broker_url(self) -> str:
        """The configured broker, or the embedded one `fleet up` starts."""
        return self.broker_url or self.embedded_broker_url

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _FileSource(settings_cls))


class _FileSource(PydanticBaseSettingsSource):
    """The config file named by the loader (or FLEET_CONFIG); lower precedence than env."""

    path: Path | None = None  # set by load_settings for the duration of one load

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover - unused
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return read_config_file(_FileSource.path) if _FileSource.path else {}


def read_config_file(path: Path) -> dict[str, Any]:
    """A YAML or JSON mapping from ``path``; ConfigError with the file's name otherwise."""
    return read_mapping(path, "config file", ConfigError, empty_ok=True)


def _check_env_names() -> None:
    fields = {f"{ENV_PREFIX}{name}".upper() for name in FleetSettings.model_fields}
    nested = {f"{ENV_PREFIX}PLACEMENT__{name}".upper() for name in PlacementPolicy.model_fields}
    unknown = sorted(
        k for k in os.environ
        if k.startswith(ENV_PREFIX) and k not in fields and k not in nested and k not in _NON_SETTING_ENV
    )
    if unknown:
        raise ConfigError(f"environment: unknown fleet setting {unknown[0]} (known: {', '.join(sorted(fields))})")


def load_settings(config: Path | str | None = None, **overrides: Any) -> FleetSettings:
    """Load the settings: overrides > FLEET_* env > config file > defaults.

    Raises ConfigError with one line naming the source and the field at fault.
    """
    path = Path(config) if config else (Path(os.environ[CONFIG_ENV]) if os.environ.get(CONFIG_ENV) else None)
    _check_env_names()
    _FileSource.path = path.expanduser() if path else None
    try:
        return FleetSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "settings"
        source = str(path) if path else "settings"
        raise ConfigError(f"{source}: {where}: {err['msg']}") from e
    except SettingsError as e:  # a FLEET_* variable of a list or object field that is not JSON
        raise ConfigError(f"settings: {e}" + ("" if e.__cause__ is None else f" ({e.__cause__})")
                          + "; lists and objects are given as JSON, e.g. FLEET_OUTPUT_ROOTS='[\"/data/out\"]'") from None
    finally:
        _FileSource.path = None


def inside(path: str, root: str) -> bool:
    """``path`` is ``root`` or lies below it; both resolved (absolute, normalised, no trailing
    separator but the file system root's): the rule of the allowed output roots, for the
    producer's check at enqueue and the worker's confinement of every sample. Plain string
    work: it runs for every sample, and Path.parents built a Path per level."""
    return path == root or path.startswith(root if root.endswith(os.sep) else root + os.sep)
