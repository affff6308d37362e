"""Bloom index over multi-valued categorical item features and boolean filter queries (SilverTorch).

Build: every (feature, value) pair of an item is a term ``"feature:value"``; its K Bloom bits are double
hashes of a 64-bit blake2b digest of the term string, taken modulo M (``bits_per_item``). The bits of all
N items are stored bit-sliced (``words_MxW``: word w of row m holds bit m of items 32 w .. 32 w + 31), so a
term test over 32 items is an AND of K words. The index and plan types (``BloomConfig``, ``BloomIndex``,
``BloomPlan``) and their evaluation (``filter_words``, ``filter_words_probed``) are the op
``recjax.ops.bloom``; this module builds indexes, compiles queries and holds the exact host-side checks.

Queries: ``feature:value`` terms combined with AND, OR, NOT and parentheses (keywords case-insensitive,
AND binds tighter than OR, NOT tightest); the empty query matches everything. Each query is parsed once,
NOT is pushed to the terms (De Morgan), and the result is distributed into a CNF (AND of OR-clauses)
padded to a fixed (clauses x literals) shape: the plan ``ops.bloom`` evaluates for many queries at once.
Parse errors are ``BloomQueryError`` naming the position in the query string.

What NOT does: a Bloom test has false positives and no false negatives, so NOT(test) has false negatives
(an item lacking the value is dropped when its bits happen to cover the value's K bits; probability = the
term false-positive rate). Two modes: ``not_mode="bloom"`` (default) evaluates NOT(test) and accepts
these rare false negatives; ``not_mode="superset"`` treats every negated literal as TRUE, so the mask is a
superset of the exact filter for every query (no false negatives, the NOT is left to an exact re-check on
the K retrieved candidates). AND/OR-only queries never have false negatives in either mode.

Letters: N items, M bits per item, K hashes, W words (ceil(N / 32), plus padding), B queries,
C clauses, T literals per clause.
Deviation from SilverTorch: one M-bit signature shared by all features (SilverTorch sizes a bundle per
feature), 32-bit words (SilverTorch: 64-bit), CNF plans instead of its postfix plan format.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from recjax import validation
from recjax.ops import bloom as bloom_op


class BloomQueryError(ValueError):
    """A malformed filter query; the message names the position."""


# ------------------------------------------------------------------------------------------ features


@dataclass(frozen=True)
class ItemFeatures:
    """Per feature: codes (N, V) int32 into ``vocab`` (-1 = no value); used for building and exact checks."""

    codes: Mapping[str, np.ndarray]
    vocab: Mapping[str, tuple[str, ...]]

    @property
    def num_items(self) -> int:
        return next(iter(self.codes.values())).shape[0]


def item_features(features: Mapping[str, np.ndarray | Sequence[Sequence]]) -> ItemFeatures:
    """``features[name]`` : an int array (N, V) (negative = missing) or one list of values per item."""
    if not features:
        raise ValueError("features: expected at least one feature, got none")
    codes, vocab, n = {}, {}, None
    for name, vals in features.items():
        if not re.fullmatch(r"[A-Za-z_][\w.\-]*", name):
            raise ValueError(f"features: feature name {name!r} must match [A-Za-z_][\\w.-]*")
        if isinstance(vals, np.ndarray) and vals.dtype.kind in "iu":
            arr = vals.reshape(vals.shape[0], -1).astype(np.int64)
            uniq, inv = np.unique(arr[arr >= 0], return_inverse=True)
            c = np.full(arr.shape, -1, np.int32)
            c[arr >= 0] = inv
            codes[name], vocab[name] = c, tuple(str(u) for u in uniq)
        else:
            table: dict[str, int] = {}
            rows = [[table.setdefault(str(v), len(table)) for v in item] for item in vals]
            width = max(1, max((len(r) for r in rows), default=1))
            c = np.full((len(rows), width), -1, np.int32)
            for i, r in enumerate(rows):
                c[i, : len(r)] = r
            codes[name], vocab[name] = c, tuple(table)
        if n is not None and codes[name].shape[0] != n:
            raise ValueError(f"features[{name!r}]: expected {n} items, got {codes[name].shape[0]}")
        n = codes[name].shape[0]
    return ItemFeatures(codes, vocab)


def features_from_multi_hot(
    item_features_by_name: Mapping[str, np.ndarray], names: Mapping[str, Sequence[str]] | None = None
) -> ItemFeatures:
    """From the data layer's item features (rows = items): a multi-hot (N, F) array with value names (e.g.
    MovieLens ``genres`` with ``GENRES``) becomes one value per set flag; other arrays are categorical codes
    (0 = unknown, as in recjax.data, is kept as a value only if listed in ``names``)."""
    names = names or {}
    out = {}
    for feature, arr in item_features_by_name.items():
        arr = np.asarray(arr)
        if feature in names:
            labels = list(names[feature])
            out[feature] = [[labels[j] for j in np.flatnonzero(row)] for row in arr]
        else:
            codes = arr.reshape(arr.shape[0], -1).astype(np.int64)
            out[feature] = np.where(codes > 0, codes, -1)
    return item_features(out)


def term_rows(term: str, config: bloom_op.BloomConfig) -> np.ndarray:
    """The K Bloom rows of a term string (double hashing of a stable 64-bit digest)."""
    key = int.from_bytes(hashlib.blake2b(term.encode(), digest_size=8).digest(), "little")
    h1, h2 = key & 0xFFFFFFFF, (key >> 32) | 1
    return np.array([(h1 + i * h2) % config.bits_per_item for i in range(config.num_hashes)], np.int32)


# ------------------------------------------------------------------------------------------ index

_DEFAULT_CONFIG = bloom_op.BloomConfig()  # M = 512, K = 5


@jax.jit
def _pack_chunk(rows_CxE, words_MxV):
    c = rows_CxE.shape[0]
    m, v = words_MxV.shape
    bits = jnp.zeros((m, v * 32), jnp.uint32)
    items = jnp.broadcast_to(jnp.arange(c)[:, None], rows_CxE.shape)
    bits = bits.at[jnp.where(rows_CxE >= 0, rows_CxE, m), items].set(1, mode="drop")
    packed = jnp.sum(bits.reshape(m, v, 32) << jnp.arange(32, dtype=jnp.uint32), axis=2, dtype=jnp.uint32)
    return words_MxV | jax.lax.bitcast_convert_type(packed, jnp.int32)


def build_bloom_index(
    features: ItemFeatures,
    config: bloom_op.BloomConfig = _DEFAULT_CONFIG,
    *,
    item_order: np.ndarray | None = None,
    pad_words: int = 0,
    chunk_words: int = 2048,
) -> bloom_op.BloomIndex:
    """Bit-sliced index. ``item_order[r]`` = item stored at layout row r (-1 = empty row), e.g. an IVF
    index's ``ids_sorted`` so that clusters are contiguous words; ``pad_words`` zero words are appended
    (probed evaluation reads up to one cluster past an offset)."""
    validation.check_positive("bits_per_item", config.bits_per_item)
    validation.check_positive("num_hashes", config.num_hashes)
    tables = {}
    for name in features.codes:
        vocab = features.vocab[name]
        rows = [term_rows(f"{name}:{v}", config) for v in vocab] or [np.zeros(config.num_hashes, np.int32)]
        tables[name] = np.stack(rows)  # (U, K) Bloom rows per vocabulary entry
    max_terms = int(sum((c >= 0).sum(1) for c in features.codes.values()).max(initial=0))
    order = None if item_order is None else np.asarray(item_order)
    n = features.num_items if order is None else order.shape[0]
    num_words = -(-n // 32)
    chunk_items = chunk_words * 32
    out = []
    for start in range(0, n, chunk_items):  # chunks keep host memory at chunk x terms x K
        stop = min(n, start + chunk_items)
        items = None if order is None else order[start:stop]
        parts = []
        for name, codes in features.codes.items():
            c = codes[start:stop] if items is None else codes[np.maximum(items, 0)]
            r = tables[name][np.maximum(c, 0)]  # (chunk, V, K)
            bad = c < 0 if items is None else (c < 0) | (items[:, None] < 0)
            r[bad] = -1
            parts.append(r.reshape(stop - start, -1))
        part = np.concatenate(parts, axis=1)
        v = -(-part.shape[0] // 32)
        part = np.pad(part, ((0, v * 32 - part.shape[0]), (0, 0)), constant_values=-1)
        out.append(_pack_chunk(jnp.asarray(part), jnp.zeros((config.bits_per_item, v), jnp.int32)))
    words = jnp.concatenate(out, axis=1) if out else jnp.zeros((config.bits_per_item, 0), jnp.int32)
    words = jnp.pad(words, ((0, 0), (0, pad_words + num_words - words.shape[1])))
    return bloom_op.BloomIndex(words, config, n, tuple(features.codes), max_terms)


def analytic_term_fpr(config: bloom_op.BloomConfig, terms_per_item: float) -> float:
    """Expected false-positive rate of one absent term: (1 - exp(-K n / M))^K."""
    k, m = config.num_hashes, config.bits_per_item
    return (1.0 - math.exp(-k * terms_per_item / m)) ** k


# ------------------------------------------------------------------------------------------ queries

_TOKEN = re.compile(r"\s*(?:(?P<lp>\()|(?P<rp>\))|(?P<word>[^\s()]+))")


def _tokenize(query: str) -> list[tuple[str, str, int]]:
    tokens, pos = [], 0
    while pos < len(query):
        m = _TOKEN.match(query, pos)
        if m is None or m.end() == pos:  # only trailing whitespace left
            break
        start = m.start(m.lastgroup)
        text = m.group(m.lastgroup)
        kind = m.lastgroup
        if kind == "word" and text.upper() in ("AND", "OR", "NOT"):
            kind = text.upper()
        tokens.append((kind, text, start))
        pos = m.end()
    tokens.append(("end", "", len(query)))
    return tokens


class _Parser:
    def __init__(self, query: str, feature_names: Sequence[str]):
        self.query, self.tokens, self.i, self.features = query, _tokenize(query), 0, set(feature_names)

    def error(self, msg: str, pos: int):
        raise BloomQueryError(
            f"query {self.query!r}: {msg} at position {pos}\n  {self.query}\n  {' ' * pos}^"
        )

    def peek(self):
        return self.tokens[self.i]

    def take(self):
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def parse(self):
        if self.peek()[0] == "end":
            return ("true",)
        node = self.parse_or()
        kind, text, pos = self.peek()
        if kind != "end":
            self.error(f"unexpected {text!r} (expected AND, OR or end of query)", pos)
        return node

    def parse_or(self):
        parts = [self.parse_and()]
        while self.peek()[0] == "OR":
            self.take()
            parts.append(self.parse_and())
        return parts[0] if len(parts) == 1 else ("or", parts)

    def parse_and(self):
        parts = [self.parse_unary()]
        while self.peek()[0] == "AND":
            self.take()
            parts.append(self.parse_unary())
        return parts[0] if len(parts) == 1 else ("and", parts)

    def parse_unary(self):
        if self.peek()[0] == "NOT":
            self.take()
            return ("not", self.parse_unary())
        return self.parse_primary()

    def parse_primary(self):
        kind, text, pos = self.take()
        if kind == "lp":
            node = self.parse_or()
            kind2, text2, pos2 = self.take()
            if kind2 != "rp":
                self.error(
                    f"expected ')' to close '(' at position {pos}, got {text2 or 'end of query'!r}", pos2
                )
            return node
        if kind != "word":
            self.error(f"expected a feature:value term, '(' or NOT, got {text or 'end of query'!r}", pos)
        feature, sep, value = text.partition(":")
        if not sep or not feature or not value:
            self.error(f"expected feature:value, got {text!r}", pos)
        if feature not in self.features:
            self.error(f"unknown feature {feature!r} (known: {sorted(self.features)})", pos)
        return ("term", feature, value)


def parse_query(query: str, feature_names: Sequence[str]):
    """Returns the AST: ("term", f, v) | ("not", x) | ("and", [..]) | ("or", [..]) | ("true",)."""
    return _Parser(query, feature_names).parse()


def _to_cnf(node, negate: bool, max_clauses: int):
    """List of clauses, each a frozenset of literals (feature, value, negated); [] = TRUE."""
    kind = node[0]
    if kind == "true":
        return [frozenset()] if negate else []  # an empty clause is FALSE
    if kind == "term":
        return [frozenset([(node[1], node[2], negate)])]
    if kind == "not":
        return _to_cnf(node[1], not negate, max_clauses)
    conj = (kind == "and") != negate  # De Morgan
    parts = [_to_cnf(p, negate, max_clauses) for p in node[1]]
    if conj:
        return [c for p in parts for c in p]
    clauses = [frozenset()]
    for p in parts:  # OR of CNFs: distribute
        if not p:
            return []  # OR with TRUE
        clauses = [a | b for a in clauses for b in p]
        if len(clauses) > max_clauses:
            raise BloomQueryError(f"query too complex: its CNF exceeds max_clauses={max_clauses}")
    return clauses


def compile_queries(
    index: bloom_op.BloomIndex,
    queries: Sequence[str],
    *,
    max_clauses: int | None = None,
    max_literals: int | None = None,
    not_mode: str = "bloom",
) -> bloom_op.BloomPlan:
    """Parses and compiles a batch of queries into one fixed-shape plan (padded to the largest query, or
    to ``max_clauses`` x ``max_literals`` so repeated batches reuse one compiled kernel)."""
    if not_mode not in ("bloom", "superset"):
        raise ValueError(f"not_mode: expected 'bloom' or 'superset', got {not_mode!r}")
    cnfs = []
    for q in queries:
        clauses = _to_cnf(parse_query(q, index.feature_names), False, max_clauses or 4096)
        cnfs.append([sorted(c) for c in dict.fromkeys(clauses)])
    c_max = max([len(c) for c in cnfs] + [1])
    t_max = max([len(cl) for c in cnfs for cl in c] + [1])
    if max_clauses is not None or max_literals is not None:
        if (max_clauses and c_max > max_clauses) or (max_literals and t_max > max_literals):
            raise BloomQueryError(
                f"query needs {c_max} clauses x {t_max} literals, more than the plan shape "
                f"{max_clauses} x {max_literals}"
            )
        c_max, t_max = max_clauses or c_max, max_literals or t_max
    k = index.config.num_hashes
    rows = np.zeros((len(queries), c_max, t_max, k), np.int32)
    kinds = np.full((len(queries), c_max, t_max), bloom_op.KIND_FALSE, np.int32)
    for b, cnf in enumerate(cnfs):
        kinds[b, len(cnf) :, 0] = bloom_op.KIND_TRUE  # padding clauses
        for c, clause in enumerate(cnf):
            for t, (feature, value, negated) in enumerate(clause):
                rows[b, c, t] = term_rows(f"{feature}:{value}", index.config)
                if negated:
                    kinds[b, c, t] = bloom_op.KIND_TRUE if not_mode == "superset" else bloom_op.KIND_NOT_TERM
                else:
                    kinds[b, c, t] = bloom_op.KIND_TERM
    term_rows_UxK, term_of = np.unique(rows.reshape(-1, k), axis=0, return_inverse=True)
    return bloom_op.BloomPlan(
        jnp.asarray(rows), jnp.asarray(kinds), term_rows_UxK, term_of.reshape(kinds.shape)
    )


# ------------------------------------------------------------------------------------------ exact checks


def exact_filter(features: ItemFeatures, query: str) -> np.ndarray:
    """The reference: (N,) bool, the query evaluated on the raw features."""

    def ev(node):
        kind = node[0]
        if kind == "true":
            return np.ones(features.num_items, bool)
        if kind == "term":
            vocab = features.vocab[node[1]]
            if node[2] not in vocab:
                return np.zeros(features.num_items, bool)
            return (features.codes[node[1]] == vocab.index(node[2])).any(axis=1)
        if kind == "not":
            return ~ev(node[1])
        parts = [ev(p) for p in node[1]]
        return np.logical_and.reduce(parts) if kind == "and" else np.logical_or.reduce(parts)

    return ev(parse_query(query, tuple(features.codes)))


def unpack_words(words_BxW, n: int) -> np.ndarray:
    w = np.asarray(words_BxW).astype(np.uint32)
    bits = (w[..., None] >> np.arange(32, dtype=np.uint32)) & 1
    return bits.reshape(*w.shape[:-1], -1)[..., :n].astype(bool)
