"""Where a data stage's parallel work runs: this machine's processes (`executor: local`, the
default) or a Ray cluster (`executor: ray`), for download, filter, dedup and shard.

On Ray, datatrove's tasks run through `RayExecutor` (datatrove's `RayPipelineExecutor` with a run
loop of our own, below) and the other stages' work as Ray tasks (`ray_map`). The executor is not
part of a version: a stage commits the same files wherever it ran.

Workers share data through the lake. Before any work, `ray_cluster` runs a probe on every node of
the cluster: each must see the lake (a local-folder lake works only when every node sees the folder)
and run the same crawl2model code as this process; otherwise the stage stops with one line naming
the node. Workers get the lake's filesystem (credentials and all, from the environment or the
Prefect Secret block) with the work they are sent, and this process's `AWS_*`, `CRAWL2MODEL_*` and
`HF_*` variables. When the stage stops (finished, failed, cancelled, killed) its Ray tasks stop
too: pending ones are cancelled, and Ray ends a dead driver's tasks itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Callable, ClassVar, Iterable, Iterator, Literal

from datatrove.executor.ray import RayPipelineExecutor
from datatrove.executor.slurm import SlurmPipelineExecutor
from pydantic import Field, model_validator

from common.process import own_cpu_seconds, report_worker_cpu
from tasks.errors import BadInput, StageError
from tasks.lake import Lake
from tasks.stage import Strict, TaskDied

RAY_ADDRESS_ENV = "RAY_ADDRESS"
LOCAL = "local"  # --ray-address local: start a Ray instance on this machine (loopback only)
RETRIES = 2  # a task whose Ray worker dies is run again this many times before the stage fails
FORWARDED_ENV = ("AWS_", "CRAWL2MODEL_", "HF_")


class ExecutorParams(Strict):
    """Where the work runs: a field group of every data stage's parameters (not part of a version)."""

    executor: Literal["local", "ray"] = Field(
        "local", description="where the work runs: this machine's processes, or the Ray cluster at ray_address "
        "(not part of the version)")
    ray_address: str | None = Field(
        None, description=f"the Ray cluster to join (host:port of its head, or ray://...); 'local' starts one "
        f"on this machine; default ${RAY_ADDRESS_ENV}")

    NOT_IN_VERSION: ClassVar[frozenset[str]] = frozenset({"executor", "ray_address"})

    @model_validator(mode="after")
    def _ray_address(self):
        if self.executor == "ray" and not (self.ray_address or os.environ.get(RAY_ADDRESS_ENV)):
            raise ValueError(f"executor 'ray' needs a cluster: set ${RAY_ADDRESS_ENV} or ray_address "
                             "(host:port of its head, or 'local' to start one on this machine)")
        if self.executor != "ray" and self.ray_address:
            raise ValueError(f"ray_address is for executor 'ray' (this run's executor is {self.executor!r})")
        return self


class DatatroveExecutorParams(ExecutorParams):
    """The executors of a stage made of datatrove pipelines (filter, dedup): also Slurm."""

    executor: Literal["local", "ray", "slurm"] = Field(
        "local", description="where the work runs: this machine's processes, the Ray cluster at ray_address, or "
        "Slurm jobs (sbatch; not part of the version)")
    slurm_partition: str | None = Field(None, description="the Slurm partition of its jobs (default: the "
                                        "cluster's default partition)")
    slurm_time: str = Field("24:00:00", pattern=r"^(\d+-)?\d+(:\d{2}){0,2}$",
                            description="the time limit of one datatrove task's Slurm job, [D-]HH:MM:SS")

    NOT_IN_VERSION: ClassVar[frozenset[str]] = frozenset({"executor", "ray_address", "slurm_partition", "slurm_time"})

    @model_validator(mode="after")
    def _slurm(self):
        if self.executor == "slurm" and shutil.which("sbatch") is None:
            raise ValueError("executor 'slurm' needs Slurm's sbatch on PATH (and SLURM_CONF, or /etc/slurm, "
                             "describing the cluster)")
        if self.executor != "slurm" and self.slurm_partition:
            raise ValueError(f"slurm_partition is for executor 'slurm' (this run's executor is {self.executor!r})")
        return self


# --------------------------------------------------------------------------- joining a cluster


