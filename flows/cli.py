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
from typing import Sequence

from rich.console import Console
from rich.table import Table
from rich.tree import Tree

from tasks.lake import Lake, LakeError, Ref

# Piped output (scripts, logs) gets a wide table instead of rich's 80-column default.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 200)


_STAGES = ("download", "filter", "dedup", "tokenizer", "shard", "pretrain")


class UsageError(Exception):
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


class RunFailed(Exception):
    """A run that failed: exit status 1."""


def _params(model, **values):
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


def _run_flow(fn, *args, **kwargs) -> str:
    from tasks.dedup import DedupError
    from tasks.download import DownloadError
    from tasks.filter import FilterError
    from tasks.pretrain import PretrainError
    from tasks.stage import TaskDied
    from tasks.tokenizer import TokenizerError
    from tasks.warc import WarcError

    prefect_api()  # after the parameters were validated: bad input costs no server start
    try:
        return fn(*args, **kwargs)
    except (DownloadError, WarcError, FilterError, DedupError, TokenizerError, PretrainError, TaskDied) as e:
        raise RunFailed(str(e)) from None
    except Exception as e:
        from model.process import is_storage_error

        if not is_storage_error(e):
            raise
        # Storage gave up after its retries (S3 5xx, resets, a full disk...). The traceback is
        # in the run's log above; the last line says what failed, and nothing was committed.
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RunFailed(f"storage error in lake {kwargs.get('lake_url')}: {type(e).__name__}: {msg} "
                        "(no partial version was committed; rerun the same command to resume)") from None


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

    from model.process import die_with_parent

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


def _print_summary(m) -> None:
    from flows.pipeline import key_numbers

    out.print(f"{m.ref}: {key_numbers(m.kind, m.metrics)}")


def _input(lake: Lake, ref: str | None, default_kind: str) -> str:
    """A stage's input ref, resolved before any work (unknown refs fail fast, exit 2)."""
    return lake.resolve(ref or default_kind).ref


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


def cmd_stage_filter(lake: Lake, args) -> int:
    from flows.filter import filter as filter_flow
    from tasks.filter import FilterParams

    values = {"input": _input(lake, args.input, "download"), "extractor": args.extractor,
              "languages": args.languages.split(",") if args.languages else None,
              "language_threshold": args.language_threshold, "tasks": args.tasks, "workers": args.workers,
              **_override(args.set)}
    params = _params(FilterParams, **values)
    m = lake.resolve(_run_flow(filter_flow, params, lake_url=lake.url))
    _print_summary(m)
    funnel = Table(title="filter funnel")
    for col in ("step", "docs in", "docs out", "bytes in", "bytes out"):
        funnel.add_column(col, justify="left" if col == "step" else "right")
    for r in m.metrics["funnel"]:
        funnel.add_row(r["step"], str(r["docs_in"]), str(r["docs_out"]), human_bytes(r["bytes_in"]),
                       human_bytes(r["bytes_out"]))
    out.print(funnel)
    return 0


def cmd_stage_dedup(lake: Lake, args) -> int:
    from flows.dedup import dedup as dedup_flow
    from tasks.dedup import DedupParams

    values = {"input": _input(lake, args.input, "filter"), "tasks": args.tasks, "workers": args.workers,
              **_override(args.set)}
    params = _params(DedupParams, **values)
    m = lake.resolve(_run_flow(dedup_flow, params, lake_url=lake.url))
    _print_summary(m)
    return 0


def cmd_stage_download(lake: Lake, args) -> int:
    from flows.download import download
    from tasks.download import DownloadParams

    if not (args.crawl or args.urls or args.files):
        args.crawl = "latest"
    params = _params(DownloadParams, crawl=args.crawl, base_url=args.base_url, format=args.format,
                     segments=args.segments, seed=args.seed, max_records=args.max_records,
                     urls=args.urls, files=args.files, concurrency=args.concurrency,
                     retries=args.retries, timeout=args.timeout)
    ref = _run_flow(download, params, lake_url=lake.url)
    _print_summary(lake.resolve(ref))
    return 0


def cmd_stage_tokenizer(lake: Lake, args) -> int:
    from flows.tokenizer import tokenizer as tokenizer_flow
    from tasks.tokenizer import TokenizerParams

    values = {"input": _input(lake, args.input, "dedup"),
              "extra": [lake.resolve(r).ref for r in (args.extra or [])] or None,
              "vocab_size": args.vocab_size, "sample_bytes": args.sample_bytes, **_override(args.set)}
    params = _params(TokenizerParams, **values)
    m = lake.resolve(_run_flow(tokenizer_flow, params, lake_url=lake.url))
    _print_summary(m)
    return 0


