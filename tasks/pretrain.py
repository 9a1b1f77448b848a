"""Stage `pretrain`: launch `torchrun -m model.train` on a shard version and commit the model.

The training code lives in model/ and knows nothing of Prefect or the lake: it reads shards
from a folder and writes checkpoints to a folder. This module gives it the version's folder
(so a rerun of the same version resumes from the newest checkpoint), runs torchrun in its own
process group, streams its output line by line into the log, keeps a progress artifact
current, kills the whole group on cancel or timeout, and publishes the loss curve.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable

from pydantic import Field, create_model, field_validator, model_validator

from model.config import PRESETS, TrainConfig, settings
from tasks.errors import StageError
from tasks.lake import Lake, Manifest, Production, s3_credentials, version_of
from tasks.report import runtime
from tasks.stage import StageParams, input_ref, resolve_inputs, run_stage

CODE_VERSION = "pretrain/3"  # 3: every TrainConfig setting is a parameter (and part of the version)


def pydantic_fields(config: type, defaults: dict[str, Any] | None = None, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """A settings dataclass's fields as pydantic field definitions: the same types (a Literal
    becomes a dropdown in the Prefect form), defaults (`defaults` replaces some: a stage that
    trains differently), bounds (ge/gt/le/lt) and help (the description); `exclude` leaves some out."""
    fields, defaults = {}, defaults or {}
    for s in settings(config):
        if s.name in exclude:
            continue
        default = {"default": defaults[s.name]} if s.name in defaults else \
            {"default_factory": s.factory} if s.factory is not None else {"default": s.default}
        fields[s.name] = (s.type, Field(**default, description=s.help, **s.bounds))
    return fields


class _Input(StageParams):
    input: str = input_ref("shard")


TRAIN_FIELDS = [s.name for s in settings(TrainConfig)]
LAUNCH_FIELDS = ["nproc_per_node", "nnodes", "node_rank", "rdzv_endpoint", "timeout_s"]


class PretrainParams(create_model("_TrainSettings", __base__=_Input, __module__=__name__,
                                  **pydantic_fields(TrainConfig))):
    """The `pretrain` stage: the shard version to train on, every training setting of
    model/config.py's TrainConfig (they make the version), and how to launch (processes,
    nodes, timeout: not part of the version)."""

    # how it runs, not what it makes:
    nproc_per_node: int = Field(1, ge=1, le=1024, description="training processes per node (GPUs)")
    nnodes: int = Field(1, ge=1, description="nodes (machines) of a multi-node run")
    node_rank: int = Field(0, ge=0, description="this node's place in a multi-node run: node 0 produces and "
                                                "commits the version, the others train beside it")
    rdzv_endpoint: str | None = Field(None, description="HOST:PORT of the rendezvous for multi-node (torchrun's "
                                                        "c10d store; every node gives the same)")
    timeout_s: float = Field(24 * 3600, gt=0, description="kill the training after this many seconds")

    @field_validator("rdzv_endpoint")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is not None and (":" not in v or not v.rsplit(":", 1)[1].isdigit()):
            raise ValueError(f"invalid rdzv endpoint {v!r}: expected HOST:PORT")
        return v

    @model_validator(mode="after")
    def _node_of_the_run(self) -> "PretrainParams":
        if self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank {self.node_rank} is not a node of a {self.nnodes}-node run "
                             f"(0 to {self.nnodes - 1})")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError(f"a {self.nnodes}-node run needs rdzv_endpoint HOST:PORT (the same on every node)")
        return self

    @field_validator("seq_len")
    @classmethod
    def _fits_the_model(cls, v: int | None, info) -> int | None:
        """Checked here too (model.train checks it at launch), so a pipeline stops before its
        data stages run rather than after."""
        preset = info.data.get("preset")
        if v is not None and preset in PRESETS and v > PRESETS[preset]["seq_len"]:
            raise ValueError(f"{v} exceeds the {preset} preset's context of {PRESETS[preset]['seq_len']} tokens")
        return v

    def train_config(self) -> TrainConfig:
        """The training settings, for model.train (`--config` takes its JSON)."""
        return TrainConfig.from_dict(self.model_dump(include=set(TRAIN_FIELDS)))

    def recipe(self) -> dict:
        """What makes the version: every training setting (not the input ref, rebuild or launch)."""
        return self.model_dump(mode="json", include=set(TRAIN_FIELDS))


class PretrainError(StageError):
    pass


def torchrun_command(params: PretrainParams, data: str, out: str, tokenizer: str, run_id: str = "none",
                     inputs: list[str] | None = None) -> list[str]:
    """`run_id`: the rendezvous' id (the version: every node computes the same, and another run
    on the same endpoint is refused rather than joined). `inputs`: model.train's input arguments
    instead of `--data data --tokenizer tokenizer` (SFT's `--conversations … --init-from …`)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(params.nproc_per_node)]
    if params.nnodes > 1 or params.rdzv_endpoint:
        launcher += ["--nnodes", str(params.nnodes), "--rdzv-backend", "c10d",
                     "--rdzv-endpoint", params.rdzv_endpoint or "127.0.0.1:29500", "--rdzv-id", run_id]
    else:
        launcher += ["--standalone"]
    inputs = inputs if inputs is not None else ["--data", data, "--tokenizer", tokenizer]
    # where to read and write, and all the settings as one JSON
    return launcher + ["-m", "model.train", *inputs, "--out", out, "--config", params.train_config().to_json()]


def torchrun_env(params: PretrainParams) -> dict[str, str]:
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1" if params.nproc_per_node > 1
                                             else str(os.cpu_count() or 1))}
    if params.nnodes == 1 and not params.rdzv_endpoint:
        # One machine: gloo's sockets listen on loopback, not on the host name's interface.
        env["GLOO_SOCKET_IFNAME"] = os.environ.get("GLOO_SOCKET_IFNAME", "lo")
    # S3 credentials from a Prefect Secret block reach the trainer (no Prefect in model/) through
    # its environment only: never on the command line, which is logged.
    env.update(s3_credentials())
    return env


