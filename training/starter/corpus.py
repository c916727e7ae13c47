"""Seeded synthetic corpus for the starter model: documents (stage 1) and conversations (stage 2).

Six skills, each with several question phrasings and four answer styles, so that answers
sampled from the trained model differ in ways a person can prefer:

=============  ============================================================================
skill          what the user asks
=============  ============================================================================
arithmetic     two-digit sums and differences ("What is 12 plus 30?")
facts          capitals of countries and unit conversions from the bundled tables below
word_games     spell a word backwards, count its letters, name its first letter
memory         the user states a name, colour or number and asks for it 2–3 turns later
small_talk     greetings, "how are you", thanks, goodbyes, "who are you"
unknown        questions outside the skills; the answer is a polite "I don't know"
=============  ============================================================================

Answer styles (``STYLES``): ``terse`` ("Paris."; sums always show their column working), ``explain`` (a short explanation),
``friendly`` (a friendly opener) and ``followup`` (ends with a follow-up question).

Every item carries ``answers``: every well-formed reply (all styles) mapped to its style; the
eval counts a reply as correct when it is one of them, so exact-match means "the right value in
a well-formed answer of one of the styles".

Held out from training: the last ``HELDOUT_PHRASINGS`` phrasings of every question, operand
pairs of sums with ``(a + 2*b) % 13 == 0`` and memory numbers divisible by 7 (held out from the
conversations; pre-training documents practise copying any number).
:func:`heldout_prompts` draws from those only.

Usage::

    from training.starter.corpus import generate_conversations, generate_documents, heldout_prompts
    convs = generate_conversations(seed=0, n=1000)   # [{"messages", "skill", "reference", "answers"}]
    docs = generate_documents(seed=0, n=1000)        # [str]
"""

from __future__ import annotations

import random

STYLES = ("terse", "explain", "friendly", "followup")
SKILLS = ("arithmetic", "facts", "word_games", "memory", "small_talk", "unknown")
SKILL_WEIGHTS = {"arithmetic": 0.25, "facts": 0.12, "word_games": 0.16, "memory": 0.28,
                 "small_talk": 0.09, "unknown": 0.10}  # sums and recall need the most practice
HELDOUT_PHRASINGS = 2  # the last two phrasings of every question are never trained on

CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin",
    "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Chile": "Santiago", "Canada": "Ottawa",
    "Norway": "Oslo", "Sweden": "Stockholm", "Poland": "Warsaw", "Greece": "Athens",
    "Portugal": "Lisbon", "Austria": "Vienna", "Ireland": "Dublin", "Russia": "Moscow",
    "China": "Beijing", "India": "Delhi", "Mexico": "Mexico City", "Cuba": "Havana",
    "Argentina": "Buenos Aires", "Australia": "Canberra", "Turkey": "Ankara",
    "Thailand": "Bangkok", "Finland": "Helsinki", "Denmark": "Copenhagen", "Hungary": "Budapest",
    "Belgium": "Brussels",
}
UNITS = [  # (big, small, how many small in one big)
    ("metre", "centimetres", 100), ("kilometre", "metres", 1000), ("kilogram", "grams", 1000),
    ("minute", "seconds", 60), ("hour", "minutes", 60), ("day", "hours", 24), ("week", "days", 7),
    ("year", "months", 12), ("litre", "millilitres", 1000), ("dozen", "eggs", 12),
    ("foot", "inches", 12), ("century", "years", 100),
]


def _a(noun: str) -> str:
    """``noun`` with its indefinite article: "an hour", "a metre"."""
    return ("an " if noun[0] in "aeiouh" else "a ") + noun
