"""The real CLI: inspect and count output, JSON keys, and one-line errors with exit code 2."""

import json
import subprocess
import sys

import pytest
from support.cli import one_line_error, run_cli
from support.tiny import write_config


def test_inspect_lists_roles_and_peft_names(capsys):
    code, out, _ = run_cli(["inspect", "builtin:gpt2"], capsys)
    assert code == 0
    assert "transformer.h.*.attn.c_proj" in out and "attn.c_proj" in out
    assert "mlp.c_proj" in out and "tied" in out
    code, out, _ = run_cli(["inspect", "builtin:llama-3.1-8b", "--json"], capsys)
    data = json.loads(out)
    assert data["total_params"] == 8_030_261_248
    q = next(m for m in data["modules"] if m["role"] == "q")
    assert q["count"] == 32 and q["peft_name"] == "q_proj" and q["shape"] == "4096→4096"
    assert data["target_modules_by_role"]["attention"] == ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_count_json_has_the_documented_keys(capsys):
    code, out, _ = run_cli(["count", "builtin:llama-3.1-8b", "--targets", "attention,mlp", "--rank", "16", "--json"],
                           capsys)
    assert code == 0
    data = json.loads(out)
    assert data["trainable_params"] == 41_943_040
    assert data["total_params"] == 8_030_261_248 + 41_943_040
    assert data["trainable_percent"] == pytest.approx(100 * 41_943_040 / (8_030_261_248 + 41_943_040))
    assert data["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert {m["pattern"] for m in data["modules"]} >= {"model.layers.*.mlp.down_proj"}
    assert data["adapter_bytes"]["bf16"] == 2 * 41_943_040


def test_count_rank_table_and_fixed_alpha_warning(capsys):
    code, out, _ = run_cli(["count", "builtin:llama-3.1-8b", "--targets", "attention,mlp", "--ranks", "8,16,64"],
                           capsys)
    assert code == 0
    assert "20,971,520" in out and "41,943,040" in out and "167,772,160" in out
    code, out, _ = run_cli(["count", "builtin:llama-3.1-8b", "--ranks", "8,16", "--alpha", "16"], capsys)
    assert "fixed at 16 while r varies" in out


def test_count_per_layer_and_dora(capsys):
    code, out, _ = run_cli(["count", "builtin:llama-3.2-1b", "--targets", "q,v", "--rank", "8", "--dora",
                            "--layers", "0-3", "--json"], capsys)
    data = json.loads(out)
    assert data["layers_to_transform"] == [0, 1, 2, 3]
    assert set(data["per_layer"]) == {"0", "1", "2", "3"}
    # q: 8*(2048+2048)+2048, v: 8*(2048+512)+512 per layer, DoRA magnitudes included
    assert data["trainable_params"] == 4 * (8 * 4096 + 2048 + 8 * 2560 + 512)


def test_local_config_folder_and_file(capsys, tmp_path):
    folder = write_config("qwen2", tmp_path / "m")
    code, out, _ = run_cli(["count", folder, "--targets", "q,v", "--rank", "4", "--json"], capsys)
    assert code == 0 and json.loads(out)["target_modules"] == ["q_proj", "v_proj"]
    code, out, _ = run_cli(["inspect", str(tmp_path / "m" / "config.json"), "--json"], capsys)
    assert code == 0 and json.loads(out)["architecture"] == "Qwen2ForCausalLM"


@pytest.mark.parametrize("argv,expected", [
    (["count", "builtin:llama-3.1-8b", "--targets", "q_proj,v_prj"], "did you mean 'v_proj'"),
    (["count", "builtin:gpt2", "--targets", "gate"], "has no gate"),
    (["count", "builtin:phi-3-mini", "--targets", "q"], "fused into 'qkv_proj'"),
    (["count", "builtin:llama-3.1-8b", "--targets", ","], "no targets given"),
    (["count", "builtin:llama-3.1-8b", "--rank", "0"], "positive integer"),
    (["count", "builtin:llama-3.1-8b", "--rank", "8.5"], "positive integer"),
    (["count", "builtin:llama-3.1-8b", "--rank", "-4"], "positive integer"),
    (["count", "builtin:llama-9"], "unknown built-in model"),
    (["inspect", "builtin:lama-3.1-8b"], "did you mean 'llama-3.1-8b'"),
    (["count", "builtin:llama-3.1-8b", "--layers", "40"], "out of range"),
    (["count", "builtin:llama-3.1-8b", "--frobnicate"], "unrecognized arguments"),
    (["count", "./does/not/exist"], "no such file or folder"),
])
def test_bad_input_is_one_line_exit_2(capsys, argv, expected):
    one_line_error(capsys, argv, expected)


def test_bad_config_files(capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(capsys, ["inspect", str(empty)], "no config.json")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama", "hidden_size": 64,,}')
    one_line_error(capsys, ["inspect", str(broken)], "not valid JSON")
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text('{"model_type": "lamma"}')
    one_line_error(capsys, ["inspect", str(unknown)], "did you mean 'llama'")
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps(
        {"model_type": "my_custom_lm", "auto_map": {"AutoModelForCausalLM": "modeling_custom.MyLM"}}))
    one_line_error(capsys, ["inspect", str(remote)], "--trust-remote-code")


def test_console_script_runs_and_debug_shows_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "loraplan.cli", "count", "builtin:llama-9"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("error: unknown built-in model")
    result = subprocess.run([sys.executable, "-m", "loraplan.cli", "count", "builtin:llama-9"],
                            capture_output=True, text=True, env={**__import__("os").environ, "LORAPLAN_DEBUG": "1"})
    assert "Traceback" in result.stderr
