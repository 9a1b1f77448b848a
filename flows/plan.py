"""`plan` as a Prefect flow (a deployment of its own: the form in the UI is `PlanParams`): the
same plan as `crawl2model plan`, returned as a dict and shown as a markdown artifact."""

from __future__ import annotations

from prefect import flow
from prefect.logging import get_run_logger

from flows.stages import guarded
from tasks.lake import Lake
from tasks.plan import PlanParams, plan_markdown
from tasks.plan import plan as make_plan
from tasks.report import runtime


@flow(name="plan", log_prints=True, description="What curating and training on a whole crawl will cost, "
      "from its listing, one sampled file and the lake's measured runs.")
def plan(params: PlanParams, lake_url: str | None = None) -> dict:
    def work() -> dict:
        p = make_plan(Lake(lake_url), params, log=get_run_logger().info)
        runtime().markdown("crawl-plan", plan_markdown(p), f"plan for {p['crawl']} ({p['files']:,} WARC files)")
        return p

    return guarded(work, lake_url)