WORDS = [
    "cat", "dog", "house", "apple", "river", "green", "table", "music", "bread", "light",
    "storm", "tiger", "plant", "chair", "water", "smile", "cloud", "train", "horse", "lemon",
    "stone", "pencil", "garden", "rabbit", "window", "orange", "summer", "winter", "bottle",
    "planet", "candle", "forest", "sun", "moon", "star", "fish", "bird", "tree", "book", "door",
]
NAMES = ["Ada", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Hugo", "Iris", "Jack",
         "Kate", "Leo", "Maria", "Nina", "Oscar", "Paul", "Rosa", "Sam", "Tom", "Zoe"]
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "pink", "black", "white", "brown"]
UNKNOWN_TOPICS = [
    "the weather tomorrow", "the price of gold today", "the meaning of life",
    "the best film ever made", "the population of Mars", "the winner of the next election",
    "the recipe for apple pie", "the score of last night's game", "the height of the tallest tree",
    "the time right now", "the date of the next full moon", "the fastest car in the world",
    "the name of the king of the sea", "the longest river on Venus", "the cure for the cold",
]


def _spaced(word: str) -> str:
    return " ".join(word)


# ------------------------------------------------------------------ question phrasings ---------
# Each list ends with the HELDOUT_PHRASINGS phrasings held out from training. Held-out phrasings
# recombine carriers ("Can you tell me", "Do you know", "Please") that training uses elsewhere.
PHRASINGS = {
    "plus": ["What is {a} plus {b}?", "What's {a} + {b}?", "Can you add {a} and {b}?",
             "Please work out {a} + {b}.", "How much is {a} plus {b}?", "Tell me {a} + {b}."],
    "minus": ["What is {a} minus {b}?", "What's {a} - {b}?", "Can you subtract {b} from {a}?",
              "Please work out {a} - {b}.", "How much is {a} minus {b}?", "Tell me {a} - {b}."],
    "capital": ["What is the capital of {country}?", "What's the capital city of {country}?",
                "Which city is the capital of {country}?", "Tell me the capital of {country}.",
                "Do you know the capital of {country}?", "Can you tell me the capital of {country}?"],
    "unit": ["How many {small} are in {abig}?", "How many {small} make {abig}?",
             "Tell me how many {small} are in one {big}.", "What is one {big} in {small}?",
             "Do you know how many {small} are in {abig}?", "Can you tell me how many {small} make {abig}?"],
    "backwards": ["Spell {w} backwards.", "How do you spell {w} backwards?",
                  "What is {w} spelled backwards?", "Can you reverse the word {w}?",
                  "Please spell {w} backwards.", "Tell me {w} backwards."],
    "count": ["How many letters are in {w}?", "How many letters does {w} have?",
              "Count the letters in {w}.", "What is the number of letters in {w}?",
              "Can you count the letters in {w}?", "Tell me how many letters {w} has."],
    "first": ["What is the first letter of {w}?", "Which letter does {w} start with?",
              "What letter does {w} begin with?", "Name the first letter of {w}.",
              "Tell me the first letter of {w}.", "Can you tell me which letter {w} starts with?"],
    "state_name": ["My name is {v}.", "Hi, I'm {v}.", "Call me {v}, please.", "Hello, my name is {v}."],
    "state_colour": ["My favourite colour is {v}.", "I really like the colour {v}.",
                     "The colour I like best is {v}.", "My favourite colour is {v}, by the way."],
    "state_number": ["My lucky number is {v}.", "Remember that my lucky number is {v}.",
                     "Please remember the number {v}.", "My lucky number is {v}, by the way."],
    "ask_name": ["What is my name?", "Do you remember my name?", "What did I say my name was?",
                 "Who am I?", "Can you tell me my name?", "Tell me what my name is."],
    "ask_colour": ["What is my favourite colour?", "Do you remember my favourite colour?",
                   "Which colour do I like best?", "What colour did I say I like?",
                   "Can you tell me my favourite colour?", "Tell me which colour I like."],
    "ask_number": ["What is my lucky number?", "Do you remember my lucky number?",
                   "What number did I ask you to remember?", "Which number is my lucky number?",
                   "Can you tell me my lucky number?", "Tell me my lucky number."],
    "greet": ["Hello!", "Hi there!", "Good morning!", "Hey!", "Hey there!", "Hello, good morning!"],
    "how": ["How are you?", "How are you doing today?", "How's it going?", "How do you feel?",
            "How are you today?", "Hi, how are you doing?"],
    "thanks": ["Thank you!", "Thanks a lot!", "Thanks for your help.", "Many thanks!",
               "Thank you so much!", "Thanks, that helps a lot."],
    "bye": ["Goodbye!", "Bye, see you later!", "See you soon!", "I have to go now, bye!",
            "Bye for now!", "Goodbye, see you soon!"],
    "who": ["Who are you?", "What are you?", "What can you do?", "What is your job?",
            "Can you tell me who you are?", "Tell me what you can do."],
    "unknown": ["What is {t}?", "Do you know {t}?", "Tell me {t}.", "I want to know {t}.",
                "Can you tell me {t}?", "Please tell me {t}."],
}

