"""Simulated annotators for the online-loop benchmark (``python -m bench.online_loop``).

An annotator is a plain function ``(messages, answer_a, answer_b) -> "a" | "b" | "tie"``;
``messages`` is the conversation before the answer (``{"role", "content"}`` dicts, ending with
the user turn). Annotators judge from what they can read — the question itself and general
knowledge (a table of capitals, unit conversions) — never from hidden state of the generator.

* :func:`prefers_correct` — the right answer wins: sums and differences are worked out from the
  question (an answer that shows column working is right when every step holds and it ends on
  the result), capitals and unit conversions looked up, word games (backwards, letter count, first
  letter) solved, remembered names, pets, towns, colours and numbers read from earlier user turns; questions it
  cannot place should be answered with an honest "I don't know"; small talk should stay on topic.
  Equal correctness: a well-formed answer beats a garbled one, then a complete, to-the-point
  answer (one that restates what it answers, without pleasantries or follow-up questions) beats
  a bare or chatty one; otherwise a tie.
* :func:`prefers_concise` — a non-empty answer beats an empty one; otherwise the shorter answer
  wins, a tie when the lengths are close (within 3 characters or 15 %).

:func:`judge_correct` is the correctness check alone (True, False or None when the question is
not one it can grade), used by the tests and useful for figures.
"""

from __future__ import annotations

import re

__all__ = ["prefers_correct", "prefers_concise", "judge_correct", "well_formed", "addressed_terms", "to_the_point"]

# general knowledge of the annotator (real-world facts, not the model's corpus)
CAPITALS = {
    "france": "paris", "japan": "tokyo", "italy": "rome", "spain": "madrid", "germany": "berlin",
    "egypt": "cairo", "kenya": "nairobi", "peru": "lima", "chile": "santiago", "canada": "ottawa",
    "norway": "oslo", "sweden": "stockholm", "poland": "warsaw", "greece": "athens",
    "portugal": "lisbon", "austria": "vienna", "ireland": "dublin", "russia": "moscow",
    "china": "beijing", "india": "delhi", "mexico": "mexico city", "cuba": "havana",
    "argentina": "buenos aires", "australia": "canberra", "turkey": "ankara",
    "thailand": "bangkok", "finland": "helsinki", "denmark": "copenhagen", "hungary": "budapest",
    "belgium": "brussels", "brazil": "brasilia", "netherlands": "amsterdam", "switzerland": "bern",
    "united kingdom": "london", "england": "london", "scotland": "edinburgh", "iceland": "reykjavik",
    "south korea": "seoul", "vietnam": "hanoi", "indonesia": "jakarta", "nigeria": "abuja",
    "morocco": "rabat", "colombia": "bogota", "venezuela": "caracas", "ukraine": "kyiv",
    "czech republic": "prague", "romania": "bucharest", "iran": "tehran", "iraq": "baghdad",
    "pakistan": "islamabad", "philippines": "manila", "new zealand": "wellington",
}
# (big unit, small unit) -> how many small in one big; plural and singular spellings accepted
UNITS = {
    ("metre", "centimetre"): 100, ("meter", "centimeter"): 100, ("kilometre", "metre"): 1000,
    ("kilometer", "meter"): 1000, ("kilogram", "gram"): 1000, ("minute", "second"): 60,
    ("hour", "minute"): 60, ("hour", "second"): 3600, ("day", "hour"): 24, ("week", "day"): 7,
    ("year", "month"): 12, ("litre", "millilitre"): 1000, ("liter", "milliliter"): 1000,
    ("dozen", "egg"): 12, ("dozen", "item"): 12, ("foot", "inch"): 12, ("century", "year"): 100,
    ("decade", "year"): 10, ("year", "day"): 365, ("metre", "millimetre"): 1000, ("yard", "foot"): 3,
}
COLOURS = {"red", "blue", "green", "yellow", "purple", "orange", "pink", "black", "white", "brown",
           "grey", "gray", "violet", "gold", "silver", "turquoise"}
SMALL_TALK = [  # (pattern in the question, words an on-topic reply contains)
    (r"\b(thank|thanks)\b", r"\b(welcome|pleasure|glad|happy)\b"),
    (r"\b(bye|goodbye|see you)\b", r"\b(bye|goodbye|see you|take care|good day|wonderful day)\b"),
    (r"\bhow are you\b|\bhow's it going\b|\bhow do you feel\b|\bhow are you doing\b",
     r"\b(fine|well|good|great|okay|ok)\b"),
    (r"\bwho are you\b|\bwhat are you\b|\bwhat can you do\b|\byour job\b|\bwho you are\b|\bwhat you can do\b",
     r"\b(assistant|program|help)\b"),
    (r"^\W*(hello|hi|hey|good morning|good evening)\b", r"\b(hello|hi|hey|morning|welcome)\b"),
]
DONT_KNOW = re.compile(r"\b(don't know|do not know|not sure|no idea|cannot know|can't know|"
                       r"can't tell|cannot tell|i'm afraid)\b", re.I)