def _code_digest() -> str:
    """What this process's crawl2model code is: a hash of the tasks/ and common/ sources. Every
    Ray node must run the same code, or a stage would commit files another version wrote."""
    import common
    import tasks

    h = hashlib.sha256()
    for pkg in (tasks, common):
        root = Path(pkg.__file__).parent
        for f in sorted(root.rglob("*.py")):
            h.update(str(f.relative_to(root.parent)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def _probe_node(lake: Lake, probe: str) -> dict:
    """Run on one node: can it see the lake (the file the driver just wrote there), and which code
    does it run."""
    try:
        sees = lake.fs.exists(probe)
    except Exception:  # an unreachable S3 endpoint, say: the node cannot see the lake
        sees = False
    return {"host": socket.gethostname(), "sees_lake": sees, "code": _code_digest()}


def _check_reachable(address: str) -> None:
    """A head that does not answer is one line now, not a minute of Ray's own retries."""
    if "://" in address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
    except (OSError, ValueError) as e:
        raise BadInput(f"invalid ray_address {address!r}: no Ray head answers there ({e})") from None


@contextlib.contextmanager
def ray_cluster(params: ExecutorParams, lake: Lake) -> Iterator[bool]:
    """Join the stage's Ray cluster for the `with` block (yields True), or do nothing for the local
    executor (yields False). Checks every node before any work (see the module's docstring)."""
    if params.executor != "ray":
        yield False
        return
    address = params.ray_address or os.environ[RAY_ADDRESS_ENV]
    if address == LOCAL or address.rpartition(":")[0] in ("127.0.0.1", "localhost"):
        # A cluster on this machine's loopback. Ray takes 127.0.0.1 for "this machine" and swaps in
        # the address of its network interface, where a loopback-only cluster is not, unless
        # this is set (read when ray is first imported): then it stays on loopback, and a Ray it
        # starts binds its daemons there instead of on every interface.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if address != LOCAL:
        _check_reachable(address)
    import ray

    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}
    owned = not ray.is_initialized()
    if owned:
        kwargs = dict(include_dashboard=False, _node_ip_address="127.0.0.1") if address == LOCAL else {}
        try:
            ray.init(address=None if address == LOCAL else address, runtime_env={"env_vars": env},
                     log_to_driver=False, logging_level=logging.WARNING, configure_logging=False, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise StageError(f"cannot join the Ray cluster at {address}: {str(e).splitlines()[0]}") from None
    try:
        nodes = _check_nodes(lake)
        from tasks.report import runtime

        log = runtime().logger()
        log.info("on the Ray cluster at %s: %d node(s), %d CPUs, each sees the lake", address,
                 len(nodes), int(sum(n["Resources"].get("CPU", 0) for n in nodes)))
        _TASKS_ON.clear()
        yield True
        log.info("%d Ray task(s) ran on %d node(s)", sum(_TASKS_ON.values()), len(_TASKS_ON))
    finally:
        if owned:
            ray.shutdown()


def _check_nodes(lake: Lake) -> list[dict]:
    """Every live node of the cluster sees the lake and runs this code; returns them (`ray.nodes()`)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n["Alive"]]
    probe = lake.write_probe()
    try:
        probe_task = ray.remote(_probe_node)
        found = ray.get([probe_task.options(num_cpus=0, max_retries=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
                         n["NodeID"], soft=False)).remote(lake, probe) for n in nodes], timeout=120)
    finally:
        lake.remove_probe(probe)
    mine = _code_digest()
    for node, seen in zip(nodes, found):
        where = f"Ray node {node['NodeManagerAddress']} ({seen['host']}, node id {node['NodeID'][:12]})"
        if not seen["sees_lake"]:
            raise BadInput(f"{where} cannot see the lake {lake.url}: with executor 'ray' every node works in "
                           "the lake, so it must be on S3 or in a folder every node mounts at the same path")
        if seen["code"] != mine:
            raise BadInput(f"{where} runs other crawl2model code than this process (code {seen['code']} there, "
                           f"{mine} here): install the same version on every node")
    return nodes


# --------------------------------------------------------------------------- running work on it


def _reraise(e: BaseException, what: str) -> None:
    """A Ray error as the stage reports it: the task's own exception (a StageError stays one
    line), or one line for a worker that died more often than Ray retries it."""
    import ray.exceptions as rx

    if isinstance(e, rx.RayTaskError):
        from multiprocess.pool import RemoteTraceback

        raise e.cause from RemoteTraceback(str(e))
    if isinstance(e, rx.RayError):
        raise TaskDied(f"{what}: {type(e).__name__} ({str(e).splitlines()[0] if str(e) else 'no detail'}) "
                       f"after {RETRIES} retries; the tasks that finished are kept, rerun to resume") from None
    raise e


def _timed(fn: Callable, *args):
    """Run on a Ray worker: the call's result, the CPU seconds it took there and the node."""
    import ray

    cpu = own_cpu_seconds()
    out = fn(*args)
    return out, own_cpu_seconds() - cpu, ray.get_runtime_context().get_node_id()


_TASKS_ON: Counter = Counter()  # node id -> tasks of this stage that ran there (logged at its end)


def ray_map(fn: Callable, calls: Iterable[tuple], what: str, window: int | None = None,
            num_cpus: float = 1) -> Iterator:
    """`fn(*call)` for every call as Ray tasks, results yielded in the order of the calls, at most
    `window` in flight (default: twice the cluster's CPUs). A task whose worker dies is retried
    (`RETRIES`); the CPU each task spent is added to the stage's. Pending tasks are cancelled
    when the caller stops early or fails."""
    import ray
    from collections import deque

    remote = ray.remote(_timed).options(num_cpus=num_cpus, max_retries=RETRIES, retry_exceptions=False)
    window = window or max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    fn_ref = ray.put(fn)
    pending: deque = deque()
    try:
        for args in calls:
            pending.append(remote.remote(fn_ref, *args))
            if len(pending) >= window:
                yield _result(pending.popleft(), what)
        while pending:
            yield _result(pending.popleft(), what)
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)


