"""Page allocator for the paged KV cache.

Owns page ids, reference counts and the prefix cache (full pages keyed by a chained hash of the
tokens they hold). Knows nothing about tensors: the model runner turns page ids into slot indices
(`page_id * page_size + position % page_size`), the scheduler decides who gets pages and when.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence

from anyquant.engine.request import Request


def chain_digest(parent: bytes | None, token_ids: Sequence[int]) -> bytes:
    """Key of one full page: a 128-bit hash of the parent page's key and this page's token ids, so
    equal keys mean equal token prefixes (collisions are negligible at 128 bits)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"root")
    h.update(array("q", token_ids).tobytes())
    return h.digest()


class PageAllocator:
    """Hands out fixed-size pages. A page is in exactly one of three states:

    - used: reference count > 0 (held by one request, or shared by several through the prefix cache);
    - free: count 0 and no cached content, in `_free`;
    - evictable: count 0 but its content is in the prefix cache, in `_evictable` (LRU order); it
      counts as free and is evicted, oldest first, only once `_free` is empty.

    Only full pages whose tokens were computed are ever cached (`cache_full_pages`), so a shared page
    is never written: requests write only at positions past their computed prefix.
    """

    def __init__(self, num_pages: int, page_size: int) -> None:
        if num_pages < 1:
            raise ValueError(f"num_pages must be at least 1, got {num_pages}")
        if page_size < 1 or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self._ref = [0] * num_pages
        self._free: deque[int] = deque(range(num_pages))
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._digest_of: dict[int, bytes] = {}  # cached page -> key
        self._page_of: dict[bytes, int] = {}  # key -> cached page
        # Keys of each request's full pages computed so far (the chain continues from the last one).
        self._chains: dict[str, list[bytes]] = {}

    # -- counts --------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Pages an allocation can take now: free ones plus cached ones nobody holds."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_pages - self.num_free

    @property
    def num_cached(self) -> int:
        return len(self._digest_of)

    def usage(self) -> float:
        """Fraction of pages held by requests, in [0, 1]."""
        return self.num_used / self.num_pages

    def ref_count(self, page_id: int) -> int:
        return self._ref[page_id]

    def is_cached(self, page_id: int) -> bool:
        return page_id in self._digest_of

    def free_page_ids(self) -> list[int]:
        """Every page with reference count 0 (free or evictable), for checks and metrics."""
        return [*self._free, *self._evictable]

    def pages_for(self, num_tokens: int) -> int:
        """Pages needed to hold `num_tokens` tokens."""
        return -(-num_tokens // self.page_size)

    # -- prefix cache --------------------------------------------------------------------------
    def match_prefix(self, token_ids: Sequence[int]) -> tuple[list[int], int]:
        """Longest run of cached full pages holding a prefix of `token_ids` → (page ids, tokens
        covered). No side effects. At least one token is always left out: the model has to run on
        the last token to produce logits, and that token must not land in a shared page."""
        pages: list[int] = []
        parent: bytes | None = None
        limit = (len(token_ids) - 1) // self.page_size
        for i in range(max(limit, 0)):
            digest = chain_digest(parent, token_ids[i * self.page_size : (i + 1) * self.page_size])
            page = self._page_of.get(digest)
            if page is None:
                break
            pages.append(page)
            parent = digest
        return pages, len(pages) * self.page_size

    def cache_full_pages(self, request: Request) -> None:
        """Publish the request's full, computed pages in the prefix cache. Call after the step that
        filled them ran, never before: a cached page must already hold its K/V."""
        chain = self._chains.setdefault(request.request_id, [])
        num_full = min(request.num_computed_tokens // self.page_size, len(request.page_ids))
        tokens = request.cache_key_ids
        for i in range(len(chain), num_full):
            digest = chain_digest(
                chain[-1] if chain else None, tokens[i * self.page_size : (i + 1) * self.page_size]
            )
            chain.append(digest)
            page = request.page_ids[i]
            # Another request may have computed the same prefix in the same step; the first one
            # published stays the cached copy and this page stays private.
            if digest not in self._page_of and page not in self._digest_of:
                self._page_of[digest] = page
                self._digest_of[page] = digest

    # -- allocation ----------------------------------------------------------------------------
    def allocate(self, request: Request, new_total_tokens: int, prefix_pages: Sequence[int] = ()) -> bool:
        """Grow `request.page_ids` to hold `new_total_tokens` tokens, first adopting `prefix_pages`
        (from `match_prefix`, only for a request holding no pages). All or nothing: returns False
        and changes nothing when there are not enough pages."""
        if prefix_pages:
            self._check_prefix(request, prefix_pages)
        held = len(request.page_ids) + len(prefix_pages)
        needed = max(self.pages_for(new_total_tokens) - held, 0)
        # Adopting an evictable prefix page takes it out of the pool that new pages come from.
        reclaimed = sum(1 for p in prefix_pages if self._ref[p] == 0)
        if needed > self.num_free - reclaimed:
            return False
        if prefix_pages:
            for page in prefix_pages:
                if self._ref[page] == 0:
                    del self._evictable[page]
                self._ref[page] += 1
            request.page_ids.extend(prefix_pages)
            self._chains[request.request_id] = [self._digest_of[p] for p in prefix_pages]
        for _ in range(needed):
            page = self._take_page()
            self._ref[page] = 1
            request.page_ids.append(page)
        return True

    def free(self, request: Request) -> None:
        """Drop the request's hold on its pages; the page table becomes empty. Cached pages stay
        reusable (evictable); tail pages go first in the LRU order, as prefixes are worth more."""
        for page in reversed(request.page_ids):
            self._ref[page] -= 1
            if self._ref[page] == 0:
                if page in self._digest_of:
                    self._evictable[page] = None
                else:
                    self._free.append(page)
        request.page_ids.clear()
        self._chains.pop(request.request_id, None)

    def _take_page(self) -> int:
        if self._free:
            return self._free.popleft()
        page, _ = self._evictable.popitem(last=False)
        del self._page_of[self._digest_of.pop(page)]
        return page

    def _check_prefix(self, request: Request, prefix_pages: Sequence[int]) -> None:
        # Programming errors of the caller, not user input: the scheduler passes match_prefix output.
        if request.page_ids:
            raise ValueError(f"request {request.request_id!r} already holds pages; cannot adopt a prefix")
        stale = [p for p in prefix_pages if p not in self._digest_of]
        if stale:
            raise ValueError(f"prefix pages {stale} are not in the prefix cache (evicted since matching?)")
