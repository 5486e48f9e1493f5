"""A robot over a real link: what a request carries (--send-size, --send-encoding), and the control
loop through an emulated internet link (scripts/link_emulator.py: delay, jitter, a capped uplink)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from mdp_peers import start_broker, start_worker, wait_for

from chunkbus.bus import JpegImage
from chunkbus.bus.sockets import Subscriber

LINK = Path(__file__).resolve().parent.parent / "scripts" / "link_emulator.py"
FRONT = "observation.images.front"


def start_link(processes, target: str, *options: str) -> str:
    """A link emulator in front of `target` (tcp://HOST:PORT); the address to connect to instead."""
    link = processes.start(str(LINK), "--to", target.removeprefix("tcp://"), *options)
    return processes.first_line_json(link)["listen"]


def robot(processes, frontend: str, *actuator_options: str, cameras=("front",), size=(480, 640)) -> None:
    processes.start_node("arm", "--max-step", "100")
    for name in cameras:
        processes.start_node("camera", "--name", name, "--fps", "30", "--width", str(size[1]),
                             "--height", str(size[0]))
    camera_options = [option for name in cameras for option in ("--camera", name)]
    processes.start_node("actuator", "--broker", frontend, "--service", "svc", "--fps", "30", "--ttl", "1.0",
                         *camera_options, *actuator_options)


def sent_requests(seconds: float) -> list:
    """The requests the broker took in, from its capture."""
    with Subscriber(["broker"], ["broker/request/"], rcvhwm=100) as capture:
        request = capture.wait("broker/request/svc", timeout=30)
        time.sleep(seconds)
        return [request.message, capture.latest("broker/request/svc").message]


def test_requests_carry_frames_at_the_models_input_size_as_jpeg_by_default(processes):
    broker = start_broker(processes)
    start_worker(processes, broker.backend, "scripted:sine?delay=0.05&cameras=front&size=48x64", "--service", "svc")
    robot(processes, broker.frontend)
    with Subscriber(["actuator"], ["actuator/stats"]) as stats:
        requests = sent_requests(0.5)
        figures = stats.wait("actuator/stats", timeout=10).message.figures
    for request in requests:
        image = request.observations[-1].images[FRONT]
        assert isinstance(image, JpegImage) and image.shape == (48, 64, 3)
        assert image.decode().shape == (48, 64, 3)
    assert 0 < figures["bytes_per_observation"] < 48 * 64 * 3  # compressed, and said in the stats


def test_native_raw_frames_when_asked(processes):
    broker = start_broker(processes)
    start_worker(processes, broker.backend, "scripted:sine?delay=0.05&cameras=front&size=48x64", "--service", "svc")
    robot(processes, broker.frontend, "--send-size", "native", "--send-encoding", "raw", size=(120, 160))
    image = sent_requests(0.2)[-1].observations[-1].images[FRONT]
    assert isinstance(image, np.ndarray) and image.shape == (120, 160, 3)


def test_the_schedule_does_not_run_dry_over_a_100_ms_link_with_the_default_send_settings(processes):
    broker = start_broker(processes)
    start_worker(processes, broker.backend, "scripted:sine?chunk=50&delay=0.05&cameras=front,wrist&size=224x224",
                 "--service", "svc")
    frontend = start_link(processes, broker.frontend, "--rtt", "100", "--jitter", "0.2", "--up", "20",
                          "--down", "100")
    commands = []
    robot(processes, frontend, cameras=("front", "wrist"))
    with Subscriber(["actuator"], ["command"], on_message=commands.append, rcvhwm=10_000), \
            Subscriber(["actuator"], ["actuator/stats"]) as stats:
        wait_for(lambda: any(not r.message.hold for r in commands), timeout=30, what="the first chunk")
        time.sleep(10)
        figures = stats.latest("actuator/stats").message.figures
    moving = next(i for i, r in enumerate(commands) if not r.message.hold)
    after = [r.message for r in commands[moving:]]
    assert len(after) > 250
    assert not [c.tick for c in after if c.hold], f"the schedule ran dry over the link: {figures}"
