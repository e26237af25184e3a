"""The benchmark's parts: its data, the FLOPs formula, the matmul peak and the writers."""

from __future__ import annotations

import json

import pytest
import torch

from aift.bench.core import BenchOptions, assemble
from aift.bench.data import BenchDataError, load_rows, synthetic_rows, to_messages, tokenize_conversation
from aift.bench.peak import matmul_param_counts, matmul_peak_gflops, model_flops
from aift.bench.report import markdown, summary_line, target_rows, write_all
from aift.errors import AiftError


def test_synthetic_rows_are_deterministic_and_shaped_like_the_baseline_set():
    rows = synthetic_rows()
    assert len(rows) == 2000 and rows == synthetic_rows()
    assert rows[:5] != synthetic_rows(seed=1)[:5]
    prompt_words = [len(r["instruction"].split()) for r in rows]
    answer_words = [len(r["output"].split()) for r in rows]
    assert min(prompt_words) >= 5 and max(prompt_words) <= 60
    assert min(answer_words) >= 10 and max(answer_words) <= 400
    assert sum(w > 80 for w in answer_words) > 500  # the long half of the mixture is there


def test_load_rows_reads_json_and_jsonl_and_names_the_bad_line(tmp_path):
    good = tmp_path / "rows.jsonl"
    good.write_text('{"instruction": "Q?", "output": "A."}\n\n{"messages": [{"role": "user", "content": "x"}]}\n')
    assert len(load_rows(good)) == 2
    listed = tmp_path / "rows.json"
    listed.write_text(json.dumps([{"instruction": "Q?", "input": "ctx", "output": "A."}]))
    assert to_messages(load_rows(listed)[0])[0]["content"] == "Q?\n\nctx"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "Q?", "output": "A."}\n{oops\n')
    with pytest.raises(BenchDataError, match=r"bad.jsonl line 2"):
        load_rows(bad)
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps([{"instruction": "Q?", "output": "A."}, {"question": "Q?"}]))
    with pytest.raises(BenchDataError, match=r"missing.json row 2: expected 'instruction'"):
        load_rows(missing)


def test_tokenize_conversation_renders_the_chat_template_and_truncates(tokenizer):
    messages = to_messages({"instruction": "Why?", "output": "Because " * 50})
    ids = tokenize_conversation(tokenizer, messages, max_length=1000)
    text = tokenizer.decode(ids)
    assert "<|im_start|>user\nWhy?<|im_end|>" in text and text.rstrip().endswith("<|im_end|>")
    assert tokenize_conversation(tokenizer, messages, max_length=20) == ids[:20]


