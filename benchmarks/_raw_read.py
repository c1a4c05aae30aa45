"""Issue 20's divisor for read-bound work: ``open(...).readinto`` of every byte of every file into one reused
16 MiB buffer, no tensors (the speed of the bytes from the page cache). Shared by scale.py, subspace_build.py,
reader.py and distributed.py, so that every ratio against "a raw read" divides by the same thing."""


def raw_read(paths) -> None:
    buf = memoryview(bytearray(16 << 20))
    for p in paths:
        with open(p, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
