"""bench/kernels.py's report: the acceptance checks computed from the records, the Markdown tables (CPU
counts or GPU timings), and the records as a wandb.Table."""

from __future__ import annotations

import json
import os

from kernels import registry

from .cases import DTYPES, MODEL_GPU, MODES, PROVIDERS, STEP, is_g64


def index(records) -> dict:
    return {
        (r["op"], tuple(r["shape"]), r["dtype"], r["mode"], r["provider"], r["metric"]): r for r in records
    }


def _label(op: str) -> str:
    return registry.get(op).label


def _launch_check(idx, cases) -> dict | None:
    """triton launches <= eager launches at every generator layer, batch, dtype and direction."""
    worse, seen, ops = [], 0, []
    for c in cases:
        if not c.label.startswith("G."):
            continue
        ops += [] if c.op in ops else [c.op]
        for mode in ("forward", "backward"):
            t = idx.get((c.op, c.shape, c.dtype, mode, "triton", "launches"))
            e = idx.get((c.op, c.shape, c.dtype, mode, "eager", "launches"))
            if t and e:
                seen += 1
                if t["value"] > e["value"]:
                    worse.append(f"{c.label} {list(c.shape)} {c.dtype} {mode}: {t['value']} > {e['value']}")
    if not seen:
        return None
    return {"check": f"triton launches <= eager launches at every generator {' and '.join(map(_label, ops))} layer "
                     "and batch, forward and backward each", "value": len(worse), "limit": 0, "ok": not worse,
            "violations": worse, "compared": seen}


def _bytes_ratio_checks(idx, cases) -> list[dict]:
    """triton / eager bytes over the generator's layers at batch 64, per op and dtype, against the op's limit."""
    out = []
    for op in registry.ops():
        limit = op.bench.layers_bytes_ratio if op.bench else None
        for dtype in DTYPES if limit is not None else ():
            layers = [c for c in cases if c.op == op.name and c.dtype == dtype and is_g64(c)]
            got = [(idx.get((op.name, c.shape, dtype, "full", "triton", "bytes")),
                    idx.get((op.name, c.shape, dtype, "full", "eager", "bytes"))) for c in layers]
            if not (layers and all(t and e for t, e in got)):
                continue
            ratio = sum(t["value"] for t, _ in got) / sum(e["value"] for _, e in got)
            out.append({"check": f"generator {op.label} layers at batch 64, {dtype}, forward+backward: "
                                 f"triton bytes / eager bytes", "value": round(ratio, 4), "limit": limit,
                        "ok": ratio <= limit, "source": "/".join(sorted({t["source"] for t, _ in got}))})
    return out


def checks(records, cases) -> list[dict]:
    """What the kernels promise at distgan's shapes, computed from the records themselves: fewer bytes than
    eager over the generator's layers at batch 64 (each op's limit in its registry entry), no more launches than
    eager at any generator layer, and never more bytes than eager at any shape."""
    idx = index(records)
    out = _bytes_ratio_checks(idx, cases)
    launches = _launch_check(idx, cases)
    if launches:
        out.append(launches)
    worse = []
    for key, r in idx.items():
        op, shape, dtype, mode, provider, metric = key
        if provider == "triton" and metric == "bytes":
            e = idx.get((op, shape, dtype, mode, "eager", "bytes"))
            if e is not None and r["value"] > e["value"]:
                worse.append(f"{op} {list(shape)} {dtype} {mode}: {r['value']} > {e['value']}")
    out.append(
        {
            "check": "triton bytes <= eager bytes at every shape, dtype and mode",
            "value": len(worse),
            "limit": 0,
            "ok": not worse,
            "violations": worse,
        }
    )
    return out


def fmt_bytes(n) -> str:
    if n is None:
        return "—"
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.3g} {unit}"
    return f"{n:.0f} B"


def fmt_ms(ms) -> str:
    if ms is None:
        return "—"
    return f"{ms * 1e3:.3g} µs" if ms < 1 else f"{ms:.3g} ms"


def _table_header(cols: list[str]) -> list[str]:
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]


def _measured_cases(idx, cases, providers, metric: str, label: bool):
    """(mode, get(provider, metric), the row's first cells) for every case and mode some provider has `metric` for."""
    for c in cases:
        for mode in MODES:

            def get(p, metric, m=mode, c=c):
                return idx.get((c.op, c.shape, c.dtype, m, p, metric))

            if any(get(p, metric) for p in providers):
                shape = "×".join(map(str, c.shape)) + (f" ({c.label})" if label and c.label else "")
                yield mode, get, [_label(c.op), shape, c.dtype, mode]


