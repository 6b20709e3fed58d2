"""Exact pair pruning (reward.pruning): on random score tables the pruned schedule publishes the
pair the full schedule publishes, with ties, failures (reopening), margins and shared statements."""

from __future__ import annotations

import asyncio
from pathlib import Path

import polars as pl
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from longreward_core.data.pairs import PairConfig, build_pairs
from longreward_core.data.records import SCORES_SCHEMA, Candidate, CandidateScore, DimensionResult, Prompt
from longreward_core.reward.pruning import CHECKS_PER_ROUND, PairRace, SupportOutcome, check_support_pruned

FAIL = "fail"
PROMPT = Prompt(id="p", context="a document", query="a question")
# Few distinct values, so ties between rewards are common.
# Failures rare enough that most tables still reach the pair rules, common enough to matter.
RATING = st.sampled_from([2.0, 5.0, 5.0, 7.0, 7.0, 10.0] * 4 + [FAIL])
SUPPORT = st.sampled_from([0.0, 0.5, 1.0, 1.0] * 4 + [FAIL])


@st.composite
def score_tables(draw):
    """A prompt's full outcome: a pool of statements, each with its verdict (or failure), and per
    candidate three ratings (or failures), the extraction's failure, and which statements it makes
    (candidates share statements, as identical sentences do)."""
    pool = draw(st.lists(SUPPORT, min_size=1, max_size=10))
    n = draw(st.integers(2, 8))
    table = []
    for k in range(n):
        table.append({
            "id": f"c{k}" if draw(st.booleans()) else f"c{k:02d}",  # mixed lengths: string tie-break
            "ratings": [draw(RATING) for _ in range(3)],
            "extraction_fails": draw(st.integers(0, 29)) == 0,
            "statements": draw(st.lists(st.integers(0, len(pool) - 1), unique=True, max_size=6)),
        })
    ids = [row["id"] for row in table]
    if len(set(ids)) != len(ids):
        table = [{**row, "id": f"c{k}"} for k, row in enumerate(table)]
    config = PairConfig(min_candidates=draw(st.integers(2, n + 1)), min_margin=draw(st.sampled_from([0.0, 0.0, 1.0, 2.5])))
    return pool, table, config


def dimension(value) -> DimensionResult:
    return DimensionResult(error="failed") if value == FAIL else DimensionResult(score=value)


def full_scores(pool, table) -> list[CandidateScore]:
    """What the full schedule records: every dimension of every candidate."""
    out = []
    for row in table:
        supports = [pool[i] for i in row["statements"]]
        if row["extraction_fails"] or FAIL in supports:
            faith = DimensionResult(error="failed")
        elif not supports:
            faith = DimensionResult(score=10.0, statements=0)
        else:  # as faithfulness.score_faithfulness computes it
            faith = DimensionResult(score=10.0 * sum(supports) / len(supports), statements=len(supports))
        h, l, c = (dimension(v) for v in row["ratings"])
        out.append(CandidateScore(prompt_id="p", candidate_id=row["id"], language="en", helpfulness=h, logicality=l,
                                  faithfulness=faith, completeness=c))
    return out


class TableChecks:
    """Stands in for the support checks the scorer releases: a statement's verdict comes from the table."""

    def __init__(self, pool):
        self.pool = pool
        self.asked: list[str] = []

    def start(self, statements: list[str]) -> list[asyncio.Future]:
        futures = []
        for text in statements:
            self.asked.append(text)
            future = asyncio.get_running_loop().create_future()
            value = self.pool[int(text[1:])]
            if value == FAIL:
                future.set_exception(RuntimeError("no verdict"))
            else:
                future.set_result(value)
            futures.append(future)
        return futures


