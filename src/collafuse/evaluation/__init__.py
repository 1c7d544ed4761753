"""Evaluation: KID on Inception features, disclosure metrics, costs (FLOPs, time, bytes, energy).

Submodules are imported on demand (``collafuse.evaluation.kid`` etc.) so that importing the
package does not load torch models or codecarbon.
"""
