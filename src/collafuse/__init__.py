"""CollaFuse: collaborative (split) denoising diffusion models.

Zipperling, Allmendinger, Struppek, Kühl: "CollaFuse: Navigating Limited Resources and Privacy
in Collaborative Generative AI", ECIS 2024; extended as arXiv 2406.14429.
"""

__version__ = "0.1.0"
