"""Symbol <-> index table with fairseq's `Dictionary` semantics (fairseq_spec.md §3.3).

Indices 0..3 are the specials `<s>` (bos, also the CTC blank), `<pad>`, `</s>` (eos) and
`<unk>`; the symbols of `dict.ltr.txt` follow in file order, so the released LibriSpeech
letter dictionary gives '|' index 4 and 32 outputs in total.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from repro.data.lines import read_lines

BOS_SYMBOL = "<s>"
PAD_SYMBOL = "<pad>"
EOS_SYMBOL = "</s>"
UNK_SYMBOL = "<unk>"
SPECIAL_SYMBOLS = (BOS_SYMBOL, PAD_SYMBOL, EOS_SYMBOL, UNK_SYMBOL)
OVERWRITE_FLAG = "#fairseq:overwrite"


class DictionaryError(ValueError):
    """A malformed dictionary file or symbol list (the message names the file and line)."""


class Dictionary:
    """fairseq-compatible dictionary: 4 specials, then symbols in file order."""

    def __init__(self) -> None:
        self.symbols: list[str] = []
        self.counts: list[int] = []
        self._indices: dict[str, int] = {}
        for symbol in SPECIAL_SYMBOLS:
            self._add(symbol, count=1)
        self.bos, self.pad, self.eos, self.unk = (self._indices[s] for s in SPECIAL_SYMBOLS)
        self.nspecial = len(SPECIAL_SYMBOLS)
        self.path: Path | None = None
        """File the dictionary was loaded from, for error messages (None when built in memory)."""

    # ----------------------------------------------------------------------------------------
    def _add(self, symbol: str, count: int, overwrite: bool = False) -> int:
        if symbol in self._indices:
            if not overwrite:
                raise DictionaryError(f"duplicate symbol {symbol!r}")
            index = self._indices[symbol]
            self.counts[index] = count
            return index
        index = len(self.symbols)
        self._indices[symbol] = index
        self.symbols.append(symbol)
        self.counts.append(count)
        return index

    @classmethod
    def from_symbols(cls, symbols: Iterable[str]) -> Dictionary:
        """Dictionary whose non-special symbols are `symbols`, in order (counts 0)."""
        dictionary = cls()
        for symbol in symbols:
            if not symbol or any(ch.isspace() for ch in symbol):
                raise DictionaryError(f"invalid symbol {symbol!r}: empty or contains whitespace")
            dictionary._add(symbol, count=0)
        return dictionary

    def add_symbol(self, symbol: str) -> int:
        """Index of `symbol`, appended at the end when absent (fairseq's add_symbol, e.g. masked_lm's `<mask>`)."""
        if symbol in self._indices:
            return self._indices[symbol]
        return self._add(symbol, count=1)

    @classmethod
    def load(cls, path: str | Path) -> Dictionary:
        """Read fairseq's `<symbol> <count>[ #fairseq:overwrite]` lines (e.g. dict.ltr.txt)."""
        path = Path(path)
        dictionary = cls()
        try:
            lines = read_lines(path)
        except (OSError, UnicodeDecodeError) as error:
            raise DictionaryError(f"{path}: cannot read dictionary: {error}") from error
        for line_number, raw_line in enumerate(lines, start=1):
            line = raw_line.rstrip()
            if not line:
                continue
            # fairseq splits from the right, so a symbol may itself contain spaces in theory.
            symbol, _, field = line.rpartition(" ")
            overwrite = False
            if field == OVERWRITE_FLAG:
                overwrite = True
                symbol, _, field = symbol.rpartition(" ")
            if not symbol:
                raise DictionaryError(f"{path}:{line_number}: expected '<symbol> <count>', got {raw_line!r}")
            try:
                count = int(field)
            except ValueError:
                raise DictionaryError(
                    f"{path}:{line_number}: count {field!r} is not an integer in {raw_line!r}"
                ) from None
            try:
                dictionary._add(symbol, count, overwrite=overwrite)
            except DictionaryError as error:
                raise DictionaryError(
                    f"{path}:{line_number}: {error}; add '{OVERWRITE_FLAG}' to replace it"
                ) from None
        dictionary.path = path
        return dictionary

    def save(self, path: str | Path, counts: Mapping[str, int] | None = None) -> None:
        """Write the non-special symbols as `symbol count` lines, in index order."""
        lines = []
        for index in range(self.nspecial, len(self.symbols)):
            symbol = self.symbols[index]
            count = counts.get(symbol, 0) if counts is not None else self.counts[index]
            lines.append(f"{symbol} {count}\n")
        Path(path).write_text("".join(lines), encoding="utf-8")

    # ----------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.symbols)

    def __contains__(self, symbol: str) -> bool:
        return symbol in self._indices

    def __getitem__(self, index: int) -> str:
        return self.symbols[index] if 0 <= index < len(self.symbols) else UNK_SYMBOL

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Dictionary) and self.symbols == other.symbols

    def index(self, symbol: str) -> int:
        """Index of `symbol`, or `unk` (3) when absent."""
        return self._indices.get(symbol, self.unk)

    def encode_line(self, line: str) -> list[int]:
        """Whitespace-split tokens -> indices; no eos appended (CTC targets, §3.3)."""
        return [self.index(token) for token in line.split()]

    def string(self, ids: Iterable[int]) -> str:
        """Space-joined symbols, dropping bos (= CTC blank), pad and eos."""
        dropped = {self.bos, self.pad, self.eos}
        return " ".join(self[int(i)] for i in ids if int(i) not in dropped)
