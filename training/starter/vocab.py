"""The starter corpus's words: the fact tables, names (trained and held out), question
phrasings, system prompts and answer formats that :mod:`training.starter.corpus` draws from.

Held out from training: the last ``HELDOUT_PHRASINGS`` phrasings of every question, the system
prompts :func:`is_heldout_system` picks and the names :func:`person_name` / :func:`town_name` give
with ``heldout=True`` (``HELDOUT_NAMES`` and the made-up names :func:`is_heldout_name` picks).
"""

from __future__ import annotations

import random
import zlib

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
