"""The `chunkbus` command line: a click group with one subcommand per node."""

from __future__ import annotations

from importlib.metadata import version

import click
import zmq

from ..bus.endpoints import camera_node, list_publishers, runtime_dir
from ..bus.lifecycle import follow_launcher
from ..bus.log import LEVELS
from ..launch.cli import launch_command
from .cli_options import (
    BROKER_FORMS,
    CLIENT_BROKER,
    BrokerAddress,
    LogOptions,
    PermanentError,
    client_keys,
    curve_options,
    pairs,
    server_keys,
    server_options,
)
from .policies import DTYPES


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
    follow_launcher()  # started by `launch`: stop when it dies, however it dies
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
@click.option("--curve-secret", type=click.Path(dir_okay=False), default=None,
              help="The broker's secret key file (NAME.key_secret, from `chunkbus keys new`): CURVE encryption and "
                   "authentication on both ports; plaintext connections are refused.")
@click.option("--allow-robots", type=click.Path(file_okay=False), default=None,
              help="With --curve-secret: the folder of the robots' public keys (NAME.key; NAME is the robot id its "
                   "requests must carry). Watched: adding or removing a file takes effect at once.")
@click.option("--allow-workers", type=click.Path(file_okay=False), default=None,
              help="With --curve-secret: the folder of the workers' public keys. Watched like --allow-robots.")
@click.option("--metrics-port", type=int, default=None, help="Serve /metrics and /health on this HTTP port.")
@click.option("--metrics-host", default="127.0.0.1",
              help="The address the metrics port binds: 0.0.0.0 lets other hosts (a Prometheus) scrape it.")
@click.option(
    "--max-queue", type=click.IntRange(1), default=64, help="Requests a service may queue; more are rejected."
)
@click.option("--default-ttl", type=click.FloatRange(0), default=None, help="Seconds a request without a ttl may wait.")
@click.option("--request-timeout", type=click.FloatRange(0), default=60.0, help="Seconds a worker has to answer.")
@click.option(
    "--heartbeat-interval", type=click.FloatRange(0.01), default=0.5, help="Seconds between heartbeats to each worker."
)
@click.option(
    "--heartbeat-liveness", type=click.IntRange(1), default=3, help="Heartbeats missed before a worker is dropped."
)
@click.option("--max-attempts", type=click.IntRange(1), default=2, help="Runs of a request whose workers died.")
@click.option("--max-per-robot", type=click.IntRange(1), default=16,
              help="Requests one robot may have queued or running; more are rejected (robots also take turns).")
@click.option("--max-message-bytes", type=click.IntRange(1024), default=64 << 20,
              help="The largest frame a client or worker may send; a larger one drops its connection.")
@click.option("--name", default="broker", help="Node name: taps find its traffic on its ipc endpoint.")
@click.option("--no-capture", is_flag=True, help="Do not offer the traffic to taps.")
@click.pass_obj
def broker(log: LogOptions, metrics_port, metrics_host, name, no_capture, **options) -> None:
    """Queue requests from robots and balance them over workers (Majordomo, RFC 7)."""
    from ..bus.endpoints import EndpointError
    from ..bus.security import KeyFileError
    from .broker import BrokerConfig, BrokerSetupError, serve

    log.start(name)
    try:
        serve(BrokerConfig(capture=None if no_capture else name, **options), metrics_port, metrics_host)
    except zmq.ZMQError as exc:
        raise click.ClickException(f"cannot bind {options['frontend']} / {options['backend']}: {exc}") from None
    except EndpointError as exc:
        raise click.ClickException(str(exc)) from None
    except (BrokerSetupError, KeyFileError) as exc:
        raise PermanentError(str(exc)) from None


