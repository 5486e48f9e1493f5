"""LeRobot's own async inference, driven the way its RobotClient drives it, for benchmarks.

Everything on the wire is LeRobot's: the gRPC stub and messages (lerobot.transport.services_pb2,
services_pb2_grpc), its channel options (lerobot.transport.utils.grpc_channel_options), its
chunked streaming of pickled observations (send_bytes_in_chunks), its TimedObservation /
RemotePolicyConfig (lerobot.async_inference.helpers) and its PolicyServer with its own
PolicyServerConfig and serve() (lerobot.async_inference.policy_server), run in a separate
process. Nothing of the protocol is re-implemented here.

  start_policy_server(port, trivial_chunk=None) -> ServerHandle    (handle.stop())
  LerobotClient(port, checkpoint).connect(); .round_trip(t) -> s; .measure(n) -> [s]; .close()
  throughput(port_or_ports, clients=4, seconds=S, checkpoint=...) -> requests per second
  make_act_checkpoint(folder) -> folder   (chunkbus's save_random_policy, ACT, 3x480x640)

One round trip = what a RobotClient does for one observation: build a TimedObservation
(must_go=True) from a SO-101 observation (6 joint floats, cameras "front" and "wrist" of
480x640x3 uint8, task) -> pickle.dumps -> send_bytes_in_chunks -> SendObservations; the
action chunk comes back through GetActions, called in a loop by a receiver thread exactly as
RobotClient.receive_actions does (so a GetActions is already waiting on the server when the
observation lands), and is unpickled. The latency runs from just before pickling the
observation to just after unpickling the chunk whose timestep is the observation's.
(receiver_thread=False instead calls GetActions after SendObservations returns, sequentially.)

Settings (LeRobot defaults unless said):
  server  PolicyServerConfig(host=127.0.0.1, fps=30, obs_queue_timeout=2 [default; a blocking
          Queue.get timeout, not a sleep: it returns as soon as an observation is queued],
          inference_latency=0 [CHANGED from 1/30 s: GetActions sleeps until inference_latency
          has passed since it started; that only paces chunk production to the robot's rate,
          so it would put a 33 ms floor under every round trip]); serve()'s own
          ThreadPoolExecutor(max_workers=4) and its logging (console INFO, file DEBUG).
  client  grpc_channel_options(initial_backoff=f"{1/fps:.4f}s") as RobotClient; actions
          per chunk 50; policy_device "cpu". RobotClient's control-loop sleep (environment_dt
          between ticks) paces the robot and is not used: each round trip starts at once.

The server is single-robot by design: one observation queue of size 1 (a newer observation
replaces a queued one, whoever sent it), Ready() from any client resets it, and any pending
GetActions takes whatever observation comes next. Several clients on ONE server therefore
steal and drop each other's observations; throughput() counts only chunks that came back to
the client that asked, resends an observation whose chunk has not come back after
`resend_after` s, and reports the stolen chunks and resends in throughput_details().
Passing a list of ports gives each client its own server (LeRobot's intended layout).
"""

from __future__ import annotations

import json
import os
import pickle  # nosec: LeRobot's own wire format
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HOST = "127.0.0.1"
TASK = "pick up the cube"
CAMERAS = ("front", "wrist")
IMAGE_HWC = (480, 640, 3)
CHUNK = 50
ACTION_DIM = 6
FPS = 30  # lerobot.async_inference.constants.DEFAULT_FPS


# --------------------------------------------------------------------------- checkpoint


def make_act_checkpoint(folder: Path | str, chunk_size: int = CHUNK) -> Path:
    """chunkbus's random-weight ACT checkpoint (the one its worker loads), images 3x480x640,
    inputs observation.state (6) + observation.images.front / .wrist, action (6). Reused if
    the folder already holds one."""
    from chunkbus.nodes.policies.demo import save_random_policy

    folder = Path(folder)
    if not (folder / "model.safetensors").exists():
        save_random_policy("act", folder, image_shape=(3, *IMAGE_HWC[:2]), chunk_size=chunk_size,
                           n_action_steps=chunk_size)
    return folder


# --------------------------------------------------------------------------- robot features


