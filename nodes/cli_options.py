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


def curve_options(peer_key: str = "--broker-key", peer: str = "the broker"):
    """--curve-secret and the peer's key (`peer_key`): a command that connects over CURVE."""
    env = "CHUNKBUS_BROKER_KEY" if peer_key == "--broker-key" else None

    def add(command):
        command = click.option(
            peer_key, "peer_key", default=None, envvar=env, show_envvar=env is not None,
            help=f"The public key of {peer} (its NAME.key file, or the 40 characters `chunkbus keys show` prints), "
                 "with --curve-secret.")(command)
        return click.option(
            "--curve-secret", type=click.Path(dir_okay=False), default=None, envvar="CHUNKBUS_CURVE_SECRET",
            show_envvar=True,
            help=f"This node's secret key file (NAME.key_secret, from `chunkbus keys new NAME`): talk CURVE to {peer}, "
                 f"encrypted and authenticated (with {peer_key}).")(command)

    return add


def client_keys(curve_secret: str | None, peer_key: str | None, peer_key_option: str = "--broker-key",
                pair_required: bool = True):
    """The ClientKeys that --curve-secret and the peer's key give, or None for neither; a
    PermanentError that names the fix for one without the other or a key file that fails.
    pair_required=False: a secret without the peer's key means plain connections (the secret
    may come from CHUNKBUS_CURVE_SECRET, meant for the broker)."""
    from ..bus.security import ClientKeys, KeyFileError, read_key_pair, read_public_key

    if not peer_key and (not curve_secret or not pair_required):
        return None
    if not curve_secret:
        raise PermanentError(f"{peer_key_option} needs --curve-secret: this node's own secret key file "
                             "(NAME.key_secret, from `chunkbus keys new NAME`)")
    if not peer_key:
        raise PermanentError(f"--curve-secret needs {peer_key_option}: the peer's public key (its NAME.key file, or "
                             "`chunkbus keys show` of it)")
    try:
        return ClientKeys(read_key_pair(curve_secret), read_public_key(peer_key))
    except KeyFileError as exc:
        raise PermanentError(str(exc)) from None


def server_options(command):
    """--curve-secret and --allow-subscribers: a publisher whose TCP endpoints (--bind) use CURVE."""
    command = click.option(
        "--allow-subscribers", type=click.Path(file_okay=False), default=None,
        help="With --curve-secret: the folder of the public keys (NAME.key) that may subscribe on the --bind TCP "
             "endpoints.")(command)
    return click.option(
        "--curve-secret", type=click.Path(dir_okay=False), default=None,
        help="This publisher's secret key file (NAME.key_secret): its --bind TCP endpoints take only CURVE "
             "subscribers whose keys --allow-subscribers holds (its ipc endpoint stays as it is).")(command)


def server_keys(curve_secret: str | None, allow_subscribers: str | None):
    """The publisher's ServerKeys, or None for neither option; PermanentError naming the fix."""
    from ..bus.security import AllowList, KeyFileError, read_key_pair
    from ..bus.sockets import ServerKeys

    if not curve_secret and not allow_subscribers:
        return None
    if not (curve_secret and allow_subscribers):
        raise PermanentError("--curve-secret and --allow-subscribers go together: this publisher's secret key file "
                             "and the folder of the keys that may subscribe")
    try:
        return ServerKeys(read_key_pair(curve_secret), AllowList(allow_subscribers, "--allow-subscribers"))
    except KeyFileError as exc:
        raise PermanentError(str(exc)) from None


def pairs(values: tuple[str, ...], option: str) -> dict[str, str]:
    pairs = {}
    for value in values:
        key, sep, target = value.partition("=")
        if not sep or not key or not target:
            raise click.BadParameter(f"{value!r} is not NAME=VALUE", param_hint=option)
        pairs[key] = target
    return pairs
