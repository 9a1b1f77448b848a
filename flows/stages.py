"""One Prefect flow per registered stage (tasks/registry.py), made from its record: the flow's
name is the stage's, its parameters are the stage's model (the form in the Prefect UI) and the
lake URL, and it returns the ref of the version it committed or found. Deployments name them
as `flows/stages.py:<stage>`.

A failure the user can act on (tasks/errors.py: a StageError, a lake error, storage that gave
up) ends the flow run in a Failed state whose message is the one `error: ...` line, with no
traceback in the run's log; anything else is a bug and propagates with its traceback.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from prefect import Flow, flow
from prefect.logging import get_run_logger
from prefect.states import Failed, State

from common.process import is_storage_error, one_line
from flows.runtime import (ask_each_server_once_whether_it_uses_csrf_tokens,
                           end_flow_runs_without_waiting_for_heartbeats)
from tasks.errors import StageError
from tasks.lake import Lake
from tasks.registry import STAGES, Stage


def user_error(e: BaseException, lake_url: str | None) -> StageError | None:
    """The exception as a user's error (a StageError), or None when it is a bug."""
    if isinstance(e, StageError):
        return e
    if is_storage_error(e):  # storage gave up after its retries: an S3 outage, a full disk
        return StageError(f"storage error in lake {lake_url or Lake().url}: {type(e).__name__}: {one_line(e)} "
                          "(no partial version was committed; rerun the same command to resume)")
    return None


def failed(e: StageError) -> State:
    """The Failed state of a user's error: its message is the one line the terminal shows."""
    return Failed(message=f"error: {one_line(e)}", data=e)


def guarded(work: Callable[[], Any], lake_url: str | None) -> Any:
    """work(), or the Failed state of the user's error it raised."""
    try:
        return work()
    except Exception as e:
        err = user_error(e, lake_url)
        if err is None:
            raise
        get_run_logger().error("error: %s", one_line(err))
        return failed(err)


def make_flow(stage: Stage) -> Flow:
    def run(params, lake_url=None):
        log = get_run_logger()
        return guarded(lambda: stage.run(Lake(lake_url), params, log=log.info).ref, lake_url)

    # The signature Prefect reads for the parameter schema (the UI form) and validation.
    defaults = stage.defaults()
    run.__signature__ = inspect.Signature([
        inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=stage.params,
                          default=inspect.Parameter.empty if defaults is None else defaults),
        inspect.Parameter("lake_url", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                          annotation=str | None)], return_annotation=str)
    run.__annotations__ = {"params": stage.params, "lake_url": str | None, "return": str}
    run.__name__ = run.__qualname__ = stage.name
    run.__module__ = __name__
    run.__doc__ = f"Stage `{stage.name}`: {stage.description}. Returns the ref of the committed version."
    return flow(name=stage.name, log_prints=True, description=stage.description)(run)


end_flow_runs_without_waiting_for_heartbeats()  # here, not in flows/__init__: a refused command imports no engine
ask_each_server_once_whether_it_uses_csrf_tokens()
FLOWS: dict[str, Flow] = {name: make_flow(s) for name, s in STAGES.items()}
# entrypoints: flows/stages.py:download, flows/stages.py:filter, ..., flows/stages.py:quality_model
globals().update({STAGES[name].flow_attribute: f for name, f in FLOWS.items()})


def outcome(state: State) -> Any:
    """A flow run's result; a user's error raised again as itself (its exit status with it)."""
    if state.is_failed():
        err = state.result(raise_on_failure=False)
        if isinstance(err, BaseException):
            raise err
        raise StageError((state.message or "the run failed").removeprefix("error: "))
    return state.result()
