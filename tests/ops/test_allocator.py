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

def forward_pass():  # temporaries of 2 to 12 MiB alive together, then all freed, as in a layer
    alive = [torch.ones(n << 18) for n in range(2, 13, 2)]
    return sum(float(t[0]) for t in alive)

for _ in range(3):  # the heap grows to its working size
    forward_pass()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    forward_pass()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True,
                         env={"RWKVPY_MALLOC": "", "PATH": ""})
    return int(out.stdout.split()[-1])


def test_freed_memory_is_reused_without_page_faults():
    """Passes that each make and free 42 MiB of temporaries: kept, the pages of the first
    passes serve every later one (no page faults); glibc's defaults give part of it back after
    each pass and fault it in again (3,072 faults in 10 passes on the development machine)."""
    if not keep_freed_memory():
        pytest.skip("no glibc mallopt here: the allocator is left as it is")
    kept = faults("keep")
    assert kept < 64, (kept, faults("default"))


def test_the_default_allocator_can_be_kept(monkeypatch):
    import rwkvpy.ops.allocator as allocator

    monkeypatch.setattr(allocator, "_applied", None)
    monkeypatch.setenv("RWKVPY_MALLOC", "default")
    assert allocator.keep_freed_memory() is False
