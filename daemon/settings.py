"""Runtime settings of the daemon (`kmd run --config FILE`): where things are, not what to trust.

What to trust, how to verify and probe, and which backend to use live in the policy file;
this file says which model to load, where state and the ledger live, how the API is
exposed and how often the jobs run. YAML with a strict schema: unknown keys and bad values
are errors naming the file, line and key. Secrets never go in this file: the API token
comes from an environment variable or a file (systemd `EnvironmentFile=`, a Kubernetes
Secret).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from kmd.common.config import Duration, StrictModel, load_yaml_model
from kmd.daemon.db import default_head_file

__all__ = ["ApiSettings", "Budget", "Budgets", "ClusterSettings", "DaemonSettings", "ModelConfig", "ScheduleSettings", "load_settings"]


class ModelConfig(StrictModel):
    model: str = "embedded"  # "embedded", a Hugging Face id, or a local directory
    device: str = "auto"
    dtype: str = "auto"
    use_chat_template: bool = False
    profile: str | None = None
    offline: bool | None = None  # None: follow HF_HUB_OFFLINE


class Budget(StrictModel):
    """One kind of caller's share of generation (docs/daemon.md, "Serving")."""

    concurrent: int = Field(ge=0)  # requests decoding at once (0: this caller may not generate)
    queued: int = Field(ge=0)  # requests waiting to start; one more gets 429 with Retry-After
    max_tokens: int = Field(ge=1, le=256)  # new tokens one request may ask for


class Budgets(StrictModel):
    token: Budget = Budget(concurrent=16, queued=64, max_tokens=256)  # callers with the API token
    anonymous: Budget = Budget(concurrent=8, queued=16, max_tokens=64)  # everyone else


class ApiSettings(StrictModel):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)  # 0: pick a free port (tests)
    token_env: str = "KMD_API_TOKEN"  # bearer token for write endpoints, from this variable
    token_file: str | None = None  # ... or from this file (first line)
    protect_reads: bool = False  # reads need the token too
    max_body_bytes: int = Field(default=1_000_000, ge=1024)  # larger request bodies: 413, before auth
    # Generation (one serving engine for every route): requests decode together, joining and
    # leaving the running batch at any step; at most `max_batch` rows at once, and at most
    # `max_prefill_tokens` prompt tokens start per step (a long prefill stalls running rows).
    max_batch: int = Field(default=16, ge=1, le=256)
    max_prefill_tokens: int = Field(default=512, ge=1)
    budgets: Budgets = Budgets()  # per caller: concurrent, queued, max_tokens


class ScheduleSettings(StrictModel):
    edit_interval: Duration = 60.0  # apply verified facts this often
    regression_interval: Duration = 3600.0  # full locality regression probe
    misfire_grace: Duration = 300.0  # a run late by more than this after downtime is skipped
    max_edits_per_cycle: int = Field(default=50, ge=1)
    # New facts ready together are applied and probed in batches of up to this many edits
    # (one probe of all of them, culprits bisected out); 1: one edit at a time.
    edit_batch: int = Field(default=50, ge=1)
    watchdog: bool = True  # ping systemd's watchdog when WATCHDOG_USEC is set


class ClusterSettings(StrictModel):
    """Several processes on one ledger (docs/daemon.md, "Scale-out")."""

    role: Literal["writer", "replica"] = "writer"  # replica: serve the published state, never edit
    publish_dir: str | None = None  # shared directory for published states (writer writes, replicas read)
    poll_interval: Duration = 2.0  # standby writer: try the lock; replica: look for a new state
    keepalive: Duration = 5.0  # writer: confirm it still holds the PostgreSQL lock this often
    lock_key: int = Field(default=0x6B6D642D777269, ge=-(2**63), lt=2**63)  # advisory lock id
    keep_published: int = Field(default=5, ge=1)  # published versions kept on disk
    smoke_edits: int = Field(default=2, ge=0)  # replica: edits (and reverted edits) probed per load

    @model_validator(mode="after")
    def _replica_needs_states(self) -> ClusterSettings:
        if self.role == "replica" and not self.publish_dir:
            raise ValueError("role replica needs publish_dir: the directory the writer publishes states to")
        return self


class DaemonSettings(StrictModel):
    policy: str  # path to the policy YAML
    state_dir: str = "state"  # editor state, locality baseline, default SQLite ledger
    database: str | None = None  # SQLAlchemy URL; default: $KMD_DB_URL or sqlite in state_dir
    model: ModelConfig = ModelConfig()
    api: ApiSettings = ApiSettings()
    schedule: ScheduleSettings = ScheduleSettings()
    cluster: ClusterSettings = ClusterSettings()

    _base: Path = Path(".")

    def path(self, value: str) -> Path:
        """Relative paths in the file are relative to the file's own directory."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self._base / p)

    @property
    def state_path(self) -> Path:
        return self.path(self.state_dir)

    @property
    def policy_path(self) -> Path:
        return self.path(self.policy)

    @property
    def publish_path(self) -> Path | None:
        return self.path(self.cluster.publish_dir) if self.cluster.publish_dir else None

    @property
    def database_url(self) -> str:
        return self.database or os.environ.get("KMD_DB_URL") or f"sqlite:///{self.state_path / 'ledger.db'}"

    @property
    def head_file_path(self) -> Path | None:
        """Where the ledger's chain head is kept outside the database (next to a SQLite
        file, else in the state directory): `kmd verify-chain` compares it by default."""
        return default_head_file(self.database_url, self.state_path)

    def api_token(self) -> str | None:
        if self.api.token_file:
            text = self.path(self.api.token_file).read_text().strip().splitlines()
            return text[0].strip() if text else None
        return os.environ.get(self.api.token_env) or None


def load_settings(path: str | Path) -> DaemonSettings:
    path = Path(path)
    settings = load_yaml_model(path, DaemonSettings)
    settings._base = path.resolve().parent
    return settings
