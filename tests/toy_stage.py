"""A stage added through the registry alone (CRAWL2MODEL_PLUGINS=tests.toy_stage): the tests
run it through the CLI, the pipeline and a deployment without touching anything else."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.errors import StageError
from tasks.lake import Lake, Manifest, Production
from tasks.registry import Stage, register
from tasks.stage import StageParams, run_stage


class ToyError(StageError):
    pass


class ToyParams(StageParams):
    words: int = Field(3, ge=1, le=1000, description="how many words to write")
    fail: Literal["no", "user", "bug"] = Field("no", description="fail on purpose: a user's error or a bug")

    def recipe(self) -> dict:
        return self.model_dump(mode="json", exclude={"rebuild"})


def build_toy(lake: Lake, params: ToyParams, log=print) -> Manifest:
    def build(prod: Production) -> None:
        if params.fail == "user":
            raise ToyError(f"toy: {params.words} words are not enough for anyone")
        with prod.open("words.txt") as f:
            f.write(" ".join(["toy"] * params.words).encode())
            if params.fail == "bug":
                {}["no such key"]  # a bug inside a lake write: must surface as itself
        prod.metrics["words"] = params.words

    return run_stage(lake, "toy", params.recipe(), [], "toy/1", build, rebuild=params.rebuild)


register(Stage("toy", ToyParams, build_toy, lambda x: f"{x['words']} words", "a toy stage for the tests"))
