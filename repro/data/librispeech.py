"""LibriSpeech / Libri-light corpus layout: split definitions and transcripts.

Transcripts live beside the audio as `<speaker>-<chapter>.trans.txt` with lines
`<utterance-id> WORD WORD ...`; labels follow fairseq's `libri_labels.py` (fairseq_spec.md §4.3):
`.wrd` = the words, `.ltr` = letters separated by spaces with `|` closing every word.

The split names are fairseq-style (underscores). The limited-supervision sets are Libri-light's
`librispeech_finetuning` folders, used whole and never re-sampled (wav2vec 2.0 §4.1):
10 min = `1h/0`, 1 h = all six `1h/{0..5}`, 10 h = `1h/` + `9h/`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from repro.data.lines import read_lines

FINETUNING_DIR = "librispeech_finetuning"
FINETUNING_1H = tuple(
    f"{FINETUNING_DIR}/1h/{part}/{kind}" for part in range(6) for kind in ("clean", "other")
)
FINETUNING_9H = tuple(f"{FINETUNING_DIR}/9h/{kind}" for kind in ("clean", "other"))


@dataclass(frozen=True)
class SplitDefinition:
    name: str
    """fairseq-style split name: `<name>.tsv`, `<name>.wrd`, `<name>.ltr`."""
    folders: tuple[str, ...]
    """Folders (relative to the corpus root) whose audio together forms the split."""
    description: str
    """What the paper calls it."""
    is_train: bool
    """Training split (its letters count towards dict.ltr.txt)."""


SPLITS: dict[str, SplitDefinition] = {
    split.name: split
    for split in (
        SplitDefinition(
            "train_960", ("train-clean-100", "train-clean-360", "train-other-500"), "LibriSpeech 960 h", True
        ),
        SplitDefinition("train_clean_100", ("train-clean-100",), "LibriSpeech train-clean-100 (100 h)", True),
        SplitDefinition("train_10h", FINETUNING_1H + FINETUNING_9H, "Libri-light 10 h (1h/ + 9h/)", True),
        SplitDefinition("train_1h", FINETUNING_1H, "Libri-light 1 h (1h/0..5)", True),
        SplitDefinition("train_10m", FINETUNING_1H[:2], "Libri-light 10 min (1h/0)", True),
        SplitDefinition("dev_clean", ("dev-clean",), "LibriSpeech dev-clean", False),
        SplitDefinition("dev_other", ("dev-other",), "LibriSpeech dev-other", False),
        SplitDefinition("test_clean", ("test-clean",), "LibriSpeech test-clean", False),
        SplitDefinition("test_other", ("test-other",), "LibriSpeech test-other", False),
    )
}

# Where a folder may sit relative to the ROOT given on the command line: the LibriSpeech
# tarballs unpack into `LibriSpeech/`, Libri-light's fine-tuning set into `librispeech_finetuning/`.
CONTAINER_DIRS = ("", "LibriSpeech")


def locate_folder(root: str | Path, folder: str) -> Path | None:
    """The directory `folder` under `root` (or `root/LibriSpeech`), or None if absent."""
    for container in CONTAINER_DIRS:
        candidate = Path(root) / container / folder
        if candidate.is_dir():
            return candidate
    return None


def locate_split(root: str | Path, split: SplitDefinition) -> tuple[list[Path], list[str]]:
    """(found directories, missing folder names) of a split."""
    found: list[Path] = []
    missing: list[str] = []
    for folder in split.folders:
        location = locate_folder(root, folder)
        if location is None:
            missing.append(folder)
        else:
            found.append(location)
    return found, missing


# ------------------------------------------------------------------------------------------------
# Labels


class TranscriptError(LookupError):
    """A missing transcript file or utterance (the message names the audio file)."""


def words_to_letters(words: str) -> str:
    """fairseq's letter labels: `HELLO WORLD` -> `H E L L O | W O R L D |`."""
    return " ".join(words.replace(" ", "|")) + " |"


def parse_transcript_file(path: Path) -> dict[str, str]:
    """utterance id -> words (single-spaced) of one `.trans.txt` file."""
    texts: dict[str, str] = {}
    for line_number, line in enumerate(read_lines(path), start=1):
        items = line.split()
        if not items:
            continue
        if items[0] in texts:
            raise TranscriptError(f"{path}:{line_number}: utterance {items[0]!r} appears twice")
        texts[items[0]] = " ".join(items[1:])
    return texts


def transcript_files(directory: Path) -> list[Path]:
    """The chapter's `<speaker>-<chapter>.trans.txt` (fairseq's name), else every `*.trans.txt` there."""
    canonical = directory / f"{directory.parent.name}-{directory.name}.trans.txt"
    if canonical.is_file():
        return [canonical]
    return sorted(directory.glob("*.trans.txt"))


class TranscriptLookup:
    """Words of an audio file from the `.trans.txt` beside it (files are read once per directory)."""

    def __init__(self) -> None:
        self._by_directory: dict[Path, dict[str, str]] = {}

    def _directory_texts(self, directory: Path) -> dict[str, str]:
        if directory not in self._by_directory:
            texts: dict[str, str] = {}
            for path in transcript_files(directory):
                texts.update(parse_transcript_file(path))
            self._by_directory[directory] = texts
        return self._by_directory[directory]

    def words(self, audio_path: str | Path) -> str:
        audio_path = Path(audio_path)
        # fairseq's utterance id: the base name up to its first dot.
        utterance_id = audio_path.name.split(".")[0]
        texts = self._directory_texts(audio_path.parent)
        if utterance_id not in texts:
            if not transcript_files(audio_path.parent):
                raise TranscriptError(f"{audio_path}: no *.trans.txt transcript file in {audio_path.parent}")
            raise TranscriptError(
                f"{audio_path}: utterance {utterance_id!r} is not in "
                + ", ".join(str(path) for path in transcript_files(audio_path.parent))
            )
        return texts[utterance_id]
