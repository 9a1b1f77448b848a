"""The deployments, derived from the stage registry: one per stage (on the stage's work pool)
plus the pipeline, on demand and weekly, and `plan`. `prefect.yaml` at the root (Prefect's convention) is
written from this by `python -m deployments.spec`; a test fails when the file is stale.
deployments/serve.py serves the same list without workers."""

from __future__ import annotations

import sys
from pathlib import Path

from tasks.registry import STAGES

PREFECT_YAML = Path(__file__).resolve().parents[1] / "prefect.yaml"
POOLS = {"data": "crawl2model-process", "gpu": "crawl2model-gpu"}
WEEKLY = {"cron": "0 3 * * 1", "timezone": "UTC"}
WEEKLY_PARAMETERS = {"params": {"download": {"crawl": "latest", "segments": 4}}}


def deployments() -> list[dict]:
    """name, flow (a flows/ entrypoint), description, work pool and, for the schedule, its
    parameters: every deployment crawl2model ships."""
    pipeline = "flows/pipeline.py:pipeline"
    return [
        {"name": "weekly", "entrypoint": pipeline, "pool": "gpu", "tags": ["pipeline"],
         "description": "The whole pipeline on the newest crawl, every Monday at 03:00 UTC.",
         "parameters": WEEKLY_PARAMETERS, "schedule": WEEKLY},
        {"name": "pipeline", "entrypoint": pipeline, "pool": "gpu", "tags": ["pipeline"],
         "description": "The whole pipeline, every stage's parameters in one form."},
        *({"name": s.name, "entrypoint": f"flows/stages.py:{s.flow_attribute}", "pool": s.pool, "tags": ["stage"],
           "description": s.description[:1].upper() + s.description[1:] + "."} for s in STAGES.values()),
        {"name": "plan", "entrypoint": "flows/plan.py:plan", "pool": "data", "tags": ["plan"],
         "description": "What a whole crawl will cost (crawl2model plan), as a markdown artifact."},
    ]


HEADER = """\
# Written by `python -m deployments.spec` from the stage registry (tasks/registry.py): do not
# edit by hand; a test fails when this file is stale.
# `prefect deploy --all` against a running server creates the deployments (create the work
# pools first: `prefect work-pool create crawl2model-process --type process` and
# `prefect work-pool create crawl2model-gpu --type process`, then start a worker per pool on
# the right machines: `prefect worker start --pool crawl2model-gpu` on a GPU box).
# deployments/serve.py serves the same flows without workers (`make server`).
name: crawl2model
prefect-version: 3.9.1

pull:
  - prefect.deployments.steps.set_working_directory:
      directory: "{{ $CRAWL2MODEL_HOME }}"

definitions:
  work_pools:
    data: &data
      name: crawl2model-process
    gpu: &gpu
      name: crawl2model-gpu

deployments:
"""


def render() -> str:
    import json

    lines = [HEADER.rstrip("\n")]
    for d in deployments():
        lines += [f"  - name: {d['name']}", f"    entrypoint: {d['entrypoint']}",
                  f"    description: {json.dumps(d['description'])}", f"    tags: {json.dumps(d['tags'])}"]
        if "parameters" in d:
            lines.append(f"    parameters: {json.dumps(d['parameters'])}")
        if "schedule" in d:
            lines += ["    schedules:", f"      - cron: {json.dumps(d['schedule']['cron'])}",
                      f"        timezone: {d['schedule']['timezone']}"]
        lines.append(f"    work_pool: *{d['pool']}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = render()
    if argv == ["--check"]:
        if PREFECT_YAML.read_text() != text:
            print(f"error: {PREFECT_YAML} is stale: run `python -m deployments.spec`", file=sys.stderr)
            return 1
        return 0
    PREFECT_YAML.write_text(text)
    print(f"wrote {PREFECT_YAML} ({len(deployments())} deployments)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
