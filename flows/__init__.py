"""Prefect flows over tasks/: importing this package installs Prefect as the runtime the stages
report to (tasks/report.py), so every entry point (the CLI, deployments, a worker) gets it."""

from flows.runtime import PrefectRuntime
from tasks.report import set_runtime

set_runtime(PrefectRuntime())
