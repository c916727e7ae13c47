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

Held out from training: the last ``HELDOUT_PHRASINGS`` phrasings of every question, one
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
import zlib

STYLES = ("terse", "explain", "friendly", "followup")
SKILLS = ("arithmetic", "facts", "word_games", "memory", "small_talk", "unknown", "system")
SKILL_WEIGHTS = {"arithmetic": 0.14, "facts": 0.07, "word_games": 0.09, "memory": 0.34,
                 "small_talk": 0.07, "unknown": 0.06, "system": 0.23}  # recall and sums need the most practice
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
         "Kate", "Leo", "Maria", "Nina", "Oscar", "Paul", "Rosa", "Sam", "Tom", "Zoe",
         "Anna", "Bruno", "Carmen", "Daniel", "Elif", "Farid", "Greta", "Hana", "Isaac", "Jonas",
         "Karim", "Laura", "Marco", "Nadia", "Oliver", "Petra", "Quentin", "Ruth", "Simon", "Tara",
         "Ursula", "Victor", "Wendy", "Xavier", "Yara", "Anton", "Bella", "Diego", "Eva", "Frank",
         # many more, from many languages: too many to memorise, so recalling one means copying it
         "Abdul", "Adele", "Ahmed", "Akira", "Alba", "Alex", "Amir", "Ana", "Andre", "Angela",
         "Arjun", "Astrid", "Ayla", "Beatriz", "Benedict", "Bianca", "Boris", "Camila", "Carla",
         "Cecile", "Chen", "Chiara", "Clement", "Dalia", "Damian", "Dara", "Deepa", "Dmitri", "Dora",
         "Edith", "Eduardo", "Eleni", "Elias", "Emil", "Enzo", "Erik", "Esther", "Fabio", "Femi",
         "Fiona", "Freya", "Gabriel", "Gemma", "Gianni", "Gloria", "Hamid", "Harold", "Helga",
         "Henrik", "Hiro", "Ines", "Ingrid", "Irene", "Jamal", "James", "Jana", "Javier", "Jin",
         "Joanna", "Jorge", "Julia", "Kai", "Kamala", "Kasia", "Kevin", "Kofi", "Lara", "Lars",
         "Layla", "Linh", "Lorenzo", "Lucia", "Luis", "Magnus", "Malik", "Marta", "Matteo", "Meera",
         "Miguel", "Milan", "Ming", "Nadim", "Naomi", "Nikolai", "Nora", "Olga", "Pablo", "Pedro",
         "Pia", "Rafael", "Rania", "Ravi", "Rhea", "Rita", "Robert", "Rohan", "Rui", "Salma",
         "Sanjay", "Selma", "Sergei", "Shira", "Silvia", "Stefan", "Sven", "Tariq", "Thomas",
         "Tomas", "Valentina", "Vera", "Walter", "Wei", "Yusuf", "Zain", "Zara", "Zofia"]
# never in training: the names a newcomer (and the eval) tries first
HELDOUT_NAMES = ["Alice", "Robo", "Bob", "Charlie", "Olivia", "Mohammed", "Sofia", "Lucas", "Priya",
                 "Kenji", "Fatima", "Noah", "Chloe", "Omar", "Hannah", "Mateo", "Aisha", "Ivan",
                 "Yuki", "Elena", "Carlos", "Amara", "Theo", "Lena", "Raj", "Mia", "Sarah", "John"]
_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "ch", "sh",
           "st", "th", "tr", "j", "h", "w", "y"]
_VOWELS = ["a", "e", "i", "o", "u", "a", "e", "i", "o", "ai", "ea", "ou", "y"]
_CODAS = ["", "", "", "n", "r", "l", "s", "m", "x", "th"]
_TOWN_ENDS = ["ton", "ford", "ville", "burg", "field", "mouth", "bridge", "wick"]
PERSONAS = {"pirate": "Arr! ", "robot": "Beep boop. ", "cowboy": "Howdy! "}  # persona -> opener
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


