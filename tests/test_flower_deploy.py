"""Real Flower deployment on loopback: flower-superlink + flower-supernode + flwr run.

These tests start real processes (SuperLink, SuperNodes, SuperExec, ServerApp and
ClientApp subprocesses) on 127.0.0.1 with free ports; every process is killed at the end.
Each ClientApp message is a fresh process that imports torch and diffusers (seconds), so the
checks share runs: one insecure deployment covers two rounds, inference, equivalence with the
in-process engine, a node killed mid-run, its return, and a restarted server; one TLS run with
SuperNode authentication follows docs/deployment.md, its hospitals going through the fleet
gateway (HAProxy with scripts/flower/fleet-gateway.cfg) while it is attacked.
"""

from __future__ import annotations

import json
import re
import selectors
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")
pytestmark = pytest.mark.flower  # a SuperLink, SuperNodes and ServerApps on loopback

import torch  # noqa: E402
from flower_harness import ROOT, Deployment, make_certs  # noqa: E402
from test_flower import assert_same_models, tiny_config, two_class_config  # noqa: E402

from collafuse.cli import main  # noqa: E402
from collafuse.config import load_config  # noqa: E402
from collafuse.data import save_images  # noqa: E402
from collafuse.engines.local import run_training  # noqa: E402
from collafuse.factory import load_client_data  # noqa: E402


def _hospitals(tmp_path, cfg_path):
    """Each hospital's own images on its own disk, and its --node-config. As docs/deployment.md
    section 2: a hospital holds its whole partition; its node applies the run's
    client_holdout_fraction and max_images_per_client, so it trains and evaluates on exactly the
    images the in-process engine gives that client."""
    whole = ["data.client_holdout_fraction=0.0", "data.max_images_per_client=0"]
    parts = load_client_data(load_config(cfg_path, whole)).clients
    node_cfg = {}
    for cid, part in parts.items():
        save_images(part, tmp_path / f"{cid}.npz")
        node_cfg[cid] = {"client-id": cid, "data-path": str(tmp_path / f"{cid}.npz"),
                         "state-dir": str(tmp_path / f"state-{cid}")}
    return node_cfg


def _metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _node_state(tmp_path, cid):
    """What a node saved: its client's state, the last round it trained, its kept replies."""
    return torch.load(tmp_path / f"state-{cid}" / "client.pt", weights_only=True)


def _server_state(run_dir):
    return torch.load(run_dir / "server.pt", weights_only=True)


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


FLEET = "POST /v1/fleet/pull-messages"
# request lines the gateway must refuse (403) before the SuperLink sees them: the operator's
# Control API, the Runtime API, and the Fleet paths spelled in ways a lax proxy might normalise
REFUSED = [
    "POST /v1/control/list-runs", "GET /v1/control/list-runs", "POST /v1/control/start-run",
    "POST /v1/runtime/get-nodes", "GET /docs", "GET /openapi.json", "PUT /v1/fleet/pull-messages",
    "GET /v1/fleet/pull-messages", "DELETE /health", "POST /health",
    "POST /v1/fleet/../control/list-runs", "POST /v1/fleet/%2e%2e/control/list-runs",
    "POST /v1/fleet/%2E%2E/control/list-runs", "POST /v1/fleet/..%2fcontrol/list-runs",
    "POST /v1/fleet/%2fv1/control/list-runs", "POST //v1/control/list-runs",
    "POST /v1/fleet//pull-messages", "POST /v1//fleet/pull-messages", "POST /V1/FLEET/pull-messages",
    "POST /v1/Fleet/pull-messages", "POST /v1/fleet/Pull-Messages", "POST /v1/fleet/pull-messages/",
    "POST /v1/fleet/pull-messages?x=1", "POST /v1/fleet/pull%2dmessages",
    "POST /v1/fleet/./pull-messages", "POST https://127.0.0.1/v1/control/list-runs",
    "POST /v1/fleet/pull-messages;/../../control/list-runs", "POST *",
]
GATEWAY_HEAD_TIMEOUT = 5.0  # fleet-gateway.cfg's timeout http-request
GATEWAY_CLIENT_TIMEOUT = 15.0  # and its timeout client


