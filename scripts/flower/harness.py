"""Loopback Flower deployment harness: a SuperLink, N SuperNodes and ``flwr run``.

Used by the tests (``tests/flower_harness.py`` re-exports it) and usable by hand::

    from harness import Deployment
    with Deployment(workdir, app_dir) as dep:
        dep.start_superlink()
        dep.add_supernode("C0", {"client-id": "C0", "data-path": "...", "state-dir": "..."})
        res = dep.run({"task": "train", "config": "...", "run-dir": str(run_dir)}, timeout=300)

Every process gets its own ``FLWR_HOME`` under ``workdir`` (as if on its own machine), its
own free loopback port(s), and runs in its own process group; ``close()`` (also on
``__exit__`` and at interpreter exit) kills every process and every descendant it can
find. Nothing binds or connects outside 127.0.0.1. Runtime dependency installation,
telemetry and the update check are switched off.

TLS: ``Deployment(..., certs=dir)`` with the files from ``make_certs.sh`` (``ca.crt``,
``server.crt``, ``server.key``); ``node_auth=True`` adds ``--enable-supernode-auth`` and
``add_supernode(..., auth_key=path)`` registers the key's ``.pub`` with
``flwr supernode register`` before the SuperNode starts. ``start_gateway()`` puts HAProxy with
``fleet-gateway.cfg`` in front of the SuperLink: SuperNodes added afterwards connect through it
(Fleet API only), the ``flwr`` CLI keeps talking to the SuperLink itself.
"""

from __future__ import annotations

import atexit
import os
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

BIN = Path(sys.executable).parent
GATEWAY_CONFIG = Path(__file__).with_name("fleet-gateway.cfg")
_LIVE: "weakref.WeakSet[Deployment]" = weakref.WeakSet()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def base_env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_SUPEREXEC_TASK_POLL_INTERVAL="0.1",  # a node starts a ClientApp 0.1 s after a message, not 1 s
        PYTHONUNBUFFERED="1",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
    )
    return env


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    s = str(v)
    if "'" in s:
        raise ValueError(f"value {s!r} may not contain a single quote")
    return f"'{s}'"


def kv_string(d: dict[str, Any]) -> str:
    """``{"a": 1, "b": "x"}`` -> ``a=1 b='x'`` (the format of --node-config / --run-config)."""
    return " ".join(f"{k}={toml_value(v)}" for k, v in d.items())


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path
    descendants: set[int] = field(default_factory=set)

    def alive(self) -> bool:
        return self.popen.poll() is None