def is_heldout_name(name: str) -> bool:
    """Whether a made-up name is held out from training (a fixed hash rule, about one in five)."""
    return zlib.crc32(name.lower().encode()) % 5 == 0


def _made_up_name(rng: random.Random) -> str:
    """A pronounceable made-up name of two or three syllables: "Talori", "Breshan"."""
    syllables = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.choice([2, 2, 3])))
    return (syllables + rng.choice(_CODAS)).capitalize()


def person_name(rng: random.Random, heldout: bool = False) -> str:
    """A name for a person, pet or assistant: training draws ``NAMES`` or made-up names;
    ``heldout=True`` draws ``HELDOUT_NAMES`` or held-out made-up names."""
    if rng.random() < 0.4:
        return rng.choice(HELDOUT_NAMES if heldout else NAMES)
    while True:
        name = _made_up_name(rng)
        if is_heldout_name(name) == heldout and name not in NAMES and name not in HELDOUT_NAMES:
            return name


def town_name(rng: random.Random, heldout: bool = False) -> str:
    """A made-up town ("Kalemford"); held out by the same hash rule as names."""
    while True:
        town = _made_up_name(rng) + rng.choice(_TOWN_ENDS)
        if is_heldout_name(town) == heldout:
            return town


# What the Chat tab offers a newcomer to click: one skill each, in trained phrasings (Lucas is
# a held-out name: recalling it is copying)
EXAMPLE_PROMPTS = ["Hi, my name is Lucas.", "What is 12 plus 30?", "Spell garden backwards.",
                   "What is the capital of France?", "What can you do?"]

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
    "state_name": ["My name is {v}.", "Hi, I'm {v}.", "Call me {v}, please.", "Hello, my name is {v}.",
                   "Hi, my name is {v}.", "I am {v}.", "I'm {v}.", "Hi! My name is {v}."],
    "state_pet": ["My dog is called {v}.", "I have a cat named {v}.", "My pet's name is {v}.",
                  "My dog's name is {v}, by the way."],
    "state_town": ["I live in {v}.", "I'm from {v}.", "My home town is {v}.", "I live in a town called {v}."],
    "state_colour": ["My favourite colour is {v}.", "I really like the colour {v}.",
                     "The colour I like best is {v}.", "My favourite colour is {v}, by the way."],
    "state_number": ["My lucky number is {v}.", "Remember that my lucky number is {v}.",
                     "Please remember the number {v}.", "My lucky number is {v}, by the way."],
    "ask_name": ["What is my name?", "Do you remember my name?", "What did I say my name was?",
                 "Who am I?", "Can you tell me my name?", "Tell me what my name is."],
    "ask_pet": ["What is my pet's name?", "Do you remember my pet's name?", "What did I say my pet is called?",
                "What is my pet called?", "Can you tell me my pet's name?", "Tell me the name of my pet."],
    "ask_town": ["Where do I live?", "Do you remember where I live?", "Which town do I live in?",
                 "What is my home town?", "Can you tell me where I live?", "Tell me which town I live in."],
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
    "who": ["Who are you?", "What are you?", "Are you a robot?", "What is your job?",
            "Can you tell me who you are?", "Tell me who you are."],
    "abilities": ["What can you do?", "What are you able to do?", "How can you help me?", "What do you know?",
                  "Tell me what you can do.", "Can you tell me what you are able to do?"],
    "ask_your_name": ["What is your name?", "What are you called?", "What should I call you?",
                      "Do you have a name?", "Can you tell me your name?", "Tell me your name."],
    "unknown": ["What is {t}?", "Do you know {t}?", "Tell me {t}.", "I want to know {t}.",
                "Can you tell me {t}?", "Please tell me {t}."],
}
# System prompts are a carrier around a key phrase ("Please {k}." around "be brief"): every
# carrier and every key phrase is trained, but the combinations is_heldout_system picks are not,
# so a held-out system prompt is a new sentence made of words the model has seen obeyed.
# Imperative key phrases take IMPERATIVE_CARRIERS, statements STATEMENT_CARRIERS.
IMPERATIVE_CARRIERS = ["{k}.", "Please {k}.", "Always {k}.", "From now on, {k}.", "{k}, please.", "Remember to {k}."]
STATEMENT_CARRIERS = ["{k}.", "From now on, {k}.", "Remember: {k}.", "{k}. Be helpful.", "In this chat, {k}.",
                      "Note that {k}."]
