"""The web UI's run folders, request checks, path checks and JSON API (no browser, no training)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import psutil
import pytest
import yaml
from studio_flow import PAIRS

from aift.config import ConfigError, LoRAConfig, TrainingConfig, field_help
from aift.training.configs import resolve_train_configs
from aift.webui import runs
from aift.webui.data import DataRoots


def _write_pid(path, pid: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / runs.PID_FILE).write_text(f"{pid} {psutil.Process(pid).create_time()}")


def test_status_is_read_from_the_run_folder(tmp_path):
    done = tmp_path / "done"
    done.mkdir()
    (done / "train_summary.json").write_text(json.dumps({"completed": True, "method": "lora", "steps": 3}))
    assert runs.run_status(done) == "done"

    running = tmp_path / "running"
    _write_pid(running, os.getpid())  # a live process with the recorded start time
    assert runs.run_status(running) == "running"

    reused = tmp_path / "reused"
    reused.mkdir()
    (reused / runs.PID_FILE).write_text(f"{os.getpid()} 12345.0")  # same pid, another process's start time
    assert runs.run_status(reused) == "failed"

    from_cli = tmp_path / "from-cli"  # `aift train` into the runs dir, no summary: crashed or running elsewhere
    from_cli.mkdir()
    (from_cli / "metrics.jsonl").write_text("")
    assert runs.run_status(from_cli) == "incomplete"
    (from_cli / runs.LOG_FILE).write_text("saved checkpoint-3\naift train: interrupted\n")
    assert runs.run_status(from_cli) == "stopped"

    exited = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    dead = tmp_path / "dead"
    _write_pid(dead, exited.pid)
    exited.wait()
    assert runs.run_status(dead) == "failed"
    (dead / runs.STOP_FILE).write_text("stop")
    assert runs.run_status(dead) == "stopped"

    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    (interrupted / runs.EXIT_FILE).write_text("130")
    assert runs.run_status(interrupted) == "stopped"


def test_progress_comes_from_metrics_and_the_log(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    records = [
        {"type": "eval", "step": 0, "eval_loss": 3.0},
        {"type": "train", "step": 1, "loss": 2.5},
        {"type": "train", "step": 2, "loss": 2.0},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"type": "tra')
    (run / runs.LOG_FILE).write_text("loading\ntraining 12 steps (6 per epoch), 12 examples, lora\ntrain: 17%\r 2/12\n")
    (run / "config.yaml").write_text(yaml.safe_dump({"TrainingConfig": {"max_steps": -1}, "LoRAConfig": {"r": 4}}))
    row = runs.run_summary(run)
    assert (row["step"], row["total_steps"], row["loss"], row["eval_loss"]) == (2, 12, 2.0, 3.0)
    assert (row["method"], row["adapter"]) == ("sft", "lora")
    detail = runs.run_detail(run)
    assert [r["loss"] for r in detail["train"]] == [2.5, 2.0]  # the half-written last line is skipped
    assert detail["log"].splitlines()[-1] == " 2/12"  # tqdm's carriage returns: the last state only


def test_runs_list_has_runs_from_the_cli_and_skips_other_folders(tmp_path):
    (tmp_path / "cli-run").mkdir()
    (tmp_path / "cli-run" / "metrics.jsonl").write_text("")
    (tmp_path / "notes").mkdir()
    (tmp_path / runs.DATASETS_DIR / "ja").mkdir(parents=True)
    assert [r["name"] for r in runs.list_runs(tmp_path)] == ["cli-run"]


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".hidden", "-flag", runs.DATASETS_DIR, "x" * 81])
def test_bad_names_are_refused(name):
    with pytest.raises(runs.WebUIError, match="invalid name"):
        runs.check_name(name)


def test_requests_are_checked_like_the_cli_and_typed():
    request = runs.build_request(
        "qlora", {"dataset_path": "d", "max_steps": "4", "learning_rate": "1e-3", "packing": "false"}, {"r": "8"}
    )
    assert request == {
        "dataset_path": "d",
        "max_steps": 4,
        "learning_rate": 1e-3,
        "packing": False,
        "lora": {"r": 8, "use_qlora": True},
    }
    assert "lora" not in runs.build_request("full", {"dataset_path": "d"}, {"r": "8"})
    with pytest.raises(ConfigError, match="did you mean 'max_steps'"):
        runs.build_request("lora", {"dataset_path": "d", "max_step": "4"}, None)
    with pytest.raises(ConfigError, match="lora_dropout"):
        runs.build_request("lora", {"dataset_path": "d"}, {"lora_dropout": "1.5"})
    with pytest.raises(runs.WebUIError, match="output_dir"):
        runs.build_request("lora", {"dataset_path": "d", "output_dir": "/tmp/elsewhere"}, None)
    with pytest.raises(runs.WebUIError, match="dataset"):
        runs.build_request("lora", {}, None)


def test_form_fields_carry_the_config_help():
    fields = runs.config_fields()
    help_of = {f["name"]: f["help"] for f in fields["training"]}
    assert help_of["learning_rate"] == field_help(TrainingConfig)["learning_rate"]
    assert "output_dir" not in help_of and "local_rank" not in help_of
    lora_help = {f["name"]: f["help"] for f in fields["lora"]}
    assert lora_help["r"] == field_help(LoRAConfig)["r"] and "use_qlora" not in lora_help
    default_of = {f["name"]: f["default"] for f in fields["training"]}
    assert default_of["gradient_checkpointing"] == "auto"  # a run starts as `aift train`, with its defaults


def test_data_paths_stay_below_the_data_folders(tmp_path):
    data, outside = tmp_path / "data", tmp_path / "secret"
    data.mkdir()
    outside.mkdir()
    (data / "qa.json").write_text("[]")
    (outside / "key.json").write_text("{}")
    (data / "link").symlink_to(outside)
    roots = DataRoots(tmp_path / "runs", [data])
    assert roots.resolve("qa.json") == (data / "qa.json").resolve()
    assert roots.resolve(str(data / "qa.json")) == (data / "qa.json").resolve()
    for escape in ("../secret/key.json", str(outside / "key.json"), "link/key.json", "/etc/passwd"):
        with pytest.raises(runs.WebUIError, match="below the data folders"):
            roots.resolve(escape)
    assert [r["name"] for r in roots.listing()["raw"]] == ["qa.json"]


def test_api_refuses_foreign_hosts_non_json_posts_and_escapes(server):
    status, body = server.request("/api/options")
    assert status == 200 and body["fields"]["training"][0]["help"]
    assert server.request("/api/runs", headers={"Host": "evil.example:80"})[0] == 403
    status, _ = server.request("/api/runs", headers={"Host": f"localhost:{server.port}"})
    assert status == 200
    import urllib.request

    form = urllib.request.Request(server.url + "/api/runs", data=b"name=x", headers={"Content-Type": "text/plain"})
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(form)
    assert error.value.code == 415
    status, body = server.request("/api/preview?path=../../../etc/passwd")
    assert status == 400 and "below the data folders" in body["error"]
    status, body = server.request("/api/runs/..%2Fetc")
    assert status in (400, 404)
    status, body = server.request(
        "/api/runs", {"name": "x", "method": "sft", "adapter": "lora", "training": {"dataset_path": "nope"}}
    )
    assert status == 400 and "nope" in body["error"]
    assert not (server.runs_dir / "x").exists()


def test_aift_webui_command_serves_the_page_and_the_runs_on_disk(tmp_path):
    import socket
    import urllib.request

    from webui_server import wait_for

    old = tmp_path / "runs" / "old-run"
    old.mkdir(parents=True)
    (old / "train_summary.json").write_text(json.dumps({"completed": True, "method": "full", "steps": 2}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "aift", "webui", "--runs-dir", str(tmp_path / "runs"), "--port", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def page() -> str | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
                return response.read().decode()
        except OSError:
            assert process.poll() is None, process.stdout.read()
            return None

    try:
        assert "<title>aift studio</title>" in wait_for(page, 60, "aift webui to answer")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/runs", timeout=5) as response:
            listed = json.loads(response.read())["runs"]
        assert [(r["name"], r["status"], r["method"], r["adapter"]) for r in listed] == [
            ("old-run", "done", "sft", "full")
        ]
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_the_page_its_script_and_style_are_served(server):
    status, page = server.request("/")
    assert status == 200 and '<script src="/static/studio.js">' in page and "/static/studio.css" in page
    status, script = server.request("/static/studio.js")
    assert status == 200 and 'api("/api/options")' in script
    assert server.request("/static/studio.css")[0] == 200
    assert server.request("/static/%2e%2e/app.py")[0] == 404  # nothing outside static/


def test_the_prepared_marker_is_the_one_prepare_writes():
    from aift.data.prepared import PREPARE_JSON
    from aift.webui import data

    assert data.PREPARE_JSON == PREPARE_JSON


# ---------------------------------------------------------------- every method: form, requests, data, curves


def test_every_registered_method_is_offered_with_its_own_options(server):
    from aift.training.methods import METHODS

    status, body = server.request("/api/options")
    assert status == 200
    assert [m["name"] for m in body["methods"]] == list(METHODS)  # sft, dpo, orpo, simpo, kto: the registry's order
    assert [a["name"] for a in body["adapters"]] == ["lora", "qlora", "full"]
    assert body["tasks"] == ["sft", "preference", "pretrain"]  # the methods' tasks, then raw text
    from aift.export.run import GGUF_QUANTS

    assert body["gguf_quants"] == list(GGUF_QUANTS)  # the run view's export select: aift export --quant's list
    for offered in body["methods"]:
        method = METHODS[offered["name"]]
        assert (offered["summary"], offered["task"], offered["section"]) == (
            method.summary,
            method.task,
            method.section,
        )
        expected = {} if method.config_cls is None else field_help(method.config_cls)
        expected.pop("method", None)  # the method select itself
        assert {f["name"]: f["help"] for f in offered["fields"]} == expected
    dpo = next(m for m in body["methods"] if m["name"] == "dpo")
    assert dpo["config"] == "PreferenceConfig" and dpo["fields"] and all(f["help"] for f in dpo["fields"])


def test_method_requests_resolve_like_aift_train():
    request = runs.build_request(
        "qlora", {"dataset_path": "d", "max_steps": "2"}, {"r": "4"}, "dpo", {"beta": "0.2", "share-prompt": False}
    )
    assert request == {
        "dataset_path": "d",
        "max_steps": 2,
        "lora": {"r": 4, "use_qlora": True},
        "method": "dpo",
        "preference": {"beta": 0.2, "share_prompt": False},
    }
    resolved = resolve_train_configs(request)  # what `aift train RUN/webui_request.yaml` reads back
    assert (resolved.preference.method, resolved.preference.beta, resolved.lora.use_qlora) == ("dpo", 0.2, True)
    assert "method" not in runs.build_request("full", {"dataset_path": "d"}, None, "sft", {})
    assert runs.build_request("full", {"dataset_path": "d"}, None, "kto", {})["method"] == "kto"

    for method, options in (("orpo", {"loss_type": "ipo"}), ("dpo", {"bta": "0.2"}), ("kto", {"beta": "-1"})):
        with pytest.raises(ConfigError) as cli:  # the resolution of `aift train --method ...`
            resolve_train_configs(training={"dataset_path": "d"}, preference=options, method=method)
        with pytest.raises(ConfigError) as ui:
            runs.build_request("lora", {"dataset_path": "d"}, None, method, options)
        assert str(ui.value) == str(cli.value)
    with pytest.raises(runs.WebUIError, match="not options of method sft"):
        runs.build_request("lora", {"dataset_path": "d"}, None, "sft", {"beta": "0.2"})
    with pytest.raises(runs.WebUIError, match="LoRA, QLoRA and full are the adapter"):
        runs.build_request("lora", {"dataset_path": "d"}, None, "qlora")
    with pytest.raises(runs.WebUIError, match="adapter must be one of lora, qlora, full"):
        runs.build_request("dpo", {"dataset_path": "d"}, None)


def test_a_method_refuses_data_of_another_task(tmp_path):
    sft, pairs, kto = (tmp_path / n for n in ("sft", "pairs", "kto"))
    for folder, info in ((sft, {"format": "template"}), (pairs, {"task": "preference"}), (kto, {"task": "kto"})):
        folder.mkdir()
        (folder / "prepare.json").write_text(json.dumps(info))
    with pytest.raises(runs.WebUIError, match="method dpo trains on preference data .* sft holds sft data"):
        runs.build_request("lora", {"dataset_path": str(sft)}, None, "dpo")
    with pytest.raises(runs.WebUIError, match="method sft trains on sft data .* pairs holds preference data"):
        runs.build_request("lora", {"dataset_path": str(pairs)}, None, "sft")
    assert runs.build_request("lora", {"dataset_path": str(kto)}, None, "kto")["method"] == "kto"
    assert runs.build_request("lora", {"dataset_path": str(sft)}, None)["dataset_path"] == str(sft)


def test_preference_data_is_prepared_and_previewed_side_by_side(server, pairs_file):
    options = {"task": "preference", "max_length": "64", "val_ratio": "0.2", "train_on_prompt": False}
    status, body = server.request("/api/prepare", {"source_path": pairs_file.name, "name": "pairs", "options": options})
    assert status == 200, body
    info = json.loads((server.runs_dir / "datasets" / "pairs" / "prepare.json").read_text())
    assert info["task"] == "preference" and info["counts"]["train"] == 5
    _, listing = server.request("/api/datasets")
    assert {p["name"]: p["task"] for p in listing["prepared"]}["pairs"] == "preference"

    status, preview = server.request(f"/api/preview?path={body['path']}&n=2")
    assert status == 200 and preview["kind"] == "pairs" and len(preview["pairs"]) == 2
    for pair in preview["pairs"]:
        chosen, rejected = pair["sides"]
        assert (chosen["name"], rejected["name"], pair["label"]) == ("chosen", "rejected", None)
        trained = ["".join(text for text, on in side["runs"] if on) for side in (chosen, rejected)]
        row = next(r for r in PAIRS if r["chosen"] + "<|im_end|>" == trained[0])  # only the answers are trained
        assert trained[1] == row["rejected"] + "<|im_end|>"
        assert row["prompt"] in "".join(text for text, on in chosen["runs"] if not on)
        assert chosen["trained"] > 0 and rejected["trained"] > 0

    bad = {**options, "train_on_prompt": True}
    status, body = server.request("/api/prepare", {"source_path": pairs_file.name, "name": "p2", "options": bad})
    assert status == 400 and "answers only" in body["error"]
    status, body = server.request(
        "/api/prepare", {"source_path": pairs_file.name, "name": "p3", "options": {"task": "reward"}}
    )
    assert status == 400 and "task must be one of sft, preference, pretrain" in body["error"]


def _run_with_metrics(path, records, config):
    path.mkdir()
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    return runs.run_detail(path)


def test_each_method_shows_its_own_curves(tmp_path):
    pair_metrics = {"rewards/chosen": 0.1, "rewards/rejected": -0.1, "rewards/margins": 0.2, "rewards/accuracies": 1.0}
    dpo = _run_with_metrics(
        tmp_path / "dpo",
        [
            {"type": "train", "step": 1, "loss": 0.69, **pair_metrics, "logps/chosen": -20.0},
            {"type": "train", "step": 2, "loss": 0.6, **pair_metrics},
            {"type": "eval", "step": 2, "eval_loss": 0.65, **{f"eval_{k}": v for k, v in pair_metrics.items()}},
        ],
        {"TrainingConfig": {"max_steps": 2}, "LoRAConfig": {"r": 4}, "PreferenceConfig": {"method": "dpo"}},
    )
    assert (dpo["method"], dpo["adapter"]) == ("dpo", "lora")
    charts = {c["id"]: c for c in dpo["curves"]}
    assert list(charts) == ["loss", "margins", "accuracies", "rewards"]
    assert charts["margins"]["series"] == [
        {"key": "rewards/margins", "split": "train", "points": [[1, 0.2], [2, 0.2]]},
        {"key": "rewards/margins", "split": "eval", "points": [[2, 0.2]]},
    ]
    assert [(s["key"], s["split"]) for s in charts["loss"]["series"]] == [("loss", "train"), ("loss", "eval")]

    kto = _run_with_metrics(
        tmp_path / "kto",
        [{"type": "train", "step": 1, "loss": 0.5, "rewards/chosen": 0.1, "rewards/rejected": 0.0, "kl": 0.01}],
        {"TrainingConfig": {}, "PreferenceConfig": {"method": "kto"}},
    )
    assert (kto["method"], kto["adapter"]) == ("kto", "full")
    assert [c["id"] for c in kto["curves"]] == ["loss", "rewards", "kl"]

    sft = _run_with_metrics(tmp_path / "sft", [{"type": "train", "step": 1, "loss": 2.0}], {"TrainingConfig": {}})
    assert [c["id"] for c in sft["curves"]] == ["loss"] and sft["method"] == "sft"

    grpo = _run_with_metrics(  # GRPO's keys, for when it lands: the mean reward and one per reward function
        tmp_path / "grpo",
        [{"type": "train", "step": 1, "loss": 0.1, "reward": 0.5, "rewards/format": 1.0, "rewards/answer": 0.0}],
        {"TrainingConfig": {}},
    )
    reward = next(c for c in grpo["curves"] if c["id"] == "reward")
    assert [s["key"] for s in reward["series"]] == ["reward", "rewards/answer", "rewards/format"]
    assert [c["id"] for c in grpo["curves"]] == ["loss", "reward"]  # not taken for a preference method's rewards


def test_starting_a_method_on_data_of_another_task_is_refused_before_a_run_exists(server):
    sft_data = server.runs_dir / "datasets" / "sft-like"
    sft_data.mkdir(parents=True, exist_ok=True)
    (sft_data / "prepare.json").write_text(json.dumps({"format": "template"}))
    body = {"name": "dpo-on-sft", "method": "dpo", "adapter": "lora", "training": {"dataset_path": "sft-like"}}
    status, answer = server.request("/api/runs", body)
    assert status == 400 and "method dpo trains on preference data" in answer["error"]
    assert not (server.runs_dir / "dpo-on-sft").exists()
