"""A sweep's projected wall time, from a pace measured on this machine, and its progress bar.

Before a sweep starts, every (protocol, c) that still has rounds to train is timed for a few
rounds on a throwaway copy of its run (nothing is written; the first round, which warms the
kernels, is not counted), one sampling call is timed per generated image, and the Inception
network per image. The projection is rounds left x seconds a round, plus, per run still to
evaluate, its images through the sampler and Inception. The progress bar then counts projected
seconds of work done, so its rate is the ratio of real to projected pace and its ETA corrects
itself as the sweep runs.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

PACE_ROUNDS = 3  # rounds timed per (protocol, c), after one warm-up round
PACE_SAMPLES = 4  # images in the timed sampling call
PACE_INCEPTION = 8  # images in the timed Inception batch


@dataclass
class Pace:
    """What one (protocol, c) costs here, measured on a throwaway run."""

    round_seconds: float
    rounds: int  # rounds of a whole run
    client_sizes: list[int]
    holdout_size: int
    sample_seconds: float  # per generated image (the whole split chain)
    device: str


def measure_pace(cfg_run, rounds: int = PACE_ROUNDS, sample: bool = True) -> Pace:
    """Time ``rounds`` training rounds (after a warm-up) and, if asked, one sampling call of
    a fresh run of ``cfg_run`` held in memory only."""
    from ..engines.local import Run

    run = Run(cfg_run)
    run.train_round()  # warm-up: first convolutions choose their kernels
    start = time.perf_counter()
    for _ in range(rounds):
        run.train_round()
    round_seconds = (time.perf_counter() - start) / rounds
    sample_seconds = 0.0
    if sample:
        first = next(iter(run.clients))
        start = time.perf_counter()
        run.sample(first, PACE_SAMPLES, 0, labels=run.labels_for(PACE_SAMPLES))
        sample_seconds = (time.perf_counter() - start) / PACE_SAMPLES
    return Pace(round_seconds, run.rounds, [len(c.images) for c in run.clients.values()],
                len(run.holdout.images), sample_seconds, str(run.server.device))


def inception_seconds(image_shape: tuple, device: str) -> float:
    """Seconds per image through the FID Inception network here (model loaded first)."""
    from .kid import inception_features, load_inception

    load_inception(device)
    images = np.random.default_rng(0).integers(0, 256, (PACE_INCEPTION, *image_shape),
                                               dtype=np.uint8)
    start = time.perf_counter()
    inception_features(images, device=device)
    return (time.perf_counter() - start) / PACE_INCEPTION


@dataclass
class Projection:
    """The sweep's remaining work, in projected seconds per run."""

    runs: int  # in the plan
    to_train: int
    resumed: int
    rounds: int  # left to train
    to_evaluate: int
    train_seconds: dict = field(default_factory=dict)  # SweepRun -> seconds
    round_seconds: dict = field(default_factory=dict)  # SweepRun -> seconds a round
    eval_seconds: dict = field(default_factory=dict)  # SweepRun -> seconds
    inception_seconds: float = 0.0
    load: float = 0.0

    @property
    def total(self) -> float:
        return sum(self.train_seconds.values()) + sum(self.eval_seconds.values())

    def text(self) -> str:
        paces = sorted({round(v, 3) for v in self.round_seconds.values()})
        pace = (f" at {paces[0]:.2f}-{paces[-1]:.2f} s a round" if len(paces) > 1 else
                f" at {paces[0]:.2f} s a round" if paces else "")
        lines = [f"sweep: {self.runs} runs in the plan; {self.to_train} trainings to run "
                 f"({self.resumed} resumed), {self.rounds} rounds{pace}; "
                 f"{self.to_evaluate} runs to evaluate"
                 + (f" (Inception {self.inception_seconds:.2f} s an image)"
                    if self.to_evaluate else ""),
                 f"sweep: projected wall time {duration(self.total)} (training "
                 f"{duration(sum(self.train_seconds.values()))}, evaluation "
                 f"{duration(sum(self.eval_seconds.values()))}), paced just now at load "
                 f"average {self.load:.2f}"]
        return "\n".join(lines)


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h} h {m:02d} min" if h else f"{m} min {s:02d} s"