@main.command()
@click.option(
    "--broker",
    "broker_address",
    type=BrokerAddress("backend"),
    default="tcp://127.0.0.1:5556",
    envvar="CHUNKBUS_BROKER",
    show_envvar=True,
    help=f"The broker's backend: {BROKER_FORMS.format(port=5556)}. Without --broker, CHUNKBUS_BROKER (the "
    "frontend, as the other commands take it) gives the host, on the port after its own: gpu-host or "
    "gpu-host:5555 means tcp://gpu-host:5556, gpu-host:7000 means tcp://gpu-host:7001.",
)
@click.option("--policy", required=True, help="A LeRobot checkpoint folder or hub id, or scripted:NAME.")
@click.option("--device", default="cpu", help="cpu, cuda, cuda:1, mps.")
@click.option("--service", default=None, help="The service name to serve [default: the policy's type].")
@click.option("--max-batch", type=click.IntRange(1, 1024), default=1, help="Requests run as one batch.")
@click.option(
    "--threads", type=click.IntRange(1), default=None, help="CPU threads for torch [default: torch's choice]."
)
@click.option("--dtype", type=click.Choice(DTYPES), default="float32",
              help="The model's number type: bfloat16 halves memory and is faster on GPUs from Ampere on (the π "
                   "family keeps its vision tower in float32).")
@click.option("--compile", "compile_model", is_flag=True,
              help="torch.compile the model (compiled for batches of 1 and --max-batch before it registers).")
@click.option("--tokenizer", default=None,
              help="A folder (or hub id) with the text tokenizer, instead of the one the checkpoint names: "
                   "PaliGemma's for π0, π0.5 and π0-FAST; for SmolVLA its VLM's folder (config and tokenizer).")
@click.option("--action-tokenizer", default=None,
              help="A folder (or hub id) with π0-FAST's FAST action tokenizer, instead of the checkpoint's.")
@click.option("--default-task", default="",
              help="The task for warm-up, and for requests that carry none (language-conditioned policies).")
@click.option("--heartbeat-interval", type=click.FloatRange(0.01), default=0.5,
              help="Seconds between heartbeats to the broker (as the broker's --heartbeat-interval).")
@click.option("--heartbeat-liveness", type=click.IntRange(1), default=3,
              help="Heartbeats missed before the worker takes the broker for gone and registers again; over a "
                   "slow or jittery link to the broker give both sides more (docs/networking.md).")
@curve_options()
@click.pass_obj
def worker(log: LogOptions, broker_address: str, policy: str, device: str, service: str | None, max_batch: int,
           threads: int | None, dtype: str, compile_model: bool, tokenizer: str | None, action_tokenizer: str | None,
           default_task: str, heartbeat_interval: float, heartbeat_liveness: int, curve_secret: str | None,
           peer_key: str | None) -> None:
    """Serve one policy on one device to the broker."""
    from ..bus.worker_link import LinkFailed
    from .policies import LoadOptions, PolicyLoadError, load_policy
    from .worker import serve

    logger = log.start("worker")
    keys = client_keys(curve_secret, peer_key)  # before loading: a wrong key file fails at once
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    options = LoadOptions(dtype=dtype, compile=compile_model, tokenizer=tokenizer, action_tokenizer=action_tokenizer,
                          default_task=default_task, max_batch=max_batch)
    try:
        loaded = load_policy(policy, device, options)
    except PolicyLoadError as exc:  # a restart loads the same nothing: exit EXIT_PERMANENT
        raise PermanentError(str(exc)) from None
    service = service or loaded.describe().type
    logger.info("policy loaded", policy=policy, service=service, device=device)
    try:
        serve(loaded, broker_address, service, max_batch, keys, heartbeat_interval, heartbeat_liveness)
    except LinkFailed as exc:  # the broker refuses this worker: the same keys would be refused again
        raise PermanentError(str(exc)) from None


@main.command()
@click.option("--broker", "broker_address", **CLIENT_BROKER)
@click.option("--timeout", type=float, default=3.0, help="Seconds to wait for the broker's answer.")
@curve_options()
@click.pass_obj
def status(log: LogOptions, broker_address: str, timeout: float, curve_secret, peer_key) -> None:
    """Show the broker's services, workers, queues and latencies."""
    from .diagnose import format_status, query_status

    log.start("status")
    click.echo(format_status(query_status(broker_address, timeout, client_keys(curve_secret, peer_key))))


