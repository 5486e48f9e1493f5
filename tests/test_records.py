"""The records inside other frames (model description, broker status) are checked both ways."""

from __future__ import annotations

import msgpack
import pytest

from chunkbus.bus import mdp
from chunkbus.bus.records import BrokerStatus, Feature, ModelDescription, RtcSupport, ServiceStatus, WorkerStatus
from chunkbus.bus.schema import MessageError

MODEL = ModelDescription(
    type="act",
    name="act:mine",
    inputs={"observation.images.front": Feature("VISUAL", [3, 96, 128]), "observation.state": Feature("STATE", [6])},
    action_size=6,
    chunk_size=20,
    device="cuda",
    needs_task=True,
    dtype="bfloat16",
    compiled=True,
    rtc=RtcSupport("LINEAR", 10.0, 10),
)


def test_a_model_description_survives_the_ready_frame_and_says_what_it_needs():
    info = mdp.parse_ready_extension(mdp.pack_ready_extension(mdp.WorkerInfo(capacity=4, model=MODEL, name="w")))
    assert (info.capacity, info.name) == (4, "w")
    back = info.model
    assert back.to_wire() == MODEL.to_wire() and back.inputs["observation.state"].shape == [6]
    assert back.camera_inputs() == ["observation.images.front"] and back.state_size() == 6
    assert back.needs_task and back.dtype == "bfloat16" and back.compiled and back.rtc.flow_steps == 10
    assert mdp.parse_ready_extension(mdp.pack_ready_extension(mdp.WorkerInfo())).model is None  # a plain worker


@pytest.mark.parametrize("field, value, problem", [
    ("action_size", 0, "ready.model.action_size: must be >= 1"),
    ("inputs", {"x": {"type": "VISUAL"}}, "ready.model.inputs['x']: missing field 'shape'"),
    ("type", 7, "ready.model.type: expected a string"),
    ("rtc", {"schedule": "LINEAR", "max_guidance_weight": 10.0}, "ready.model.rtc: missing field 'flow_steps'"),
])
def test_a_wrong_model_description_is_refused_naming_the_field(field, value, problem):
    wire = {**MODEL.to_wire(), field: value}
    with pytest.raises(MessageError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        mdp.parse_ready_extension(msgpack.packb({"capacity": 1, "model": wire}))


def test_the_broker_status_round_trips_and_is_checked():
    status = BrokerStatus(3.5, "tcp://a:1", "tcp://a:2",
                          {"act": ServiceStatus(1, 4, 0, 1, {"ok": 3}, {"p50": 1.5, "n": 3}, {}, MODEL)},
                          [WorkerStatus("w", "act", 4, 1, None)], {"late_replies": 0})
    wire = msgpack.unpackb(msgpack.packb(status.to_wire()), raw=False)
    back = BrokerStatus.from_wire(wire)
    assert back.services["act"].model.name == "act:mine" and back.workers[0].idle_s is None
    assert back.to_wire() == status.to_wire()
    wire["services"]["act"]["queued"] = -1
    with pytest.raises(MessageError, match=r"services\['act'\]\.queued: must be >= 0"):
        BrokerStatus.from_wire(wire)
