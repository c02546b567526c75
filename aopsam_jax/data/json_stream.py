"""Incremental JSON reading for large annotation files.

`json.load` of COCO 2017's train annotations builds ~4 GB of Python objects
at once.  `JsonStream` walks the top-level object and hands out the items of
large arrays one at a time (each decoded by the C scanner of the `json`
module), so a caller can compact every item as it arrives and memory stays
near the size of what it keeps, plus a read buffer of `chunk` bytes.

  with open(path, "rb") as f:
    s = JsonStream(f)
    for key in s.members():
      if key == "annotations":
        for item in s.items():
          ...
      else:
        s.value()          # every member's value must be consumed
"""

from __future__ import annotations

import codecs
import json
import re
from typing import Any, BinaryIO, Callable, Iterator, Optional, Tuple

_WS = re.compile(r"[ \t\n\r]*")
_NUMBER = "0123456789.eE+-"


class JsonStream:
  """Pull parser over a binary file holding one JSON value."""

  def __init__(self, f: BinaryIO, chunk: int = 1 << 20,
               on_bytes: Optional[Callable[[bytes], None]] = None):
    self._f, self._chunk, self._on_bytes = f, chunk, on_bytes
    self._utf8 = codecs.getincrementaldecoder("utf-8")()
    self._dec = json.JSONDecoder()
    self._buf, self._pos, self._eof = "", 0, False
    self._consumed = 0  # characters dropped from the front of the buffer
    self._last_len = 0  # length of the last decoded value's text

  @property
  def offset(self) -> int:
    """Characters read so far (for error messages)."""
    return self._consumed + self._pos

  def _more(self) -> bool:
    """Append the next chunk; a value longer than the buffer doubles it."""
    if self._eof:
      return False
    data = self._f.read(max(self._chunk, len(self._buf) - self._pos))
    if self._on_bytes is not None and data:
      self._on_bytes(data)
    self._consumed += self._pos
    self._buf = self._buf[self._pos:] + self._utf8.decode(data, final=not data)
    self._pos = 0
    if not data:
      self._eof = True
    return True

  def _peek(self) -> str:
    while True:
      self._pos = _WS.match(self._buf, self._pos).end()
      if self._pos < len(self._buf) or not self._more():
        return self._buf[self._pos:self._pos + 1]

  def _expect(self, chars: str) -> str:
    c = self._peek()
    if not c or c not in chars:
      raise json.JSONDecodeError(f"expected one of {chars!r}", c or "<end>", self.offset)
    self._pos += 1
    return c

  def value(self) -> Any:
    """Decode the next complete value."""
    self._peek()
    while True:
      try:
        v, end = self._dec.raw_decode(self._buf, self._pos)
        if self._eof or not self._cut(v, end):
          self._last_len = end - self._pos
          self._pos = end
          return v
      except json.JSONDecodeError as e:
        if self._eof:
          raise json.JSONDecodeError(e.msg, "", self._consumed + e.pos) from None
      self._more()

  def _cut(self, v, end: int) -> bool:
    """Whether the buffer's end may have cut the value short: a number
    followed by nothing, or by the start of a fraction / exponent ("2." "5")."""
    if end >= len(self._buf):
      return True
    if isinstance(v, bool) or not isinstance(v, (int, float)) or self._buf[end] not in ".eE":
      return False
    rest = self._buf[end:end + 64]
    return end + 64 >= len(self._buf) and not rest.strip(_NUMBER)

  def value_and_text(self) -> Tuple[Any, str]:
    """The next value and its JSON text as in the file."""
    v = self.value()  # leaves the buffer as decoded: the text ends at _pos
    return v, self._buf[self._pos - self._last_len:self._pos]

  def items(self, text: bool = False) -> Iterator[Any]:
    """The items of the array that comes next, one at a time (with their
    JSON text as (item, text) pairs when `text`)."""
    self._expect("[")
    if self._peek() == "]":
      self._pos += 1
      return
    while True:
      yield self.value_and_text() if text else self.value()
      if self._expect(",]") == "]":
        return

  def members(self) -> Iterator[str]:
    """Keys of the object that comes next; the caller consumes each value
    (with `value()` or `items()`) before asking for the next key."""
    self._expect("{")
    if self._peek() == "}":
      self._pos += 1
      return
    while True:
      key = self.value()
      if not isinstance(key, str):
        raise json.JSONDecodeError("object key is not a string", "", self.offset)
      self._expect(":")
      yield key
      if self._expect(",}") == "}":
        return

  def is_next(self, char: str) -> bool:
    return self._peek() == char
