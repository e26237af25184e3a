"""`aift demo` (`make demo`): LoRA fine-tune of the embedded model on the bundled Japanese Q&A, before and after.

It prepares the bundled Q&A (``demo_data/ja_qa.json`` beside this file, package data of the wheel: a copy of
the repository's ``data/ja_qa.json``) with `prepare_dataset`, answers a held-out question greedily, trains a LoRA
adapter for a fifth of an epoch (5 steps, bf16 where the CPU has it, packed rows), then shows the eval loss before
and after and the new answer. Under 4 minutes from a fresh clone on a 2-core CPU, set-up included (docs/install.md). The output dir can be passed on to `aift eval` and `aift report`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

# No torch at module level: the CLI imports this module to build the parser, before it re-executes itself on
# tcmalloc (aift.utils.allocator), and torch imported then would be imported twice (seconds, on a fresh venv
# without bytecode).
from aift.cli.flags import add_field_flag
from aift.config import TrainingConfig
from aift.errors import NotAvailableError

# Shipped inside the package, so that an installed wheel runs the demo from any directory.
DEMO_DATA = Path(__file__).resolve().parent / "demo_data" / "ja_qa.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", default="outputs/demo", help="where the run goes (replaced if it exists)")
    parser.add_argument(
        "--data", default=None, help="Q&A data to train on (default: the 200 bundled Japanese Q&A rows)"
    )
    parser.add_argument(
        "--epochs",
        type=float,
        default=0.2,
        help="passes over the 180 training questions (0.2: 5 steps, enough to change the answer in the demo's minutes)",
    )
    # Both differ from TrainingConfig on purpose, and say why in --help: the demo must show a change in minutes.
    add_field_flag(
        parser, TrainingConfig, "max_length", default=384, differs_because="the demo's short Q&A rows, packed."
    )
    add_field_flag(
        parser,
        TrainingConfig,
        "learning_rate",
        type=float,
        default=3e-3,
        differs_because="the demo has minutes, so 5 steps must visibly change the answer.",
    )
    parser.add_argument("--max-new-tokens", type=int, default=60, help="length of the before/after answers")


def find_demo_data(given: str | None = None) -> Path:
    """--data, else the Q&A rows bundled with the package."""
    if given is None:
        return DEMO_DATA
    if not Path(given).is_file():
        raise NotAvailableError(f"--data {given}: no such file")
    return Path(given)


def run(args: argparse.Namespace) -> int:
    from aift.config import LoRAConfig
    from aift.data.prepare import prepare_dataset
    from aift.data.prepared import read_prepared
    from aift.inference.japanese import JapaneseModel
    from aift.models.registry import EMBEDDED_MODEL
    from aift.training.trainers import LoRAFinetuningTrainer

    out = Path(args.output_dir)
    data_dir = prepare_dataset(
        model=EMBEDDED_MODEL,
        source="json",
        source_path=find_demo_data(args.data),
        output_dir=out.parent / f"{out.name}-data",
        max_length=args.max_length,
        val_ratio=0.1,
    )
    held_out = read_prepared(data_dir)[0]["test"][0]
    holder = JapaneseModel(EMBEDDED_MODEL, device="cpu").load()
    before = greedy_answer(holder.model, holder.tokenizer, held_out["prompt"], args.max_new_tokens)

    config = TrainingConfig(
        model_name=EMBEDDED_MODEL,
        dataset_path=str(data_dir),
        output_dir=str(out),
        overwrite_output_dir=True,
        learning_rate=args.learning_rate,
        batch_size=4,
        gradient_accumulation_steps=1,
        num_epochs=args.epochs,
        warmup_steps=2,
        max_length=args.max_length,
        bf16=True,
        frozen_base_bf16=True,
        gradient_checkpointing=False,  # 135M parameters: activations fit, recomputing them only costs time
        logging_steps=1,
        eval_steps=0,
        save_steps=0,
        report_to=["tensorboard"],
    )
    trainer = LoRAFinetuningTrainer(holder, LoRAConfig(target_modules="all-linear"), config)
    model = trainer.train()
    after = greedy_answer(model, holder.tokenizer, held_out["prompt"], args.max_new_tokens)

    summary = trainer.result.summary
    question = held_out["prompt"].split("<|im_start|>user\n")[-1].split("<|im_end|>")[0]
    print("\n=== aift demo: LoRA on the embedded SmolLM2-135M-Instruct, bundled Japanese Q&A ===")
    print(
        f"steps {summary['steps']}, {summary['tokens']} tokens at {summary['train_tokens_per_s']:.0f} tokens/s, "
        f"{summary['wall_time_s']:.0f} s"
    )
    print(f"eval loss: before {summary['initial_eval_loss']:.3f} -> after {summary['final_eval_loss']:.3f}")
    print(f"held-out question: {question}")
    print(f"  reference: {held_out['reference']}")
    print(f"  before:    {before}")
    print(f"  after:     {after}")
    from aift.models.run_folder import FINAL_DIR

    print(f"output: {out} (adapter in {out / FINAL_DIR}); next: aift eval / aift report with this folder")
    return 0


def greedy_answer(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """The greedy continuation of a rendered prompt, in the precision the adapter was trained in.

    bf16 autocast only where the device computes bf16 in hardware (supports_bf16, the rule training follows):
    on a CPU without it (AVX2) bf16 is emulated, and the demo's two answers took 7x longer than in fp32.
    """
    import torch

    from aift.inference.generation import SamplingParams, eos_token_ids, generate_batch
    from aift.utils.gpu import supports_bf16

    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    params = SamplingParams(max_new_tokens=max_new_tokens, stop_token_ids=eos_token_ids(model, tokenizer))
    device = next(model.parameters()).device.type
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=supports_bf16(device)):
        (completion,) = generate_batch(model, [ids], params, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(completion, skip_special_tokens=True).strip()
