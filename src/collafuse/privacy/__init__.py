"""The privacy audit: what an honest-but-curious server can learn from what it receives.

Apart from :mod:`collafuse.evaluation` (the paper's own metrics: KID, disclosure, costs, the
sweep and its report) so that the layout shows the two concerns: ``attacks`` (attacks as pure
functions on tensors), ``accounting`` (Gaussian-mechanism accounting of one release) and
``audit`` (``collafuse audit``: replay a run's messages, attack them, write the tables).
"""
