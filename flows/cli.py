"""`crawl2model`: the command line (DESIGN §6).

Errors are one line on stderr and exit status 2 for bad usage or input, 1 for a failed run.
Prefect is imported only by the commands that run flows, so `artifacts` answers at once.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import typing
from typing import Sequence

from rich.console import Console
from rich.table import Table
from rich.tree import Tree

from common.process import one_line
from tasks.errors import BadInput, StageError
from tasks.lake import Lake, LakeError, Ref

# Piped output (scripts, logs) gets a wide table instead of rich's 80-column default.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 200)


class UsageError(BadInput):
    """Bad usage: exit status 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        raise UsageError(f"{self.prog}: {message}")


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# --------------------------------------------------------------------------- artifacts


def cmd_ls(lake: Lake, args) -> int:
    lake.check_reachable()
    kinds = [Ref.parse(args.kind).kind] if args.kind else lake.kinds()
    rows = []
    for kind in kinds:
        aliases = lake.aliases(kind)
        for m in lake.versions(kind):
            names = sorted(n for n, v in aliases.items() if v == m.version)
            rows.append({"ref": m.ref, "kind": kind, "version": m.version, "aliases": names,
                         "created_at": m.created_at, "files": len(m.files),
                         "bytes": sum(f["bytes"] for f in m.files), "inputs": m.inputs})
    if args.kind and not rows and kinds[0] not in lake.kinds():
        raise LakeError(f"unknown artifact kind {kinds[0]!r} in lake {lake.url}")
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(title=f"artifacts in {lake.url}")
    for col in ("kind", "version", "aliases", "created", "files", "size", "inputs"):
        table.add_column(col, justify="right" if col in ("files", "size") else "left")
    for r in rows:
        table.add_row(r["kind"], r["version"], ", ".join(r["aliases"]), r["created_at"],
                      str(r["files"]), human_bytes(r["bytes"]), ", ".join(r["inputs"]))
    out.print(table)
    return 0


def cmd_show(lake: Lake, args) -> int:
    m = lake.resolve(args.ref)
    if args.json:
        print(json.dumps(m.to_json(), indent=2, sort_keys=True))
        return 0
    out.print(f"[bold]{m.ref}[/]  created {m.created_at}  code {m.code_version}  "
              f"flow run {m.flow_run_id or '-'}")
    out.print(f"inputs: {', '.join(m.inputs) or '(none)'}")
    params = Table(title="parameters", show_header=False)
    for k, v in sorted(m.params.items()):
        params.add_row(k, json.dumps(v) if not isinstance(v, str) else v)
    out.print(params)
    if m.metrics:
        metrics = Table(title="metrics", show_header=False)
        for k, v in m.metrics.items():
            metrics.add_row(k, json.dumps(v) if not isinstance(v, (str, int, float)) else str(v))
        out.print(metrics)
    files = Table(title=f"files ({len(m.files)})")
    files.add_column("path")
    files.add_column("size", justify="right")
    files.add_column("sha256")
    for f in m.files[:50]:
        files.add_row(f["path"], human_bytes(f["bytes"]), f["sha256"][:16])
    if len(m.files) > 50:
        files.add_row(f"... {len(m.files) - 50} more", "", "")
    out.print(files)
    return 0


def cmd_lineage(lake: Lake, args) -> int:
    tree = lake.lineage(args.ref)
    if args.json:
        print(json.dumps(tree, indent=2))
        return 0

    def add(node: Tree, sub: dict) -> None:
        for child in sub["inputs"]:
            add(node.add(f"{child['ref']}  [dim]{child['created_at']}[/]"), child)

    root = Tree(f"[bold]{tree['ref']}[/]  [dim]{tree['created_at']}[/]")
    add(root, tree)
    out.print(root)
    return 0


def cmd_tag(lake: Lake, args) -> int:
    m = lake.tag(args.ref, args.name)
    out.print(f"{m.kind}@{args.name} -> {m.ref}")
    return 0


def cmd_gc(lake: Lake, args) -> int:
    lake.check_reachable()
    found = lake.gc(dry_run=args.dry_run)
    if args.json:
        print(json.dumps({"dry_run": args.dry_run, **found}, indent=2))
        return 0
    verb = "would delete" if args.dry_run else "deleted"
    total = sum(len(v) for v in found.values())
    for key, items in found.items():
        for item in items:
            out.print(f"{verb} {key}: {item}")
    out.print(f"{verb} {total} item(s)")
    return 0