def project(plan, config_of, rounds_left, needs_evaluation, evaluation) -> Projection:
    """Measure and project.

    ``config_of(spec)``: a run's training config; ``rounds_left(spec)``: its rounds still to
    train (None: finished, 0: not begun); ``needs_evaluation(spec)``: whether it has no stored
    rows; ``evaluation``: the sweep's EvaluationConfig, or None when it evaluates nothing.
    """
    train = {spec: rounds_left(spec) for spec in plan}
    evaluate = [spec for spec in plan if evaluation is not None and needs_evaluation(spec)]
    paces: dict = {}
    for spec in plan:
        setting = (spec.protocol, spec.cut_ratio)
        if setting not in paces and (train[spec] is not None or spec in evaluate):
            paces[setting] = measure_pace(config_of(spec), sample=bool(evaluate) and not paces)
    proj = Projection(runs=len(plan), to_train=sum(r is not None for r in train.values()),
                      resumed=sum(bool(r) for r in train.values()), rounds=0,
                      to_evaluate=len(evaluate), load=os.getloadavg()[0])
    for spec, done in train.items():
        if done is not None:
            pace = paces[(spec.protocol, spec.cut_ratio)]
            left = max(pace.rounds - done, 0)
            proj.rounds += left
            proj.round_seconds[spec] = pace.round_seconds
            proj.train_seconds[spec] = left * pace.round_seconds
    if evaluate:
        first = next(iter(paces.values()))
        cfg = config_of(evaluate[0])
        shape = (cfg.data.image_size, cfg.data.image_size) + ((3,) if cfg.data.channels == 3 else ())
        proj.inception_seconds = inception_seconds(shape, first.device)
        seeds_seen = set()
        for spec in evaluate:
            proj.eval_seconds[spec] = _evaluation_seconds(
                first, evaluation, proj.inception_seconds, spec.seed not in seeds_seen)
            seeds_seen.add(spec.seed)
    return proj


def _evaluation_seconds(pace: Pace, ev, inception: float, first_of_seed: bool) -> float:
    """Samples through the split chain and Inception (generated and hand-over), plus, once per
    training seed, the real sets (their features are cached)."""
    clients = len(pace.client_sizes)
    seconds = clients * ev.num_samples * (pace.sample_seconds + 2 * inception)
    if first_of_seed:
        cap = ev.max_real_images or math.inf
        real = sum(min(cap, n) for n in pace.client_sizes) + min(cap, pace.holdout_size)
        seconds += real * inception
    return seconds


class SweepBar:
    """One bar over the whole sweep, in projected seconds of work (none without a
    projection, or with ``enabled`` False)."""

    def __init__(self, projection: Projection | None, enabled: bool = True):
        self.projection = projection
        self.enabled = enabled and projection is not None
        self._bar = None
        self._credited: dict = {}

    def __enter__(self):
        if self.enabled:
            self._bar = tqdm(total=max(self.projection.total, 1e-9), desc="sweep", unit="s",
                             bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}"
                                        " {postfix}", dynamic_ncols=True)
        return self

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.close()
        return False

    def describe(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(text)

    def _credit(self, key, seconds: float) -> None:
        if self._bar is not None and seconds > 0:
            self._credited[key] = self._credited.get(key, 0.0) + seconds
            # never past the end: the sum of float credits may round above the total
            self._bar.update(min(seconds, self._bar.total - self._bar.n))

    def training_round(self, spec):
        """A run_training on_round callback that credits one projected round."""
        seconds = 0.0 if self.projection is None else self.projection.round_seconds.get(spec, 0.0)

        def on_round(_round: int) -> None:
            self._credit(("train", spec), seconds)
        return on_round

    def training_done(self, spec) -> None:
        """Credit what is left of a run's projected training (the projection counts logged
        rounds, the run resumes from its checkpoint)."""
        if self.projection is not None:
            left = (self.projection.train_seconds.get(spec, 0.0)
                    - self._credited.get(("train", spec), 0.0))
            self._credit(("train", spec), left)

    def evaluation_done(self, spec) -> None:
        if self.projection is not None:
            self._credit(("eval", spec), self.projection.eval_seconds.get(spec, 0.0))
