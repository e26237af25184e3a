"""`aift webui` in headless Chromium: prepare and preview data, train from the page until the loss curve is
drawn, open the report, merge, export, chat, stop a run, and see the same runs after a restart; prepare
preference pairs and train DPO from the page until its reward curves are drawn."""

from __future__ import annotations

import pytest
from optional_pieces import require
from studio_flow import (
    chart_points,
    chat_from_page,
    chromium_path,
    launch,
    metrics_steps,
    prepare_from_page,
    start_run_from_page,
    wait_for_status,
    write_pairs,
)
from webui_server import REPO, Server, wait_for

pytestmark = pytest.mark.slow
require(chromium_path() is not None, "/usr/bin/chromium is absent (setup/install_system_libs.sh)")

SHORT_RUN = {
    "max_steps": "4",
    "batch_size": "2",
    "gradient_accumulation_steps": "1",
    "max_length": "48",
    "learning_rate": "1e-3",
    "warmup_steps": "0",
    "logging_steps": "1",
    "eval_steps": "2",
    "save_steps": "0",
    "report_to": "none",
    "lora.r": "4",
}


def test_studio_end_to_end_in_chromium(server, untied_tiny_model_dir, tmp_path):
    from playwright.sync_api import sync_playwright

    runs_dir = server.runs_dir
    with sync_playwright() as playwright:
        browser = launch(playwright)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))

        prepare_from_page(page, server.url, "ja_qa.json", "ja8", tmp_path)
        dataset = runs_dir / "datasets" / "ja8"
        assert (dataset / "prepare.json").is_file()
        example = page.locator("#preview .example").first
        # Markup-like tokens show as text (escaped), the prompt is masked and the answer after it trained.
        assert "<|im_start|>assistant" in example.locator(".m").first.inner_text()
        assert example.locator(".t").first.inner_text().strip()

        start_run_from_page(
            page, server.url, "tiny-lora", str(untied_tiny_model_dir), str(dataset), SHORT_RUN, "lora", tmp_path
        )
        wait_for_status(page, "done", timeout_s=180)
        run = runs_dir / "tiny-lora"
        assert metrics_steps(run) == [1, 2, 3, 4]
        wait_for(lambda: chart_points(page) == 4, 10, "4 train points on the loss curve")
        assert page.locator("#loss-chart circle.eval-point").count() >= 2  # before training and at steps 2, 4
        page.screenshot(path=str(tmp_path / "webui-runs.png"), full_page=True)

        report = page.request.get(f"{server.url}/runs/tiny-lora/report")
        assert report.ok and "tiny-lora" in report.text() and (run / "report" / "report.html").is_file()

        page.click("#merge-button")
        page.wait_for_selector("#action-result .note", timeout=120_000)
        assert (run / "merged" / "model.safetensors").is_file()
        page.select_option("#export-quant", "f32")
        page.click("#export-button")
        page.wait_for_selector("#action-result .note", timeout=180_000)
        assert '"passed":true' in page.inner_text("#action-result")
        assert (run / "exports" / "tiny-lora.f32.gguf").is_file()

        question = "日本の首都はどこですか？"
        answer = chat_from_page(page, question, tmp_path)
        assert answer.strip() == _library_answer(run / "final", question)  # what `aift chat` would say

        stop_options = {**SHORT_RUN, "max_steps": "5000", "eval_steps": "0"}
        start_run_from_page(
            page, server.url, "tiny-stop", str(untied_tiny_model_dir), str(dataset), stop_options, "lora", None
        )
        wait_for(lambda: (runs_dir / "tiny-stop" / "metrics.jsonl").is_file(), 120, "the first logged step")
        wait_for_status(page, "running", timeout_s=10)
        page.click("#stop-button")
        wait_for_status(page, "stopped", timeout_s=120)
        assert list((runs_dir / "tiny-stop" / "checkpoints").iterdir())  # Ctrl-C saved a checkpoint
        assert not (runs_dir / "tiny-stop" / "train_summary.json").exists()
        assert not errors, errors
        browser.close()

    with Server(runs_dir, [REPO / "data"]) as restarted:  # a new UI on the same folder: the same runs
        _, listing = restarted.request("/api/runs")
        assert {r["name"]: r["status"] for r in listing["runs"]} == {"tiny-lora": "done", "tiny-stop": "stopped"}


def test_a_dpo_run_from_the_page_draws_its_reward_curves(untied_tiny_model_dir, tmp_path):
    import yaml
    from playwright.sync_api import sync_playwright

    from aift.training.methods import METHODS

    data = tmp_path / "data"
    data.mkdir()
    write_pairs(data / "pairs.jsonl")
    with Server(tmp_path / "runs", [data]) as server, sync_playwright() as playwright:
        browser = launch(playwright)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))

        prepare_from_page(page, server.url, "pairs.jsonl", "pairs", tmp_path, num_samples="6", task="preference")
        chosen, rejected = page.locator("#preview .pair").first.locator(".side").all()
        assert chosen.locator(".side-head").inner_text().startswith("chosen")
        assert rejected.locator(".side-head").inner_text().startswith("rejected")
        assert chosen.locator(".t").inner_text().strip().endswith("<|im_end|>")  # the answer is trained

        page.goto(server.url + "/#train")
        page.wait_for_selector("body[data-ready='1']")
        offered = page.locator("#method option").evaluate_all("options => options.map(o => o.value)")
        assert offered == list(METHODS)  # every registered method is on the form
        options = {**SHORT_RUN, "max_steps": "2", "eval_steps": "0", "dpo.beta": "0.2"}
        dataset = server.runs_dir / "datasets" / "pairs"
        start_run_from_page(
            page, server.url, "tiny-dpo", str(untied_tiny_model_dir), str(dataset), options, "lora", tmp_path, "dpo"
        )
        wait_for_status(page, "done", timeout_s=180)
        run = server.runs_dir / "tiny-dpo"
        assert metrics_steps(run) == [1, 2]
        assert yaml.safe_load((run / "config.yaml").read_text())["PreferenceConfig"]["beta"] == 0.2
        wait_for(lambda: chart_points(page, "margins") == 2, 10, "2 train points on the reward margin curve")
        assert chart_points(page, "accuracies") == 2 and chart_points(page, "loss") == 2
        assert "DPO · lora" in page.inner_text("#run-detail")
        page.screenshot(path=str(tmp_path / "webui-runs-dpo.png"), full_page=True)
        assert not errors, errors
        browser.close()


def _library_answer(final, question: str) -> str:
    from aift.inference.runner import GenerationSettings, load_for_inference, stream_answer

    loaded = load_for_inference(str(final), device="cpu")
    messages = [{"role": "user", "content": question}]
    answer = stream_answer(loaded, messages, GenerationSettings(max_new_tokens=24, greedy=True))
    assert answer.strip(), "the model's answer is empty: the chat check would prove nothing"
    return answer.strip()
