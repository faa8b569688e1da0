"""Request and response models of `/v1/files` and `/v1/fine_tuning/jobs`, field for field
the objects of the official `openai` SDK (`openai.types.FileObject`,
`openai.types.fine_tuning.FineTuningJob`, `FineTuningJobEvent`, `FineTuningJobCheckpoint`),
plus documented extension fields (`training_data` on a file; `adapter` and `paused_at` on a
job), which the SDK keeps as extra attributes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

FilePurpose = Literal[
    "assistants",
    "assistants_output",
    "batch",
    "batch_output",
    "fine-tune",
    "fine-tune-results",
    "vision",
    "user_data",
]
ACCEPTED_PURPOSE = "fine-tune"  # the one purpose this service keeps files for
JobStatus = Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]


# --- files --------------------------------------------------------------------------------------
class TrainingDataSummary(BaseModel):
    """Extension: what validation found in a fine-tuning file."""

    format: str = Field(description="openai_chat, jsonl, zip_coco or zip_jsonl.")
    examples: int = Field(description="Image-caption pairs.")
    images: int = Field(description="Distinct images.")
    tokens_per_epoch: int | None = Field(
        description="Caption tokens + 1 (the end token) per example, summed: one epoch's "
        "training tokens."
    )
    warnings: list[str]


class FileObject(BaseModel):
    id: str
    bytes: int
    created_at: int
    filename: str
    object: Literal["file"] = "file"
    purpose: FilePurpose
    status: Literal["uploaded", "processed", "error"] = "processed"
    expires_at: int | None = None
    status_details: str | None = None
    training_data: TrainingDataSummary | None = Field(
        default=None, description="Extension: what validation found (fine-tune files)."
    )


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


# --- jobs: request ------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


AutoInt = Literal["auto"] | Annotated[int, Field(ge=1)]


class Hyperparameters(_Strict):
    n_epochs: Literal["auto"] | Annotated[int, Field(ge=1, le=100)] = "auto"
    batch_size: Literal["auto"] | Annotated[int, Field(ge=1, le=256)] = "auto"
    learning_rate_multiplier: Literal["auto"] | Annotated[float, Field(gt=0, le=100)] = "auto"


class SupervisedMethod(_Strict):
    hyperparameters: Hyperparameters | None = None


class Method(_Strict):
    type: Literal["supervised"] = Field(
        description="Only `supervised` (captioning pairs) is offered; dpo and reinforcement "
        "are refused."
    )
    supervised: SupervisedMethod | None = None


class AdapterChoice(_Strict):
    """Extension: which Context-PEFT adapter the job trains (defaults in brackets)."""

    method: Literal["lora", "ia3", "bitfit"] = Field(default="lora", description="[lora]")
    contexts: Literal["specific", "agnostic"] = Field(
        default="specific",
        description="[specific] one parameter set per context (image, text); agnostic: one.",
    )
    rank: int = Field(default=8, ge=1, le=64, description="[8] LoRA rank.")
    alpha: float | None = Field(default=None, gt=0, description="[= rank] LoRA alpha.")
    targets: Literal["attn", "ffn", "all"] | list[str] = Field(
        default="all", description="[all] attn, ffn, all, or module names."
    )


class JobCreate(_Strict):
    model: str = Field(description="The backbone being served (GET /info `backbone`).")
    training_file: str
    validation_file: str | None = None
    suffix: str | None = Field(
        default=None, description="Up to 40 of a-z, 0-9, '_', '-': part of the model's name."
    )
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = None
    method: Method | None = None
    hyperparameters: Hyperparameters | None = Field(
        default=None, description="Deprecated by OpenAI in favour of method.supervised."
    )
    integrations: list[Any] | None = Field(default=None, description="Must be empty.")
    adapter: AdapterChoice | None = Field(
        default=None, description="Extension: the adapter to train (method, rank, ...)."
    )

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return None
        if len(value) > 16:
            raise ValueError("at most 16 metadata keys")
        for key, item in value.items():
            if len(key) > 64 or len(item) > 512:
                raise ValueError("metadata keys are at most 64 characters, values 512")
        return value

    @field_validator("integrations")
    @classmethod
    def _no_integrations(cls, value: list[Any] | None) -> list[Any] | None:
        if value:
            raise ValueError("integrations (wandb) are not offered by this service")
        return value


# --- jobs: responses ----------------------------------------------------------------------------
class JobErrorOut(BaseModel):
    code: str
    message: str
    param: str | None = None


class HyperparametersOut(BaseModel):
    batch_size: Literal["auto"] | int | None = None
    learning_rate_multiplier: Literal["auto"] | float | None = None
    n_epochs: Literal["auto"] | int | None = None


class SupervisedOut(BaseModel):
    hyperparameters: HyperparametersOut | None = None


class MethodOut(BaseModel):
    type: Literal["supervised"] = "supervised"
    supervised: SupervisedOut | None = None


class FineTuningJob(BaseModel):
    id: str
    created_at: int
    error: JobErrorOut | None = None
    fine_tuned_model: str | None = None
    finished_at: int | None = None
    hyperparameters: HyperparametersOut
    model: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    organization_id: str = Field(description="The owning tenant.")
    result_files: list[str] = Field(default_factory=list)
    seed: int
    status: JobStatus
    trained_tokens: int | None = None
    training_file: str
    validation_file: str | None = None
    estimated_finish: int | None = None
    integrations: list[Any] | None = None
    metadata: dict[str, str] | None = None
    method: MethodOut | None = None
    adapter: AdapterChoice = Field(description="Extension: the adapter this job trains.")
    paused_at: int | None = Field(
        default=None,
        description="Extension: set while the job is paused (its status is then `queued`).",
    )


class FineTuningJobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJob]
    has_more: bool


class FineTuningJobEvent(BaseModel):
    id: str
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    data: dict[str, Any] | None = None
    type: Literal["message", "metrics"] | None = None


class FineTuningJobEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJobEvent]
    has_more: bool


class CheckpointMetrics(BaseModel):
    full_valid_loss: float | None = None
    full_valid_mean_token_accuracy: float | None = None
    step: float | None = None
    train_loss: float | None = None
    train_mean_token_accuracy: float | None = None
    valid_loss: float | None = None
    valid_mean_token_accuracy: float | None = None


class FineTuningJobCheckpoint(BaseModel):
    id: str
    created_at: int
    fine_tuned_model_checkpoint: str = Field(
        description="A label of this checkpoint (not a served model: only the job's best "
        "epoch is published, as fine_tuned_model)."
    )
    fine_tuning_job_id: str
    metrics: CheckpointMetrics
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    step_number: int


class FineTuningJobCheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJobCheckpoint]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None