def make_robot():
    """An SO-101 follower with cameras "front" and "wrist" (480x640), never connected: only
    its observation_features are used, as RobotClient uses them."""
    from lerobot.cameras.opencv import OpenCVCameraConfig
    from lerobot.robots.so_follower import SO101Follower, SO101FollowerConfig

    cameras = {name: OpenCVCameraConfig(index_or_path=i, width=IMAGE_HWC[1], height=IMAGE_HWC[0], fps=FPS)
               for i, name in enumerate(CAMERAS)}
    return SO101Follower(SO101FollowerConfig(port="/dev/null", cameras=cameras))


def lerobot_features() -> dict:
    """As RobotClient.__init__: map_robot_keys_to_lerobot_features(robot), which names the
    cameras observation.images.front / observation.images.wrist (the checkpoint's names)."""
    from lerobot.async_inference.helpers import map_robot_keys_to_lerobot_features

    return map_robot_keys_to_lerobot_features(make_robot())


# --------------------------------------------------------------------------- server


@dataclass
class ServerHandle:
    port: int
    process: subprocess.Popen
    log: Path
    trivial_chunk: tuple[int, int] | None

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def stop(self, timeout: float = 5.0, keep_log: bool = False) -> None:
        """Stop the server process (SIGTERM, then SIGKILL) and remove its working folder
        (its logs/ and server.out) unless keep_log."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if not keep_log:
            shutil.rmtree(self.log.parent, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def start_policy_server(port: int, trivial_chunk: tuple[int, int] | None = None, *,
                        inference_latency: float = 0.0, obs_queue_timeout: float | None = None,
                        fps: int = FPS, ready_timeout: float = 90.0) -> ServerHandle:
    """Start LeRobot's PolicyServer (its PolicyServerConfig + serve()) in a separate process
    on 127.0.0.1:port and return once it accepts gRPC connections.

    trivial_chunk=(chunk_len, action_dim): in the server process, exactly one method is
    replaced, PolicyServer._get_action_chunk (the only caller of policy.predict_action_chunk),
    by one returning torch.zeros((1, chunk_len, action_dim), float32)[:, :actions_per_chunk].
    Everything else runs as is: SendPolicyInstructions still loads the checkpoint's ACT and
    processors (the pipeline needs the policy's image features), and each observation still
    goes through unpickling, raw_observation_to_observation (state vector, images to tensors,
    resize to the policy's image shape, /255), the preprocessor (batch, device, normalise),
    the postprocessor once per action, TimedAction wrapping and pickling of the chunk.

    inference_latency defaults to 0 here (LeRobot's default 1/30 s is a pacing sleep, see the
    module docstring); obs_queue_timeout None keeps LeRobot's default (2 s).
    The server's cwd is a temporary folder, since LeRobot writes logs/ into its cwd.
    """
    import grpc

    workdir = Path(tempfile.mkdtemp(prefix=f"lerobot-server-{port}-"))
    args = {"port": port, "trivial_chunk": list(trivial_chunk) if trivial_chunk else None,
            "inference_latency": inference_latency, "obs_queue_timeout": obs_queue_timeout, "fps": fps}
    log = workdir / "server.out"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, os.path.abspath(__file__), "_serve", json.dumps(args)],
                                   cwd=workdir, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    handle = ServerHandle(port, process, log, tuple(trivial_chunk) if trivial_chunk else None)
    deadline = time.monotonic() + ready_timeout
    with grpc.insecure_channel(handle.address) as channel:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"PolicyServer exited ({process.returncode}):\n{log.read_text()[-3000:]}")
            try:
                grpc.channel_ready_future(channel).result(timeout=0.5)
                return handle
            except grpc.FutureTimeoutError:
                if time.monotonic() > deadline:
                    handle.stop()
                    raise TimeoutError(f"PolicyServer on {handle.address} not up:\n{log.read_text()[-3000:]}") from None


def _serve(args: dict) -> None:
    """Entry point of the server process (see start_policy_server)."""
    import torch
    from lerobot.async_inference import policy_server
    from lerobot.async_inference.configs import PolicyServerConfig

    trivial = args["trivial_chunk"]
    if trivial:
        chunk_len, action_dim = trivial

        def _get_action_chunk(self, observation):  # replaces policy.predict_action_chunk
            return torch.zeros((1, chunk_len, action_dim), dtype=torch.float32)[:, : self.actions_per_chunk, :]

        policy_server.PolicyServer._get_action_chunk = _get_action_chunk

    options = {"host": HOST, "port": args["port"], "fps": args["fps"],
               "inference_latency": args["inference_latency"]}
    if args["obs_queue_timeout"] is not None:
        options["obs_queue_timeout"] = args["obs_queue_timeout"]
    policy_server.serve(PolicyServerConfig(**options))


# --------------------------------------------------------------------------- client


class LerobotClient:
    """One robot's side of LeRobot async inference, as RobotClient does it, minus the robot.

    connect(): channel with grpc_channel_options, AsyncInferenceStub, Ready(),
    SendPolicyInstructions(PolicySetup(pickle(RemotePolicyConfig("act", checkpoint,
    lerobot_features, actions_per_chunk, "cpu")))), then the GetActions receiver thread.
    """

    def __init__(self, port: int, checkpoint: Path | str, *, host: str = HOST, actions_per_chunk: int = CHUNK,
                 task: str = TASK, fps: int = FPS, receiver_thread: bool = True, seed: int = 0,
                 resend_after: float | None = None):
        self.address = f"{host}:{port}"
        self.checkpoint = str(checkpoint)
        self.actions_per_chunk = actions_per_chunk
        self.task = task
        self.fps = fps
        self.receiver_thread = receiver_thread
        self.resend_after = resend_after  # None: wait for the chunk up to `timeout` in round_trip
        rng = np.random.default_rng(seed)
        self._images = {name: rng.integers(0, 256, IMAGE_HWC, dtype=np.uint8) for name in CAMERAS}
        self._rng = rng
        self._chunks: dict[int, tuple[float, list]] = {}
        self._cond = threading.Condition()
        self._running = False
        self._thread: threading.Thread | None = None
        self.foreign_chunks = 0  # chunks that answered another client's observation
        self.resends = 0

    # -- setup, as RobotClient.__init__ and RobotClient.start
    def connect(self, start_receiver: bool = True) -> LerobotClient:
        import grpc
        from lerobot.async_inference.helpers import RemotePolicyConfig, map_robot_keys_to_lerobot_features
        from lerobot.transport import services_pb2, services_pb2_grpc
        from lerobot.transport.utils import grpc_channel_options

        self._pb2 = services_pb2
        self.robot = make_robot()
        self._motors = [key for key, kind in self.robot.observation_features.items() if kind is float]
        self.policy_config = RemotePolicyConfig("act", self.checkpoint, map_robot_keys_to_lerobot_features(self.robot),
                                                self.actions_per_chunk, "cpu")
        self.channel = grpc.insecure_channel(self.address,
                                             grpc_channel_options(initial_backoff=f"{1 / self.fps:.4f}s"))
        self.stub = services_pb2_grpc.AsyncInferenceStub(self.channel)
        self.stub.Ready(services_pb2.Empty())
        self.stub.SendPolicyInstructions(services_pb2.PolicySetup(data=pickle.dumps(self.policy_config)))
        self._running = True
        if start_receiver:
            self.start_receiver()
        return self

    def start_receiver(self) -> None:
        if self.receiver_thread and self._thread is None:
            self._thread = threading.Thread(target=self._receive_actions, daemon=True, name="lerobot-receiver")
            self._thread.start()

    def close(self) -> None:
        self._running = False
        self.channel.close()  # cancels a GetActions pending on the server
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- the observation, as RobotClient.control_loop_observation builds it
    def raw_observation(self) -> dict:
        observation = {motor: float(value) for motor, value in
                       zip(self._motors, self._rng.uniform(-90, 90, len(self._motors)))}
        observation.update(self._images)
        observation["task"] = self.task
        return observation

    def send_observation(self, timed_observation) -> None:
        """RobotClient.send_observation: pickle, send_bytes_in_chunks, SendObservations."""
        from lerobot.transport.utils import send_bytes_in_chunks

        observation_bytes = pickle.dumps(timed_observation)
        iterator = send_bytes_in_chunks(observation_bytes, self._pb2.Observation,
                                        log_prefix="[CLIENT] Observation", silent=True)
        self.stub.SendObservations(iterator)

    def _take(self, actions_chunk) -> None:
        """As RobotClient.receive_actions: skip Empty, unpickle list[TimedAction]."""
        if len(actions_chunk.data) == 0:
            return
        timed_actions = pickle.loads(actions_chunk.data)  # nosec
        received = time.perf_counter()
        if not timed_actions:
            return
        with self._cond:
            self._chunks[timed_actions[0].get_timestep()] = (received, timed_actions)
            self._cond.notify_all()

    def _receive_actions(self) -> None:
        import grpc

        while self._running:
            try:
                self._take(self.stub.GetActions(self._pb2.Empty()))
            except grpc.RpcError:
                if not self._running:
                    return
                time.sleep(0.01)
            except ValueError:  # channel closed
                return

    def round_trip(self, obs_timestep: int, timeout: float = 60.0) -> float:
        """One observation out, its chunk back; the latency in seconds."""
        from lerobot.async_inference.helpers import TimedObservation

        raw = self.raw_observation()
        start = time.perf_counter()
        deadline = start + timeout
        observation = TimedObservation(timestamp=time.time(), observation=raw, timestep=obs_timestep, must_go=True)
        self.send_observation(observation)
        sent = time.perf_counter()
        while True:
            if not self.receiver_thread:
                self._take(self.stub.GetActions(self._pb2.Empty()))
            with self._cond:
                if self.receiver_thread:
                    wait = deadline - time.perf_counter()
                    if self.resend_after is not None:
                        wait = min(wait, sent + self.resend_after - time.perf_counter())
                    self._cond.wait_for(lambda: obs_timestep in self._chunks, timeout=max(0.0, wait))
                got = self._chunks.pop(obs_timestep, None)
                self.foreign_chunks += len(self._chunks)
                self._chunks.clear()
            if got is not None:
                chunk = got[1]
                assert len(chunk) == self.actions_per_chunk and chunk[0].get_timestep() == obs_timestep
                return got[0] - start
            now = time.perf_counter()
            if now > deadline:
                raise TimeoutError(f"no chunk for observation #{obs_timestep} from {self.address}")
            if self.resend_after is not None and now - sent > self.resend_after:
                self.resends += 1  # the server dropped it or gave it to another client: send it again
                observation.timestamp = time.time()
                self.send_observation(observation)
                sent = time.perf_counter()

    def measure(self, n: int, warmup: int = 2, first_timestep: int = 0) -> list[float]:
        """n round trips after `warmup` unmeasured ones; latencies in seconds."""
        for i in range(warmup):
            self.round_trip(first_timestep + i)
        return [self.round_trip(first_timestep + warmup + i) for i in range(n)]


# --------------------------------------------------------------------------- several clients


@dataclass
class ThroughputResult:
    requests_per_second: float
    completed: int
    seconds: float
    per_client: list[int] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    foreign_chunks: int = 0
    resends: int = 0
    errors: list[str] = field(default_factory=list)


def throughput_details(port: int | Sequence[int], checkpoint: Path | str, clients: int = 4, seconds: float = 5.0,
                       warmup: int = 1, receiver_thread: bool = True,
                       resend_after: float = 2.5, warmup_timeout: float = 20.0) -> ThroughputResult:
    """`clients` LerobotClients in threads, each doing sequential round trips for `seconds`.
    port: one port (all clients on one PolicyServer) or a list (client i on ports[i % len]).
    Every client handshakes (Ready + SendPolicyInstructions) in turn before any traffic, as
    RobotClients starting one after another would. Only chunks that came back to the client
    whose observation they answer count; see the module docstring on sharing a server.
    A client whose round trip fails (TimeoutError: on a shared server its observations keep
    being answered to others) stops; its error is in .errors."""
    ports = [port] if isinstance(port, int) else list(port)
    group = [LerobotClient(ports[i % len(ports)], checkpoint, receiver_thread=receiver_thread, seed=i,
                           resend_after=resend_after) for i in range(clients)]
    for client in group:
        client.connect(start_receiver=False)
    for client in group:
        client.start_receiver()
    counts = [0] * clients
    latencies: list[float] = []
    errors: list[str] = []
    barrier = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def run(index: int, client: LerobotClient) -> None:
        base = (index + 1) * 1_000_000  # timesteps say which client asked
        try:
            for k in range(warmup):
                client.round_trip(base + k, timeout=warmup_timeout)
            client.foreign_chunks = client.resends = 0
        except Exception as error:  # noqa: BLE001
            errors.append(f"client {index} warmup: {error!r}")
        barrier.wait()
        k = warmup
        try:
            while time.perf_counter() < stop_at[0]:
                latency = client.round_trip(base + k, timeout=max(1.0, stop_at[0] - time.perf_counter() + 5))
                k += 1
                if time.perf_counter() <= stop_at[0]:
                    counts[index] += 1
                    latencies.append(latency)
        except Exception as error:  # noqa: BLE001
            errors.append(f"client {index}: {error!r}")

    threads = [threading.Thread(target=run, args=(i, c), daemon=True) for i, c in enumerate(group)]
    for thread in threads:
        thread.start()
    stop_at[0] = float("inf")
    barrier.wait()
    start = time.perf_counter()
    stop_at[0] = start + seconds
    for thread in threads:
        thread.join(timeout=seconds + 30)
    elapsed = time.perf_counter() - start
    for client in group:
        client.close()
    completed = sum(counts)
    return ThroughputResult(completed / seconds, completed, elapsed, counts, latencies,
                            sum(c.foreign_chunks for c in group), sum(c.resends for c in group), errors)


def throughput(port: int | Sequence[int], clients: int = 4, seconds: float = 5.0, *,
               checkpoint: Path | str | None = None, **options) -> float:
    """Requests per second (chunks delivered to the client that asked) over `seconds`."""
    if checkpoint is None:
        checkpoint = make_act_checkpoint(Path(tempfile.gettempdir()) / "lerobot-async-side-act")
    return throughput_details(port, checkpoint, clients, seconds, **options).requests_per_second


# --------------------------------------------------------------------------- self-check


def _ms(values: list[float]) -> str:
    if not values:
        return "no samples"
    array = np.asarray(values) * 1e3
    return f"p50 {np.percentile(array, 50):7.1f} ms  p99 {np.percentile(array, 99):7.1f} ms  (n={len(array)})"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _self_check(shared: bool = False) -> None:
    """1 trivial + 1 real-ACT server: 20 round trips each (plus 10 sequential on the trivial
    one), then 4 clients on 4 trivial servers for 4 s. --shared adds 4 clients on ONE server."""
    began = time.perf_counter()
    folder = make_act_checkpoint(Path(tempfile.gettempdir()) / "lerobot-async-side-act")
    print(f"checkpoint {folder}  lerobot_features {list(lerobot_features())}", flush=True)
    trivial_ports = [_free_port() for _ in range(4)]
    real_port = _free_port()
    servers = [start_policy_server(p, (CHUNK, ACTION_DIM)) for p in trivial_ports]
    servers.append(start_policy_server(real_port, None))
    try:
        print(f"5 servers up in {time.perf_counter() - began:.1f} s", flush=True)
        with LerobotClient(trivial_ports[0], folder).connect() as client:
            print(f"trivial   1 client, receiver thread: {_ms(client.measure(20))}", flush=True)
        with LerobotClient(trivial_ports[0], folder, receiver_thread=False).connect() as client:
            print(f"trivial   1 client, sequential     : {_ms(client.measure(10))}", flush=True)
        with LerobotClient(real_port, folder).connect() as client:
            print(f"real ACT  1 client, receiver thread: {_ms(client.measure(20))}", flush=True)
        runs = [("4 clients on 4 trivial servers", trivial_ports)]
        if shared:
            runs.append(("4 clients on 1 trivial server ", trivial_ports[0]))
        for label, ports in runs:
            result = throughput_details(ports, folder, clients=4, seconds=4.0, warmup_timeout=8.0)
            print(f"{label}: {result.requests_per_second:6.1f} req/s  per client {result.per_client}  "
                  f"{_ms(result.latencies)}  stolen/stray chunks {result.foreign_chunks}  resends {result.resends}"
                  + (f"  errors {result.errors}" if result.errors else ""), flush=True)
    finally:
        for server in servers:
            server.stop()
    print(f"self-check took {time.perf_counter() - began:.1f} s")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "_serve":
        _serve(json.loads(sys.argv[2]))
    else:
        _self_check(shared="--shared" in sys.argv[1:])
