"""The option types and helpers that several `chunkbus` commands share (nodes/cli.py)."""

from __future__ import annotations

from dataclasses import dataclass

import click
import zmq

from ..bus.endpoints import BACKEND_PORT, FRONTEND_PORT, EndpointError, backend_of, broker_address, is_ipv6
from ..bus.lifecycle import EXIT_PERMANENT
from ..bus.log import configure_logging


class PermanentError(click.ClickException):
    """A configuration error that no restart fixes: `launch` does not restart the node."""

    exit_code = EXIT_PERMANENT


@dataclass
class LogOptions:
    level: str
    json: bool

    def start(self, node: str):
        """Configure logging for the node this process runs; returns its logger."""
        return configure_logging(node, self.level, self.json)


class BrokerAddress(click.ParamType):
    """A `--broker` value, as people write it (bus.endpoints.broker_address).

    `side` is the broker socket the command connects to: "frontend" (clients) or
    "backend" (workers). CHUNKBUS_BROKER always holds the frontend's address; a worker
    takes its host and the port after its own (backend_of).
    """

    name = "address"

    def __init__(self, side: str):
        self.side = side

    def convert(self, value, param, ctx):
        from click.core import ParameterSource

        from_env = ctx is not None and param is not None and (
            ctx.get_parameter_source(param.name) is ParameterSource.ENVIRONMENT
        )
        try:
            if from_env and self.side == "backend":
                address = backend_of(value)
            else:
                address = broker_address(value, FRONTEND_PORT if self.side == "frontend" else BACKEND_PORT)
        except EndpointError as exc:
            self.fail(str(exc), param, ctx)
        if is_ipv6(address):
            zmq.Context.instance().setsockopt(zmq.IPV6, 1)  # zmq reaches IPv6 addresses only when told
        return address


BROKER_FORMS = "HOST:PORT, HOST (port {port}), [IPv6]:PORT, tcp://HOST:PORT or ipc://PATH"
CLIENT_BROKER = dict(
    type=BrokerAddress("frontend"),
    default="tcp://127.0.0.1:5555",
    envvar="CHUNKBUS_BROKER",
    show_envvar=True,
    help=f"The broker's frontend: {BROKER_FORMS.format(port=5555)}.",
)


def pairs(values: tuple[str, ...], option: str) -> dict[str, str]:
    pairs = {}
    for value in values:
        key, sep, target = value.partition("=")
        if not sep or not key or not target:
            raise click.BadParameter(f"{value!r} is not NAME=VALUE", param_hint=option)
        pairs[key] = target
    return pairs
