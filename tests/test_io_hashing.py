"""io.hashing: input hashes computed from the reads a merge does anyway, and always the file's SHA-256."""

from __future__ import annotations

import hashlib
import random

import pytest
import torch
from ckpt_fixtures import small_state_dict, write_variants
from safetensors.torch import save_file

from twamerge.io import StreamingHasher, count_reads, open_checkpoints, sha256_file


def _plain_sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _file(tmp_path, n=10_000):
    p = tmp_path / "blob.bin"
    p.write_bytes(random.Random(0).randbytes(n))
    return p, p.read_bytes()


def test_sequential_reads_hash_without_extra_reads(tmp_path):
    path, data = _file(tmp_path)
    with count_reads() as reads:
        h = StreamingHasher(path)
        for a in range(0, len(data), 999):
            h.update(a, data[a:a + 999])
        assert h.finish() == _plain_sha(path)
    assert reads.hash_bytes_read.get(path.resolve(), 0) == 0


def test_out_of_order_and_partial_reads_still_give_the_file_hash(tmp_path):
    path, data = _file(tmp_path)
    with count_reads() as reads:
        h = StreamingHasher(path)
        h.update(5000, data[5000:6000])  # gap [0, 5000) read by the hasher
        h.update(100, data[100:200])  # already hashed: ignored
        h.update(5500, data[5500:7000])  # overlaps: only [6000, 7000) is new
        h.update(9000, data[9000:9500])  # gap [7000, 9000)
        assert h.pos == 9500
        assert h.finish() == _plain_sha(path)  # tail [9500, EOF)
        assert h.finish() == _plain_sha(path)  # computed once
    assert reads.hash_bytes_read[path.resolve()] == 5000 + 2000 + 500


def test_a_large_jump_is_left_to_finish(tmp_path):
    """Gaps larger than both ``small_gap`` and the data read are not read at update time."""
    path, data = _file(tmp_path)
    with count_reads() as reads:
        h = StreamingHasher(path, small_gap=100)
        h.update(0, data[:1000])
        h.update(1050, data[1050:1100])  # 50-byte gap: bridged
        assert h.pos == 1100 and reads.hash_bytes_read[path.resolve()] == 50
        h.update(8000, data[8000:8100])  # 6900-byte gap: left for finish
        h.update(9000, data[9000:9100])
        assert h.pos == 1100 and reads.hash_bytes_read[path.resolve()] == 50
        assert h.finish() == _plain_sha(path)
    assert reads.hash_bytes_read[path.resolve()] == 50 + len(data) - 1100


def test_finish_without_reads_and_the_cache(tmp_path):
    path, _ = _file(tmp_path)
    assert StreamingHasher(path).finish() == _plain_sha(path)
    with count_reads() as reads:
        assert sha256_file(path) == _plain_sha(path)  # cached by the finished hasher: no read
        assert StreamingHasher(path).finish() == _plain_sha(path)
    assert not reads.hash_bytes_read


def test_a_pass_in_file_order_hashes_every_safetensors_input(tmp_path):
    # save_file lays tensors out by dtype alignment then name, not in the order keys() lists them.
    sds = [small_state_dict(s) for s in range(2)]
    sds[0]["half"] = torch.ones(3, dtype=torch.float16)
    sds[1]["half"] = torch.zeros(3, dtype=torch.float16)
    paths = []
    for i, sd in enumerate(sds):
        paths.append(tmp_path / f"c{i}.safetensors")
        save_file(sd, str(paths[i]))
    with count_reads() as reads, open_checkpoints(paths) as cs:
        order = cs.keys_in_file_order()
        assert sorted(order) == sorted(cs.keys)
        assert [cs.position(0, k) for k in order] == sorted(cs.position(0, k) for k in order)
        for key in order:
            for i in range(len(cs)):
                cs.get(i, key)
        sources = cs.sources()
    assert [s["sha256"] for s in sources] == [_plain_sha(p) for p in paths]
    assert all(reads.hash_bytes_read.get(p.resolve(), 0) == 0 for p in paths)
    assert all(reads.bytes_read[p.resolve()] > 0 for p in paths)


def test_sources_hashes_are_those_of_before(tmp_path):
    """sha256 of the file; for an index: sha256 of "name:sha\\n" lines over the index and its shards."""
    paths, _ = write_variants(tmp_path)
    with open_checkpoints(paths) as cs:
        for key in reversed(cs.keys):  # the wrong order: gap reads, same hashes
            cs.get(1, key)
        sources = cs.sources()
    index = paths[2]
    lines = [index] + [index.parent / name for name in dict.fromkeys(
        __import__("json").loads(index.read_text())["weight_map"].values())]
    sharded = hashlib.sha256("".join(f"{f.name}:{_plain_sha(f)}\n" for f in lines).encode()).hexdigest()
    assert [s["sha256"] for s in sources] == [_plain_sha(paths[0]), _plain_sha(paths[1]), sharded,
                                              _plain_sha(paths[3])]


def test_background_hash_owns_a_copy_and_keeps_order():
    """Pieces are hashed in submission order from private copies: the caller may reuse its buffer at once,
    and a queue limit smaller than the pieces only makes submit wait."""
    from twamerge.io.hashing import BackgroundHash

    bg = BackgroundHash(limit=1000)
    rng = random.Random(1)
    pieces = [rng.randbytes(rng.randrange(1, 5000)) for _ in range(50)]
    h = hashlib.sha256()
    buf = bytearray(5000)
    for p in pieces:
        buf[: len(p)] = p
        bg.submit(h, memoryview(buf)[: len(p)])
        buf[:] = b"\0" * len(buf)  # overwritten before the thread may have hashed it
    bg.wait()
    assert h.hexdigest() == hashlib.sha256(b"".join(pieces)).hexdigest()


def test_background_hash_failure_is_raised_by_wait():
    from twamerge.io.hashing import BackgroundHash

    class Broken:
        def update(self, data):
            raise ValueError("boom")

    bg = BackgroundHash()
    bg.submit(Broken(), b"x" * 10)
    with pytest.raises(RuntimeError, match="boom"):
        bg.wait()
    bg.submit(hashlib.sha256(), b"y")  # the thread goes on after a failure
    bg.wait()
