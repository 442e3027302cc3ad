"""'Did you mean ...?': the closest names to a mistyped one, for error messages.

Callers pass only names the caller may use (their own adapters and ids, the base models),
so a suggestion never tells one tenant anything about another.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

# difflib's own default: close enough to be a typo, far enough to skip unrelated names.
CUTOFF = 0.6
MOST = 3


def closest(word: str, candidates: Iterable[str]) -> list[str]:
    """Up to three candidates closest to `word`, best first."""
    return difflib.get_close_matches(word, sorted(set(candidates)), n=MOST, cutoff=CUTOFF)


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """' Did you mean 'a' or 'b'?', to append to a message; '' when nothing is close."""
    return offer(closest(word, candidates))


def offer(names: list[str]) -> str:
    """' Did you mean 'a' or 'b'?' for up to three `names`; '' for none."""
    if not names:
        return ""
    quoted = [f"'{n}'" for n in names[:MOST]]
    listed = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]
    return f" Did you mean {listed}?"
