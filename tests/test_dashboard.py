"""The dashboard-as-code: built offline, every panel's key is one that real runs log."""

import pytest

from distgan import dashboard
from distgan.tracking import BENCH_TABLE_KEY, EPOCH_KEYS, SAMPLES_KEY, STEP_KEYS

from wandb_offline import isolated_wandb, read_offline_run, short_tracker_run

# wandb_workspaces still uses pydantic-v1-style validators; their deprecation notices are not ours
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture
def wandb_env(monkeypatch):
    yield from isolated_wandb(monkeypatch, mode="offline")


def bench_table_run(directory):
    """What `bench/kernels.py --wandb` logs: a wandb.Table under BENCH_TABLE_KEY (offline)."""
    import wandb

    run = wandb.init(project="distgan", id="bench-kernels", job_type="bench", dir=str(directory),
                     settings=wandb.Settings(console="off", quiet=True))
    table = wandb.Table(columns=["op", "provider", "pass", "ms", "GB/s"],
                        data=[["batch_norm_leaky_relu", "triton", "fwd", 0.05, 800.0]])
    run.log({BENCH_TABLE_KEY: table})
    run.finish()
    wandb.teardown()
    return read_offline_run(directory)


def logged_keys(train_run: dict, bench_run: dict) -> dict[str, set[str]]:
    """Per panel kind, the keys the W&B app would find: numeric history keys for line plots, image keys
    for the media browser, summary tables for the table panel. Point train_run at any read run, e.g. a
    real Ray training run's <storage>/<name>/wandb directory."""
    media = set(train_run["image_keys"])
    return {"line": set(train_run["metric_keys"]) - media - set(train_run["table_keys"]),
            "media": media,
            "table": set(bench_run["table_keys"]) & set(bench_run["summary"])}


def test_every_panel_key_is_logged_by_a_real_run(tmp_path, wandb_env):
    short_tracker_run(tmp_path, "t-dashboard")
    train_run = read_offline_run(tmp_path / "t-dashboard")
    assert train_run["num_runs"] == 1 and train_run["complete"]
    logged = logged_keys(train_run, bench_table_run(tmp_path / "bench"))

    workspace = dashboard.build_workspace("entity", "distgan")
    shown = {"line": set(), "media": set(), "table": set()}
    for section in workspace.sections:
        assert section.panels, section.name
        for panel in section.panels:
            kind, keys = dashboard.panel_keys(panel)
            missing = set(keys) - logged[kind]
            assert not missing, f"{section.name}: {kind} panel keys {missing} were not logged"
            shown[kind] |= set(keys)
    assert shown == {"line": set(STEP_KEYS + EPOCH_KEYS), "media": {SAMPLES_KEY}, "table": {BENCH_TABLE_KEY}}
    assert [s.name for s in workspace.sections] == [name for name, _ in dashboard.LAYOUT]
    view = workspace._to_model()  # what .save() would send, built without a server
    assert view.entity == "entity" and view.project == "distgan"


def test_layout_check_catches_drift():
    with pytest.raises(dashboard.LayoutError, match="not line keys"):
        dashboard.check_layout(dashboard.LAYOUT + (("Extra", [("line", "typo", ("loss_dd",))]),))
    trimmed = tuple((name, panels) for name, panels in dashboard.LAYOUT if name != "Throughput")
    with pytest.raises(dashboard.LayoutError, match="without a panel.*images_per_s"):
        dashboard.check_layout(trimmed)


def test_dry_run_prints_sections_and_keys(capsys):
    assert dashboard.main(["--entity", "e", "--project", "p", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "e/p" in out
    for name, panels in dashboard.LAYOUT:
        assert name in out
        for _, _, keys in panels:
            assert all(key in out for key in keys)


def test_unreachable_server_prints_the_plan_instead_of_saving(monkeypatch, capsys):
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    assert dashboard.main(["--entity", "e", "--project", "p"]) == 1
    captured = capsys.readouterr()
    assert "section 'Losses'" in captured.out and BENCH_TABLE_KEY in captured.out
    assert "not saved: cannot reach http://127.0.0.1:9" in captured.err
