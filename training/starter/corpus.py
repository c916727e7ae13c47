"""Seeded synthetic corpus for the starter model: documents (stage 1) and conversations (stage 2).

Seven skills, each with several question phrasings and four answer styles, so that answers
sampled from the trained model differ in ways a person can prefer:

=============  ============================================================================
skill          what the user asks
=============  ============================================================================
arithmetic     two-digit sums and differences ("What is 12 plus 30?")
facts          capitals of countries and unit conversions from the bundled tables below
word_games     spell a word backwards, count its letters, name its first letter
memory         the user states a fact (their name, a pet's name, their town, a colour or a
               number) and asks for it 2–3 turns later; names are drawn from 166 real ones
               and thousands of made-up ones (towns: made-up), so the skill is copying from
               context, not a list
small_talk     greetings, "how are you", thanks, goodbyes, "who are you", "what can you do?"
unknown        questions outside the skills; the answer is a polite "I don't know"
system         a system prompt sets the assistant's name ("Your name is Robo."), a persona
               ("Talk like a pirate.": every answer opens "Arr!") or one answer style
               ("Be brief.": terse only); a plain one ("You are a helpful assistant.")
               changes nothing
=============  ============================================================================

Answer styles (``STYLES``): ``terse`` ("Paris."; sums always show their column working), ``explain`` (a short explanation),
``friendly`` (a friendly opener) and ``followup`` (ends with a follow-up question).

Every item carries ``answers``: every well-formed reply (all styles) mapped to its style; the
eval counts a reply as correct when it is one of them, so exact-match means "the right value in
a well-formed answer of one of the styles".

Held out from training (the rules live with the words, in :mod:`training.starter.vocab`):
the last ``HELDOUT_PHRASINGS`` phrasings of every question, one
system prompt in four (:func:`is_heldout_system`: new combinations of trained words), operand
pairs of sums with ``(a + 2*b) % 13 == 0``, memory numbers divisible by 7 (pre-training
documents practise copying any number), and names: ``HELDOUT_NAMES`` (real names
such as Alice) and the made-up names :func:`is_heldout_name` selects never occur in any document
or conversation. :func:`heldout_prompts` draws from those only; :func:`unseen_name_prompts` asks
for names and towns never seen in training.

Usage::

    from training.starter.corpus import generate_conversations, generate_documents, heldout_prompts
    convs = generate_conversations(seed=0, n=1000)   # [{"messages", "skill", "reference", "answers"}]
    docs = generate_documents(seed=0, n=1000)        # [str]
"""

from __future__ import annotations

import random

from training.starter.vocab import (
    ANSWERS,
    CAPITALS,
    COLOURS,
    HELDOUT_PHRASINGS,
    PERSONAS,
    PHRASINGS,
    UNITS,
    UNKNOWN_TOPICS,
    WORDS,
    _a,
    _spaced,
    person_name,
    system_prompt_texts,
    town_name,
)

STYLES = ("terse", "explain", "friendly", "followup")
SKILLS = ("arithmetic", "facts", "word_games", "memory", "small_talk", "unknown", "system")
SKILL_WEIGHTS = {"arithmetic": 0.14, "facts": 0.07, "word_games": 0.09, "memory": 0.34,
                 "small_talk": 0.07, "unknown": 0.06, "system": 0.23}  # recall and sums need the most practice


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
    kind = rng.choice(["greet", "how", "thanks", "bye", "who", "abilities"])
    return kind, {}, kind


def _unknown(rng: random.Random, heldout: bool):
    return "unknown", {"t": rng.choice(UNKNOWN_TOPICS)}, "I don't know"


SINGLE_TURN = {"arithmetic": _arithmetic, "facts": _facts, "word_games": _word_games,
               "small_talk": _small_talk, "unknown": _unknown}
MEMORY_FACTS = ("name", "pet", "town", "colour", "number")


def _memory_value(rng: random.Random, what: str, heldout: bool) -> str:
    if what in ("name", "pet"):
        return person_name(rng, heldout)
    if what == "town":
        return town_name(rng, heldout)
    if what == "colour":
        return rng.choice(COLOURS)
    while True:
        n = rng.randint(10, 999)
        if (n % 7 == 0) == heldout:
            return str(n)


def _system_prompt(rng: random.Random, kind: str, values: dict, heldout: bool) -> dict:
    return {"role": "system", "content": rng.choice(system_prompt_texts(kind, heldout)).format(**values)}


def _system_turn(rng: random.Random, mode: str, values: dict, qh: bool) -> tuple[str, dict, str]:
    """One question under a system prompt of ``mode``: ``(question, obeying answers, reference)``."""
    if mode == "name" and rng.random() < 0.6:
        q, answers = _turn(rng, "ask_your_name", values, qh)
        if rng.random() < 0.3:  # "who are you?" names itself too
            q = rng.choice(PHRASINGS["who"][-HELDOUT_PHRASINGS:] if qh else PHRASINGS["who"][:2])
        ref = values["n"]
    else:
        while True:
            skill = rng.choice(["arithmetic", "facts", "word_games", "small_talk", "unknown"])
            kind, qvalues, ref = SINGLE_TURN[skill](rng, qh)
            if not (mode == "name" and kind == "who"):
                break
        q, answers = _turn(rng, kind, qvalues, qh)
    if mode == "persona":
        answers = {PERSONAS[values["p"]] + a: st for a, st in answers.items()}
    elif mode in STYLES:
        answers = {a: st for a, st in answers.items() if st == mode}
    return q, answers, ref


