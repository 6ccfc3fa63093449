"""Connecting to Ray: the cluster named by RAY_ADDRESS, else a local Ray sized to this machine."""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)


def init_ray() -> None:
    """Connect once per process; `ray job submit` sets RAY_ADDRESS for us."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        log.info("connected to Ray cluster at %s", address)
    else:
        # "local" always starts a fresh single-node Ray, even if another is running on this host.
        # The dashboard also serves the state API that Ray Train's placement-group cleaner polls.
        ray.init(address="local", log_to_driver=True)
        log.info("started a local Ray with %s CPUs", int(ray.cluster_resources().get("CPU", 0)))
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = sys.stderr.isatty()
    ctx.print_on_execution_start = False


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 0))


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))
