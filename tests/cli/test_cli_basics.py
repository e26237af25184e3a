import subprocess
import sys
from importlib.metadata import version

from aift.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "aift", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("prepare", "train", "eval", "models", "recommend", "export"):
        assert name in out


def test_unknown_command_suggests(capsys):
    assert main(["trian"]) == 2
    assert "did you mean 'train'" in capsys.readouterr().err


def test_models_and_recommend(capsys):
    assert main(["models"]) == 0
    assert "elyza/Llama-3-ELYZA-JP-8B" in capsys.readouterr().out
    assert main(["recommend", "--gpu-memory", "24"]) == 0
    out = capsys.readouterr().out
    assert "elyza/Llama-3-ELYZA-JP-8B" in out and "Full/LoRA" in out


def test_login_stores_token_0600_and_never_echoes(tmp_path):
    import os

    env = {**os.environ, "HF_HOME": str(tmp_path)}
    p = subprocess.run(
        [sys.executable, "-m", "aift", "login", "--token-stdin"],
        input="hf_secret123\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    token = tmp_path / "token"
    assert token.read_text() == "hf_secret123"
    assert oct(token.stat().st_mode & 0o777) == "0o600"
    assert "hf_secret123" not in p.stdout + p.stderr


def test_python_m_and_missing_model_error():
    p = run_cli("--version")
    assert p.returncode == 0 and p.stdout == f"aift {version('aift')}\n"