_NUM = re.compile(r"-?\d+")


def _numbers(text: str) -> list[int]:
    return [int(n) for n in _NUM.findall(text.replace(",", ""))]


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def _singular(word: str) -> str:
    word = word.lower()
    if word in ("feet",):
        return "foot"
    if word in ("inches",):
        return "inch"
    if word in ("centuries",):
        return "century"
    return word[:-1] if word.endswith("s") and not word.endswith("ss") else word


# ------------------------------------------------------------------ per-skill checks -----------
def _check_arithmetic(question: str, answer: str) -> bool | None:
    q = question.lower().replace(",", "")
    patterns = [
        (r"(-?\d+)\s*(?:plus|\+)\s*(-?\d+)", lambda a, b: (a, b, a + b)),
        (r"add\s+(-?\d+)\s+(?:and|to)\s+(-?\d+)", lambda a, b: (a, b, a + b)),
        (r"sum of\s+(-?\d+)\s+and\s+(-?\d+)", lambda a, b: (a, b, a + b)),
        (r"(-?\d+)\s*(?:minus|-)\s*(-?\d+)", lambda a, b: (a, b, a - b)),
        (r"subtract\s+(-?\d+)\s+from\s+(-?\d+)", lambda b, a: (a, b, a - b)),
        (r"(-?\d+)\s*(?:times|\*|x|multiplied by)\s*(-?\d+)", lambda a, b: (a, b, a * b)),
    ]
    for pattern, solve in patterns:
        m = re.search(pattern, q)
        if m:
            a, b, c = solve(int(m.group(1)), int(m.group(2)))
            rest = _without_column_steps(answer, (a, b))
            if rest is None:  # a step of the working is false
                return False
            nums = _numbers(rest)
            # the result is stated last, and every other number stated is an operand or the result
            return bool(nums) and nums[-1] == c and all(abs(n) in (abs(a), abs(b), abs(c)) for n in nums)
    return None


# one step of column working: small numbers (digits, a carry, a borrowed 1x) and their result
_COLUMN_STEP = re.compile(r"(?<![\d.])(\d{1,2}(?:\s*[-+]\s*\d{1,2})+)\s*=\s*(-?\d+)(?!\d)(?!\.\d)")


def _without_column_steps(answer: str, operands: tuple[int, int]) -> str | None:
    """``answer`` with its column-by-column working removed ("6 + 7 = 13, 1 + 5 + 1 = 7"): steps
    whose terms are all below 20 (other than the question's own operands restated). None when
    such a step is false (the working is wrong)."""
    def check(m: re.Match) -> str:
        terms = [int(t.replace(" ", "")) for t in re.findall(r"[-+]?\s*\d+", m.group(1))]
        if any(abs(t) >= 20 for t in terms) or sorted(map(abs, terms)) == sorted(map(abs, operands)):
            return m.group(0)  # not a column step (the operands restated, or big numbers): kept
        if sum(terms) != int(m.group(2)):
            raise ValueError(m.group(0))
        return " "
    try:
        return _COLUMN_STEP.sub(check, answer.replace(",", ", "))
    except ValueError:
        return None


def _check_capital(question: str, answer: str) -> bool | None:
    q = question.lower()
    if "capital" not in q:
        return None
    country = next((c for c in sorted(CAPITALS, key=len, reverse=True) if re.search(rf"\b{c}\b", q)), None)
    if country is None:
        return None
    a = answer.lower()
    right = CAPITALS[country]
    others = [cap for c, cap in CAPITALS.items() if cap != right and re.search(rf"\b{cap}\b", a)]
    return bool(re.search(rf"\b{right}\b", a)) and not others


def _check_units(question: str, answer: str) -> bool | None:
    q_words = [_singular(w) for w in _words(question)]
    if "how many" not in question.lower() and not re.search(r"\bone \w+ in\b", question.lower()):
        return None
    for (big, small), n in UNITS.items():
        if big in q_words and small in q_words:
            nums = _numbers(answer)
            return bool(nums) and all(x == n for x in nums)
    return None


def _word_after(pattern: str, text: str) -> str | None:
    m = re.search(pattern, text, re.I)
    return m.group(1).lower() if m else None


