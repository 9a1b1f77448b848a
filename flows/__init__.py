"""Prefect flows over tasks/: importing this package installs Prefect as the runtime the stages
report to (tasks/report.py), so every entry point (the CLI, deployments, a worker) gets it."""

from flows.runtime import PrefectRuntime, end_flow_runs_without_waiting_for_heartbeats
from tasks.report import set_runtime

set_runtime(PrefectRuntime())
end_flow_runs_without_waiting_for_heartbeats()
