"""Safety tokens: from words to token ids for any Hugging Face tokenizer, shown to the user exactly.

A word has surface forms: bare ("cannot"), with a leading space (" cannot"), sentence-initial
("Cannot", " Cannot"). Each form is resolved as it occurs inside text, not on its own: the tokenizer encodes
a context and the context followed by the form, and the form's pieces are the ids that differ (checked by
decoding them back to the form). Forms with a leading space follow a sentence ("Hello." + " I"); forms
without one start a line ("Hello.\n" + "I"), as a response does after a chat header such as
"<|assistant|>\n". Encoding a form on its own misleads: a SentencePiece vocabulary behind the generic fast
class with a Llama-2 normalizer encodes " I" alone as "▁▁" + "I", while in text " I" is the one piece "▁I".

A form's pieces ("can't" -> "can", "'", "t") are word pieces or not: a piece that decodes to whitespace or
punctuation only ("▁▁", "'", ".") is never chosen unless `allow_punctuation=True`. Strategies:
  first  (default) the first word piece of every form: the token a refusal that starts with the word begins with
  all    every word piece of every form: "can't" gives "can" and "t" in SentencePiece vocabularies (the apostrophe
         only with allow_punctuation), "can" and "'t" (a word piece: it holds a letter) in byte-level ones
  whole  only forms that are a single token (a word with none is an error)
Special tokens are never chosen; ids are deduplicated in first-seen order.
"""

from __future__ import annotations

import json
import math
import random
import re
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import LogitguardError
from .files import write_text_atomic

STRATEGIES = ("first", "all", "whole")
FORMS = ("bare", "space", "capital", "space_capital")
# Text a form follows when resolved in context: forms with a leading space follow a sentence, the others
# start a line. Later contexts are tried only when an earlier one merges with the form across the boundary.
SPACE_CONTEXTS = ("Hello.", "Hello,", "Hello")
LINE_CONTEXTS = ("Hello.\n", "Hello.\n\n", "\n")
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece byte fallback


class TokenError(LogitguardError, ValueError):
    """A safety word or token set that cannot be used."""


def surface_forms(word: str, forms: tuple[str, ...] = FORMS) -> list[tuple[str, str]]:
    """(form name, text) pairs for a word, without repeats ("I" has no separate capital form)."""
    capital = word[:1].upper() + word[1:]
    candidates = {"bare": word, "space": " " + word, "capital": capital, "space_capital": " " + capital}
    out, seen = [], set()
    for name in forms:
        if name not in candidates:
            raise TokenError(f"unknown surface form {name!r}; choose from {FORMS}")
        text = candidates[name]
        if text not in seen:
            seen.add(text)
            out.append((name, text))
    return out


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def resolve_in_context(tokenizer, text: str) -> tuple[list[int], str | None]:
    """The ids `text` gets where it occurs inside text, and the context used (None: encoded on its own).

    Encodes context and context + text, drops the common prefix, and keeps the rest when it decodes to exactly
    `text` (a merge across the boundary fails the check and the next context is tried). A tokenizer that
    never yields `text` exactly (one that folds newlines into spaces, say) gets the first result equal up
    to surrounding whitespace, else `text` encoded on its own.
    """
    contexts = SPACE_CONTEXTS if text[:1].isspace() else LINE_CONTEXTS
    near = None
    for context in contexts:
        full = _encode(tokenizer, context + text)
        base = _encode(tokenizer, context)
        k = 0
        while k < min(len(full), len(base)) and full[k] == base[k]:
            k += 1
        ids = full[k:]
        if not ids:
            continue
        head, whole = _decode(tokenizer, full[:k]), _decode(tokenizer, full)
        got = whole[len(head) :] if whole.startswith(head) else None
        if got == text:
            return ids, context
        if near is None and got is not None and got.strip() == text.strip():
            near = ids, context
    return near or (_encode(tokenizer, text), None)


def is_word_piece(tokenizer, token_id: int) -> bool:
    """True when the token holds a letter, digit or mark (or part of a multi-byte character): not only
    whitespace or punctuation. Judged on the decoded text, so byte-level and SentencePiece markers are read
    as the spaces they stand for."""
    piece = tokenizer.convert_ids_to_tokens(int(token_id))
    byte = _BYTE_PIECE.fullmatch(piece or "")
    if byte:
        value = int(byte.group(1), 16)
        return value >= 0x80 or chr(value).isalnum()
    text = _decode(tokenizer, [int(token_id)])
    return any(c == "\ufffd" or unicodedata.category(c)[0] in "LNM" for c in text)


