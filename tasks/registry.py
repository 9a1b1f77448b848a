"""The stages, each declared once. Everything that lists stages is derived from this registry:
the pipeline's order and wiring (flows/pipeline.py), the CLI's `stage` commands and their
options (flows/cli.py), the Prefect flows (flows/stages.py) and the deployments (prefect.yaml,
deployments/serve.py). Adding a stage is one tasks/ module and one `Stage` record here.

A stage's inputs are declared where its parameters are: the `input_ref` fields of its
parameter model (tasks/stage.py) name the kinds it reads, the first being the default.

Stages from outside this package (an extension, a test's toy stage) are added by listing
their modules in $CRAWL2MODEL_PLUGINS (comma-separated); each module calls `register`.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Callable, Literal

from pydantic import Field, ValidationError, create_model, model_validator

from tasks import (conversations, dedup, download, filter as filter_, index, ingest, pretrain, probe, quality, sft,
                   shard, tokenizer)
from tasks.lake import Lake, Manifest
from tasks.stage import StageParams, Strict, input_kinds

PLUGINS_ENV = "CRAWL2MODEL_PLUGINS"


@dataclass(frozen=True)
class Stage:
    name: str                                    # the stage, its flow and the kind of artifact it writes
    params: type[StageParams]                    # its parameters: the flow's signature, the CLI's options, the UI form
    build: Callable[..., Manifest]               # build(lake, params, log) -> the committed (or cached) manifest
    summary: Callable[[dict], str]               # one line of key numbers from the manifest's metrics
    description: str                             # one line: CLI help, the deployment's description
    pool: Literal["data", "gpu"] = "data"        # the work pool its deployment runs on
    in_pipeline: bool = True                     # a step of `pipeline` (ingest is run by hand)
    details: Callable[[dict], tuple[str, list[dict]]] | None = None  # a table for the terminal after the summary
    comma_lists: tuple[str, ...] = field(default=())  # list options the CLI also accepts comma-separated

    @property
    def inputs(self) -> dict[str, tuple[str, ...]]:
        """{parameter: accepted kinds}; the first kind is the default and what the pipeline feeds."""
        return input_kinds(self.params)

    @property
    def flow_attribute(self) -> str:
        """Its flow's name in flows/stages.py (the deployment's entrypoint): the name as a Python identifier."""
        return self.name.replace("-", "_")

    def defaults(self) -> StageParams | None:
        """The parameters a run starts from; None when some have no default (ingest's files)."""
        try:
            return self.params()
        except ValidationError:
            return None

    def run(self, lake: Lake, params: StageParams, log: Callable[[str], None] = print) -> Manifest:
        return self.build(lake, params, log)


STAGES: dict[str, Stage] = {}


def register(stage: Stage) -> Stage:
    """Add a stage after those already registered (the pipeline runs them in this order)."""
    if stage.name in STAGES and STAGES[stage.name] != stage:
        raise ValueError(f"stage {stage.name!r} is registered twice")
    for name, kinds in stage.inputs.items():
        many = isinstance(stage.params.model_fields[name].default_factory, type)  # a list: empty by default
        if not many and kinds[0] not in STAGES and kinds[0] != stage.name:
            raise ValueError(f"stage {stage.name!r}: input {name!r} reads {kinds[0]!r}, which is not a stage "
                             "registered before it")
    STAGES[stage.name] = stage
    return stage


for _stage in [
    Stage("ingest", ingest.IngestParams, ingest.ingest_files, ingest.summary,
          "local files into the lake as one content-addressed artifact", in_pipeline=False),
    Stage("download", download.DownloadParams, download.download, download.summary,
          "Common Crawl WARC files into the lake, verified"),
    Stage("filter", filter_.FilterParams, filter_.filter_documents, filter_.summary,
          "WARC -> text -> FineWeb quality filters -> Parquet documents",
          details=lambda x: ("filter funnel", x["funnel"]), comma_lists=("languages",)),
    Stage("dedup", dedup.DedupParams, dedup.dedup_documents, dedup.summary,
          "exact and MinHash near-duplicate removal"),
    Stage("tokenizer", tokenizer.TokenizerParams, tokenizer.train_tokenizer, tokenizer.summary,
          "a lossless sentencepiece BPE tokenizer trained on the corpus"),
    Stage("shard", shard.ShardParams, shard.shard_documents, shard.summary,
          "the corpus tokenised into Parquet token shards"),
    Stage("pretrain", pretrain.PretrainParams, pretrain.pretrain, pretrain.summary,
          "a GPT trained with torchrun on a shard version", pool="gpu"),
    Stage("conversations", conversations.ConversationsParams, conversations.build_conversations,
          conversations.summary, "conversation files (messages, GSM8K, SGD) and generated sets, validated and split "
          "for post-training"),
    Stage("sft", sft.SftParams, sft.sft, sft.summary,
          "a model fine-tuned on conversations (the assistant's replies), with torchrun", pool="gpu"),
    Stage("index", index.IndexParams, index.build_index, index.summary,
          "a BM25 text index of the corpus, for chat --context", in_pipeline=False),
    Stage("probe", probe.ProbeParams, probe.probe, probe.summary,
          "questions a chat model can and cannot know: does it say it is not sure? (examples for the next sft)",
          pool="gpu", in_pipeline=False),
    Stage("quality-model", quality.QualityModelParams, quality.train_quality_model, quality.summary,
          "a fastText classifier of reference-like text (reference text vs the crawl's), for filter --quality-model",
          in_pipeline=False,
          details=lambda x: ("on the labelled set", [quality.table_row(r) for r in x.get("labelled") or []])),
]:
    register(_stage)

for _module in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
    importlib.import_module(_module)


def stage(name: str) -> Stage:
    return STAGES[name]


def pipeline_stages() -> list[Stage]:
    return [s for s in STAGES.values() if s.in_pipeline]


# The pipeline's parameters, derived from the stages above: no Prefect import, so a command
# validates them before it starts Prefect.
PIPELINE = tuple(s.name for s in pipeline_stages())
StageName = Literal[PIPELINE]  # type: ignore[valid-type]


class _Bounds(Strict):
    """Which stages to run; the stages' own parameters are added below, one group per stage."""

    from_stage: StageName = PIPELINE[0]
    to_stage: StageName = PIPELINE[-1]
    rebuild: list[StageName] = Field(default_factory=list)

    @model_validator(mode="after")
    def _order(self):
        if PIPELINE.index(self.from_stage) > PIPELINE.index(self.to_stage):
            raise ValueError(f"from_stage {self.from_stage!r} comes after to_stage {self.to_stage!r}")
        return self


PipelineParams = create_model("PipelineParams", __base__=_Bounds, __doc__="Every stage's parameters, grouped "
                              "per stage, and which stages to run.",
                              **{s.name: (s.params, s.defaults()) for s in pipeline_stages()})
