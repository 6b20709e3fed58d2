"""LongBench's official metrics, reproduced behaviour for behaviour (THUDM/LongBench `metrics.py`).

Scores must be comparable with published numbers, so every quirk of the official code is kept,
each marked where it happens:
- token F1 is 0 for an empty prediction or reference (no division);
- `classification_score` iterates over its match list while removing from it, which skips the
  element after each removal, and its fallback to the most similar class never runs (the
  official `if em_match_list != 0` compares a list with 0: always true);
- `code_sim_score` scores only the first line that holds no '`', '#' or '//';
- ROUGE-L is the `rouge` package's F value, and 0 when that package raises (empty text);
- Chinese ROUGE joins jieba tokens with spaces; Chinese F1 normalises each jieba token.
`fuzz.ratio` comes from fuzzywuzzy without python-Levenshtein, as in LongBench's requirements, so
it is difflib's ratio (python-Levenshtein's differs slightly).

Every metric is `metric(prediction, ground_truth, all_classes=None) -> float` in 0..1.
"""

from __future__ import annotations

import logging
import re
import string
import warnings
from collections import Counter
from collections.abc import Callable, Sequence

import jieba
from rouge import Rouge

with warnings.catch_warnings():
    # fuzzywuzzy warns that it uses difflib: intended, that is the official configuration.
    warnings.simplefilter("ignore")
    from fuzzywuzzy import fuzz

jieba.setLogLevel(logging.WARNING)

Metric = Callable[..., float]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_EN_PUNCTUATION = frozenset(string.punctuation)
_ZH_PUNCTUATION = frozenset(
    string.punctuation
    + "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
)
_NUMBER = re.compile(r"\d+")


def normalize_answer(text: str) -> str:
    """Lowercase, drop ASCII punctuation, then the articles a/an/the, and collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _EN_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def normalize_zh_answer(text: str) -> str:
    """Lowercase, drop ASCII and Chinese punctuation, and remove all whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _ZH_PUNCTUATION)
    return "".join(text.split())


def token_f1(prediction_tokens: Sequence[str], reference_tokens: Sequence[str]) -> float:
    """F1 of the multiset overlap of two token lists; 0 when nothing overlaps."""
    same = sum((Counter(prediction_tokens) & Counter(reference_tokens)).values())
    if same == 0:
        return 0.0
    precision = same / len(prediction_tokens)
    recall = same / len(reference_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **_: object) -> float:
    """Token F1 of the normalised English texts, whitespace-tokenised."""
    return token_f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def _zh_tokens(text: str) -> list[str]:
    tokens = (normalize_zh_answer(t) for t in jieba.cut(text, cut_all=False))
    return [t for t in tokens if t]


def qa_f1_zh_score(prediction: str, ground_truth: str, **_: object) -> float:
    """Token F1 over jieba tokens, each normalised, empty ones dropped."""
    return token_f1(_zh_tokens(prediction), _zh_tokens(ground_truth))


def rouge_score(prediction: str, ground_truth: str, **_: object) -> float:
    """ROUGE-L F of the `rouge` package; 0 when it refuses the input (e.g. an empty text)."""
    try:
        scores = Rouge().get_scores([prediction], [ground_truth], avg=True)
    except Exception:  # the official metric scores any rouge failure as 0
        return 0.0
    return scores["rouge-l"]["f"]


def rouge_zh_score(prediction: str, ground_truth: str, **_: object) -> float:
    """ROUGE-L F over jieba tokens joined with spaces."""
    return rouge_score(" ".join(jieba.cut(prediction, cut_all=False)), " ".join(jieba.cut(ground_truth, cut_all=False)))


def classification_score(prediction: str, ground_truth: str, all_classes: Sequence[str] | None = None, **_: object) -> float:
    """1/k when the true class is among the k class names found in the prediction, else 0.

    Class names are matched as substrings. A matched class that is a proper substring of the
    ground truth is dropped, but (official quirk) the class right after each dropped one is not
    examined, because the official loop removes from the list it is iterating over.
    """
    if all_classes is None:
        raise ValueError("classification needs all_classes")
    matched = [name for name in all_classes if name in prediction]
    i = 0
    while i < len(matched):  # list iteration semantics: the index advances past a removal
        name = matched[i]
        if name in ground_truth and name != ground_truth:
            matched.remove(name)
        i += 1
    return 1.0 / len(matched) if ground_truth in matched else 0.0


def _share_of_numbers_equal_to(prediction: str, target: str) -> float:
    numbers = _NUMBER.findall(prediction)
    if not numbers:
        return 0.0
    return sum(1 for n in numbers if n == target) / len(numbers)


def count_score(prediction: str, ground_truth: str, **_: object) -> float:
    """Share of the numbers in the prediction that equal the true count."""
    return _share_of_numbers_equal_to(prediction, str(ground_truth))


# How the retrieval references name their paragraph, by metric.
PARAGRAPH_PATTERNS = {"retrieval": r"Paragraph (\d+)", "retrieval_zh": r"段落(\d+)"}


def paragraph_id(ground_truth: str, metric_name: str) -> str:
    """N of the reference's first 'Paragraph N' ('段落N'); ValueError when it names none."""
    pattern = PARAGRAPH_PATTERNS[metric_name]
    found = re.findall(pattern, ground_truth)
    if not found:
        raise ValueError(f"reference {ground_truth[:80]!r} names no paragraph ({pattern!r})")
    return found[0]


def retrieval_score(prediction: str, ground_truth: str, **_: object) -> float:
    """Share of the numbers in the prediction that equal N of the reference 'Paragraph N'."""
    return _share_of_numbers_equal_to(prediction, paragraph_id(ground_truth, "retrieval"))


def retrieval_zh_score(prediction: str, ground_truth: str, **_: object) -> float:
    """Share of the numbers in the prediction that equal N of the reference '段落N'."""
    return _share_of_numbers_equal_to(prediction, paragraph_id(ground_truth, "retrieval_zh"))


def code_sim_score(prediction: str, ground_truth: str, **_: object) -> float:
    """fuzz.ratio / 100 between the reference line and the prediction's first line of code
    (the first line holding no '`', '#' or '//'; the empty string when there is none)."""
    first_code_line = next(
        (line for line in prediction.lstrip("\n").split("\n") if "`" not in line and "#" not in line and "//" not in line),
        "",
    )
    return fuzz.ratio(first_code_line, ground_truth) / 100


METRICS: dict[str, Metric] = {
    "qa_f1": qa_f1_score,
    "qa_f1_zh": qa_f1_zh_score,
    "rouge": rouge_score,
    "rouge_zh": rouge_zh_score,
    "classification": classification_score,
    "retrieval": retrieval_score,
    "retrieval_zh": retrieval_zh_score,
    "count": count_score,
    "code_sim": code_sim_score,
}
