"""The n-gram drafter and the auto policy, without a model: what is drafted, how long,
and when nothing is."""

from server.engine.speculation import (
    AUTO_MIN_MATCH,
    MAX_DRAFT,
    Acceptance,
    Drafter,
    History,
    NgramIndex,
    StepCosts,
    plan,
)


def costs(one: float = 0.016, per_row: float = 0.001) -> StepCosts:
    c = StepCosts()
    for n in (1, 2, 4, 8):
        c.observe(n, one + per_row * (n - 1))
    return c


def test_a_repeated_run_drafts_what_followed_it_with_the_match_length() -> None:
    text = list(range(100, 140))
    index = NgramIndex([*text, 1, 2, *text[:20]])
    draft, matched = index.draft(8)
    assert draft == text[20:28]
    assert matched == 20  # the whole copy so far matches the original


def test_no_match_no_draft_and_pushed_tokens_are_indexed() -> None:
    index = NgramIndex([1, 2, 3, 4, 5, 6])
    assert index.draft(4) == ([], 0)
    for t in (1, 2, 3, 4):
        index.push(t)
    assert index.draft(4) == ([5, 6, 1, 2], 4)
    index.truncate(6)
    assert index.tokens == [1, 2, 3, 4, 5, 6]
    assert index.draft(4) == ([], 0)


def _copy(index: NgramIndex, target: list[int], limit: int = 16) -> tuple[int, int, int]:
    """Decode `target` greedily as a verifier would: (steps, drafted, misses), a miss
    being a draft rejected before the target's end."""
    steps = drafted = misses = i = 0
    while i < len(target):
        draft, _ = index.draft(limit)
        ok = 0
        while ok < len(draft) and i + ok < len(target) and draft[ok] == target[i + ok]:
            ok += 1
        misses += ok < len(draft) and i + ok < len(target)
        for t in target[i : i + ok + 1]:
            index.push(t)
        steps, drafted, i = steps + 1, drafted + len(draft), i + ok + 1
    return steps, drafted, misses


def _blocks(names: list[int], arg: int) -> list[int]:
    """Code of similar blocks: each names its field twice and its argument three times."""
    out: list[int] = []
    for f in names:
        out += [1, 2, f, 3, 4, 5, arg, 6, 7, 8, 9, 10, f, 11, arg, 12, 7, 13, 8, 14, 15]
        out += [6, 7, 16, arg, 7, 16, 8, 7]
    return out


def test_a_copy_follows_its_source_block_not_the_latest_similar_one() -> None:
    names = [100, 101, 102, 103]
    index = NgramIndex([90, 91, 92, 93, *_blocks(names, 50), 94, 90, 91, 92, 93])
    steps, _, misses = _copy(index, _blocks(names, 50))
    assert misses == 0
    assert steps == 7  # 17 tokens a step (16 drafted and kept, one sampled)


def test_a_rename_is_learned_and_drafted_in_place_of_the_old_name() -> None:
    names = [100, 101, 102, 103, 104, 105]
    index = NgramIndex([90, 91, 92, 93, *_blocks(names, 50), 94, 90, 91, 92, 93])
    steps, _, misses = _copy(index, _blocks(names, 60))  # every 50 written as 60
    assert misses == 1  # the first 60: from then on it is drafted
    assert steps < len(_blocks(names, 60)) / 8  # the old n-gram drafter: one in four


def test_a_substitution_the_output_stops_making_is_forgotten() -> None:
    names = [100, 101, 102, 103]
    index = NgramIndex([90, 91, 92, 93, *_blocks(names, 50), 94, 90, 91, 92, 93])
    _copy(index, _blocks(names[:2], 60))  # renamed in the first two blocks
    _, _, misses = _copy(index, _blocks(names[2:], 50))  # then no longer
    assert misses == 1


def test_a_request_sent_again_drafts_what_the_first_one_wrote() -> None:
    history = History()
    prompt, answer = list(range(100, 130)), list(range(500, 560))
    first = NgramIndex(prompt, history=history)
    for t in answer:
        first.push(t)
    history.add(first)
    again = NgramIndex(prompt, history=history)
    draft, run = again.draft(16)
    assert draft == answer[:16]
    assert run == len(prompt)  # the whole prompt matches behind it
    steps, _, misses = _copy(again, answer)
    assert misses == 0 and steps <= 4
    # Its own tokens win a tie: a prompt that repeats itself copies itself.
    other = History()
    other.add(NgramIndex([*prompt[:10], 900, 901, 902, 903]))  # as long a match
    own = NgramIndex([*prompt, 7, *prompt[:10]], history=other)
    assert own.draft(4) == (prompt[10:14], 10)


def test_step_costs_fit_a_line_from_the_fastest_samples() -> None:
    c = costs(0.010, 0.002)
    c.observe(4, 0.5)  # a slow outlier does not move the fastest
    assert abs((c.estimate(1) or 0) - 0.010) < 1e-9
    assert abs((c.estimate(9) or 0) - 0.026) < 1e-9


