"""`python -m distgan.dashboard --entity E --project P`: the W&B workspace for distgan runs, as code.

Sections: losses, discriminator outputs D(x) / D(G(z)), quality metrics, throughput, sample grids, and the
kernel benchmark table that `bench/kernels.py --wandb` logs. Every panel names its keys through the
shared lists in distgan/tracking.py, and building fails on a key that is not in them (or on a logged
key that no panel shows), so the dashboard and the logged keys cannot drift apart.

Saving needs a W&B API key and the server. With --dry-run, or when the server cannot be reached, it
prints what it would create (section names and panel keys) instead of saving.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from urllib.parse import urlparse

from distgan import tracking as t
from distgan.storage import first_line

WORKSPACE_NAME = "distgan"
REACH_TIMEOUT_S = 5.0  # a TCP connect to the server; the GraphQL client itself retries for minutes

# (section, [(panel kind, title, keys)]): kind "line" plots history keys over steps, "media" browses
# logged images, "table" shows a wandb.Table from the run summaries.
LAYOUT = (
    ("Losses", [("line", "G and D losses", t.LOSS_KEYS),
                ("line", "gradient norms", t.GRAD_NORM_KEYS),
                ("line", "learning rates", t.LR_KEYS)]),
    ("Discriminator outputs D(x) / D(G(z))", [("line", "mean sigmoid D(x) and D(G(z))", t.D_OUTPUT_KEYS),
                                              ("line", "D(x) - D(G(z)) at evaluations", t.HEALTH_KEYS)]),
    ("Quality metrics", [("line", "FID (digit-classifier features, lower is better)", ("fid",)),
                         ("line", "KID and its std over subsets", ("kid", "kid_std")),
                         ("line", "classifier score (1-10, higher is better)", ("classifier_score",)),
                         ("line", "coverage (1 = all digits) and diversity (1 = as varied as real)",
                          ("coverage", "diversity"))]),
    ("Throughput", [("line", "images/s (all workers)", ("images_per_s",)),
                    ("line", "step time (s)", ("step_time_s",)),
                    ("line", "epoch", ("epoch",))]),
    ("Sample grids", [("media", "fixed-noise samples (EMA generator)", (t.SAMPLES_KEY,))]),
    ("Kernel benchmark", [("table", "bench/kernels.py --wandb", (t.BENCH_TABLE_KEY,))]),
)


class LayoutError(ValueError):
    """A panel names a key the tracker does not log, or a logged key has no panel."""


def check_layout(layout=LAYOUT) -> None:
    logged = {"line": set(t.STEP_KEYS + t.EPOCH_KEYS), "media": {t.SAMPLES_KEY}, "table": {t.BENCH_TABLE_KEY}}
    shown = {kind: set() for kind in logged}
    for section, panels in layout:
        for kind, title, keys in panels:
            unknown = set(keys) - logged[kind]
            if unknown:
                raise LayoutError(f"{section} / {title}: {sorted(unknown)} are not {kind} keys in distgan.tracking")
            shown[kind] |= set(keys)
    for kind, keys in logged.items():
        if keys - shown[kind]:
            raise LayoutError(f"logged {kind} keys without a panel: {sorted(keys - shown[kind])}")


def build_workspace(entity: str, project: str, name: str = WORKSPACE_NAME):
    """The wandb_workspaces Workspace object (nothing is sent until .save())."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    check_layout()

    def panel(kind: str, title: str, keys: tuple[str, ...]):
        if kind == "line":
            return wr.LinePlot(title=title, x="Step", y=list(keys))
        if kind == "media":
            return wr.MediaBrowser(title=title, media_keys=list(keys), num_columns=1)
        return wr.WeavePanelSummaryTable(table_name=keys[0], layout=wr.Layout(w=24, h=12))

    sections = [ws.Section(name=section, panels=[panel(*p) for p in panels], is_open=True)
                for section, panels in LAYOUT]
    return ws.Workspace(entity=entity, project=project, name=name, sections=sections)


def panel_keys(panel) -> tuple[str, list[str]]:
    """(kind, metric keys) of a built panel: what the W&B app will look up in the runs."""
    import wandb_workspaces.reports.v2 as wr

    if isinstance(panel, wr.LinePlot):
        return "line", [str(y) for y in panel.y]
    if isinstance(panel, wr.MediaBrowser):
        return "media", list(panel.media_keys)
    if isinstance(panel, wr.WeavePanelSummaryTable):
        return "table", [panel.table_name]
    raise TypeError(f"unexpected panel type {type(panel).__name__}")


def describe(workspace) -> str:
    lines = [f"workspace {workspace.name!r} for {workspace.entity}/{workspace.project}"]
    for section in workspace.sections:
        lines.append(f"  section {section.name!r}")
        for panel in section.panels:
            kind, keys = panel_keys(panel)
            title = getattr(panel, "title", None)  # a table panel has none
            lines.append(f"    {kind:5s} {title or '(summary table)'}: {', '.join(keys)}")
    return "\n".join(lines)


def server_reachable(base_url: str, timeout: float = REACH_TIMEOUT_S) -> str | None:
    """None when a TCP connection to the W&B server opens, else why not."""
    url = urlparse(base_url)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return None
    except OSError as e:
        return f"cannot reach {base_url} ({e})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m distgan.dashboard", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--entity", default=os.environ.get("WANDB_ENTITY"), help="W&B user or team (default: WANDB_ENTITY)")
    p.add_argument("--project", default=os.environ.get("WANDB_PROJECT", t.DEFAULT_PROJECT),
                   help="W&B project (default: WANDB_PROJECT, else distgan)")
    p.add_argument("--name", default=WORKSPACE_NAME, help="workspace (view) name")
    p.add_argument("--dry-run", action="store_true", help="print the sections and panel keys; save nothing")
    args = p.parse_args(argv)
    if not args.entity:
        if not args.dry_run:
            p.error("--entity is required (or set WANDB_ENTITY)")
        args.entity = "<entity>"
    workspace = build_workspace(args.entity, args.project, args.name)
    plan = describe(workspace)
    if args.dry_run:
        print(plan)
        return 0
    import wandb

    base_url = os.environ.get("WANDB_BASE_URL") or wandb.Settings().base_url  # else wandb's default server
    problem = server_reachable(base_url)
    if problem is None:
        try:
            workspace.save()
            print(f"saved: {workspace.url}")
            return 0
        except Exception as e:  # noqa: BLE001 - no key, no permission, server error: say so, show the plan
            problem = first_line(e, with_type=True)
    print(plan)
    print(f"not saved: {problem}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