@main.command()
@click.option("--broker", "broker_address", **CLIENT_BROKER)
@click.option("--service", default=None, help="The service to ping [default: the broker's only one].")
@click.option("-n", "count", type=click.IntRange(1), default=10, help="Requests to send.")
@click.option("--timeout", type=float, default=30.0, help="Seconds to wait for each answer.")
@curve_options()
@click.pass_obj
def ping(log: LogOptions, broker_address: str, service: str | None, count: int, timeout: float, curve_secret,
         peer_key) -> None:
    """Send synthetic observations to a service and report latency and chunk shape."""
    from .diagnose import ping as run_ping

    log.start("ping")
    run_ping(broker_address, service, count, timeout, client_keys(curve_secret, peer_key))


@main.command()
@click.option("--name", required=True, help="The camera's name: it publishes on camera/NAME.")
@click.option("--source", default="synthetic",
              help="synthetic; an OpenCV camera device: its index or /dev/videoN; an Intel RealSense: "
                   "realsense:SERIAL_OR_NAME (as `lerobot-find-cameras realsense` lists them); or a video file.")
@click.option("--fps", type=click.FloatRange(min=0.1), default=30.0, help="Frames published per second.")
@click.option("--width", type=int, default=None, help="Frame width [default: 640 for synthetic, the device's].")
@click.option("--height", type=int, default=None, help="Frame height [default: 480 for synthetic, the device's].")
@click.option("--fourcc", default=None, help="OpenCV device pixel format, e.g. MJPG.")
@click.option("--encoding", type=click.Choice(["raw", "jpeg"]), default="raw", help="How frames are published.")
@click.option("--jpeg-quality", type=click.IntRange(1, 100), default=90, help="JPEG quality (with --encoding jpeg).")
@click.option("--node", "node_name", default=None, help="Node name [default: camera_NAME].")
@click.option("--bind", multiple=True, help="Also publish on this endpoint, e.g. tcp://*:6001 (repeatable).")
@server_options
@click.pass_obj
def camera(log: LogOptions, name, source, fps, width, height, fourcc, encoding, jpeg_quality, node_name, bind,
           curve_secret, allow_subscribers) -> None:
    """Publish one camera's frames at a fixed rate."""
    from .camera import CameraError, CameraNode, open_source, serve

    node_name = node_name or camera_node(name)
    log.start(node_name)
    keys = server_keys(curve_secret, allow_subscribers)
    try:
        node = CameraNode(
            name, lambda: open_source(source, width, height, fps, fourcc), fps, encoding, jpeg_quality, node_name, bind,
            keys,
        )
    except CameraError as exc:
        raise click.ClickException(str(exc)) from None
    serve(node)


@main.command()
@click.option("--driver", type=click.Choice(["sim", "lerobot", "so101", "so100", "koch"]), default="sim",
              help="sim: a simulated SO-101. lerobot: any robot lerobot can make (give --robot-type). "
                   "so101, so100, koch: short for --driver lerobot --robot-type so101_follower (so100_follower, "
                   "koch_follower), with --port and --id.")
@click.option("--robot-type", default=None,
              help="lerobot's robot type, its --robot.type, e.g. so101_follower (with --driver lerobot).")
@click.option("--robot-option", multiple=True, metavar="KEY=VALUE",
              help="A field of the robot's lerobot config, its --robot.KEY=VALUE, e.g. port=/dev/ttyACM0 "
                   "(repeatable). Values are read as YAML, so numbers and true/false work; text fields keep "
                   "the text as given.")
@click.option("--robot-config", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A YAML or JSON file of the robot's lerobot config fields (and `type`); "
                   "--port, --id, --calibration-dir and --robot-option override it.")
@click.option("--port", default=None, help="The robot's serial port (its port field), e.g. /dev/ttyACM0.")
@click.option("--id", "robot_id", default=None, help="The arm's id, which names its lerobot calibration file.")
@click.option("--calibration-dir", default=None, help="Where its calibration file is [default: lerobot's].")
@click.option("--name", default="arm", help="Node name; it publishes `state`.")
@click.option("--rate", type=click.FloatRange(min=1), default=50.0, help="State rate (Hz).")
@click.option(
    "--hold-after", type=click.FloatRange(min=0), default=0.5, help="Seconds without commands before holding."
)
@click.option("--max-step", type=click.FloatRange(min=0), default=10.0, help="Largest change of a joint per command.")
@click.option("--commands-from", multiple=True, default=["actuator"],
              help="A node or endpoint publishing `command` (repeatable).")
