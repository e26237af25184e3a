"""aift's preference losses against TRL's own code (trl 1.16) on the same tensors: values and gradients.

TRL's trainers compute their losses inside methods that also run the model; those methods are called here on
a trainer object built without ``__init__`` and on a stand-in model that returns fixed per-token log-probs,
so that TRL's formulas (not a copy of them) are what aift is compared with.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from aift.training.objectives.kto import kto_loss
from aift.training.objectives.logps import reference_mode, sequence_logps
from aift.training.objectives.pairs import PairObjective, PreferenceConfig, dpo_loss, orpo_loss, simpo_loss

B, T = 4, 9


def _per_token(seed: int, n: int = 2 * B) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs [n, T-1] (0 outside the answers) and the completion mask [n, T]."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n, T, dtype=torch.long)
    for i in range(n):
        start = int(torch.randint(2, 5, (1,), generator=g))
        end = int(torch.randint(start + 1, T + 1, (1,), generator=g))
        mask[i, start:end] = 1
    logps = -torch.rand(n, T - 1, generator=g, dtype=torch.float64) * 3
    return (logps * mask[:, 1:]).requires_grad_(), mask


class _FixedLogps:
    """A stand-in model: returns the given per-token log-probs for each input_ids tensor."""

    def __init__(self, table: dict[int, torch.Tensor]) -> None:
        self.table = table
        self.training = True

    def __call__(self, input_ids, **kwargs):
        logps = self.table[id(input_ids)]
        zeros = torch.zeros(logps.shape[0], logps.shape[1] + 1)
        return SimpleNamespace(log_probs=logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def _bare(cls, **attrs):
    from accelerate import Accelerator

    trainer = object.__new__(cls)
    trainer.accelerator = Accelerator(cpu=True)
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens, trainer._tp_size = 0, 1
    trainer.aux_loss_enabled = False
    for key, value in attrs.items():
        setattr(trainer, key, value)
    return trainer


@pytest.mark.parametrize(
    ("loss_type", "label_smoothing", "beta"),
    [("sigmoid", 0.0, 0.1), ("robust", 0.1, 0.1), ("ipo", 0.0, 0.1), ("hinge", 0.0, 0.5)],
)
def test_dpo_loss_and_gradient_equal_trl_dpo_trainer(loss_type, label_smoothing, beta):
    from trl import DPOTrainer

    logps, mask = _per_token(0)
    ref = -torch.rand(2 * B, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 10
    inputs = {
        "input_ids": torch.zeros(2 * B, T, dtype=torch.long),
        "attention_mask": torch.ones(2 * B, T, dtype=torch.long),
        "completion_mask": mask,
        "ref_chosen_logps": ref[:B],
        "ref_rejected_logps": ref[B:],
    }
    model = _FixedLogps({id(inputs["input_ids"]): logps})
    trainer = _bare(
        DPOTrainer,
        model=model,
        beta=beta,
        loss_types=[loss_type],
        loss_weights=[1.0],
        label_smoothing=label_smoothing,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        use_weighting=False,
    )
    trl_loss = trainer._compute_loss(model, inputs, return_outputs=False)
    (trl_grad,) = torch.autograd.grad(trl_loss, logps)

    sums, lengths = logps.sum(1), mask.sum(1)
    out = dpo_loss(sums[:B], sums[B:], ref[:B], ref[B:], beta, loss_type, label_smoothing, lengths[:B], lengths[B:])
    ours = out.losses.mean()
    (our_grad,) = torch.autograd.grad(ours, logps)
    assert abs(ours.item() - trl_loss.item()) < 1e-6
    assert torch.allclose(our_grad, trl_grad, atol=1e-8)
    metrics = trainer._metrics["train"]
    assert abs(out.chosen_rewards.mean().item() - metrics["rewards/chosen"][0]) < 1e-6
    assert (
        abs((out.chosen_rewards > out.rejected_rewards).float().mean().item() - metrics["rewards/accuracies"][0]) < 1e-6
    )


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_simpo_loss_and_gradient_equal_trl_cpo_trainer(label_smoothing):
    from trl.experimental.cpo import CPOTrainer

    avg = (-torch.rand(2 * B, dtype=torch.float64) * 2).requires_grad_()
    trainer = _bare(
        CPOTrainer, alpha=0.0, beta=2.0, simpo_gamma=0.5, label_smoothing=label_smoothing, loss_type="simpo"
    )
    trl_losses, trl_chosen, _ = trainer.cpo_loss(avg[:B], avg[B:])
    (trl_grad,) = torch.autograd.grad(trl_losses.mean(), avg)
    out = simpo_loss(avg[:B], avg[B:], beta=2.0, gamma=0.5, label_smoothing=label_smoothing)
    (our_grad,) = torch.autograd.grad(out.losses.mean(), avg)
    assert abs(out.losses.mean().item() - trl_losses.mean().item()) < 1e-8
    assert torch.allclose(our_grad, trl_grad) and torch.allclose(out.chosen_rewards, trl_chosen)


def test_orpo_loss_and_gradient_equal_trl_orpo_trainer():
    """TRL's ORPO loss is nll - mean(beta * log sigmoid(log odds)); aift's NLL is that of the chosen answer."""
    from trl.experimental.orpo import ORPOTrainer

    avg = (-torch.rand(2 * B, dtype=torch.float64) * 2 - 0.01).requires_grad_()
    trainer = _bare(ORPOTrainer, beta=0.1)
    ratio_losses, *_ = trainer.odds_ratio_loss(avg[:B], avg[B:])
    trl_loss = -avg[:B].mean() - ratio_losses.mean()
    (trl_grad,) = torch.autograd.grad(trl_loss, avg)
    ours = orpo_loss(avg[:B], avg[B:], beta=0.1).losses.mean()
    (our_grad,) = torch.autograd.grad(ours, avg)
    assert abs(ours.item() - trl_loss.item()) < 1e-6
    assert torch.allclose(our_grad.double(), trl_grad, atol=1e-6)


def test_kto_loss_and_gradient_equal_trl_kto_trainer():
    from trl import KTOTrainer

    logps, mask = _per_token(2, n=B)
    kl_logps, kl_mask = _per_token(3, n=B)
    g = torch.Generator().manual_seed(4)
    ref, ref_kl = -torch.rand(B, generator=g, dtype=torch.float64) * 10, -torch.rand(B, generator=g) * 10
    label = torch.tensor([True, False, True, False])
    batch = {
        "input_ids": torch.zeros(B, T, dtype=torch.long),
        "attention_mask": torch.ones(B, T, dtype=torch.long),
        "completion_mask": mask,
        "KL_input_ids": torch.zeros(B, T, dtype=torch.long),
        "KL_attention_mask": torch.ones(B, T, dtype=torch.long),
        "KL_completion_mask": kl_mask,
        "label": label,
        "ref_logps": ref,
        "ref_KL_logps": ref_kl.double(),
    }
    model = _FixedLogps({id(batch["input_ids"]): logps, id(batch["KL_input_ids"]): kl_logps.detach()})
    trainer = _bare(
        KTOTrainer,
        model=model,
        beta=0.1,
        desirable_weight=1.0,
        undesirable_weight=1.5,
        loss_type="kto",
        calculate_KL=True,
        precompute_ref_logps=True,
    )
    trl_loss = trainer._compute_loss(model, batch, return_outputs=False)
    (trl_grad,) = torch.autograd.grad(trl_loss, logps)
    kl = (kl_logps.detach().sum(1) - ref_kl.double()).mean()
    losses, _ = kto_loss(logps.sum(1), ref, label, kl, beta=0.1, desirable_weight=1.0, undesirable_weight=1.5)
    (our_grad,) = torch.autograd.grad(losses.mean(), logps)
    assert abs(losses.mean().item() - trl_loss.item()) < 1e-6
    assert torch.allclose(our_grad, trl_grad, atol=1e-8)


def test_sequence_logps_equal_trl_batch_logps_on_a_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM
    from trl.experimental.cpo import CPOTrainer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = torch.randint(0, 1000, (3, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :5] = -100
    labels[1, 9:] = -100
    logits = model(input_ids=ids).logits
    sums, lengths = sequence_logps(logits, labels)
    assert torch.allclose(sums, CPOTrainer.get_batch_logps(logits, labels), atol=1e-5)
    assert torch.allclose(sums / lengths, CPOTrainer.get_batch_logps(logits, labels, average_log_prob=True), atol=1e-5)


def test_reference_with_the_adapter_disabled_equals_a_frozen_copy(tiny_model_dir):
    """The LoRA reference costs no second model: the base with the adapter off gives the frozen copy's logps."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    frozen = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    policy = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    policy.train()
    # Two rows per pair, so that the frozen copy below reads the same batch (prompt sharing: test_prompt_sharing).
    objective = PairObjective(PreferenceConfig(method="dpo", share_prompt=False), pad_token_id=0)
    rows = [
        {"chosen_input_ids": [5, 6, 7, 8, 9], "chosen_labels": [-100, -100, 7, 8, 9],
         "rejected_input_ids": [5, 6, 7, 10], "rejected_labels": [-100, -100, 7, 10]},
        {"chosen_input_ids": [11, 12, 13], "chosen_labels": [-100, 12, 13],
         "rejected_input_ids": [11, 12, 14, 15, 16, 17], "rejected_labels": [-100, 12, 14, 15, 16, 17]},
    ]  # fmt: skip
    batch = objective.collate(rows)
    ref, _ = objective.reference_logps(policy, batch, contextlib.nullcontext)
    with torch.no_grad():
        expected, _ = sequence_logps(frozen(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                     batch["labels"])  # fmt: skip
        adapted, _ = sequence_logps(policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                    batch["labels"])  # fmt: skip
    assert torch.allclose(ref, expected, atol=1e-5)
    assert not torch.allclose(adapted, expected, atol=1e-3)  # the adapter does change the model
    assert policy.training  # reference_mode gave the train mode back
    with reference_mode(policy):
        assert not policy.training
