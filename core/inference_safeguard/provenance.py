"""Provenance veto (TraceAlign): a cost for reproducing text verbatim from a named corpus.

TraceAlign (Das et al., "TraceAlign: Tracing the Drift", 2025) traces unsafe output
back to the training text it reproduces; its Prov-Decode vetoes beam expansions that
copy such text, and TraceShield refuses what slips through. Here the user names the
corpus (leaked documents, copyrighted passages, known-harmful instructions) and
`ProvenanceCost` charges a response by the longest span of it found verbatim in the
corpus: as the search's cost it prunes candidates that drift into the corpus, and the
final check refuses a response over budget.

**Spans are counted in words.** Text is split into words (runs of letters, digits and
underscores, with inner apostrophes: `don't` is one word), casefolded; punctuation,
whitespace and line breaks between words are ignored, so a copy reformatted or
re-punctuated still matches. Spans never cross from one corpus document into another.

**The index** is a suffix array over the corpus's word ids (built once, by prefix
doubling with torch: a sort of n keys per doubling round, as many rounds as the log of
the longest repeat), about 8 bytes per corpus word, kept as C arrays. A query
binary-searches it: the longest span of a response of `m` words takes O((m + L) log n)
slice comparisons for a span of `L`.
"""

from __future__ import annotations

import re
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from inference_safeguard.scorer_spec import parse_spec, spec_float, spec_int, spec_list
from inference_safeguard.scorers import Scorer, _check_weight

__all__ = ["ProvenanceCost", "VerbatimIndex", "VerbatimSpan", "corpus_words"]

_WORD = re.compile(r"\w+(?:['\u2019]\w+)*")


def corpus_words(text: str) -> list[str]:
    """The words of `text` as the index compares them: casefolded, curly apostrophes
    made straight, punctuation and whitespace dropped."""
    return [m.group().casefold().replace("\u2019", "'") for m in _WORD.finditer(text)]


@dataclass(frozen=True)
class VerbatimSpan:
    """The longest span of a text found verbatim in the corpus.

    Attributes:
        words: its length in words (0 when no word of the text is in the corpus).
        start: offset in the text of its first character.
        end: offset just after its last character (`text[start:end]` is the span).
    """

    words: int
    start: int
    end: int


def _suffix_array(sequence: torch.Tensor) -> torch.Tensor:
    """Start positions of the suffixes of `sequence` (`(n,)` ints) in lexicographic order
    (a suffix that ends sooner sorts first), by prefix doubling: `(n,)` int64."""
    n = len(sequence)
    rank = torch.unique(sequence, return_inverse=True)[1].to(torch.int64)
    order = torch.argsort(rank, stable=True)
    span = 1
    while n > 0:
        following = torch.full((n,), -1, dtype=torch.int64)
        following[: n - span] = rank[span:]
        # Ranks are below n, so (rank, following) as one int64 key sorts like the pair.
        key = rank * (n + 1) + following + 1
        order = torch.argsort(key)
        sorted_key = key[order]
        starts = torch.ones(n, dtype=torch.int64)
        starts[1:] = (sorted_key[1:] != sorted_key[:-1]).to(torch.int64)
        sorted_rank = torch.cumsum(starts, 0) - 1
        if int(sorted_rank[-1]) == n - 1:
            break
        rank = torch.empty(n, dtype=torch.int64)
        rank[order] = sorted_rank
        span *= 2
    return order


class VerbatimIndex:
    """A suffix array over the words of a corpus, for the longest verbatim span of a text.

    Args:
        documents: the corpus, one str per document (a file, a passage).

    Raises:
        ValueError: no document, or no word in any of them.
    """

    def __init__(self, documents: Iterable[str]) -> None:
        documents = [documents] if isinstance(documents, str) else list(documents)
        for index, document in enumerate(documents):
            if not isinstance(document, str):
                raise TypeError(
                    f"VerbatimIndex: document {index} is a {type(document).__name__}; pass "
                    "the corpus as str documents (or file paths to ProvenanceCost.from_files)."
                )
        self._vocabulary: dict[str, int] = {}
        words_per_document = [corpus_words(document) for document in documents]
        for words in words_per_document:
            for word in words:
                self._vocabulary.setdefault(word, len(self._vocabulary))
        if not self._vocabulary:
            raise ValueError(
                "VerbatimIndex: the corpus has no words; name the documents or files that "
                "responses must not reproduce."
            )
        # Each document ends with its own separator id (above every word id), so no span
        # runs from one document into the next.
        ids = array("i")
        separator = len(self._vocabulary)
        for words in words_per_document:
            ids.extend(self._vocabulary[w] for w in words)
            ids.append(separator)
            separator += 1
        corpus = torch.frombuffer(ids, dtype=torch.int32).to(torch.int64)
        suffixes = _suffix_array(corpus)
        # Where each word's suffixes start in the suffix array: a search starts there.
        word_starts = torch.searchsorted(corpus[suffixes], torch.arange(len(self._vocabulary) + 1))
        # Queries index single elements and compare slices: C arrays do both fast.
        self._corpus = ids
        self._suffixes = array("i", suffixes.to(torch.int32).tolist())
        self._word_starts = array("i", word_starts.to(torch.int32).tolist())
        self.documents = len(documents)
        self.words = int(len(self._corpus) - len(documents))

    @property
    def nbytes(self) -> int:
        """Bytes held by the corpus ids and the suffix array (the vocabulary aside)."""
        arrays = (self._corpus, self._suffixes, self._word_starts)
        return sum(len(a) * a.itemsize for a in arrays)

    def _occurs(self, pattern: list[int]) -> bool:
        """Whether the word ids `pattern` occur contiguously in the corpus."""
        width = len(pattern)
        target = array("i", pattern[1:])
        corpus, suffixes = self._corpus, self._suffixes
        # Every suffix in [low, end) starts with pattern[0]: compare the rest.
        low, end = self._word_starts[pattern[0]], self._word_starts[pattern[0] + 1]
        high = end
        while low < high:
            middle = (low + high) // 2
            start = suffixes[middle]
            if corpus[start + 1 : start + width] < target:
                low = middle + 1
            else:
                high = middle
        if low == end:
            return False
        start = suffixes[low]
        return corpus[start + 1 : start + width] == target

    def longest_span(self, text: str) -> VerbatimSpan:
        """The longest run of consecutive words of `text` that occurs in the corpus."""
        matches = list(_WORD.finditer(text))
        ids = [
            self._vocabulary.get(m.group().casefold().replace("\u2019", "'"), -1) for m in matches
        ]
        best, best_start = 0, 0
        for start in range(len(ids)):
            # Only a span longer than the best so far matters: test one word more each time.
            while start + best < len(ids) and ids[start + best] >= 0:
                if not self._occurs(ids[start : start + best + 1]):
                    break
                best, best_start = best + 1, start
        if best == 0:
            return VerbatimSpan(0, 0, 0)
        return VerbatimSpan(best, matches[best_start].start(), matches[best_start + best - 1].end())


