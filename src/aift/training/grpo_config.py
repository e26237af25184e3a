"""GRPOConfig: the options of `aift train --method grpo` (YAML ``grpo:``, ``grpo.key=value``, ``--flag``).

Defaults are TRL 1.16's ``GRPOConfig`` defaults, pinned here so that a TRL upgrade cannot change an aift run;
where aift differs, the field says why. Options TRL has and aift does not (vLLM, tools, multimodal, the loss
types cispo/sapo/luspo/vespo, entropy bonus, ...) are left out rather than accepted and ignored.

aift generates once per optimizer step for all of the step's micro-batches, which is TRL's default
(``steps_per_generation = gradient_accumulation_steps``), so neither ``steps_per_generation`` nor
``generation_batch_size`` is an option. ``learning_rate`` is :class:`~aift.config.TrainingConfig`'s
(TRL's GRPO default is 1e-6; aift's 2e-5 suits the LoRA runs it is tested with).
"""

from __future__ import annotations

from dataclasses import dataclass

from aift.config import ConfigError, _f

SCALE_REWARDS = ("group", "batch", "none")
GRPO_LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "bnpo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
# Loss types of TRL 1.16 that aift does not implement: named in the error so a TRL user knows it is deliberate.
_TRL_ONLY_LOSS_TYPES = ("cispo", "sapo", "luspo", "vespo")


