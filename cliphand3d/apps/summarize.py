"""One table over many runs: every metrics.json under a folder, with the Hydra overrides of its run.

`python scripts/summarize.py multirun/2026-11-24/10-00-00 [--csv out.csv] [--md out.md]`; with
`--over seed`, runs that differ only in their seed become one row (mean [min, max], n).
Deliberately free of torch so it starts at once.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
# Headline figures first, in the order papers report them; retrieval keys next, the rest sorted.
METRIC_ORDER = ("pa_mpjpe_mm", "mpjpe_mm", "auc_pa_0_50", "pa_mpvpe_mm", "f5", "f15",
                "epe_mean_mm", "epe_median_mm", "auc_20_50")


def _natural_key(text: str) -> list[Any]:
    # Hydra job folders are 0, 1, ..., 10: sort them as numbers, not as strings.
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(_flatten(v, key))
        elif isinstance(v, (bool, int, float, str)) or v is None:
            out[key] = v
    return out


def _find_overrides(start: Path, root: Path) -> tuple[Path | None, list[str]]:
    """Nearest <dir>/.hydra/overrides.yaml from `start` up to `root`: (run dir, overrides)."""
    for d in (start, *start.parents):
        f = d / ".hydra" / "overrides.yaml"
        if f.is_file():
            try:
                data = yaml.safe_load(f.read_text()) or []
            except yaml.YAMLError as e:
                log.warning("skipping overrides in %s: not valid YAML (%s)", f, e)
                return d, []
            if not isinstance(data, list):
                log.warning("skipping overrides in %s: expected a YAML list of key=value "
                            "strings, got %s", f, type(data).__name__)
                return d, []
            return d, [str(x) for x in data]
        if d == root:
            break
    return None, []


def collect_runs(root: str | os.PathLike) -> list[dict[str, Any]]:
    """Every metrics.json under `root` (hidden folders skipped), sorted by path.

    Each row: {"path": metrics.json's folder relative to root ("." for root itself),
    "run_dir": folder of the nearest .hydra/overrides.yaml relative to root (None if none),
    "overrides": list of "key=value", "metrics": flat dict (nested keys joined by ".")}.
    Unreadable metrics files are skipped with a warning, so one crashed job does not hide the rest.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder; pass a run or multirun folder")
    root = root.resolve()
    rows = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if METRICS_FILE not in filenames:
            continue
        here = Path(dirpath)
        f = here / METRICS_FILE
        try:
            metrics = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            log.warning("skipping %s: not readable JSON (%s)", f, e)
            continue
        if not isinstance(metrics, Mapping):
            log.warning("skipping %s: expected a JSON object of metric -> value", f)
            continue
        run_dir, overrides = _find_overrides(here, root)
        rel = here.relative_to(root).as_posix()
        rows.append({"path": rel if rel else ".",
                     "run_dir": None if run_dir is None
                     else (run_dir.relative_to(root).as_posix() or "."),
                     "overrides": overrides, "metrics": _flatten(metrics)})
    rows.sort(key=lambda r: _natural_key(r["path"]))
    return rows


