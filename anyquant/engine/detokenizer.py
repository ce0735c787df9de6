"""Incremental detokenization and stop strings for one request.

Owns turning a growing list of output ids into text deltas that never split a UTF-8 character and
never emit a prefix of a stop string that may still complete; finds stop strings and truncates.
"""

from __future__ import annotations

from anyquant.tokenizer import Tokenizer


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer | None, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.text = ""  # final text so far (stop string excluded)
        self.emitted = 0  # characters of `text` already returned as deltas
        self.stopped = False

    def update(self, output_ids: list[int], finished: bool) -> str:
        """Given all output ids so far, return the new text to emit."""
        if self.tokenizer is None or self.stopped:
            return ""
        text = self.tokenizer.decode(output_ids)
        for stop in self.stop:
            hit = text.find(stop)
            if hit >= 0:
                text, self.stopped = text[:hit], True
        self.text = text
        safe = len(text)
        if not (finished or self.stopped):
            # A trailing replacement char may be half a UTF-8 sequence; a trailing partial stop string
            # may still complete. Hold both back until the next token decides.
            while safe and text[safe - 1] == "\ufffd":
                safe -= 1
            for stop in self.stop:
                for n in range(min(len(stop) - 1, safe), 0, -1):
                    if text[:safe].endswith(stop[:n]):
                        safe -= n
                        break
        delta = text[self.emitted : safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return delta