def run_torchrun(cmd: list[str], timeout_s: float, on_line: Callable[[str], None], env: dict | None = None) -> None:
    """Run torchrun in its own process group, streaming its output as it comes; on timeout
    or cancellation (KeyboardInterrupt, Prefect's cancel) kill the whole group."""
    from common.process import die_with_parent

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            start_new_session=True, preexec_fn=die_with_parent, env={**os.environ, **(env or {})},
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    timer = threading.Timer(timeout_s, lambda: _kill_group(proc))
    timer.start()
    tail: list[str] = []
    first_error = None  # model.train prints "error: ..." on bad input; torchrun then adds noise
    in_root_cause = False  # inside torchrun's report of the first rank that failed
    root_cause: dict[str, str] = {}
    held: list[str] = []  # what follows model.train's error line: torchrun's traceback and report
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail = (tail + [line])[-20:]
            if first_error is None and line.lstrip().startswith("error:"):
                first_error = line.strip()
                on_line(line)
                continue
            if "Root Cause (first observed failure)" in line:
                in_root_cause = True
            elif in_root_cause and (m := re.search(r"^\s*(rank|exitcode)\s*:\s*(-?\d+)", line)):
                root_cause.setdefault(m[1], m[2])
            if first_error is None:
                on_line(line)
            else:
                held.append(line)
        rc = proc.wait()
    except BaseException:
        _kill_group(proc)
        raise
    finally:
        timer.cancel()
    if rc != 0 and first_error and root_cause.get("exitcode") == "2":  # model.train: 2 is bad input
        # the ranks refused their input: its one line is the error, torchrun's traceback is noise
        raise PretrainError(first_error.removeprefix("error:").strip(), bad_input=True)
    for line in held:
        on_line(line)
    if rc != 0:
        from common.process import how_it_ended

        killed = None
        if rc < 0:  # torchrun itself was killed; its ranks die with it (PR_SET_PDEATHSIG)
            killed = f"torchrun {how_it_ended(rc)}"
        elif "rank" in root_cause and "exitcode" in root_cause:
            killed = f"rank {root_cause['rank']} {how_it_ended(int(root_cause['exitcode']))}"
        # torchrun's own failure when another node of a multi-node run dies: its rendezvous
        # (hosted by whichever node joined first) is gone
        rendezvous = next((m for line in reversed(tail) if (m := _RENDEZVOUS_ERROR.search(line))), None)
        if first_error:
            why = first_error.removeprefix("error:").strip()
        elif killed:
            why = f"{killed}; checkpoints written so far are kept, rerun to resume"
        elif rendezvous:
            why = (f"the nodes' rendezvous failed ({rendezvous.group(1)}: {rendezvous.group(2).strip()}): a node "
                   "died or cannot be reached; checkpoints written so far are kept, rerun to resume")
        else:
            why = " | ".join(tail[-3:])
        raise PretrainError(f"training failed (torchrun exit {rc}): {why}")


