"""Stage `sft`: supervised fine-tuning of a trained model on a `conversations` version.

`torchrun -m model.train --conversations … --init-from …` (model/train.py's SFT mode: the base
model's shape, weights and tokenizer; one conversation a row, rendered by model/chat.py's template;
the loss on the assistant's tokens only), launched and recorded as `pretrain` is (tasks/pretrain.py):
the version's folder holds its checkpoints, so a rerun resumes, and `final/` (weights, config,
tokenizer) like a pretrain version's, so an `sft` version can be fine-tuned again or sampled.
"""

from __future__ import annotations

from typing import Callable, ClassVar

from pydantic import Field, create_model

from model.config import TrainConfig
from tasks.lake import Lake, Manifest, Production
from tasks.pretrain import TRAIN_FIELDS, launch_training, pydantic_fields, record_training
from tasks.stage import StageParams, input_ref, resolve_inputs, run_stage

CODE_VERSION = "sft/1"
# a fine-tuning round, not a pretraining run: fewer steps, a lower peak learning rate
SFT_DEFAULTS = {"max_steps": 100, "lr": 1e-4, "warmup_steps": 10, "eval_every": 25, "eval_steps": 4,
                "sample_every": 0, "checkpoint_every": 50}


class _Inputs(StageParams):
    model: str = input_ref("pretrain", "sft", description="the model to fine-tune: a pretrain or sft version "
                                                          "(a ref); default: pretrain@latest")
    conversations: str = input_ref("conversations")


class SftParams(create_model("_SftSettings", __base__=_Inputs, __module__=__name__,
                             **pydantic_fields(TrainConfig, SFT_DEFAULTS))):
    """The `sft` stage: the model and conversations to fine-tune on, every training setting of
    model/config.py's TrainConfig (they make the version; `preset` is the base model's, whatever
    is given), and the processes to launch (not part of the version)."""

    nproc_per_node: int = Field(1, ge=1, le=1024, description="training processes (GPUs)")
    timeout_s: float = Field(24 * 3600, gt=0, description="kill the training after this many seconds")
    nnodes: ClassVar[int] = 1  # one node (torchrun --standalone)
    rdzv_endpoint: ClassVar[str | None] = None

    def train_config(self) -> TrainConfig:
        return TrainConfig.from_dict(self.model_dump(include=set(TRAIN_FIELDS)))

    def recipe(self) -> dict:
        return self.model_dump(mode="json", include=set(TRAIN_FIELDS))


def sft(lake: Lake, params: SftParams, log: Callable[[str], None] = print) -> Manifest:
    inputs = resolve_inputs(lake, params)
    base, conversations = inputs["model"], inputs["conversations"]

    def build(prod: Production) -> None:
        args = ["--conversations", lake.uri(conversations.kind, conversations.version),
                "--init-from", lake.uri(base.kind, base.version, "final")]
        progress = launch_training(lake, params, base, prod.version, log, "launching", kind="sft", inputs=args)
        record_training(lake, prod, progress)
        prod.metrics["conversations"] = conversations.metrics.get("train")

    return run_stage(lake, "sft", params.recipe(), [base.ref, conversations.ref], CODE_VERSION, build,
                     rebuild=params.rebuild)


def summary(x: dict) -> str:
    """The version's key numbers, one line (the CLI, the pipeline's summary table)."""
    val = f", val loss {x['val_loss']}" if x.get("val_loss") is not None else ""
    return f"{x['steps']} steps on {x.get('conversations') or '?'} conversations, loss {x['final_loss']}{val}"