def cmd_verify(lake: Lake, args) -> int:
    m = lake.resolve(args.ref)
    bad = lake.verify(m)
    if bad:
        print(f"error: {m.ref}: {len(bad)} file(s) do not match their sha256: {', '.join(bad)}",
              file=sys.stderr)
        return 1
    out.print(f"{m.ref}: {len(m.files)} file(s) verified")
    return 0


# --------------------------------------------------------------------------- runs


def _params(model, /, **values):
    """Build a stage's parameter model; a validation error becomes one line naming the field."""
    from pydantic import ValidationError

    try:
        return model(**{k: v for k, v in values.items() if v is not None})
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or model.__name__
        if err["type"] == "extra_forbidden":
            raise UsageError(f"unknown parameter {where!r}")
        raise UsageError(f"invalid {where.replace('_', '-')}: {err['msg'].removeprefix('Value error, ')}")


def _run_flow(fn, *args, **kwargs):
    """Run a flow. A user's error comes back raised as itself (a StageError: main prints its
    line and exits with its status); the run's log holds no traceback for it."""
    prefect_api()  # after the parameters were validated: bad input costs no server start
    return fn(*args, **kwargs)


def prefect_api() -> None:
    """The Prefect API for a command's flows: PREFECT_API_URL when set, else a temporary server
    on loopback. Prefect would start one itself, but its own outlives a SIGKILL of the command
    (say, by the out-of-memory killer) and idles on its port for good; this one is started the
    same way from the main thread, which lives as long as the process, with PR_SET_PDEATHSIG.
    It takes Prefect's own slot (the ephemeral server is a singleton), so every thread that
    asks Prefect for a client gets this server."""
    from prefect.settings import PREFECT_API_URL, get_current_settings

    if PREFECT_API_URL.value():  # the user's server: checked first, as the server stack takes ~5 s to import
        return
    from prefect.server.api.server import SubprocessASGIServer

    from common.process import die_with_parent

    class DiesWithUs(SubprocessASGIServer):
        def _run_uvicorn_command(self) -> subprocess.Popen:  # Prefect 3.9's, plus preexec_fn
            import prefect

            return subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent),
                 "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
                 "--port", str(self.port), "--log-level", "error", "--lifespan", "on"],
                env={"PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # offline: no telemetry, unless asked
                     **os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                     "PREFECT__SERVER_FINAL": "1",
                     **get_current_settings().to_environment_variables(exclude_unset=True)},
                preexec_fn=die_with_parent)

    if None in SubprocessASGIServer._instances:
        return
    # registered under Prefect's key for the ephemeral server; start() stops it at exit, after
    # Prefect's own exit handlers have sent the last logs
    DiesWithUs().start()


def quiet_prefect_exit() -> None:
    """Prefect logs at exit, after our error line: "Stopping temporary server" and, when its server
    is slow to take the run's last events, "Still processing items" (a warning). Silence all but
    its errors from here on, so that the one line stays the last (the server still stops at exit,
    after the run's last logs and events were sent to it)."""
    import logging
    import sys

    logging.getLogger("prefect").setLevel(logging.ERROR)
    if services := sys.modules.get("prefect._internal.concurrency.services"):
        todo = [services._QueueServiceBase]  # each logs under its class name ("EventsWorker")
        while todo:
            cls = todo.pop()
            logging.getLogger(cls.__name__).setLevel(logging.ERROR)
            todo += cls.__subclasses__()


def _override(spec: list[str] | None) -> dict:
    """--set gopher_quality.min_doc_words=30 style overrides of nested parameters."""
    out: dict = {}
    for item in spec or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"invalid --set {item!r}: expected FIELD=VALUE or GROUP.FIELD=VALUE")
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = value
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = parsed
    return out