SYSTEM_KEYS = {
    "name": ["your name is {n}", "you are called {n}", "you are an assistant called {n}", "you are {n}"],
    "persona": ["talk like a {p}", "pretend to be a {p}", "answer as a {p} would", "speak like a {p}"],
    "terse": ["be brief", "keep every answer very short", "answer in as few words as possible", "give short answers"],
    "explain": ["explain your answers", "give a short explanation with every answer",
                "explain how you got each answer", "show how you got the answer"],
    "friendly": ["be warm and friendly", "answer in a friendly way", "be cheerful", "be very friendly"],
    "followup": ["end every answer with a question", "ask a follow-up question",
                 "finish each answer with a question for me", "ask me a question after each answer"],
    "plain": ["you are a helpful assistant", "you are a helpful, honest assistant", "you are a chat assistant",
              "you are a kind and helpful assistant"],
}
STATEMENT_KEYS = ("name", "plain")


def is_heldout_system(carrier: int, key: int) -> bool:
    """Whether the system prompt of carrier ``carrier`` around key phrase ``key`` (indices) is
    held out from training: one combination in four, every carrier and key kept elsewhere."""
    return (carrier + key) % 4 == 3


def system_prompt_texts(kind: str, heldout: bool) -> list[str]:
    """Every system prompt of ``kind`` (a ``SYSTEM_KEYS`` key) as a format string with ``{n}``
    (a name) or ``{p}`` (a persona), the training ones or (``heldout``) the held-out ones."""
    carriers = STATEMENT_CARRIERS if kind in STATEMENT_KEYS else IMPERATIVE_CARRIERS
    out = []
    for i, carrier in enumerate(carriers):
        for j, key in enumerate(SYSTEM_KEYS[kind]):
            if is_heldout_system(i, j) == heldout:
                text = carrier.format(k=key)
                out.append(text[0].upper() + text[1:])
    return out


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
    "state_pet": ("Noted.", "Got it, your pet is called {v}. I will remember that.", "What a lovely name, {v}!",
                  "What a lovely name, {v}! How can I help you?"),
    "state_town": ("Noted.", "Got it, you live in {v}. I will remember that.", "Oh, {v} sounds like a nice place!",
                   "Oh, {v} sounds like a nice place! How can I help you?"),
    "state_colour": ("Noted.", "Got it, your favourite colour is {v}. I will remember that.",
                     "Lovely, {v} is a great colour!", "Lovely, {v} is a great colour! How can I help you?"),
    "state_number": ("Noted.", "Got it, your lucky number is {v}. I will remember that.",
                     "Great, {v} is a nice number!", "Great, {v} is a nice number! How can I help you?"),
    "ask_name": ("{v}.", "You told me earlier that your name is {v}.", "Of course! Your name is {v}.",
                 "Your name is {v}. Can I help with anything else?"),
    "ask_pet": ("{v}.", "You told me earlier that your pet is called {v}.", "Of course! Your pet is called {v}.",
                "Your pet is called {v}. Can I help with anything else?"),
    "ask_town": ("{v}.", "You told me earlier that you live in {v}.", "Of course! You live in {v}.",
                 "You live in {v}. Can I help with anything else?"),
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
    "abilities": ("Sums, facts, word games and remembering what you tell me.",
                  "I can add and subtract two-digit numbers, name capitals and units, spell words backwards "
                  "or count their letters, and remember what you tell me.",
                  "Happy to help! I can do sums, capitals, word games, and I remember what you tell me.",
                  "I can do sums, facts and word games, and remember what you tell me. What would you like to try?"),
    "ask_your_name": ("{n}.", "My name is {n}. I'm a small assistant.", "Hi! I'm {n}, your friendly little assistant.",
                      "I'm {n}. What would you like to ask me?"),
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