@dataclass(frozen=True)
class SafetyTokens:
    """A resolved, frozen set of safety token ids with its provenance (saved next to every adapter)."""

    ids: tuple[int, ...]
    tokens: tuple[str, ...]
    source: str = "words"  # words | random | ids | mined
    words: tuple[str, ...] = ()
    strategy: str | None = None
    seed: int | None = None
    allow_punctuation: bool = False
    rows: tuple[dict, ...] = field(default=(), compare=False)
    # PACT's token weights v, one per id (`tokens mine --rule pact`); None: unweighted
    weights: tuple[float, ...] | None = None
    # how a mined set was mined (rule, refusal filter, pairs file and its sha256): provenance, not identity
    mining: dict | None = field(default=None, compare=False)

    def __post_init__(self):
        if not self.ids:
            raise TokenError("a safety token set needs at least one token id")
        if len(set(self.ids)) != len(self.ids):
            raise TokenError(f"duplicate ids in safety token set: {list(self.ids)}")
        if self.weights is not None and (
            len(self.weights) != len(self.ids) or not all(math.isfinite(w) for w in self.weights)
        ):
            raise TokenError(f"token weights must be one finite number per id ({len(self.ids)}), got {self.weights}")

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_words(
        cls,
        tokenizer,
        words: list[str] | str,
        strategy: str = "first",
        forms: tuple[str, ...] = FORMS,
        allow_punctuation: bool = False,
    ) -> SafetyTokens:
        """Resolve words to ids, each form as it occurs in text (see the module doc).

        Pieces that are only whitespace or punctuation are skipped unless `allow_punctuation`. Raises
        TokenError naming any word that yields no usable token.
        """
        if strategy not in STRATEGIES:
            raise TokenError(f"unknown token strategy {strategy!r}; choose from {STRATEGIES}")
        words = parse_words(words)
        special = set(tokenizer.all_special_ids)
        ids, rows = [], []
        for word in words:
            word_ids = []
            for form, text in surface_forms(word, forms):
                pieces, context = resolve_in_context(tokenizer, text)
                usable = [i for i in pieces if i not in special and (allow_punctuation or is_word_piece(tokenizer, i))]
                if strategy == "first":
                    chosen = usable[:1]
                elif strategy == "all":
                    chosen = usable
                else:
                    chosen = usable if len(pieces) == 1 else []
                rows.append(
                    {
                        "word": word,
                        "form": form,
                        "text": text,
                        "context": context,
                        "pieces": tokenizer.convert_ids_to_tokens(pieces),
                        "ids": pieces,
                        "chosen": chosen,
                    }
                )
                word_ids += chosen
            if not word_ids:
                hint = "" if allow_punctuation else "; whitespace or punctuation pieces need allow_punctuation"
                raise TokenError(
                    f"safety word {word!r} yields no usable token with strategy {strategy!r} "
                    f"(its forms tokenize to {[r['pieces'] for r in rows if r['word'] == word]}{hint}); "
                    "pick another word or strategy (e.g. 'first' or 'all')"
                )
            ids += word_ids
        unique = list(dict.fromkeys(ids))
        return cls(
            ids=tuple(unique),
            tokens=tuple(tokenizer.convert_ids_to_tokens(unique)),
            source="words",
            words=tuple(words),
            strategy=strategy,
            allow_punctuation=allow_punctuation,
            rows=tuple(rows),
        )

    @classmethod
    def from_ids(cls, tokenizer, ids: list[int]) -> SafetyTokens:
        """A token set given directly as ids (checked against the vocabulary and special tokens)."""
        vocab = len(tokenizer)
        special = set(tokenizer.all_special_ids)
        bad = [i for i in ids if not 0 <= int(i) < vocab or int(i) in special]
        if bad:
            raise TokenError(f"token ids {bad} are out of the vocabulary (size {vocab}) or special tokens")
        unique = list(dict.fromkeys(int(i) for i in ids))
        return cls(ids=tuple(unique), tokens=tuple(tokenizer.convert_ids_to_tokens(unique)), source="ids")

    @classmethod
    def random(cls, tokenizer, k: int, seed: int = 0, exclude: SafetyTokens | list[int] | None = None):
        """The paper's control (Sec. 4.7): k random ordinary tokens, none special and none in `exclude`."""
        excluded = set(exclude.ids if isinstance(exclude, SafetyTokens) else exclude or ())
        excluded |= set(tokenizer.all_special_ids)
        pool = [i for i in range(len(tokenizer)) if i not in excluded]
        if k < 1 or k > len(pool):
            raise TokenError(f"cannot draw {k} random tokens from {len(pool)} candidates")
        ids = sorted(random.Random(seed).sample(pool, k))
        return cls(ids=tuple(ids), tokens=tuple(tokenizer.convert_ids_to_tokens(ids)), source="random", seed=seed)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ids"], d["tokens"], d["words"], d["rows"] = (
            list(self.ids),
            list(self.tokens),
            list(self.words),
            list(self.rows),
        )
        if self.weights is None:
            del d["weights"]
        else:
            d["weights"] = list(self.weights)
        if self.mining is None:
            del d["mining"]
        return d

    def save(self, path: str | Path) -> None:
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> SafetyTokens:
        try:
            d = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise TokenError(f"token set file {path} does not exist") from None
        except json.JSONDecodeError as e:
            raise TokenError(f"token set file {path} is not valid JSON: {e}") from None
        if not isinstance(d, dict) or "ids" not in d:
            raise TokenError(f"token set file {path} has no 'ids' list")
        weights = d.get("weights")
        if weights is not None and not (
            isinstance(weights, list) and all(isinstance(w, int | float) and not isinstance(w, bool) for w in weights)
        ):
            raise TokenError(f"token set file {path}: 'weights' must be a list of numbers, one per id")
        return cls(
            ids=tuple(int(i) for i in d["ids"]),
            tokens=tuple(d.get("tokens", ())),
            source=d.get("source", "ids"),
            words=tuple(d.get("words", ())),
            strategy=d.get("strategy"),
            seed=d.get("seed"),
            allow_punctuation=bool(d.get("allow_punctuation", False)),
            rows=tuple(d.get("rows", ())),
            weights=None if weights is None else tuple(float(w) for w in weights),
            mining=d.get("mining"),
        )

    def check_against(self, tokenizer) -> None:
        """Refuse a token set whose ids do not name the same tokens in this tokenizer (another vocabulary)."""
        if self.tokens and list(self.tokens) != tokenizer.convert_ids_to_tokens(list(self.ids)):
            raise TokenError(
                f"token set {list(self.tokens)} does not match this tokenizer, whose ids {list(self.ids)} are "
                f"{tokenizer.convert_ids_to_tokens(list(self.ids))}; resolve the words again for this model"
            )

    def table(self) -> str:
        """Plain-text table for the user (printed by `logitguard tokens` and at the start of training).

        From words: one row per word and surface form with the form's text, its pieces and ids where it occurs
        in text, and the chosen tokens; then the chosen set. Otherwise one row per id.
        """
        if self.source != "words" or not self.rows:
            if self.weights is not None:
                lines = [f"{'id':>8}  {'weight':>8}  token"]
                lines += [f"{i:>8}  {w:>8.4f}  {t!r}" for i, w, t in zip(self.ids, self.weights, self.tokens)]
            else:
                lines = [f"{'id':>8}  token"] + [f"{i:>8}  {t!r}" for i, t in zip(self.ids, self.tokens)]
            lines.append(f"{len(self.ids)} safety tokens ({self.source}): {list(self.ids)}")
            return "\n".join(lines)
        header = ("word", "form", "text", "pieces in context", "ids", "chosen")
        body = []
        for r in self.rows:
            names = dict(zip(r["ids"], r["pieces"]))
            chosen = " ".join(f"{names.get(i, '?')!r}={i}" for i in r["chosen"]) or "-"
            pieces = " ".join(repr(p) for p in r["pieces"])
            body.append((r["word"], r["form"], repr(r["text"]), pieces, str(r["ids"]), chosen))
        widths = [max(len(x) for x in col) for col in zip(header, *body)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        out = [fmt.format(*row).rstrip() for row in [header, tuple("-" * w for w in widths), *body]]
        skipped = "may be chosen" if self.allow_punctuation else "are never chosen"
        out.append(
            f"(in context: ' word' after 'Hello.', 'word' at a line start; "
            f"whitespace/punctuation-only pieces {skipped})"
        )
        out.append(f"{len(self.ids)} safety tokens ({self.strategy}): {list(self.ids)} = {list(self.tokens)}")
        return "\n".join(out)


def parse_words(words: list[str] | str) -> list[str]:
    """'I,cannot,can't' or a list -> ['I', 'cannot', "can't"]; empty entries are an error."""
    items = words.split(",") if isinstance(words, str) else list(words)
    items = [w.strip() for w in items]
    if not items or any(not w for w in items):
        raise TokenError(f"safety words must be a non-empty comma-separated list without blanks, got {words!r}")
    return items