# ------------------------------------------------------------------ answer styles --------------
# (terse, explain, friendly, followup) for each kind of answer; one format string per style.
ANSWERS = {
    # sums restate the operands, then work column by column from the units ({w}, see
    # _worked), so every digit written depends on a few digits at fixed distances before it
    "plus": ("{a} + {b}: {w}, so {c}.", "{a} + {b}: {w}. Putting the digits together, the answer is {c}.",
             "Sure! {a} + {b}: {w}, so it is {c}.", "{a} + {b}: {w}, so {c}. Would you like another sum?"),
    "minus": ("{a} - {b}: {w}, so {c}.", "{a} - {b}: {w}. Putting the digits together, the answer is {c}.",
              "Sure! {a} - {b}: {w}, so it is {c}.", "{a} - {b}: {w}, so {c}. Would you like another sum?"),
    "capital": ("{capital}.", "The capital of {country} is {capital}.",
                "Happy to help! The capital of {country} is {capital}.",
                "It is {capital}. Do you want to know another capital?"),
    "unit": ("{n}.", "There are {n} {small} in {abig}.", "Happy to help! There are {n} {small} in {abig}.",
             "It is {n}. Do you want to know another unit?"),
    "backwards": ("{rev}.", "{w} is spelled {sp}, so backwards it is {rev}.",
                  "Fun one! {w} backwards is {rev}.", "It is {rev}. Want to try another word?"),
    "count": ("{n}.", "{w} is spelled {sp}, so it has {n} letters.", "Fun one! {w} has {n} letters.",
              "It has {n} letters. Want to try another word?"),
    "first": ("{f}.", "{w} is spelled {sp}, so the first letter is {f}.",
              "Fun one! {w} starts with {f}.", "It is {f}. Want to try another word?"),
    "state_name": ("Noted.", "Got it, your name is {v}. I will remember that.", "Nice to meet you, {v}!",
                   "Nice to meet you, {v}! How can I help you?"),
    "state_colour": ("Noted.", "Got it, your favourite colour is {v}. I will remember that.",
                     "Lovely, {v} is a great colour!", "Lovely, {v} is a great colour! How can I help you?"),
    "state_number": ("Noted.", "Got it, your lucky number is {v}. I will remember that.",
                     "Great, {v} is a nice number!", "Great, {v} is a nice number! How can I help you?"),
    "ask_name": ("{v}.", "You told me earlier that your name is {v}.", "Of course! Your name is {v}.",
                 "Your name is {v}. Can I help with anything else?"),
    "ask_colour": ("{v}.", "You told me earlier that your favourite colour is {v}.",
                   "Of course! Your favourite colour is {v}.",
                   "Your favourite colour is {v}. Can I help with anything else?"),
    "ask_number": ("{v}.", "You told me earlier that your lucky number is {v}.",
                   "Of course! Your lucky number is {v}.",
                   "Your lucky number is {v}. Can I help with anything else?"),
    "greet": ("Hello.", "Hello! I am a small assistant for sums, facts and word games.",
              "Hi there, lovely to see you!", "Hello! What can I do for you today?"),
    "how": ("I'm fine, thanks.", "I'm doing well, thanks. I'm a small program, so I'm always ready.",
            "I'm great, thank you for asking!", "I'm fine, thanks! How are you?"),
    "thanks": ("You're welcome.", "You're welcome. I'm glad I could help.", "My pleasure, happy to help!",
               "You're welcome! Is there anything else?"),
    "bye": ("Goodbye.", "Goodbye! Thanks for chatting with me.", "Bye, have a wonderful day!",
            "Goodbye! Will you come back soon?"),
    "who": ("A small assistant.", "I'm a small assistant. I can do sums, facts, word games and remember things.",
            "Hi! I'm your friendly little assistant.", "I'm a small assistant. What would you like to ask me?"),
    "unknown": ("I don't know.", "I'm sorry, I don't know that. I only know sums, facts and word games.",
                "Good question! I'm afraid I don't know, sorry.",
                "Sorry, I don't know that. Can I help with something else?"),
}


