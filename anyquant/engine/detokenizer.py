"""Incremental detokenization and stop strings for one request, in work proportional to new tokens.

Owns turning a growing list of output ids into text deltas that never split a UTF-8 character and
never emit a prefix of a stop string that may still complete; finds stop strings and truncates.
Each update decodes only a short window of the last ids (from a few tokens before the new ones, so
that tokenizers which drop a leading space or merge bytes across tokens decode them in context)
and searches for stop strings only where a new match can end.
"""

from __future__ import annotations

from anyquant.tokenizer import Tokenizer

# Ids a trailing replacement character may be held back for: a UTF-8 character has at most four
# bytes, so past that the replacement is invalid bytes (common in random-weight models' output),
# not half a character, and the window must not grow with such a run.
_MAX_HELD_IDS = 4


class IncrementalDetokenizer:
    def __init__(
        self, tokenizer: Tokenizer | None, stop: list[str], skip_special_tokens: bool = True
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = [s for s in stop if s]
        self._longest_stop = max((len(s) for s in self.stop), default=0)
        self.text = ""  # final text so far (stop string excluded)
        self.emitted = 0  # characters of `text` already returned as deltas
        self.stopped = False
        # Output ids [_prefix, _read) were decoded last time; ids from _read on are not in `text`
        # but in `_pending` (their text, held back while it ends in half a character).
        self._prefix = 0
        self._read = 0
        self._pending = ""

    def update(self, output_ids: list[int], finished: bool) -> str:
        """Given all output ids so far, return the new text to emit."""
        if self.tokenizer is None or self.stopped:
            return ""
        decoded = len(self.text)
        self._append_new_text(output_ids, finished)
        self._find_stop(decoded)
        safe = len(self.text)
        if not (finished or self.stopped):
            # A trailing partial stop string may still complete: hold it back until the next token.
            for stop in self.stop:
                for n in range(min(len(stop) - 1, safe), 0, -1):
                    if self.text.endswith(stop[:n], 0, safe):  # no copy of the text per step
                        safe -= n
                        break
        delta = self.text[self.emitted : safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return delta

    def _append_new_text(self, ids: list[int], finished: bool) -> None:
        assert self.tokenizer is not None
        if len(ids) <= self._read:
            return
        skip = self.skip_special_tokens
        before = self.tokenizer.decode(ids[self._prefix : self._read], skip_special_tokens=skip)
        after = self.tokenizer.decode(ids[self._prefix :], skip_special_tokens=skip)
        new = after[len(before) :]
        # A trailing replacement char may be half a UTF-8 sequence: keep the window and wait for
        # the next token, unless nothing more will come.
        if finished or not after.endswith("\ufffd") or len(ids) - self._read >= _MAX_HELD_IDS:
            self.text += new
            self._pending = ""
            self._prefix, self._read = self._read, len(ids)
        else:
            self._pending = new

    def _find_stop(self, decoded: int) -> None:
        """Truncate at the earliest stop string; only a match ending in the new text is new."""
        if not self.stop:
            return
        begin = max(decoded - self._longest_stop + 1, 0)
        text = self.text + self._pending  # a stop string may end in text that is held back
        hits = [h for h in (text.find(s, begin) for s in self.stop) if h >= 0]
        if hits:
            self.text = text[: min(hits)]
            self.stopped = True
