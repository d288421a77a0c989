"""fleet: a GPU experiment fleet on Celery + Redis (producer side and shared contract).

Nothing in this package imports torch, diffsynth or ``workers``: the CLI must start
fast on a laptop that has none of them.
"""

__version__ = "0.1.0"
