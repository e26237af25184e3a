"""The fused linear cross-entropy equals the plain `F.cross_entropy(hidden @ W.T)` in loss and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aift.errors import NotAvailableError
from aift.training.loss import (
    IGNORE_INDEX,
    causal_lm_loss_sum,
    fused_linear_cross_entropy,
    shifted_cross_entropy_sum,
    split_causal_lm,
)


def plain_loss_sum(hidden, weight, labels):
    logits = (hidden[..., :-1, :] @ weight.T).float()
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels[..., 1:].reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def make_inputs(dtype=torch.float32, batch=3, length=37, hidden=48, vocab=301, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, length, hidden, generator=g).to(dtype)
    w = (torch.randn(vocab, hidden, generator=g) * 0.2).to(dtype)
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    labels[0, :5] = IGNORE_INDEX  # a masked prompt
    labels[1, -9:] = IGNORE_INDEX  # padding
    labels[2, ::4] = IGNORE_INDEX  # scattered
    return h, w, labels


def grads(fn, h, w, labels, weight_grad=True):
    h = h.clone().requires_grad_(True)
    w = w.clone().requires_grad_(weight_grad)
    loss = fn(h, w, labels)
    (loss * 0.37).backward()  # a non-unit upstream gradient, as a caller dividing by its token count gives
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 1000])
def test_fp32_loss_and_gradients_match_plain_path(chunk_size):
    h, w, labels = make_inputs()
    loss, gh, gw = grads(lambda *a: fused_linear_cross_entropy(*a, chunk_size=chunk_size), h, w, labels)
    ref_loss, ref_gh, ref_gw = grads(plain_loss_sum, h, w, labels)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh, ref_gh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-5, atol=1e-6)
    assert gh[0, :4].abs().sum() == 0  # positions whose target is ignored get no gradient


def test_frozen_weight_gets_no_gradient_and_hidden_gradient_still_matches():
    h, w, labels = make_inputs(seed=1)
    loss, gh, gw = grads(lambda *a: fused_linear_cross_entropy(*a, chunk_size=10), h, w, labels, weight_grad=False)
    ref_loss, ref_gh, _ = grads(plain_loss_sum, h, w, labels, weight_grad=False)
    assert gw is None
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh, ref_gh, rtol=1e-5, atol=1e-6)


def assert_as_close_as_plain(ours, plain, exact):
    """Our bf16 result is within bf16 tolerance of the exact one, and not much further from it than the plain path."""
    our_err = (ours.float() - exact).abs().max()
    plain_err = (plain.float() - exact).abs().max()
    assert our_err <= 2 * plain_err + 1e-4, (our_err, plain_err)
    assert our_err <= 2e-2 * exact.abs().max()


def test_bf16_inputs_match_plain_path_within_bf16_tolerance():
    h, w, labels = make_inputs(dtype=torch.bfloat16, seed=2)
    loss, gh, gw = grads(lambda *a: fused_linear_cross_entropy(*a, chunk_size=13), h, w, labels)
    _, plain_gh, plain_gw = grads(plain_loss_sum, h, w, labels)
    exact_loss, exact_gh, exact_gw = grads(plain_loss_sum, h.float(), w.float(), labels)
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    torch.testing.assert_close(loss, exact_loss, rtol=2e-3, atol=1e-2)
    assert_as_close_as_plain(gh, plain_gh, exact_gh)
    assert_as_close_as_plain(gw, plain_gw, exact_gw)


def test_under_autocast_matches_plain_autocast_path():
    h, w, labels = make_inputs(seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, gh, gw = grads(lambda *a: fused_linear_cross_entropy(*a, chunk_size=64), h, w, labels)
        plain_loss, plain_gh, plain_gw = grads(plain_loss_sum, h, w, labels)
    _, exact_gh, exact_gw = grads(plain_loss_sum, h, w, labels)
    assert gh.dtype == torch.float32 and gw.dtype == torch.float32  # gradients in the parameters' dtype
    torch.testing.assert_close(loss, plain_loss, rtol=2e-3, atol=1e-2)
    assert_as_close_as_plain(gh, plain_gh, exact_gh)
    assert_as_close_as_plain(gw, plain_gw, exact_gw)


def test_all_ignored_gives_zero_loss_and_zero_gradient():
    h, w, labels = make_inputs(seed=4)
    labels[:] = IGNORE_INDEX
    loss, gh, gw = grads(lambda *a: fused_linear_cross_entropy(*a, chunk_size=8), h, w, labels)
    assert loss.item() == 0 and gh.abs().sum() == 0 and gw.abs().sum() == 0


def test_rejects_non_positive_chunk_size():
    h, w, labels = make_inputs()
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_cross_entropy(h, w, labels, chunk_size=0)


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")


def test_causal_lm_loss_sum_equals_the_models_own_loss_for_a_lora_model(tiny_model):
    """On a peft LoRA model with a packed 4-D mask: same loss and same adapter gradients as model(...).loss."""
    import copy

    from peft import LoraConfig, get_peft_model

    from aift.data.packing import PackedCollator

    torch.manual_seed(0)
    model = get_peft_model(copy.deepcopy(tiny_model), LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))
    for name, p in model.named_parameters():  # non-zero B so that the adapters' gradients are non-trivial
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    rows = [
        [{"input_ids": list(range(5, 25)), "labels": [IGNORE_INDEX] * 4 + list(range(9, 25))}] * 2,
        [{"input_ids": list(range(30, 61)), "labels": list(range(30, 61))}],
    ]
    batch = PackedCollator(pad_token_id=0, max_length=64)(rows)
    n = batch["num_trained_tokens"]

    fused = causal_lm_loss_sum(model, batch, chunk_size=9) / n
    fused.backward()
    fused_grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "labels")}
    plain = model(**inputs).loss  # transformers: mean over trained tokens
    plain.backward()
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    for k, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(fused_grads[k], p.grad, rtol=1e-4, atol=1e-7, msg=k)


def test_split_causal_lm_rejects_an_adapted_lm_head(tiny_model):
    import copy

    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(tiny_model), LoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(NotAvailableError, match="loss_chunk_size"):
        split_causal_lm(model)


def test_no_grad_computes_the_loss_only():
    h, w, labels = make_inputs(seed=5)
    h.requires_grad_(True)
    with torch.no_grad():
        loss = fused_linear_cross_entropy(h, w.requires_grad_(True), labels, chunk_size=8)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, plain_loss_sum(h, w, labels).detach(), rtol=1e-5, atol=1e-5)


def test_split_causal_lm_rejects_what_is_not_a_causal_lm(tiny_model):
    wrapper = torch.nn.Sequential(tiny_model)  # neither a transformers model nor a DDP-style `.module` wrapper
    with pytest.raises(NotAvailableError, match="needs a transformers causal LM"):
        split_causal_lm(wrapper)


def test_fused_loss_runs_through_a_ddp_style_wrapper_forward(tiny_model):
    """DDP syncs gradients in its own forward, so the fused loss must call the wrapper, not the decoder."""

    class Wrapper(torch.nn.Module):  # the shape of DistributedDataParallel: .module, forward passes through
        def __init__(self, module):
            super().__init__()
            self.module, self.calls = module, 0

        def forward(self, *args, **kwargs):
            self.calls += 1
            return self.module(*args, **kwargs)

    ids = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    wrapper = Wrapper(tiny_model)
    fused = causal_lm_loss_sum(wrapper, batch, chunk_size=7)
    assert wrapper.calls == 1
    torch.testing.assert_close(fused, causal_lm_loss_sum(tiny_model, batch, chunk_size=7))
    plain = tiny_model(input_ids=ids, labels=ids).loss * (ids.shape[1] - 1) * ids.shape[0]
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-4)


def test_shifted_sum_is_the_token_sum_of_transformers_mean_loss(tiny_model_dir):
    """The loops' and eval's loss sum, divided by the trained tokens, is the mean loss transformers computes."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.randint(0, 1000, (2, 19), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[0, :6] = IGNORE_INDEX
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
    trained = int((labels[:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(shifted_cross_entropy_sum(out.logits, labels) / trained, out.loss, atol=1e-5, rtol=1e-5)
    h, w, lab = make_inputs()
    torch.testing.assert_close(shifted_cross_entropy_sum(h @ w.T, lab), plain_loss_sum(h, w, lab))