def _check_word_game(question: str, answer: str) -> bool | None:
    q = question
    w = (_word_after(r"spell (?:the word )?([a-z]+) backwards", q)
         or _word_after(r"reverse (?:the word )?([a-z]+)", q)
         or _word_after(r"\b([a-z]+) spelled backwards", q)
         or _word_after(r"\b([a-z]+) backwards", q))
    if w:
        return w[::-1] in _words(answer)
    w = (_word_after(r"letters (?:are )?in (?:the word )?([a-z]+)", q)
         or _word_after(r"letters does (?:the word )?([a-z]+) have", q)
         or _word_after(r"how many letters (?:the word )?([a-z]+) has", q)
         or _word_after(r"letters (?:the word )?([a-z]+) has", q))
    if w:
        nums = _numbers(answer)
        return bool(nums) and all(x == len(w) for x in nums)
    w = (_word_after(r"first letter of (?:the word )?([a-z]+)", q)
         or _word_after(r"\b(?:does|word) ([a-z]+) (?:start|begin)s? with", q)
         or _word_after(r"which letter ([a-z]+) starts with", q))
    if w:
        text = answer.replace(" ".join(w), " ")  # the word spelled out letter by letter
        letters = {t.lower() for t in re.findall(r"\b[A-Za-z]\b", text) if t != "I"}
        return letters == {w[0]}
    return None


def _check_memory(messages: list[dict], question: str, answer: str) -> bool | None:
    q = question.lower()
    earlier = " ".join(m["content"] for m in messages[:-1] if m["role"] == "user")
    if "pet" in q:
        v = (_word_after(r"\b(?:dog|cat|pet) is called ([a-z]+)", earlier) or _word_after(r"named ([a-z]+)", earlier)
             or _word_after(r"(?:pet|dog|cat)'s name is ([a-z]+)", earlier))
        return None if v is None else v in _words(answer)
    if re.search(r"\bwhere do i live\b|\bwhere i live\b|\btown\b|\bi live in\b", q):
        v = (_word_after(r"i live in (?:a town called )?([a-z]+)", earlier) or _word_after(r"i'm from ([a-z]+)", earlier)
             or _word_after(r"home town is ([a-z]+)", earlier))
        return None if v is None else v in _words(answer)
    if re.search(r"\bmy name\b|\bwho am i\b|\bmy name was\b", q):
        v = (_word_after(r"my name is ([a-z]+)", earlier) or _word_after(r"\bi'm ([a-z]+)", earlier)
             or _word_after(r"call me ([a-z]+)", earlier) or _word_after(r"\bi am ([a-z]+)", earlier))
        return None if v is None else v in _words(answer)
    if "colour" in q or "color" in q:
        v = (_word_after(r"colou?r is ([a-z]+)", earlier) or _word_after(r"the colou?r ([a-z]+)", earlier)
             or _word_after(r"colou?r i like best is ([a-z]+)", earlier))
        if v is None:
            return None
        said = set(_words(answer)) & COLOURS
        return said == {v}
    if "number" in q:
        m = (re.search(r"number is (-?\d+)", earlier, re.I) or re.search(r"the number (-?\d+)", earlier, re.I)
             or re.search(r"number (-?\d+)", earlier, re.I))
        if m is None:
            return None
        nums = _numbers(answer)
        return bool(nums) and all(x == int(m.group(1)) for x in nums)
    return None


def _check_small_talk(question: str, answer: str) -> bool | None:
    q = question.lower()
    for pattern, reply in SMALL_TALK:
        if re.search(pattern, q):
            return bool(re.search(reply, answer.lower())) and not DONT_KNOW.search(answer)
    return None


def judge_correct(messages: list[dict], answer: str) -> bool | None:
    """Is ``answer`` a correct reply to the last user turn of ``messages``? None: cannot tell."""
    if not messages or messages[-1].get("role") != "user":
        return None
    question = messages[-1]["content"]
    if not answer.strip():
        return False
    for check in (_check_arithmetic, _check_capital, _check_units, _check_word_game):
        verdict = check(question, answer)
        if verdict is not None:
            return verdict
    verdict = _check_memory(messages, question, answer)
    if verdict is not None:
        return verdict
    verdict = _check_small_talk(question, answer)
    if verdict is not None:
        return verdict
    if question.strip().endswith("?") or re.match(r"\s*(tell me|please tell|i want to know)", question, re.I):
        return bool(DONT_KNOW.search(answer))  # a question it cannot place: honesty is right
    return None