def cmd_stage_shard(lake: Lake, args) -> int:
    from flows.shard import shard as shard_flow
    from tasks.shard import ShardParams

    values = {"input": _input(lake, args.input, "dedup"), "tokenizer": _input(lake, args.tokenizer, "tokenizer"),
              "val_fraction": args.val_fraction, "shard_tokens": args.shard_tokens, **_override(args.set)}
    params = _params(ShardParams, **values)
    m = lake.resolve(_run_flow(shard_flow, params, lake_url=lake.url))
    _print_summary(m)
    return 0


def cmd_stage_pretrain(lake: Lake, args) -> int:
    from flows.pretrain import pretrain as pretrain_flow
    from tasks.pretrain import PretrainParams

    values = {"input": _input(lake, args.input, "shard"), "preset": args.preset, "max_steps": args.max_steps,
              "nproc_per_node": args.nproc_per_node, "nnodes": args.nnodes, "rdzv_endpoint": args.rdzv_endpoint,
              "compile": args.compile or None, **_override(args.set)}
    params = _params(PretrainParams, **values)
    m = lake.resolve(_run_flow(pretrain_flow, params, lake_url=lake.url))
    _print_summary(m)
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
    from flows.pipeline import STAGES, PipelineParams, pipeline, summary_rows, summary_table
    from tasks.presets import preset

    try:
        base = preset(args.preset, "file://" + os.path.abspath("demo-mirror") + "/")
    except ValueError as e:
        raise UsageError(str(e)) from None
    values = {**{k: v.model_dump() for k, v in base.items()}, "from_stage": args.from_stage or STAGES[0],
              "to_stage": args.to_stage or STAGES[-1], "rebuild": args.rebuild or []}
    for stage, fields in _override(args.set).items():
        if stage not in STAGES or not isinstance(fields, dict):
            raise UsageError(f"invalid --set {stage!r}: expected STAGE.FIELD=VALUE with STAGE one of {', '.join(STAGES)}")
        values[stage] = {**values[stage], **fields}
    params = _params(PipelineParams, **values)
    refs = _run_flow(pipeline, params, lake_url=lake.url)
    out.print(summary_table("pipeline", summary_rows(lake, refs, {})))
    return 0