def _result(ref, what: str):
    import ray

    try:
        out, cpu, node = ray.get(ref)
    except Exception as e:
        _reraise(e, what)
    report_worker_cpu(cpu)
    _TASKS_ON[node] += 1
    return out


def _run_rank(executor: "RayExecutor", rank: int) -> None:
    executor._run_for_rank(rank)


class RayExecutor(RayPipelineExecutor):
    """datatrove's `RayPipelineExecutor` with a run loop of our own, as `FailFastExecutor` is its
    local one. datatrove 0.10.1's loop runs each rank in a process pool inside a Ray actor (a
    pool child killed by the out-of-memory killer hangs it for good), returns normally when ranks
    failed ("Only X/Y tasks completed") and polls every 10 s. Here each rank is one Ray task in a
    Ray worker process: Ray retries it when that process dies, a rank that still fails fails the
    run with one line, and the run ends only when datatrove's completion markers say every rank
    is done."""

    def __init__(self, pipeline: list, tasks: int, logging_dir, skip_completed: bool = True):
        # Ray's own scheduler keeps the cluster's CPUs busy: no memory reservation (datatrove's
        # default, 2 GB a task, would idle CPUs on a small node) and no cap on tasks in flight
        from datatrove.utils.logging import logger

        logger.disable("datatrove.executor.ray")  # its warning that a local logging_dir must be shared:
        try:  # `ray_cluster` checked that every node sees the lake
            super().__init__(pipeline, tasks=tasks, logging_dir=logging_dir, skip_completed=skip_completed,
                             mem_per_cpu_gb=0)
        finally:
            logger.enable("datatrove.executor.ray")

    def run(self):
        from datatrove.utils.logging import logger

        ranks = self.get_incomplete_ranks(range(self.tasks))
        if not ranks:
            logger.info(f"Not doing anything as all {self.tasks} tasks have already been completed.")
            return
        if len(ranks) < self.tasks:
            logger.info(f"Skipping {self.tasks - len(ranks)} already completed tasks")
        self.save_executor_as_json()
        import ray

        me = ray.put(self)  # sent once; each task gets its own copy of the pipeline
        for _ in ray_map(_run_rank, ((me, rank) for rank in ranks), f"datatrove task of {self.tasks}",
                         window=len(ranks), num_cpus=self.cpus_per_task):
            pass
        missing = self.get_incomplete_ranks(range(self.tasks))
        if missing:  # a task that returned without its marker: never commit on it
            raise TaskDied(f"datatrove tasks {missing[:5]} of {self.tasks} left no completion marker; rerun to resume")