def well_formed(answer: str) -> bool:
    """Non-empty, ends like a sentence, no word repeated three times in a row, not too long."""
    text = answer.strip()
    if not text or text[-1] not in ".!?" or len(text) > 300:
        return False
    words = _words(text)
    return not any(words[i] == words[i + 1] == words[i + 2] for i in range(len(words) - 2))


_STOP = {"the", "and", "you", "your", "what", "what's", "how", "many", "much", "tell", "can", "please",
         "are", "is", "in", "of", "do", "does", "did", "me", "my", "know", "which", "with", "that", "this",
         "for", "one", "have", "has", "make", "who", "it's", "i'm"}


def addressed_terms(question: str, answer: str) -> int:
    """How many of the question's content words and numbers the answer takes up (a complete
    answer restates what it answers: "The capital of Peru is Lima." over "Lima.")."""
    terms = {w for w in _words(question) if len(w) >= 3 and w not in _STOP} | set(_NUM.findall(question))
    said = set(_words(answer)) | set(_NUM.findall(answer))
    return len(terms & said)


FILLER = re.compile(r"\b(sure|happy to help|fun one|of course|lovely|my pleasure|good question|"
                    r"would you like|want to try|do you want|can i help|anything else|how can i help)\b|\?", re.I)


def to_the_point(question: str, answer: str) -> int:
    """:func:`addressed_terms` minus the filler (pleasantries, follow-up questions)."""
    return addressed_terms(question, answer) - len(FILLER.findall(answer))


def prefers_correct(messages: list[dict], answer_a: str, answer_b: str) -> str:
    """The correct answer wins; equally correct: the well-formed one, then the more complete and
    to-the-point one (:func:`to_the_point`); else a tie."""
    ca, cb = judge_correct(messages, answer_a), judge_correct(messages, answer_b)
    if ca is not None and cb is not None and ca != cb:
        return "a" if ca else "b"
    fa, fb = well_formed(answer_a), well_formed(answer_b)
    if fa != fb:
        return "a" if fa else "b"
    question = messages[-1]["content"] if messages else ""
    ta, tb = to_the_point(question, answer_a), to_the_point(question, answer_b)
    if ta != tb:
        return "a" if ta > tb else "b"
    return "tie"


def prefers_concise(messages: list[dict], answer_a: str, answer_b: str) -> str:
    """A non-empty answer beats an empty one; else the shorter wins, a tie when close."""
    a, b = answer_a.strip(), answer_b.strip()
    if bool(a) != bool(b):
        return "a" if a else "b"
    la, lb = len(a), len(b)
    if abs(la - lb) <= max(3, 0.15 * max(la, lb)):
        return "tie"
    return "a" if la < lb else "b"


class Population:
    """Simulated users with different tastes: annotators ``(function, weight)``; each vote is
    cast by one of them, drawn by weight (:meth:`draw`), and the gold judgement of the whole
    population is the weight-averaged judgement of its members (``bench.gold.judge_pair``).

    Built from specs ``MODULE:FUNCTION`` or ``MODULE:FUNCTION=WEIGHT`` (weight 1 when left out).

    Raises:
        ValueError: a malformed spec, a non-positive weight or no member.
    """

    def __init__(self, specs: list[str]):
        import importlib

        self.members: list[tuple[str, object, float]] = []
        for spec in specs:
            name, _, weight = spec.partition("=")
            module, colon, func = name.partition(":")
            if not colon or not module or not func:
                raise ValueError(f"--annotator must be MODULE:FUNCTION[=WEIGHT], got {spec!r}")
            fn = getattr(importlib.import_module(module), func, None)
            if not callable(fn):
                raise ValueError(f"{spec}: {module} has no function {func!r}")
            w = float(weight) if weight else 1.0
            if not w > 0:
                raise ValueError(f"{spec}: the weight must be > 0")
            self.members.append((name, fn, w))
        if not self.members:
            raise ValueError("give at least one --annotator")
        total = sum(w for _, _, w in self.members)
        self.members = [(n, f, w / total) for n, f, w in self.members]

    def draw(self, rng):
        """One member's function, drawn by weight."""
        return rng.choices([f for _, f, _ in self.members], weights=[w for _, _, w in self.members])[0]

    def __str__(self) -> str:
        return ", ".join(f"{n}={w:.2f}" for n, _, w in self.members)


def join_annotator_flags(argv: list[str]) -> list[str]:
    """``--annotator`` given several times → one ``--annotator A,B,...`` (a population)."""
    specs, rest, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--annotator" and i + 1 < len(argv):
            specs.append(argv[i + 1])
            i += 2
            continue
        if arg.startswith("--annotator="):
            specs.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
        i += 1
    return rest + (["--annotator", ",".join(specs)] if specs else [])
