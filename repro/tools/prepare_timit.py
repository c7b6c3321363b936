"""`python -m repro.tools prepare-timit TIMIT_ROOT --dest DIR`: TIMIT manifests and 39-phone labels (Table 3).

wav2vec 2.0 §4.1: "We use the standard train, dev and test split and follow the standard protocol of
collapsing phone labels to 39 classes." That is:

* train: every TRAIN utterance except the SA dialect sentences (3,696 utterances of 462 speakers);
* dev: the 50-speaker development set drawn from TEST (400 utterances), the list every TIMIT recipe uses;
* test: the 24-speaker core test set (192 utterances);
* labels: the 61 TIMIT phones of each `.PHN` file folded to the 39 classes of Lee & Hon (1989), the glottal
  stop `q` removed, one line of space-separated phones per manifest row.

Writes `DIR/{train,dev,test}.tsv` (fairseq manifests pointing into TIMIT_ROOT: the NIST SPHERE `.WAV`
files are read as they are), `DIR/{train,dev,test}.phn` and `DIR/dict.phn.txt` (all 39 phones, by train
count). Directory and file names are matched case-insensitively (LDC discs are upper case, many copies
lower case). Files that libsndfile cannot read (shorten-compressed SPHERE) are an error naming the file:
decompress them with `sph2pipe` first.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import soundfile
from tqdm import tqdm

from repro.data.manifest import ManifestEntry, write_manifest
from repro.tools.dictionary import dictionary_from_counts

SAMPLE_RATE = 16_000

# The 61 TIMIT phones -> the 39 classes scored since Lee & Hon (1989); None = removed (the glottal stop).
FOLD_61_TO_39: dict[str, str | None] = {
    "aa": "aa", "ao": "aa", "ae": "ae", "ah": "ah", "ax": "ah", "ax-h": "ah", "aw": "aw", "ay": "ay",
    "b": "b", "ch": "ch", "d": "d", "dh": "dh", "dx": "dx", "eh": "eh", "er": "er", "axr": "er", "ey": "ey",
    "f": "f", "g": "g", "hh": "hh", "hv": "hh", "ih": "ih", "ix": "ih", "iy": "iy", "jh": "jh", "k": "k",
    "l": "l", "el": "l", "m": "m", "em": "m", "n": "n", "en": "n", "nx": "n", "ng": "ng", "eng": "ng",
    "ow": "ow", "oy": "oy", "p": "p", "r": "r", "s": "s", "sh": "sh", "zh": "sh", "t": "t", "th": "th",
    "uh": "uh", "uw": "uw", "ux": "uw", "v": "v", "w": "w", "y": "y", "z": "z",
    # closures, pauses, epenthetic silence and the utterance edges are one silence class
    "bcl": "sil", "dcl": "sil", "gcl": "sil", "kcl": "sil", "pcl": "sil", "tcl": "sil", "pau": "sil",
    "epi": "sil", "h#": "sil",
    "q": None,
}
PHONES_39 = sorted({phone for phone in FOLD_61_TO_39.values() if phone is not None})

# The 24 speakers of the core test set (2 male, 1 female per dialect region).
CORE_TEST_SPEAKERS = frozenset("""
    mdab0 mwbt0 felc0 mtas1 mwew0 fpas0 mjmp0 mlnt0 fpkt0 mlll0 mtls0 fjlm0
    mbpm0 mklt0 fnlp0 mcmj0 mjdh0 fmgd0 mgrt0 mnjm0 fdhc0 mjln0 mpam0 fmld0
""".split())
# The 50 speakers of the standard development set (from TEST, disjoint from the core test set).
DEV_SPEAKERS = frozenset("""
    faks0 fdac1 fjem0 mgwt0 mjar0 mmdb1 mmdm2 mpdf0 fcmh0 fkms0 mbdg0 mbwm0 mcsh0 fadg0 fdms0 fedw0 mgjf0
    mglb0 mrtk0 mtaa0 mtdt0 mthc0 mwjg0 fnmr0 frew0 fsem0 mbns0 mmjr0 mdls0 mdlf0 mdvc0 mers0 fmah0 fdrw0
    mrcs0 mrjm4 fcal1 mmwh0 fjsj0 majc0 mjsw0 mreb0 fgjd0 fjmg0 mroa0 mteb0 mjfc0 mrjr0 fmml0 mrws1