@click.pass_obj
def arm(log: LogOptions, driver, robot_type, robot_option, robot_config, port, robot_id, calibration_dir, name, rate,
        hold_after, max_step, commands_from) -> None:
    """Own the motor bus: publish state, apply commands through the safety layer."""
    from .arm import LEROBOT_ARMS, ArmConfigError, ArmError, LerobotArm, SimArm, serve

    log.start(name)
    if driver == "sim":
        if robot_type or robot_option or robot_config:
            raise click.UsageError("--robot-type, --robot-option and --robot-config need --driver lerobot")
        arm_driver = SimArm()
    else:
        if driver != "lerobot":
            if robot_type:
                raise click.UsageError(f"--driver {driver} is --robot-type {LEROBOT_ARMS[driver]}: give one of them")
            if not port or not robot_id:
                raise click.UsageError(f"--driver {driver} needs --port and --id")
            robot_type = LEROBOT_ARMS[driver]
        options = {key: value for key, value in [("port", port), ("id", robot_id), ("calibration_dir", calibration_dir)]
                   if value is not None}
        options.update(pairs(robot_option, "--robot-option"))
        try:
            arm_driver = LerobotArm(robot_type, robot_config, options, name=None if driver == "lerobot" else driver)
        except ArmConfigError as exc:
            raise PermanentError(str(exc)) from None
        except ArmError as exc:  # unplugged, or powered off: a restart may find it
            raise click.ClickException(str(exc)) from None
    serve(arm_driver, name, rate, hold_after, max_step, list(commands_from))


@main.command()
@click.option("--broker", "broker_address", **CLIENT_BROKER)
@click.option("--service", required=True, help="The policy service to ask for chunks.")
@click.option("--robot-id", default=None,
              help="Names this robot's requests (and their replace key) [default: robot; with --curve-secret, the "
                   "key's NAME, which the broker requires].")
@click.option("--task", default="", help="The task, for language-conditioned policies.")
@click.option("--fps", type=click.FloatRange(min=1), default=30.0, help="Control rate (Hz).")
@click.option("--strategy", type=click.Choice(["replace", "crossfade", "ensemble", "rtc"]), default="crossfade",
              help="How a new chunk takes over from the one running: at once (replace, the jerkiest), blended "
                   "over --crossfade-window ticks, ACT's temporal ensembling, or real-time chunking (rtc: the "
                   "worker guides each chunk to agree with what the arm does until it arrives; flow-matching "
                   "policies: SmolVLA, π0, π0.5, GR00T).")
@click.option("--rtc-fallback", type=click.Choice(["crossfade", "ensemble"]), default="crossfade",
              help="rtc: how a chunk that was not guided is merged.")
@click.option("--rtc-overlap", type=click.IntRange(0), default=10,
              help="rtc: ticks past the expected delay over which the new chunk is still pulled towards the old.")
@click.option("--crossfade-window", type=click.IntRange(1), default=5, help="Ticks to blend over (crossfade).")
@click.option("--ensemble-m", type=float, default=0.01, help="Weight decay m of exp(-m*i) (ensemble).")
@click.option("--priority", type=int, default=0, help="This robot's requests go before those of lower priority.")
@click.option("--ttl", type=click.FloatRange(min=0), default=0.5, help="Seconds a request may wait in the broker.")
@click.option("--send-size", type=click.Choice(["model", "native"]), default="model",
              help="Camera frames as the model takes them (letterboxed to its input size, as the worker would) or "
                   "as the cameras took them.")
@click.option("--send-encoding", type=click.Choice(["jpeg", "raw"]), default="jpeg",
              help="Camera frames in requests JPEG-compressed or as raw pixels (raw: for a GPU on the same host or "
                   "LAN, where bandwidth is free and JPEG's CPU is not).")
@click.option("--jpeg-quality", type=click.IntRange(1, 100), default=90, help="JPEG quality of sent frames.")
@click.option("--camera", "cameras", multiple=True,
              help="A camera to send (repeatable): NAME, as the policy's observation.images.NAME, or NAME=FEATURE_KEY.")
