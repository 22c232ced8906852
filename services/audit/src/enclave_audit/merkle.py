"""RFC 6962 / RFC 9162 Merkle tree hash over audit record hashes, with inclusion proofs.

Leaves are the 32-byte record hashes: ``leaf = SHA-256(0x00 || record_hash)``, ``node =
SHA-256(0x01 || left || right)``, the tree split at the largest power of two below its size, and
the empty tree's hash is ``SHA-256("")``. Written by hand (a few lines): the Python CT libraries are
unmaintained or pull in a whole log client. :class:`MerkleTreeBuilder` computes the same root in
O(log n) memory while records stream by.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(record_hash: str) -> bytes:
    """The Merkle leaf of a record: SHA-256 over 0x00 and the record hash's 32 bytes."""
    return hashlib.sha256(b"\x00" + bytes.fromhex(record_hash)).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


class MerkleTreeBuilder:
    """Incremental RFC 6962 tree head: keeps one hash per set bit of the size (perfect subtrees)."""

    def __init__(self) -> None:
        self._stack: list[tuple[int, bytes]] = []
        self.size = 0

    def append(self, record_hash: str) -> None:
        height, node = 0, leaf_hash(record_hash)
        while self._stack and self._stack[-1][0] == height:
            _, left = self._stack.pop()
            node = node_hash(left, node)
            height += 1
        self._stack.append((height, node))
        self.size += 1

    def root(self) -> bytes:
        if not self._stack:
            return EMPTY_ROOT
        root = self._stack[-1][1]
        for _, left in reversed(self._stack[:-1]):
            root = node_hash(left, root)
        return root


def merkle_root(record_hashes: Iterable[str]) -> str:
    """Hex Merkle tree hash of a sequence of record hashes."""
    builder = MerkleTreeBuilder()
    for record_hash in record_hashes:
        builder.append(record_hash)
    return builder.root().hex()


def _largest_power_of_two_below(n: int) -> int:
    return 1 << ((n - 1).bit_length() - 1)


def _subtree_root(leaves: Sequence[bytes]) -> bytes:
    if len(leaves) == 1:
        return leaves[0]
    k = _largest_power_of_two_below(len(leaves))
    return node_hash(_subtree_root(leaves[:k]), _subtree_root(leaves[k:]))


def inclusion_proof(record_hashes: Sequence[str], index: int) -> list[str]:
    """The audit path (RFC 6962 PATH(m, D[n])) proving leaf ``index`` is in the tree, as hex."""
    if not 0 <= index < len(record_hashes):
        raise ValueError(f"leaf index {index} is outside the tree of size {len(record_hashes)}")
    leaves = [leaf_hash(h) for h in record_hashes]
    path: list[bytes] = []

    def walk(m: int, nodes: Sequence[bytes]) -> None:
        if len(nodes) <= 1:
            return
        k = _largest_power_of_two_below(len(nodes))
        if m < k:
            walk(m, nodes[:k])
            path.append(_subtree_root(nodes[k:]))
        else:
            walk(m - k, nodes[k:])
            path.append(_subtree_root(nodes[:k]))

    walk(index, leaves)
    return [p.hex() for p in path]


def verify_inclusion(record_hash: str, index: int, tree_size: int, proof: Sequence[str], root: str) -> bool:
    """RFC 9162 section 2.1.3.2: does ``proof`` place ``record_hash`` at ``index`` under ``root``?"""
    if index < 0 or index >= tree_size:
        return False
    fn, sn = index, tree_size - 1
    r = leaf_hash(record_hash)
    for hex_node in proof:
        p = bytes.fromhex(hex_node)
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r.hex() == root
