"""aift's filters drop the known library messages that tell a user nothing, and only those, in the CLI and the API."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings

from optional_pieces import import_optional

from aift.utils.library_noise import install_filters


def test_only_the_known_messages_are_dropped(caplog):
    install_filters()
    install_filters()  # twice, as two runs in one process would
    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    assert len(bnb.filters) == 1
    with caplog.at_level(logging.WARNING):
        bnb.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "No module")
        bnb.warning("4-bit kernel failed on this input")
        logging.getLogger("DeepSpeed").warning("Setting accelerator to CPU. If you have GPU ...")
        logging.getLogger("DeepSpeed").warning("ZeRO stage 3 needs more memory")
    assert [r.getMessage() for r in caplog.records] == [
        "4-bit kernel failed on this input",
        "ZeRO stage 3 needs more memory",
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        install_filters()  # after simplefilter: its filter goes first
        from transformers import AutoConfig, AutoModelForCausalLM

        sizes = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=32)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", num_key_value_heads=1, **sizes))
        model.gradient_checkpointing_enable()
        assert model.is_gradient_checkpointing
        warnings.warn("`something_else` is deprecated", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["`something_else` is deprecated"]


def test_deepspeed_import_says_nothing_on_a_cpu():
    """DeepSpeed logs its accelerator choice to stdout when it is imported (aift imports it for strategy=deepspeed)."""
    import_optional("deepspeed", "DeepSpeed is not installed (make test installs it)")
    code = "from aift.utils.library_noise import install_filters; install_filters(); import deepspeed; print('ok')"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Setting accelerator to CPU" not in run.stdout + run.stderr and run.stdout.endswith("ok\n")


# The first use of the Python API converts the embedded model and saves it with save_pretrained, whose
# unwrap (accelerate's extract_model_from_parallel) imports deepspeed when it is installed: DeepSpeed then
# printed "Setting accelerator to CPU" on stdout. A tiny model's save_pretrained takes the same import path in
# seconds instead of the conversion's ~45 s; the subprocess starts with deepspeed unimported and an empty cache.
FIRST_SAVE = """
import sys
from aift.models import embedded
from transformers import LlamaConfig, LlamaForCausalLM
assert "deepspeed" not in sys.modules
sizes = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=32)
model = LlamaForCausalLM(LlamaConfig(num_key_value_heads=1, **sizes))
model.save_pretrained(embedded.aift_home() / "models" / "tiny")
print("deepspeed imported:", "deepspeed" in sys.modules)
"""


def test_the_api_first_save_says_nothing_on_a_cpu(tmp_path):
    import_optional("deepspeed", "DeepSpeed is not installed (make test installs it)")
    env = {**os.environ, "AIFT_HOME": str(tmp_path / "aift-home")}
    run = subprocess.run([sys.executable, "-c", FIRST_SAVE], capture_output=True, text=True, timeout=180, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.splitlines()[-1] == "deepspeed imported: True"  # the path that printed it was taken
    assert "Setting accelerator to CPU" not in run.stdout + run.stderr
