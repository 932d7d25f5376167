from lm.metrics import classification_scores, exact_match, generation_scores, keyword_match, to_label


def test_exact_and_keyword_match():
    assert exact_match("The Vashti Highlands", "The Vashti Highlands.") == 1.0
    assert keyword_match("It costs $18, tax included.", "$18.") == 1.0
    assert keyword_match("$180", "$18.") == 0.0
    assert keyword_match("4 out of 5", "3 out of 5.") == 0.0


def test_classification_accuracy_and_macro_f1():
    s = classification_scores(["hot", "Mild.", "spicy?"], ["hot", "mild", "medium"], ["hot", "medium", "mild"])
    assert s["accuracy"] == 2 / 3 and abs(s["macro_f1"] - 2 / 3) < 1e-9 and s["unparseable"] == 1 / 3
    assert to_label("I would say medium", ["mild", "medium"]) == "medium"


def test_generation_scores_bleu_rouge():
    s = generation_scores(["the smoked eel stew is good"], ["the smoked eel stew is good"])
    assert s["bleu"] > 99 and s["rouge_l"] == 1.0
    s = generation_scores(["nothing alike"], ["the smoked eel stew"])
    assert s["bleu"] < 1 and s["rouge_l"] == 0.0