_RENDEZVOUS_ERROR = re.compile(r"\b(Rendezvous\w*Error): (.*)$")


def _kill_group(proc: subprocess.Popen) -> None:
    """torchrun starts its workers in sessions of their own: kill them by parent pid first,
    then torchrun's whole group."""
    if proc.poll() is None:
        subprocess.run(["pkill", "-KILL", "-P", str(proc.pid)], capture_output=True)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def loss_plot_png(history: list[dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    steps = [h["step"] for h in history if "loss" in h]
    ax.plot(steps, [h["loss"] for h in history if "loss" in h], label="train loss")
    val = [(h["step"], h["val_loss"]) for h in history if h.get("val_loss") is not None]
    if val:
        ax.plot(*zip(*val), "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


class _Progress:
    """A progress artifact (and log lines) following the training steps."""

    def __init__(self, max_steps: int, log: Callable[[str], None], kind: str = "pretrain"):
        self.max_steps, self.log, self.id, self.last = max_steps, log, None, 0.0
        self.history: list[dict] = []
        self.id = runtime().progress("training steps", key=f"{kind}-progress")

    def __call__(self, line: str) -> None:
        record = None
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except ValueError:
                record = None
        if not isinstance(record, dict) or "step" not in record:
            self.log(line)
            return
        self.history.append(record)
        msg = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
                       if k != "samples")
        self.log(msg)
        for s in record.get("samples", []) or []:
            self.log(f"sample: {s}")
        now = time.time()
        if self.id is not None and (now - self.last > 2 or record["step"] >= self.max_steps):
            runtime().update_progress(self.id, 100.0 * record["step"] / self.max_steps,
                                      f"step {record['step']}/{self.max_steps} "
                                      f"loss {record.get('loss', float('nan')):.3f} "
                                      f"{record.get('tokens_per_s', 0):.0f} tok/s")
            self.last = now


def pretrain(lake: Lake, params: PretrainParams, log: Callable[[str], None] = print) -> Manifest:
    source = resolve_inputs(lake, params)["input"]
    tokenizer_ref = json.loads(lake.open(source, "meta.json").read())["tokenizer"]
    if params.node_rank > 0:
        return train_beside_node_0(lake, params, source, tokenizer_ref, log)

    def build(prod: Production) -> None:
        progress = launch_training(lake, params, source, prod.version, log, "launching")
        record_training(lake, prod, progress)
        prod.metrics["tokenizer"] = tokenizer_ref

    return run_stage(lake, "pretrain", params.recipe(), [source.ref, tokenizer_ref], CODE_VERSION, build, rebuild=params.rebuild)


def record_training(lake: Lake, prod: Production, progress: _Progress) -> None:
    """What the trainer wrote into the version, in its manifest and the UI: the loss curve
    (loss.png and a markdown artifact), the final and validation losses, the median speed."""
    with lake.fs.open(prod.path("metrics.json"), "rb") as f:
        history = json.load(f)
    history = history.get("history", history) if isinstance(history, dict) else history
    png = loss_plot_png(history)
    prod.write_bytes("loss.png", png)
    last = [h for h in history if "loss" in h][-1]
    vals = [h for h in history if h.get("val_loss") is not None]
    speeds = sorted(h["tokens_per_s"] for h in progress.history if h.get("tokens_per_s"))
    prod.metrics.update({"steps": last["step"], "final_loss": round(last["loss"], 4),
                         "val_loss": round(vals[-1]["val_loss"], 4) if vals else None,
                         "val_bpb": round(vals[-1]["val_bpb"], 4) if vals and vals[-1].get("val_bpb") else None,
                         "tokens_per_s_median": round(speeds[len(speeds) // 2]) if speeds else None})
    publish(prod.ref, png, progress.history)


def launch_training(lake: Lake, params: PretrainParams, source: Manifest, version: str,
                    log: Callable[[str], None], what: str, kind: str = "pretrain",
                    inputs: list[str] | None = None) -> _Progress:
    """torchrun -m model.train on the shard version `source` (or on `inputs`, model.train's
    input arguments), writing into the `kind` `version`'s folder (a path or fsspec URL, the same
    on every node: checkpoints land in the version, so a rerun resumes); returns what it
    reported (progress, timings)."""
    cmd = torchrun_command(params, lake.uri(source.kind, source.version), lake.uri(kind, version),
                           lake.file_uri(source, "tokenizer.model") if inputs is None else "",
                           run_id=f"{kind}-{version}", inputs=inputs)
    # every rank checks the inputs (shapes, vocabulary, resume state) before it builds the
    # model: bad input ends the launch in seconds, with model.train's one line and exit 2
    env = torchrun_env(params)  # once: it may load S3 credentials from a Prefect Secret block
    log(f"{what}: " + " ".join(cmd))
    progress = _Progress(params.max_steps, log, kind)
    run_torchrun(cmd, params.timeout_s, progress, env=env)
    return progress


def train_beside_node_0(lake: Lake, params: PretrainParams, source: Manifest, tokenizer_ref: str,
                        log: Callable[[str], None], commit_wait_s: float = 600) -> Manifest:
    """Node 1.. of a multi-node run: train in the same rendezvous as node 0, writing into the same
    version folder (the lake must be one that every node sees: S3, or a shared folder), and leave
    the version to node 0, which holds its lease and commits it. Returns node 0's commit."""
    version = version_of("pretrain", params.recipe(), [source.ref, tokenizer_ref], CODE_VERSION)
    ref = f"pretrain@{version}"
    if (done := lake.manifest("pretrain", version)) is not None:
        log(f"{ref}: already committed, nothing to train")
        return done
    launch_training(lake, params, source, version, log,
                    f"node {params.node_rank} of {params.nnodes}, training {ref} (node 0 commits it)")
    deadline = time.time() + commit_wait_s
    while (done := lake.manifest("pretrain", version)) is None:
        if time.time() > deadline:
            raise PretrainError(f"{ref}: training ended here but node 0 did not commit it within "
                                f"{commit_wait_s:.0f}s (see node 0's log)")
        time.sleep(1)
    log(f"{ref}: committed by node 0")
    return done


def publish(ref: str, png: bytes, history: list[dict]) -> None:
    kind = ref.split("@", 1)[0]
    img = base64.b64encode(png).decode()
    runtime().markdown(f"{kind}-loss", f"# Loss curve of `{ref}`\n\n![loss curve](data:image/png;base64,{img})",
                       f"{ref}: training and validation loss")
    steps = [h for h in history if "loss" in h]
    rows = [{k: h.get(k) for k in ("step", "loss", "val_loss", "val_bpb", "lr", "tokens_per_s")}
            for h in steps if h.get("val_loss") is not None or h is steps[-1]]
    runtime().table(f"{kind}-metrics", rows, f"{ref}: metrics at each evaluation")


def summary(x: dict) -> str:
    """The version's key numbers, one line (the CLI, the pipeline's summary table)."""
    return f"{x['steps']} steps, loss {x['final_loss']}, val loss {x.get('val_loss')}"