def test_auto_drafts_long_behind_a_long_match_that_has_been_kept() -> None:
    acc = Acceptance()
    for _ in range(50):
        acc.record(40, 16, 16)  # explored drafts are short: longer ones extrapolate
    drafter = Drafter(NgramIndex([]))
    lengths = plan([(drafter, [7] * MAX_DRAFT, 40)], 1, 1, 500, costs(), acc)
    assert lengths[0] >= 32


def test_auto_never_drafts_behind_a_short_match() -> None:
    acc = Acceptance()
    for m in range(4, AUTO_MIN_MATCH):
        for _ in range(50):
            acc.record(m, 8, 8)  # even where short matches were always kept
    drafter = Drafter(NgramIndex([]))
    assert plan([(drafter, [7] * 8, AUTO_MIN_MATCH - 1)], 1, 1, 500, costs(), acc) == [0]


def test_auto_stops_where_drafts_are_rejected_and_when_rows_cost_a_step() -> None:
    rejected = Acceptance()
    for m in range(0, 80, 4):
        for _ in range(200):
            rejected.record(m, 4, 0)
    drafter = Drafter(NgramIndex([]))
    assert plan([(drafter, [7] * 16, 40)], 1, 1, 500, costs(), rejected) == [0]
    kept = Acceptance()
    # A full batch: each extra row costs as much as a whole step, so nothing pays.
    expensive = costs(0.016, 0.016)
    assert plan([(drafter, [7] * 16, 40)], 8, 8, 500, expensive, kept) == [0]


def test_forced_drafts_grow_with_the_match_and_fit_the_room() -> None:
    drafter = Drafter(NgramIndex([]), forced=True)
    acc = Acceptance()
    assert plan([(drafter, [7] * 30, 6)], 1, 1, 500, costs(), acc) == [6]
    assert plan([(drafter, [7] * 30, 40)], 1, 1, 10, costs(), acc) == [10]
    assert plan([(drafter, [7] * 30, 40)], 1, 1, 0, costs(), acc) == [0]


def test_a_sequence_whose_drafts_fail_drafts_less_than_the_table_says() -> None:
    acc = Acceptance()
    for _ in range(100):
        acc.record(40, 8, 6)
    good, bad = Drafter(NgramIndex([])), Drafter(NgramIndex([]))
    for _ in range(20):
        bad.record(8, 0)
    assert bad.scale(acc.rate(40)) < 0.2 < good.scale(acc.rate(40))


def cpu_costs() -> StepCosts:
    """This 2-core CPU's shape: below 16 rows each row costs about a step; from 16 on a
    row costs a third of one (ms: 1/2/8/16/32 rows = 11/23/57/60/122)."""
    c = StepCosts()
    for n, ms in ((1, 11), (2, 23), (8, 57), (16, 60), (32, 122)):
        c.observe(n, ms / 1000)
    return c


def test_a_copy_that_either_fails_at_once_or_runs_on_drafts_long() -> None:
    """Three drafts in ten fail at their first token (an edit), the rest run to the end
    (verbatim): 16 rows pay, though a rate of 0.7 a token, multiplied out, would not."""
    acc = Acceptance()
    for i in range(100):
        acc.record(20, 32, 0 if i % 10 < 3 else 32)
    assert not acc.exploring(20)
    drafter = Drafter(NgramIndex([]))
    (k,) = plan([(drafter, [7] * MAX_DRAFT, 20)], 1, 1, 500, cpu_costs(), acc)
    assert 1 + k >= 16  # the step has 16 rows or more


def test_auto_explores_a_match_length_it_knows_little_of_only_where_it_could_pay() -> None:
    fresh, drafter = Acceptance(), Drafter(NgramIndex([]))
    assert fresh.exploring(20)
    # As forced drafting would (as long as the match), in a step of at most 16 rows.
    assert plan([(drafter, [7] * MAX_DRAFT, 12)], 1, 1, 500, cpu_costs(), fresh) == [12]
    assert plan([(drafter, [7] * MAX_DRAFT, 20)], 1, 1, 500, cpu_costs(), fresh) == [15]
    expensive = costs(0.016, 0.016)  # not even a draft kept whole would pay
    assert plan([(drafter, [7] * MAX_DRAFT, 20)], 8, 8, 500, expensive, fresh) == [0]
    # Declined long enough, a table made pessimistic by prose is tried again.
    prose = Acceptance()
    for _ in range(Acceptance.EXPLORE):
        prose.record(20, 16, 0)
    for _ in range(Acceptance.REVISIT):
        assert plan([(drafter, [7] * MAX_DRAFT, 20)], 1, 1, 500, cpu_costs(), prose) == [0]
    assert prose.exploring(20)


def test_steps_among_many_sequences_are_priced_by_their_own_measurements() -> None:
    alone = cpu_costs()
    among = StepCosts(fallback=alone)
    among.observe(8, 0.077)  # eight sequences' plain step
    assert among.estimate(4) is None  # fewer rows than its plain step: never asked
    borrowed = among.estimate(16) or 0
    assert abs(borrowed - (0.077 + 2 * 8 * (alone._slope or 0))) < 1e-9  # BORROW x alone
    among.observe(32, 1.288)  # measured: rows among eight cost far more than alone
    assert (among.estimate(16) or 0) > 0.4  # the line from 8 to 32 rows
    assert StepCosts().estimate(1) is None
