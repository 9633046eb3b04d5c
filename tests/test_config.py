import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from distgan.cli import HELP_GROUPS, build_parser, load_yaml, parse_args
from distgan.config import (
    RAY_JOB_CONFIG_ENV,
    ConfigError,
    TrainConfig,
    check_execution,
    check_schedule,
)

from conftest import hiding_modules_env

REPO = Path(__file__).resolve().parent.parent


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
    (["--lr-decay-start", "1.5"], "--lr-decay-start"),
    (["--lr-decay-start", "-0.1"], "--lr-decay-start"),
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
    (["--batch-size", "63", "--num-workers", "2"], "--batch-size"),  # under auto, Ray's resources size the workers
    (["--epochs", "0"], "--epochs"),
    (["--lr-d", "nan-ish"], "--lr-d"),
    (["--batch-size", "4096"],
     "--batch-size 4096 x --n-critic 1 needs 4096 images per generator step, and the training split has 4000"),
    (["--lr-g", "-1e-3"], "--lr-g: must be in (0, 1), got -0.001"),  # not argparse's "expected one argument"
    (["--epoch", "3"], "unrecognized arguments: --epoch 3"),  # no abbreviations: a later --epoch-* flag stays apart
])
def test_cli_bad_input_exits_nonzero_before_ray_with_one_line_and_no_traceback(argv, needle, tmp_path):
    # Ray cannot be imported in this process: an error that needed Ray first would be a traceback instead
    env = hiding_modules_env(tmp_path, "ray")
    proc = subprocess.run([sys.executable, "-m", "distgan.train", *argv, "--storage-path", str(tmp_path)],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert needle in err and "Traceback" not in err, err
    assert len(err.splitlines()) <= 3  # argparse prints usage + one error line


@pytest.mark.parametrize("path,needle", [
    ("s3:/bucket/x", "looks like a URI with a slash missing (s3://...)"),  # would be a local ./s3:/bucket/x
    ("S3:bucket", "looks like a URI with a slash missing (S3://...)"),
    ("gs://bucket/x", "uses gs://, which distgan does not read or write"),  # pyarrow would wait on GCS credentials
    ("ftp://host/x", "uses ftp://"),
    ("s3://", "is not a URI like s3://bucket/prefix"),
    ("s3:// bucket", "is not a URI like s3://bucket/prefix"),
])
def test_a_storage_path_distgan_cannot_use_is_refused_before_anything_is_written(path, needle, tmp_path,
                                                                                monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=re.escape(f"--storage-path: {path!r} {needle}")):
        parse_args(["--storage-path", path])
    assert not list(tmp_path.iterdir())


def test_a_storage_path_that_cannot_be_written_is_refused(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    with pytest.raises(ConfigError, match=f"^--storage-path: {a_file} is not a directory$"):
        parse_args(["--storage-path", str(a_file / "runs")])
    # root passes os.access on /proc; a write there still fails
    with pytest.raises(ConfigError, match="^--storage-path: /proc/nope does not exist and cannot be made in /proc"):
        parse_args(["--storage-path", "/proc/nope"])
    assert parse_args(["--storage-path", str(tmp_path / "new" / "runs")]).storage_path == str(tmp_path / "new/runs")
    assert not (tmp_path / "new").exists() and [p.name for p in tmp_path.iterdir()] == ["a-file"]


def test_a_config_file_of_comments_only_sets_nothing(tmp_path):
    for text in ("", "# every option commented out\n# epochs: 5\n"):
        f = tmp_path / "c.yaml"
        f.write_text(text)
        assert parse_args(["--config", str(f), "--storage-path", str(tmp_path)]).epochs == TrainConfig().epochs
    f.write_text("- epochs\n- 5\n")
    with pytest.raises(ConfigError, match="must hold a mapping of option: value"):
        parse_args(["--config", str(f)])


# ------------------------------------------------------------------ precedence: typed flag > YAML > default


@pytest.mark.parametrize("argv", [
    ["--epochs", "38", "--batch-size", "64"],  # typed values equal to the defaults still win over the file
    ["--epochs=38", "--batch-size=64"],
])
def test_a_typed_flag_wins_over_the_file_even_when_it_equals_the_default(tmp_path, argv):
    f = tmp_path / "c.yaml"
    f.write_text("epochs: 5\nbatch_size: 32\nuse_gpu: false\ndownload: false\n")
    cfg = parse_args(["--config", str(f), *argv, "--use-gpu"])
    assert (TrainConfig().epochs, TrainConfig().batch_size) == (38, 64)  # the typed values are the defaults
    assert (cfg.epochs, cfg.batch_size, cfg.use_gpu) == (38, 64, True)
    # what is not typed comes from the file, then from the defaults
    cfg = parse_args(["--config", str(f)])
    assert (cfg.epochs, cfg.batch_size, cfg.use_gpu, cfg.lr_g) == (5, 32, False, TrainConfig().lr_g)
    # the order on the command line does not matter
    assert parse_args([*argv, "--config", str(f)]).epochs == 38


def test_bool_flags_typed_false_win_over_a_file_that_says_true(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("verbose: true\n")
    assert parse_args(["--config", str(f)]).verbose is True
    assert parse_args(["--config", str(f), "--no-verbose"]).verbose is False
    assert parse_args(["-v"]).verbose is True and parse_args([]).verbose is False


# ------------------------------------------------------------------ YAML values convert like flags


@pytest.mark.parametrize("text,key,value", [
    ("lr_g: 2e-4", "lr_g", 0.0002),  # YAML 1.1 reads 2e-4 as a string
    ("lr-d: 3E-4", "lr_d", 0.0003),
    ("checkpoint_every_minutes: 2", "checkpoint_every_minutes", 2.0),
    ("epochs: '7'", "epochs", 7),
    ("max_steps: null", "max_steps", None),
    ("max_steps: none", "max_steps", None),
    ("use_gpu: 'yes'", "use_gpu", True),
    ("use_gpu: off", "use_gpu", False),
    ("download: 'False'", "download", False),
    ("verbose: 1", "verbose", True),
    ("name: 2024", "name", "2024"),
])
def test_yaml_values_go_through_the_flag_conversions(tmp_path, text, key, value):
    f = tmp_path / "c.yaml"
    f.write_text(text + "\n")
    got = load_yaml(str(f))[key]
    assert got == value and type(got) is type(value)


def test_the_readme_case_lr_2e_4_in_a_file_trains_with_0_0002(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lr_g: 2e-4\nlr_d: 1e-4\n")
    cfg = parse_args(["--config", str(f)])
    assert (cfg.lr_g, cfg.lr_d) == (0.0002, 0.0001)


@pytest.mark.parametrize("text,needle", [
    ("epochs: 5.5", "epochs: expected an integer, got 5.5"),
    ("epochs: five", "epochs: expected an integer, got 'five'"),
    ("lr_g: fast", "lr_g: expected a finite number, got 'fast'"),
    ("lr_g: .nan", "lr_g: expected a finite number"),
    ("use_gpu: maybe", "use_gpu: expected true or false, got 'maybe'"),
    ("wandb_mode: off", "wandb_mode: expected a string, got false (YAML reads unquoted"),
    ("name: [a, b]", "name: expected a string, got list"),
    ("epochs: null", "epochs: expected an integer, got null"),
    ("config: other.yaml", "cannot name another"),
])
def test_yaml_values_that_do_not_convert_name_the_file_and_the_key(tmp_path, text, needle):
    f = tmp_path / "bad.yaml"
    f.write_text(text + "\n")
    with pytest.raises(ConfigError) as e:
        parse_args(["--config", str(f)])
    assert str(f) in str(e.value) and needle in str(e.value)


def test_an_out_of_range_value_from_the_file_names_the_flag_and_the_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lr_g: 2\n")
    with pytest.raises(ConfigError, match=r"^--lr-g: must be in \(0, 1\), got 2.0 \(set in .*c.yaml\)$"):
        parse_args(["--config", str(f)])


@pytest.mark.parametrize("name", ["tf-tutorial.yaml", "seed.yaml"])  # seed.yaml: the file's former name, an alias
def test_tf_tutorial_file_loads_the_tutorial_recipe(name):
    # the TensorFlow tutorial's recipe, literally: TrainConfig's defaults may move on for quality, this file may not
    cfg = parse_args(["--config", str(REPO / "configs" / name)])
    recipe = dict(dataset="mnist5k", image_size=28, z_dim=100, negative_slope=0.2, lr_g=2e-4, lr_d=2e-4,
                  lr_decay_start=1.0, beta1=0.5,
                  beta2=0.999, batch_size=64, epochs=20, n_critic=1, label_smoothing=0.0, ema_decay=0.999,
                  bn="local", precision="fp32", seed=0)
    assert {k: getattr(cfg, k) for k in recipe} == recipe
    assert parse_args(["--config", str(REPO / "configs" / name), "--epochs", "100"]).epochs == 100


# ------------------------------------------------------------------ every value checked on the driver


@pytest.mark.parametrize("argv,flag", [
    (["--epochs", "1.5"], "--epochs"),
    (["--lr-g", "inf"], "--lr-g"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**32)], "--seed"),
    (["--seed", str(2**32 - 2), "--num-workers", "4", "--batch-size", "64"], "--seed"),
    (["--checkpoint-every-minutes", "-1"], "--checkpoint-every-minutes"),
    (["--checkpoint-every-minutes", "nan"], "--checkpoint-every-minutes"),
    (["--checkpoint-every-steps", "-2"], "--checkpoint-every-steps"),
    (["--checkpoint-every", "0"], "--checkpoint-every"),
    (["--num-to-keep", "0"], "--num-to-keep"),
    (["--max-failures", "-2"], "--max-failures"),
    (["--max-rollbacks", "-1"], "--max-rollbacks"),
    (["--rollback-lr-factor", "0"], "--rollback-lr-factor"),
    (["--rollback-lr-factor", "1.5"], "--rollback-lr-factor"),
    (["--nan-policy", "ignore"], "--nan-policy"),
    (["--placement-strategy", "pack"], "--placement-strategy"),
    (["--collective-timeout-s", "0"], "--collective-timeout-s"),
    (["--placement-timeout-s", "-5"], "--placement-timeout-s"),
    (["--log-every", "0"], "--log-every"),
    (["--eval-every", "-1"], "--eval-every"),
    (["--eval-samples", "1"], "--eval-samples"),
    (["--eval-samples", "0", "--eval-every", "0"], "--eval-samples"),
    (["--precision", "fp8"], "--precision"),
    (["--precision", "fp16", "--no-use-gpu"], "--precision"),
    (["--wandb-mode", "offline "], "--wandb-mode"),
    (["--wandb-project", "me/proj"], "--wandb-project"),
    (["--wandb-group", "x" * 129], "--wandb-group"),
    (["--ema-decay", "1"], "--ema-decay"),
    (["--beta2", "-0.1"], "--beta2"),
    (["--negative-slope", "1"], "--negative-slope"),
    (["--z-dim", "0"], "--z-dim"),
    (["--channels", "2"], "--channels"),
    (["--channels", "3"], "--channels"),  # mnist5k is grayscale
    (["--download"], "--download"),  # mnist5k is embedded: nothing to download
    (["--dataset", "folder", "--data-root", "/tmp", "--download"], "--download"),
    (["--storage-path", "s3://"], "--storage-path"),
    (["--name", ""], "--name"),
])
def test_every_bad_value_is_refused_naming_its_flag(argv, flag):
    with pytest.raises((ConfigError, SystemExit)) as e:
        parse_args(argv)
    if isinstance(e.value, ConfigError):
        assert str(e.value).startswith(flag + ":"), str(e.value)


@pytest.mark.parametrize("argv,flag", [
    (["--epochs", "1.5"], "--epochs"),
    (["--lr-g", "inf"], "--lr-g"),
    (["--channels", "x"], "--channels"),
])
def test_flags_that_do_not_convert_fail_in_argparse_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: argument {flag}:") and len(err.splitlines()) == 1


@pytest.mark.parametrize("field,value", [
    ("epochs", True), ("epochs", "5"), ("lr_g", "2e-4"), ("use_gpu", "yes"), ("name", 3), ("max_steps", 2.0),
    ("checkpoint_every_minutes", float("nan")), ("verbose", None),
])
def test_wrong_types_built_in_code_are_refused_by_validate(field, value, tmp_path):
    with pytest.raises(ConfigError, match="^--" + field.replace("_", "-") + ": expected"):
        TrainConfig(storage_path=str(tmp_path), **{field: value}).validate()


@pytest.mark.parametrize("use_gpu,precision,kernels,env,flag", [
    (False, "fp16", "auto", {}, "--precision"),
    (False, "auto", "triton", {}, "--kernels"),
    (False, "auto", "triton", {"TRITON_INTERPRET": "0"}, "--kernels"),
])
def test_what_the_workers_hardware_cannot_run_is_refused(use_gpu, precision, kernels, env, flag, tmp_path):
    cfg = TrainConfig(storage_path=str(tmp_path), precision=precision, kernels=kernels).validate()
    with pytest.raises(ConfigError, match="^" + flag + ": "):
        check_execution(cfg, use_gpu, environ=env, triton_installed=True)


@pytest.mark.parametrize("use_gpu,precision,kernels,env", [
    (False, "bf16", "auto", {}),
    (False, "fp32", "eager", {}),
    (False, "auto", "triton", {"TRITON_INTERPRET": "1"}),
    (True, "fp16", "triton", {}),
])
def test_what_the_workers_can_run_is_accepted(use_gpu, precision, kernels, env, tmp_path):
    cfg = TrainConfig(storage_path=str(tmp_path), precision=precision, kernels=kernels).validate()
    check_execution(cfg, use_gpu, environ=env, triton_installed=True)


def test_kernels_triton_without_the_package_is_refused(tmp_path):
    cfg = TrainConfig(storage_path=str(tmp_path), kernels="triton").validate()
    with pytest.raises(ConfigError, match="^--kernels: triton needs the triton package"):
        check_execution(cfg, True, environ={}, triton_installed=False)


def test_max_steps_beyond_what_the_epochs_allow_is_refused(tmp_path):
    cfg = TrainConfig(storage_path=str(tmp_path), epochs=2, max_steps=200).validate()
    with pytest.raises(ConfigError, match=r"^--max-steps 200: --epochs 2 ends the run at step 124 \(62 steps"):
        check_schedule(cfg, 4000)
    cfg = TrainConfig(storage_path=str(tmp_path), epochs=2, max_steps=124).validate()
    assert check_schedule(cfg, 4000) == 62
    with pytest.raises(ConfigError, match="^--batch-size 64 x --n-critic 2 needs 128 images per generator step, "
                                          "and the training split has 100$"):
        check_schedule(TrainConfig(storage_path=str(tmp_path), n_critic=2).validate(), 100)


# ------------------------------------------------------------------ inside `ray job submit`


def test_a_relative_storage_path_inside_a_ray_job_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_args([]).storage_path == str(tmp_path / "runs")  # a plain local run: ./runs works
    monkeypatch.setenv(RAY_JOB_CONFIG_ENV, '{"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip"}}')
    with pytest.raises(ConfigError, match="^--storage-path: './runs' is relative, and inside a Ray job"):
        parse_args([])
    with pytest.raises(ConfigError, match="^--storage-path: 'runs' is relative"):
        parse_args(["--storage-path", "runs"])
    assert parse_args(["--storage-path", str(tmp_path / "abs")]).storage_path == str(tmp_path / "abs")
    assert parse_args(["--storage-path", "s3://bucket/prefix"]).storage_path == "s3://bucket/prefix"


# ------------------------------------------------------------------ --help


def _help_sections() -> dict[str, str]:
    sections, title = {}, None
    for line in build_parser().format_help().splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            title = line[:-1]
            sections[title] = ""
        elif title:
            sections[title] += line + "\n"
    return {k: " ".join(v.split()) for k, v in sections.items()}


def test_help_groups_every_flag_by_purpose():
    sections = _help_sections()
    titles = [title for title, _, _ in HELP_GROUPS]
    assert titles == ["data", "schedule", "optimisation", "model execution", "outputs and checkpoints",
                      "fault tolerance", "tracking and evaluation"]
    grouped = [name for _, _, names in HELP_GROUPS for name in names]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) | {"config", "verbose"} == {f.name for f in fields(TrainConfig)}
    for title, _, names in HELP_GROUPS:
        for name in names:
            flag = "--" + name.replace("_", "-")
            assert f"{flag} " in sections[title] or f"{flag}, " in sections[title], (title, name)
    assert "-v, --verbose, --no-verbose show Ray's full output (default: False)" in sections["options"]


def test_help_states_the_true_defaults():
    text = " ".join(build_parser().format_help().split())
    assert "(default: 0 for a local run, 2 when joining a cluster (RAY_ADDRESS))" in text
    assert "(default: use GPUs when the cluster has them)" in text
    assert "(default: from the dataset: 3 for cifar10, folder and prepared, else 1)" in text
    assert "(default: WANDB_MODE, else online when WANDB_API_KEY is set, else offline)" in text
    assert "(default: None)" not in text and "==SUPPRESS==" not in text


def test_help_max_failures_default_is_what_the_driver_applies(monkeypatch):
    from distgan.cluster import default_max_failures

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    local = default_max_failures()
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    cluster = default_max_failures()
    text = " ".join(build_parser().format_help().split())
    assert f"(default: {local} for a local run, {cluster} when joining a cluster (RAY_ADDRESS))" in text


# ------------------------------------------------------------------ what users bring: names, repeated keys, paths


def test_default_names_of_runs_started_in_the_same_second_differ(monkeypatch):
    import distgan.config as config

    monkeypatch.setattr(config.time, "strftime", lambda fmt, *a: "distgan-20261202-120000")  # one second
    names = {parse_args(["--storage-path", "/tmp"]).name for _ in range(20)}
    assert len(names) == 20
    assert all(re.fullmatch(r"distgan-20261202-120000-[0-9a-f]{6}", n) for n in names), names


@pytest.mark.parametrize("text,needle", [
    ("lr_g: 2e-4\nepochs: 3\nlr_g: 1e-3\n", "option lr_g is given twice (lines 1 and 3); keep one"),
    ("lr-g: 2e-4\nlr_g: 1e-3\n", "option lr_g is given twice (lines 1 and 2, as lr-g and lr_g); keep one"),
])
def test_an_option_given_twice_in_a_config_file_is_refused_naming_the_file_and_the_key(tmp_path, capsys, text,
                                                                                       needle):
    from distgan.train import main

    f = tmp_path / "c.yaml"
    f.write_text(text)
    assert main(["--config", str(f), "--storage-path", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --config: {f}: {needle}"


def test_relative_data_root_and_wandb_dir_reach_the_workers_absolute(tmp_path, monkeypatch):
    """Ray Train starts each worker in a working directory of its own: what the driver forwards is absolute,
    resolved against the directory the user typed the command in."""
    from PIL import Image

    from distgan import cluster
    from distgan.data import build_dataset

    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / "imgs" / cls / "x.png")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_DIR", "wb")
    cfg = parse_args(["--dataset", "folder", "--data-root", "imgs", "--storage-path", "runs"])
    sent = cfg.to_dict()
    assert sent["data_root"] == str(tmp_path / "imgs")
    assert cluster._forwarded_env()["WANDB_DIR"] == str(tmp_path / "wb")
    monkeypatch.chdir("/")  # where a worker runs: the dataset still loads
    assert len(build_dataset(TrainConfig(**sent))) == 2
