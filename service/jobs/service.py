"""The fine-tuning part of the service as the HTTP layer sees it: the database, the file
store, the job supervisor, and how a trained adapter is published.

    fine_tuning = FineTuning(settings, state)     # in create_app; nothing touches disk yet
    fine_tuning.start()                           # lifespan: recover jobs if any exist
    fine_tuning.files / fine_tuning.manager       # opened on first use
    fine_tuning.close()                           # lifespan end: running jobs pause

The database (`<runtime>/ctxpeft.db`), `<runtime>/files/` and `<runtime>/jobs/` are created on
the first upload or job, not at start-up: a service that never fine-tunes writes nothing, and
tests that build many apps over one runtime folder do not each get a database.

Publishing goes through `engine.registry.add_version`, the call `POST /adapters/{name}/versions`
makes, with the same quota: a trained adapter passes exactly the checks an upload passes
(validation against the backbone, and whatever checks that call gains later).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.database import DATABASE_FILE, Database
from service.jobs.data import DataLimits
from service.jobs.files import FileStore
from service.jobs.manager import JobManager
from service.jobs.runner import JobRunner, MiB, ProcessRunner, WorkerLimits
from service.jobs.store import Job
from service.jobs.supervisor import JobsConfig, NotReady, PublishError
from service.settings import Settings
from service.usage import UsageRecord

if TYPE_CHECKING:
    from service.api.state import ServiceState

log = logging.getLogger(__name__)

RunnerFactory = Callable[[Settings], JobRunner]


def training_backbone(settings: Settings) -> str:
    """What a training process loads: `jobs_backbone`, else what `Engine.from_settings`
    loads (a preset's built folder under the runtime folder, else the setting itself)."""
    from adapters.backbone import BACKBONE_FILE
    from adapters.backbone_build import backbone_dir

    if settings.jobs_backbone:
        return settings.jobs_backbone
    built = backbone_dir(settings.runtime_dir, settings.backbone)
    if "/" not in settings.backbone and (built / BACKBONE_FILE).is_file():
        return str(built.resolve())
    return settings.backbone


def data_limits(settings: Settings) -> DataLimits:
    return DataLimits(
        max_examples=settings.files_max_examples,
        max_image_pixels=settings.max_image_pixels,
        max_image_side=settings.max_image_side,
        formats=frozenset(settings.allowed_image_formats),
        # A zip may unpack to 16 times its size (images compress little; JSON much).
        max_unzipped_bytes=16 * settings.files_max_bytes,
    )


class FineTuning:
    def __init__(
        self,
        settings: Settings,
        state: ServiceState,
        runner_factory: RunnerFactory | None = None,
    ) -> None:
        self.settings = settings
        self.state = state
        self.runner_factory = runner_factory or (lambda _settings: ProcessRunner())
        self.limits = data_limits(settings)
        self._lock = threading.Lock()
        self._db: Database | None = None
        self._files: FileStore | None = None
        self._manager: JobManager | None = None
        self._started = False
        self._closed = False

    @property
    def db_path(self) -> Path:
        return self.settings.runtime_dir / DATABASE_FILE

    # --- life cycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start supervising if a database exists (jobs may need recovering); otherwise the
        first upload or job opens it."""
        self._started = True
        if self.db_path.is_file():
            self.manager.start()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            manager, db = self._manager, self._db
        if manager is not None:
            manager.close()
        if db is not None:
            db.close()

    def _open(self) -> None:
        with self._lock:
            if self._manager is not None:
                return
            if self._closed:
                raise RuntimeError("the service is shutting down")
            runtime = self.settings.runtime_dir
            db = Database(self.db_path)
            files = FileStore(db, runtime / "files")
            self._manager = JobManager(
                db,
                files,
                runtime / "jobs",
                self._config(),
                self.runner_factory(self.settings),
                self._publish,
                self._fingerprint,
                self._model_names,
                self._count_training,
            )
            self._db, self._files = db, files
        if self._started:
            self._manager.start()

    @property
    def files(self) -> FileStore:
        self._open()
        assert self._files is not None
        return self._files

    @property
    def manager(self) -> JobManager:
        self._open()
        assert self._manager is not None
        return self._manager

    def _count_training(self, job: Job, tokens: int) -> None:
        """A job's trained tokens, in the usage ledger (once: see EventReader)."""
        if self.state.usage is not None:
            adapter = f"{job.tenant}/{job.adapter_name}"
            self.state.usage.record(
                UsageRecord(
                    job.tenant, adapter, f"job:{job.id}"[:32], "completed", training_tokens=tokens
                )
            )

    def _model_names(self) -> tuple[str, ...]:
        """What a job's `model` may be: the loaded backbone's name (GET /info), and the
        `backbone` setting (a preset name or the folder it was given as)."""
        names = [self.settings.backbone]
        engine = self.state.engine
        if engine is not None and engine.backbone.config.name not in names:
            names.insert(0, engine.backbone.config.name)
        return tuple(names)

    def _config(self) -> JobsConfig:
        settings = self.settings
        return JobsConfig(
            backbone=training_backbone(settings),
            model_names=(settings.backbone,),
            device=settings.jobs_device,
            max_running=settings.jobs_max_running,
            tenant_max_running=settings.jobs_tenant_max_running,
            tenant_max_queued=settings.jobs_tenant_max_queued,
            tenant_tokens_per_day=settings.jobs_tenant_tokens_per_day,
            max_restarts=settings.jobs_max_restarts,
            metrics_every=settings.jobs_metrics_every_steps,
            limits=WorkerLimits(
                threads=settings.jobs_threads,
                nice=settings.jobs_nice,
                sched_idle=settings.jobs_sched_idle,
                memory_bytes=settings.jobs_memory_limit_mb * MiB,
            ),
            data_limits=self.limits,
            shutdown_grace_s=min(10.0, max(1.0, settings.drain_timeout_s / 2)),
        )

    def collect_files(self) -> int:
        """Remove stored bytes no file and no unfinished job uses any more."""
        return self.files.collect(self.manager.jobs.active_shas())

    # --- what the supervisor needs from the engine ----------------------------------------------
    def _fingerprint(self) -> str | None:
        engine = self.state.engine
        registry: Any = engine.registry if engine is not None else None
        value = getattr(registry, "fingerprint", None)
        return value if isinstance(value, str) else None

    def _publish(self, tenant: str, name: str, config: bytes, weights: bytes) -> str:
        from adapters.format import AdapterFormatError
        from service.exceptions import AdapterUnservable, EngineError
        from service.store import QuotaExceeded, StoreQuota

        engine = self.state.engine
        if engine is None or not engine.alive:
            raise NotReady()
        registry = engine.registry
        if registry.store.versions(tenant, name):
            raise PublishError(
                "model_name_taken", f"the tenant already has an adapter named {name!r}"
            )
        settings = self.settings
        quota = StoreQuota(settings.tenant_max_adapters, settings.tenant_max_adapter_bytes)
        try:
            ref = registry.add_version(tenant, name, config, weights, quota)
        except AdapterFormatError as error:
            raise PublishError("invalid_adapter", str(error)) from None
        except QuotaExceeded as error:
            raise PublishError("quota_exceeded", str(error)) from None
        except AdapterUnservable as error:  # the servability probe (issue 20) refused it
            raise PublishError("adapter_unservable", str(error)) from None
        except EngineError as error:
            raise PublishError("publish_failed", str(error)) from None
        return ref.label

    def count_tokens(self) -> Callable[[str], int] | None:
        """Caption tokens of a text with the served backbone's tokenizer (None when no
        tokenizer is at hand)."""
        # Our own copy, loaded from the training backbone: the engine's tokenizer belongs to
        # its worker thread (a fast tokenizer used from two threads can raise "Already
        # borrowed"); the engine's only when there is no folder to load one from.
        tokenizer = self._saved_tokenizer()
        engine = self.state.engine
        if tokenizer is None and engine is not None:
            tokenizer = getattr(engine.backbone, "tokenizer", None)
        if tokenizer is None:
            return None

        def count(text: str) -> int:
            return len(tokenizer(text, add_special_tokens=False)["input_ids"])

        return count

    def _saved_tokenizer(self) -> Any:
        with self._lock:
            if not hasattr(self, "_tokenizer"):
                from adapters.backbone import load_tokenizer

                try:
                    self._tokenizer: Any = load_tokenizer(training_backbone(self.settings))
                except (OSError, ValueError) as error:
                    log.warning("no tokenizer to count training tokens with: %s", error)
                    self._tokenizer = None
            return self._tokenizer