@click.option("--camera-node", multiple=True,
              help="Where camera NAME publishes, if not node camera_NAME (repeatable): NAME=NODE_OR_ENDPOINT.")
@click.option("--arm", "arm_node", default="arm", help="The arm node, or its endpoint.")
@click.option("--max-obs-age", type=click.FloatRange(min=0), default=0.25, help="Refuse older frames/state (s).")
@click.option("--n-obs-steps", type=click.IntRange(1), default=None, help="History length [default: the model's].")
@click.option("--request-timeout", type=click.FloatRange(min=0.01), default=2.0,
              help="Seconds to wait for a chunk before asking again.")
@click.option("--name", default="actuator", help="Node name; it publishes `command`.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
              help="Serve this robot's round trips, holds and counts for Prometheus on this HTTP port (/metrics).")
@click.option("--metrics-host", default="127.0.0.1",
              help="The address the metrics port binds: 0.0.0.0 lets other hosts (a Prometheus) scrape it.")
@click.option("--realtime", is_flag=True,
              help="Run the control loop in the real-time scheduling class (SCHED_FIFO), pinned to one CPU, so that "
                   "other processes cannot delay its ticks; where the system does not permit it, one warning says "
                   "how to permit it and the loop runs with the normal scheduler.")
@click.option("--cpu", type=click.IntRange(0), default=None,
              help="With --realtime: the CPU to pin the control loop to [default: the last this process may use].")
@curve_options()
@click.option("--publisher-key", default=None,
              help="The public key of the publishers on another host that --camera-node or --arm name by tcp:// "
                   "(their --curve-secret's NAME.key, or its 40 characters): they are reached over CURVE with "
                   "this node's --curve-secret.")
@click.pass_obj
def actuator(log: LogOptions, broker_address, cameras, camera_node, arm_node, curve_secret, peer_key, publisher_key,
             **options) -> None:
    """Run the control loop: request chunks, stitch them, command the arm every tick."""
    from .actuator import ActuatorConfig, SetupError, serve

    log.start(options["name"])
    if options["cpu"] is not None and not options["realtime"]:
        raise click.UsageError("--cpu pins the control loop of --realtime: give --realtime too")
    keys = client_keys(curve_secret, peer_key)
    input_keys = client_keys(curve_secret, publisher_key, "--publisher-key", pair_required=False)
    options["robot_id"] = options["robot_id"] or (keys.own.name if keys else "robot")
    camera_map = {}
    for value in cameras:
        name, _, feature = value.partition("=")
        camera_map[name] = feature or f"observation.images.{name}"
    try:
        serve(ActuatorConfig(broker=broker_address, cameras=camera_map, arm=arm_node,
                             camera_nodes=pairs(camera_node, "--camera-node"), keys=keys, input_keys=input_keys,
                             **options))
    except SetupError as exc:
        raise PermanentError(str(exc)) from None


@main.command()
@click.argument("text")
@click.option("--actuator", "actuator_name", default="actuator",
              help="The actuator's node name (its --name) on this host.")
@click.pass_obj
def task(log: LogOptions, text: str, actuator_name: str) -> None:
    """Change the task a running actuator sends, from its next request on."""
    from ..bus.messages import ErrorReply, SetTask
    from ..bus.sockets import ask_node

    log.start("task")
    try:
        answer = ask_node(actuator_name, SetTask(text))
    except TimeoutError as exc:
        raise click.ClickException(f"{exc} (`chunkbus endpoints` lists the nodes running here)") from None
    if isinstance(answer, ErrorReply):
        raise click.ClickException(f"the actuator refused: {answer.message}")
    click.echo(f"robot {answer.robot_id}: task {answer.task!r} from tick {answer.tick} (was {answer.previous!r})")


@main.command()
@click.argument("recording", required=False, type=click.Path(dir_okay=False))
@click.option("--connect", multiple=True,
              help="Also listen to this endpoint: tcp://HOST:PORT, or a node's name (repeatable).")
@click.option("--save", default=None, type=click.Path(dir_okay=False),
              help="Write a Rerun recording (FILE.rrd) instead of showing it.")
@click.option("--web", is_flag=True,
              help="Serve Rerun's web viewer (for a headless host or a browser) instead of the native viewer; "
                   "without a display that is the default.")