def _system(rng: random.Random, heldout: bool, questions_heldout: bool | None = None, turns: int = 1) -> dict:
    """A system prompt and ``turns`` questions (the earlier ones answered obeying it); ``answers``
    holds only the replies to the last that obey it, and ``mode`` says what the system prompt
    asks (``name``, ``persona``, ``plain`` or a style).

    ``name``: asked for its name (or "who are you?") it gives that name, other questions as
    usual; ``persona``: every answer opens with the persona's opener (``PERSONAS``); a style
    prompt (``STYLES``): the answer in that style only; ``plain``: any style. ``heldout``: held-out
    system prompts and names; ``questions_heldout`` (default: ``heldout``): held-out question
    phrasings and values.
    """
    qh = heldout if questions_heldout is None else questions_heldout
    mode = rng.choice(["name", "name", "persona", "plain", *STYLES])
    values = {"n": person_name(rng, heldout), "p": rng.choice(list(PERSONAS))}
    messages = [_system_prompt(rng, mode, values, heldout)]
    for _ in range(turns - 1):
        q, answers, _ = _system_turn(rng, mode, values, qh)
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": rng.choice(list(answers))}]
    q, answers, ref = _system_turn(rng, mode, values, qh)
    return {"messages": messages + [{"role": "user", "content": q}], "skill": "system",
            "reference": ref, "answers": answers, "mode": mode}


def _conversation(rng: random.Random, skill: str, heldout: bool, facts: tuple[str, ...] = MEMORY_FACTS) -> dict:
    """One conversation ending with a user turn, plus the graded reply's answers.

    Returns ``{"messages", "skill", "reference", "answers"}``; ``messages`` ends with the user
    turn to answer and ``answers`` maps every well-formed reply to its style. ``facts``: what
    a memory conversation may ask for (``MEMORY_FACTS``).
    """
    if skill == "system":  # training: up to three obeying turns (more supervised tokens per prompt)
        return _system(rng, heldout, turns=1 if heldout else rng.choice([1, 2, 3]))
    if skill != "memory":
        kind, values, ref = SINGLE_TURN[skill](rng, heldout)
        q, answers = _turn(rng, kind, values, heldout)
        return {"messages": [{"role": "user", "content": q}], "skill": skill,
                "reference": ref, "answers": answers}
    what = rng.choice(facts)
    v = _memory_value(rng, what, heldout)
    q, acks = _turn(rng, f"state_{what}", {"v": v}, heldout=False)
    # a name or town is acknowledged by saying it back: what the user hears confirmed, and the
    # copy made at once, one turn after it was typed, is practice for the later recall
    acks = [a for a in acks if v in a] if what in ("name", "pet", "town") else list(acks)
    messages = [{"role": "user", "content": q}, {"role": "assistant", "content": rng.choice(acks)}]
    if rng.random() < 0.15:  # a plain system prompt, as a UI may always send one
        messages.insert(0, _system_prompt(rng, "plain", {}, heldout))
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


def unseen_name_prompts(seed: int, n: int) -> list[dict]:
    """``n`` memory prompts whose stated name, pet's name or town never occurs in training
    (``HELDOUT_NAMES`` and held-out made-up names), asked in training phrasings: recall by
    copying from the context. Items as :func:`heldout_prompts`."""
    rng = random.Random(f"unseen-names-{seed}")
    out = []
    for _ in range(n):
        item = _conversation(rng, "memory", heldout=True, facts=("name", "pet", "town"))
        asked = item["messages"][-1]
        kind = "ask_" + next(f for f in ("name", "pet", "town") if asked["content"] in PHRASINGS[f"ask_{f}"])
        q, answers = _turn(rng, kind, {"v": item["reference"]}, heldout=False)
        out.append(item | {"messages": item["messages"][:-1] + [{"role": "user", "content": q}], "answers": answers})
    return out


def system_prompts(seed: int, n: int, heldout: bool = True) -> list[dict]:
    """``n`` prompts of the ``system`` skill; ``heldout=True``: system prompts (and the names
    they give) never trained on, questions in training phrasings, so that the figure measures
    obeying new system prompts (held-out question phrasings have their own figure). Items as
    :func:`heldout_prompts`, plus ``mode``."""
    rng = random.Random(f"system-{seed}-{heldout}")
    return [_system(rng, heldout, questions_heldout=False) for _ in range(n)]


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
        rng.choice([f"{person_name(rng)} said that her favourite colour is {rng.choice(COLOURS)}.",
                    f"{person_name(rng)} lives in {town_name(rng)}.",
                    f"{person_name(rng)} has a dog called {person_name(rng)}.",
                    f"Nobody knows {rng.choice(UNKNOWN_TOPICS)}.",
                    f"When you do not know {rng.choice(UNKNOWN_TOPICS)}, say so politely.",
                    f"A good reply to a greeting is: {rng.choice(ANSWERS['greet'])}",
                    f"My friend {person_name(rng)} told me her lucky number is {rng.randint(10, 999)}."]),
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
    """A recall drill: three people state a number, colour, pet's name or town, then each is
    repeated back.

    Copying a value stated earlier in the context is what the memory skill needs.
    """
    people = list(dict.fromkeys(person_name(rng) for _ in range(3)))
    facts = []
    for name in people:
        r = rng.random()
        if r < 0.35:
            facts.append((f"{name}'s lucky number is", str(rng.randint(10, 999))))
        elif r < 0.55:
            facts.append((f"{name}'s favourite colour is", rng.choice(COLOURS)))
        elif r < 0.8:
            facts.append((f"{name}'s dog is called", person_name(rng)))
        else:
            facts.append((f"{name} lives in", town_name(rng)))
    stated = " ".join(f"{k} {v}." for k, v in facts)
    rng.shuffle(facts)
    return f"{stated} Later I asked again. " + " ".join(f"{k} {v}." for k, v in facts)


def generate_documents(seed: int, n: int, drill_frac: float = 0.3, recall_frac: float = 0.4) -> list[str]:
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
