"""Training on `aift prepare --task pretrain` data: blocks whose attention never crosses a document, LoRA with
``modules_to_save`` from every front door, and continued pretraining that lowers held-out perplexity."""

from __future__ import annotations

import json
import random

import pytest
import torch
import yaml

from aift.cli import build_parser, main
from aift.cli.train import resolve
from aift.config import LoRAConfig
from aift.data.prepare import prepare
from aift.training.batching import BatchPlanner, to_examples

# A made-up domain (a fictional sake brewery), so that the held-out documents share its words, not its sentences.
_PLACES = ["蔵元の北棟", "第二仕込み蔵", "麹室", "貯蔵庫", "瓶詰め場", "精米所"]
_STEPS = ["洗米", "浸漬", "蒸米", "製麹", "酒母造り", "三段仕込み", "上槽", "火入れ"]
_WORDS = ["温度を十二度に保つ", "三日かけて発酵させる", "水分を丁寧に測る", "杜氏が香りを確かめる", "酵母を加える"]


def _corpus(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        place, steps = rng.choice(_PLACES), rng.sample(_STEPS, 3)
        body = "。".join(f"{s}の工程では{rng.choice(_WORDS)}" for s in steps)
        docs.append(f"月桂酒造記録第{i}号。{place}にて、{body}。以上を記録する。")
    return docs


@pytest.fixture(scope="module")
def pretrain_data(tmp_path_factory, tiny_model_dir):
    work = tmp_path_factory.mktemp("pretrain")
    corpus = work / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in _corpus(24)), "utf-8")
    return prepare("pretrain", str(tiny_model_dir), source_path=corpus, output_dir=work / "prepared", max_length=64,
                   val_ratio=0.25)  # fmt: skip


def _logits(model, batch):
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("attention", ["sdpa", "aift_segment"])
def test_a_block_keeps_its_documents_apart(pretrain_data, tiny_model_dir, tokenizer, attention):
    from transformers import AutoModelForCausalLM

    from aift.training.segment_attention import register

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    mask = "4d"
    if attention == "aift_segment":
        model.set_attn_implementation(register())
        mask = "position_ids"
    examples = to_examples(pretrain_data, tokenizer, 64, "training")
    planner = BatchPlanner(examples, 1, 64, True, tokenizer.pad_token_id, seed=0, mask=mask)
    block = next(b for b in examples.blocks if len(b) >= 2)  # two documents (pieces of one are never in one block)
    packed = _logits(model.eval(), planner.collate([block]))[0]
    start = 0
    for i in block:
        ids = torch.tensor([examples.rows[i]["input_ids"]])
        alone = _logits(model, {"input_ids": ids})[0]
        torch.testing.assert_close(packed[start : start + ids.shape[1]], alone, atol=1e-4, rtol=1e-4)
        start += ids.shape[1]
    batch = planner.collate([block])
    assert int(batch["num_trained_tokens"]) == sum(len(examples.rows[i]["input_ids"]) - 1 for i in block)


def test_blocks_longer_than_the_run_are_packed_again_training_the_same_tokens(pretrain_data, tokenizer):
    as_prepared = to_examples(pretrain_data, tokenizer, 64, "training")
    shorter = to_examples(pretrain_data, tokenizer, 24, "training")
    assert all(sum(len(shorter.rows[i]["input_ids"]) for i in block) <= 24 for block in shorter.blocks)
    assert len(shorter.blocks) > len(as_prepared.blocks)

    def targets(examples):  # a piece's first token is never a target
        return sorted(t for block in examples.blocks for i in block for t in examples.rows[i]["labels"][1:])

    assert targets(shorter) == targets(as_prepared) and shorter.trained_tokens == as_prepared.trained_tokens


def test_modules_to_save_reads_the_same_from_flag_key_value_and_yaml(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"lora": {"modules_to_save": ["embed_tokens", "lm_head"]}}))
    ways = [
        ["--lora-modules-to-save", "embed_tokens,lm_head"],
        ["lora.modules_to_save=embed_tokens, lm_head"],
        [str(config)],
    ]
    parser = build_parser("train")
    got = [resolve(parser.parse_args(argv)).lora.modules_to_save for argv in ways]
    assert got == [["embed_tokens", "lm_head"]] * 3
    assert LoRAConfig().modules_to_save is None and LoRAConfig(modules_to_save="").modules_to_save is None


def _perplexity(capsys, argv) -> float:
    assert main(["eval", *argv]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["metrics"]["perplexity"]


@pytest.mark.slow
def test_continued_pretraining_lowers_held_out_perplexity(pretrain_data, tiny_model_dir, tmp_path, capsys):
    """LoRA with the embeddings and head trained in full: the held-out documents of the domain get likelier."""
    from safetensors import safe_open

    data = ["--dataset-path", str(pretrain_data)]
    before = _perplexity(capsys, ["--model", str(tiny_model_dir), *data])
    run = tmp_path / "run"
    argv = ["train", "--model-name", str(tiny_model_dir), *data, "--output-dir", str(run), "--use-lora"]
    argv += ["--lora-modules-to-save", "embed_tokens,lm_head", "--max-steps", "4", "--learning-rate", "1e-2"]
    argv += ["--batch-size", "4", "--gradient-accumulation-steps", "1", "--max-length", "64", "--warmup-steps", "0"]
    argv += ["--eval-steps", "0", "--save-steps", "0", "--report-to", "none", "--no-fp16", "--no-tcmalloc"]
    assert main(argv) == 0
    capsys.readouterr()
    after = _perplexity(capsys, ["--model", str(run), *data])
    assert after < 0.8 * before, (before, after)
    with safe_open(run / "final" / "adapter_model.safetensors", "pt") as adapter:
        saved = list(adapter.keys())
    assert any("embed_tokens" in key for key in saved), saved  # the embeddings are saved with the adapter


def test_the_web_ui_trains_sft_on_text_and_mixtures_only(tmp_path):
    from aift.webui import runs

    for task in ("pretrain", "mixture"):
        folder = tmp_path / task
        folder.mkdir()
        (folder / "prepare.json").write_text(json.dumps({"task": task}))
        assert runs.build_request("lora", {"dataset_path": str(folder)}, None)["dataset_path"] == str(folder)
        with pytest.raises(runs.WebUIError, match=f"method dpo trains on preference data .* holds {task} data"):
            runs.build_request("lora", {"dataset_path": str(folder)}, None, "dpo")
