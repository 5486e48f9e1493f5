"""scripts/bench_fleet.py runs a small fleet through the broker and through the plain proxy and
ends with one JSON line of its figures. What it checks is that the figures are there and
consistent, never how fast anything is (the script itself measures that)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO


def test_bench_fleet_answers_every_request_through_the_broker_and_the_proxy():
    result = subprocess.run([sys.executable, "scripts/bench_fleet.py", "--quick"], capture_output=True, text=True,
                            timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(figures["by_robots"]) == {"1", "3"}
    for robots, broker in figures["by_robots"].items():
        for case in (broker, broker["proxy"]):
            # Each robot asks once in the 1 s window; every request gets its chunk, none is lost.
            assert case["sent"] == int(robots), case
            assert case["answered"] == case["sent"] and case["errors"] == {} and case["timed_out"] == 0, case
            assert 0 < case["added_p50_us"] <= case["added_p99_us"] <= case["added_max_us"], case
            assert case["req_per_s"] > 0 and case["mb_per_s"] >= 1.8 * case["req_per_s"], case  # 1.8 MB a request
            assert case["cpu_us_per_request"] > 0, case
    assert figures["max_robots_p99_under_5ms"] in (0, 1, 3)
    assert figures["broker_cpu_us_per_request"] == figures["by_robots"]["3"]["cpu_us_per_request"]
    assert figures["proxy_cpu_us_per_request"] == figures["by_robots"]["3"]["proxy"]["cpu_us_per_request"]
    assert figures["capture"] is True  # a deployment's default: the capture for taps on
