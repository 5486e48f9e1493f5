"""The `chunkbus` command line: a click group with one subcommand per node."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import version

import click

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


if __name__ == "__main__":
    main()