def _turn(rng: random.Random, kind: str, values: dict, heldout: bool) -> tuple[str, dict[str, str]]:
    """One question of ``kind`` and all its well-formed answers (reply -> style)."""
    phr = PHRASINGS[kind]
    pool = phr[-HELDOUT_PHRASINGS:] if heldout else phr[:-HELDOUT_PHRASINGS]
    question = rng.choice(pool).format(**values)
    answers = {fmt.format(**values): style for fmt, style in zip(ANSWERS[kind], STYLES, strict=True)}
    return question, answers


def _is_heldout_pair(a: int, b: int) -> bool:
    return (a + 2 * b) % 13 == 0


def _worked(a: int, b: int, kind: str) -> str:
    """Column-by-column working of a two-digit sum or difference, units first.

    ``64 + 68`` → ``"4 + 8 = 12, 6 + 6 + 1 = 13"``; ``91 - 38`` → ``"11 - 8 = 3, 8 - 3 = 5"``
    (a borrow adds 10 to the units and takes 1 from the tens).
    """
    (at, au), (bt, bu) = divmod(a, 10), divmod(b, 10)
    if kind == "plus":
        carry = " + 1" if au + bu >= 10 else ""
        return f"{au} + {bu} = {au + bu}, {at} + {bt}{carry} = {at + bt + (au + bu >= 10)}"
    borrow = au < bu
    return f"{au + 10 * borrow} - {bu} = {au + 10 * borrow - bu}, {at - borrow} - {bt} = {at - borrow - bt}"


def _arithmetic(rng: random.Random, heldout: bool):
    while True:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if _is_heldout_pair(a, b) == heldout:
            break
    kind = rng.choice(["plus", "minus"])
    if kind == "minus" and a < b:
        a, b = b, a
    c = a + b if kind == "plus" else a - b
    return kind, {"a": a, "b": b, "c": c, "w": _worked(a, b, kind)}, str(c)


def _facts(rng: random.Random, heldout: bool):
    if rng.random() < 0.6:
        country = rng.choice(list(CAPITALS))
        return "capital", {"country": country, "capital": CAPITALS[country]}, CAPITALS[country]
    big, small, n = rng.choice(UNITS)
    return "unit", {"big": big, "abig": _a(big), "small": small, "n": n}, str(n)


def _word_games(rng: random.Random, heldout: bool):
    w = rng.choice(WORDS)
    kind = rng.choice(["backwards", "count", "first"])
    values = {"w": w, "sp": _spaced(w), "rev": w[::-1], "n": len(w), "f": w[0]}
    ref = {"backwards": w[::-1], "count": str(len(w)), "first": w[0]}[kind]
    return kind, values, ref


def _small_talk(rng: random.Random, heldout: bool):
    kind = rng.choice(["greet", "how", "thanks", "bye", "who"])
    return kind, {}, kind


def _unknown(rng: random.Random, heldout: bool):
    return "unknown", {"t": rng.choice(UNKNOWN_TOPICS)}, "I don't know"