def pruned_scores(pool, table, config, draw=None) -> tuple[list[CandidateScore], PairRace, TableChecks, int]:
    """What the pruned schedule records, assembled as the scorer does. With `draw`, statements are
    checked one at a time in an order drawn at random among the candidates `needed` names (so the
    decision rule is tested apart from the priority order); else by `check_support_pruned`."""
    race = PairRace([row["id"] for row in table], config)
    statements = {}
    for row in table:
        contestant = race[row["id"]]
        for name, value in zip(("helpfulness", "logicality", "completeness"), row["ratings"], strict=True):
            contestant.scores[name] = None if value == FAIL else value
            contestant.failed |= value == FAIL
        if row["extraction_fails"]:
            contestant.failed = True
            continue
        contestant.statements = len(row["statements"])
        if not row["statements"]:
            contestant.scores["faithfulness"] = 10.0
        elif not contestant.failed:
            statements[row["id"]] = [f"s{i}" for i in row["statements"]]
    checks = TableChecks(pool)
    outcome = asyncio.run(check_support_pruned(race, statements, checks)) if draw is None else any_order(race, statements, checks, draw)
    out = []
    for row in table:
        c = race[row["id"]]
        faith = (DimensionResult(score=c.scores["faithfulness"]) if c.scores["faithfulness"] is not None
                 else DimensionResult(error="failed") if row["id"] in outcome.failures or row["extraction_fails"]
                 else DimensionResult())
        low, high = c.bounds if c.open else (None, None)
        h, l, cm = (dimension(v) for v in row["ratings"])
        out.append(CandidateScore(prompt_id="p", candidate_id=row["id"], language="en", helpfulness=h, logicality=l,
                                  faithfulness=faith, completeness=cm, pruned=c.open, reward_low=low, reward_high=high))
    return out, race, checks, outcome.checks_saved


def any_order(race: PairRace, statements, checks: TableChecks, draw) -> SupportOutcome:
    outcome = SupportOutcome()
    asked: set[str] = set()
    while needed := race.needed():
        cid = draw(st.sampled_from(needed))
        index = draw(st.sampled_from([i for i in range(race[cid].statements) if i not in race[cid].verdicts]))
        text = statements[cid][index]
        asked.add(text)
        value = checks.pool[int(text[1:])]
        checks.asked.append(text)
        for other, texts in statements.items():  # a verdict serves every candidate making the statement
            if text in texts and not race[other].failed:
                if value == FAIL:
                    race[other].failed = True
                    outcome.failures[other] = RuntimeError("no verdict")
                else:
                    race[other].record_support(texts.index(text), value)
    outcome.checks_saved = len({t for texts in statements.values() for t in texts} - asked)
    return outcome


def pairs_of(scores: list[CandidateScore], table, config):
    frame = pl.DataFrame([s.to_row() for s in scores], schema=SCORES_SCHEMA)
    candidates = [Candidate(prompt_id="p", candidate_id=row["id"], response=row["id"]) for row in table]
    result = build_pairs(frame, [PROMPT], candidates, config)
    return [(p.chosen_id, p.rejected_id, p.chosen_reward, p.rejected_reward) for p in result.pairs], dict(result.skipped)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(score_tables(), st.booleans(), st.data())
def test_pruned_schedule_publishes_the_full_schedules_pair(table_and_config, any_order_, data) -> None:
    pool, table, config = table_and_config
    full = full_scores(pool, table)
    pruned, race, checks, saved = pruned_scores(pool, table, config, data.draw if any_order_ else None)

    assert pairs_of(pruned, table, config) == pairs_of(full, table, config)
    by_id = {s.candidate_id: s for s in full}
    for s in pruned:
        if s.status == "pruned":
            # Nothing pretends: no reward, and the full reward (if any) lies in the interval.
            assert s.reward is None and s.reward_low <= s.reward_high
            true = by_id[s.candidate_id].reward
            assert true is None or s.reward_low <= true <= s.reward_high
        elif s.status == "scored":
            assert s.reward == by_id[s.candidate_id].reward
    # Every statement is graded at most once; the saved ones are exactly those never asked.
    assert len(checks.asked) == len(set(checks.asked))
    made = {f"s{i}" for row in table if not row["extraction_fails"] and FAIL not in row["ratings"] for i in row["statements"]}
    assert saved == len(made - set(checks.asked))
    assert not race.needed()
    event(f"{sum(s.status == 'pruned' for s in pruned)} pruned")
    event("pair" if pairs_of(full, table, config)[0] else "no pair")


