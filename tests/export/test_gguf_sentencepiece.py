"""GGUF export of SentencePiece-style (Llama 2 / Swallow / Mistral v0.1) models and of llama3 rope scaling.

No hub: a tiny SentencePiece BPE model is trained on the repo's Japanese data, wrapped in transformers'
LlamaTokenizer and put on a random 2-layer model; the exported file is read back with transformers.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)

from aift.errors import NotAvailableError
from aift.export.gguf_writer import export_gguf
from aift.export.verify import compare_models, load_gguf, rope_scaling_in_file, verify_gguf

DATA_DIR = Path(__file__).resolve().parents[2] / "data"
# Japanese and English, rare kanji and an emoji (byte fallback), runs of spaces, tabs and special tokens.
TEXTS = [
    "日本で一番高い山は富士山です。標高は3,776メートルです。",
    "Hello world, this is English text.",
    "絵文字も使えます 😀 and 鬱蒼 ∮",
    "  two  spaces\nnew line\ttab ",
    "</s>text after a special token <s> and a<unk>b",
    "",
]
LLAMA2_STYLE_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
)
PROMPT = "日本で一番高い山は"


@pytest.fixture(scope="module")
def sp_tokenizer_dir(tmp_path_factory) -> Path:
    """A SentencePiece BPE model with byte fallback (as Llama 2's), trained on the local data, in a tokenizer folder."""
    import sentencepiece as spm

    lines = []
    for path in sorted(DATA_DIR.glob("*.jsonl")):
        for row in path.read_text(encoding="utf-8").splitlines():
            lines += [v for v in json.loads(row).values() if isinstance(v, str) and v]
    lines += ["Hello world, this is English text with some numbers 12345."] * 20
    folder = tmp_path_factory.mktemp("sp-tokenizer")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(folder / "tokenizer"),
        model_type="bpe",
        vocab_size=1600,  # the Japanese characters alone need ~1200 at this coverage
        character_coverage=0.98,  # rarer characters go through <0xNN> byte fallback
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    (folder / "tokenizer.vocab").unlink()
    # Llama 2's tokenizer_config.json settings.
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def _save_model(folder: Path, tokenizer_dir: Path, *, mistral: bool = False, rope: dict | None = None, keep_sp=True):
    """A random 2-layer, 64-wide model around the tokenizer, saved as an HF folder."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.chat_template = LLAMA2_STYLE_TEMPLATE
    tokenizer.save_pretrained(folder)
    if keep_sp:
        (folder / "tokenizer.model").write_bytes((tokenizer_dir / "tokenizer.model").read_bytes())
    sizes = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
    }
    torch.manual_seed(0)
    if mistral:  # Mistral v0.1: llama layout plus a sliding window longer than any test prompt
        model = MistralForCausalLM(MistralConfig(**sizes, sliding_window=4096))
    else:
        model = LlamaForCausalLM(LlamaConfig(**sizes, **({"rope_parameters": rope} if rope else {})))
    model.save_pretrained(folder)
    return model.eval(), AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module", params=["tokenizer.model", "tokenizer.json only", "mistral v0.1"])
def exported(request, tmp_path_factory, sp_tokenizer_dir):
    folder = tmp_path_factory.mktemp("sp-model")
    model, tokenizer = _save_model(
        folder,
        sp_tokenizer_dir,
        mistral=request.param == "mistral v0.1",
        keep_sp=request.param != "tokenizer.json only",
    )
    path = export_gguf(folder, folder / "model.f32.gguf", quant="f32")
    return request.param, folder, model, tokenizer, path


def test_sentencepiece_tokenizer_reads_back_identically(exported):
    kind, folder, _, tokenizer, path = exported
    assert (folder / "tokenizer.model").is_file() == (kind != "tokenizer.json only")
    gguf_tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    emoji_tokens = tokenizer.convert_ids_to_tokens(tokenizer("😀", add_special_tokens=False)["input_ids"])
    assert all(t.startswith("<0x") for t in emoji_tokens[-4:]), emoji_tokens  # the test covers byte fallback
    for text in TEXTS:
        ids = tokenizer(text)["input_ids"]
        assert gguf_tokenizer(text)["input_ids"] == ids, text
        assert gguf_tokenizer.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids, skip_special_tokens=True)
    assert gguf_tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id  # add_bos written and honoured
    messages = [{"role": "user", "content": "富士山の高さは?"}, {"role": "assistant", "content": "3,776 m です。"}]
    assert gguf_tokenizer.chat_template == LLAMA2_STYLE_TEMPLATE
    assert gguf_tokenizer.apply_chat_template(messages) == tokenizer.apply_chat_template(messages)
    for kind_ in ("bos", "eos", "unk"):
        assert getattr(gguf_tokenizer, f"{kind_}_token") == getattr(tokenizer, f"{kind_}_token")


def test_sentencepiece_metadata_is_what_llama_cpp_reads(exported, sp_tokenizer_dir):
    import sentencepiece as spm

    kind, _, _, tokenizer, path = exported
    reader = gguf.GGUFReader(path)
    assert reader.get_field("tokenizer.ggml.model").contents() == "llama"
    assert reader.get_field("tokenizer.ggml.add_bos_token").contents() is True
    assert reader.get_field("tokenizer.ggml.add_eos_token").contents() is False
    tokens = reader.get_field("tokenizer.ggml.tokens").contents()
    types = reader.get_field("tokenizer.ggml.token_type").contents()
    scores = reader.get_field("tokenizer.ggml.scores").contents()
    assert len(tokens) == len(types) == len(scores) == len(tokenizer)
    assert [tokens[i] for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert types[1] == types[2] == gguf.TokenType.CONTROL
    assert all(types[i] == gguf.TokenType.BYTE for i, t in enumerate(tokens) if t.startswith("<0x"))
    assert sum(t == gguf.TokenType.BYTE for t in types) == 256
    sp = spm.SentencePieceProcessor(model_file=str(sp_tokenizer_dir / "tokenizer.model"))
    normal = [i for i, t in enumerate(types) if t == gguf.TokenType.NORMAL]
    if kind != "tokenizer.json only":
        assert all(scores[i] == pytest.approx(sp.GetScore(i)) for i in normal)
    else:  # derived from the merges: the same ranking of merged pieces as SentencePiece's own scores
        merged = [i for i in normal if len(tokens[i]) > 1]
        assert np.array_equal(np.argsort([-scores[i] for i in merged]), np.argsort([-sp.GetScore(i) for i in merged]))


@torch.inference_mode()
def test_sentencepiece_model_reads_back_exactly(exported):
    kind, _, model, tokenizer, path = exported
    gguf_model, gguf_tokenizer = load_gguf(path)
    report = compare_models(model, tokenizer, gguf_model, gguf_tokenizer, PROMPT + " and English 😀")
    assert report["tokens_match"] and report["greedy_match"], report
    assert report["max_abs_logit_diff"] < 1e-4


def test_legacy_tokenizer_exports_with_a_warning(tmp_path, sp_tokenizer_dir, caplog):
    """legacy=True puts ▁ after special tokens, as llama.cpp does; transformers' GGUF reader does not."""
    _, _ = _save_model(tmp_path, sp_tokenizer_dir)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "legacy": True}))
    with caplog.at_level(logging.WARNING, logger="aift.export.gguf_tokenizer"):
        path = export_gguf(tmp_path, tmp_path / "legacy.gguf", quant="f32")
    assert "legacy=True" in caplog.text
    legacy = AutoTokenizer.from_pretrained(tmp_path)
    gguf_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in TEXTS[:4]:  # no special token inside the text: identical
        assert gguf_tokenizer(text)["input_ids"] == legacy(text)["input_ids"], text


