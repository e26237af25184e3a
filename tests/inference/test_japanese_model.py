import pytest
import torch

from aift import JapaneseModel
from aift.models.loading import ModelNotAvailableError, RemoteCodeRequiredError, resolve_model_path


@pytest.fixture(scope="module")
def jm(embedded_model, tokenizer):
    m = JapaneseModel()
    m.model, m.tokenizer = embedded_model, tokenizer  # reuse the session's loaded model
    return m


def test_embedded_model_answers_paris(jm):
    answer = jm.generate_japanese("What is the capital of France?", do_sample=False, max_new_tokens=20)
    assert "Paris" in answer
    assert "<|im_start|>" not in answer and "France?" not in answer  # only the new text


def test_load_model_from_scratch_and_tokenizer_pad(embedded_dir):
    m = JapaneseModel(str(embedded_dir), device="cpu")
    tok = m.load_tokenizer()
    assert tok.pad_token is not None
    model = m.load_model()
    assert model.dtype == torch.float32 and model.config.model_type == "llama"
    assert m.load_model() is model  # cached


def test_build_prompt_uses_chat_template_or_japanese_template(jm, tiny_model_dir, tokenizer):
    assert jm.build_prompt("質問").startswith("<|im_start|>")
    no_template = JapaneseModel(str(tiny_model_dir))
    tokenizer_copy = no_template.load_tokenizer()
    tokenizer_copy.chat_template = None
    assert no_template.build_prompt("要約して", "本文") == "### 指示:\n要約して\n\n### 入力:\n本文\n\n### 応答:\n"


def test_tiny_model_generates(tiny_model_dir):
    m = JapaneseModel(str(tiny_model_dir))
    out = m.generate_japanese("こんにちは", max_new_tokens=5, do_sample=False)
    assert isinstance(out, str)


def test_missing_model_gives_one_clear_error():
    with pytest.raises(ModelNotAvailableError) as e:
        JapaneseModel("meta-llama/Llama-2-7b-hf").load_tokenizer()
    msg = str(e.value)
    assert "meta-llama/Llama-2-7b-hf" in msg and "gated" in msg and "HF_TOKEN" in msg and "aift models" in msg
    with pytest.raises(ModelNotAvailableError, match="does not exist"):
        resolve_model_path("./no/such/folder")


def test_remote_code_models_need_opt_in():
    with pytest.raises(RemoteCodeRequiredError, match="--trust-remote-code"):
        JapaneseModel("stabilityai/japanese-stablelm-3b-4e1t-instruct").load_tokenizer()


def test_load_with_fallback(tiny_model_dir, caplog):
    m = JapaneseModel("org/does-not-exist")
    assert m.load_with_fallback([str(tiny_model_dir)])
    assert m.model_name == str(tiny_model_dir) and m.model is not None
    assert "org/does-not-exist" in caplog.text
    assert not JapaneseModel("org/nope").load_with_fallback(["org/nope-either"])


def test_list_supported_models():
    assert "elyza/Llama-3-ELYZA-JP-8B" in JapaneseModel.list_supported_models()


def test_load_in_4bit_on_cpu(tiny_model_dir):
    import bitsandbytes  # noqa: F401  (the quant extra: `make setup` installs it; missing is a failure)

    m = JapaneseModel(str(tiny_model_dir), load_in_4bit=True)
    model = m.load_model()
    assert any("4bit" in type(mod).__name__ for mod in model.modules())
    assert isinstance(m.generate_japanese("hi", max_new_tokens=3, do_sample=False), str)
