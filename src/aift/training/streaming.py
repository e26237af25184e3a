"""Training on a streamed corpus (`aift prepare --streaming`): the loop's plan becomes a position in a stream.

The loop plans micro-batches as a list per epoch and deals them round-robin over processes
(:mod:`aift.training.step`). For a streamed corpus the plan of the whole run is ``range(max_steps x
micro-batches per step)``; micro-batch ``j`` is the ``j``-th ``batch_size`` blocks of the
:class:`~aift.data.streaming.BlockStream`, made when it is collated. Every process reads the same stream and
skips the micro-batches of the others, so 2 processes train on what 1 process with 2 accumulation steps trains
on (each process tokenizes the whole stream: the price of that equality).

The stream's cursor is saved in each checkpoint (``stream_state.pt``), taken at the step's end on every
process, and restored on resume: the run continues at the same document and token. The length of a stream
is unknown, so ``max_steps`` is required; the loop's epoch is then the whole run (``epoch`` in the records is
the share of it done) and the passes over the corpus are in the summary.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from aift.config import ConfigError, TrainingConfig
from aift.data.packing import PackedCollator
from aift.data.streaming import BlockStream, StreamedExamples
from aift.training.backends import AccelerateBackend
from aift.training.checkpoint import CheckpointError, TrainerState

STATE_FILE = "stream_state.pt"

log = logging.getLogger(__name__)


def describe(examples) -> str:
    """The train data in the loop's start-up line: its examples, or what is known of a stream before it is read."""
    if not isinstance(examples, StreamedExamples):
        return f"{len(examples.rows)} examples"
    corpus = examples.corpus
    return (
        f"streamed from {len(corpus.files)} file(s), {sum(f.size for f in corpus.files) / 1e6:.1f} MB "
        "(its documents and tokens are counted as it is read: see the summary)"
    )


def check_data(objective, examples) -> None:
    """The objective's check of its data; a streamed corpus trains the sft objective (next-token loss) only."""
    if not isinstance(examples, StreamedExamples):
        objective.check(examples)
    elif objective.name != "sft":
        raise ConfigError(f"a streamed corpus trains next-token prediction (method full or lora), not {objective.name}")


def check_config(examples, config: TrainingConfig) -> None:
    """ConfigError for the settings a streamed corpus cannot train with (checked before the model loads)."""
    if not isinstance(examples, StreamedExamples):
        return
    if config.max_steps <= 0:
        raise ConfigError(
            "a streamed corpus has no known length: set the number of steps (--max-steps N, or max_steps: N "
            "in the YAML); num_epochs does not apply"
        )
    if not config.packing:
        raise ConfigError("a streamed corpus is trained in packed blocks: leave packing on")


def planner(objective, examples, config: TrainingConfig, pad_token_id: int, mask: str, backend):
    """The objective's planner of rows in memory, or a :class:`StreamPlanner` for a streamed corpus."""
    if not isinstance(examples, StreamedExamples):
        return objective.planner(examples, config, pad_token_id, mask)
    if not isinstance(backend, AccelerateBackend):
        raise ConfigError(
            "a streamed corpus trains on Accelerate (one process, DDP, FSDP, DeepSpeed), not pipeline stages"
        )
    return StreamPlanner(examples, config, pad_token_id, mask, backend.dp_world)


class StreamPlanner:
    """Micro-batch ``j`` of the run: the stream's ``j``-th ``batch_size`` blocks, packed as pretrain blocks are."""

    def __init__(self, examples: StreamedExamples, config: TrainingConfig, pad_token_id: int, mask: str, world: int):
        check_config(examples, config)
        corpus = examples.corpus
        self.max_length = min(corpus.max_length, config.max_length)
        self.stream = BlockStream(corpus, examples.tokenizer, self.max_length)
        self.batch_size = config.batch_size
        self.length = config.max_steps * config.gradient_accumulation_steps * world  # micro-batches of the run
        self.efficiency = corpus.fill  # the held-out blocks' fill, an estimate: the stream's own is not known yet
        self.next_index = 0
        self._collate = PackedCollator(pad_token_id, self.max_length, mask=mask)
        self._fingerprint = corpus.fingerprint()
        log.info(
            "streaming %d file(s), %.1f MB, in blocks of %d tokens (each process reads the whole stream)",
            len(corpus.files), sum(f.size for f in corpus.files) / 1e6, self.max_length,
        )  # fmt: skip

    def num_micro_batches(self) -> int:
        return self.length

    def epoch(self, epoch: int) -> range:
        """The run's micro-batch indices (an epoch past the first follows only steps skipped as non-finite)."""
        return range(epoch * self.length, (epoch + 1) * self.length)

    def collate(self, index: int) -> dict:
        """Micro-batch ``index`` (the stream moves forward to it, skipping the other processes' micro-batches)."""
        self.advance(index)
        return self._collate(self._next_micro_batch())

    def advance(self, index: int) -> None:
        if index < self.next_index:
            raise RuntimeError(f"internal: the stream is at micro-batch {self.next_index}, {index} was asked for")
        while self.next_index < index:
            self._next_micro_batch()

    def _next_micro_batch(self) -> list[list[dict]]:
        self.next_index += 1
        blocks = [self.stream.next_block() for _ in range(self.batch_size)]
        return [[{"input_ids": piece, "labels": piece} for piece in block] for block in blocks]

    def state_dict(self, state: TrainerState) -> dict[str, Any]:
        """The stream at the data position of ``state`` (every process moves there: the states are then equal)."""
        index = state.epoch * self.length + state.micro_batch
        self.advance(index)
        return {"format": 1, "micro_batch": index, "corpus": self._fingerprint, **self.stream.state_dict()}

    def load_state_dict(self, saved: dict[str, Any], state: TrainerState, origin: Path) -> None:
        index = state.epoch * self.length + state.micro_batch
        if saved.get("corpus") != self._fingerprint:
            raise CheckpointError(f"{origin} was written while streaming another corpus; resume with its dataset")
        if saved.get("micro_batch") != index:
            raise CheckpointError(
                f"{origin}: its stream is at micro-batch {saved.get('micro_batch')}, the run at {index}: was it "
                "written with another gradient_accumulation_steps x processes?"
            )
        self.stream.load_state_dict(saved)
        self.next_index = index

    def summary(self) -> dict[str, Any]:
        return {"stream": dict(self.stream.stats)}


def files(planner, state: TrainerState) -> dict:
    """A checkpoint's file of the stream's position (nothing for a plan of rows in memory)."""
    return {STATE_FILE: planner.state_dict(state)} if isinstance(planner, StreamPlanner) else {}


def restore(planner, path: Path, state: TrainerState) -> None:
    """The stream's position from checkpoint ``path``, for a run that streams."""
    if not isinstance(planner, StreamPlanner):
        return
    file = path / STATE_FILE
    if not file.is_file():
        raise CheckpointError(f"{path} holds no {STATE_FILE}: it was written by a run that did not stream")
    planner.load_state_dict(torch.load(file, weights_only=True), state, path)


def summary(planner) -> dict[str, Any]:
    return planner.summary() if isinstance(planner, StreamPlanner) else {}
