"""Run under torchrun with 2 processes: a 2-stage GPipe step of the tiny llama over gloo, compared with the whole
model in one process. Prints one JSON line per rank (not a test module: tests/distributed/test_pipeline.py runs it)."""

import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.pipelining import PipelineStage, ScheduleGPipe
from transformers import AutoModelForCausalLM

from aift.distributed.pipeline import mark_tied_embeddings, split_stages, sum_tied_gradients


def loss_fn(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def main(model_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (4, 12))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    reference = model(input_ids=inputs).logits
    ref_loss = loss_fn(reference, targets)
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    tied = mark_tied_embeddings(model)
    stage_module = split_stages(model, world)[rank]
    stage = PipelineStage(stage_module, rank, world, torch.device("cpu"))
    schedule = ScheduleGPipe(stage, n_microbatches=2, loss_fn=loss_fn)
    losses = []
    if rank == 0:
        schedule.step(inputs)
    else:
        schedule.step(target=targets, losses=losses)
    sum_tied_gradients(stage_module, 0, world - 1)
    # Each micro-batch loss is a mean over its (equally many) tokens; the schedule averages their gradients.
    worst = max(
        ((p.grad if p.grad is not None else torch.zeros_like(p)) - ref_grads[n]).abs().max().item()
        for n, p in model.named_parameters()
        if any(p is q for q in stage_module.parameters())
    )
    pipe_loss = sum(x.item() for x in losses) / len(losses) if losses else None
    report = {"rank": rank, "tied": tied, "ref_loss": ref_loss.item(), "pipe_loss": pipe_loss, "max_grad_diff": worst}
    # One write of the line and its newline: both ranks share the pipe, and print's two writes can interleave.
    sys.stdout.write(json.dumps(report) + "\n")
    sys.stdout.flush()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
