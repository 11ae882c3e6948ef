"""Text folding for the prompt policy: what a banned term and a prompt are compared
as. Pure. Both sides go through the same steps, so a term matches every spelling
that folds to the same words:

- letters that look Latin mapped to the Latin letter, before and after Unicode
  NFKC (so the lunate sigma `ϲ` reads `c`, not `σ`): Unicode's confusables data
  (the confusable-homoglyphs package), every Latin letter by its name (small
  capitals `ᴅ`, hooked `ɗ`, enclosed and regional-indicator letters `🅽`, `🇳`), the
  Greek and Cyrillic look-alikes (`η κ χ к т м п`), other scripts' digits;
- NFKC and casefold (fullwidth, mathematical letters, ligatures, case);
- format, default-ignorable and combining characters removed (zero-width spaces and
  joiners, bidi marks, Hangul fillers, `n̷u̷d̷e̷`, accents);
- leetspeak digits and symbols to letters (`p0rn`, `sw@stika`, `!` and `|` as `i`;
  a `1` reads `i`, and every term also matches with its `l`s read as `i`);
- punctuation inside a word dropped (`n.u.d.e`), or read as a space (`pipe-bomb`),
  or both (`pi.pe-bomb`): `variants` gives all three; a run of three or more single
  letters joined (`n u d e`);
- repeated letters collapsed (`nuuude`), but a word of one repeated letter keeps
  three (`xxxxx` reads `xxx`, and `xxx` never reads as `x`).

The result is the words joined by single spaces and padded with one on each side,
so a padded term matches whole words only: `cocktail` never matches `cock`."""

from __future__ import annotations

import functools
import re
import unicodedata

import regex

_LEET = str.maketrans({
    "0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "9": "g",
    "@": "a", "$": "s", "!": "i", "|": "i", "+": "t", "€": "e", "£": "l",
})
# Greek and Cyrillic letters that look like a Latin one but are not its confusable in
# Unicode's data (which pairs most of them with an uppercase form, or not at all).
_SCRIPTS = {
    "α": "a", "β": "b", "γ": "y", "ε": "e", "η": "n", "ι": "i", "κ": "k", "μ": "u",
    "ν": "v", "ο": "o", "ρ": "p", "σ": "o", "ς": "c", "ϲ": "c", "τ": "t", "υ": "u",
    "χ": "x", "ω": "w", "ϳ": "j",
    "а": "a", "в": "b", "г": "r", "д": "d", "е": "e", "з": "3", "и": "u", "й": "u",
    "к": "k", "м": "m", "н": "h", "о": "o", "п": "n", "р": "p", "с": "c", "т": "t",
    "у": "y", "х": "x", "ц": "u", "ш": "w", "щ": "w", "ь": "b", "ѕ": "s", "і": "i",
    "ј": "j", "ԁ": "d", "ԛ": "q", "ԝ": "w", "ү": "y", "һ": "h",
}
_LATIN_NAME = re.compile(r"\bLATIN (?:SMALL |CAPITAL )?LETTER (?:SMALL CAPITAL )?([A-Z])\b"
                         r"|REGIONAL INDICATOR SYMBOL LETTER ([A-Z])$")
# Invisible in text but neither a format (Cf) nor a combining (Mn) character.
_IGNORABLE = dict.fromkeys(map(ord, "\u115f\u1160\u17b4\u17b5\u3164\uffa0\u2800"), None)
_JOIN = re.compile(r"[^\w\s]|_")  # punctuation inside a word: dropped
_SPLIT = re.compile(r"[\W_]+")  # or read as a space
_MIXED = re.compile(r"[.'_’]")  # dots and apostrophes dropped, dashes and slashes split
_REPEATS = re.compile(r"(.)\1+")
_MARKS = regex.compile(r"[\p{Mn}\p{Me}\p{Cf}]+")  # combining and format characters


@functools.cache
def _lookalikes() -> dict[int, str]:
    """Non-ASCII characters to the ASCII letter or digit they pass for."""
    from confusable_homoglyphs import utils

    table: dict[int, str] = {}
    for code in range(0x80, 0x20000):
        c = chr(code)
        if unicodedata.category(c) == "Nd":
            table[code] = str(unicodedata.decimal(c))
        elif m := _LATIN_NAME.search(unicodedata.name(c, "")):
            table[code] = (m.group(1) or m.group(2)).lower()
    for char, glyphs in utils.load("confusables.json").items():
        if len(char) != 1 or char.isascii() or ord(char) in table:
            continue
        for g in glyphs:
            if len(g["c"]) == 1 and g["c"].isascii() and g["c"].isalnum():
                table[ord(char)] = g["c"].lower()
                break
    table.update({ord(k): v for k, v in _SCRIPTS.items()})
    return table


def warm() -> None:
    _lookalikes()


def _base(text: str) -> str:
    """Look-alikes, NFKC, casefold, invisible and combining characters, leetspeak."""
    if not text.isascii():  # ASCII is NFKC already, with no marks and no look-alikes
        table = _lookalikes()
        text = text.translate(table)
        nfkc = unicodedata.normalize("NFKC", text)
        # A few compatibility characters expand to whole phrases (U+FDFA: 18 letters);
        # a prompt of them would cost a fold 100x its length. Past 4x, skip NFKC there:
        # no Latin spelling hides in an expansion that long.
        text = (nfkc if len(nfkc) <= 4 * len(text) + 64 else text).casefold()
        text = unicodedata.normalize("NFD", text).translate(_IGNORABLE)
        text = unicodedata.normalize("NFC", _MARKS.sub("", text)).translate(table)
    return text.lower().translate(_LEET)


def _words(text: str) -> str:
    words = text.split()
    joined: list[str] = []
    run: list[str] = []
    for w in [*words, ""]:  # the empty sentinel ends the last run
        if len(w) == 1:
            run.append(w)
            continue
        joined += ["".join(run)] if len(run) >= 3 else run
        run = []
        if w:
            joined.append(w)
    return " " + " ".join(_squeeze(w) for w in joined) + " "


def _squeeze(word: str) -> str:
    return word[:3] if len(set(word)) == 1 else _REPEATS.sub(r"\1", word)


def fold(text: str) -> str:
    """`text` as padded, folded words, punctuation inside words dropped (how terms
    and allowlist phrases are folded)."""
    return _words(_JOIN.sub("", _base(text)))


def variants(text: str) -> tuple[str, ...]:
    """The readings of a prompt a term may match: punctuation inside words dropped,
    read as spaces, and dots dropped while dashes split."""
    base = _base(text)
    readings = (_JOIN.sub("", base), _SPLIT.sub(" ", base), _SPLIT.sub(" ", _MIXED.sub("", base)))
    # Most prompts read the same all three ways (punctuation only between words).
    return tuple(_words(r) for r in dict.fromkeys(" ".join(r.split()) for r in readings))


def term_forms(term: str) -> set[str]:
    """A term's folded forms: as written, and with its `l`s read as `i` (a prompt's
    `1` reads `i`: `ki11` must match `kill`, while `led` must not read as `ied`)."""
    folded = fold(term)
    return {folded, fold(term.lower().replace("l", "i"))}