class GatewayAttack:
    """What the adversarial test of the old gateway did, aimed at the gateway while the
    hospitals train through it: 500 idle connections (each reopened when the gateway drops it),
    six connections declaring 64 MiB bodies (three trickle bytes, three send none), refused
    paths, a request head and a body that stall. Loopback only; it stops by itself."""

    IDLE, BIG = 500, 6

    def __init__(self, port: int, ca: Path, duration: float):
        self.port, self.duration, self.stop = port, duration, threading.Event()
        self.tls = ssl.create_default_context(cafile=str(ca))
        self.status: dict[str, int] = {}  # request line -> status
        self.big: list[tuple[int, float]] = []  # (status, seconds) per 64 MiB declaration
        self.stalls: dict[str, tuple[int, float]] = {}  # what stalled -> (status, seconds)
        self.idle_dropped_after: float | None = None  # first idle connection closed after (s)
        self.reopened = 0
        self.base_rss_kb = self.max_rss_kb = 0  # the gateway's resident memory before and during
        self.errors: list[str] = []

    def _connect(self, tls: bool = True) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        return self.tls.wrap_socket(sock, server_hostname="localhost") if tls else sock

    def _status(self, sock: socket.socket, timeout: float = 30.0) -> tuple[int, float]:
        """The status the gateway answers with (0: it closed without one), and when."""
        start, data = time.monotonic(), b""
        sock.settimeout(timeout)
        try:
            while b"\r\n" not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
        except OSError:
            pass
        m = re.match(rb"HTTP/1\.[01] (\d{3})", data)
        return (int(m.group(1)) if m else 0), time.monotonic() - start

    def request(self, line: str, body: bytes = b"") -> int:
        with self._connect() as sock:
            sock.sendall(f"{line} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/protobuf"
                         f"\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            return self._status(sock)[0]

    def _declare_big(self, trickle: bool) -> None:
        with self._connect() as sock:
            sock.sendall(b"POST /v1/fleet/push-object HTTP/1.1\r\nHost: localhost\r\n"
                         b"Content-Type: application/protobuf\r\nContent-Length: 67108864\r\n\r\n")
            if trickle:
                sock.sendall(b"\0" * 1024)
            self.big.append(self._status(sock))

    def _stall(self, what: str, head: bytes) -> None:
        with self._connect() as sock:
            sock.sendall(head)
            self.stalls[what] = self._status(sock, 3 * GATEWAY_CLIENT_TIMEOUT)

    def _rss_kb(self, pid: int) -> int:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def run(self, gateway_pid: int) -> None:
        try:
            self._run(gateway_pid)
        except Exception as err:  # reported by the test, not lost in a thread
            self.errors.append(f"{type(err).__name__}: {err}")

    def _run(self, gateway_pid: int) -> None:
        deadline = time.monotonic() + self.duration
        self.base_rss_kb = self._rss_kb(gateway_pid)
        sel = selectors.DefaultSelector()
        opened = time.monotonic()
        for _ in range(self.IDLE):  # plain TCP, no TLS handshake, no byte sent
            sel.register(self._connect(tls=False), selectors.EVENT_READ)
        threads = [threading.Thread(target=self._declare_big, args=(i % 2 == 0,))
                   for i in range(self.BIG)]
        threads += [threading.Thread(target=self._stall, args=args) for args in (
            ("head", b"POST /v1/fleet/pull-messages HTTP/1.1\r\nHost: localhost\r\n"),
            ("body", b"POST /v1/fleet/push-messages HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
                     b"application/protobuf\r\nContent-Length: 1000\r\n\r\n\0\0\0"))]
        for th in threads:
            th.start()
        for line in REFUSED:
            self.status[line] = self.request(line)
        self.status[FLEET] = self.request(FLEET)  # reaches the SuperLink (no node key: 4xx)
        self.status["GET /health"] = self.request("GET /health")
        while time.monotonic() < deadline and not self.stop.is_set():
            self.max_rss_kb = max(self.max_rss_kb, self._rss_kb(gateway_pid))
            for key, _ in sel.select(timeout=0.5):  # dropped by the gateway: open another
                if self.idle_dropped_after is None:
                    self.idle_dropped_after = time.monotonic() - opened
                sel.unregister(key.fileobj)
                key.fileobj.close()
                if time.monotonic() < deadline and not self.stop.is_set():
                    sel.register(self._connect(tls=False), selectors.EVENT_READ)
                    self.reopened += 1
        for key in list(sel.get_map().values()):
            key.fileobj.close()
        sel.close()
        for th in threads:
            th.join(60)


def _pushed_bytes(gateway_log: str) -> list[int]:
    """The body size of every message part a hospital pushed through the gateway (its log)."""
    return [int(m.group(1)) for m in re.finditer(
        r"POST /v1/fleet/push-[a-z]+ 200 content-length=(\d+)", gateway_log)]


EVALUATE_N = 4  # samples each hospital finishes and evaluates on its node (32x32, 1 channel)
SERVER_FILES = {"config.toml", "server.pt", "metrics.jsonl", "flower-result.json",
                "flower-nodes.json", "results.csv", "results.json", "report.md"}


def _assert_sampled_and_evaluated(tmp_path, run_dir, log: str, pushes: list[int], capsys) -> None:
    """task='sample' left each hospital's images on its disk; task='evaluate' brought numbers
    only to the server: every part pushed is smaller than the samples as uint8, the server
    keeps tables of numbers (results, report) and no image or array file."""
    import csv

    from collafuse.evaluation.federated import FIGURES

    clients = ["DU", "HT", "FG"]
    result = json.loads((run_dir / "flower-result.json").read_text())
    assert {c: result["samples"][c]["num-images"] for c in clients} == dict.fromkeys(clients, 4)
    for cid in clients:
        with np.load(tmp_path / f"state-{cid}" / "samples" / f"{cid}.npz") as z:
            assert z["images"].shape[0] == 4 and z["images"].dtype == np.uint8
    assert result["evaluated"] == dict.fromkeys(clients, EVALUATE_N)
    assert "evaluation: 3/3 clients evaluated" in log, log[-3000:]
    samples_uint8 = EVALUATE_N * 32 * 32
    assert pushes and max(pushes) < samples_uint8, pushes
    with capsys.disabled():
        print(f"evaluation run: {len(pushes)} parts pushed through the gateway, largest "
              f"{max(pushes)} bytes (the samples as uint8: {samples_uint8})")
    rows = list(csv.DictReader((run_dir / "results.csv").open()))
    assert [r["client"] for r in rows] == clients
    assert all(r[f] != "" and np.isfinite(float(r[f])) for r in rows for f in FIGURES), rows
    for row in json.loads((run_dir / "results.json").read_text()):
        assert all(isinstance(v, (int, float, str)) for v in row.values()), row
    report = (run_dir / "report.md").read_text()
    assert all(f"| {c} |" in report for c in clients), report
    assert {p.name for p in run_dir.iterdir() if p.is_file()} <= SERVER_FILES
    assert not [p for p in run_dir.rglob("*") if p.suffix in (".npz", ".png", ".npy")]
    assert str(tmp_path / "state-") not in (run_dir / "flower-result.json").read_text()


def test_deploy_rounds_inference_equivalence_faults_and_resume(tmp_path):
    """SuperLink + two SuperNodes (insecure loopback), tiny preset, noisy-data protocol.

    Run 1: two rounds and one split inference; models equal the in-process engine's.
    Run 2 (the server restarted on the same run-dir, 7 rounds): it resumes after round 2;
    HT's SuperNode is SIGKILLed as round 3's request reaches it and started again with the same
    state-dir: round 3 goes on with DU alone (logged), and HT is back, resuming from its disk,
    once the SuperLink has marked its killed node offline (about a minute). The ServerApp is
    SIGKILLed once the first round HT served again is saved, while the next round's requests
    are out. Run 3 (the same command again): resumes there; the nodes answer the next round
    from their stored replies, so no node trains a round twice. Run 4 (task='sample') only
    samples.
    """
    cfg_path = tiny_config(tmp_path, protocol="noisy-data")
    cfg = load_config(cfg_path)
    node_cfg = _hospitals(tmp_path, cfg_path)
    run_dir = tmp_path / "run"
    rc = {"task": "train", "config": str(cfg_path), "run-dir": str(run_dir), "min-nodes": 2,
          "identity": "node-report",  # insecure loopback: no registered names to bind to
          "round-timeout": 180.0}  # generous: a loaded 2-core CI machine is slow
    with Deployment(tmp_path / "dep", ROOT) as dep:
        dep.start_superlink()
        for cid in node_cfg:
            dep.add_supernode(cid, node_cfg[cid])
        res = dep.run({**rc, "sample-n": 4}, timeout=240)
        assert res.returncode == 0, res.stdout

        # --- run 1: two rounds, inference, outputs, same models as in-process
        result = json.loads((run_dir / "flower-result.json").read_text())
        assert result["rounds"] == 2 and result["clients"] == ["DU", "HT"]
        for cid in node_cfg:
            out = tmp_path / f"state-{cid}" / "samples"
            assert (out / f"{cid}.png").stat().st_size > 0
            with np.load(out / f"{cid}.npz") as z:
                assert z["images"].shape[0] == 4 and z["images"].dtype == np.uint8
            # the server keeps names and counts, never where the node keeps its files
            assert result["samples"][cid] == {"num-images": 4, "png": f"{cid}.png",
                                              "npz": f"{cid}.npz"}
        assert str(tmp_path) not in (run_dir / "flower-result.json").read_text()
        # each node made its secret on its own disk; the in-process twin gets the same ones
        secrets = {cid: (tmp_path / f"state-{cid}" / f"{cid}.key").read_bytes() for cid in node_cfg}
        local = run_training(cfg, tmp_path / "local", progress=False, secrets=secrets)
        assert_same_models(local.server.model.state_dict(), _server_state(run_dir)["server"]["model"])
        for cid, client in local.clients.items():
            state = _node_state(tmp_path, cid)
            assert_same_models(client.model.state_dict(), state["client"]["model"])
            assert state["round"] == 2 and state["client"]["steps"] == 2

        # --- run 2: restarted server resumes; a node is SIGKILLed mid-round and comes back;
        # then the server is SIGKILLed after saving the first round HT served again
        killed_after = []

        def faults():
            # HT's third train message is round 3's (run 1 sent two): it dies receiving it
            _wait_for(lambda: dep.tail("HT", 10**6).count("Receiving: train message") >= 3, 250,
                      "round 3 never reached HT")
            dep.kill("HT", signal.SIGKILL)
            dep.add_supernode("HT", node_cfg["HT"])  # same state-dir: resumes from disk
            _wait_for(lambda: "client HT is back on node" in dep.tail("flwr-run", 10**6), 300,
                      "HT never came back")
            # the round line is logged once the round is saved and the next is out
            done = re.compile(r"round (\d)/7: 2/2 clients")
            _wait_for(lambda: done.search(dep.tail("flwr-run", 10**6)), 300, "no round with HT")
            assert dep.kill_app("flwr-serverapp") >= 1
            killed_after.append(int(done.search(dep.tail("flwr-run", 10**6)).group(1)))
            dep.kill("flwr-run")

        th = threading.Thread(target=faults, daemon=True)
        th.start()
        try:
            dep.run({**rc, "rounds": 7}, timeout=600)
        except TimeoutError:
            pass  # the CLI may wait for a run whose ServerApp is gone; it was killed with it
        th.join(5)
        out2 = dep.tail("flwr-run", 10**6)
        saved = _server_state(run_dir)["progress"]["round"]
        assert killed_after and saved == killed_after[0] < 7, out2

        # --- run 3: the same command; the round after is answered from the nodes' stored replies
        res3 = dep.run({**rc, "rounds": 7}, timeout=300)
        assert res3.returncode == 0, res3.stdout
        resent = dep.tail("DU", 10**6).count("asked again; resending the stored reply")

        # --- sampling only, from the saved server: the samples of run 1 stay in the result
        res4 = dep.run({**rc, "task": "sample", "sample-n": 2}, timeout=300)
        assert res4.returncode == 0, res4.stdout
        result = json.loads((run_dir / "flower-result.json").read_text())
        assert result["rounds"] == 7 and set(result["samples"]) == {"DU", "HT"}
        assert all(result["samples"][c]["num-images"] == 2 for c in ("DU", "HT"))
    assert "resuming" in out2 and "after round 2" in out2
    assert "left out of this round" in out2
    assert f"after round {saved}" in res3.stdout
    assert resent >= 1
    lines = _metrics(run_dir)
    assert [x["round"] for x in lines] == list(range(1, 8))
    assert all(x["clients"] == ["DU", "HT"] for x in lines[:2])
    assert lines[2]["clients"] == ["DU"] and "HT" in lines[2]["problems"]
    assert lines[saved - 1]["clients"] == ["DU", "HT"] and lines[-1]["clients"] == ["DU", "HT"]
    assert all(x["bytes"]["DU"] > 0 and "DU" in x["client_loss"] for x in lines)
    ht_rounds = sum("HT" in x["clients"] for x in lines)
    for cid, steps in (("DU", 7), ("HT", ht_rounds)):  # exactly once: one step per round served
        state = _node_state(tmp_path, cid)
        assert state["round"] == 7 and state["client"]["steps"] == steps
    assert _server_state(run_dir)["server"]["steps"] == 7


def _assert_gateway_held(attack: GatewayAttack, attacker: threading.Thread, gateway_log: str,
                         capsys) -> None:
    """What the gateway did under GatewayAttack, while the hospitals trained through it."""
    assert not attack.errors and not attacker.is_alive(), attack.errors
    # 403 by the path filter; 400 where HAProxy finds the request line itself malformed (an
    # absolute URI whose host is not the Host header's)
    refused = {line: code for line, code in attack.status.items() if line in REFUSED}
    assert set(refused.values()) <= {400, 403}, refused
    assert all(refused[line] == 403 for line in REFUSED if line.split()[1].startswith("/v1/control"))
    assert 400 <= attack.status[FLEET] < 500 and attack.status[FLEET] != 403, attack.status[FLEET]
    assert attack.status["GET /health"] == 200
    # 64 MiB declared: refused on the headers, nothing buffered (the old gateway pinned 421 MB)
    assert [code for code, _ in attack.big] == [413] * GatewayAttack.BIG, attack.big
    assert max(sec for _, sec in attack.big) < 10, attack.big
    # (holding the six bodies would take 384 MiB; 500 connections' buffers take about 30 MiB)
    assert attack.max_rss_kb - attack.base_rss_kb < 128 * 1024, (attack.base_rss_kb, attack.max_rss_kb)
    # read timeouts: a stalled head or body gets 408 once timeout http-request ends
    for what in ("head", "body"):
        code, sec = attack.stalls[what]
        assert code == 408 and sec < GATEWAY_HEAD_TIMEOUT + 4, (what, code, sec)
    # idle connections are dropped (timeout client), not held until the attacker lets go
    assert attack.idle_dropped_after is not None, "no idle connection was ever dropped"
    assert attack.idle_dropped_after < GATEWAY_CLIENT_TIMEOUT + 10, attack.idle_dropped_after
    assert attack.reopened >= GatewayAttack.IDLE, attack.reopened
    # the hospitals went through the gateway, every honest body well under its 8 MiB limit
    honest = _pushed_bytes(gateway_log)
    assert honest and max(honest) < 8 * 2**20, gateway_log[-2000:]
    with capsys.disabled():  # the figures docs/deployment.md quotes
        print(f"gateway: {len(honest)} honest pushes, largest body {max(honest)} bytes; "
              f"{attack.reopened} idle connections reopened; gateway RSS {attack.base_rss_kb} kB, "
              f"at most {attack.max_rss_kb} kB under attack")


def test_tls_supernode_auth_three_hospitals(tmp_path, capsys):
    """docs/deployment.md on loopback: certificates from make_certs.sh, a SuperLink with TLS and
    SuperNode authentication behind the fleet gateway (HAProxy with fleet-gateway.cfg; hospitals
    reach the Fleet API only; the operator's CLI reaches the SuperLink itself), three registered
    hospitals, one round; then the same fleet samples (task='sample') and evaluates
    (task='evaluate'), one `flwr run` each: each hospital evaluates its samples on its node and
    only numbers reach the server (_assert_sampled_and_evaluated).

    The gateway is attacked while the hospitals train through it (GatewayAttack): every refused
    path is 403, six 64 MiB bodies are 413 at once without the gateway holding them, a stalled
    request head or body is cut within its timeout, 500 idle connections are dropped and
    reopened, and all three hospitals still answer round 1 within the round timeout.

    Identity: FG's SuperNode first starts claiming to be HT (its registered name is FG): it is
    refused and the run waits, since min-nodes counts verified hospitals; started again as FG
    with the same key (so the same node id) it is greeted again and trains. A SuperNode whose
    key was never registered is refused by the SuperLink."""
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy not installed (scripts/setup.sh installs it)")
    certs = make_certs(tmp_path / "certs", n=3)
    cfg_path = tiny_config(tmp_path, clients='["DU", "HT", "FG"]', steps=1,
                           data="client_holdout_fraction = 0.3\nmin_images_per_client = 8",
                           sections="[evaluation]\nmax_real_images = 8\nkid_subsets = 10\n")
    node_cfg = _hospitals(tmp_path, cfg_path)
    run_dir = tmp_path / "run"
    with Deployment(tmp_path / "dep", ROOT, certs=certs, node_auth=True) as dep:
        dep.start_superlink()
        gateway = dep.start_gateway()
        attack = GatewayAttack(gateway, certs / "ca.crt", duration=240.0)
        attacker = threading.Thread(target=attack.run, args=(dep.procs["gateway"].popen.pid,),
                                    daemon=True)
        attacker.start()
        for i, cid in enumerate(("DU", "HT")):
            dep.add_supernode(cid, node_cfg[cid], auth_key=certs / f"supernode-{i + 1}")
        dep.add_supernode("FG", {**node_cfg["FG"], "client-id": "HT"}, auth_key=certs / "supernode-3")
        listing = dep.flwr("supernode", "list", "loop", "--format", "json").stdout
        assert listing.count("registered") + listing.count("online") >= 3, listing
        # a SuperNode whose key was never registered must not get in
        if shutil.which("ssh-keygen"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f",
                            str(tmp_path / "rogue")], check=True)
        else:
            make_certs(tmp_path / "rogue-certs", n=1)
            shutil.copy(tmp_path / "rogue-certs" / "supernode-1", tmp_path / "rogue")
        rogue = dep.add_supernode("rogue", {"client-id": "X", "data-path": "/x",
                                            "state-dir": str(tmp_path / "rogue-state")},
                                  auth_key=tmp_path / "rogue", register=False, max_retries=1)

        def impostor_then_honest():
            _wait_for(lambda: "claims client 'HT': refused" in dep.tail("flwr-run", 10**6), 200,
                      "the impostor was not refused")
            # SIGTERM: a node that leaves cleanly is offline at once and may come back with its
            # key; after a SIGKILL the SuperLink refuses the key until the heartbeat expires
            dep.kill("FG", signal.SIGTERM)
            dep.add_supernode("FG", node_cfg["FG"], auth_key=certs / "supernode-3", register=False)

        th = threading.Thread(target=impostor_then_honest, daemon=True)
        th.start()
        res = dep.run({"task": "train", "config": str(cfg_path), "run-dir": str(run_dir),
                       "min-nodes": 3, "node-wait-timeout": 200.0, "round-timeout": 180.0},
                      timeout=300)
        th.join(5)
        attack.stop.set()
        attacker.join(120)
        assert res.returncode == 0, res.stdout
        rogue.popen.wait(timeout=60)
        assert rogue.popen.returncode != 0
        assert "Failed to activate SuperNode" in dep.tail("rogue", 60)
        # the operator's door is shut on the hospitals' side: the CLI through the gateway fails
        with open(dep.cli_home / "config.toml", "a") as f:
            f.write(f'\n[superlink.gateway]\naddress = "127.0.0.1:{gateway}"\n'
                    f'root-certificates = "{certs / "ca.crt"}"\n')
        for args in (("supernode", "list", "gateway"), ("ls", "gateway")):
            refused = dep.flwr(*args, check=False)
            assert refused.returncode != 0, refused.stdout
        assert dep.flwr("ls", "loop").returncode == 0  # and open on the server machine
        gateway_log = dep.tail("gateway", 10**6)
        _assert_gateway_held(attack, attacker, gateway_log, capsys)
        # the same fleet samples and then evaluates, one `flwr run` each
        settings = {"config": str(cfg_path), "run-dir": str(run_dir), "min-nodes": 3,
                    "round-timeout": 180.0}
        sampled = dep.run({**settings, "task": "sample", "sample-n": 4}, timeout=400)
        assert sampled.returncode == 0, sampled.stdout
        evaluated = dep.run({**settings, "task": "evaluate", "evaluate-n": EVALUATE_N}, timeout=600)
        assert evaluated.returncode == 0, evaluated.stdout
        evaluation_pushes = _pushed_bytes(dep.tail("gateway", 10**6)[len(gateway_log):])
    assert "registered as 'FG', claims client 'HT': refused" in res.stdout
    result = json.loads((run_dir / "flower-result.json").read_text())
    assert result["rounds"] == 1 and result["clients"] == ["DU", "HT", "FG"]
    assert _metrics(run_dir)[0]["clients"] == ["DU", "HT", "FG"]
    for cid in ("DU", "HT", "FG"):
        state = _node_state(tmp_path, cid)
        assert state["round"] == 1 and state["client"]["steps"] == 1
    assert _server_state(run_dir)["progress"]["round"] == 1
    assert not (tmp_path / "rogue-state").exists()
    _assert_sampled_and_evaluated(tmp_path, run_dir, evaluated.stdout, evaluation_pushes, capsys)
    # the operator's view of the binding: each node id, its registered name, the client it
    # serves; FG's node (one key, one node id) was first refused as an impostor, then bound
    nodes = json.loads((run_dir / "flower-nodes.json").read_text())["nodes"]
    assert sorted((e["registered-name"], e["client"]) for e in nodes) == [
        ("DU", "DU"), ("FG", "FG"), ("HT", "HT")], nodes
    assert all(e["refused"] is None for e in nodes)
    assert main(["flower", "nodes", str(run_dir)]) == 0
    shown = capsys.readouterr().out
    assert all(f"{e['node-id']}  " in shown for e in nodes), shown


