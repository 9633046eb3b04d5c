import subprocess
import sys
import time

import pytest

from distgan.config import ConfigError, TrainConfig, build_parser, parse_args


def test_defaults_validate_and_help_shows_every_flag_with_its_default():
    cfg = parse_args([])
    assert cfg.dataset == "mnist5k" and cfg.batch_size == 64 and cfg.kernels == "auto"
    text = " ".join(build_parser().format_help().split())  # undo line wrapping
    for flag in ("--dataset", "--data-root", "--image-size", "--epochs", "--max-steps", "--batch-size",
                 "--num-workers", "--use-gpu", "--no-use-gpu", "--lr-g", "--lr-d", "--beta1", "--n-critic",
                 "--label-smoothing", "--z-dim", "--seed", "--storage-path", "--name", "--checkpoint-every",
                 "--kernels", "--bn", "--config", "--max-failures", "--wandb-mode", "--ema-decay"):
        assert flag in text, flag
    assert "(default: 64)" in text and "(default: mnist5k)" in text


def test_yaml_overrides_defaults_and_the_command_line_overrides_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("epochs: 3\nlr-g: 0.001\nbatch_size: 32\n")
    cfg = parse_args(["--config", str(f), "--batch-size", "16"])
    assert (cfg.epochs, cfg.lr_g, cfg.batch_size) == (3, 0.001, 16)


@pytest.mark.parametrize("argv,flag", [
    (["--dataset", "imagenet"], "--dataset"),
    (["--epochs", "0"], "--epochs"),
    (["--epochs", "-3"], "--epochs"),
    (["--batch-size", "65", "--num-workers", "2"], "--batch-size"),
    (["--image-size", "48"], "--image-size"),
    (["--kernels", "cuda"], "--kernels"),
    (["--bn", "group"], "--bn"),
    (["--lr-g", "0"], "--lr-g"),
    (["--beta1", "1.5"], "--beta1"),
    (["--label-smoothing", "-0.1"], "--label-smoothing"),
    (["--n-critic", "0"], "--n-critic"),
    (["--dataset", "cifar10"], "--data-root"),
    (["--data-root", "/tmp"], "--data-root"),
    (["--name", "../escape"], "--name"),
    (["--wandb-mode", "loud"], "--wandb-mode"),
    (["--num-workers", "0"], "--num-workers"),
    (["--max-steps", "0"], "--max-steps"),
])
def test_invalid_values_name_their_flag(argv, flag):
    with pytest.raises(ConfigError, match=flag):
        parse_args(argv)


def test_yaml_errors_name_the_file_and_the_key(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("epochz: 3\n")
    with pytest.raises(ConfigError, match="epochz"):
        parse_args(["--config", str(f)])
    with pytest.raises(ConfigError, match="not found"):
        parse_args(["--config", str(tmp_path / "missing.yaml")])


def test_name_defaults_to_a_timestamp_and_storage_path_becomes_absolute():
    cfg = TrainConfig(storage_path="rel/runs").validate()
    assert cfg.name.startswith("distgan-") and cfg.storage_path.startswith("/")


@pytest.mark.parametrize("argv,needle", [
    (["--dataset", "imagenet"], "--dataset"),
    (["--dataset", "mnist", "--data-root", "/nonexistent/mnist"], "/nonexistent/mnist"),
    (["--batch-size", "63"], "--batch-size"),
    (["--epochs", "0"], "--epochs"),
    (["--lr-d", "nan-ish"], "--lr-d"),
    (["--batch-size", "4096"], "--batch-size 4096 x --n-critic 1 needs more images"),
])
def test_cli_bad_input_exits_nonzero_fast_with_one_line_and_no_traceback(argv, needle, tmp_path):
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "distgan.train", *argv, "--storage-path", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - t0
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert needle in err and "Traceback" not in err
    assert len(err.splitlines()) <= 3  # argparse prints usage + one error line
    assert elapsed < 10, elapsed


def test_readme_flag_table_lists_every_flag_with_its_current_default():
    from dataclasses import fields
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        assert f"| `{flag}" in readme, flag
        row = readme.split(f"| `{flag}", 1)[1].split("\n")[0]
        assert f"` | `{f.default}` |" in row, (flag, row)
