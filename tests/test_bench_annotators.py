"""The benchmark's simulated annotators judge hand-made cases right."""

from __future__ import annotations

import pytest

from bench.annotators import judge_correct, prefers_concise, prefers_correct


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.mark.parametrize(
    ("question", "right", "wrong"),
    [
        ("What is 12 plus 30?", "12 + 30 = 42, so the answer is 42.", "12 + 30 = 41, so the answer is 41."),
        ("Tell me 16 + 57.", "73.", "76."),
        # column working counts when every step holds and it ends on the result
        ("Tell me 16 + 57.", "16 + 57: 6 + 7 = 13, 1 + 5 + 1 = 7, so 73.", "16 + 57: 6 + 7 = 12, 1 + 5 + 1 = 7, so 73."),
        ("How much is 91 minus 38?", "91 - 38: 11 - 8 = 3, 8 - 3 = 5, so 53.", "91 - 38: 11 - 8 = 3, 8 - 3 = 5, so 63."),
        ("Tell me 16 + 57.", "16 + 57: 6 + 7 = 13, 1 + 5 + 1 = 7, so 73.", "6 + 7 = 13, 1 + 5 + 1 = 7."),
        ("How much is 99 minus 74?", "It is 25. Would you like another sum?", "98 - 73 = 25, so the answer is 25."),
        ("Can you subtract 12 from 50?", "38.", "62."),
        ("Do you know the capital of Russia?", "The capital of Russia is Moscow.", "Paris."),
        ("Can you tell me how many minutes make an hour?", "There are 60 minutes in an hour.", "It is 24."),
        ("Please spell tiger backwards.", "Fun one! tiger backwards is regit.", "tiger backwards is regti."),
        ("Tell me how many letters tiger has.", "tiger is spelled t i g e r, so it has 5 letters.", "6."),
        ("Can you tell me which letter apple starts with?", "Fun one! apple starts with a.", "It is p."),
        ("Can you tell me the cure for the cold?", "Sorry, I don't know that.", "The cure is 42."),
        ("Thanks, that helps a lot.", "You're welcome!", "The capital of Peru is Lima."),
    ],
)
def test_correct_answer_wins_either_side(question, right, wrong):
    messages = user(question)
    assert judge_correct(messages, right) is True
    assert judge_correct(messages, wrong) is False
    assert prefers_correct(messages, right, wrong) == "a"
    assert prefers_correct(messages, wrong, right) == "b"


def test_memory_reads_earlier_user_turns():
    messages = [
        {"role": "user", "content": "Hi, I'm Clara."},
        {"role": "assistant", "content": "Nice to meet you, Clara!"},
        {"role": "user", "content": "What is 2 plus 3?"},
        {"role": "assistant", "content": "5."},
        {"role": "user", "content": "Can you tell me my name?"},
    ]
    assert prefers_correct(messages, "Leo.", "Your name is Clara.") == "b"
    numbers = [{"role": "user", "content": "My lucky number is 434."},
               {"role": "assistant", "content": "Noted."},
               {"role": "user", "content": "Tell me my lucky number."}]
    assert prefers_correct(numbers, "434.", "343.") == "a"
    pet = [{"role": "user", "content": "I have a cat named Zorvik."}, {"role": "assistant", "content": "Noted."},
           {"role": "user", "content": "What is my pet called?"}]
    assert prefers_correct(pet, "Your pet is called Zorvak.", "Your pet is called Zorvik.") == "b"
    town = [{"role": "user", "content": "I'm from Kalemford."}, {"role": "assistant", "content": "Noted."},
            {"role": "user", "content": "Where do I live?"}]
    assert judge_correct(town, "You live in Kalemford.") is True and judge_correct(town, "Tomford.") is False


def test_every_correct_memory_answer_of_the_corpus_is_judged_correct():
    from training.starter import corpus

    memory = [p for p in corpus.heldout_prompts(0, 700) + corpus.unseen_name_prompts(0, 100) if p["skill"] == "memory"]
    assert len(memory) > 100
    for p in memory:
        for answer in p["answers"]:
            assert judge_correct(p["messages"], answer) is True, (p["messages"], answer)


def test_equally_correct_prefers_well_formed_then_complete_and_to_the_point_then_tie():
    messages = user("What's the capital city of Peru?")
    assert prefers_correct(messages, "Lima lima lima", "Lima.") == "b"
    assert prefers_correct(messages, "Lima.", "The capital of Peru is Lima.") == "b"
    assert prefers_correct(messages, "Lima.", "It is Lima.") == "tie"
    assert prefers_correct(messages, "Happy to help! The capital of Peru is Lima.", "The capital of Peru is Lima.") == "b"
    assert prefers_correct(messages, "It is Lima. Do you want to know another capital?", "Lima.") == "b"
    assert prefers_correct(messages, "Paris.", "Madrid.") == "tie"


def test_concise():
    messages = user("What is 12 plus 30?")
    assert prefers_concise(messages, "42.", "12 + 30 = 42, so the answer is 42.") == "a"
    assert prefers_concise(messages, "Sure! 12 plus 30 is 42.", "42.") == "b"
    assert prefers_concise(messages, "42.", "41.") == "tie"
    assert prefers_concise(messages, "", "42.") == "b"
    assert prefers_concise(messages, "   ", "") == "tie"


def test_a_population_votes_by_weight_and_its_gold_judgement_averages_its_members():
    import random

    from bench.annotators import Population, join_annotator_flags
    from bench.gold import judge_pair
    from bench.online_loop import load_annotator

    argv = join_annotator_flags(["--annotator", "bench.annotators:prefers_correct=3",
                             "--annotator=bench.annotators:prefers_concise", "--votes", "5"])
    population = load_annotator(argv[argv.index("--annotator") + 1])
    assert [round(w, 2) for _, _, w in population.members] == [0.75, 0.25]
    rng = random.Random(0)
    drawn = [population.draw(rng) for _ in range(2000)]
    assert 0.7 < drawn.count(prefers_correct) / 2000 < 0.8
    # tastes that disagree: the correct answer is the longer one here
    messages = [{"role": "user", "content": "What is 12 + 30?"}]
    right, wrong = "12 + 30 = 42. The answer is 42.", "It is 41."
    assert prefers_correct(messages, right, wrong) == "a" and prefers_concise(messages, right, wrong) == "b"
    assert judge_pair(population, messages, right, wrong, random.Random(1)) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="weight"):
        Population(["bench.annotators:prefers_correct=0"])