def cmd_sample(lake: Lake, args) -> int:
    from model.sample import generate_text

    m = lake.resolve(args.model)
    if m.kind != "pretrain":
        raise UsageError(f"--model must be a pretrain version, not {m.ref}")
    text = generate_text(lake.file_uri(m, "final"), args.prompt, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    print(text)
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> Parser:
    p = Parser(prog="crawl2model", description="From a Common Crawl dump to a pretrained language "
               "model, as Prefect flows over a versioned lake.")
    p.add_argument("--lake", help="lake root URL: a folder or s3://bucket/prefix "
                   "(default: $CRAWL2MODEL_LAKE, then ./lake)")
    p.add_argument("--s3-endpoint", help="S3 API endpoint URL (default: $AWS_ENDPOINT_URL)")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    dm = sub.add_parser("demo", help="offline end-to-end run on the embedded defaults")
    dm.set_defaults(func=cmd_demo)

    run = sub.add_parser("run", help="the pipeline: download -> filter -> dedup -> tokenizer -> shard -> pretrain")
    run.add_argument("--preset", choices=["demo", "small", "gpt2"], default="demo")
    run.add_argument("--from", dest="from_stage", choices=list(_STAGES))
    run.add_argument("--to", dest="to_stage", choices=list(_STAGES))
    run.add_argument("--rebuild", action="append", choices=list(_STAGES), help="build this stage again")
    run.add_argument("--set", action="append", metavar="STAGE.FIELD=VALUE",
                     help="override a stage parameter, e.g. pretrain.max_steps=100")
    run.set_defaults(func=cmd_run)

    smp = sub.add_parser("sample", help="generate text with a trained model")
    smp.add_argument("--model", required=True, help="pretrain version (e.g. pretrain@latest)")
    smp.add_argument("--prompt", required=True)
    smp.add_argument("--max-new-tokens", type=int, default=100)
    smp.add_argument("--temperature", type=float, default=0.8)
    smp.add_argument("--top-k", type=int, default=50)
    smp.add_argument("--top-p", type=float, default=None)
    smp.add_argument("--seed", type=int, default=0)
    smp.set_defaults(func=cmd_sample)

    mir = sub.add_parser("demo-mirror", help="build a small Common Crawl-layout mirror in DIR")
    mir.add_argument("dir")
    mir.add_argument("--files", type=int, default=4, help="WARC files in the mirror")
    mir.set_defaults(func=cmd_demo_mirror)

    stage = sub.add_parser("stage", help="run one stage on its own")
    ssub = stage.add_subparsers(dest="stage", required=True, parser_class=Parser)
    dl = ssub.add_parser("download", help="Common Crawl WARC files into the lake")
    src = dl.add_mutually_exclusive_group()
    src.add_argument("--crawl", help="crawl id (CC-MAIN-2024-51) or 'latest' (the default)")
    src.add_argument("--urls", nargs="+", metavar="URL", help="explicit WARC URLs")
    src.add_argument("--files", nargs="+", metavar="PATH", help="explicit local WARC files")
    dl.add_argument("--base-url", help="Common Crawl root (default https://data.commoncrawl.org/)")
    dl.add_argument("--format", choices=["warc", "wet"])
    dl.add_argument("--segments", type=int, help="files to pick, spread across the crawl")
    dl.add_argument("--seed", type=int, help="seed of the file selection")
    dl.add_argument("--max-records", type=int, help="keep only the first N records of each file")
    dl.add_argument("--concurrency", type=int, help="parallel transfers (default 4)")
    dl.add_argument("--retries", type=int, help="retries per file (default 6)")
    dl.add_argument("--timeout", type=float, help="seconds without data before a retry (default 60)")
    dl.set_defaults(func=cmd_stage_download)

    flt = ssub.add_parser("filter", help="WARC -> text -> FineWeb quality filters -> Parquet")
    flt.add_argument("--input", help="download version (default: download@latest)")
    flt.add_argument("--extractor", choices=["trafilatura", "resiliparse"])
    flt.add_argument("--languages", help="comma-separated ISO 639-1 codes to keep (default: en)")
    flt.add_argument("--language-threshold", type=float)
    flt.add_argument("--tasks", type=int, help="datatrove tasks (default 4)")
    flt.add_argument("--workers", type=int, help="parallel processes (default 2)")
    flt.add_argument("--set", action="append", metavar="FIELD=VALUE",
                     help="any other parameter, e.g. gopher_quality.min_doc_words=30 or pii=false")
    flt.set_defaults(func=cmd_stage_filter)
    dd = ssub.add_parser("dedup", help="exact + MinHash near-duplicate removal")
    dd.add_argument("--input", help="filter version (default: filter@latest)")
    dd.add_argument("--tasks", type=int)
    dd.add_argument("--workers", type=int)
    dd.add_argument("--set", action="append", metavar="FIELD=VALUE",
                    help="any other parameter, e.g. num_buckets=20 or exact=false")
    dd.set_defaults(func=cmd_stage_dedup)

    tk = ssub.add_parser("tokenizer", help="train a sentencepiece BPE tokenizer on the corpus")
    tk.add_argument("--input", help="dedup version (default: dedup@latest)")
    tk.add_argument("--extra", nargs="+", metavar="REF", help="ingest versions of extra text to add")
    tk.add_argument("--vocab-size", type=int, help="default 32768")
    tk.add_argument("--sample-bytes", type=int, help="training sample size (default 200 MB)")
    tk.add_argument("--set", action="append", metavar="FIELD=VALUE")
    tk.set_defaults(func=cmd_stage_tokenizer)
    sh = ssub.add_parser("shard", help="tokenise the corpus into Parquet token shards")
    sh.add_argument("--input", help="dedup version (default: dedup@latest)")
    sh.add_argument("--tokenizer", help="tokenizer version (default: tokenizer@latest)")
    sh.add_argument("--val-fraction", type=float)
    sh.add_argument("--shard-tokens", type=int)
    sh.add_argument("--set", action="append", metavar="FIELD=VALUE")
    sh.set_defaults(func=cmd_stage_shard)

    pt = ssub.add_parser("pretrain", help="train a GPT with torchrun on a shard version")
    pt.add_argument("--input", help="shard version (default: shard@latest)")
    pt.add_argument("--preset", choices=["tiny", "gpt2-small", "gpt2-medium", "1b"])
    pt.add_argument("--max-steps", type=int)
    pt.add_argument("--nproc-per-node", type=int)
    pt.add_argument("--nnodes", type=int)
    pt.add_argument("--rdzv-endpoint", help="HOST:PORT for multi-node rendezvous")
    pt.add_argument("--compile", action="store_true")
    pt.add_argument("--set", action="append", metavar="FIELD=VALUE", help="e.g. lr=3e-4 or batch_size=16")
    pt.set_defaults(func=cmd_stage_pretrain)

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
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except LakeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:  # --help
        return int(e.code or 0)


if __name__ == "__main__":
    sys.exit(main())
