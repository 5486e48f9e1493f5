"""The `chunkbus` command line: a click group with one subcommand per node."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import version

import click
import zmq

from chunkbus.bus.endpoints import list_publishers, runtime_dir
from chunkbus.bus.log import LEVELS, configure_logging


@dataclass
class LogOptions:
    level: str
    json: bool

    def start(self, node: str):
        """Configure logging for the node this process runs; returns its logger."""
        return configure_logging(node, self.level, self.json)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(version("chunkbus"), prog_name="chunkbus")
@click.option(
    "--log-level",
    type=click.Choice(LEVELS, case_sensitive=False),
    default="info",
    envvar="CHUNKBUS_LOG_LEVEL",
    help="Least severe level to log.",
)
@click.option(
    "--log-json",
    is_flag=True,
    envvar="CHUNKBUS_LOG_JSON",
    help="Log JSON lines instead of readable text (for log collectors).",
)
@click.pass_context
def main(ctx: click.Context, log_level: str, log_json: bool) -> None:
    """chunkbus: run a robot's LeRobot policy on remote GPUs over a ZeroMQ bus."""
    ctx.obj = LogOptions(log_level.lower(), log_json)


@main.command()
@click.pass_obj
def endpoints(log: LogOptions) -> None:
    """List the publishers on this host's bus (the runtime directory's ipc endpoints)."""
    logger = log.start("endpoints")
    found = list_publishers()
    logger.debug("listed runtime directory", directory=str(runtime_dir()), count=len(found))
    if not found:
        click.echo(f"no publishers in {runtime_dir()}")
    for info in found:
        click.echo(f"{info.node:24} {info.endpoint}{'' if info.live else '  (stale: not running)'}")


@main.command()
@click.option("--frontend", default="tcp://*:5555", help="Where clients (robots) connect.")
@click.option("--backend", default="tcp://*:5556", help="Where workers connect.")
@click.option("--metrics-port", type=int, default=None, help="Serve /metrics and /health on this HTTP port.")
@click.option("--max-queue", type=click.IntRange(1), default=64, help="Requests a service may queue; more are rejected.")
@click.option("--default-ttl", type=click.FloatRange(0), default=None, help="Seconds a request without a ttl may wait.")
@click.option("--request-timeout", type=click.FloatRange(0), default=60.0, help="Seconds a worker has to answer.")
@click.option("--heartbeat-interval", type=click.FloatRange(0.01), default=0.5)
@click.option("--heartbeat-liveness", type=click.IntRange(1), default=3, help="Heartbeats missed before a worker is dropped.")
@click.option("--max-attempts", type=click.IntRange(1), default=2, help="Runs of a request whose workers died.")
@click.pass_obj
def broker(log: LogOptions, metrics_port, **options) -> None:
    """Queue requests from robots and balance them over workers (Majordomo, RFC 7)."""
    from chunkbus.nodes.broker import BrokerConfig, serve

    log.start("broker")
    try:
        serve(BrokerConfig(**options), metrics_port)
    except zmq.ZMQError as exc:
        raise click.ClickException(f"cannot bind {options['frontend']} / {options['backend']}: {exc}")


@main.command()
@click.option("--broker", "broker_address", default="tcp://127.0.0.1:5556", help="The broker's backend.")
@click.option("--policy", required=True, help="A LeRobot checkpoint folder or hub id, or scripted:NAME.")
@click.option("--device", default="cpu", help="cpu, cuda, cuda:1, mps.")
@click.option("--service", default=None, help="The service name to serve [default: the policy's type].")
@click.option("--max-batch", type=click.IntRange(1, 1024), default=1, help="Requests run as one batch.")
@click.pass_obj
def worker(log: LogOptions, broker_address: str, policy: str, device: str, service: str | None, max_batch: int) -> None:
    """Serve one policy on one device to the broker."""
    from chunkbus.nodes.policies import load_policy
    from chunkbus.nodes.worker import serve

    logger = log.start("worker")
    try:
        loaded = load_policy(policy, device)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        raise click.ClickException(str(exc))
    service = service or loaded.describe()["type"]
    logger.info("policy loaded", policy=policy, service=service, device=device)
    serve(loaded, broker_address, service, max_batch)


@main.command()
@click.option("--broker", "broker_address", default="tcp://127.0.0.1:5555", help="The broker's frontend.")
@click.option("--timeout", type=float, default=3.0)
@click.pass_obj
def status(log: LogOptions, broker_address: str, timeout: float) -> None:
    """Show the broker's services, workers, queues and latencies."""
    from chunkbus.nodes.diagnose import format_status, query_status

    log.start("status")
    click.echo(format_status(query_status(broker_address, timeout)))


@main.command()
@click.option("--broker", "broker_address", default="tcp://127.0.0.1:5555", help="The broker's frontend.")
@click.option("--service", required=True)
@click.option("-n", "count", type=click.IntRange(1), default=10, help="Requests to send.")
@click.option("--timeout", type=float, default=30.0, help="Seconds to wait for each answer.")
@click.pass_obj
def ping(log: LogOptions, broker_address: str, service: str, count: int, timeout: float) -> None:
    """Send synthetic observations to a service and report latency and chunk shape."""
    from chunkbus.nodes.diagnose import ping as run_ping

    log.start("ping")
    run_ping(broker_address, service, count, timeout)


if __name__ == "__main__":
    main()