def test_unigram_tokenizer_is_refused_naming_the_supported_kinds(tmp_path, sp_tokenizer_dir):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    _save_model(tmp_path, sp_tokenizer_dir, keep_sp=False)
    vocab = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0), ("▁", -1.0), ("a", -2.0), ("▁a", -3.0)]
    backend = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).unlink()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>").save_pretrained(tmp_path)
    with pytest.raises(NotAvailableError, match="Unigram.*byte-level BPE.*SentencePiece BPE.*convert_hf_to_gguf"):
        export_gguf(tmp_path, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


# ---------------------------------------------------------------------------------------------- rope scaling

# original_max_position_embeddings 64 puts head_dim 16's 8 frequencies in all three llama3 ranges
# (kept, blended, divided by 8), and a 120-token prompt runs past it.
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
    "rope_theta": 10000.0,
}


@pytest.fixture(scope="module")
def llama3_export(tmp_path_factory, sp_tokenizer_dir):
    folder = tmp_path_factory.mktemp("llama3-rope")
    model, tokenizer = _save_model(folder, sp_tokenizer_dir, rope=LLAMA3_ROPE)
    return folder, model, tokenizer, export_gguf(folder, folder / "model.f32.gguf", quant="f32")


def test_llama3_rope_freqs_are_transformers_frequencies(llama3_export):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    _, model, _, path = llama3_export
    stored = {t.name: t for t in gguf.GGUFReader(path).tensors}["rope_freqs.weight"]
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](model.config, "cpu")
    default = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    factors = np.asarray(stored.data)
    # llama.cpp divides each default frequency by its factor; that must give transformers' llama3 frequencies.
    np.testing.assert_allclose(factors, (default / scaled).numpy(), rtol=1e-6)
    assert factors[0] == 1.0 and factors[-1] == 8.0 and 1.0 < factors[1] < 8.0
    assert rope_scaling_in_file(model.config, path) is True