def test_param_counts_and_flops_formula(tiny_model_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    body, head = matmul_param_counts(model)
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * config.head_dim
    assert body == layers * (2 * h * h + 2 * h * kv + 3 * h * i)  # q, o, k, v, gate, up, down
    assert head == config.vocab_size * h
    assert model_flops(body, head, tokens=10, scored_tokens=8, full=False) == 4 * (body * 10 + head * 8)
    assert model_flops(body, head, tokens=10, scored_tokens=8, full=True) == 6 * (body * 10 + head * 8)


def test_matmul_peak_is_a_positive_rate():
    assert matmul_peak_gflops(torch.float32, size=128, seconds=0.05, device="cpu") > 0


@pytest.mark.gpu
def test_matmul_peak_is_measured_on_the_gpu_where_the_bench_trains():
    """Timed after a synchronize: a CPU-side timing of launches would report an impossible rate."""
    gpu = matmul_peak_gflops(torch.bfloat16, size=4096, seconds=0.5)
    cpu = matmul_peak_gflops(torch.float32, size=512, seconds=0.2, device="cpu")
    name = torch.cuda.get_device_name(0)
    # 2.5 PFLOP/s is above any GPU's dense bf16 peak; timing only the launches would give ~10 PFLOP/s or more.
    assert cpu < gpu < 2_500_000, f"{gpu:.0f} GFLOP/s on {name}: above any GPU's bf16 peak, so launches were timed"


def fake_run(tokens_per_s, mem, loss):
    return {"tokens": 1000, "train_time_s": 1000 / tokens_per_s, "tokens_per_s": tokens_per_s, "steps": 3,
            "peak_mem_gb": mem, "eval_loss": loss, "allocator": "tcmalloc", "threads": 2}  # fmt: skip


def fake_result(precision="bf16"):
    options = BenchOptions(examples=10, compare="trl", ablation=True)
    peak = {"bf16_gflops": 800.0, "fp32_gflops": 200.0, "body_params": 100_000_000, "head_params": 28_000_000}
    ablation = [{"name": "without packing (length-grouped padding)", **fake_run(300, 3.0, 2.01)}]
    aift, trl = fake_run(500, 2.0, 2.0), fake_run(80, 6.0, 2.02)
    return assemble(options, "/m", peak, aift, trl, ablation, [0.1, 0.2, 0.3], precision)


def test_mfu_is_of_the_peak_in_the_precision_both_runs_trained_in():
    bf16, fp32 = fake_result("bf16"), fake_result("fp32")
    assert fp32["mfu"] == pytest.approx(bf16["mfu"] * 800 / 200)
    assert fp32["precision"] == "fp32"
    text = markdown(fp32)
    assert "fp32 (this device has no bf16 in hardware" in text and "/ fp32 peak" in text


def test_the_bench_precision_is_bf16_only_where_the_device_has_it():
    from aift.bench.measure import bench_precision
    from aift.utils.gpu import cpu_has_native_bf16

    assert bench_precision("fp32") == "fp32" and bench_precision("bf16") == "bf16"
    native = torch.cuda.is_bf16_supported() if torch.cuda.is_available() else cpu_has_native_bf16()
    assert bench_precision() == ("bf16" if native else "fp32")
    with pytest.raises(AiftError, match="--precision must be one of auto, bf16, fp32"):
        bench_precision("fp16")


def test_assemble_computes_ratios_mfu_and_targets():
    result = fake_result()
    assert result["speedup"] == pytest.approx(500 / 80)
    assert result["memory_ratio"] == pytest.approx(2 / 6)
    assert result["eval_loss_gap"] == pytest.approx(abs(2.0 / 2.02 - 1))
    flops = 4 * (100_000_000 * 1000 + 28_000_000 * 990)  # 10 examples: 10 first tokens without a target
    assert result["mfu"] == pytest.approx(flops / 2.0 / 800e9)
    met = {row["name"]: row["met"] for row in target_rows(result)}
    assert met == {"speedup": False, "mfu": False, "memory_ratio": True, "eval_loss_gap": True}  # 6.25 < 8


def test_writers_produce_json_markdown_and_png(tmp_path):
    result = fake_result()
    write_all(result, tmp_path)
    loaded = json.loads((tmp_path / "result.json").read_text())
    assert loaded["aift"]["tokens_per_s"] == 500 and loaded["trl"]["peak_mem_gb"] == 6.0
    text = (tmp_path / "results.md").read_text()
    assert "| TRL SFTTrainer | 80 |" in text and "## Ablation" in text and "0.60x" in text
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*tmp*"))  # temp files renamed into place
    assert summary_line(result).startswith("bench: aift 500 tok/s") and "speedup 6.25x" in summary_line(result)


def test_options_reject_bad_values():
    with pytest.raises(AiftError, match="--method"):
        BenchOptions(method="dpo")
    with pytest.raises(AiftError, match="--examples"):
        BenchOptions(examples=0)
    assert BenchOptions(examples=96).eval_examples == 32 and BenchOptions(examples=4).eval_examples == 2


def test_settings_of_both_trainers_list_every_difference():
    """aift's TrainingConfig and TRL's SFTConfig read into one vocabulary; the differences come first, marked."""
    from peft import LoraConfig
    from trl import SFTConfig

    from aift.bench.settings import aift_settings, differences, settings_markdown, trl_settings
    from aift.config import LoRAConfig, TrainingConfig

    class Model:  # only what trl_settings reads of the loaded model
        class config:  # noqa: N801
            _attn_implementation = "sdpa"

    config = TrainingConfig(learning_rate=2e-4, batch_size=8, warmup_steps=0, num_epochs=1, weight_decay=0.0,
                            packing=False, loss_chunk_size=0, segment_attention=False, seed=42)  # fmt: skip
    lora = LoRAConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
    args = SFTConfig(output_dir="unused", learning_rate=2e-4, per_device_train_batch_size=8, num_train_epochs=1,
                     bf16=True, use_cpu=True, seed=42, report_to=[])  # fmt: skip
    peft_lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
    ours = aift_settings(config, lora, "tcmalloc", "every token", {"beta": 0.1})
    theirs = trl_settings(args, peft_lora, Model, "system", "every token", {"beta": 0.1})
    assert ours["epochs"] == theirs["epochs"] == "1"  # 1.0 and 1 read alike
    assert ours["LoRA"] == theirs["LoRA"] == "r=16, alpha=32, dropout=0.0, targets=all-linear"
    diff = differences(ours, theirs)
    assert "allocator" in diff and "optimizer" in diff and "precision" in diff
    assert not {"learning rate", "warmup steps", "weight decay", "packing", "seed", "beta"} & set(diff)
    table = settings_markdown("aift", ours, "TRL", theirs)
    assert table[0].startswith(f"{len(diff)} of ")
    assert table[4].startswith(f"| {diff[0]} |") and table[4].endswith("| **yes** |")
    assert table[-1].endswith("| no |")