class ProvenanceCost(Scorer):
    """Cost of reproducing the corpus: `weight * (L - min_span + 1)` for a response whose
    longest verbatim span (see `VerbatimIndex`) has `L >= min_span` words, else 0.

    With budget 0, any copy of `min_span` words or more is over budget: the search prunes
    candidates that drift into the corpus, and the final check refuses a response that
    still holds one. Shorter spans (common phrases) cost nothing. The prompt is ignored.

    Prefix semantics: appending text never shortens a complete word's span, so the cost
    of a prefix is at most that of the response it grows into, except for its last word,
    which counts as written: when the next block continues that word (`"the cat"` into
    `"the catalogue"`), a span that ended with it may lose it.

    Args:
        index: the corpus's index.
        min_span: the shortest span, in words, that costs anything (>= 1).
        weight: cost per word of a span from `min_span` on, >= 0.
    """

    def __init__(self, index: VerbatimIndex, *, min_span: int = 8, weight: float = 1.0) -> None:
        if not isinstance(index, VerbatimIndex):
            raise TypeError(
                f"ProvenanceCost: index must be a VerbatimIndex, got {type(index).__name__}; "
                "build one with ProvenanceCost.from_texts(...) or from_files(...)."
            )
        if isinstance(min_span, bool) or not isinstance(min_span, int) or min_span < 1:
            raise ValueError(
                f"ProvenanceCost: min_span must be an int >= 1 (words), got {min_span!r}."
            )
        self.index = index
        self.min_span = min_span
        self.weight = _check_weight(weight, "ProvenanceCost")

    @classmethod
    def from_texts(
        cls, documents: Iterable[str] | str, *, min_span: int = 8, weight: float = 1.0
    ) -> ProvenanceCost:
        """Index `documents` (one str per document) and build the cost."""
        return cls(VerbatimIndex(documents), min_span=min_span, weight=weight)

    @classmethod
    def from_files(
        cls, paths: Sequence[str | Path] | str | Path, *, min_span: int = 8, weight: float = 1.0
    ) -> ProvenanceCost:
        """Index UTF-8 text files (a folder stands for every `*.txt` file under it), one
        document per file, and build the cost.

        Raises:
            FileNotFoundError: a path that does not exist, or a folder without `.txt` files.
        """
        paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        files: list[Path] = []
        for raw in paths:
            path = Path(raw)
            if path.is_dir():
                found = sorted(path.rglob("*.txt"))
                if not found:
                    raise FileNotFoundError(f"ProvenanceCost: no .txt files under {path}.")
                files.extend(found)
            elif path.is_file():
                files.append(path)
            else:
                raise FileNotFoundError(
                    f"ProvenanceCost: no file or folder at {path}; name the corpus files."
                )
        documents = [file.read_text(encoding="utf-8", errors="replace") for file in files]
        return cls.from_texts(documents, min_span=min_span, weight=weight)

    @classmethod
    def from_spec(cls, spec: str) -> ProvenanceCost:
        """From `"corpus=a.txt,texts/;min_span=8;weight=1"` (see
        `inference_safeguard.scorer_spec`)."""
        owner = cls.__name__
        options = parse_spec(spec, owner, {"corpus", "min_span", "weight"})
        paths = spec_list(options.get("corpus", ""))
        if not paths:
            raise ValueError(f"{owner}.from_spec: name the corpus files, e.g. corpus=leak.txt.")
        min_span = spec_int(options, "min_span", owner)
        return cls.from_files(
            paths,
            min_span=8 if min_span is None else min_span,
            weight=spec_float(options, "weight", owner, 1.0),
        )

    def _score(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """Returns `(batch,)` costs from each response's longest verbatim span."""
        spans = [self.index.longest_span(response).words for response in responses]
        over = [max(0, words - self.min_span + 1) for words in spans]
        return torch.tensor(over, dtype=torch.float64) * self.weight
