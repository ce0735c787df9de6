"""PageAllocator: page accounting, all-or-nothing allocation, prefix sharing of full pages, eviction."""

from __future__ import annotations

import pytest

from anyquant.engine.pages import PageAllocator
from anyquant.engine.request import Request
from anyquant.engine.sampling import SamplingParams

PARAMS = SamplingParams(max_tokens=1)


def make(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, PARAMS)


def computed(alloc: PageAllocator, request: Request, num_tokens: int) -> Request:
    """Allocate and pretend the model wrote the first `num_tokens` tokens, then publish full pages."""
    assert alloc.allocate(request, num_tokens)
    request.num_computed_tokens = num_tokens
    alloc.cache_full_pages(request)
    return request


def check_invariants(alloc: PageAllocator, holders: list[Request]) -> None:
    free = alloc.free_page_ids()
    assert len(free) == len(set(free)) == alloc.num_free
    for page in range(alloc.num_pages):
        holding = sum(r.page_ids.count(page) for r in holders)
        assert alloc.ref_count(page) == holding, f"page {page}"
        assert (page in free) == (holding == 0), f"page {page} both free and used, or neither"
    assert alloc.num_used + alloc.num_free == alloc.num_pages
    for r in holders:
        assert len(r.page_ids) == len(set(r.page_ids))


