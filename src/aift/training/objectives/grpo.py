"""GRPO (and DAPO, Dr. GRPO, GSPO through its options): an objective of the one loop with a rollout phase.

Each optimizer step, the loop's rollout hook (:mod:`aift.training.rollout_hook`) hands :meth:`GRPOObjective.rollout`
this process's micro-batches of prompts; it samples ``num_generations`` completions per prompt with the batched
decoder (:func:`aift.inference.generation.generate_batch`), one seeded generator per micro-batch (seed, epoch,
plan index: a resumed run and any number of processes sample the same), scores them with the reward functions
(:mod:`aift.training.rewards`), and computes group-relative advantages over the whole step (every process's
completions, ``all_gather``; a group never spans processes). It returns one trainable batch per micro-batch
(:func:`~aift.training.grpo_rollout.collate_rollout`), on which :meth:`loss_sum` computes TRL's clipped surrogate
(:mod:`aift.training.grpo_loss`). ``count`` follows TRL's normalisation: dapo completion tokens, grpo and
dr_grpo completions, bnpo 1 per micro-batch. With ``share_prompt`` every forward on the completions (the loss,
the old and the reference log-probs) runs each group's prompt once (:mod:`aift.training.prompt_sharing`).

``num_iterations`` (μ) > 1: the plan repeats each step's micro-batches μ times (TRL's RepeatSampler, which drops
an incomplete last step); the first pass generates and keeps the batches with their log-probs (the old policy),
the others replay them; that cache is the objective's checkpointed state. ``beta`` > 0: the reference is the
base with the adapter disabled (LoRA), or a frozen copy of the model as loaded (full fine-tuning).

A row of the data is a prompt: its token ids (``prompt_input_ids``, the prepared ``prompt`` column in the
model's prompt format), its text, and its other columns (``reference`` at least), which reach the rewards.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from aift.data.sft import PROMPT_MESSAGES
from aift.errors import AiftError
from aift.inference.generation import SamplingParams, eos_token_ids, generate_batch
from aift.models.run_folder import COMPLETIONS_FILE
from aift.training import rewards as reward_fns
from aift.training.grpo_config import GRPOConfig
from aift.training.grpo_loss import Advantages, grpo_loss, metrics_for_loop, truncated_completions
from aift.training.grpo_rollout import (
    RolloutCache,
    can_share_prompt,
    collate_rollout,
    completion_records,
    generation_index,
    repeat_steps,
    rollout_logps,
    rollout_metrics,
    sampling_seed,
    step_advantages,
    zero_std_warning,
)
from aift.training.objectives import Autocast, Metrics, StepContext, to_device
from aift.utils.files import read_jsonl, write_text_atomic

log = logging.getLogger(__name__)
EVAL_EPOCH = -1  # the sampling seeds of eval batches: (seed, -1, index in the eval order)


@dataclass
class GRPOPlanner:
    """Micro-batches of prompt indices (``batch_size / num_generations`` prompts), in an order fixed by (seed, epoch)."""

    rows: list[dict]
    prompts_per_micro_batch: int
    seed: int
    micro_per_step: int  # gradient_accumulation_steps x data-parallel processes
    num_iterations: int
    efficiency: float = 1.0

    def base_epoch(self, epoch: int) -> list[list[int]]:
        """The epoch's micro-batches before μ repeats them (with μ > 1, whole steps only)."""
        order = list(range(len(self.rows)))
        random.Random(self.seed + epoch).shuffle(order)
        size = self.prompts_per_micro_batch
        plan = [order[i : i + size] for i in range(0, len(order), size)]
        if self.num_iterations > 1:
            plan = plan[: len(plan) // self.micro_per_step * self.micro_per_step]
        return plan

    def epoch(self, epoch: int) -> list[list[int]]:
        return repeat_steps(self.base_epoch(epoch), self.micro_per_step, self.num_iterations)

    def num_micro_batches(self) -> int:
        return len(self.epoch(0))

    def collate(self, micro_batch: list[int]) -> dict:
        rows = [self.rows[i] for i in micro_batch]
        return {"rows": rows, "num_tokens": sum(len(r["prompt_input_ids"]) for r in rows)}


class GRPOObjective:
    """The GRPO loss on completions sampled at train time (see the module docstring)."""

    name = "grpo"
    needs_reference = False

    def __init__(self, config: GRPOConfig, tokenizer, *, is_peft: bool, output_dir: str | Path | None = None):
        self.config, self.tokenizer, self.is_peft = config, tokenizer, is_peft
        self.rewards = reward_fns.load_rewards(config.rewards)
        self.weights = config.resolved_reward_weights
        self.pad_token_id = tokenizer.pad_token_id
        self.completions_file = Path(output_dir) / COMPLETIONS_FILE if output_dir else None
        self.precompute = config.beta > 0 and not is_peft  # a full fine-tune's reference: a frozen copy, made first
        self.reference: torch.nn.Module | None = None
        self.cache = RolloutCache()
        self.rollout_step = 0  # the last training step that sampled (or replayed) completions
        self.stop_ids: tuple[int, ...] = ()
        self.planner_: GRPOPlanner | None = None
        self.rows_per_micro_batch = config.num_generations  # completions per micro-batch: set by planner()
        self.share_prompt: bool | None = None  # config.share_prompt where the model allows it: set at the first rollout

    # ---------------------------------------------------------------- data

    def check(self, examples) -> None:
        if not examples.rows:
            raise AiftError(f"the {examples.name} dataset is empty")
        if "prompt_input_ids" not in examples.rows[0]:
            raise AiftError(
                "GRPO trains on prompts: load the data with GRPOTrainer (the prompt column of `aift prepare`)"
            )

    def planner(self, examples, config, pad_token_id: int, mask: str) -> GRPOPlanner:
        g = self.config.num_generations
        if config.batch_size % g:
            raise AiftError(
                f"batch_size {config.batch_size} counts completions per process and must be a multiple of "
                f"num_generations {g} (each prompt's {g} completions stay in one micro-batch)"
            )
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        micro_per_step = config.gradient_accumulation_steps * world
        self.rows_per_micro_batch = config.batch_size
        self.planner_ = GRPOPlanner(
            examples.rows, config.batch_size // g, config.seed, micro_per_step, self.config.num_iterations
        )
        if not self.planner_.epoch(0):
            raise AiftError(
                f"num_iterations {self.config.num_iterations} repeats whole steps: {len(examples.rows)} prompts give no "
                f"whole step of {micro_per_step} micro-batches of {config.batch_size // g} prompts"
            )
        return self.planner_

    def eval_batches(self, examples, batch_size: int, pad_token_id: int, rank: int, world: int):
        size = max(1, self.rows_per_micro_batch // self.config.num_generations)
        for k, start in enumerate(range(0, len(examples.rows), size)):
            if k % world == rank:
                rows = examples.rows[start : start + size]
                yield {"rows": rows, "num_tokens": sum(len(r["prompt_input_ids"]) for r in rows)}

    def count(self, batch: dict) -> int:
        loss_type = self.config.loss_type
        if loss_type == "dapo":
            return int(batch["num_completion_tokens"])
        if loss_type == "bnpo":
            return 1
        return int(batch["input_ids"].shape[0])  # grpo, dr_grpo: completions

    # ---------------------------------------------------------------- reference (beta > 0, full fine-tune)

    @torch.no_grad()
    def precompute_reference(self, model, rows, batch_size, autocast, device) -> None:
        """The loop's hook before any step (and before a checkpoint is loaded): a frozen copy of the model."""
        if self.reference is None:
            self.reference = copy.deepcopy(getattr(model, "module", model)).eval().requires_grad_(False)

    def _reference_logps(self, model, batch: dict, autocast: Autocast) -> torch.Tensor:
        temperature = self.config.temperature
        if self.reference is not None:
            with autocast():
                return rollout_logps(self.reference, batch, temperature)[0]
        with model.disable_adapter(), autocast():
            return rollout_logps(model, batch, temperature)[0]

    # ---------------------------------------------------------------- rollout

    def rollout(self, batches: list[dict], ctx: StepContext) -> list[dict]:
        """This process's micro-batches of prompts -> scored completions with advantages (see the module doc)."""
        if ctx.is_eval:
            return self._generate_and_score(batches, ctx, [(EVAL_EPOCH, i) for i in ctx.micro_batches], [True])
        self.rollout_step = ctx.step + 1
        planner, mu = self.planner_, self.config.num_iterations
        real = len(planner.epoch(ctx.epoch))  # indices past it are the loop's padding (weight 0) for the processes
        plan_len = len(planner.base_epoch(ctx.epoch))
        where = [
            generation_index(j, plan_len, planner.micro_per_step, mu) if mu > 1 and j < real else (j, 0)
            for j in ctx.micro_batches
        ]
        key = (ctx.epoch, min(g for g, _ in where))
        if where[0][1] > 0:  # iteration 2..μ of the cycle: the same completions, the old log-probs kept
            cached = self.cache.get(key)
            if cached is None:
                raise RuntimeError(f"internal: no rollout kept for iteration {where[0][1] + 1} of step {ctx.step + 1}")
            return cached
        valid = [j < real for j in ctx.micro_batches]
        out = self._generate_and_score(batches, ctx, [(ctx.epoch, g) for g, _ in where], valid)
        if mu > 1:
            self.cache.put(key, out)
        return out

    def _generate_and_score(self, batches, ctx: StepContext, seeds, valid: list[bool]) -> list[dict]:
        """Samples each micro-batch's completions from its own seeded generator, then scores the lot."""
        cfg = self.config
        if not self.stop_ids:
            self.stop_ids = eos_token_ids(ctx.model, self.tokenizer)
        if self.share_prompt is None:
            self.share_prompt = cfg.share_prompt and can_share_prompt(ctx.model)
        params = SamplingParams(
            max_new_tokens=cfg.max_completion_length, temperature=cfg.temperature, top_p=cfg.top_p,
            top_k=cfg.top_k, stop_token_ids=self.stop_ids,
        )  # fmt: skip
        generated = []
        for batch, (epoch, index) in zip(batches, seeds, strict=True):
            generator = torch.Generator().manual_seed(sampling_seed(ctx.seed, epoch, index))
            prompts = [r["prompt_input_ids"] for r in batch["rows"]]
            with ctx.autocast():
                generated.append(
                    generate_batch(ctx.model, prompts, params, pad_token_id=self.pad_token_id,
                                   num_return_sequences=cfg.num_generations, generator=generator)
                )  # fmt: skip
        return self._score(batches, generated, ctx, valid * len(batches) if ctx.is_eval else valid)

    def _score(self, batches, generated, ctx: StepContext, valid: list[bool]) -> list[dict]:
        """Rewards of this process's completions, advantages over the whole step, and the trainable batches."""
        g, width = self.config.num_generations, self.rows_per_micro_batch
        rows = [r for b in batches for r in b["rows"] for _ in range(g)]
        ids = [c for completions in generated for c in completions]
        texts = [t.rstrip("\ufffd") for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
        prompts = [r["prompt"] for r in rows]
        columns = {k: [r["columns"][k] for r in rows] for k in rows[0]["columns"]}
        scores = reward_fns.score(
            self.rewards, *_reward_inputs(rows, texts), columns, step=ctx.step + 1, completion_ids=ids,
            state=reward_fns.RewardState(global_step=ctx.step, epoch=float(ctx.epoch)),
        )  # fmt: skip
        # Each micro-batch padded to `width` rows: every process gathers tensors of one shape.
        positions = [k * width + i for k, b in enumerate(batches) for i in range(len(b["rows"]) * g)]
        n = len(batches) * width
        table = torch.full((n, len(self.rewards)), math.nan)
        table[positions] = scores
        row_valid = torch.zeros(n, dtype=torch.bool)
        row_valid[positions] = torch.tensor([valid[p // width] for p in positions])
        lengths, truncated = torch.zeros(n), torch.zeros(n, dtype=torch.bool)
        lengths[positions] = torch.tensor([float(len(c)) for c in ids])
        truncated[positions] = truncated_completions(ids, [*self.stop_ids, self.pad_token_id])
        gather = ctx.all_gather if ctx.dp_world > 1 and not ctx.is_eval else None
        local, step, step_valid = step_advantages(
            table, row_valid, self.weights, g, self.config.scale_rewards, gather, ctx.dp_rank
        )
        masked = table.masked_fill(~row_valid.unsqueeze(1), math.nan)
        whole = [gather(x) if gather else x for x in (masked, lengths, truncated)]
        names = [r.name for r in self.rewards]
        stats = rollout_metrics(whole[0], names, step, whole[1], whole[2], step_valid)
        mine = Advantages(*(x[positions] for x in (local.advantages, local.rewards, local.std, local.zero_std)))
        if not ctx.is_eval:
            self._report(ctx, stats, prompts, texts, scores, names, mine)
        return self._batches(batches, generated, mine.advantages, stats, ctx, valid)

    def _batches(self, batches, generated, advantages, stats, ctx: StepContext, valid) -> list[dict]:
        """The trainable batches, with what the loss needs and the step's totals its metrics are divided by."""
        cfg, g, out, start = self.config, self.config.num_generations, [], 0
        for batch, completions in zip(batches, generated, strict=True):
            prompts = [r["prompt_input_ids"] for r in batch["rows"] for _ in range(g)]
            rollout = collate_rollout(prompts, completions, self.pad_token_id, self.stop_ids,
                                      cfg.mask_truncated_completions, g if self.share_prompt else None)  # fmt: skip
            rollout["advantages"] = advantages[start : start + len(completions)]
            start += len(completions)
            self._add_logps(rollout, ctx)
            out.append(rollout)
        totals = torch.tensor(
            [[self.count(b), b["num_completion_tokens"], b["input_ids"].shape[0]] for b in out], dtype=torch.float64
        ) * torch.tensor(valid, dtype=torch.float64).unsqueeze(1)
        totals = totals.sum(0).to(ctx.device)
        if not ctx.is_eval:
            totals = ctx.reduce_sum(totals)
        count, tokens, completions = totals.tolist()
        for b in out:
            b["step_totals"] = {"count": count, "tokens": tokens, "completions": completions}
            b["stats"] = dict(stats)
        return out

    def _add_logps(self, batch: dict, ctx: StepContext) -> None:
        """The old policy's log-probs (μ > 1) and the reference's (β > 0), computed once, at generation time."""
        if self.config.num_iterations == 1 and self.config.beta == 0:
            return
        on_device = to_device(batch, ctx.device)
        if self.config.num_iterations > 1:
            with ctx.autocast():
                batch["old_logps"] = rollout_logps(ctx.model, on_device, self.config.temperature)[0].float().cpu()
        if self.config.beta > 0:
            batch["ref_logps"] = self._reference_logps(ctx.model, on_device, ctx.autocast).float().cpu()

    def _report(self, ctx: StepContext, stats, prompts, texts, scores, names, advantages) -> None:
        """The zero-std warning and every ``log_completions_steps`` steps a completions.jsonl entry (main only)."""
        cfg, step = self.config, ctx.step + 1
        if not ctx.is_main:
            return
        if message := zero_std_warning(stats["frac_reward_zero_std"], step):
            log.warning("%s", message)
        if self.completions_file is None or not cfg.log_completions_steps or step % cfg.log_completions_steps:
            return
        records = completion_records(step, prompts, texts, scores, names, advantages, cfg.num_generations,
                                     cfg.num_completions_to_log)  # fmt: skip
        with self.completions_file.open("a", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)

    # ---------------------------------------------------------------- loss

    def loss_sum(self, model, batch: dict, autocast: Autocast) -> tuple[torch.Tensor, Metrics]:
        cfg = self.config
        with autocast():
            logps, entropy = rollout_logps(model, batch, cfg.temperature, with_entropy=True)
        out = grpo_loss(
            logps.float(), batch["completion_mask"], batch["advantages"].to(logps.device),
            old_logps=batch.get("old_logps"), ref_logps=batch.get("ref_logps"), entropies=entropy,
            loss_type=cfg.loss_type, epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high, delta=cfg.delta,
            beta=cfg.beta, importance_sampling_level=cfg.importance_sampling_level,
            use_bias_correction_kl=cfg.use_bias_correction_kl, max_completion_length=cfg.max_completion_length,
        )  # fmt: skip
        totals = batch["step_totals"]
        per_completion = cfg.importance_sampling_level == "sequence"
        denominators = {
            name: totals["completions"] if per_completion and name.startswith("clip_ratio") else totals["tokens"]
            for name in out.metrics
        }
        metrics = metrics_for_loop(out.metrics, denominators, totals["count"])
        # The rollout's statistics are of the whole step: each micro-batch adds value x its count, so the loop's
        # sum over micro-batches and processes divided by the step's count gives the value back.
        count = self.count(batch)
        metrics.update({k: torch.tensor(v * count, device=logps.device) for k, v in batch["stats"].items()})
        return out.loss_sum, metrics

    # ---------------------------------------------------------------- state (checkpoints)

    def state_dict(self) -> dict:
        return {"rollout": self.cache.state_dict(), "rollout_step": self.rollout_step}

    def load_state_dict(self, state: dict) -> None:
        self.cache.load_state_dict(state.get("rollout", {}))
        if "rollout_step" in state:
            self.rollout_step = state["rollout_step"]
            self._forget_completions_after(self.rollout_step)

    def _forget_completions_after(self, step: int) -> None:
        """On resume, drop the completions.jsonl entries of steps the interrupted run did after its checkpoint
        (the resumed run logs them again), as metrics.jsonl drops their records."""
        path = self.completions_file
        main = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
        if path is None or not main or not path.exists():
            return
        kept = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
        write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))


def _reward_inputs(rows: list[dict], texts: list[str]) -> tuple[list, list]:
    """(prompts, completions) as TRL passes them: strings for text data; for conversational data the prompt's
    messages and each completion as ``[{"role": "assistant", "content": text}]``."""
    if rows and rows[0]["prompt_messages"] is not None:
        return [r["prompt_messages"] for r in rows], [[{"role": "assistant", "content": t}] for t in texts]
    return [r["prompt"] for r in rows], texts


# ---------------------------------------------------------------------- data


def prompt_rows(split, tokenizer, fmt=None, system: str | None = None) -> list[dict]:
    """GRPO rows of a prepared split (or any rows with ``prompt`` and ``reference``): ids, text, other columns.

    A ``prompt`` is the rendered text (``aift prepare``'s column: BOS in front when the prepared sequence began
    with it, as ``aift eval`` generates from the same column), or a list of messages (TRL's conversational
    data), rendered here as a generation prompt in ``fmt`` (with ``system`` first when it has no system
    message, as ``aift prepare`` does) and kept as ``prompt_messages``: its rewards get message lists. A folder
    `aift prepare` wrote from chat rows is conversational too: its ``prompt_messages`` column holds each prompt's
    messages.
    """
    rows, bos = [], tokenizer.bos_token_id
    adds_bos = bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]
    for i, item in enumerate(split):
        prompt, messages = item.get("prompt"), None
        if is_conversational(prompt):
            messages = list(prompt)
            if fmt is None:
                raise AiftError(f"row {i}: a list of messages as prompt, where the other split has text prompts")
            prompt = fmt.generation_prompt(_with_system(messages, system), tokenizer)
        elif not isinstance(prompt, str) or not prompt:
            raise AiftError(
                f"row {i}: GRPO data needs a non-empty `prompt` column, text (prepare it with `aift prepare --task "
                f"sft`) or a list of {{'role', 'content'}} messages, got {type(prompt).__name__}"
            )
        elif item.get(PROMPT_MESSAGES):
            messages = json.loads(item[PROMPT_MESSAGES])
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        first = item.get("input_ids") or [bos if messages is not None and adds_bos else None]
        if bos is not None and first[0] == bos and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        columns = {k: v for k, v in item.items() if k not in _TOKEN_COLUMNS}
        rows.append({"prompt_input_ids": ids, "prompt": prompt, "prompt_messages": messages, "columns": columns})
    if len({r["prompt_messages"] is None for r in rows}) > 1:
        raise AiftError("GRPO data mixes text prompts and message-list prompts: use one kind for every row")
    return rows


def is_conversational(prompt) -> bool:
    """TRL's rule: a prompt is conversational when it is a list of messages (dicts with a ``role``)."""
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(m, dict) and "role" in m for m in prompt)


def _with_system(messages: list[dict], system: str | None) -> list[dict]:
    if not system or messages[0]["role"] == "system":
        return messages
    return [{"role": "system", "content": system}, *messages]


_TOKEN_COLUMNS = ("input_ids", "attention_mask", "labels", "text", "prompt", PROMPT_MESSAGES)


def build(config: GRPOConfig, *, tokenizer, is_peft: bool, output_dir: str | Path | None = None,
          **_: object) -> GRPOObjective:  # fmt: skip
    """The registry's builder (:mod:`aift.training.methods`)."""
    return GRPOObjective(config, tokenizer, is_peft=is_peft, output_dir=output_dir)