def cmd_stage(lake: Lake, args) -> int:
    """`stage NAME`: the options of the stage's parameter model, its inputs resolved (unknown
    refs and wrong kinds fail before any work, exit 2), its flow run, its summary line."""
    from tasks.registry import stage
    from tasks.stage import resolve_inputs

    st = stage(args.stage)
    values = _override(args.set)
    for name in st.params.model_fields:
        given = getattr(args, name, None)
        if given is not None:
            if name in st.comma_lists:
                given = [x for v in given for x in v.split(",") if x]
            values[name] = given
    read = _params(st.params, **values).inputs_read()  # (conversations from files alone read no corpus)
    for name, kinds in st.inputs.items():  # resolved now: a rerun of "latest" stays the same version
        if name not in read:
            continue
        given = values.get(name)
        if typing.get_origin(st.params.model_fields[name].annotation) is list:  # several refs, none by default
            values[name] = [lake.resolve(r).ref for r in given or []]
        else:
            values[name] = lake.resolve(given or kinds[0]).ref
    params = _params(st.params, **values)
    resolve_inputs(lake, params)
    from flows.stages import FLOWS  # Prefect: 1.2 s of CPU that a refused command does not spend

    m = lake.resolve(_run_flow(FLOWS[st.name], params, lake_url=lake.url))
    out.print(f"{m.ref}: {st.summary(m.metrics)}")
    if st.details:
        title, rows = st.details(m.metrics)
        if rows:
            table = Table(title=title)
            for col in rows[0]:
                table.add_column(col.replace("_", " "), justify="left" if col == "step" else "right")
            for r in rows:
                table.add_row(*(human_bytes(v) if "bytes" in k and isinstance(v, int) else str(v) for k, v in r.items()))
            out.print(table)
    return 0


def cmd_plan(lake: Lake, args) -> int:
    """`plan`: a whole crawl's cost from its listing, one sampled file and the lake's measured runs."""
    from tasks.plan import PlanParams, plan

    params = _params(PlanParams, **{k: getattr(args, k, None) for k in PlanParams.model_fields})
    p = plan(lake, params, log=lambda m: print(m, file=sys.stderr))
    if args.json:
        print(json.dumps(p, indent=2))
        return 0
    s = p["sample"]
    out.print(f"{p['crawl']}: {p['files']:,} of {p['files_in_crawl']:,} WARC files; sampled {s['path']}: "
              f"{s['records']:,} records ({s['responses']:,} responses), {human_bytes(s['bytes'])}")
    table = Table(title=f"plan at {params.workers} CPU workers, {params.gpus} GPUs")
    for col in ("stage", "CPU-hours", "wall hours", "stored", "USD", "measured on"):
        table.add_column(col, justify="left" if col in ("stage", "measured on") else "right")
    for r in p["stages"]:
        table.add_row(r["stage"], f"{r['cpu_hours']:,.0f}", f"{r['wall_hours']:,.1f}", human_bytes(int(r["bytes_out"])),
                      "-" if r["usd"] is None else f"{r['usd']:,.0f}", r["measured_on"])
    t = p["train"]
    table.add_row(f"pretrain {t['model_preset']}", f"{t['gpu_hours']:,.0f} GPU-h", f"{t['wall_hours']:,.1f}", "-",
                  "-" if t["usd"] is None else f"{t['usd']:,.0f}",
                  f"6·N·D: N {t['params'] / 1e6:,.0f}M, D {t['tokens'] / 1e9:,.1f}B tokens (estimated)")
    out.print(table)
    out.print(f"pages {p['pages']:,.0f}; documents: {p['documents_after_filter']:,.0f} after filter, {p['documents_after_dedup']:,.0f} after "
              f"dedup; tokens {p['tokens']:,.0f}; stored {p['storage_tb']:,.1f} TB"
              + ("" if p["storage_usd_per_month"] is None else f" ({p['storage_usd_per_month']:,.0f} USD/month)"))
    out.print("storage: " + "; ".join(p["storage_notes"]))
    out.print("assumed: " + "; ".join(p["assumed"]))
    return 0


def cmd_tokenize(lake: Lake, args) -> int:
    from tasks.tokenizer import load, render_terminal, tokenizer_path

    sp = load(tokenizer_path(lake, lake.resolve(args.tokenizer).ref))
    text, ids = render_terminal(sp, args.text)
    out.print(text)
    out.print(f"[dim]{len(ids)} tokens, {len(args.text.encode())} bytes:[/] {ids}")
    return 0


def cmd_demo_mirror(lake: Lake, args) -> int:
    from tasks.mirror import build_mirror

    info = build_mirror(args.dir, files=args.files)
    out.print(f"built a {info['files']}-file Common Crawl-layout mirror of {info['pages']} pages "
              f"in {info['root']} (crawl {info['crawl']}); use --base-url file://"
              f"{os.path.abspath(args.dir)}/")
    return 0


def cmd_demo(lake: Lake, args) -> int:
    from flows.demo import demo

    _run_flow(demo, lake.url)
    return 0


