"""Screenshots of `aift webui` for docs/ (webui-data/train/runs/chat.png), on the embedded model.

    python scripts/webui_screenshots.py [--steps 8] [--output docs]

Drives the same page flow as tests/webui/test_webui_browser.py in headless Chromium: prepare 32 rows of
data/ja_qa.json, LoRA-train the embedded SmolLM2-135M-Instruct from the page, wait for the loss curve,
then chat with the run. Takes a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "webui"))

from studio_flow import (  # noqa: E402
    chat_from_page,
    launch,
    prepare_from_page,
    send_chat,
    start_run_from_page,
    wait_for_status,
)
from webui_server import Server  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="8", help="optimizer steps of the run (default 8)")
    parser.add_argument("--output", default=str(REPO / "docs"), help="folder for the PNGs (default docs/)")
    args = parser.parse_args()
    shots = Path(args.output)
    shots.mkdir(parents=True, exist_ok=True)
    from playwright.sync_api import sync_playwright

    from aift.models.registry import EMBEDDED_MODEL

    options = {
        "max_steps": args.steps, "batch_size": "2", "gradient_accumulation_steps": "1", "max_length": "160",
        "learning_rate": "5e-4", "warmup_steps": "0", "logging_steps": "1", "eval_steps": "4", "save_steps": "0",
        "report_to": "none", "lora.r": "8",
    }  # fmt: skip
    with (
        tempfile.TemporaryDirectory() as tmp,
        Server(Path(tmp) / "runs", [REPO / "data"]) as server,
        sync_playwright() as playwright,
    ):
        browser = launch(playwright)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        prepare_from_page(page, server.url, "ja_qa.json", "ja_qa32", shots, num_samples="32", max_length="160")
        dataset = str(server.runs_dir / "datasets" / "ja_qa32")
        start_run_from_page(page, server.url, "ja-lora", EMBEDDED_MODEL, dataset, options, "lora", shots)
        wait_for_status(page, "done", timeout_s=3600)
        page.screenshot(path=str(shots / "webui-runs.png"), full_page=True)
        question = "日本で一番高い山は何ですか？"
        print("answer:", chat_from_page(page, question, None, timeout_s=600, max_new_tokens="64"))
        print("answer:", send_chat(page, "What is the capital of France?", timeout_s=600))
        page.screenshot(path=str(shots / "webui-chat.png"), full_page=True)
        browser.close()
    print(f"wrote {', '.join(sorted(p.name for p in shots.glob('webui-*.png')))} in {shots}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
