"""Reading manifests, label files and dictionaries line by line, the way fairseq does.

fairseq iterates over a text-mode file (`for line in open(path)`), so a line ends only at
`\n` (or `\r\n` / a lone `\r`: Python's universal newlines). `str.splitlines()` also breaks at
`\x0b`, `\x0c`, `\x1c`-`\x1e`, `\x85`, `\u2028` and `\u2029`, characters that can sit inside a
transcript: a label file with one of them would gain a line and shift every label after it
against its audio row.
"""

from __future__ import annotations

from pathlib import Path


def read_lines(path: str | Path) -> list[str]:
    """The lines of a UTF-8 text file without their line ends, split as fairseq splits them."""
    with open(path, encoding="utf-8") as handle:  # text mode: newline=None, universal newlines
        return [line[:-1] if line.endswith("\n") else line for line in handle]