@torch.inference_mode()
def test_llama3_export_reads_back_with_its_rope(llama3_export):
    folder, model, tokenizer, path = llama3_export
    ids = torch.randint(3, len(tokenizer), (1, 120), generator=torch.Generator().manual_seed(0))
    # transformers' reader drops the rope scaling (it has no llama rope_freqs support): visibly different...
    plain = AutoModelForCausalLM.from_pretrained(folder, gguf_file=path.name, dtype=torch.float32).eval()
    assert plain.config.rope_parameters["rope_type"] == "default"
    assert (plain(ids).logits - model(ids).logits).abs().max() > 1e-4
    # ...so the read-back check puts the source's rope back once the file is shown to hold it: then it is exact.
    report = verify_gguf(folder, path, "f32", prompt=PROMPT * 16)  # past original_max_position_embeddings
    assert report["rope_scaling_in_file"] is True and report["passed"], report
    assert report["max_abs_logit_diff"] < 1e-5


@pytest.mark.parametrize(
    ("rope_type", "reason"), [("yarn", "does not write it yet"), ("dynamic", "no dynamic NTK"), ("longrope", "Phi-3")]
)
def test_other_rope_scalings_are_refused(tmp_path, rope_type, reason):
    config = {"architectures": ["LlamaForCausalLM"], "rope_scaling": {"rope_type": rope_type, "factor": 2.0}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(NotAvailableError, match=f"{rope_type}.*{reason}.*default, linear and llama3"):
        export_gguf(tmp_path, tmp_path / "x.gguf")


def test_linear_rope_scaling_is_in_the_metadata(tmp_path, sp_tokenizer_dir):
    model, _ = _save_model(tmp_path, sp_tokenizer_dir, rope={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4})
    path = export_gguf(tmp_path, tmp_path / "linear.gguf", quant="f32")
    reader = gguf.GGUFReader(path)
    assert reader.get_field("llama.rope.scaling.type").contents() == "linear"
    assert reader.get_field("llama.rope.scaling.factor").contents() == 2.0
    assert "rope_freqs.weight" not in {t.name for t in reader.tensors}
    assert rope_scaling_in_file(model.config, path) is True


def test_added_tokens_and_padded_vocabulary_read_back(tmp_path, sp_tokenizer_dir):
    """Swallow / ELYZA-style: tokens added after tokenizer.model's, and a model vocabulary padded beyond them."""
    tokenizer = AutoTokenizer.from_pretrained(sp_tokenizer_dir)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.add_tokens(["<|user|>", "東京都"])
    folder = tmp_path / "extended"
    tokenizer.save_pretrained(folder)
    (folder / "tokenizer.model").write_bytes((sp_tokenizer_dir / "tokenizer.model").read_bytes())
    sizes = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer) + 5, **sizes)).save_pretrained(folder)
    source = AutoTokenizer.from_pretrained(folder)
    path = export_gguf(folder, folder / "extended.gguf", quant="f32")
    reader = gguf.GGUFReader(path)
    tokens = reader.get_field("tokenizer.ggml.tokens").contents()
    types = reader.get_field("tokenizer.ggml.token_type").contents()
    assert len(tokens) == len(tokenizer) + 5 and tokens[-1] == f"[PAD{len(tokens) - 1}]"
    assert types[-1] == gguf.TokenType.UNUSED
    assert types[source.convert_tokens_to_ids("<pad>")] == gguf.TokenType.CONTROL
    assert types[source.convert_tokens_to_ids("<|user|>")] == gguf.TokenType.USER_DEFINED
    gguf_tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=path.name)
    for text in [*TEXTS, "<|user|>東京都に住んでいます<pad>", "a <|user|> b 東京都庁"]:
        assert gguf_tokenizer(text)["input_ids"] == source(text)["input_ids"], text
    assert gguf_tokenizer.pad_token == "<pad>"
