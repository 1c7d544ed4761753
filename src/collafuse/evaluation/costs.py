"""What each party spends: FLOPs, wall time, bytes on the wire and energy.

FLOPs, time and bytes do not depend on the machine's power sensors; energy comes from
codecarbon's OfflineEmissionsTracker (no network: the country is given, nothing is looked up or
uploaded). Where the machine has no power counters (Intel RAPL for the CPU, NVML for NVIDIA
GPUs) codecarbon estimates power from CPU load times a TDP table, and `energy_is_estimate`
says so. RAM energy is always an estimate from installed memory.

Start-up cost, measured on the 2-core CPU dev machine (codecarbon 3.3.2): constructing the
tracker takes about 1 ms, the first `start_task` about 1.4 s (hardware detection, cached per
process afterwards), later `start_task` calls about 1 ms. Pass `energy=False` to skip it.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from torch.utils.flop_counter import FlopCounterMode

# codecarbon CPU modes that read a real energy counter; everything else is a model (TDP x load).
_MEASURED_CPU_MODES = {"intel_rapl", "intel_power_gadget", "windows_emi"}
# codecarbon hardware classes backed by real power readings (NVML / amdsmi, powermetrics).
_MEASURED_HARDWARE = {"GPU", "AppleSiliconChip"}


def count_flops(fn: Callable[..., Any], *args, **kwargs) -> tuple[Any, int]:
    """(fn(*args, **kwargs), FLOPs it ran): forward, and backward too if fn calls it."""
    with FlopCounterMode(display=False) as counter:
        result = fn(*args, **kwargs)
    return result, int(counter.get_total_flops())


@dataclass
class _Cost:
    flops: int = 0
    seconds: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    energy_kwh: float = 0.0


class CostMeter:
    """Accumulates FLOPs, seconds, bytes and energy per (party, phase).

    Parties are free-form names ("server", "client:DU"); phases too ("training", "sampling").
    One codecarbon tracker serves the whole meter; each `measure` block is one codecarbon task.

    Counting FLOPs runs every operation of a block through a Python dispatch hook, which
    doubled a CPU training round of the lean UNet at batch 16 (4.2 s against 2.0 s, 1 thread).
    A block whose FLOPs are fixed by a few numbers (a model's forward and backward at one batch
    size) passes them as ``flops_key``: the first block of each (party, phase, key) is counted,
    later ones add that count without the hook (``reuse_flops=False``: every block counted,
    the reference the tests and benchmarks/meter_overhead.py compare with).
    """

    def __init__(self, energy: bool = True, country_iso_code: str = "DEU",
                 tracking_mode: str = "process", reuse_flops: bool = True):
        self._costs: dict[tuple[str, str], _Cost] = {}
        self._reuse_flops = reuse_flops
        self._flops_of: dict[tuple, int] = {}  # (party, phase, flops_key) -> FLOPs counted
        self._open = False
        self._energy = energy
        self._tracker = None
        self._country_iso_code = country_iso_code
        self._tracking_mode = tracking_mode

    def _cost(self, party: str, phase: str) -> _Cost:
        return self._costs.setdefault((party, phase), _Cost())

    def _get_tracker(self):
        if self._tracker is None:
            try:
                from codecarbon import OfflineEmissionsTracker
            except ImportError:
                raise ValueError("evaluation.energy: codecarbon is not installed; install it or "
                                 "set evaluation.energy = false") from None

            # The offline tracker logs at INFO before applying log_level; silence it up front.
            logging.getLogger("codecarbon").setLevel(logging.ERROR)
            # measure_power_secs is large because tasks measure at their own start and stop;
            # output_methods=[] writes no file and calls no API;
            # allow_multiple_runs skips the machine-wide lock file (several meters may coexist).
            self._tracker = OfflineEmissionsTracker(
                country_iso_code=self._country_iso_code, output_methods=[], log_level="error",
                tracking_mode=self._tracking_mode, measure_power_secs=3600,
                allow_multiple_runs=True)
        return self._tracker

    @contextmanager
    def measure(self, party: str, phase: str, count_flops: bool = True,
                flops_key: tuple | None = None) -> Iterator[None]:
        """Time the block and add its FLOPs (optional) and energy to (party, phase).

        ``flops_key``: what fixes the block's FLOPs (see the class); None counts every block.
        """
        if self._open:
            raise RuntimeError("CostMeter.measure blocks cannot nest (time and energy would count twice)")
        self._open = True
        tracker = self._get_tracker() if self._energy else None
        if not self._reuse_flops:
            flops_key = None
        known = None if flops_key is None else self._flops_of.get((party, phase, flops_key))
        counter = FlopCounterMode(display=False) if count_flops and known is None else None
        try:
            if tracker is not None:
                tracker.start_task(f"{party}/{phase}")
            if counter is not None:
                counter.__enter__()
            start = time.perf_counter()
            try:
                yield
            finally:
                seconds = time.perf_counter() - start
                if counter is not None:
                    counter.__exit__(None, None, None)
                data = tracker.stop_task() if tracker is not None else None
                cost = self._cost(party, phase)
                cost.seconds += seconds
                if counter is not None:
                    known = int(counter.get_total_flops())
                    if flops_key is not None:
                        self._flops_of[(party, phase, flops_key)] = known
                if count_flops:
                    cost.flops += known
                if data is not None:
                    cost.energy_kwh += float(data.energy_consumed)
        finally:
            self._open = False

    def add_bytes(self, party: str, sent: int = 0, received: int = 0,
                  phase: str = "communication") -> None:
        """Count bytes a party sent and received (under `phase`, by default "communication")."""
        if sent < 0 or received < 0:
            raise ValueError(f"byte counts must be >= 0, got sent={sent} received={received}")
        cost = self._cost(party, phase)
        cost.bytes_sent += int(sent)
        cost.bytes_received += int(received)

    def restore(self, rows: list[dict]) -> None:
        """Continue from an earlier meter's rows() (a resumed run keeps what it had counted)."""
        self._costs = {(r["party"], r["phase"]): _Cost(
            flops=int(r["flops"] or 0), seconds=float(r["seconds"]),
            bytes_sent=int(r["bytes_sent"]), bytes_received=int(r["bytes_received"]),
            energy_kwh=float(r["energy_kwh"] or 0.0)) for r in rows}

    @property
    def energy_sources(self) -> list[str] | None:
        """codecarbon's description of each power source it uses (None with energy=False)."""
        if not self._energy:
            return None
        tracker = self._get_tracker()
        tracker.get_detected_hardware()
        return [hw.description() for hw in tracker._hardware]

    @property
    def energy_is_estimate(self) -> bool | None:
        """True when no real power counter (RAPL, NVML, ...) is read; None with energy=False."""
        if not self._energy:
            return None
        tracker = self._get_tracker()
        # Public API names the hardware but not how it is read; the hardware objects do.
        tracker.get_detected_hardware()
        measured = [hw for hw in tracker._hardware
                    if type(hw).__name__ in _MEASURED_HARDWARE
                    or getattr(hw, "_mode", None) in _MEASURED_CPU_MODES]
        return not measured

    def rows(self) -> list[dict]:
        """One dict per (party, phase), in first-seen order; energy_kwh is None with energy=False."""
        return [dict(party=party, phase=phase, flops=c.flops, seconds=c.seconds,
                     bytes_sent=c.bytes_sent, bytes_received=c.bytes_received,
                     energy_kwh=c.energy_kwh if self._energy else None)
                for (party, phase), c in self._costs.items()]
