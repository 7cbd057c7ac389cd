import glob
import os
import re
import subprocess
import sys

import pytest

from training.config import COMPILE_MODES, CONFIG_DIR, CUDA_GRAPH_MODES, ConfigError, load_config


def test_both_flag_forms():
    assert load_config(["--attention", "naive"]).model.attention == "naive"
    assert load_config(["--attention=naive"]).model.attention == "naive"
    cfg = load_config(["--batch_size=3", "--learning_rate", "1", "--compile", "false", "--n_layer", "2"])
    assert (cfg.batch_size, cfg.learning_rate, cfg.compile, cfg.model.n_layer) == (3, 1.0, False, 2)
    assert isinstance(cfg.learning_rate, float)
    assert load_config(["--compile=false", "--compile"]).compile is True  # a bare boolean flag means true


def test_flags_override_the_file():
    cfg = load_config(["--config", "step49", "--attention", "naive", "--max_steps", "7"])
    assert (cfg.model.attention, cfg.max_steps, cfg.batch_size) == ("naive", 7, 16)
    assert load_config(["--max_steps", "7", "--config", "step49"]).max_steps == 7  # order does not matter


def test_unknown_flag_suggests_the_closest_key():
    with pytest.raises(ConfigError, match=r"unknown key 'atention'; did you mean --attention\?"):
        load_config(["--atention", "sdpa"])
    for alias, key in (("lr", "learning_rate"), ("bs", "batch_size"), ("steps", "max_steps")):
        with pytest.raises(ConfigError, match=rf"unknown key '{alias}'; did you mean --{key}\?"):
            load_config([f"--{alias}", "1"])


def test_messages_name_the_one_wrong_thing():
    with pytest.raises(ConfigError, match=r"^keep_last must be at least 1, got 0$"):
        load_config(["--keep_last", "0"])
    with pytest.raises(ConfigError, match=r"compile must be true or false \(also 1/0, yes/no, on/off\), got 'maybe'"):
        load_config(["--compile", "maybe"])
    for budget in ("0", "1.5"):
        with pytest.raises(ConfigError, match=rf"^activation_memory_budget must be in \(0, 1\], got {float(budget)}; "):
            load_config(["--activation_memory_budget", budget])
    with pytest.raises(ConfigError, match=r"^activation_memory_budget 0.8 needs torch.compile .*set --compile true"):
        load_config(["--activation_memory_budget", "0.8", "--compile", "false"])


def test_wrong_types_name_the_field():
    with pytest.raises(ConfigError, match="batch_size must be int, got '8.5'"):
        load_config(["--batch_size", "8.5"])
    with pytest.raises(ConfigError, match="--n_layer needs a value"):
        load_config(["--n_layer"])
    with pytest.raises(ConfigError, match="expected --key value"):
        load_config(["sdpa"])


def test_bad_choices_and_values():
    with pytest.raises(ConfigError, match="naive, sdpa, triton"):
        load_config(["--attention", "flsh"])
    with pytest.raises(ConfigError, match=r"n_embd \(30\) must be divisible by n_head \(4\)"):
        load_config(["--n_embd", "30", "--n_head", "4"])
    with pytest.raises(ConfigError, match=r"seq_len \(2048\) exceeds block_size \(1024\)"):
        load_config(["--seq_len", "2048"])
    with pytest.raises(ConfigError, match="batch_size must be at least 1"):
        load_config(["--batch_size", "0"])
    with pytest.raises(ConfigError, match="device 'tpu'"):
        load_config(["--device", "tpu"])


def test_config_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('atention = "sdpa"\n')
    with pytest.raises(ConfigError, match=rf"{bad}: unknown key 'atention'; did you mean attention = \.\.\.\?"):
        load_config(["--config", str(bad)])
    bad.write_text("batch_size = 8.5\n")
    with pytest.raises(ConfigError, match=rf"{bad}: batch_size must be int, got 8.5"):
        load_config(["--config", str(bad)])
    bad.write_text("batch_size = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(["--config", str(bad)])
    with pytest.raises(ConfigError, match="not found; give a path or one of: .*step49"):
        load_config(["--config", "nope"])


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(CONFIG_DIR, "*.toml"))))
def test_every_config_file_loads(path):
    load_config(["--config", path])


