"""Pull the final answer out of a model's text and compare it with a reference.

Extraction rule (:func:`extract_final_answer`), first that applies wins:

1. If the text contains ``<|begin_of_solution|>``, only the part after the LAST such tag
   (up to the next ``<|end_of_solution|>``, or the end of the text when the tag is unclosed)
   is considered, and rules 2-4 are applied inside it. If none of them finds anything, the
   stripped solution text itself is the answer (``None`` when it is empty).
2. The content of the last ``\\boxed{...}`` whose braces balance.
3. The rest of the line after the last ``####`` (GSM8K style), when it is not empty.
4. The last number in the text: an optional sign, digits with optional thousands commas and
   an optional decimal part; commas are removed (a trailing period is never part of it).
5. Otherwise the stripped text itself (``None`` when it is empty): a word ("blue"), a
   reversed string ("cba") or any other plain-text answer.

The evaluation harness (:func:`llm_modules.evaluation.harness.is_correct`) also hands the whole stripped
text to a task's own scorer when the extracted answer fails it, so a short answer that contains
numbers but is not one ("['3', '1']", "B2, C4") is judged as the task defines it.

:func:`answers_match` compares numerically (relative tolerance 1e-6) when both sides parse as
numbers, otherwise compares normalized strings.
"""

from __future__ import annotations

import math
import re

BEGIN_SOLUTION = "<|begin_of_solution|>"
END_SOLUTION = "<|end_of_solution|>"

_NUMBER = re.compile(r"[-+]?(?:\d+(?:,\d{3})*(?:\.\d+)?|\.\d+)")
_CURRENCY = "$£€¥"


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` with balanced braces, or None."""
    start = text.rfind("\\boxed{")
    while start != -1:
        depth, i = 0, start + len("\\boxed")
        for j in range(i, len(text)):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1 : j].strip()
        start = text.rfind("\\boxed{", 0, start)  # unbalanced (cut off): try an earlier one
    return None


def _after_hashes(text: str) -> str | None:
    """The rest of the line after the last ``####``, or None when absent or empty."""
    pos = text.rfind("####")
    if pos == -1:
        return None
    rest = text[pos + 4 :].strip().split("\n", 1)[0].strip()
    return rest or None


def _last_number(text: str) -> str | None:
    """The last number in ``text`` with thousands commas removed, or None."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    return found[-1].replace(",", "").lstrip("+")


def extract_final_answer(text: str | None) -> str | None:
    """Return the final answer in ``text`` following the module's documented rule, or None."""
    if not text:
        return None
    if BEGIN_SOLUTION in text:
        inner = text[text.rfind(BEGIN_SOLUTION) + len(BEGIN_SOLUTION) :]
        end = inner.find(END_SOLUTION)
        if end != -1:
            inner = inner[:end]
        text = inner
    return _last_boxed(text) or _after_hashes(text) or _last_number(text) or text.strip() or None


def _unwrap(text: str) -> str:
    """Strip LaTeX wrappers and decorations that do not change the answer."""
    s = text.strip()
    for _ in range(3):
        s = s.strip().strip("$").strip()
        m = re.fullmatch(r"\\(?:boxed|text|mathrm|textbf)\{(.*)\}", s, flags=re.S)
        if m:
            s = m.group(1)
    return s.rstrip(".").strip()


def _as_number(text: str) -> float | None:
    """Parse ``text`` as a number (commas, currency signs, %, simple fractions allowed)."""
    s = _unwrap(text).replace(",", "").replace(" ", "")
    s = s.strip(_CURRENCY).rstrip("%")
    m = re.fullmatch(r"\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}", s)
    if m:
        s = f"{m.group(1)}/{m.group(2)}"
    try:
        if s.count("/") == 1:
            num, den = (float(part) for part in s.split("/"))
            return num / den if den != 0 else None
        value = float(s)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _normalize(text: str) -> str:
    """Lower-case, unwrap, and collapse whitespace for string comparison."""
    return re.sub(r"\s+", " ", _unwrap(text)).lower()


def answers_match(pred: str | None, reference: str | None, rel_tol: float = 1e-6) -> bool:
    """True when ``pred`` and ``reference`` denote the same answer.

    Both parse as numbers: compared with ``math.isclose`` (``rel_tol``, abs tol 1e-9).
    Otherwise: equal after normalization (LaTeX wrappers, ``$``, trailing period, case and
    whitespace removed). ``None`` never matches.
    """
    if pred is None or reference is None:
        return False
    a, b = _as_number(str(pred)), _as_number(str(reference))
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=rel_tol, abs_tol=1e-9)
    return _normalize(str(pred)) == _normalize(str(reference))
