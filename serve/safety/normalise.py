"""Text folding for the prompt policy: what a banned term and a prompt are compared
as. Pure. Both sides go through `fold`, so a term matches every spelling that folds
to the same tokens:

- Unicode NFKC and casefold (fullwidth, ligatures, case);
- format characters (zero-width spaces and joiners, bidi marks) and combining marks
  (`n̷u̷d̷e̷`, accents) removed;
- confusable letters from other scripts mapped to their Latin look-alikes (Unicode's
  confusables data, from the confusable-homoglyphs package);
- leetspeak digits and symbols to letters, with the ambiguous ones folded together
  (1, !, | and l all read as i);
- punctuation inside a word removed (`n.u.d.e`, `nu_de`), or with `split` read as a
  space (`pipe-bomb`: a policy checks both), and a run of three or more single
  letters joined (`n u d e`);
- repeated letters collapsed (`nuuude`), but a word of one repeated letter keeps
  three (`xxxxx` reads `xxx`, and `xxx` never reads as `x`).

The result is the words joined by single spaces and padded with one on each side,
so a padded term matches whole words only: `cocktail` never matches `cock`."""

from __future__ import annotations

import functools
import re
import unicodedata

_LEET = str.maketrans({
    "0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "9": "g",
    "@": "a", "$": "s", "!": "i", "|": "i", "+": "t", "€": "e", "£": "l",
    "l": "i",  # l, 1, ! and | look alike: fold them together on both sides
})


@functools.cache
def _confusables() -> dict[int, str]:
    """Non-ASCII characters to the ASCII letter or digit they are confusable with."""
    from confusable_homoglyphs import utils

    table: dict[int, str] = {}
    for char, glyphs in utils.load("confusables.json").items():
        if len(char) != 1 or char.isascii():
            continue
        for g in glyphs:
            c = g["c"]
            if len(c) == 1 and c.isascii() and c.isalnum():
                table[ord(char)] = c.lower()
                break
    return table


def _strip_marks(text: str) -> str:
    decomposed = unicodedata.normalize("NFD", text)
    kept = "".join(c for c in decomposed if unicodedata.category(c) not in ("Mn", "Me", "Cf"))
    return unicodedata.normalize("NFC", kept)


_JOIN = re.compile(r"[^\w\s]|_")  # punctuation inside a word: dropped
_SPLIT = re.compile(r"[\W_]+")  # or read as a space
_REPEATS = re.compile(r"(.)\1+")


def fold(text: str, *, split: bool = False) -> str:
    """`text` as padded, folded words (see the module docstring)."""
    if not text.isascii():  # ASCII is NFKC already, has no marks and no confusables
        text = _strip_marks(unicodedata.normalize("NFKC", text).casefold())
        text = text.translate(_confusables())
    text = text.lower().translate(_LEET)
    words = (_SPLIT if split else _JOIN).sub(" " if split else "", text).split()
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
    """Repeated letters collapsed (`nuuude` -> `nude`); a word of one letter repeated
    keeps three (`xxxxx` -> `xxx`), so `xxx` never folds to `x`."""
    return word[:3] if len(set(word)) == 1 else _REPEATS.sub(r"\1", word)