class Deployment:
    def __init__(
        self,
        workdir: Path,
        app_dir: Path,
        certs: Path | None = None,
        node_auth: bool = False,
        node_threads: int | None = None,
        server_threads: int | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.app_dir = Path(app_dir)
        self.certs = Path(certs) if certs else None
        self.node_auth = node_auth
        # every party of a loopback deployment shares this machine's cores: torch's default of
        # one thread per core in each process oversubscribes them, and OpenMP's spinning
        # threads then slow every party down several times; benchmarks pass 1. Tests keep
        # torch's default (None): a different thread count sums in another order, and the
        # equivalence tests compare with an in-process twin
        self.node_threads, self.server_threads = node_threads, server_threads
        if node_auth and not certs:
            raise ValueError("SuperNode authentication needs TLS (certs=...)")
        self.procs: dict[str, Proc] = {}
        self.port: int | None = None
        self.fleet_port: int | None = None  # where SuperNodes connect: the gateway's, if any
        self.cli_home = self.workdir / "cli-home"
        _LIVE.add(self)

    # ------------------------------------------------------------------ processes
    def _spawn(self, name: str, cmd: list[str], home: Path, threads: int | None = None,
               extra_env: dict[str, str] | None = None) -> Proc:
        home.mkdir(parents=True, exist_ok=True)
        env = base_env(home) | (extra_env or {})
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        logf = self.workdir / f"{name}.log"
        fh = open(logf, "ab")
        fh.write(f"$ {shlex.join(cmd)}\n".encode())
        fh.flush()
        p = subprocess.Popen(
            cmd, cwd=self.workdir, env=env, stdout=fh, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        fh.close()
        proc = Proc(name, p, logf)
        self.procs[name] = proc
        return proc

    def _tls_args_server(self) -> list[str]:
        if self.certs is None:
            return ["--insecure"]
        c = self.certs
        return ["--ssl-ca-certfile", str(c / "ca.crt"), "--ssl-certfile", str(c / "server.crt"),
                "--ssl-keyfile", str(c / "server.key")]

    def start_superlink(self, timeout: float = 30.0, simulation: bool = False) -> int:
        """Start flower-superlink; ``simulation=True`` runs the simulation engine (no SuperNodes;
        pass ``federation_config={"num-supernodes": N}`` to :meth:`run`)."""
        self.port = free_port()
        cmd = [str(BIN / "flower-superlink"), *self._tls_args_server(),
               *(["--simulation"] if simulation else []),
               "--host", "127.0.0.1", "--port", str(self.port),
               "--database", str(self.workdir / "superlink-home" / "state.db")]
        if self.node_auth:
            cmd.append("--enable-supernode-auth")
        proc = self._spawn("superlink", cmd, self.workdir / "superlink-home", self.server_threads)
        self._write_cli_config()
        scheme = "https" if self.certs else "http"
        verify: Any = ssl.create_default_context(cafile=str(self.certs / "ca.crt")) if self.certs else False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not proc.alive():
                raise RuntimeError(f"flower-superlink exited early; see {proc.log}:\n{self.tail('superlink')}")
            try:
                if httpx.get(f"{scheme}://127.0.0.1:{self.port}/health", timeout=1.0, verify=verify).is_success:
                    return self.port
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"flower-superlink not ready in {timeout}s; see {proc.log}")

    def start_gateway(self, timeout: float = 30.0, config: Path = GATEWAY_CONFIG) -> int:
        """Start HAProxy with ``config`` (scripts/flower/fleet-gateway.cfg) in front of the
        SuperLink; SuperNodes added from now on connect through it (the Fleet API only), the
        ``flwr`` CLI does not. Needs TLS (``certs=``) and ``haproxy`` on PATH."""
        assert self.port is not None, "start_superlink() first"
        if self.certs is None:
            raise ValueError("the fleet gateway serves TLS only (certs=...)")
        haproxy = shutil.which("haproxy")
        if haproxy is None:
            raise FileNotFoundError("haproxy not found: scripts/setup.sh installs it (apt-get)")
        port = free_port()
        env = {"GATEWAY_BIND": f"127.0.0.1:{port}", "SUPERLINK": f"127.0.0.1:{self.port}",
               "CERTS": str(self.certs)}
        proc = self._spawn("gateway", [haproxy, "-db", "-f", str(config)],
                           self.workdir / "gateway-home", extra_env=env)
        verify = ssl.create_default_context(cafile=str(self.certs / "ca.crt"))
        deadline = time.monotonic() + timeout
        while True:
            if not proc.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"fleet gateway did not start:\n{self.tail('gateway')}")
            try:  # up once the SuperLink's health answers through it
                if httpx.get(f"https://127.0.0.1:{port}/health", timeout=1.0, verify=verify).is_success:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.fleet_port = port
        return port

    def _write_cli_config(self) -> None:
        self.cli_home.mkdir(parents=True, exist_ok=True)
        lines = ["[superlink]", 'default = "loop"', "", "[superlink.loop]",
                 f'address = "127.0.0.1:{self.port}"']
        if self.certs:
            lines.append(f'root-certificates = "{self.certs / "ca.crt"}"')
        else:
            lines.append("insecure = true")
        (self.cli_home / "config.toml").write_text("\n".join(lines) + "\n")

    def flwr(self, *args: str, timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess:
        """Run a ``flwr`` CLI command against this SuperLink (connection name ``loop``)."""
        cmd = [str(BIN / "flwr"), *args]
        res = subprocess.run(cmd, cwd=self.app_dir, env=base_env(self.cli_home), capture_output=True,
                             text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and res.returncode != 0:
            raise RuntimeError(f"{shlex.join(cmd)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
        return res

    def register(self, public_key: Path, name: str | None = None) -> str:
        args = ["supernode", "register", str(public_key), "loop"]
        if name:
            args += ["--name", name]
        return self.flwr(*args).stdout

    def add_supernode(self, name: str, node_config: dict[str, Any], auth_key: Path | None = None,
                      register: bool = True, max_retries: int | None = None) -> Proc:
        assert self.port is not None, "start_superlink() first"
        if auth_key is not None and register:
            self.register(Path(str(auth_key) + ".pub"), name=name)
        cmd = [str(BIN / "flower-supernode"),
               *(["--root-certificates", str(self.certs / "ca.crt")] if self.certs else ["--insecure"]),
               "--superlink", f"127.0.0.1:{self.fleet_port or self.port}",
               "--host", "127.0.0.1", "--port", str(free_port()),
               "--node-config", kv_string(node_config)]
        if auth_key is not None:
            cmd += ["--auth-supernode-private-key", str(auth_key)]
        if max_retries is not None:
            cmd += ["--max-retries", str(max_retries)]
        return self._spawn(name, cmd, self.workdir / f"{name}-home", self.node_threads)

    def run(self, run_config: dict[str, Any], timeout: float = 300.0,
            federation_config: dict[str, Any] | None = None) -> subprocess.CompletedProcess:
        """``flwr run . loop --stream -c ...``; returns when the run ends (or raises on timeout)."""
        cmd = [str(BIN / "flwr"), "run", str(self.app_dir), "loop", "--stream",
               "--run-config", kv_string(run_config)]
        if federation_config:
            cmd += ["--federation-config", kv_string(federation_config)]
        logf = self.workdir / "flwr-run.log"
        with open(logf, "ab") as fh:
            fh.write(f"$ {shlex.join(cmd)}\n".encode())
            fh.flush()
            p = subprocess.Popen(cmd, cwd=self.app_dir, env=base_env(self.cli_home), stdout=fh,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True)
            self.procs["flwr-run"] = Proc("flwr-run", p, logf)
            try:
                rc = p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill("flwr-run")
                raise TimeoutError(f"flwr run did not end within {timeout}s; see {logf}:\n"
                                   + self.tail("flwr-run", 40)) from None
        return subprocess.CompletedProcess(cmd, rc, logf.read_text(errors="replace"), "")

    # ------------------------------------------------------------------ teardown
    def _snapshot_descendants(self, proc: Proc) -> None:
        try:
            import psutil

            proc.descendants |= {c.pid for c in psutil.Process(proc.popen.pid).children(recursive=True)}
        except Exception:
            pass

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.get(name)
        if proc is None:
            return
        self._snapshot_descendants(proc)
        # the main process leads its own process group (start_new_session=True)
        targets = [(os.killpg, proc.popen.pid)] if proc.alive() else []
        targets += [(os.kill, pid) for pid in proc.descendants]
        for fn, pid in targets:
            try:
                fn(pid, sig)
            except (ProcessLookupError, PermissionError, OSError):
                pass
        try:
            proc.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def kill_app(self, program: str, sig: int = signal.SIGKILL) -> int:
        """Send ``sig`` to every running ``program`` (``flwr-serverapp``, ``flwr-clientapp``)
        started by this deployment's processes; returns how many were signalled."""
        import psutil

        hit = 0
        for proc in list(self.procs.values()):
            try:
                children = psutil.Process(proc.popen.pid).children(recursive=True)
            except psutil.Error:
                continue
            for child in children:
                try:
                    if any(program in part for part in child.cmdline()[:2]):
                        child.send_signal(sig)
                        hit += 1
                except psutil.Error:
                    pass
        return hit

    def tail(self, name: str, n: int = 25) -> str:
        logf = self.workdir / f"{name}.log"
        if not logf.exists():
            return ""
        return "\n".join(logf.read_text(errors="replace").splitlines()[-n:])

    def close(self) -> None:
        for proc in self.procs.values():
            self._snapshot_descendants(proc)
        for name in reversed(list(self.procs)):
            self.kill(name, signal.SIGTERM)
        time.sleep(0.2)
        for name in reversed(list(self.procs)):
            self.kill(name, signal.SIGKILL)

    def __enter__(self) -> "Deployment":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@atexit.register
def _close_all() -> None:
    for dep in list(_LIVE):
        try:
            dep.close()
        except Exception:
            pass