def test_deploy_conditional_runs_keep_client_labels_home(tmp_path):
    """A conditional run on loopback under both label placements, one SuperLink: two hospitals
    of two classes (test_flower.two_class_config), each placement's fleet started fresh (a
    node's state belongs to one run) and stopped cleanly before the next. The models equal the
    in-process engine's; each node's samples carry the config's classes; with "client" no
    training message a node sent (kept in its state to answer a repeated round) holds a label,
    with "both" every one does."""
    with Deployment(tmp_path / "dep", ROOT) as dep:
        dep.start_superlink()
        for condition in ("both", "client"):
            home = tmp_path / condition
            home.mkdir()
            cfg_path = two_class_config(home, condition)
            node_cfg = _hospitals(home, cfg_path)
            for cid in node_cfg:
                dep.add_supernode(f"{cid}-{condition}", node_cfg[cid])
            run_dir = home / "run"
            res = dep.run({"task": "train", "config": str(cfg_path), "run-dir": str(run_dir),
                           "min-nodes": 2, "identity": "node-report", "round-timeout": 180.0,
                           "sample-n": 4}, timeout=400)
            assert res.returncode == 0, res.stdout
            for cid in node_cfg:  # offline at once, so the next run meets only its own fleet
                dep.kill(f"{cid}-{condition}", signal.SIGTERM)
            for cid in node_cfg:  # what each node sent, first
                sent = [m for reply in _node_state(home, cid)["replies"].values() for m in reply]
                assert sent and all(("labels" in m) == (condition == "both") for m in sent), condition
                with np.load(home / f"state-{cid}" / "samples" / f"{cid}.npz") as z:
                    assert z["labels"].tolist() == ["left", "left", "right", "right"]
            local = run_training(load_config(cfg_path), home / "local", progress=False)
            assert_same_models(local.server.model.state_dict(), _server_state(run_dir)["server"]["model"])
            for cid, client in local.clients.items():
                assert_same_models(client.model.state_dict(), _node_state(home, cid)["client"]["model"])
