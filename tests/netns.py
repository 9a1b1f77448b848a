"""Network namespaces for tests of daemons that listen on every interface (Ray, Slurm): in a
namespace of their own only loopback exists, so nothing they open reaches beyond it."""

from __future__ import annotations

import os
import signal
import subprocess
import uuid

from tests.conftest import temp_server_env


def netns_available() -> bool:
    name = f"c2m-probe-{os.getpid()}"
    ok = subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode == 0
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return ok


class Namespace:
    """A network namespace with loopback up; commands run in it with `run`/`popen`."""

    def __init__(self, tag: str):
        self.name = f"c2m-{tag}-{uuid.uuid4().hex[:6]}"
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        subprocess.run(["ip", "netns", "exec", self.name, "ip", "link", "set", "lo", "up"], check=True)
        # a user's environment, less the session's Prefect server (out of reach in here: the CLI
        # starts its temporary one) and the Ray variables a developer may have set
        self.env = {k: v for k, v in temp_server_env().items() if not k.startswith("RAY_")}
        # no token: a Ray that finds ~/.ray/auth_token (left by an earlier `ray.init()`) otherwise
        # wants it from every client; loopback in a namespace of its own is the protection here
        self.env["RAY_AUTH_MODE"] = "disabled"

    def argv(self, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *cmd]

    def run(self, *cmd: str, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(*cmd), capture_output=True, text=True, timeout=timeout,
                              env={**self.env, **kw.pop("env", {})}, **kw)

    def popen(self, *cmd: str, **kw) -> subprocess.Popen:
        return subprocess.Popen(self.argv(*cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**self.env, **kw.pop("env", {})}, **kw)

    def pids(self) -> list[int]:
        r = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True)
        return [int(p) for p in r.stdout.split()]

    def listeners(self) -> list[str]:
        """The local address of every TCP socket listening in the namespace."""
        r = subprocess.run(self.argv("ss", "-ltnH"), capture_output=True, text=True, check=True)
        return [line.split()[3] for line in r.stdout.splitlines()]

    def close(self) -> None:
        for pid in self.pids():  # Ray's daemons and workers: every process that lives in here
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
