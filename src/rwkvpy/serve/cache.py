"""The prefix state cache: a trie over token ids whose marked nodes hold (state, last logits).

An RNN's whole context is its state, so a request whose prompt starts with a cached prefix
resumes from that prefix's state and reads only the rest: a chat's turn N+1 processes only the
new message. Entries are kept on the CPU under a byte budget, the least recently used evicted
first.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from torch import Tensor

from ..models.state import RecurrentState


@dataclass
class _Node:
    children: dict[int, "_Node"] = field(default_factory=dict)
    parent: "_Node | None" = None
    token: int = -1
    entry: tuple[RecurrentState, Tensor] | None = None


def _nbytes(state: RecurrentState, logits: Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in state.tensors().values()) + logits.numel() * logits.element_size()


class PrefixCache:
    """``lookup(tokens)`` -> (length of the longest cached prefix, its state, its logits);
    ``insert(tokens, state, logits)`` stores the state after ``tokens``. Thread-safe."""

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self.root = _Node()
        self.lru: OrderedDict[int, tuple[_Node, int]] = OrderedDict()  # id(node) -> (node, bytes)
        self.bytes = 0
        self.lock = threading.Lock()

    def lookup(self, tokens: list[int]) -> tuple[int, RecurrentState | None, Tensor | None]:
        with self.lock:
            node, best = self.root, (0, None)
            for i, t in enumerate(tokens):
                node = node.children.get(t)
                if node is None:
                    break
                if node.entry is not None:
                    best = (i + 1, node)
            n, hit = best
            if hit is None:
                return 0, None, None
            self.lru.move_to_end(id(hit))
            state, logits = hit.entry
            return n, state, logits

    def insert(self, tokens: list[int], state: RecurrentState, logits: Tensor) -> None:
        if not tokens:
            return
        state, logits = state.to("cpu").clone(), logits.detach().to("cpu").clone()
        size = _nbytes(state, logits)
        if size > self.budget:
            return
        with self.lock:
            node = self.root
            for t in tokens:
                child = node.children.get(t)
                if child is None:
                    child = node.children[t] = _Node(parent=node, token=t)
                node = child
            if node.entry is not None:
                self.lru.move_to_end(id(node))
                return
            node.entry = (state, logits)
            self.lru[id(node)] = (node, size)
            self.bytes += size
            while self.bytes > self.budget and self.lru:
                _, (old, old_size) = self.lru.popitem(last=False)
                old.entry = None
                self.bytes -= old_size
                self._prune(old)

    def _prune(self, node: _Node) -> None:
        """Remove branches that no longer lead to an entry."""
        while node.parent is not None and node.entry is None and not node.children:
            del node.parent.children[node.token]
            node = node.parent

    @property
    def entries(self) -> int:
        return len(self.lru)