def test_middle_candidates_are_pruned_and_extremes_scored() -> None:
    # Ten candidates with four statements each, all supported: the cheap dimensions alone spread
    # the rewards; the middle ones cannot become best or worst once extremes are scored.
    pool = [1.0] * 40
    table = [{"id": f"c{k}", "ratings": [float(k), float(k), float(k)], "extraction_fails": False,
              "statements": list(range(4 * k, 4 * k + 4))} for k in range(10)]
    config = PairConfig(min_candidates=3)
    pruned, race, checks, saved = pruned_scores(pool, table, config)
    status = {s.candidate_id: s.status for s in pruned}
    assert status["c9"] == "scored" and status["c0"] == "scored"
    assert list(status.values()).count("pruned") >= 4
    assert saved >= 16 and saved + len(checks.asked) == 40
    assert pairs_of(pruned, table, config) == pairs_of(full_scores(pool, table), table, config)


def test_while_the_count_is_short_only_the_leaders_and_the_cheapest_are_checked() -> None:
    # min_candidates 3: the leading contenders for best (b) and worst (w) and the cheapest other
    # (m1) complete the count; m2, as middling but with six statements, is never started, since
    # the completed three leave it unable to change the pair.
    pool = [1.0, 0.0, 1.0, 0.0, 1.0] + [1.0, 0.0] * 3
    table = [
        {"id": "b", "ratings": [9.0, 9.0, 9.0], "extraction_fails": False, "statements": [0, 1]},
        {"id": "w", "ratings": [1.0, 1.0, 1.0], "extraction_fails": False, "statements": [2, 3]},
        {"id": "m1", "ratings": [5.0, 5.0, 5.0], "extraction_fails": False, "statements": [4]},
        {"id": "m2", "ratings": [5.0, 5.0, 5.0], "extraction_fails": False, "statements": list(range(5, 11))},
    ]
    config = PairConfig(min_candidates=3)
    race = PairRace([row["id"] for row in table], config)
    for row in table:
        race[row["id"]].scores.update(zip(("helpfulness", "logicality", "completeness"), row["ratings"], strict=True))
        race[row["id"]].statements = len(row["statements"])
    assert race.needed()[:2] == ["b", "w"] and race.to_check() == ["b", "w", "m1"]
    pruned, race, checks, saved = pruned_scores(pool, table, config)
    assert {s.candidate_id: s.status for s in pruned} == {"b": "scored", "w": "scored", "m1": "scored", "m2": "pruned"}
    assert sorted(checks.asked) == ["s0", "s1", "s2", "s3", "s4"] and saved == 6
    assert pairs_of(pruned, table, config) == pairs_of(full_scores(pool, table), table, config)


def test_a_failing_check_reopens_another_candidate() -> None:
    # c2 would be best, but its second statement fails: the pair is then decided by c1, which a
    # pruned run must score although it was behind c2.
    pool = [1.0, FAIL, 1.0, 1.0, 1.0, 0.0, 0.0]
    table = [
        {"id": "c0", "ratings": [2.0, 2.0, 2.0], "extraction_fails": False, "statements": [5, 6]},
        {"id": "c1", "ratings": [7.0, 7.0, 7.0], "extraction_fails": False, "statements": [2, 3]},
        {"id": "c2", "ratings": [10.0, 10.0, 10.0], "extraction_fails": False, "statements": [0, 1]},
        {"id": "c3", "ratings": [5.0, 5.0, 5.0], "extraction_fails": False, "statements": [4]},
    ]
    config = PairConfig(min_candidates=2)
    pruned, _, checks, _ = pruned_scores(pool, table, config)
    status = {s.candidate_id: s.status for s in pruned}
    assert status["c2"] == "failed" and status["c1"] == "scored"
    assert pairs_of(pruned, table, config) == pairs_of(full_scores(pool, table), table, config)
    assert pairs_of(pruned, table, config)[0][0][0] == "c1"


def test_rounds_are_bounded() -> None:
    race = PairRace(["a", "b"], PairConfig(min_candidates=2))
    for cid in ("a", "b"):
        race[cid].scores.update(helpfulness=5.0, logicality=5.0, completeness=5.0)
        race[cid].statements = 10
    checks = TableChecks([1.0] * 20)
    asyncio.run(check_support_pruned(race, {"a": [f"s{i}" for i in range(10)], "b": [f"s{i}" for i in range(10, 20)]}, checks))
    assert len(checks.asked) == 20  # both must be scored completely (min_candidates = 2)
    assert CHECKS_PER_ROUND >= 2