""".split())
STANDARD_SIZES = {"train": 3696, "dev": 400, "test": 192}


class TimitError(ValueError):
    """The TIMIT tree is not usable as given (the message names the file or directory)."""


@dataclass(frozen=True)
class Utterance:
    audio: Path
    """The `.WAV` (NIST SPHERE) file."""
    phones: Path
    """Its `.PHN` file."""
    speaker: str
    """Lower-case speaker id, e.g. 'mdab0'."""


def fold_phones(phn_path: Path) -> list[str]:
    """The 39-class phone sequence of one `.PHN` file (`start end phone` lines)."""
    folded = []
    for line_number, line in enumerate(phn_path.read_text(encoding="ascii", errors="replace").splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 3:
            raise TimitError(f"{phn_path}:{line_number}: expected 'start end phone', got {line!r}")
        phone = parts[2].lower()
        if phone not in FOLD_61_TO_39:
            raise TimitError(f"{phn_path}:{line_number}: {phone!r} is not one of the 61 TIMIT phones")
        if FOLD_61_TO_39[phone] is not None:
            folded.append(FOLD_61_TO_39[phone])
    if not folded:
        raise TimitError(f"{phn_path}: no phones")
    return folded


def _child(directory: Path, name: str) -> Path:
    """`directory/name`, matched case-insensitively."""
    for entry in directory.iterdir():
        if entry.name.lower() == name.lower():
            return entry
    raise TimitError(f"{directory} has no {name.upper()} directory (is it the TIMIT root?)")


def find_utterances(part_dir: Path) -> list[Utterance]:
    """Every `DR*/SPEAKER/UTT.WAV` with its `.PHN` below TRAIN or TEST, SA sentences left out, sorted."""
    utterances = []
    for audio in sorted(part_dir.glob("*/*/*")):
        if audio.suffix.lower() != ".wav" or not audio.parent.parent.name.lower().startswith("dr"):
            continue
        if audio.stem.lower().startswith("sa"):
            continue  # the two dialect sentences every speaker reads: excluded by the standard protocol
        phones = next((p for p in audio.parent.iterdir() if p.stem == audio.stem and p.suffix.lower() == ".phn"), None)
        if phones is None:
            raise TimitError(f"{audio} has no .PHN file beside it")
        utterances.append(Utterance(audio, phones, audio.parent.name.lower()))
    if not utterances:
        raise TimitError(f"no DR*/SPEAKER/*.WAV utterances below {part_dir}")
    return utterances


def split_utterances(root: Path) -> dict[str, list[Utterance]]:
    """train / dev / test of the standard protocol."""
    test_part = find_utterances(_child(root, "test"))
    return {
        "train": find_utterances(_child(root, "train")),
        "dev": [u for u in test_part if u.speaker in DEV_SPEAKERS],
        "test": [u for u in test_part if u.speaker in CORE_TEST_SPEAKERS],
    }


def num_samples(audio: Path) -> int:
    try:
        info = soundfile.info(str(audio))
    except RuntimeError as error:
        raise TimitError(f"{audio}: not readable as audio ({error}); shorten-compressed SPHERE files must be "
                         "decompressed first (sph2pipe -f wav)") from None
    if info.samplerate != SAMPLE_RATE:
        raise TimitError(f"{audio}: sample rate {info.samplerate}, expected {SAMPLE_RATE}")
    return int(info.frames)


def prepare(root: str | Path, dest: str | Path, progress: bool = True) -> dict[str, int]:
    """Write the manifests, labels and dictionary; returns the utterances per split."""
    root, dest = Path(os.path.realpath(root)), Path(dest)
    if not root.is_dir():
        raise TimitError(f"{root} is not a directory")
    splits = split_utterances(root)
    labels = {name: [" ".join(fold_phones(u.phones)) for u in utterances] for name, utterances in splits.items()}
    entries = {}
    for name, utterances in splits.items():
        entries[name] = [ManifestEntry(str(u.audio.relative_to(root)), num_samples(u.audio))
                         for u in tqdm(utterances, desc=f"timit {name}", unit="utt", file=sys.stderr,
                                       disable=not progress)]
    dest.mkdir(parents=True, exist_ok=True)
    for name in splits:
        write_manifest(dest / f"{name}.tsv", root, entries[name])
        (dest / f"{name}.phn").write_text("".join(line + "\n" for line in labels[name]), encoding="utf-8")
    counts = Counter({phone: 0 for phone in PHONES_39})
    for line in labels["train"]:
        counts.update(line.split())
    dictionary_from_counts(counts).save(dest / "dict.phn.txt")
    return {name: len(utterances) for name, utterances in splits.items()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("root", help="TIMIT root (the directory holding TRAIN/ and TEST/)")
    parser.add_argument("--dest", required=True, help="output directory for {train,dev,test}.{tsv,phn}, dict.phn.txt")


def main(args: argparse.Namespace) -> int:
    try:
        sizes = prepare(args.root, args.dest)
    except TimitError as error:
        print(f"prepare-timit: {error}", file=sys.stderr)
        return 1
    for name, size in sizes.items():
        note = "" if size == STANDARD_SIZES[name] else f" (the full corpus has {STANDARD_SIZES[name]})"
        print(f"{name}: {size} utterances{note}")
    print(f"wrote {args.dest}/{{train,dev,test}}.tsv, .phn and dict.phn.txt (39 phones)")
    return 0
