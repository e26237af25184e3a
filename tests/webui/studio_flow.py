"""What a user does in `aift webui`, driven in headless Chromium (Playwright): shared by the browser test and
scripts/webui_screenshots.py (which runs it on the embedded model for the screenshots in docs/)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


PAIRS = [  # small preference data: the Japanese answer over an English or a wrong one
    {"prompt": "日本の首都はどこですか？", "chosen": "東京です。", "rejected": "大阪です。"},
    {"prompt": "富士山の高さは？", "chosen": "3776メートルです。", "rejected": "I do not know."},
    {"prompt": "一年は何日ですか？", "chosen": "365日です。", "rejected": "100日です。"},
    {"prompt": "水の化学式は？", "chosen": "H2Oです。", "rejected": "CO2です。"},
    {"prompt": "日本の通貨は？", "chosen": "円です。", "rejected": "ドルです。"},
    {"prompt": "一週間は何日？", "chosen": "7日です。", "rejected": "10日です。"},
]


def write_pairs(path: Path) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in PAIRS), encoding="utf-8")
    return path


def chromium_path() -> str | None:
    return CHROMIUM if Path(CHROMIUM).is_file() else shutil.which("chromium")


def launch(playwright):
    return playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)


def prepare_from_page(
    page,
    url: str,
    source: str,
    name: str,
    shots: Path | None,
    num_samples: str = "8",
    max_length: str = "48",
    task: str = "sft",
) -> None:
    """Data view: prepare a raw file, then see its preview with the trained tokens highlighted (preference
    data: each pair's chosen answer beside its rejected one)."""
    page.goto(url + "/#data")
    page.wait_for_selector("body[data-ready='1']")
    page.fill("#prep-source", source)
    page.fill("#prep-name", name)
    page.select_option("#prep-task", task)
    page.fill("#prep-num-samples", num_samples)
    page.fill("#prep-max-length", max_length)
    page.fill("#prep-val-ratio", "0.25")
    page.click("#prep-button")
    trained = "#preview .pair .example .t" if task == "preference" else "#preview .example .t"
    page.wait_for_selector(trained, timeout=120_000)
    if shots:
        shot = "webui-data.png" if task == "sft" else f"webui-data-{task}.png"
        page.screenshot(path=str(shots / shot), full_page=True)


def start_run_from_page(
    page,
    url: str,
    run: str,
    model: str,
    dataset: str,
    options: dict[str, str],
    adapter: str,
    shots: Path | None,
    method: str = "sft",
) -> None:
    """Train view: pick model, data, method (sft, dpo, ...) and adapter (lora, qlora, full), set options
    (``group.name`` for LoRA's and the method's own, e.g. ``lora.r``, ``dpo.beta``), look at the preview, start."""
    page.goto(url + "/#train")
    page.wait_for_selector("body[data-ready='1']")
    page.fill("#run-name", run)
    page.fill("#model-name", model)
    page.select_option("#method", method)
    page.select_option("#adapter", adapter)
    page.select_option("#dataset-path", label=None, value=dataset)
    page.click("#train-preview-button")
    page.wait_for_selector("#train-preview .example .t", timeout=60_000)
    if not page.locator("#view-train details").evaluate("d => d.open"):
        page.click("summary:has-text('All training options')")
    for key, value in options.items():
        group, name = key.split(".", 1) if "." in key else ("training", key)
        page.fill(f"#{group}-{name}", value)
    if shots:
        page.screenshot(path=str(shots / "webui-train.png"), full_page=True)
    page.click("#start-button")
    page.wait_for_selector("#view-runs.active")
    page.wait_for_selector(f"#runs-table tr[data-run='{run}']")


def wait_for_status(page, status: str, timeout_s: float) -> None:
    page.wait_for_selector(f"#run-status.{status}", timeout=timeout_s * 1000)


def chat_from_page(page, message: str, shots: Path | None, timeout_s: float = 120, max_new_tokens: str = "24") -> str:
    """From the run's detail: Chat, send one message, wait for the streamed answer."""
    page.click("#run-detail button:has-text('Chat')")
    page.wait_for_selector("#view-chat.active")
    page.fill("#chat-max", max_new_tokens)
    answer = send_chat(page, message, timeout_s)
    if shots:
        page.screenshot(path=str(shots / "webui-chat.png"), full_page=True)
    return answer


def send_chat(page, message: str, timeout_s: float = 120) -> str:
    """One more message in the open conversation; returns the answer shown."""
    answers = page.locator("#chat-log .msg.assistant").count()
    page.fill("#chat-input", message)
    page.click("#chat-send")
    page.wait_for_function(
        "n => !document.querySelector('#chat-send').disabled"
        " && document.querySelectorAll('#chat-log .msg.assistant').length > n",
        arg=answers,
        timeout=timeout_s * 1000,
    )
    return page.locator("#chat-log .msg.assistant").last.inner_text()


def chart_points(page, chart: str = "loss") -> int:
    """Train points drawn on a curve of the run's detail: loss, margins, accuracies, rewards, kl, reward."""
    return page.locator(f"#{chart}-chart circle.train-point").count()


def metrics_steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if r["type"] == "train"]