def test_an_open_candidate_that_could_tie_an_extreme_and_win_the_tie_break_is_needed() -> None:
    race = PairRace(["b", "m", "a", "z"], PairConfig(min_candidates=2))
    for cid, rating in (("b", 8.0), ("m", 6.0), ("a", 4.0), ("z", 4.0)):
        race[cid].scores.update(helpfulness=rating, logicality=rating, completeness=rating)
        race[cid].statements = 2
    for cid in ("b", "m"):
        race[cid].record_support(0, 1.0)
        race[cid].record_support(1, 1.0)  # b: 8.5, m: 7.0, complete
    # a could reach 8.5 = b's reward with a smaller id: it would be chosen; z at its lowest (3.0)
    # is below m: it could be rejected.
    race["a"].scores.update(helpfulness=10.0, logicality=8.0, completeness=6.0)  # upper bound (10+8+10+6)/4 = 8.5
    assert race["a"].bounds[1] == 8.5
    assert set(race.needed()) == {"a", "z"}
    race["a"].record_support(0, 0.0)  # now at most 7.5 < 8.5, and its lowest 6.0 < m's 7.0: still needed
    assert "a" in race.needed()
    race["a"].record_support(1, 1.0)  # complete: 6.0, the new worst; z's lowest (3.0) is below it
    assert race.needed() == ["z"]
    race["z"].scores.update(helpfulness=6.0, logicality=6.0, completeness=6.0)
    race["z"].record_support(0, 1.0)  # z in [ (6+6+5+6)/4, (6+6+10+6)/4 ] = [5.75, 7.0]: may undercut a (6.0)
    assert race.needed() == ["z"]
    race["z"].record_support(1, 0.5)  # complete 6.625: decided
    assert race.needed() == []


def test_a_tie_at_the_bottom_with_a_larger_id_keeps_the_candidate_needed() -> None:
    race = PairRace(["a", "b", "c"], PairConfig(min_candidates=2))
    for cid, rating in (("a", 9.0), ("b", 5.0), ("c", 5.0)):
        race[cid].scores.update(helpfulness=rating, logicality=rating, completeness=rating)
        race[cid].statements = 1
    race["a"].record_support(0, 1.0)  # 9.25
    race["b"].record_support(0, 0.0)  # 3.75, the worst
    assert race["c"].bounds == (3.75, 6.25)  # c could tie b at 3.75 and, its id larger, be rejected
    assert race.needed() == ["c"]
    race2 = PairRace(["a", "c", "b"], PairConfig(min_candidates=2))
    for cid, rating in (("a", 9.0), ("b", 5.0), ("c", 5.0)):
        race2[cid].scores.update(helpfulness=rating, logicality=rating, completeness=rating)
        race2[cid].statements = 1
    race2["a"].record_support(0, 1.0)
    race2["c"].record_support(0, 0.0)  # c complete at 3.75; b could only tie it with a smaller id
    assert race2.needed() == []


# -- end to end, against the loopback judge ---------------------------------------------------

SENTENCES = [
    f"In {1950 + k} the {w} near the {v} was repaired for {100 + 7 * k} thousand euros."
    for k, (w, v) in enumerate(zip(
        "pump mill canal bridge school market quarry cable road tower dam lock gate weir sluice pier".split(),
        "river station harbour village archive library museum railway valley forest hill lake coast port bay field".split(),
        strict=True,
    ))
]


def rating_by_content(request) -> str:
    """Ratings that vary with the response (deterministically), as a real judge's would."""
    import zlib

    from longreward_testing.judge_double import slot

    response = slot(request.content, "response")
    if "unlucky" in response and request.task == "helpfulness":
        return "I will not rate this."  # never parses: the candidate fails in both modes
    return f"Rating: [[{2 + zlib.crc32((request.task + response).encode()) % 9}]]"