def test_a_config_file_can_extend_another(tmp_path):
    (tmp_path / "base.toml").write_text('max_steps = 7\nn_layer = 3\nattention = "naive"\n')
    (tmp_path / "child.toml").write_text(f'extends = "{tmp_path / "base.toml"}"\nn_layer = 4\n')
    cfg = load_config(["--config", str(tmp_path / "child.toml"), "--attention", "sdpa"])
    assert (cfg.max_steps, cfg.model.n_layer, cfg.model.attention) == (7, 4, "sdpa")
    (tmp_path / "base.toml").write_text(f'extends = "{tmp_path / "child.toml"}"\n')
    with pytest.raises(ConfigError, match="loops back"):
        load_config(["--config", str(tmp_path / "child.toml")])
    short = load_config(["--config", "gpt2_124m_short"])
    assert (short.max_steps, short.total_batch_size, short.beta2) == (100, 524288, 0.95)


def test_help_lists_every_key_with_its_description():
    import dataclasses
    from model import GPTConfig
    from training.config import TrainConfig, help_text
    text = help_text()
    for cls in (TrainConfig, GPTConfig):
        for f in dataclasses.fields(cls):
            if f.name != "model":
                assert f"--{f.name} " in text
    assert "--keep_last INT (default 2)" in text and "complete checkpoints kept" in text
    run = subprocess.run([sys.executable, os.path.join(CONFIG_DIR, "..", "train_gpt2.py"), "-h"], capture_output=True,
                         text=True)
    assert run.returncode == 0 and run.stdout.strip() == text


def test_help_groups_the_keys_and_shows_a_configs_values():
    import dataclasses
    from training.config import TrainConfig, help_text
    text = help_text()
    titles = [line for line in text.splitlines() if line and not line.startswith((" ", "usage", "--config", "A "))]
    assert [t.split()[0].rstrip(":,") for t in titles] == ["data", "model", "optimisation", "evaluation", "checkpoints",
                                                         "speed", "logging"]
    section = {}  # key -> the title above it
    for line in text.splitlines():
        if line in titles:
            title = line.split()[0].rstrip(":,")
        elif line.startswith("  --"):
            section[line.split()[0][2:]] = title
    assert section["n_layer"] == "model" and section["loss_chunk"] == section["bf16_params"] == "speed"
    assert section["seed"] == "optimisation" and section["out_dir"] == "checkpoints"
    from model import GPTConfig
    assert set(section) == {f.name for cls in (TrainConfig, GPTConfig) for f in dataclasses.fields(cls)} - {"model"}
    for f in (*dataclasses.fields(TrainConfig), *dataclasses.fields(GPTConfig)):  # each key has its description
        if f.name != "model":  # on the key's own line: [ ]+, where \s+ would reach the next line's --key
            assert re.search(rf"--{f.name} \S+ \(default .*\) +\S", text), f.name
    shown = help_text(["--config", "step49", "--max_steps", "7", "--help"])
    assert "Each key's value in this run (= ...): --config step49 --max_steps 7" in shown
    assert "--max_steps INT = 7 (default 50)" in shown and "--n_layer INT = 12 (default 12)" in shown
    run = subprocess.run([sys.executable, os.path.join(CONFIG_DIR, "..", "train_gpt2.py"), "--config", "nope", "-h"],
                         capture_output=True, text=True)
    assert run.returncode != 0 and run.stderr.startswith("error: config 'nope' not found") and run.stdout == ""


def test_compile_without_a_compiler_says_what_to_do(monkeypatch):
    import shutil
    import torch
    from train_gpt2 import check_machine
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match=r"--compile true needs a C\+\+ compiler .* or use --compile false"):
        check_machine(load_config(["--config", "tiny", "--compile", "true"]), torch.device("cpu"), 0)
    check_machine(load_config(["--config", "tiny", "--compile", "false"]), torch.device("cpu"), 0)


def test_a_head_dim_the_triton_kernel_lacks_fails_at_set_up():
    import torch
    from train_gpt2 import check_machine
    cfg = load_config(["--config", "tiny", "--attention", "triton", "--n_embd", "40", "--n_head", "2"])
    with pytest.raises(ValueError, match=r"got D=20 \(n_embd / n_head\); .* or use `--attention sdpa`"):
        check_machine(cfg, torch.device("cpu"), 0)


def test_fp8_lm_head_is_checked_when_the_settings_are_read():
    with pytest.raises(ConfigError, match=r"^fp8_lm_head runs inside the fused loss: set loss_chunk too"):
        load_config(["--config", "tiny", "--fp8_lm_head", "true"])
    with pytest.raises(ConfigError, match=r"^fp8_lm_head needs vocab_size and n_embd divisible by 16 .* got 50257 and"):
        load_config(["--config", "step49", "--fp8_lm_head", "true", "--loss_chunk", "16384"])
    with pytest.raises(ConfigError, match=r"^fp8_lm_head needs loss_chunk and the rows of a batch .* got 16384 and 4600"):
        load_config(["--config", "gpt2_124m", "--fp8_lm_head", "true", "--batch_size", "5", "--seq_len", "920",
                     "--total_batch_size", "0"])
    assert load_config(["--config", "gpt2_124m", "--fp8_lm_head", "true"]).model.fp8_lm_head