SINGLE_TURN = {"arithmetic": _arithmetic, "facts": _facts, "word_games": _word_games,
               "small_talk": _small_talk, "unknown": _unknown}


def _memory_value(rng: random.Random, what: str, heldout: bool) -> str:
    if what == "name":
        return rng.choice(NAMES)
    if what == "colour":
        return rng.choice(COLOURS)
    while True:
        n = rng.randint(10, 999)
        if (n % 7 == 0) == heldout:
            return str(n)


def _conversation(rng: random.Random, skill: str, heldout: bool) -> dict:
    """One conversation ending with a user turn, plus the graded reply's answers.

    Returns ``{"messages", "skill", "reference", "answers"}``; ``messages`` ends with the user
    turn to answer and ``answers`` maps every well-formed reply to its style.
    """
    if skill != "memory":
        kind, values, ref = SINGLE_TURN[skill](rng, heldout)
        q, answers = _turn(rng, kind, values, heldout)
        return {"messages": [{"role": "user", "content": q}], "skill": skill,
                "reference": ref, "answers": answers}
    what = rng.choice(["name", "colour", "number"])
    v = _memory_value(rng, what, heldout)
    q, acks = _turn(rng, f"state_{what}", {"v": v}, heldout=False)
    messages = [{"role": "user", "content": q}, {"role": "assistant", "content": rng.choice(list(acks))}]
    for _ in range(rng.randint(1, 2)):  # distractor turns: asked two or three turns later
        dskill = rng.choice(["arithmetic", "facts", "word_games", "small_talk"])
        kind, values, _ = SINGLE_TURN[dskill](rng, False)
        if kind in ("bye", "greet"):
            kind = "how"
        dq, dans = _turn(rng, kind, values, heldout=False)
        messages += [{"role": "user", "content": dq}, {"role": "assistant", "content": rng.choice(list(dans))}]
    q, answers = _turn(rng, f"ask_{what}", {"v": v}, heldout)
    messages.append({"role": "user", "content": q})
    return {"messages": messages, "skill": "memory", "reference": v, "answers": answers}


def _pick_skill(rng: random.Random) -> str:
    return rng.choices(SKILLS, weights=[SKILL_WEIGHTS[s] for s in SKILLS])[0]


def generate_conversations(seed: int, n: int, skills: tuple[str, ...] | None = None) -> list[dict]:
    """``n`` training conversations, each complete (ends with an assistant reply in a random style).

    Returns items ``{"messages", "skill", "reference", "answers"}``; the same seed gives the same list.
    Only training phrasings and values are used.
    """
    rng = random.Random(f"conversations-{seed}")
    out = []
    for i in range(n):
        skill = skills[i % len(skills)] if skills else _pick_skill(rng)
        item = _conversation(rng, skill, heldout=False)
        reply = rng.choice(list(item["answers"]))
        item["messages"] = item["messages"] + [{"role": "assistant", "content": reply}]
        out.append(item)
    return out


def eval_prompts(seed: int, n_per_skill: int, heldout: bool = False) -> list[dict]:
    """Fresh prompts, ``n_per_skill`` per skill, ending with the user turn to answer.

    ``heldout=False`` uses training phrasings (fresh values and contexts), ``heldout=True``
    the held-out phrasings and values. Items are ``{"messages", "skill", "reference", "answers"}``.
    """
    rng = random.Random(f"prompts-{seed}-{heldout}")
    return [_conversation(rng, skill, heldout) for skill in SKILLS for _ in range(n_per_skill)]


def heldout_prompts(seed: int, n: int) -> list[dict]:
    """``n`` prompts from phrasings and values held out from training, skills in turn.

    Items are ``{"messages", "skill", "reference", "answers"}``: ``messages`` is the context
    ending with a user turn; ``reference`` the value a correct reply must state; ``answers``
    maps every well-formed reply to its style (``STYLES``).
    """
    rng = random.Random(f"heldout-{seed}")
    return [_conversation(rng, SKILLS[i % len(SKILLS)], heldout=True) for i in range(n)]