@pytest.mark.parametrize("page_size", [0, 3, 12, -4])
def test_page_size_must_be_a_power_of_two(page_size: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        PageAllocator(8, page_size)


def test_num_pages_must_be_positive() -> None:
    with pytest.raises(ValueError, match="num_pages"):
        PageAllocator(0, 16)


def test_allocate_grows_the_page_table_by_whole_pages() -> None:
    alloc = PageAllocator(8, 4)
    r = make("a", list(range(10)))
    assert alloc.allocate(r, 5)
    assert len(r.page_ids) == 2
    assert alloc.allocate(r, 8)  # still two pages
    assert len(r.page_ids) == 2
    assert alloc.allocate(r, 9)
    assert len(r.page_ids) == 3
    assert alloc.num_used == 3 and alloc.usage() == 3 / 8
    check_invariants(alloc, [r])


def test_allocate_is_all_or_nothing() -> None:
    alloc = PageAllocator(4, 4)
    a, b = make("a", [1]), make("b", [2])
    assert alloc.allocate(a, 12)
    assert not alloc.allocate(b, 8)  # needs 2 pages, 1 left
    assert b.page_ids == [] and alloc.num_free == 1
    assert not alloc.allocate(a, 17)  # needs 2 more pages
    assert len(a.page_ids) == 3 and alloc.num_free == 1
    check_invariants(alloc, [a, b])


def test_free_returns_every_page() -> None:
    alloc = PageAllocator(6, 2)
    reqs = [make(str(i), [i]) for i in range(3)]
    for i, r in enumerate(reqs):
        assert alloc.allocate(r, 2 * i + 1)
    check_invariants(alloc, reqs)
    for r in reqs:
        alloc.free(r)
        assert r.page_ids == []
    assert alloc.num_used == 0 and alloc.num_free == 6
    check_invariants(alloc, reqs)


def test_only_full_computed_pages_are_cached() -> None:
    alloc = PageAllocator(8, 4)
    r = make("a", list(range(11)))
    assert alloc.allocate(r, 11)  # 3 pages
    r.num_computed_tokens = 6  # one full page computed, the second half-written
    alloc.cache_full_pages(r)
    assert [alloc.is_cached(p) for p in r.page_ids] == [True, False, False]
    r.num_computed_tokens = 11
    alloc.cache_full_pages(r)
    assert [alloc.is_cached(p) for p in r.page_ids] == [True, True, False]
    assert alloc.num_cached == 2


def test_match_prefix_shares_full_pages_and_leaves_a_token_to_compute() -> None:
    alloc = PageAllocator(16, 4)
    tokens = list(range(100, 111))  # 11 tokens: 2 full pages + 3
    a = computed(alloc, make("a", tokens), 11)
    # A longer prompt with the same start: both full pages, 8 tokens.
    assert alloc.match_prefix([*tokens, 5, 6]) == (a.page_ids[:2], 8)
    # The same 11 tokens: 2 pages still leave 3 tokens.
    assert alloc.match_prefix(tokens) == (a.page_ids[:2], 8)
    # Exactly the 8 tokens of the full pages: the last one must be computed, so only 1 page.
    assert alloc.match_prefix(tokens[:8]) == (a.page_ids[:1], 4)
    assert alloc.match_prefix(tokens[:9]) == (a.page_ids[:2], 8)
    assert alloc.match_prefix(tokens[:1]) == ([], 0)


def test_match_prefix_needs_the_whole_prefix_not_just_the_page() -> None:
    alloc = PageAllocator(16, 4)
    computed(alloc, make("a", [1, 2, 3, 4, 5, 6, 7, 8, 9]), 9)
    # Same second page, different first page: the chained key differs, no hit at all.
    assert alloc.match_prefix([0, 2, 3, 4, 5, 6, 7, 8, 9]) == ([], 0)
    # Same first page, different second page: only the first one.
    pages, n = alloc.match_prefix([1, 2, 3, 4, 5, 6, 7, 0, 9])
    assert n == 4 and len(pages) == 1


def test_shared_pages_are_ref_counted() -> None:
    alloc = PageAllocator(16, 4)
    tokens = list(range(12))
    a = computed(alloc, make("a", tokens), 12)
    b = make("b", [*tokens[:8], 50, 51])
    prefix, n = alloc.match_prefix(b.all_token_ids)
    assert n == 8
    assert alloc.allocate(b, 10, prefix)
    assert b.page_ids[:2] == a.page_ids[:2] and b.page_ids[2] not in a.page_ids
    assert [alloc.ref_count(p) for p in b.page_ids] == [2, 2, 1]
    check_invariants(alloc, [a, b])
    alloc.free(a)
    assert [alloc.ref_count(p) for p in b.page_ids] == [1, 1, 1]
    check_invariants(alloc, [a, b])
    alloc.free(b)
    assert alloc.num_used == 0
    check_invariants(alloc, [a, b])
    # Freed but cached pages stay matchable.
    assert alloc.match_prefix(tokens)[1] == 8


def test_adopting_evictable_prefix_pages_counts_them_out_of_the_free_pool() -> None:
    alloc = PageAllocator(2, 4)
    tokens = list(range(8))
    a = computed(alloc, make("a", tokens), 8)
    alloc.free(a)
    assert alloc.num_free == 2
    b = make("b", [*tokens, 9])
    prefix, n = alloc.match_prefix(b.all_token_ids)
    assert n == 8
    # Two cached pages plus one new page do not fit in two pages, even though both count as free.
    assert not alloc.allocate(b, 9, prefix)
    assert b.page_ids == [] and alloc.num_free == 2 and alloc.num_cached == 2
    assert alloc.match_prefix(b.all_token_ids) == (prefix, 8)


def test_free_pages_are_used_before_cached_ones_are_evicted() -> None:
    alloc = PageAllocator(3, 4)
    a = computed(alloc, make("a", list(range(8))), 8)
    alloc.free(a)
    b = make("b", [1])
    assert alloc.allocate(b, 4)  # takes the never-cached page
    assert alloc.num_cached == 2 and alloc.match_prefix(list(range(9)))[1] == 8
    assert alloc.allocate(b, 8)  # now one cached page has to go
    assert alloc.num_cached == 1


def test_eviction_is_least_recently_freed_first() -> None:
    alloc = PageAllocator(3, 4)
    x = computed(alloc, make("x", [1, 1, 1, 1, 1]), 4)
    y = computed(alloc, make("y", [2, 2, 2, 2, 2]), 4)
    alloc.free(x)
    alloc.free(y)
    z = make("z", [3])
    assert alloc.allocate(z, 8)  # the never-cached page, then x's page
    assert alloc.match_prefix([1, 1, 1, 1, 1]) == ([], 0)
    assert alloc.match_prefix([2, 2, 2, 2, 2])[1] == 4
    check_invariants(alloc, [x, y, z])


def test_duplicate_content_computed_twice_keeps_one_cached_copy() -> None:
    alloc = PageAllocator(4, 4)
    tokens = [7, 7, 7, 7, 8]
    a = computed(alloc, make("a", tokens), 4)
    b = computed(alloc, make("b", tokens), 4)
    first = a.page_ids[0]
    assert alloc.is_cached(first) and not alloc.is_cached(b.page_ids[0])
    alloc.free(a)
    alloc.free(b)
    assert alloc.match_prefix(tokens) == ([first], 4)
    assert alloc.num_used == 0 and alloc.num_cached == 1


def test_adopting_a_prefix_is_checked() -> None:
    alloc = PageAllocator(4, 4)
    a = computed(alloc, make("a", list(range(5))), 5)
    holder = make("h", [1])
    assert alloc.allocate(holder, 1)
    with pytest.raises(ValueError, match="already holds pages"):
        alloc.allocate(holder, 8, a.page_ids[:1])
    with pytest.raises(ValueError, match="not in the prefix cache"):
        alloc.allocate(make("b", [1]), 8, [a.page_ids[1]])