@click.option("--web-port", type=click.IntRange(1, 65535), default=9090, help="The web viewer's HTTP port.")
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=9876,
              help="The port the web viewer reads the data from.")
@click.option("--duration", type=click.FloatRange(min=0), default=None, help="Stop after this many seconds (live).")
@click.option("--camera-fps", type=click.FloatRange(min=0.1), default=10.0,
              help="Frames drawn per camera and second at most (live): drawing takes CPU the robot may need.")
@curve_options("--publisher-key", "the publishers of --connect tcp:// endpoints")
@click.pass_obj
def view(log: LogOptions, recording, connect, save, web, web_port, grpc_port, duration, camera_fps, curve_secret,
         peer_key) -> None:
    """Show this host's bus in Rerun (cameras, joints, commands, every chunk), or RECORDING.mcap."""
    from .tap import TapError
    from .view import view_live, view_recording

    log.start("view")
    try:
        if recording:
            view_recording(recording, save, web, web_port, grpc_port)
        else:
            keys = client_keys(curve_secret, peer_key, "--publisher-key", pair_required=False)
            view_live(list(connect), keys, save, web, web_port, grpc_port, duration, camera_fps)
    except TapError as exc:
        raise click.ClickException(str(exc)) from None


@main.group()
def keys() -> None:
    """CURVE key pairs: for the broker, each robot and each worker (pyzmq's certificate files)."""


@keys.command("new")
@click.argument("name")
@click.option("--dir", "directory", type=click.Path(file_okay=False), default=".", help="Where to write the files.")
def keys_new(name: str, directory: str) -> None:
    """Make a key pair: NAME.key (public: copy it to the peers) and NAME.key_secret (only for this node)."""
    from ..bus.security import KeyFileError, new_key_pair

    try:
        public, secret = new_key_pair(name, directory)
    except KeyFileError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot write the key files in {directory}: {exc.strerror}") from None
    click.echo(f"public key  {public}  (copy it into the broker's --allow-robots or --allow-workers folder, or, for "
               "the broker's own, to each robot and worker)")
    click.echo(f"secret key  {secret}  (readable by you only: it never leaves this host)")


@keys.command("show")
@click.argument("file", type=click.Path(dir_okay=False))
def keys_show(file: str) -> None:
    """Print the public key of a key file (NAME.key or NAME.key_secret)."""
    from ..bus.security import KeyFileError, read_public_key

    try:
        click.echo(read_public_key(file).decode())
    except KeyFileError as exc:
        raise click.ClickException(str(exc)) from None


@main.group()
def tap() -> None:
    """Record, inspect and replay the bus (MCAP files)."""


def _tap_errors(function, *args):
    from .tap import TapError

    try:
        return function(*args)
    except TapError as exc:
        raise click.ClickException(str(exc)) from None


_connect = click.option("--connect", multiple=True,
                        help="Also listen to this endpoint: tcp://HOST:PORT, or a node's name (repeatable).")
_topic = click.option("--topic", "topics", multiple=True,
                      help="Only topics matching this pattern, e.g. 'camera/*' (repeatable).")
_duration = click.option("--duration", type=click.FloatRange(min=0), default=None, help="Stop after this many seconds.")
_connect_keys = curve_options("--publisher-key", "the publishers of --connect tcp:// endpoints")


def _listen_keys(curve_secret, peer_key):
    return client_keys(curve_secret, peer_key, "--publisher-key", pair_required=False)


@tap.command("record")
@click.argument("output", type=click.Path(dir_okay=False))
@_connect
@_topic
@_duration
@_connect_keys
@click.pass_obj
def tap_record(log: LogOptions, output, connect, topics, duration, curve_secret, peer_key) -> None:
    """Record every publisher on this host (and --connect ones) into OUTPUT.mcap, zstd-compressed."""
    from .tap import record, summary_text

    log.start("tap")
    keys = _listen_keys(curve_secret, peer_key)
    recording = _tap_errors(record, output, list(connect), list(topics), duration, keys)
    click.echo(summary_text(recording))


