"""Serve every crawl2model deployment (deployments/spec.py) from this process: deployments
without workers. With a Prefect server running, the UI lists them and can run any stage on its
own, or the whole pipeline, from a form. `--start-server` also starts that server (on
127.0.0.1:4200, or --port) and stops it on exit: `make server` runs this.

SIGTERM or SIGINT stops it within seconds: Prefect's runner is asked to stop (it cancels the
flow runs in flight); whatever is still running after a grace period is killed, the flow runs'
own processes and the server with it.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time

GRACE_S = 6.0  # then everything below us is killed: the whole stop stays under 10 s


def runner_deployments() -> list:
    import importlib

    from deployments.spec import deployments

    out = []
    for d in deployments():
        path, name = d["entrypoint"].split(":")  # flows/stages.py:download -> flows.stages, download
        fl = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)
        kw = {"parameters": d["parameters"]} if "parameters" in d else {}
        if "schedule" in d:
            from prefect.schedules import Cron

            kw["schedule"] = Cron(d["schedule"]["cron"], timezone=d["schedule"]["timezone"])
        out.append(fl.to_deployment(name=d["name"], description=d["description"], tags=d["tags"], **kw))
    return out


def start_server(port: int) -> tuple[subprocess.Popen, str]:
    """`prefect server start` on loopback, in a process group of its own that dies with us."""
    import urllib.request

    from common.process import die_with_parent

    env = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", **os.environ}
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, start_new_session=True, preexec_fn=die_with_parent)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"error: the Prefect server exited with status {proc.returncode} before it was ready")
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1).read()
            return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"error: the Prefect server did not answer on {url} within 120 s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployments.serve", description=__doc__.split("\n")[0])
    parser.add_argument("--start-server", action="store_true", help="start a Prefect server on loopback first")
    parser.add_argument("--port", type=int, default=4200)
    args = parser.parse_args(argv)

    from common.process import kill_descendants

    def stop_hard() -> None:  # the runner did not stop in time: kill everything below us, then us
        time.sleep(GRACE_S)
        kill_descendants()
        os._exit(143)

    server = None
    try:
        if args.start_server:
            server, os.environ["PREFECT_API_URL"] = start_server(args.port)
            print(f"Prefect UI: http://127.0.0.1:{args.port}", flush=True)

        import asyncio

        from prefect.runner import Runner

        runner = Runner(name="crawl2model", pause_on_shutdown=False)
        served = runner_deployments()
        for d in served:
            runner.add_deployment(d)
        print(f"serving {len(served)} deployments: {', '.join(d.name for d in served)}", flush=True)
        graceful = runner.handle_sigterm

        def on_signal(signum, frame) -> None:
            print(f"{signal.Signals(signum).name} received: stopping", file=sys.stderr, flush=True)
            threading.Thread(target=stop_hard, daemon=True).start()
            graceful()

        runner.handle_sigterm = on_signal  # Runner.start() installs it for SIGTERM
        signal.signal(signal.SIGINT, on_signal)
        asyncio.run(runner.start())
    except KeyboardInterrupt:
        pass
    finally:
        kill_descendants()  # flow runs still going, the server
    return 0


if __name__ == "__main__":
    sys.exit(main())
