"""fairseq audio manifests (`<split>.tsv`, fairseq_spec.md §4.1-4.2).

Line 1 is the root directory; every following line is `relative/path<TAB>num_samples`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from repro.data.lines import read_lines


class ManifestError(ValueError):
    """A malformed manifest (the message names the file and line)."""


@dataclass(frozen=True)
class ManifestEntry:
    rel_path: str
    """Audio path relative to the manifest root."""
    num_samples: int
    """Length in samples (frames per channel) as written by the manifest tool."""


@dataclass
class Manifest:
    root: Path
    """Directory the relative paths start from (first manifest line)."""
    entries: list[ManifestEntry] = field(default_factory=list)
    """Rows in file order."""
    path: Path | None = None
    """File this manifest was read from, for error messages."""

    def audio_path(self, index: int) -> Path:
        return self.root / self.entries[index].rel_path

    def __len__(self) -> int:
        return len(self.entries)


def read_manifest(path: str | Path) -> Manifest:
    """Parse a manifest; a malformed line raises `ManifestError` naming file and line."""
    path = Path(path)
    try:
        lines = read_lines(path)
    except (OSError, UnicodeDecodeError) as error:
        raise ManifestError(f"{path}: cannot read manifest: {error}") from error
    if not lines or not lines[0].strip():
        raise ManifestError(f"{path}:1: expected the root directory on the first line")
    manifest = Manifest(root=Path(lines[0].strip()), path=path)
    for line_number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.rstrip("\n").split("\t")
        if len(parts) < 2:
            raise ManifestError(
                f"{path}:{line_number}: expected 'relative/path<TAB>num_samples', got {line!r}"
            )
        rel_path, size_field = parts[0], parts[1]
        try:
            num_samples = int(size_field)
        except ValueError:
            raise ManifestError(
                f"{path}:{line_number}: num_samples {size_field!r} is not an integer in {line!r}"
            ) from None
        if num_samples < 0:
            raise ManifestError(f"{path}:{line_number}: negative num_samples {num_samples}")
        manifest.entries.append(ManifestEntry(rel_path=rel_path, num_samples=num_samples))
    return manifest


def format_manifest(root: str | Path, entries: Iterable[ManifestEntry]) -> str:
    rows = [str(root)] + [f"{entry.rel_path}\t{entry.num_samples}" for entry in entries]
    return "\n".join(rows) + "\n"


def write_manifest(path: str | Path, root: str | Path, entries: Iterable[ManifestEntry]) -> None:
    """Write `root` then one `rel_path<TAB>num_samples` row per entry."""
    entries = list(entries)
    for entry in entries:
        if any(character in entry.rel_path for character in "\t\n\r"):
            raise ManifestError(f"{path}: path {entry.rel_path!r} contains a tab or line break")
    Path(path).write_text(format_manifest(root, entries), encoding="utf-8")