def test_fp8_lm_head_on_a_gpu_without_fp8_tensor_cores_says_what_to_do(monkeypatch):
    import torch
    from train_gpt2 import check_machine
    cfg = load_config(["--config", "gpt2_124m", "--fp8_lm_head", "true"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-40GB")
    for capability, ok in (((8, 0), False), ((8, 9), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        if ok:
            check_machine(cfg, torch.device("cuda", 0), 0)
        else:
            with pytest.raises(ConfigError, match=r"^fp8_lm_head needs FP8 tensor cores .* not NVIDIA A100-SXM4-40GB "
                               r"\(compute capability 8.0\); use --fp8_lm_head false"):
                check_machine(cfg, torch.device("cuda", 0), 0)
    with pytest.raises(ConfigError, match=r"not mps; use --fp8_lm_head false"):
        check_machine(cfg, torch.device("mps"), 0)


def test_compile_modes_are_torch_compiles_and_the_cuda_graph_ones_are_known():
    """The trainer accumulates gradients into its own buffers in exactly the modes where Inductor captures CUDA graphs
    (train_gpt2.py); torch.compile's own table of modes is the reference."""
    import torch._inductor
    torch_modes = torch._inductor.list_mode_options()
    assert set(COMPILE_MODES) <= set(torch_modes)
    assert set(CUDA_GRAPH_MODES) == {m for m in COMPILE_MODES if torch_modes[m].get("triton.cudagraphs")}
    assert load_config(["--config", "tiny", "--compile_mode", "reduce-overhead"]).compile_mode == "reduce-overhead"
    from training.config import help_text
    assert " | ".join(COMPILE_MODES) in help_text()  # --help lists them (from the dataclass's comment)
    with pytest.raises(ConfigError, match=r"^compile_mode 'fast': choose one of default, reduce-overhead, "
                       r"max-autotune-no-cudagraphs, max-autotune$"):
        load_config(["--config", "tiny", "--compile_mode", "fast"])


@pytest.mark.parametrize("flags, message", [
    (["--beta1", "1.5"], r"^beta1 must be in \[0, 1\), got 1.5$"),
    (["--beta2", "-0.5"], r"^beta2 must be in \[0, 1\), got -0.5$"),
    (["--adam_eps", "-1"], r"^adam_eps must be positive, got -1.0$"),
    (["--weight_decay", "-1"], r"^weight_decay must be at least 0, got -1.0$"),
    (["--warmup_steps", "10", "--max_steps", "3"], r"^warmup_steps \(10\) exceeds max_steps \(3\): .* lower warmup_steps "
                                                  r"or raise max_steps$")])
def test_optimiser_values_outside_their_domain(flags, message):
    with pytest.raises(ConfigError, match=message):
        load_config(["--config", "tiny", *flags])


@pytest.mark.parametrize("line, message", [('compile = "no"', "compile must be true or false, got 'no'"),
                                           ('learning_rate = "1e-3"', "learning_rate must be float, got '1e-3'"),
                                           ('max_steps = "10"', "max_steps must be int, got '10'"),
                                           ("attention = 3", "attention must be str, got 3")])
def test_toml_values_must_have_the_keys_type(tmp_path, line, message):
    (tmp_path / "c.toml").write_text(line + "\n")
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'c.toml'}: {message}")) as e:
        load_config(["--config", str(tmp_path / "c.toml")])
    assert str(e.value).endswith("write the value without quotes") == line.endswith('"')


def test_bad_optimiser_values_stop_before_the_out_dir_is_claimed(tmp_path):
    run = subprocess.run([sys.executable, os.path.join(CONFIG_DIR, "..", "train_gpt2.py"), "--config", "tiny",
                          "--beta1", "1.5", "--out_dir", "run"], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode != 0 and run.stderr.strip().splitlines() == ["error: beta1 must be in [0, 1), got 1.5"]
    assert os.listdir(tmp_path) == []  # no out_dir, no .lock


def test_the_tiny_config_saves_the_final_state():
    """The quick start's run leaves a checkpoint for sample.py, evaluate.py and export_hf.py."""
    from train_gpt2 import saves_after
    cfg = load_config(["--config", "tiny"])
    assert saves_after(cfg, cfg.max_steps - 1)
