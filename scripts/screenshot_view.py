"""A screenshot of Rerun's web viewer showing a recording, taken with headless Chromium.

    python scripts/screenshot_view.py RUN.mcap docs/view.png

Serves the recording with `chunkbus view RUN.mcap --web` on free ports, opens it in Chromium
(Debian's /usr/bin/chromium, or --chromium PATH) through Playwright (`pip install -e '.[docs]'`),
waits for the viewer to load and draw, and saves the page. Chromium draws with its software
rasterizer (SwiftShader): no GPU needed.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from pathlib import Path

from chunkbus.launch.process import NodeProcess

CHROMIUM_FLAGS = ["--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist",
                  "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recording")
    parser.add_argument("output")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--wait", type=float, default=30.0, help="seconds for the viewer to load and draw")
    parser.add_argument("--size", default="1600x1000", help="the page's WIDTHxHEIGHT")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    web, grpc = free_port(), free_port()
    view = NodeProcess.node("view", args.recording, "--web", "--web-port", str(web), "--grpc-port", str(grpc))
    try:
        view.wait_log("recording drawn", timeout=120)
        url = f"http://localhost:{web}/?url=rerun+http://127.0.0.1:{grpc}/proxy"
        width, height = (int(v) for v in args.size.split("x"))
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium, headless=True, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(url)
            time.sleep(args.wait)
            page.screenshot(path=args.output)
            browser.close()
    finally:
        view.close()
    print(f"wrote {args.output} ({Path(args.output).stat().st_size} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