def cmd_run(lake: Lake, args) -> int:
    from tasks.presets import preset
    from tasks.registry import PIPELINE, PipelineParams

    try:
        base = preset(args.preset, "file://" + os.path.abspath("demo-mirror") + "/")
    except ValueError as e:
        raise UsageError(str(e)) from None
    values = {**{k: v.model_dump() for k, v in base.items()}, "from_stage": args.from_stage or PIPELINE[0],
              "to_stage": args.to_stage or PIPELINE[-1], "rebuild": args.rebuild or []}
    if args.executor or args.ray_address:  # every data stage's executor at once; --set may still change one
        from tasks.registry import stage as stage_named

        executor = args.executor or "ray"
        for name in PIPELINE:
            field = stage_named(name).params.model_fields.get("executor")
            if field is not None and executor in typing.get_args(field.annotation):  # slurm: the datatrove stages
                values[name] = {**values[name], "executor": executor,
                                **({"ray_address": args.ray_address} if executor == "ray" else {})}
    for stage, fields in _override(args.set).items():
        if stage not in PIPELINE or not isinstance(fields, dict):
            raise UsageError(f"invalid --set {stage!r}: expected STAGE.FIELD=VALUE with STAGE one of {', '.join(PIPELINE)}")
        values[stage] = {**values.get(stage, {}), **fields}
    params = _params(PipelineParams, **values)
    from flows.pipeline import pipeline, summary_rows, summary_table  # Prefect, once the parameters are valid

    refs = _run_flow(pipeline, params, lake_url=lake.url)
    out.print(summary_table("pipeline", summary_rows(lake, refs)))
    return 0