@tap.command("echo")
@_connect
@_topic
@_duration
@_connect_keys
@click.pass_obj
def tap_echo(log: LogOptions, connect, topics, duration, curve_secret, peer_key) -> None:
    """Print messages as they pass, decoded (arrays summarised)."""
    from .tap import echo

    log.start("tap")
    _tap_errors(echo, list(connect), list(topics), duration, _listen_keys(curve_secret, peer_key))


@tap.command("stats")
@_connect
@_topic
@_duration
@_connect_keys
@click.pass_obj
def tap_stats(log: LogOptions, connect, topics, duration, curve_secret, peer_key) -> None:
    """Rate, bandwidth and message size per topic, live."""
    from .tap import stats

    log.start("tap")
    _tap_errors(stats, list(connect), list(topics), duration, 2.0, _listen_keys(curve_secret, peer_key))


@tap.command("replay")
@click.argument("recording", type=click.Path(dir_okay=False))
@click.option("--rate", type=click.FloatRange(min=0.01), default=1.0, help="Speed: 2 is twice as fast.")
@_topic
@click.option("--node", default="replay", help="Publish as this node.")
@click.option("--bind", multiple=True, help="Also publish on this endpoint, e.g. tcp://*:6001 (repeatable).")
@server_options
@click.pass_obj
def tap_replay(log: LogOptions, recording, rate, topics, node, bind, curve_secret, allow_subscribers) -> None:
    """Republish a recording's messages with their original timing."""
    from .tap import replay

    logger = log.start("tap")
    keys = server_keys(curve_secret, allow_subscribers)
    count = _tap_errors(replay, recording, rate, list(topics), node, list(bind), keys)
    logger.info("replay finished", messages=count)


@tap.command("info")
@click.argument("recording", type=click.Path(dir_okay=False))
@click.pass_obj
def tap_info(log: LogOptions, recording) -> None:
    """Topics, message counts, duration and sizes of a recording."""
    from .tap import format_info, info

    log.start("tap")
    click.echo(format_info(_tap_errors(info, recording)))


@tap.command("export")
@click.argument("recording", type=click.Path(dir_okay=False))
@click.option("--lerobot", "dataset_dir", type=click.Path(file_okay=False), default=None,
              help="Write a LeRobot dataset into this new folder (lerobot's own writer; nothing is pushed).")
@click.option("--repo-id", default=None, help="The dataset's id, USER/NAME (with --lerobot).")
@click.option("--episode-gap", type=click.FloatRange(min=0, min_open=True), default=None,
              help="A new episode after this many seconds without a moving command (that pause's holds left out).")
@click.option("--split-on-task", is_flag=True, help="A new episode where the task changes.")
@click.option("--task", default=None, help="The task of every frame, instead of the recording's.")
@click.option("--foxglove", "foxglove_out", type=click.Path(dir_okay=False), default=None,
              help="Write an MCAP with Foxglove's schemas here (the Foxglove app opens it with no plugin).")
@click.pass_obj
def tap_export(log: LogOptions, recording, dataset_dir, repo_id, episode_gap, split_on_task, task,
               foxglove_out) -> None:
    """A recording as a LeRobot dataset (--lerobot DIR --repo-id USER/NAME) or for Foxglove (--foxglove OUT.mcap)."""
    from .export import export_foxglove, export_lerobot

    if dataset_dir is None and foxglove_out is None:
        raise click.UsageError("say what to export: --lerobot DIR --repo-id USER/NAME, or --foxglove OUT.mcap")
    if dataset_dir is not None and repo_id is None:
        raise click.UsageError("--lerobot needs --repo-id USER/NAME: the dataset's id (nothing is pushed to the hub)")
    log.start("tap")
    if dataset_dir is not None:
        exported = _tap_errors(export_lerobot, recording, dataset_dir, repo_id, episode_gap, split_on_task, task)
        click.echo(exported.text())
    if foxglove_out is not None:
        counts = _tap_errors(export_foxglove, recording, foxglove_out)
        click.echo(f"wrote {sum(counts.values())} messages on {len(counts)} topics into {foxglove_out}")


launch = launch_command(main)  # `chunkbus launch`, and the `launch` script (pyproject.toml)
main.add_command(launch)


if __name__ == "__main__":
    main()