def support_by_content(request) -> str:
    from longreward_testing.judge_double import normal_text, slot

    statement, evidence = slot(request.content, "statement"), slot(request.content, "document_excerpts")
    if "flaky" in statement:
        return "No verdict here."  # this check fails in both modes: its candidates are reopened around
    return "[[Fully supported]]" if normal_text(statement) in normal_text(evidence) else "[[No support]]"


def write_mixed_input(folder: Path) -> tuple[Path, Path]:
    import json
    import random

    rng = random.Random(3)
    prompts, candidates = [], []
    for p in range(3):
        prompts.append({"id": f"p{p}", "context": " ".join(SENTENCES), "query": f"What was repaired ({p})?"})
        for k in range(8):
            true = rng.sample(SENTENCES, rng.randint(1, 4))
            false = [f"The {rng.choice(['tram', 'ferry', 'clock'])} was painted {rng.choice(['red', 'blue'])} in {1800 + rng.randrange(90)}."
                     for _ in range(rng.randint(0, 3))]
            extra = ["This was flaky work."] if (p, k) in ((0, 2), (1, 5), (2, 0)) else []
            extra += ["An unlucky answer."] if (p, k) == (1, 3) else []
            statements = true + false + extra
            rng.shuffle(statements)
            candidates.append({"prompt_id": f"p{p}", "candidate_id": f"p{p}-{k}", "response": " ".join(statements)})
    (folder / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))
    (folder / "candidates.jsonl").write_text("".join(json.dumps(r) + "\n" for r in candidates))
    return folder / "prompts.jsonl", folder / "candidates.jsonl"


def test_pruned_and_full_runs_publish_the_same_pairs_against_the_loopback_judge(judge_server, tmp_path) -> None:
    from longreward_core.pipeline.score_files import pairs_files, score_files
    from longreward_core.reward.scorer import ScoringConfig
    from longreward_testing.scenarios import judge_config_for

    double = judge_server.double
    double.answers = {task: rating_by_content for task in ("helpfulness", "logicality", "completeness")}
    double.answers["support"] = support_by_content
    prompts, candidates = write_mixed_input(tmp_path)
    judge = judge_config_for(judge_server, max_attempts=2)
    pair_config = PairConfig(min_candidates=3)
    published, support_requests = {}, {}
    for mode in ("full", "pruned"):
        double.reset()
        scoring = ScoringConfig(retrieval_chunk_tokens=32, completeness_chunk_tokens=256, prune=mode == "pruned")
        run = score_files(prompts, candidates, tmp_path / mode, judge, scoring, pair_config=pair_config)
        support_requests[mode] = double.count("support")
        result = pairs_files(run.scores_path, prompts, candidates, tmp_path / f"{mode}.parquet", pair_config)
        published[mode] = (result.frame().drop("margin").sort("prompt_id").to_dicts(), dict(result.skipped))
        if mode == "pruned":
            summary, scores = run.summary, pl.read_parquet(run.scores_path)

    assert published["pruned"] == published["full"]
    assert len(published["full"][0]) == 3  # every prompt gets a pair (one fails its min count otherwise)
    pruned_rows = scores.filter(pl.col("status") == "pruned")
    assert summary.pruned == pruned_rows.height > 0
    assert summary.support_checks_saved > 0
    assert support_requests["pruned"] < support_requests["full"]
    # Pruned rows keep their known scores and an interval, and no reward.
    assert pruned_rows["reward"].null_count() == pruned_rows.height
    assert pruned_rows["helpfulness"].null_count() == 0
    assert (pruned_rows["reward_low"] <= pruned_rows["reward_high"]).all()
    assert summary.scored + summary.failed + summary.pruned == summary.candidates
    assert set(scores.filter(pl.col("status") == "failed")["candidate_id"]) >= {"p1-3"}
    # The same run again asks only what never got a verdict (failures are not cached): every round
    # depends only on answers, so no other check is asked for.
    double.reset()
    score_files(prompts, candidates, tmp_path / "pruned", judge,
                ScoringConfig(retrieval_chunk_tokens=32, completeness_chunk_tokens=256, prune=True), pair_config=pair_config)
    assert double.count() > 0
    assert all("unlucky" in r.content or "flaky" in r.content for r in double.requests)