def metric_columns(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """Default columns: the rows' top-level numeric metric keys in the stable report order.

    Text fields (checkpoint path, protocol) and nested groups (e.g. eval.py's
    `baseline_mean_pose.*`) stay out of the default table; name them in `metrics` to show them.
    """
    keys = {k for r in rows for k, v in r["metrics"].items()
            if "." not in k and isinstance(v, (int, float)) and not isinstance(v, bool)}
    head = [k for k in METRIC_ORDER if k in keys]
    retrieval = sorted((k for k in keys if k.startswith("retrieval") and k not in head),
                       key=_natural_key)
    rest = sorted(keys - set(head) - set(retrieval), key=_natural_key)
    return head + retrieval + rest


def format_value(key: str, value: Any) -> str:
    """mm figures with 2 decimals, AUC / F-scores / retrieval accuracies with 3, other floats with
    4 significant digits, ints as they are."""
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    name = key.rsplit(".", 1)[-1]
    if name.endswith("_mm"):
        return f"{value:.2f}"
    if name.startswith(("auc", "retrieval")) or re.fullmatch(r"f\d+(_.*)?", name):
        return f"{value:.3f}"
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"


def _raw(key: str, value: Any) -> str:
    # repr keeps every digit, so float(cell) gives back the stored number exactly.
    return "" if value is None else repr(value) if isinstance(value, float) else str(value)


def format_table(rows: Sequence[Mapping[str, Any]], fmt: str = "md",
                 metrics: Sequence[str] | None = None) -> str:
    """Rows of `collect_runs` -> a Markdown table (rounded figures) or CSV (full precision).

    Columns: run (path), overrides (space-joined), then `metrics` (default: `metric_columns`).
    Missing values are blank.
    """
    if fmt not in ("md", "csv"):
        raise ValueError(f"fmt={fmt!r}: choose 'md' or 'csv'")
    cols = list(metrics) if metrics is not None else metric_columns(rows)
    header = ["run", "overrides", *cols]
    cell = _raw if fmt == "csv" else format_value
    body = [[r["path"], " ".join(r["overrides"]),
             *[cell(c, r["metrics"].get(c)) for c in cols]] for r in rows]
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(body)
        return buf.getvalue()
    return _markdown(header, body, first_numeric=2)


def _markdown(header: Sequence[str], body: Sequence[Sequence[str]], first_numeric: int) -> str:
    """Padded Markdown table; columns from `first_numeric` on are right-aligned."""
    body = [[c.replace("|", "\\|") for c in line] for line in body]
    widths = [max(3, len(h), *(len(line[i]) for line in body)) for i, h in enumerate(header)]

    def line(cells: Sequence[str], numeric: bool) -> str:
        padded = [c.rjust(w) if numeric and i >= first_numeric else c.ljust(w)
                  for i, (c, w) in enumerate(zip(cells, widths))]
        return "| " + " | ".join(padded) + " |"

    rule = "| " + " | ".join("-" * w if i < first_numeric else "-" * (w - 1) + ":"
                             for i, w in enumerate(widths)) + " |"
    return "\n".join([line(header, False), rule, *(line(b, True) for b in body)]) + "\n"


# --------------------------------------------------------------------------- grouping over seeds
def override_key(override: str) -> str:
    """'+seed=1' -> 'seed': the key an override sets, without Hydra's +, ++ or ~ prefix."""
    return override.split("=", 1)[0].lstrip("+~")


def group_runs(rows: Sequence[Mapping[str, Any]], over: str = "seed") -> list[dict[str, Any]]:
    """Rows of `collect_runs` that differ only in the `over` override -> one group each, in first-seen order.

    Rows also stay apart when their metrics come from different evaluations of the runs (the folder under
    the run, e.g. eval_best vs eval_last, or the `split` they report). Each group: {"label": the overrides
    that tell it from the other groups (all of them when there is one group), "overrides", "values": the
    `over` values of its runs, "n": runs, "rows"}.
    """
    groups: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        rest = [o for o in r["overrides"] if override_key(o) != over]
        values = [o.split("=", 1)[1] for o in r["overrides"] if override_key(o) == over and "=" in o]
        where = _eval_folder(r)
        key = (tuple(sorted(rest)), where, str(r["metrics"].get("split", "")))
        g = groups.setdefault(key, {"overrides": rest, "where": where, "split": key[2], "values": [], "rows": []})
        g["values"] += values
        g["rows"].append(r)
    out = list(groups.values())
    common = set.intersection(*(set(g["overrides"]) for g in out)) if len(out) > 1 else set()
    vary = len({(g["where"], g["split"]) for g in out}) > 1
    for g in out:
        label = " ".join(o for o in g["overrides"] if o not in common) or "(no overrides)"
        if vary:
            label += f" ({g['where'] or '.'}, {g['split'] or 'no split'})"
        g.update(label=label, n=len(g["rows"]))
    return out


def _eval_folder(row: Mapping[str, Any]) -> str:
    # metrics.json's folder below its run folder ('' when it is the run folder)
    if row["run_dir"] is None or row["run_dir"] == row["path"]:
        return ""
    prefix = "" if row["run_dir"] == "." else row["run_dir"] + "/"
    return row["path"][len(prefix):]


def spread(values: Sequence[Any]) -> tuple[float, float, float] | None:
    """(mean, min, max) of the numeric values; None without any; all NaN if one of them is not finite
    (a run that diverged must not vanish into the mean of the others)."""
    nums = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not nums:
        return None
    if not all(math.isfinite(v) for v in nums):
        return (math.nan,) * 3
    return sum(nums) / len(nums), min(nums), max(nums)


def group_columns(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """Default columns of the grouped table: the headline figures and retrieval accuracies found."""
    return [c for c in metric_columns(rows) if c in METRIC_ORDER or c.startswith("retrieval")]


def format_groups(groups: Sequence[Mapping[str, Any]], over: str = "seed", fmt: str = "md",
                  metrics: Sequence[str] | None = None) -> str:
    """Groups of `group_runs` -> Markdown (cells 'mean [min, max]', rounded as `format_value`) or CSV
    (<metric>_mean, _min, _max at full precision). Columns: variant, n, the `over` values, `metrics`."""
    if fmt not in ("md", "csv"):
        raise ValueError(f"fmt={fmt!r}: choose 'md' or 'csv'")
    cols = list(metrics) if metrics is not None else group_columns([r for g in groups for r in g["rows"]])
    stats = [{c: spread([r["metrics"].get(c) for r in g["rows"]]) for c in cols} for g in groups]
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["variant", "n", over, *(f"{c}_{s}" for c in cols for s in ("mean", "min", "max"))])
        for g, st in zip(groups, stats):
            writer.writerow([g["label"], g["n"], " ".join(g["values"]),
                             *(_raw(c, v) for c in cols for v in (st[c] or (None,) * 3))])
        return buf.getvalue()
    body = [[g["label"], str(g["n"]), " ".join(g["values"]), *(_spread_cell(c, st[c], g["n"]) for c in cols)]
            for g, st in zip(groups, stats)]
    return _markdown(["variant", "n", over, *cols], body, first_numeric=1)


def _spread_cell(key: str, st: tuple[float, float, float] | None, n: int) -> str:
    if st is None:
        return ""
    mean, lo, hi = (format_value(key, v) for v in st)
    return mean if n == 1 else f"{mean} [{lo}, {hi}]"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="summarize.py",
        description="Tabulate every metrics.json under a (multi)run folder with its overrides.")
    parser.add_argument("folder", type=Path, help="a Hydra multirun folder or any run folder")
    parser.add_argument("--csv", type=Path, help="also write the table as CSV (full precision)")
    parser.add_argument("--md", type=Path, help="also write the Markdown table to this file")
    parser.add_argument("--metrics", help="comma-separated metric columns (default: all found; with --over, "
                                          "the headline figures and retrieval)")
    parser.add_argument("--over", metavar="KEY", help="one row per group of runs that differ only in this "
                                                      "override (e.g. seed): mean [min, max] and n")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")

    if not args.folder.is_dir():
        print(f"error: {args.folder} is not a folder; pass a run or multirun folder",
              file=sys.stderr)
        return 1
    rows = collect_runs(args.folder)
    if not rows:
        print(f"error: no {METRICS_FILE} under {args.folder}; run scripts/eval.py on the runs "
              "first (it writes metrics.json next to the checkpoint or in its out_dir)",
              file=sys.stderr)
        return 1
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    if args.over:
        groups = group_runs(rows, args.over)

        def render(fmt: str) -> str:
            return format_groups(groups, args.over, fmt, metrics)
    else:
        def render(fmt: str) -> str:
            return format_table(rows, fmt, metrics)
    table = render("md")
    print(table, end="")
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(table)
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        args.csv.write_text(render("csv"), newline="")
    return 0
