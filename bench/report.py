"""Render a benchmark record (the dict ``run.py`` saves as JSON) as tables, JSON and a chart.

Everything here reads only the record, so an old ``bench/results/*.json`` can be
re-rendered: ``report.render(json.load(open(path)))``. One table renderer,
``format_table``, draws every table, fixed-width or GitHub markdown.
"""

import json
import math

DASH = "—"
OPERATION_ORDER = ("grad_norm", "all_finite", "clip_grad_norm_", "clip_grad_value_")


# ------------------------------------------------------------ numbers


def _three_digits(value):
    """``value`` with three significant digits, no exponent for 1e-3 <= value < 1e6."""
    if value == 0:
        return "0"
    if not 1e-3 <= abs(value) < 1e6:
        return f"{value:.2e}"
    decimals = max(0, 2 - math.floor(math.log10(abs(value))))
    return f"{value:.{decimals}f}"


def seconds(value):
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if value >= scale:
            return f"{_three_digits(value / scale)} {unit}"
    return f"{_three_digits(value * 1e9)} ns"


def _percent(value):
    return f"{100 * value:.0f}%"


def _relative_error(value):
    if value is None:
        return DASH
    return "0" if value == 0 else f"{value:.1e}"


# -------------------------------------------------------------- tables


def format_table(columns, rows, markdown=False):
    """``columns``: ``(title, align)`` pairs, align ``"<"`` or ``">"``; ``rows``: lists of
    strings, ``None`` marking a break between groups (a blank line; markdown has none)."""
    titles = [title for title, _ in columns]
    if markdown:
        rule = ["---:" if align == ">" else "---" for _, align in columns]
        lines = [titles, rule] + [row for row in rows if row is not None]
        return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)
    widths = [max([len(title)] + [len(row[i]) for row in rows if row is not None]) for i, title in enumerate(titles)]

    def line(cells):
        return "  ".join(f"{cell:{align}{width}}" for cell, (_, align), width in zip(cells, columns, widths)).rstrip()

    out = [line(titles), line(["-" * width for width in widths])]
    out += ["" if row is None else line(row) for row in rows]
    return "\n".join(out)


def machine_summary(record):
    machine = record["machine"]
    torch = f"torch {machine['torch']} ({machine['torch_threads']} threads)" if machine["torch"] else "no torch"
    return (
        f"{machine['cpu_model']}, {machine['cpus_usable']} usable of {machine['cpu_count']} CPUs; "
        f"numpy {machine['numpy']}, numba {machine['numba']} ({machine['numba_threading_layer']}, "
        f"{machine['NUMBA_NUM_THREADS']} threads), {torch}; gradclip {machine['gradclip']} ({machine['git']}); "
        f"load average {machine['load_average_at_start'][0]:.1f} at the start, "
        f"{machine['load_average'][0]:.1f} at the end"
    )


def _repeats_made(workload):
    """The repeats actually made ("3-7" where --quick cut some operations short)."""
    counts = {len(r["samples_s"]) for rows in workload["operations"].values() for r in rows.values()}
    low, high = min(counts), max(counts)
    return str(low) if low == high else f"{low}-{high}"


def workloads_table(record, markdown=False):
    columns = [
        ("workload", "<"), ("what", "<"), ("dtype", "<"), ("leaves", ">"), ("elements", ">"), ("MB", ">"),
        ("repeats", ">"), ("probe read GB/s", ">"), ("probe r+w GB/s", ">"), ("copyto GB/s", ">"),
    ]  # fmt: skip
    rows = [
        [
            w["name"], w["title"], w["dtype"], f"{w['leaves']:,}", f"{w['elements']:,}", f"{w['bytes'] / 1e6:.1f}",
            _repeats_made(w), _three_digits(w["probe"]["read_gbps"]), _three_digits(w["probe"]["read_write_gbps"]),
            _three_digits(w["probe"]["copyto_gbps"]),
        ]  # fmt: skip
        for w in record["workloads"]
    ]
    return format_table(columns, rows, markdown)


