"""Text corpora for calibration, fine-tuning and evaluation.

The default corpus is the English prose of Python's own reference documentation
(`pydoc_data.topics`): it ships with every CPython, so runs work offline and are reproducible without
downloading a data set. Users can bring their own `.txt` / `.jsonl` files instead.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

HELD_OUT_EVERY = 5  # every 5th document is held out for evaluation, never seen by calibration or fine-tuning
LICENSES = Path("/usr/share/common-licenses")  # the default out-of-domain text: legal English, on every Debian


class DataError(ValueError):
    """A corpus that cannot be used; the message is one line and names the offending file."""


class TextTokenizer(Protocol):
    """The minimal tokenizer interface this package needs (a HF tokenizer satisfies it).

    `encode(text, add_special_tokens=False)` returns the token ids of raw text; `eos_token` (a string,
    or None) separates documents when they are joined into one token stream.
    """

    eos_token: str | None

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


@dataclass(frozen=True)
class Corpus:
    """Documents split once into a training/calibration part and a disjoint evaluation part."""

    train: list[str]
    held_out: list[str]
    source: str


def load_corpus(paths: Sequence[str | os.PathLike[str]] | None = None) -> Corpus:
    """Load user files, or the Python reference docs when no path is given.

    The split depends only on document order, so the same files always give the same held-out text and
    perplexities stay comparable across runs.
    """
    if not paths:
        return _pydoc_corpus()
    documents: list[str] = []
    for path in paths:
        documents.extend(_read_documents(Path(path)))
    source = ", ".join(str(Path(p)) for p in paths)
    if len(documents) == 1:  # one document: hold out its tail, so there is still unseen text to evaluate on
        text = documents[0]
        cut = int(len(text) * 0.8)
        return Corpus(train=[text[:cut]], held_out=[text[cut:]], source=source)
    train, held_out = _split(documents)
    if not held_out:  # fewer than HELD_OUT_EVERY documents: the last one is the evaluation text
        train, held_out = documents[:-1], documents[-1:]
    return Corpus(train=train, held_out=held_out, source=source)


def load_out_of_domain(paths: Sequence[str | os.PathLike[str]] | None = None) -> Corpus | None:
    """A second evaluation text from another source than the fine-tuning corpus, all of it held out.

    Default: the licence texts of `/usr/share/common-licenses` (symlinks and identical texts dropped), None where
    that folder does not exist; or the user's `.txt` / `.jsonl` files. Judging quality only on text from the
    corpus the recovery trained on measures adaptation to that text as well; this one it never saw.
    """
    if paths:
        documents = [doc for path in paths for doc in _read_documents(Path(path))]
        return Corpus(train=[], held_out=documents, source=", ".join(str(Path(p)) for p in paths))
    if not LICENSES.is_dir():
        return None
    seen: set[str] = set()
    documents = []
    for path in sorted(LICENSES.iterdir()):
        if path.is_symlink() or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        if text and text not in seen:
            seen.add(text)
            documents.append(text)
    if not documents:
        return None
    return Corpus(train=[], held_out=documents, source=f"{LICENSES} ({len(documents)} licence texts)")


def token_windows(texts: Sequence[str], tokenizer: TextTokenizer, window: int,
                  max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping `[n, window]` token windows of the joined texts, the first `max_windows` of them.

    The texts are tokenized once as one stream (documents separated by the tokenizer's eos token, or a
    blank line), so window boundaries do not depend on document lengths; the incomplete tail is dropped.
    """
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens (one input and one target), got {window}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be positive or None, got {max_windows}")
    separator = tokenizer.eos_token or "\n\n"
    ids = tokenizer.encode(separator.join(texts), add_special_tokens=False)
    count = len(ids) // window
    if count == 0:
        raise DataError(f"text too short: {len(ids)} tokens, need at least {window} for one window")
    if max_windows is not None:
        count = min(count, max_windows)
    return torch.tensor(ids[: count * window], dtype=torch.long).view(count, window)


def _pydoc_corpus() -> Corpus:
    from pydoc_data.topics import topics

    names = sorted(topics)
    train, held_out = _split([topics[name].strip() for name in names])
    return Corpus(train=train, held_out=held_out,
                  source=f"pydoc_data.topics (Python {platform.python_version()} reference docs)")


def _split(documents: list[str]) -> tuple[list[str], list[str]]:
    train = [doc for i, doc in enumerate(documents) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    held_out = [doc for i, doc in enumerate(documents) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    return train, held_out


def _read_documents(path: Path) -> list[str]:
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl"):
        raise DataError(f"{path}: unsupported file type {path.suffix or '(none)'!r}; use .txt or .jsonl")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    if suffix == ".txt":
        if not content.strip():
            raise DataError(f"{path}: file has no text")
        return [content]
    return _jsonl_documents(path, content)


def _jsonl_documents(path: Path, content: str) -> list[str]:
    documents = []
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise DataError(f'{path}:{number}: expected an object with a non-empty "text" string')
        documents.append(text)
    if not documents:
        raise DataError(f"{path}: file has no documents")
    return documents