@dataclass
class GRPOConfig:
    """Group Relative Policy Optimization (`aift train --method grpo`); defaults are TRL 1.16's."""

    # ---------------------------------------------------------------- rewards
    rewards: list[str] = _f(
        [],
        "Reward functions, one spec each (`--reward`, repeatable): exact_match, format:REGEX, length[:CHARS], ja, "
        "or python:FILE.py:FUNCTION (a TRL-style f(prompts, completions, **columns) -> list[float | None]). "
        "At least one is needed to train.",
    )
    reward_weights: list[float] | None = _f(
        None,
        "Weight of each reward function, in the order of `rewards` (`--reward-weights 1,0.2`); None weighs each 1.0. "
        "The total reward is the weighted sum, skipping functions that returned None for that completion.",
    )
    # ---------------------------------------------------------------- generation
    num_generations: int = _f(
        8,
        "Completions sampled per prompt (a group, G); at least 2. `batch_size` counts completions and must divide by it.",
    )
    max_completion_length: int = _f(
        512, "Most tokens generated per completion; a completion that reaches it without EOS is truncated."
    )
    temperature: float = _f(
        1.0, "Sampling temperature. 0 samples greedily (aift only: TRL requires > 0; useful for tests and debugging)."
    )
    top_p: float = _f(
        1.0, "Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p; 1.0 keeps all."
    )
    top_k: int = _f(0, "Keep only the top_k most likely tokens when sampling; 0 keeps all.")
    # ---------------------------------------------------------------- advantages
    scale_rewards: str = _f(
        "group",
        "How advantages are scaled after subtracting the group mean: group (by the group's std), batch (by the std of "
        "the whole global batch, PPO-Lite) or none (Dr. GRPO: no std scaling, no difficulty bias). true/false mean "
        "group/none, as in TRL.",
    )
    # ---------------------------------------------------------------- loss
    loss_type: str = _f(
        "dapo",
        "How per-token losses are aggregated: dapo (sum over the global batch's completion tokens / their number; "
        "no length bias), grpo (mean over each completion's tokens, then over completions; favours short correct "
        "answers), dr_grpo (sum / (completions x max_completion_length)), bnpo (mean over each micro-batch's tokens, "
        "then over micro-batches).",
    )
    epsilon: float = _f(0.2, "Clipping range of the probability ratio: below 1 - epsilon (and above 1 + epsilon_high).")
    epsilon_high: float | None = _f(
        None, "Upper clipping epsilon (DAPO's clip-higher recommends 0.28); None uses epsilon."
    )
    delta: float | None = _f(
        None,
        "Two-sided clipping (INTELLECT-2): also cap the unclipped ratio at delta (should be > 1 + epsilon); None: off.",
    )
    importance_sampling_level: str = _f(
        "token",
        "token: one probability ratio per token (GRPO); sequence: one per completion, the exp of the mean per-token "
        "log-ratio over its tokens (GSPO).",
    )
    num_iterations: int = _f(
        1,
        "Optimizer steps on each generated batch (mu). Above 1 the log-probs at generation time are kept as the "
        "old policy of the ratio; at 1 the ratio is exactly 1 (its gradient is the policy gradient).",
    )
    mask_truncated_completions: bool = _f(
        False, "Leave completions that hit max_completion_length without EOS out of the loss (DAPO's overlong filter)."
    )
    beta: float = _f(
        0.0,
        "KL coefficient to the reference (the base with the adapter disabled; a full fine-tune keeps a frozen copy). "
        "0 computes no reference log-probs at all (faster); DeepSeek-R1 used 0.001.",
    )
    use_bias_correction_kl: bool = _f(
        True,
        "With beta > 0, multiply the per-token KL (k3 estimator) by the probability ratio, so that its gradient is the "
        "unbiased reverse-KL gradient (DeepSeek-V3.2); TRL 1.16's default.",
    )
    share_prompt: bool = _f(
        True,
        "Run each prompt once per group in the training forwards: one row prompt + its num_generations completions, "
        "with a mask that hides each completion from the others (the same log-probs, far fewer tokens; SDPA/eager "
        "attention and a plain lm_head only, else off). TRL runs the prompt once per completion.",
    )
    disable_dropout: bool = _f(
        False,
        "Turn dropout off in the model. TRL's GRPO default is False (unlike its DPO's); with num_iterations > 1 or "
        "beta > 0, True makes the ratio and the KL free of dropout noise.",
    )
    # ---------------------------------------------------------------- logging
    log_completions_steps: int = _f(
        10,
        "Every this many steps, write the prompt, completions and rewards of a few samples to completions.jsonl "
        "(aift's report shows them); 0 writes none. TRL's log_completions defaults to off and prints to the console; "
        "aift writes a small file by default because reading completions is how a reward bug is found.",
    )
    num_completions_to_log: int = _f(
        4, "How many prompts (each with its whole group of completions) a completions.jsonl entry holds."
    )

    def __post_init__(self) -> None:
        self.scale_rewards = {True: "group", False: "none"}.get(self.scale_rewards, self.scale_rewards)
        if isinstance(self.rewards, str):  # one spec from key=value
            self.rewards = [self.rewards]
        if isinstance(self.reward_weights, str):  # "1,0.2" from the command line or key=value
            from aift.training.rewards import parse_reward_weights

            self.reward_weights = parse_reward_weights(self.reward_weights)
        _check_choice("scale_rewards", self.scale_rewards, SCALE_REWARDS)
        _check_choice("importance_sampling_level", self.importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
        if self.loss_type in _TRL_ONLY_LOSS_TYPES:
            raise ConfigError(
                f"loss_type={self.loss_type!r} is a TRL loss aift does not implement; use one of "
                f"{', '.join(GRPO_LOSS_TYPES)}"
            )
        _check_choice("loss_type", self.loss_type, GRPO_LOSS_TYPES)
        self._check_numbers()
        self._check_rewards()

    def _check_numbers(self) -> None:
        if self.num_generations < 2:
            raise ConfigError(
                f"num_generations must be >= 2 (advantages compare completions of one prompt), got {self.num_generations}"
            )
        _check_positive(self, "max_completion_length", "num_iterations", "num_completions_to_log")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0 (0 samples greedily), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 keeps all tokens), got {self.top_k}")
        if not 0 <= self.epsilon < 1:
            raise ConfigError(
                f"epsilon must be in [0, 1) (the ratio is clipped below at 1 - epsilon), got {self.epsilon}"
            )
        if self.epsilon_high is not None and self.epsilon_high < 0:
            raise ConfigError(f"epsilon_high must be >= 0, got {self.epsilon_high}")
        if self.delta is not None and self.delta <= 1 + self.resolved_epsilon_high:
            raise ConfigError(f"delta must be > 1 + epsilon_high = {1 + self.resolved_epsilon_high}, got {self.delta}")
        if self.beta < 0:
            raise ConfigError(f"beta must be >= 0, got {self.beta}")
        if self.log_completions_steps < 0:
            raise ConfigError(f"log_completions_steps must be >= 0 (0 logs none), got {self.log_completions_steps}")

    def _check_rewards(self) -> None:
        from aift.training.rewards import parse_reward_spec

        for spec in self.rewards:
            parse_reward_spec(spec)  # syntax only: a python: file is loaded when the run starts
        if self.reward_weights is None:
            return
        if self.rewards and len(self.reward_weights) != len(self.rewards):
            raise ConfigError(
                f"reward_weights has {len(self.reward_weights)} value(s) but there are {len(self.rewards)} reward "
                f"function(s) ({', '.join(self.rewards)}): give one weight per function, in order"
            )

    @property
    def resolved_epsilon_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    @property
    def resolved_reward_weights(self) -> list[float]:
        return list(self.reward_weights) if self.reward_weights is not None else [1.0] * len(self.rewards)


def _check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _check_positive(config, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
