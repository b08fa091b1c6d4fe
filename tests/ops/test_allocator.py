"""glibc set to keep freed memory: large temporaries stop paying page faults."""

import subprocess
import sys

import pytest

from rwkvpy.ops.allocator import keep_freed_memory

CHILD = """
import resource, sys, torch
if sys.argv[1] == "keep":
    from rwkvpy.ops.allocator import keep_freed_memory
    assert keep_freed_memory() and keep_freed_memory()  # once per process, then a no-op

def forward_pass():  # 80 MiB of 4 MiB temporaries alive together, then all freed, as in a layer
    alive = [torch.ones(1 << 20) for _ in range(20)]
    return len(alive)

forward_pass()  # the heap grows to its working size
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(11):
    forward_pass()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PASS_PAGES = 80 << 8  # 4 KiB pages touched by one pass


def faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True,
                         env={"RWKVPY_MALLOC": "", "PATH": ""})
    return int(out.stdout.split()[-1])


def test_freed_memory_is_reused_without_page_faults():
    """Passes that each make and free 80 MiB of temporaries: kept, the first pass's pages serve
    the later ones. Measured on the development machine (30 runs): the 11 passes after the first
    faulted 1,024-5,120 pages in all (the heap settling in the second or third pass, then 0),
    where glibc's defaults faulted 21,500-42,000 (each pass mapped afresh until its thresholds
    adapt, two or three passes later). The bound is half a pass."""
    if not keep_freed_memory():
        pytest.skip("no glibc mallopt here: the allocator is left as it is")
    kept = faults("keep")
    assert kept < PASS_PAGES // 2, (kept, faults("default"))


def test_the_default_allocator_can_be_kept(monkeypatch):
    import rwkvpy.ops.allocator as allocator

    monkeypatch.setattr(allocator, "_applied", None)
    monkeypatch.setenv("RWKVPY_MALLOC", "default")
    assert allocator.keep_freed_memory() is False