def results_table(record, markdown=False):
    """One row per (workload, operation, contender), grouped by workload."""
    columns = [
        ("workload", "<"), ("operation", "<"), ("contender", "<"), ("median", ">"), ("min", ">"), ("GB/s", ">"),
        ("of limit", ">"), ("ns/leaf", ">"), ("vs torch", ">"), ("rel. error", ">"),
    ]  # fmt: skip
    rows = []
    for w in record["workloads"]:
        if rows:
            rows.append(None)
        first_of_workload = True
        for op in OPERATION_ORDER:
            for contender, r in w["operations"].get(op, {}).items():
                speedup = r.get("speedup_vs_torch_foreach")
                rows.append([
                    w["name"] if first_of_workload else "",
                    op,
                    contender + (" (!)" if r["problems"] else ""),
                    seconds(r["median_s"]),
                    seconds(r["min_s"]),
                    _three_digits(r["gbps"]),
                    _percent(r["of_limit"]),
                    f"{r['ns_per_leaf']:,.0f}",
                    f"{speedup:.2f}x" if speedup is not None else "",
                    _relative_error(r["relative_error"]),
                ])  # fmt: skip
                first_of_workload = False
    return format_table(columns, rows, markdown)


def private_table(record, markdown=False):
    """One row per (private workload, contender)."""
    columns = [
        ("workload", "<"), ("operation", "<"), ("contender", "<"), ("median", ">"), ("min", ">"), ("GB/s", ">"),
        ("samples/s", ">"), ("of limit", ">"), ("gradclip x", ">"), ("norm err", ">"), ("sum / noise err", ">"),
    ]  # fmt: skip
    rows = []
    for w in record["private"]:
        if rows:
            rows.append(None)
        for i, (contender, r) in enumerate(w["rows"].items()):
            rate = r["samples_per_s"]
            rows.append([
                f"{w['name']} {w['title']}" if i == 0 else "",
                w["operation"] if i == 0 else "",
                contender,
                seconds(r["median_s"]),
                seconds(r["min_s"]),
                _three_digits(r["gbps"]),
                f"{rate:.3g}" if rate else DASH,
                _percent(r["of_limit"]),
                "" if contender == "gradclip" else f"{r['gradclip_speedup']:.2f}x",
                _relative_error(r["norm_error"]),
                _relative_error(r["error"]),
            ])  # fmt: skip
    return format_table(columns, rows, markdown)


def private_memory_lines(record):
    """gradclip's peak traced allocation per clipped-sum workload, against the result's size."""
    lines = []
    for w in record["private"]:
        if w["memory"]:
            peak, result = w["memory"]["peak_bytes"], w["memory"]["result_bytes"]
            lines.append(
                f"{w['name']}: clipped_sum's peak allocation {peak / 1e6:.1f} MB, "
                f"{peak / result:.3f}x the result's {result / 1e6:.1f} MB"
            )
    return lines


def cold_start_table(record, markdown=False):
    labels = {
        "import": "import gradclip",
        "first_call_warm_cache": "first clip_grad_norm_ on W5, warm disk cache",
        "first_call_cold_cache": "first clip_grad_norm_ on W5, cold cache (compiles)",
        "numba_import": "floor: import numpy, numba",
        "numba_first_call": "floor: first call of a one-loop cached @njit function",
    }
    columns = [("cold start (fresh interpreter)", "<"), ("median", ">"), ("min", ">"), ("runs", ">")]
    rows = []
    for key, label in labels.items():
        figure = record["cold_start"].get(key)
        if figure is None:  # results written before the floor was measured
            continue
        rows.append([label, seconds(figure["median_s"]), seconds(figure["min_s"]), str(len(figure["samples_s"]))])
    return format_table(columns, rows, markdown)


def problems(record):
    """Lines naming every contender whose warm-up check failed."""
    return [
        f"(!) {w['name']} {op} {contender}: {problem}"
        for w in record["workloads"]
        for op, rows in w["operations"].items()
        for contender, r in rows.items()
        for problem in r["problems"]
    ]


