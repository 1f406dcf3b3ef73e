"""Known-noise injection: operators by family, strategies, order-independent sampling, manifests.

Entry points: :func:`infscope.noise.inject.inject_noise` (pure, in memory),
:func:`infscope.noise.run.run_noise` (files on disk) and :mod:`infscope.noise.analyze`.
"""
