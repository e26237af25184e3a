"""GGUF export read back with transformers: the file computes what its source computes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from post_helpers import PROBE
from transformers import AutoModelForCausalLM

from aift.errors import AiftError
from aift.export.gguf_writer import GGUFExportError, _permute_for_rope, export_gguf
from aift.export.verify import compare_models, compare_to_reference, load_gguf


# The files are exported once per session (conftest.py): test_gguf_llama_cpp.py reads the same ones.
@pytest.fixture(scope="module")
def embedded_f16(embedded_gguf):
    return embedded_gguf["f16"], *load_gguf(embedded_gguf["f16"])


@pytest.fixture(scope="module")
def embedded_q8(embedded_gguf):
    return embedded_gguf["q8_0"], *load_gguf(embedded_gguf["q8_0"])


def _rounded_to_f16(model):
    """The source with every 2-D weight rounded through f16 (norms stay f32, as in the file)."""
    copy = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    state = {k: (v.half().float() if v.dim() == 2 else v) for k, v in model.state_dict().items()}
    copy.load_state_dict(state)
    return copy.eval()


@pytest.mark.slow
@torch.inference_mode()
def test_f16_export_reads_back_as_the_source(embedded_f16, embedded_reference, embedded_model, tokenizer):
    path, model, gguf_tokenizer = embedded_f16
    report = compare_to_reference(embedded_reference, model, gguf_tokenizer)
    assert report["tokens_match"]
    assert report["greedy_match"], report
    assert "Paris" in report["exported_text"]
    assert report["max_abs_logit_diff"] < 0.1
    # Exactly the source's weights rounded to f16: nothing permuted, transposed or dropped on the way.
    ids = tokenizer(PROBE, return_tensors="pt", add_special_tokens=False)["input_ids"]
    assert (model(ids).logits - _rounded_to_f16(embedded_model)(ids).logits).abs().max() < 1e-3
    assert gguf_tokenizer.chat_template == tokenizer.chat_template
    assert gguf_tokenizer.eos_token == "<|im_end|>" and model.config.tie_word_embeddings
    text = "日本語のテキスト 123 and English, with <|im_start|> tokens\n\n  spaces"
    assert gguf_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]


@pytest.mark.slow
@torch.inference_mode()
def test_q8_0_export_keeps_the_greedy_answer(embedded_q8, embedded_f16, embedded_reference):
    path, model, gguf_tokenizer = embedded_q8
    report = compare_to_reference(embedded_reference, model, gguf_tokenizer)
    print(f"q8_0: mean KL {report['mean_kl']:.2e}, max |logit diff| {report['max_abs_logit_diff']:.3f}")
    assert report["greedy_match"] and "Paris" in report["exported_text"]
    assert 0 < report["mean_kl"] < 0.01
    assert path.stat().st_size < 0.6 * embedded_f16[0].stat().st_size


@torch.inference_mode()
def test_f32_export_of_a_merged_model_is_exact(tmp_path, tiny_merged, tokenizer):
    import gguf

    path = export_gguf(tiny_merged, tmp_path / "merged.f32.gguf", quant="f32")
    source = AutoModelForCausalLM.from_pretrained(tiny_merged, dtype=torch.float32).eval()
    # The model alone (the file's tokenizer is checked on the embedded model; reading it costs seconds).
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    for name, tensor in source.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    report = compare_models(source, tokenizer, model, tokenizer, PROBE)
    assert report["max_abs_logit_diff"] < 1e-4 and report["greedy_match"]
    # The file holds q_proj in llama.cpp's rotary layout (the reader un-permutes it), not HF's.
    stored = {t.name: t for t in gguf.GGUFReader(path).tensors}["blk.0.attn_q.weight"]
    hf_q = source.state_dict()["model.layers.0.self_attn.q_proj.weight"].numpy()
    on_disk = np.asarray(stored.data).reshape(hf_q.shape)
    assert np.array_equal(on_disk, _permute_for_rope(hf_q, source.config.num_attention_heads))
    assert not np.array_equal(on_disk, hf_q)


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(GGUFExportError, match="LlamaForCausalLM.*MistralForCausalLM"):
        export_gguf(tmp_path, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_failed_export_leaves_nothing_behind(tmp_path, tiny_merged):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "model.safetensors"):  # no tokenizer: fails after the file was opened
        (broken / name).write_bytes((tiny_merged / name).read_bytes())
    with pytest.raises(AiftError, match="tokenizer"):
        export_gguf(broken, tmp_path / "out.gguf", quant="q8_0")
    assert [p.name for p in tmp_path.iterdir()] == ["broken"]


def test_quantized_folder_and_bad_quant_are_refused(tmp_path, tiny_merged):
    config = json.loads((tiny_merged / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "quantization_config": {"load_in_4bit": True}}))
    with pytest.raises(GGUFExportError, match="bitsandbytes"):
        export_gguf(tmp_path, tmp_path / "x.gguf")
    with pytest.raises(GGUFExportError, match="q8_0"):
        export_gguf(tiny_merged, tmp_path / "x.gguf", quant="q4_k")
