"""Formal privacy accounting of what a client releases to the server.

Under noisy-data each image goes out once as y = a x0 + b xi with x0 in [-1, 1]^d,
a = sqrt(abar_{s-1}), b = sqrt(1 - abar_{s-1}), xi ~ N(0, I): a Gaussian mechanism with noise
sigma = b. Replacing one image by any other moves the mean a x0 by at most 2a sqrt(d) in L2
(image level: the guarantee that applies to an image). Changing one pixel alone moves it by at
most 2a (the "per pixel" figure); that is no guarantee about an image, whose pixels are
correlated, so neighbouring pixels give a pixel away. Every later epoch re-sends the same y,
which is post-processing and costs nothing more. All of this holds only while xi is the
client's secret: noise the server can regenerate (a seed derived from the run's config) makes
the release deterministic and x0 = (y - b xi) / a exact (attacks.seed_replay). Under
shared-noise the server also receives the noise and recovers x0 exactly: epsilon is infinite.
With s = T nothing is sent: epsilon 0.

The exact (epsilon, delta) curve is the analytic Gaussian mechanism of Balle & Wang 2018
(Theorem 8); the same mechanism is mu-Gaussian DP with mu = Delta / sigma (Dong, Roth & Su 2022),
which bounds any test telling two images apart: TPR <= Phi(Phi^-1(FPR) + mu).
"""

from __future__ import annotations

import math

from diffusers import DDPMScheduler
from scipy.special import log_ndtr, ndtr, ndtri

from .attacks import handover_signal

DEFAULT_DELTA = 1e-5


def analytic_gaussian_delta(epsilon: float, sigma: float, sensitivity: float) -> float:
    """delta(eps) = Phi(D/(2s) - eps s/D) - e^eps Phi(-D/(2s) - eps s/D) (Balle & Wang 2018, Thm 8).

    Evaluated in logs (e^eps overflows for eps > 709): delta = P1 (1 - exp(eps + log P2 - log P1)).
    """
    if sensitivity == 0.0:
        return 0.0
    if sigma == 0.0:
        return 1.0
    r = sensitivity / sigma
    log_p1 = float(log_ndtr(r / 2 - epsilon / r))
    log_p2 = epsilon + float(log_ndtr(-r / 2 - epsilon / r))
    return max(0.0, math.exp(log_p1) * -math.expm1(min(0.0, log_p2 - log_p1)))


def analytic_gaussian_epsilon(delta: float, sigma: float, sensitivity: float,
                              tol: float = 1e-10) -> float:
    """The smallest eps with delta(eps) <= delta, by bisection (delta(eps) is decreasing)."""
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta: expected a number in (0, 1), got {delta}")
    if sigma == 0.0 and sensitivity > 0.0:
        return math.inf
    if analytic_gaussian_delta(0.0, sigma, sensitivity) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while analytic_gaussian_delta(hi, sigma, sensitivity) > delta:
        lo, hi = hi, 2.0 * hi
    while hi - lo > tol * max(1.0, hi):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if analytic_gaussian_delta(mid, sigma, sensitivity) > delta else (lo, mid)
    return hi


def classic_gaussian_epsilon(delta: float, sigma: float, sensitivity: float) -> float:
    """eps = D sqrt(2 ln(1.25 / delta)) / sigma, the classic bound (Dwork & Roth 2014, Thm A.1),
    valid only where it gives eps < 1; the analytic eps never exceeds it there."""
    return sensitivity * math.sqrt(2.0 * math.log(1.25 / delta)) / sigma


def max_tpr_at_fpr(mu: float, fpr: float) -> float:
    """mu-GDP bound on distinguishing two neighbouring inputs: TPR <= Phi(Phi^-1(FPR) + mu)."""
    return float(ndtr(ndtri(fpr) + mu)) if math.isfinite(mu) else 1.0


