"""LongBench's official metrics against hand-computed values, quirks included."""

from __future__ import annotations

import jieba
import pytest

from longreward_core.evaluation import metrics as m
from longreward_core.evaluation.grading import example_score
from longreward_core.evaluation.longbench import (
    CATEGORIES,
    LONGBENCH_E_DATASETS,
    all_datasets,
    get_dataset,
    resolve_datasets,
)


def test_normalisation_lowercases_strips_punctuation_articles_and_spaces():
    # "Cat's" loses its apostrophe before articles go; "a" and "The" go; spaces collapse.
    assert m.normalize_answer("The Cat's  hat, a  thing!") == "cats hat thing"
    assert m.normalize_answer("U.S.A.") == "usa"
    assert m.normalize_answer("Theory of an atom") == "theory of atom"  # only whole words are articles
    assert m.normalize_zh_answer("北京！ Beijing。") == "北京beijing"


def test_token_f1_on_normalised_english():
    # tokens: [eiffel, tower, paris] vs [eiffel, tower]: P = 2/3, R = 1, F1 = 0.8
    assert m.qa_f1_score("The Eiffel Tower, Paris.", "Eiffel tower") == pytest.approx(0.8)
    assert m.qa_f1_score("an apple", "The apple!") == 1.0
    assert m.qa_f1_score("the", "a") == 0.0  # both normalise to nothing: no overlap, no division
    assert m.qa_f1_score("", "Paris") == 0.0


def test_token_f1_counts_repeated_tokens_as_a_multiset():
    # [paris, paris, paris] vs [paris]: 1 common token, P = 1/3, R = 1, F1 = 0.5
    assert m.qa_f1_score("Paris Paris Paris", "Paris") == pytest.approx(0.5)


def test_chinese_f1_tokenises_with_jieba_and_drops_punctuation_tokens():
    assert list(jieba.cut("我们今天去北京")) == ["我们", "今天", "去", "北京"]
    assert list(jieba.cut("今天去北京。")) == ["今天", "去", "北京", "。"]
    # "。" normalises to nothing and is dropped: 3 common of 4 predicted, 3 reference: 2*(3/4)/(7/4)
    assert m.qa_f1_zh_score("我们今天去北京", "今天去北京。") == pytest.approx(6 / 7)
    assert m.qa_f1_zh_score("北京！", "北京") == 1.0


def test_rouge_l_is_the_rouge_package_f_over_unique_tokens():
    # No repeated word: LCS 3 of 4 on both sides, F = 0.75.
    assert m.rouge_score("cat sat on mat", "cat is on mat") == pytest.approx(0.75, abs=1e-6)
    # The rouge package counts unique words: {the, cat, sat, on, mat} vs {the, cat, is, on, mat},
    # 4 in common of 5 each, so 0.8 (not 5/6, as a token-sequence LCS would give).
    assert m.rouge_score("the cat sat on the mat", "the cat is on the mat") == pytest.approx(0.8, abs=1e-6)
    assert m.rouge_score("", "a reference") == 0.0  # rouge raises on an empty text: scored 0


def test_chinese_rouge_joins_jieba_tokens_with_spaces():
    # "我们 今天 去 北京" vs "今天 去 北京": P = 3/4, R = 1, F = 6/7
    assert m.rouge_zh_score("我们今天去北京", "今天去北京") == pytest.approx(6 / 7, abs=1e-6)
    assert m.rouge_score("我们今天去北京", "今天去北京") == 0.0  # unsegmented: one "word" each, no match


def test_classification_gives_one_over_the_number_of_classes_named():
    classes = ["City", "Country", "Location"]
    assert m.classification_score("City", "City", all_classes=classes) == 1.0
    assert m.classification_score("City or Country", "City", all_classes=classes) == 0.5
    assert m.classification_score("Country", "City", all_classes=classes) == 0.0


def test_classification_drops_a_class_contained_in_the_true_class():
    # "Food" is found in "Food product" but is only part of the true class: dropped.
    classes = ["Food", "Food product", "Animal"]
    assert m.classification_score("Food product", "Food product", all_classes=classes) == 1.0