def table_cpu(records, cases, providers) -> list[str]:
    idx = index(records)
    cols = (
        ["op", "shape", "dtype", "mode"]
        + [f"bytes {p}" for p in providers]
        + ["triton/eager"]
        + [f"launches {p}" for p in providers]
        + [f"saved {p}" for p in providers]
        + [f"model µs {p}" for p in providers]
    )
    lines = _table_header(cols)
    for mode, get, row in _measured_cases(idx, cases, providers, "bytes", label=True):
        for p in providers:
            r = get(p, "bytes")
            row.append(fmt_bytes(r["value"]) + ("*" if r["source"] == "modelled" else "") if r else "n/a")
        t, e = get("triton", "bytes"), get("eager", "bytes")
        row.append(f"{t['value'] / e['value']:.2f}" if t and e else "—")
        for p in providers:
            r = get(p, "launches")
            row.append(str(r["value"]) + ("*" if r["source"] == "modelled" else "") if r else "n/a")
        for p in providers:
            r = get(p, "saved_new_bytes", "forward") if mode != "backward" else None
            row.append(fmt_bytes(r["value"]) if r else "—")
        for p in providers:
            r = get(p, "ms")
            row.append(f"{r['value'] * 1e3:.3g}" if r else "—")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def table_step(records) -> list[str]:
    """distgan's whole training step, eager against triton: launches, bytes, the launch-bound model."""
    rows = sorted({r["shape"][0] for r in records if r["op"] == STEP})
    if not rows:
        return []
    idx = index(records)
    lines = ["", "## The whole training step (distgan's 28x28 DCGAN, fp32)", "",
             f"Counted: one `distgan.step.gan_step` (one D step, one G step: G and D forward and backward, both losses "
             f"and the gradient norms it logs; the optimizers replaced by no-ops), kernels planned for "
             f"{MODEL_GPU['name']}. **Modelled**: a launch-bound step costs {MODEL_GPU['launch_us']:g} µs a kernel "
             f"(an assumed per-launch cost of eager PyTorch, not measured here) plus its bytes at "
             f"{MODEL_GPU['copy_gbps']:.0f} GB/s.", "",
             "| batch | launches eager | launches triton | bytes eager | bytes triton | model µs eager "
             "| model µs triton | triton / eager (model) |", "|---|---|---|---|---|---|---|---|"]
    for b in rows:
        def get(p, metric, b=b):
            r = idx.get((STEP, (b,), "fp32", "full", p, metric))
            return r["value"] if r else None

        le, lt = get("eager", "launches"), get("triton", "launches")
        be, bt = get("eager", "bytes"), get("triton", "bytes")
        me, mt = get("eager", "step_model_us"), get("triton", "step_model_us")
        ratio = f"{mt / me:.2f}" if me and mt else "—"
        lines.append(f"| {b} | {le} | {lt} | {fmt_bytes(be)} | {fmt_bytes(bt)} | {me and f'{me:.0f}'} | "
                     f"{mt and f'{mt:.0f}'} | {ratio} |")
    return lines


