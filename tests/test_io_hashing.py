"""io.hashing: input hashes on worker threads beside the reads, never on them; always the file's SHA-256."""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import random
import threading

import pytest
import torch
from ckpt_fixtures import small_state_dict, write_variants
from safetensors.torch import save_file

from twamerge.errors import CheckpointError
from twamerge.io import FileHash, count_reads, hashing, open_checkpoints, sha256_file


def _plain_sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _file(tmp_path, n=10_000, name="blob.bin"):
    p = tmp_path / name
    p.write_bytes(random.Random(n).randbytes(n))
    return p


@pytest.mark.parametrize("n", [0, 1, 4096, 3 * 4096 + 7])
def test_file_hash_is_the_sha256_of_the_file_in_pieces_or_mapped(tmp_path, monkeypatch, n):
    """Mapped in pieces smaller than the file (the pieces' pages unmapped after each), and read in pieces
    where no map is possible: the digest is hashlib's of the whole file, and every byte is counted once."""
    monkeypatch.setattr(hashing, "_MAP_CHUNK", 4096)
    monkeypatch.setattr(hashing, "_CHUNK", 1000)
    path = _file(tmp_path, n)
    with count_reads() as reads:
        assert FileHash(path).result() == _plain_sha(path)
    assert reads.hash_bytes_read.get(path.resolve(), 0) == n
    hashing._SHA_CACHE.clear()

    def no_map(*args, **kwargs):
        raise OSError("no mmap on this file system")

    monkeypatch.setattr(hashing.mmap, "mmap", no_map)
    with count_reads() as reads:
        assert FileHash(path).result() == _plain_sha(path)
    assert reads.hash_bytes_read.get(path.resolve(), 0) == n


def test_known_digests_are_not_computed_again(tmp_path):
    path = _file(tmp_path)
    assert FileHash(path).result() == _plain_sha(path)
    with count_reads() as reads:
        assert sha256_file(path) == _plain_sha(path)  # cached by the finished FileHash: no read
        assert FileHash(path).result() == _plain_sha(path)
    assert not reads.hash_bytes_read


def test_the_hash_is_of_the_open_file_even_when_the_path_is_replaced(tmp_path):
    """A trainer saving by rename over a candidate mid-merge: the digest still describes the bytes merged."""
    sd = small_state_dict(0)
    paths = [tmp_path / "a.safetensors", tmp_path / "b.pt"]
    save_file(sd, str(paths[0]))
    torch.save(sd, paths[1])
    before = [_plain_sha(p) for p in paths]
    with open_checkpoints(paths) as cs:
        for p in paths:
            replacement = p.with_name("new" + p.suffix)
            save_file(small_state_dict(1), str(replacement)) if p.suffix == ".safetensors" else torch.save(
                small_state_dict(1), replacement)
            os.replace(replacement, p)
        assert torch.equal(cs.get(0, "fc.weight"), sd["fc.weight"]) and torch.equal(cs.get(1, "fc.weight"),
                                                                                    sd["fc.weight"])
        assert [s["sha256"] for s in cs.sources()] == before != [_plain_sha(p) for p in paths]


def test_a_file_changed_in_place_while_hashed_is_an_error(tmp_path, monkeypatch):
    path = _file(tmp_path)
    hash_mapped = hashing.FileHash._hash_mapped

    def append_first(self, fd, size, h):
        with open(path, "ab") as fh:  # another program writes to the file meanwhile
            fh.write(b"more")
        hash_mapped(self, fd, size, h)

    monkeypatch.setattr(hashing.FileHash, "_hash_mapped", append_first)
    with pytest.raises(CheckpointError, match="blob.bin: the file changed while twamerge read it"):
        FileHash(path).result()
    # Changed after its hash was computed, while the merge still read it: found when the hash is asked for.
    monkeypatch.setattr(hashing.FileHash, "_hash_mapped", hash_mapped)
    done = FileHash(path)
    assert done.result() == _plain_sha(path)
    with open(path, "r+b") as fh:
        fh.write(b"X")
        os.utime(path, ns=(0, 0))  # a write within the same mtime tick would look unchanged
    with pytest.raises(CheckpointError, match="blob.bin: the file changed while twamerge read it"):
        done.result()


def test_reads_never_hash_and_sources_hash_each_file_once(tmp_path):
    """The reading path does no hashing at all; the hashing threads read each input once, when asked."""
    paths, _ = write_variants(tmp_path)
    with count_reads() as reads, open_checkpoints(paths) as cs:
        for key in cs.keys_in_file_order():
            for i in range(len(cs)):
                cs.get(i, key)
        assert not reads.hash_bytes_read
        files = [f for c in cs.candidates for f in c.reader.files]
        cs.start_hashing()
        first = cs.sources()
        assert cs.sources() == first
    assert {f.resolve(): f.stat().st_size for f in files} == dict(reads.hash_bytes_read)


def test_closing_a_set_cancels_its_hashes_and_leaks_no_descriptor(tmp_path):
    paths = [tmp_path / f"{i}.safetensors" for i in range(3)]
    for i, p in enumerate(paths):
        save_file({"w": torch.full((1 << 20,), float(i))}, str(p))
    fds = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    cs = open_checkpoints(paths)
    cs.start_hashing()
    jobs = [h for c in cs.candidates for h in c.start_hashing()]
    cs.close()
    # Each job is cancelled before it starts, stops between pieces, or had finished: none is left running.
    concurrent.futures.wait([h._future for h in jobs], timeout=60)
    assert all(h._future.done() for h in jobs)
    if fds is not None:
        assert len(os.listdir("/proc/self/fd")) == fds


def test_hash_workers_leave_a_core_to_the_reader():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert hashing.hash_workers() == max(1, cores - 1)


def test_a_pass_in_file_order_reads_each_file_front_to_back(tmp_path):
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
    assert all(reads.hash_bytes_read[p.resolve()] == p.stat().st_size for p in paths)
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


def test_background_hash_without_copy_hashes_the_caller_s_buffer_itself():
    """``copy=False`` (the writer's tensors, alive until ``wait``): the queue holds the caller's buffer, not a copy
    of it, so what is hashed is what the buffer holds when the thread gets to it."""
    from twamerge.io.hashing import BackgroundHash

    bg, h = BackgroundHash(), hashlib.sha256()
    buf = bytearray(b"a" * 1000)
    release = threading.Event()
    bg.submit(_Waiting(release), b"")  # holds the thread back until the buffer has changed
    bg.submit(h, memoryview(buf), copy=False)
    buf[:] = b"b" * 1000
    release.set()
    bg.wait()
    assert h.hexdigest() == hashlib.sha256(b"b" * 1000).hexdigest()


class _Waiting:
    def __init__(self, event):
        self.event = event

    def update(self, data):
        self.event.wait(10)


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