# ------------------------------------------------------------------ documents (stage 1) --------
def _fact_sentences(rng: random.Random) -> list[str]:
    country = rng.choice(list(CAPITALS))
    cap = CAPITALS[country]
    big, small, n = rng.choice(UNITS)
    w = rng.choice(WORDS)
    kind, v, _ = _arithmetic(rng, heldout=False)
    op = "plus" if kind == "plus" else "minus"
    sym = "+" if kind == "plus" else "-"
    return [
        rng.choice([f"The capital of {country} is {cap}.", f"{cap} is the capital of {country}.",
                    f"{country} has its capital in {cap}."]),
        rng.choice([f"There are {n} {small} in {_a(big)}.", f"One {big} is {n} {small}.",
                    f"{_a(big).capitalize()} has {n} {small}."]),
        rng.choice([f"The word {w} is spelled {_spaced(w)}.", f"{w} has {len(w)} letters.",
                    f"{w} starts with the letter {w[0]}.", f"{w} spelled backwards is {w[::-1]}."]),
        rng.choice([f"{v['a']} {op} {v['b']} is {v['c']}.", f"{v['a']} {sym} {v['b']} = {v['c']}.",
                    f"If you work out {v['a']} {sym} {v['b']}, you get {v['c']}."]),
        rng.choice([f"{rng.choice(NAMES)} said that her favourite colour is {rng.choice(COLOURS)}.",
                    f"Nobody knows {rng.choice(UNKNOWN_TOPICS)}.",
                    f"When you do not know {rng.choice(UNKNOWN_TOPICS)}, say so politely.",
                    f"A good reply to a greeting is: {rng.choice(ANSWERS['greet'])}",
                    f"My friend {rng.choice(NAMES)} told me her lucky number is {rng.randint(10, 999)}."]),
    ]


def _drill(rng: random.Random) -> str:
    """A worked-sums drill: 4–8 sums worked column by column, the bulk of arithmetic practice."""
    lines = []
    for _ in range(rng.randint(4, 8)):
        kind, v, _ = _arithmetic(rng, heldout=False)
        sym = "+" if kind == "plus" else "-"
        lines.append(f"{v['a']} {sym} {v['b']}: {v['w']}, so {v['c']}.")
    return " ".join(lines)


def _recall(rng: random.Random) -> str:
    """A recall drill: three people state a number or colour, then each is repeated back.

    Copying a value stated earlier in the context is what the memory skill needs.
    """
    people = rng.sample(NAMES, 3)
    facts = []
    for name in people:
        if rng.random() < 0.6:
            facts.append((f"{name}'s lucky number is", str(rng.randint(10, 999))))
        else:
            facts.append((f"{name}'s favourite colour is", rng.choice(COLOURS)))
    stated = " ".join(f"{k} {v}." for k, v in facts)
    rng.shuffle(facts)
    return f"{stated} Later I asked again. " + " ".join(f"{k} {v}." for k, v in facts)


def generate_documents(seed: int, n: int, drill_frac: float = 0.4, recall_frac: float = 0.2) -> list[str]:
    """``n`` short plain-text documents over the same facts, for pre-training.

    A ``drill_frac`` share are arithmetic drills (4–8 worked sums), a ``recall_frac`` share
    recall drills (values stated, then repeated back); the rest are 3–6 mixed sentences about
    capitals, units, words, sums, people and polite replies.
    """
    rng = random.Random(f"documents-{seed}")
    docs = []
    for _ in range(n):
        r = rng.random()
        if r < drill_frac:
            docs.append(_drill(rng))
        elif r < drill_frac + recall_frac:
            docs.append(_recall(rng))
        else:
            sentences = [s for _ in range(2) for s in _fact_sentences(rng)]
            rng.shuffle(sentences)
            docs.append(" ".join(sentences[: rng.randint(3, 6)]))
    return docs
