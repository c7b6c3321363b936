"""Render result tables as Markdown, LaTeX (booktabs), CSV and one self-contained HTML page."""

from __future__ import annotations

import csv
import html
import io

from repro.report.paper import SPLITS
from repro.report.tables import SPLIT_TITLES, ComputeRow, Table, format_cell

ROW_HEADER = ["Model", "Unlabeled", "Labeled", "LM"]


def _row_cells(table: Table):
    for row in table.rows:
        cells = [row.model, row.pretrain_data, row.labeled_data, row.lm]
        cells += [format_cell(row, split, table.synthetic) for split in SPLITS]
        yield row, cells


def _cell_legend(table: Table) -> str:
    return "WER (%)" if table.synthetic else "WER (%): ours / paper / difference"


def _hours(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def to_markdown(tables: list[Table], compute: list[ComputeRow]) -> str:
    out = ["# Results beside the paper", ""]
    for table in tables:
        out += [f"## {table.title}", "", _cell_legend(table) + ".", ""]
        header = ROW_HEADER + [SPLIT_TITLES[s] for s in SPLITS] + ["Status"]
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "---|" * len(header))
        for row, cells in _row_cells(table):
            out.append("| " + " | ".join(cells + [row.status]) + " |")
        out.append("")
    out += ["## Compute", "", "| Run | Status | GPUs | Wall hours | GPU-hours | Paper GPU-hours |", "|---|---|---|---|---|---|"]
    for c in compute:
        out.append(
            f"| {c.run} | {c.status} | {c.gpus} | {_hours(c.wall_hours)} | {_hours(c.gpu_hours)} | {_hours(c.paper_gpu_hours)} |"
        )
    return "\n".join(out) + "\n"


_LATEX_SPECIALS = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}"}


def _latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIALS.get(ch, ch) for ch in text)


def to_latex(tables: list[Table]) -> str:
    """One booktabs `table` per results table (needs \\usepackage{booktabs})."""
    out = []
    for table in tables:
        columns = "llll" + "c" * len(SPLITS) + "l"
        out += [
            r"\begin{table}[t]",
            r"\centering",
            r"\small",
            rf"\caption{{{_latex_escape(table.title)}. {_latex_escape(_cell_legend(table))}.}}",
            rf"\begin{{tabular}}{{{columns}}}",
            r"\toprule",
            " & ".join(ROW_HEADER + [SPLIT_TITLES[s] for s in SPLITS] + ["Status"]) + r" \\",
            r"\midrule",
        ]
        for row, cells in _row_cells(table):
            out.append(" & ".join(_latex_escape(c) for c in cells + [row.status]) + r" \\")
        out += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(out)


def to_csv(tables: list[Table]) -> str:
    """Long form: one line per table row and split, with ours, the paper's and the difference."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["table", "row_id", "run", "model", "pretrain_data", "labeled_data", "lm", "split", "ours", "paper", "delta", "status"])
    for table in tables:
        for row in table.rows:
            for split in SPLITS:
                values = [row.ours.get(split), row.paper.get(split), row.delta(split)]
                writer.writerow(
                    [table.title, row.row_id, row.run, row.model, row.pretrain_data, row.labeled_data, row.lm, split]
                    + ["" if v is None else f"{v:.2f}" for v in values]
                    + [row.status]
                )
    return buffer.getvalue()


_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}
th,td{border-bottom:1px solid #ddd;padding:4px 10px;text-align:left}
th{border-bottom:2px solid #444}
td.num{font-variant-numeric:tabular-nums;text-align:right}
.status-finished{color:#1a7f37}.status-failed{color:#cf222e}.status-running{color:#9a6700}.status-not{color:#888}
img{max-width:100%;border:1px solid #eee;margin:0.5em 0}
"""


def to_html(tables: list[Table], compute: list[ComputeRow], plots: dict[str, str], title: str = "repro report") -> str:
    """A single HTML file: tables, compute and the plots embedded as base64 PNG (no network needed)."""
    e = html.escape
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{_STYLE}</style></head><body>"]
    out.append(f"<h1>{e(title)}</h1>")
    for table in tables:
        out.append(f"<h2>{e(table.title)}</h2><p>{e(_cell_legend(table))}</p><table><thead><tr>")
        out += [f"<th>{e(h)}</th>" for h in ROW_HEADER + [SPLIT_TITLES[s] for s in SPLITS] + ["Status"]]
        out.append("</tr></thead><tbody>")
        for row, cells in _row_cells(table):
            out.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in cells[:4]))
            out.append("".join(f"<td class='num'>{e(c)}</td>" for c in cells[4:]))
            out.append(f"<td class='status-{e(row.status.split()[0])}'>{e(row.status)}</td></tr>")
        out.append("</tbody></table>")
    out.append("<h2>Compute</h2><table><thead><tr>")
    out += [f"<th>{h}</th>" for h in ("Run", "Status", "GPUs", "Wall hours", "GPU-hours", "Paper GPU-hours")]
    out.append("</tr></thead><tbody>")
    for c in compute:
        out.append(
            f"<tr><td>{e(c.run)}</td><td>{e(c.status)}</td><td class='num'>{c.gpus}</td>"
            f"<td class='num'>{_hours(c.wall_hours)}</td><td class='num'>{_hours(c.gpu_hours)}</td>"
            f"<td class='num'>{_hours(c.paper_gpu_hours)}</td></tr>"
        )
    out.append("</tbody></table>")
    if plots:
        out.append("<h2>Plots</h2>")
        for name, png_base64 in plots.items():
            out.append(f"<h3>{e(name)}</h3><img alt='{e(name)}' src='data:image/png;base64,{png_base64}'>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"
