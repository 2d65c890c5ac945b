"""Routing that survives upstream faults: pools, strategies, retries, fallbacks, cooldowns.

- :mod:`.settings`   the per-model YAML knobs and their validation
- :mod:`.policy`     which failures are retried, backoff with jitter, ``retry-after``
- :mod:`.strategies` picking a deployment of a pool (round robin, weighted, least busy, latency)
- :mod:`.breaker`    cooldowns (circuit breaking), in process or shared through Redis
- :mod:`.attempts`   the attempt loop the gateway runs a call through

Nothing here imports :mod:`aiproxy.config` at run time: the config module imports
:mod:`.settings` to parse the knobs.
"""
