"""`python -m repro.report [--runs DIR | --tracking-uri URI] [--out reports/]`.

Collects runs (MLflow first when a store is given or found beside the runs, the run
directories' metrics.jsonl otherwise), joins them with the papers' numbers and writes
`results.md`, `results.tex`, `results.csv`, `report.html` and `plots/*.png` under --out.
"""

from __future__ import annotations

import argparse
import base64
import sys
from pathlib import Path

from repro.report.collect import collect_mlflow, collect_run_dirs
from repro.report.effect import effect_summary
from repro.report.paper import load_paper_rows
from repro.report.plots import PLOT_CAPTIONS, all_plots
from repro.report.render import to_csv, to_html, to_latex, to_markdown
from repro.report.tables import build_tables, compute_rows


def write_report(records, out_dir: Path, title: str = "repro: results beside the paper",
                 context: dict | None = None) -> dict[str, Path]:
    """Write every report file for `records` into `out_dir`; return them by kind. `context` (the demo's
    size, threads and step timings) is described at the top of the HTML page."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tables = build_tables(records, load_paper_rows())
    compute = compute_rows(records)
    synthetic = [r for r in records if r.synthetic]
    effect = effect_summary(synthetic) if synthetic else None
    plots = all_plots(tables, records, chance=effect.chance_accuracy if effect else None,
                      max_code_perplexity=effect.max_code_perplexity if effect else None)
    written = {
        "markdown": out_dir / "results.md",
        "latex": out_dir / "results.tex",
        "csv": out_dir / "results.csv",
        "html": out_dir / "report.html",
    }
    written["markdown"].write_text(to_markdown(tables, compute, effect=effect))
    written["latex"].write_text(to_latex(tables))
    written["csv"].write_text(to_csv(tables))
    (out_dir / "plots").mkdir(exist_ok=True)
    for name, png in plots.items():
        path = out_dir / "plots" / f"{name}.png"
        path.write_bytes(png)
        written[f"plot:{name}"] = path
    encoded = {name: base64.b64encode(png).decode("ascii") for name, png in plots.items()}
    written["html"].write_text(to_html(tables, compute, encoded, title=title, effect=effect, context=context,
                                       captions=PLOT_CAPTIONS))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m repro.report", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="directory holding run directories")
    parser.add_argument("--tracking-uri", help="MLflow store or server to read runs from")
    parser.add_argument("--out", type=Path, default=Path("reports"), help="output directory")
    args = parser.parse_args(argv)

    if args.tracking_uri:
        records = collect_mlflow(args.tracking_uri)
        source = args.tracking_uri
    elif (args.runs / "mlflow.db").exists():
        source = f"sqlite:///{(args.runs / 'mlflow.db').resolve()}"
        records = collect_mlflow(source)
    else:
        if not args.runs.exists():
            print(f"repro.report: no runs directory {args.runs} (use --runs or --tracking-uri)", file=sys.stderr)
            return 2
        records = collect_run_dirs(args.runs)
        source = str(args.runs)
    written = write_report(records, args.out)
    print(f"repro.report: {len(records)} runs from {source}")
    for kind, path in written.items():
        print(f"  {kind:28s} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
