"""Render result tables as Markdown, LaTeX (booktabs), CSV and one self-contained HTML page."""

from __future__ import annotations

import csv
import html
import io

from repro.report.effect import Effect
from repro.report.paper import SPLITS
from repro.report.tables import SPLIT_TITLES, ComputeRow, Table, format_cell

ROW_HEADER = ["Model", "Unlabeled", "Labeled", "LM"]


def _row_cells(table: Table, rows=None):
    for row in table.rows if rows is None else rows:
        cells = [row.model, row.pretrain_data, row.labeled_data, row.lm]
        cells += [format_cell(row, split, table.synthetic) for split in SPLITS]
        yield row, cells


def _cell_legend(table: Table) -> str:
    return "WER (%)" if table.synthetic else "WER (%): ours / paper / difference"


def _hours(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _rows(count: int, what: str) -> str:
    return f"{count} {what} row{'' if count == 1 else 's'}"


def _layout(tables: list[Table]) -> tuple[list[tuple[Table, list, list]], list[tuple[Table, list]]]:
    """What a page shows first and what it folds: ([(table, rows run, rows not run)] for every table with a
    run, the synthetic corpus's first; [(table, rows)] for the tables none of whose rows ran)."""
    shown, folded = [], []
    for table in sorted(tables, key=lambda t: not t.synthetic):  # what this suite ran on its own corpus first
        ran = [row for row in table.rows if row.status != "not run"]
        not_run = [row for row in table.rows if row.status == "not run"]
        if ran:
            shown.append((table, ran, not_run))
        else:
            folded.append((table, not_run))
    return shown, folded


def _markdown_table(table: Table, rows, status: bool = True) -> list[str]:
    header = ROW_HEADER + [SPLIT_TITLES[s] for s in SPLITS] + (["Status"] if status else [])
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row, cells in _row_cells(table, rows):
        out.append("| " + " | ".join(cells + ([row.status] if status else [])) + " |")
    return out + [""]


def to_markdown(tables: list[Table], compute: list[ComputeRow], effect: Effect | None = None) -> str:
    """Markdown laid out as the HTML page: the demo's verdict when there is one, the rows that ran, then
    the paper rows not run folded under <details>."""
    out = ["# Results beside the paper", ""]
    if effect is not None:
        out += ["## What the demo shows", "", f"Verdict: {effect.verdict}", ""]
        out += effect.check_lines("- ") + [""]
        if effect.self_training_sentence:
            out += [effect.self_training_sentence, ""]
    shown, folded = _layout(tables)
    for table, ran, not_run in shown:
        out += [f"## {table.title}", "", _cell_legend(table) + ".", ""]
        out += _markdown_table(table, ran)
        if not_run:
            out += [f"<details><summary>{_rows(len(not_run), 'more paper')}, not run</summary>", ""]
            out += _markdown_table(table, not_run, status=False) + ["</details>", ""]
    out += ["## Compute", "", "| Run | Status | GPUs | Wall hours | GPU-hours | Paper GPU-hours |", "|---|---|---|---|---|---|"]
    for c in compute:
        out.append(
            f"| {c.run} | {c.status} | {c.gpus} | {_hours(c.wall_hours)} | {_hours(c.gpu_hours)} | {_hours(c.paper_gpu_hours)} |"
        )
    for table, rows in folded:
        out += ["", f"<details><summary>{table.title}: {_rows(len(rows), 'paper')}, none run</summary>", "",
                _cell_legend(table) + ".", ""]
        out += _markdown_table(table, rows, status=False) + ["</details>"]
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
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1100px;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:1em 0;font-size:14px}
th,td{border-bottom:1px solid #ddd;padding:4px 10px;text-align:left}
th{border-bottom:2px solid #444}
td.num{font-variant-numeric:tabular-nums;text-align:right}
td.group{font-weight:600;background:#f6f8fa}
.status-finished{color:#1a7f37}.status-failed{color:#cf222e}.status-running{color:#9a6700}.status-not{color:#888}
.verdict{font-size:1.15em;font-weight:600;margin:1em 0}
.met{color:#1a7f37}.unmet{color:#cf222e}
ul.checks{list-style:none;padding-left:0}
figure{margin:1.5em 0}
figure img{width:100%;max-width:1000px;border:1px solid #eee}
details{margin:1em 0}summary{cursor:pointer;color:#555}
"""


def _results_table(table: Table, rows) -> list[str]:
    e = html.escape
    out = ["<table><thead><tr>"]
    out += [f"<th>{e(h)}</th>" for h in ROW_HEADER + [SPLIT_TITLES[s] for s in SPLITS] + ["Status"]]
    out.append("</tr></thead><tbody>")
    for row in rows:
        cells = [row.model, row.pretrain_data, row.labeled_data, row.lm]
        cells += [format_cell(row, split, table.synthetic) for split in SPLITS]
        out.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in cells[:4]))
        out.append("".join(f"<td class='num'>{e(c)}</td>" for c in cells[4:]))
        out.append(f"<td class='status-{e(row.status.split()[0])}'>{e(row.status)}</td></tr>")
    out.append("</tbody></table>")
    return out


def _effect_html(effect: Effect, context: dict | None) -> list[str]:
    """What was run, the verdict, the goal checks and the Table-1-shaped grid of the demo."""
    e = html.escape
    out = []
    if context:
        steps = context.get("steps") or []
        trained = [s for s in steps if s.get("seconds")]  # resumed steps keep the time they took when they ran
        timing = ""
        if trained:
            minutes = sum(s["seconds"] for s in trained) / 60
            peak = max(s["peak_rss_mb"] for s in trained)
            timing = f" {len(trained)} steps took {minutes:.1f} min in all, peak resident memory {peak:.0f} MiB"
            timed = [s for s in trained if s.get("started")]
            if len(timed) > 1:  # steps run side by side (demo.processes): the wall time is shorter than the sum
                span = max(s["started"] + s["seconds"] for s in timed) - min(s["started"] for s in timed)
                timing += f" per step; {span / 60:.1f} min of wall time with steps side by side"
            timing += "."
        out.append(
            f"<p>What was run: the demo's <b>{e(str(context.get('size', '')))}</b> size — a "
            f"{e(str(context.get('corpus_hours', '')))} h synthetic corpus, pretraining, then CTC fine-tuning on the "
            f"{', '.join(effect.labeled_splits) or 'labeled'} analogues from the pretrained encoder and from scratch, "
            f"each decoded with Viterbi and a 4-gram; {context.get('threads', '?')} torch thread(s).{timing}</p>"
        )
    out.append(f"<p class='verdict'>{e(effect.verdict)}</p>")
    if effect.self_training_sentence:
        out.append(f"<p>{e(effect.self_training_sentence)}</p>")
    if effect.checks:
        out.append("<ul class='checks'>")
        for check in effect.checks:
            mark, css = ("&#10003;", "met") if check.met else ("&#10007;", "unmet")
            out.append(f"<li class='{css}'>{mark} {e(check.text)}</li>")
        out.append("</ul>")
    if not effect.wer:
        return out
    out.append("<h2>Word error rate (%), laid out as the paper's Table 1</h2>")
    out.append("<table><thead><tr><th>Labeled</th><th>Encoder</th><th>LM</th>")
    out += [f"<th>{e(SPLIT_TITLES[s])}</th>" for s in SPLITS]
    out.append("<th>dev-other gain</th><th>dev-other letter error</th></tr></thead><tbody>")
    for labeled in effect.labeled_splits:
        for variant, label in (("pretrained", "pretrained"), ("scratch", "from scratch")):
            for decoding, lm in (("viterbi", "None"), ("kenlm_4gram", "4-gram")):
                values = effect.wer.get((labeled, variant, decoding))
                if values is None:
                    continue
                cells = "".join(
                    f"<td class='num'>{'-' if values.get(s) is None else f'{values[s]:.1f}'}</td>" for s in SPLITS)
                gain = effect.relative_gain(labeled, decoding=decoding) if variant == "pretrained" else None
                gain_cell = "" if gain is None else f"{gain:+.0%}"
                letters = effect.uer.get((labeled, variant, decoding), {}).get("dev_other")
                letter_cell = "-" if letters is None else f"{letters:.1f}"
                out.append(f"<tr><td>{e(labeled)}</td><td>{label}</td><td>{lm}</td>{cells}"
                           f"<td class='num'>{gain_cell}</td><td class='num'>{letter_cell}</td></tr>")
    out.append("</tbody></table>")
    out.append("<p>dev-other gain: relative WER reduction of the pretrained model over its from-scratch twin "
               "with the same labels and decoding. Letter error: the unit error rate (%) on dev-other, which moves "
               "before the word error rate does.</p>")
    return out


def to_html(tables: list[Table], compute: list[ComputeRow], plots: dict[str, str], title: str = "repro report",
            effect: Effect | None = None, context: dict | None = None,
            captions: dict[str, str] | None = None) -> str:
    """A single HTML file (plots embedded as base64 PNG, no network needed). It leads with what was run:
    the demo's effect when there is one, then every table row that has a run; rows never run are folded
    under a closed <details>."""
    e = html.escape
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{_STYLE}</style></head><body>"]
    out.append(f"<h1>{e(title)}</h1>")
    if effect is not None:
        out += _effect_html(effect, context)
    if plots:
        out.append("<h2>Learning curves</h2>")
        for name, png_base64 in plots.items():
            caption = (captions or {}).get(name, name.replace("_", " "))
            out.append(f"<figure><img alt='{e(caption)}' src='data:image/png;base64,{png_base64}'>"
                       f"<figcaption>{e(caption)}</figcaption></figure>")
    shown, folded = _layout(tables)
    for table, ran, not_run in shown:
        out.append(f"<h2>{e(table.title)}</h2><p>{e(_cell_legend(table))}</p>")
        out += _results_table(table, ran)
        if not_run:
            out.append(f"<details><summary>{_rows(len(not_run), 'more paper')}, not run</summary>")
            out += _results_table(table, not_run)
            out.append("</details>")
    if compute:
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
    for table, rows in folded:
        out.append(f"<details><summary>{e(table.title)}: {_rows(len(rows), 'paper')}, none run</summary>")
        out.append(f"<p>{e(_cell_legend(table))}</p>")
        out += _results_table(table, rows)
        out.append("</details>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"
