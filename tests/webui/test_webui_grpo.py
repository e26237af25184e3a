"""The web UI's Train form offers GRPO from the registry, and its requests resolve like `aift train --method grpo`."""

from __future__ import annotations

from aift.training.configs import resolve_train_configs
from aift.webui import runs


def test_grpo_is_offered_with_its_options(server):
    status, body = server.request("/api/options")
    assert status == 200
    grpo = next(m for m in body["methods"] if m["name"] == "grpo")
    assert (grpo["task"], grpo["section"], grpo["config"]) == ("sft", "grpo", "GRPOConfig")
    names = {f["name"] for f in grpo["fields"]}
    assert {"rewards", "reward_weights", "num_generations", "max_completion_length", "loss_type", "beta"} <= names


def test_a_grpo_request_resolves_like_aift_train():
    options = {"rewards": "exact_match,ja", "reward-weights": "1,0.5", "num-generations": "4"}
    request = runs.build_request("lora", {"dataset_path": "d", "batch_size": "8"}, {"r": "4"}, "grpo", options)
    assert request["method"] == "grpo"
    assert request["grpo"] == {"rewards": ["exact_match", "ja"], "reward_weights": [1.0, 0.5], "num_generations": 4}
    resolved = resolve_train_configs(request)  # what `aift train RUN/webui_request.yaml` reads back
    assert resolved.method == "grpo" and resolved.grpo.num_generations == 4 and resolved.preference is None