def test_classification_skips_the_class_after_each_dropped_one():
    # Official quirk: the loop removes from the list it iterates, so after "Foo" is dropped
    # "Fo" is never examined and stays: 2 classes named, 1/2 instead of 1.
    classes = ["Foo", "Fo", "Foo bar", "Animal"]
    assert m.classification_score("Foo bar", "Foo bar", all_classes=classes) == 0.5


def test_classification_never_falls_back_to_the_most_similar_class():
    # The official fallback (difflib's closest class) is unreachable: no class named scores 0.
    assert m.classification_score("Citi", "City", all_classes=["City", "Country"]) == 0.0


def test_paragraph_retrieval_and_count_take_the_share_of_matching_numbers():
    assert m.retrieval_score("Paragraph 12", "Paragraph 12") == 1.0
    assert m.retrieval_score("Paragraph 12 or Paragraph 2", "Paragraph 12") == 0.5
    assert m.retrieval_score("I cannot tell", "Paragraph 12") == 0.0
    assert m.retrieval_zh_score("答案是段落3", "段落3") == 1.0
    assert m.retrieval_zh_score("段落3，段落30", "段落3") == 0.5
    assert m.count_score("There are 12 unique paragraphs out of 20", "12") == 0.5
    assert m.count_score("twelve", "12") == 0.0
    with pytest.raises(ValueError, match="names no paragraph"):
        m.retrieval_score("1", "the first one")


def test_code_similarity_scores_the_first_line_without_comment_or_fence():
    prediction = "\n```python\n# the next line\n// also skipped\nx = foo(1)\ny = 2\n```"
    assert m.code_sim_score(prediction, "x = foo(1)") == 1.0
    # difflib: 9 of 10 characters match on both sides -> ratio 0.9
    assert m.code_sim_score("x = foo(2)", "x = foo(1)") == 0.9
    assert m.code_sim_score("# only a comment", "x = 1") == 0.0


def test_first_line_rule_and_max_over_answers():
    trec = get_dataset("trec")
    classes = ["Location", "City"]
    # Only "Location" is on the first line; on the whole text both classes would be named.
    assert example_score(trec, "\nLocation\nCity", ["Location"], classes) == 1.0
    assert m.classification_score("\nLocation\nCity", "Location", all_classes=classes) == 0.5
    # hotpotqa keeps every line, and the best reference counts.
    hotpot = get_dataset("hotpotqa")
    assert example_score(hotpot, "Paris", ["the city of Paris", "Paris"], None) == 1.0
    assert example_score(hotpot, "\nParis", ["Paris"], None) == 1.0


def test_the_21_tasks_metrics_and_prompting():
    tasks = all_datasets()
    assert len(tasks) == 21 and sum(len(v) for v in CATEGORIES.values()) == 21
    assert {n for n, t in tasks.items() if not t.chat_template} == {"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"}
    assert {n for n, t in tasks.items() if t.first_line_only} == {"trec", "triviaqa", "samsum", "lsht"}
    assert tasks["multifieldqa_zh"].metric_name == "qa_f1_zh" and tasks["vcsum"].metric_name == "rouge_zh"
    assert tasks["passage_retrieval_zh"].metric_name == "retrieval_zh" and tasks["repobench-p"].metric_name == "code_sim"
    assert (tasks["gov_report"].max_new_tokens, tasks["hotpotqa"].max_new_tokens, tasks["samsum"].max_new_tokens) == (512, 32, 128)
    row = {"context": "CTX {not a slot}", "input": "Q?", "answers": ["a"]}
    assert tasks["hotpotqa"].render(row).endswith("CTX {not a slot}\n\nAnswer the question based on the given passages. "
                                                  "Only give me the answer and do not output any other words.\n\nQuestion: Q?\nAnswer:")
    assert tasks["lcc"].render(row) == "Please complete the code given below. \nCTX {not a slot}Next line of code:\n"
    assert len(LONGBENCH_E_DATASETS) == 13
    with pytest.raises(ValueError, match="unknown LongBench dataset 'hotpot'"):
        resolve_datasets(["hotpot"])
    with pytest.raises(ValueError, match="not part of LongBench-E"):
        resolve_datasets(["dureader"], longbench_e=True)
