"""`launch FILE.yaml` (also `chunkbus launch`): start the nodes a launch file lists.

The command checks a launch file against the `chunkbus` subcommands, so it is made for
the `chunkbus` group (launch_command): nodes/cli.py adds it to that group and installs it
as the `launch` script as well. This module imports nothing of chunkbus.nodes.
"""

from __future__ import annotations

import shlex
import sys

import click

from .config import LaunchError, load, start_order
from .output import Console
from .supervisor import Supervisor


def launch_command(chunkbus: click.Group) -> click.Command:
    """The `launch` command for `chunkbus`, whose subcommands the launch files name."""

    @click.command("launch", context_settings={"help_option_names": ["-h", "--help"]})
    @click.argument("file", type=click.Path(dir_okay=False))
    @click.option(
        "--duration",
        type=click.FloatRange(min=0),
        default=None,
        help="Stop after this many seconds [default: run until Ctrl-C].",
    )
    @click.option("--dry-run", is_flag=True, help="Print the processes it would start, and exit.")
    @click.option("--only", multiple=True, help="Start only this node (repeatable).")
    @click.option("--skip", multiple=True, help="Start every node but this one (repeatable), e.g. --skip view.")
    @click.option("--log-json", is_flag=True, help="Print the nodes' log as JSON lines, one object per line.")
    @click.option("--verbose", "-v", is_flag=True,
                  help="The full log: on a terminal, the nodes' statistics as log lines instead of status lines.")
    @click.option("--ready-timeout", type=click.FloatRange(min=1), default=300.0, show_default=True,
                  help="Seconds a node may take to say it is ready.")
    def launch(file: str, duration: float | None, dry_run: bool, only: tuple[str, ...], skip: tuple[str, ...],
               log_json: bool, verbose: bool, ready_timeout: float) -> None:
        """Start the chunkbus nodes that FILE lists, and look after them until Ctrl-C."""
        try:
            specs = load(file, chunkbus.commands)
        except LaunchError as exc:
            raise click.ClickException(str(exc)) from None
        names = {spec.name for spec in specs}
        for option, given in (("--only", only), ("--skip", skip)):
            if unknown := set(given) - names:
                raise click.ClickException(
                    f"{option} {', '.join(sorted(unknown))}: no such node in {file} (nodes: {', '.join(names)})"
                )
        if only:
            specs = [spec for spec in specs if spec.name in only]
        specs = [spec for spec in specs if spec.name not in skip]
        if dry_run:
            for spec in start_order(specs):
                env = " ".join(f"{k}={v}" for k, v in spec.env.items())
                after = f"  (after {', '.join(spec.after)})" if spec.after else ""
                click.echo(f"{spec.name}: {env + ' ' if env else ''}{shlex.join(Supervisor.command_line(spec))}{after}")
            return
        terminal = sys.stdout.isatty()
        console = Console([spec.name for spec in start_order(specs)], colour=terminal and not log_json,
                          json_lines=log_json, status_board=terminal and not verbose and not log_json)
        sys.exit(Supervisor(specs, console=console, ready_timeout=ready_timeout).run(duration))

    return launch