def table_gpu(records, cases, providers) -> list[str]:
    idx = index(records)
    cols = (
        ["op", "shape", "dtype", "mode"]
        + [f"{p} ms (p20–p80)" for p in providers]
        + [f"{p} GB/s (% copy)" for p in providers]
        + ["triton vs eager", "triton vs compile"]
        + [f"launches {p}" for p in providers]
        + [f"peak {p}" for p in providers]
    )
    lines = _table_header(cols)
    for _mode, get, row in _measured_cases(idx, cases, providers, "ms", label=False):
        for p in providers:
            r = get(p, "ms")
            g = get(p, "ms_cudagraph")
            cell = f"{fmt_ms(r['value'])} ({fmt_ms(r['p20'])}–{fmt_ms(r['p80'])})" if r else "n/a"
            if g and g["value"] is not None:
                cell += f"; graph {fmt_ms(g['value'])}"
            row.append(cell)
        for p in providers:
            r, pc = get(p, "gbps"), get(p, "pct_copy")
            row.append(f"{r['value']:.0f} ({pc['value']:.0f}%)" if r else "n/a")
        t = get("triton", "ms")
        for other in ("eager", "compile"):
            o = get(other, "ms")
            row.append(f"{o['value'] / t['value']:.2f}×" if t and o else "—")
        for p in providers:
            r = get(p, "launches")
            row.append(str(r["value"]) if r else "n/a")
        for p in providers:
            r = get(p, "peak_bytes")
            row.append(fmt_bytes(r["value"]) if r else "n/a")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def table_compile_report(rows) -> list[str]:
    lines = [
        "| kernel | case | sm | warps | blocks | regs | spills (stack + local B) | shared B (dynamic) "
        "| ld.v4 / ld.global |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        blocks = " ".join(f"{k}={v}" for k, v in r.get("blocks", {}).items())
        lines.append(
            f"| {r['kernel']} | {r['case']} | {r['arch']} | {r['num_warps']} | {blocks} | {r['regs']} | "
            f"{r.get('stack', 0) + r.get('local', 0)} | {r.get('shared', '?')} | "
            f"{r.get('v4_loads', '?')} / {r.get('loads', '?')} |"
        )
    return lines


def _header(result) -> list[str]:
    m, v, g = result["machine"], result["versions"], result["git"]
    gpu = result["device"] == "cuda"
    return [
        f"# Kernel benchmark ({result['preset']}, {'GPU: ' + m['gpu'] if gpu else 'CPU only'})",
        "",
        f"`{result['command']}` — {result['created']}",
        "",
        f"- machine: {m['processor']}, {m['cpu_count']} CPUs" + (f", {m['gpu']}" if gpu else ", no GPU"),
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- git: {g['commit']}" + (" (with uncommitted changes in kernels/ bench/ distgan/)" if g["dirty"] else ""),
        "",
    ]


def _gpu_intro(result) -> list[str]:
    return [
        (
            f"Timed with triton.testing.do_bench (median, p20–p80); copy bandwidth measured in this run: "
            f"{result['copy_gbps']:.0f} GB/s. GB/s uses the minimal-traffic model (forward reads x and "
            "writes z; backward reads x and dz, writes dx). Everything here is **measured**."
        ),
        "",
    ]


def _cpu_intro() -> list[str]:
    return [
        (
            "No GPU: nothing is timed. **Measured** here = counted in this run: bytes each provider moves "
            "per call, kernel launches, bytes saved for backward (`saved` = beyond the op's inputs)."
        ),
        "",
        (
            "- eager bytes: every ATen op dispatched, charged its inputs + outputs once (a lower bound: "
            "batch_norm reads x twice and is charged once)."
        ),
        (
            "- compile bytes: inductor's count of the buffers each generated kernel reads + writes (CPU "
            "backend; on a GPU inductor emits different, Triton kernels)."
        ),
        (
            "- triton bytes: every unmasked lane the interpreter loads or stores, launch plan as on "
            f"{MODEL_GPU['name']} ({MODEL_GPU['sms']} SMs), plus the ATen ops around the kernels."
        ),
        (
            "- `*` = **modelled**: counted at a smaller proxy shape with the same launch plan and scaled "
            "by element count."
        ),
        (
            f"- `model µs` is **modelled**: bytes / {MODEL_GPU['copy_gbps']:.0f} GB/s, the copy bandwidth of "
            f"an {MODEL_GPU['name']} (~90 % of its {MODEL_GPU['peak_gbps']:.0f} GB/s peak); launch latency "
            "not included."
        ),
        "",
    ]


def _checks_section(result) -> list[str]:
    lines = ["", "## Checks", ""]
    for c in result["checks"]:
        lines.append(
            f"- {'PASS' if c['ok'] else 'FAIL'}: {c['check']} = {c['value']} "
            f"(limit {'±' if 'relative' in c['check'] else ''}{c['limit']})"
            + (f" [{c['source']}]" if c.get("source") else "")
        )
        for v_ in c.get("violations", [])[:20]:
            lines.append(f"  - {v_}")
    return lines


def _unavailable_section(result) -> list[str]:
    if not result["unavailable"]:
        return []
    lines = ["", "## Not available here", ""]
    seen = set()
    for u in result["unavailable"]:
        key = (u["provider"], u["reason"])
        if key not in seen:
            seen.add(key)
            lines.append(f"- {u['provider']}: {u['reason']} (first: {u['op']} {u['shape']} {u['dtype']})")
    return lines


def render_markdown(result, cases) -> str:
    gpu = result["device"] == "cuda"
    providers = [p for p in PROVIDERS if any(r["provider"] == p for r in result["records"])]
    lines = _header(result)
    if gpu:
        lines += _gpu_intro(result) + table_gpu(result["records"], cases, providers)
    else:
        lines += _cpu_intro() + table_cpu(result["records"], cases, providers) + table_step(result["records"])
    lines += _checks_section(result) + _unavailable_section(result)
    if result["compile_report"]:
        lines += [
            "",
            "## Static compile report (sm_80 / sm_90, no GPU needed: `python bench/compile_report.py`)",
            "",
        ]
        lines += table_compile_report(result["compile_report"])
    return "\n".join(lines) + "\n"


def log_wandb(result) -> None:
    """The records as one wandb.Table under distgan's key for it (the dashboard reads it there)."""
    import wandb

    try:
        from distgan.tracking import BENCH_TABLE_KEY
    except ImportError:
        BENCH_TABLE_KEY = "bench/kernels"

    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    run = wandb.init(
        project=os.environ.get("WANDB_PROJECT", "distgan"),
        job_type="bench-kernels",
        mode=mode,
        config={k: result[k] for k in ("preset", "device", "machine", "versions", "git")},
    )
    cols = ["op", "shape", "dtype", "mode", "provider", "metric", "value", "unit", "source", "method", "case"]
    table = wandb.Table(
        columns=cols,
        data=[[json.dumps(r[c]) if c == "shape" else r[c] for c in cols] for r in result["records"]],
    )
    run.log({BENCH_TABLE_KEY: table})
    run.summary.update({c["check"]: c["value"] for c in result["checks"]})
    run.finish()


