"""Final-answer extraction and comparison."""

import pytest

from llm_modules.data.answers import answers_match, extract_final_answer


@pytest.mark.parametrize(
    "text, expected",
    [
        # rule 1: inside the last solution block, then the other rules
        ("<|begin_of_thought|>\n\nmaybe \\boxed{7}\n\n<|end_of_thought|>\n\n<|begin_of_solution|>\n\n"
         "So the answer is \\(\\boxed{10}\\).\n\n<|end_of_solution|>", "10"),
        ("<|begin_of_solution|>\n\nfirst \\boxed{1}<|end_of_solution|> <|begin_of_solution|>then 2 and 3.<|end_of_solution|> 99", "3"),
        ("<|begin_of_solution|> The answer is Paris <|end_of_solution|>", "The answer is Paris"),
        ("<|begin_of_solution|>\n\nThe remainder is \\boxed{3", "3"),  # unclosed box and block: last number
        ("<|begin_of_solution|>   <|end_of_solution|>", None),
        # rule 2: last balanced \boxed{}
        ("first \\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{5} and a cut-off \\boxed{6", "5"),
        # rule 3: after the last ####
        ("He earns 12 * 5 = 60\n#### 60", "60"),
        ("#### 1\nthen #### 1,250\nextra", "1,250"),
        # rule 4: last number, commas stripped, no trailing period
        ("The total is 1,234,567.", "1234567"),
        ("It costs -3.5 dollars.", "-3.5"),
        ("numbers 1, 2, 3", "3"),
        # rule 5: no rule applies -> the stripped text (word and string answers)
        ("no digits here", "no digits here"),
        ("  blue\n", "blue"),
        ("   ", None),
        ("", None),
        (None, None),
    ],
)
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


@pytest.mark.parametrize(
    "pred, ref, same",
    [
        ("10", "10", True),
        ("10.0", "10", True),
        ("1,250", "1250", True),
        ("$1,250.", "1250", True),
        ("\\frac{1}{2}", "0.5", True),
        ("1/3", "0.3333333333", True),
        ("0.333", "1/3", False),
        ("11", "10", False),
        ("\\text{Paris}", "paris", True),
        ("Paris.", "  PARIS ", True),
        ("London", "Paris", False),
        (None, "1", False),
        ("1", None, False),
    ],
)
def test_answers_match(pred, ref, same):
    assert answers_match(pred, ref) is same


def test_extract_then_match_gsm_style():
    text = "Each box has 12 eggs, 3 boxes give 12 * 3 = 36 eggs.\n#### 36"
    assert answers_match(extract_final_answer(text), "36")