PRIVATE_LEGEND = (
    "Private training: WD1/WD2 the sum of clipped per-example gradients (bound: the median example norm; Opacus' "
    "factor for gradclip), WD3 a DP-FedAvg round (clip, average, noise; Flower's factor), WN noise added in "
    "place. GB/s: two passes over the bytes (two reads; WN a read and a write). of limit: the probe's two read "
    "passes (WN: its read+write pass) / median. gradclip x: this contender's median / gradclip's. norm err: "
    "per-example norms vs float64; sum / noise err: the sum (WD3 without noise) vs a float64 one with the "
    "contender's own factor, relative to its largest value, or (WN) |std of the added noise / std - 1|."
)


def render(record, markdown=False):
    """Every table of ``record``, fixed-width or markdown."""
    legend = (
        "GB/s: gradient bytes (x2 for the clips, which write; accumulate adds its buffers' read and write) per "
        "second. of limit: the bandwidth probe's time for the same passes (accumulate: its bytes at the probe's "
        "read+write rate) / median. vs torch: torch foreach=True median / gradclip median (gradclip on the NumPy "
        "arrays, gradclip.torch on the tensors). rel. error: the returned norm vs a float64 reference."
    )
    parts = [machine_summary(record), *record["notes"]]
    if record["workloads"]:
        parts += [workloads_table(record, markdown), results_table(record, markdown)]
    if record.get("private"):
        parts += [private_table(record, markdown), "\n".join(private_memory_lines(record)), PRIVATE_LEGEND]
    if record["cold_start"]:
        parts.append(cold_start_table(record, markdown))
    parts.append(legend)
    if problems(record):
        parts.append("\n".join(problems(record)))
    return "\n\n".join(parts)


# --------------------------------------------------------- JSON, chart


def write_json(record, path):
    with open(path, "w") as out:
        json.dump(record, out, indent=1, default=lambda value: value.item())  # NumPy scalars
        out.write("\n")


PROBE_SERIES = "limit (probe)"


def _gbps(rows, series):
    """GB/s of one contender, or (``PROBE_SERIES``) the probe's for the same traffic; 0 if absent."""
    if series == PROBE_SERIES:
        any_row = next(iter(rows.values()))
        return any_row["gbps"] / any_row["of_limit"]  # = traffic / probe time
    return rows[series]["gbps"] if series in rows else 0.0


def plot(record, path):
    """Save a bar chart of GB/s (one panel per operation); returns a line saying what happened."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: --plot skipped"
    workloads = [w["name"] for w in record["workloads"]]
    series = record["settings"]["contenders"] + [PROBE_SERIES]
    figure, axes = plt.subplots(len(OPERATION_ORDER), 1, figsize=(max(8, 1.3 * len(workloads)), 12), sharex=True)
    width = 0.8 / len(series)
    for axis, op in zip(axes, OPERATION_ORDER):
        for k, name in enumerate(series):
            values = [_gbps(w["operations"][op], name) for w in record["workloads"]]
            offsets = [i + (k - (len(series) - 1) / 2) * width for i in range(len(workloads))]
            style = {"color": "0.75", "hatch": "//"} if name == PROBE_SERIES else {}
            axis.bar(offsets, values, width, label=name, **style)
        axis.set_yscale("log")
        axis.set_ylabel("GB/s")
        axis.set_title(op, fontsize=10)
        axis.grid(axis="y", alpha=0.3)
    axes[-1].set_xticks(range(len(workloads)), workloads)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.suptitle(f"gradclip benchmarks, {record['started_utc']}\n{record['machine']['cpu_model']}", fontsize=10)
    figure.tight_layout(rect=(0, 0.03, 1, 1))
    figure.legend(handles, labels, loc="lower center", ncol=len(series), fontsize=8, frameon=False)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return f"plot saved to {path}"