class SlurmExecutor(SlurmPipelineExecutor):
    """datatrove's `SlurmPipelineExecutor`, waited for: it submits the unfinished ranks as a Slurm
    job array (each task runs `launch_pickled_pipeline` on a node, in this Python environment)
    and, unlike datatrove's, returns only when the job has left the queue, failing with one line
    when a rank did not finish. Stopping the stage cancels the job; a rerun first cancels the job
    of an earlier run that was killed (its id is kept in the logging folder), then resumes. Each
    task writes the CPU seconds it spent next to its completion marker, for the manifest."""

    def __init__(self, pipeline: list, tasks: int, logging_dir, partition: str | None, time: str):
        partition = partition or _default_partition()
        activate = os.path.join(sys.prefix, "bin", "activate")
        super().__init__(pipeline, tasks=tasks, time=time, partition=partition, logging_dir=logging_dir,
                         job_name=f"crawl2model-{uuid.uuid4().hex[:8]}", with_srun=False, requeue=False,
                         mail_type="NONE", qos="", venv_path=activate if os.path.exists(activate) else None,
                         skip_completed=True)

    def launch_merge_stats(self):
        pass  # the stage merges the tasks' stats itself; an afterok job would wait forever after a failure

    def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1):
        cpu = own_cpu_seconds()
        stats = super()._run_for_rank(rank, local_rank, node_rank)
        with self.logging_dir.open(f"cpu/{rank:05d}", "w") as f:
            f.write(f"{own_cpu_seconds() - cpu:.3f}")
        return stats

    def run(self):
        if "SLURM_ARRAY_TASK_ID" in os.environ:  # inside the job: datatrove runs this task's rank
            return super().run()
        from datatrove.utils.logging import logger

        if self.logging_dir.exists("slurm_job_id"):  # an earlier run's job, if its stage was killed
            with self.logging_dir.open("slurm_job_id", "r") as f:
                subprocess.run(["scancel", f.read().strip()], capture_output=True)
        if not self.get_incomplete_ranks(range(self.tasks)):
            return
        try:
            self.launch_job()
        except subprocess.CalledProcessError as e:
            raise StageError(f"sbatch refused the job: {(e.output or b'').decode(errors='replace').strip() or e}") from None
        with self.logging_dir.open("slurm_job_id", "w") as f:
            f.write(str(self.job_id))
        try:
            while subprocess.run(["squeue", "-h", "-j", str(self.job_id)], capture_output=True,
                                 text=True).stdout.strip():
                time.sleep(1)
        except BaseException:
            subprocess.run(["scancel", str(self.job_id)], capture_output=True)
            raise
        for path in self.logging_dir.list_files("cpu"):
            with self.logging_dir.open(path, "r") as f:
                report_worker_cpu(float(f.read()))
        missing = self.get_incomplete_ranks(range(self.tasks))
        if missing:
            raise TaskDied(f"Slurm job {self.job_id} ended with {len(missing)} of {self.tasks} datatrove tasks "
                           f"unfinished (their logs: {self.slurm_logs_folder}); the tasks that finished are kept, "
                           "rerun to resume")
        logger.info(f"Slurm job {self.job_id}: all {self.tasks} tasks completed")


def _default_partition() -> str:
    """The Slurm cluster's default partition (`sinfo` marks it with a *)."""
    r = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True)
    for name in r.stdout.split():
        if name.endswith("*"):
            return name[:-1]
    raise BadInput(f"no default Slurm partition (sinfo: {(r.stderr or r.stdout).strip()[:200] or 'nothing'}): "
                   "give slurm_partition")


def executor_for(where: "ExecutorParams | None", pipeline: list, tasks: int, workers: int, logs_folder):
    """The datatrove executor of one run: `RayExecutor` (inside `ray_cluster`) or `SlurmExecutor`
    when `where` says so, else this machine's `FailFastExecutor` with `workers` processes."""
    executor = where.executor if where is not None else "local"
    if executor == "ray":
        return RayExecutor(pipeline, tasks=tasks, logging_dir=logs_folder)
    if executor == "slurm":
        return SlurmExecutor(pipeline, tasks=tasks, logging_dir=logs_folder, partition=where.slurm_partition,
                             time=where.slurm_time)
    from tasks.steps import FailFastExecutor

    return FailFastExecutor(pipeline=pipeline, tasks=tasks, workers=min(workers, tasks),
                            logging_dir=logs_folder, skip_completed=True)