def view_privacy(scheduler: DDPMScheduler, cut: int, num_pixels: int,
                 delta: float = DEFAULT_DELTA) -> dict[str, float]:
    """(eps, delta) of one noisy-data view per image, plus the SNR a^2/b^2 of the view.

    Image level (the guarantee): sensitivity 2a sqrt(d). "Per pixel": sensitivity 2a, the
    epsilon if one pixel alone could change; a reference figure, not a guarantee about an
    image (pixels are correlated). Noise sigma = b.
    """
    num_timesteps = scheduler.config.num_train_timesteps
    if cut >= num_timesteps:
        return _nothing_sent(delta)
    a, b = handover_signal(scheduler, cut)
    image_sens, pixel_sens = 2.0 * a * math.sqrt(num_pixels), 2.0 * a
    mu_image = image_sens / b if b > 0 else math.inf
    snr = a * a / (b * b) if b > 0 else math.inf
    return {
        "delta": delta, "signal_a": a, "noise_b": b,
        "snr": snr, "snr_db": 10.0 * math.log10(snr) if math.isfinite(snr) else math.inf,
        "epsilon_image": analytic_gaussian_epsilon(delta, b, image_sens),
        "epsilon_pixel": analytic_gaussian_epsilon(delta, b, pixel_sens),
        "mu_image": mu_image, "mu_pixel": pixel_sens / b if b > 0 else math.inf,
        "max_tpr_at_1pct_image": max_tpr_at_fpr(mu_image, 0.01),
    }


def _nothing_sent(delta: float) -> dict[str, float]:
    return {"delta": delta, "signal_a": 0.0, "noise_b": 1.0, "snr": 0.0, "snr_db": -math.inf,
            "epsilon_image": 0.0, "epsilon_pixel": 0.0, "mu_image": 0.0, "mu_pixel": 0.0,
            "max_tpr_at_1pct_image": 0.01}


def protocol_privacy(protocol: str, scheduler: DDPMScheduler, cut: int, num_pixels: int,
                     delta: float = DEFAULT_DELTA) -> dict[str, float]:
    """view_privacy for noisy-data; for shared-noise every epsilon is infinite (the server
    inverts add_noise exactly) unless s = T, where nothing is sent."""
    if protocol == "noisy-data" or cut >= scheduler.config.num_train_timesteps:
        return view_privacy(scheduler, cut, num_pixels, delta)
    a, b = handover_signal(scheduler, cut)
    return {"delta": delta, "signal_a": a, "noise_b": b, "snr": math.inf, "snr_db": math.inf,
            "epsilon_image": math.inf, "epsilon_pixel": math.inf, "mu_image": math.inf,
            "mu_pixel": math.inf, "max_tpr_at_1pct_image": 1.0}


def explain(protocol: str, cut: int, num_timesteps: int, acc: dict[str, float]) -> str:
    """What the accounting of one protocol and cut means, in plain words."""
    if cut >= num_timesteps:
        return (f"s = {cut} = T: the client sends nothing during training; the server learns "
                "nothing about its images (epsilon 0).")
    if math.isinf(acc["epsilon_image"]):
        why = ("the server receives x_t, t and the noise eps, and inverts add_noise exactly"
               if protocol == "shared-noise" else
               "with s = 0 the 'view' is the clean image itself")
        return (f"{protocol}, s = {cut}: no privacy at all (epsilon infinite): {why}; every "
                "training image the server was sent is recovered to float precision.")
    return (f"{protocol}, s = {cut}: each image is sent once as a = {acc['signal_a']:.3f} times "
            f"the image plus noise of std b = {acc['noise_b']:.3f} (SNR {acc['snr']:.3g}, "
            f"{acc['snr_db']:.1f} dB). For the whole image this is "
            f"({acc['epsilon_image']:.3g}, {acc['delta']:g})-DP, a guarantee that "
            + ("is meaningful (epsilon <= 1): the view hides whether any given image was sent."
               if acc["epsilon_image"] <= 1 else
               "is formally weak: a test telling apart two given images succeeds up to "
               f"{100 * acc['max_tpr_at_1pct_image']:.0f}% of the time at 1% false alarms. "
               "The image is blurred by noise, not hidden; read the attack gains over the "
               "mean-image baseline for what the server can actually see.")
            + " All of this assumes xi is the client's secret; noise the server can regenerate "
            "(seed replay, attack r) gives the images back exactly."
            + f" (The per-pixel epsilon, {acc['epsilon_pixel']:.3g}, assumes one pixel changes "
            "alone; pixels are correlated, so it is no guarantee about an image.)")
