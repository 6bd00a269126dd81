"""``python -m dino_ctl.controller``: run the DinoExperiment controller (the controller image's entry point)."""

from __future__ import annotations

import argparse
import logging
import sys

from dino_ctl.kube import KubeClient

__all__ = ["main", "parse_args"]

logger = logging.getLogger("dino_ctl.controller")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (the chart's Deployment passes them)."""
    parser = argparse.ArgumentParser(prog="python -m dino_ctl.controller", description=__doc__)
    parser.add_argument("--namespace", action="append", dest="namespaces", default=[], metavar="NS",
                        help="namespace to reconcile DinoExperiments in (repeat for several; required)")
    # A pod's probes and scrapes come from outside it: all interfaces by default.
    parser.add_argument("--bind-address", default="0.0.0.0",  # noqa: S104
                        help="address the health and metrics endpoints listen on (127.0.0.1: this machine only)")
    parser.add_argument("--health-port", type=int, default=8080, help="kopf health endpoint port (/healthz)")
    parser.add_argument("--metrics-port", type=int, default=9090, help="Prometheus /metrics port (0 disables)")
    parser.add_argument("--interval", type=float, default=30.0, help="seconds between periodic reconciles")
    parser.add_argument("--workers", type=int, default=16,
                        help="reconcile passes run at once (threads; a pass mostly waits on the API server)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--read-checkpoints", action="store_true",
                        help="read checkpoints from storage for status.stages[].latestCheckpoint (needs credentials)")
    args = parser.parse_args(argv)
    if not args.namespaces:
        parser.error("--namespace is required: the controller is namespaced (its RBAC is a Role per namespace)")
    if args.interval < 1:
        parser.error(f"--interval {args.interval}: must be at least 1 second")
    if args.workers < 1:
        parser.error(f"--workers {args.workers}: must be at least 1")
    return args


def _url_host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import kopf

    from dino_ctl.controller.executor import Executor, read_latest_checkpoints
    from dino_ctl.controller.handlers import Controller, build_registry, operator_settings
    from dino_ctl.controller.metrics import ControllerMetrics

    metrics = ControllerMetrics()
    if args.metrics_port:
        metrics.serve(args.metrics_port, addr=args.bind_address)
    client = KubeClient.from_kubeconfig()
    # One kept-alive connection per worker (urllib3's default is 5 x CPUs): with fewer, every extra concurrent
    # request opens a TLS connection and throws it away.
    client.api.rest_client.pool_manager.connection_pool_kw["maxsize"] = args.workers
    executor = Executor(client, checkpoint_reader=read_latest_checkpoints if args.read_checkpoints else None)
    registry = build_registry(Controller(executor, metrics), interval=args.interval)
    settings = operator_settings()
    # kopf runs sync handlers in a thread pool (default min(32, CPUs + 4): 6 threads on 2 CPUs). A pass waits on
    # about eight API requests, so on 2 CPUs those threads managed ~5 passes/s, and 50 experiments at a 2 s interval
    # got a pass every ~10 s instead (bench/controller_scale.py: reaction p99 19 s).
    settings.execution.max_workers = args.workers
    logger.info("reconciling DinoExperiments in %s every %.0fs with %d workers", ", ".join(args.namespaces),
                args.interval, args.workers)
    kopf.run(registry=registry, settings=settings, standalone=True, namespaces=args.namespaces,
             liveness_endpoint=f"http://{_url_host(args.bind_address)}:{args.health_port}/healthz")
    return 0


if __name__ == "__main__":
    sys.exit(main())