def cmd_sample(lake: Lake, args) -> int:
    from model.sample import generate_text

    m = lake.resolve(args.model)
    if m.kind != "pretrain":
        raise UsageError(f"--model must be a pretrain version, not {m.ref}")
    text = generate_text(lake.file_uri(m, "final"), args.prompt, fs=lake.fs, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    print(text)
    return 0


def cmd_chat(lake: Lake, args) -> int:
    """`chat`: talk with an sft (or pretrain) version in the terminal, or answer one --prompt."""
    from model.chat import fit_context, stream_reply, stream_text, system_messages
    from model.sample import load

    m = lake.resolve(args.model)
    if m.kind not in ("sft", "pretrain"):
        raise UsageError(f"--model must be an sft or pretrain version, not {m.ref}")
    # the version's deployed system prompt (sft --system) unless --system gives another ('' for none)
    system_text = m.params.get("system", "") if args.system is None else args.system
    if system_text and system_text.startswith("@"):  # --system @FILE
        try:
            system_text = open(system_text[1:], encoding="utf-8").read().strip()
        except OSError as e:
            raise UsageError(f"--system {args.system}: cannot read it ({e.strerror})") from None
    retriever = None
    if args.context:
        from tasks.index import Retriever

        idx = lake.resolve(args.context)
        if idx.kind != "index":
            raise UsageError(f"--context must be an index version, not {idx.ref}")
        retriever = Retriever(lake, idx)
    model, config, sp = load(lake.file_uri(m, "final"), fs=lake.fs)
    limit = model.config.seq_len - min(args.max_new_tokens, model.config.seq_len // 2)  # room for the reply
    system = system_messages(system_text)
    history: list[dict] = []
    seed = args.seed
    found: list[dict] = []

    def reply(text: str, show: bool) -> tuple[str, int]:
        nonlocal history, seed, found
        # working memory: the corpus's passages for this question, between the system prompt and the turns
        found = retriever.search(text, args.passages) if retriever else []
        context = [{"role": "passage", "content": p["text"]} for p in found]
        if show:
            for p in found:
                print(f"(context: {p['doc']}, score {p['score']})")
        try:
            messages, dropped = fit_context(sp, [*system, *context, *history, {"role": "user", "content": text}],
                                            limit)
        except ValueError as e:
            raise UsageError(str(e)) from None
        history = messages[len(system) + len(context):]
        pieces = []
        for piece in stream_text(sp, stream_reply(model, sp, messages, args.max_new_tokens, args.temperature,
                                                  args.top_k, args.top_p, seed)):
            pieces.append(piece)
            if show:
                print(piece, end="", flush=True)
        seed = None if seed is None else seed + 1  # another draw next turn, the same session each run
        history.append({"role": "assistant", "content": "".join(pieces)})
        return "".join(pieces), dropped

    if args.prompt is not None:
        text, dropped = reply(args.prompt, show=False)
        if args.json:
            print(json.dumps({"model": m.ref, "system": system_text, "reply": text, "dropped_messages": dropped,
                              "context": [{k: p[k] for k in ("id", "doc", "score")} for p in found]},
                             ensure_ascii=False))
        else:
            print(text)
        return 0
    print(f"chatting with {m.ref} ({model.config.seq_len}-token context); /reset starts over, /quit ends")
    if system_text:
        print(f"(system prompt: {system_text if len(system_text) <= 80 else system_text[:77] + '...'})")
    while True:
        try:
            text = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if text.strip() == "/quit":
            return 0
        if text.strip() == "/reset":
            history = []
            print("(a new conversation)")
            continue
        if not text.strip():
            continue
        print("assistant> ", end="", flush=True)
        _, dropped = reply(text, show=True)
        print()
        if dropped:
            print(f"(the {dropped} oldest message(s) no longer fit the model's {model.config.seq_len}-token "
                  "context: dropped)")


# --------------------------------------------------------------------------- parser


def add_stage_options(p: Parser, st) -> None:
    """An option per top-level field of the stage's parameter model (nested groups through
    --set): the flag, its choices and help come from the field. Values stay strings here and
    are converted and checked by the model, so every bad value gets the same one-line error."""
    import types

    from pydantic import BaseModel

    for name, field in st.params.model_fields.items():
        flag = "--" + name.replace("_", "-")
        tp = field.annotation
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
            tp = args[0]  # X | None
        origin = typing.get_origin(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            continue  # a group of settings: --set GROUP.FIELD=VALUE
        help_ = field.description or ""
        if name in st.inputs:
            help_ = (f"{' or '.join(st.inputs[name])} version(s) (refs)" if origin is list
                     else f"{' or '.join(st.inputs[name])} version (default: {st.inputs[name][0]}@latest)")
        elif field.default is not None and not field.is_required() and not callable(field.default_factory):
            help_ += f" (default: {field.default})" if help_ else f"default: {field.default}"
        if tp is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif origin is typing.Literal:
            p.add_argument(flag, choices=[str(c) for c in typing.get_args(tp)], help=help_)
        elif origin is list:
            p.add_argument(flag, nargs="+", metavar=name.upper().rstrip("S") or "VALUE", help=help_)
        else:
            p.add_argument(flag, metavar=name.upper(), help=help_)
    p.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="any parameter, nested ones too, e.g. gopher_quality.min_doc_words=30")
    p.set_defaults(func=cmd_stage, stage=st.name)


def add_sampling_options(p: Parser, max_new_tokens: int) -> None:
    """How `sample` and `chat` draw tokens."""
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> Parser:
    from tasks import registry

    p = Parser(prog="crawl2model", description="From a Common Crawl dump to a pretrained language "
               "model, as Prefect flows over a versioned lake.")
    p.add_argument("--lake", help="lake root URL: a folder or s3://bucket/prefix "
                   "(default: $CRAWL2MODEL_LAKE, then ./lake)")
    p.add_argument("--s3-endpoint", help="S3 API endpoint URL (default: $AWS_ENDPOINT_URL)")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    dm = sub.add_parser("demo", help="offline end-to-end run on the embedded defaults")
    dm.set_defaults(func=cmd_demo)

    pipeline_stages = [s.name for s in registry.pipeline_stages()]
    run = sub.add_parser("run", help="the pipeline: " + " -> ".join(pipeline_stages))
    run.add_argument("--preset", choices=["demo", "small", "gpt2"], default="demo")
    run.add_argument("--from", dest="from_stage", choices=pipeline_stages)
    run.add_argument("--to", dest="to_stage", choices=pipeline_stages)
    run.add_argument("--rebuild", action="append", choices=pipeline_stages, help="build this stage again")
    run.add_argument("--set", action="append", metavar="STAGE.FIELD=VALUE",
                     help="override a stage parameter, e.g. pretrain.max_steps=100")
    run.add_argument("--executor", choices=["local", "ray", "slurm"],
                     help="where the data stages work: this machine, a Ray cluster, or Slurm jobs (filter and "
                     "dedup; docs/SCALING.md)")
    run.add_argument("--ray-address", help="the Ray cluster (host:port of its head; 'local' starts one); "
                     "default $RAY_ADDRESS")
    run.set_defaults(func=cmd_run)

    smp = sub.add_parser("sample", help="generate text with a trained model")
    smp.add_argument("--model", required=True, help="pretrain version (e.g. pretrain@latest)")
    smp.add_argument("--prompt", required=True)
    add_sampling_options(smp, max_new_tokens=100)
    smp.set_defaults(func=cmd_sample)

    cht = sub.add_parser("chat", help="talk with a fine-tuned model (a terminal REPL, or one --prompt)")
    cht.add_argument("--model", default="sft@latest", help="sft (or pretrain) version (default: sft@latest)")
    cht.add_argument("--system", default=None, help="a system prompt (who the assistant is, how it answers); "
                     "@FILE reads it from a file")
    cht.add_argument("--context", default=None, metavar="INDEX", help="an index version (e.g. index@latest): "
                     "the corpus passages most relevant to each message go in the context, their documents named")
    cht.add_argument("--passages", type=int, default=2, help="with --context: passages per message (default 2)")
    cht.add_argument("--prompt", default=None, help="answer this one message and exit")
    cht.add_argument("--json", action="store_true", help="with --prompt: the reply as JSON")
    add_sampling_options(cht, max_new_tokens=128)
    cht.set_defaults(func=cmd_chat)

    mir = sub.add_parser("demo-mirror", help="build a small Common Crawl-layout mirror in DIR")
    mir.add_argument("dir")
    mir.add_argument("--files", type=int, default=4, help="WARC files in the mirror")
    mir.set_defaults(func=cmd_demo_mirror)

    stage = sub.add_parser("stage", help="run one stage on its own")
    ssub = stage.add_subparsers(dest="stage", required=True, parser_class=Parser)
    for st in registry.STAGES.values():
        add_stage_options(ssub.add_parser(st.name, help=st.description, description=st.description), st)

    pl = sub.add_parser("plan", help="what a whole crawl will cost: CPU, GPU, bytes, money, from measured runs")
    from tasks.plan import PlanParams

    for name, field in PlanParams.model_fields.items():
        default = "" if field.is_required() or field.default is None else f" (default: {field.default})"
        pl.add_argument("--" + name.replace("_", "-"), metavar=name.upper(), required=field.is_required(),
                        help=(field.description or "") + default)
    pl.add_argument("--json", action="store_true", help="the plan as JSON, for scripts")
    pl.set_defaults(func=cmd_plan)
    tz = sub.add_parser("tokenize", help="show a text split into tokens with their ids")
    tz.add_argument("--tokenizer", default="tokenizer", help="tokenizer version (default: tokenizer@latest)")
    tz.add_argument("text")
    tz.set_defaults(func=cmd_tokenize)

    art = sub.add_parser("artifacts", help="list, inspect, tag and collect lake artifacts")
    asub = art.add_subparsers(dest="action", required=True, parser_class=Parser)
    ls = asub.add_parser("ls", help="committed versions, newest last")
    ls.add_argument("kind", nargs="?")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_ls)
    show = asub.add_parser("show", help="one version's manifest")
    show.add_argument("ref", help="KIND, KIND@VERSION or KIND@ALIAS")
    show.add_argument("--json", action="store_true", help="print the manifest as JSON")
    show.set_defaults(func=cmd_show)
    lin = asub.add_parser("lineage", help="the tree of inputs a version was built from")
    lin.add_argument("ref")
    lin.add_argument("--json", action="store_true")
    lin.set_defaults(func=cmd_lineage)
    tag = asub.add_parser("tag", help="point a named alias at a version")
    tag.add_argument("ref")
    tag.add_argument("name")
    tag.set_defaults(func=cmd_tag)
    gc = asub.add_parser("gc", help="delete uncommitted leftovers and versions no alias reaches")
    gc.add_argument("--dry-run", action="store_true", help="only list what would be deleted")
    gc.add_argument("--json", action="store_true")
    gc.set_defaults(func=cmd_gc)
    ver = asub.add_parser("verify", help="recompute every file's sha256 against the manifest")
    ver.add_argument("ref")
    ver.set_defaults(func=cmd_verify)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.s3_endpoint:
            os.environ["AWS_ENDPOINT_URL"] = args.s3_endpoint
        if os.environ.get("CRAWL2MODEL_S3_SECRET_BLOCK"):
            prefect_api()  # the lake's credentials come through the Prefect API
        return args.func(Lake(args.lake), args)
    except StageError as e:  # usage, bad input, a run that failed: one line, no traceback
        quiet_prefect_exit()
        print(f"error: {one_line(e)}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:  # --help
        return int(e.code or 0)


if __name__ == "__main__":
    sys.exit(main())
