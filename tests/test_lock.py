"""The environment the tests run in is the one requirements.lock describes, version for version.

The README's commands install from the lock; a package that drifted (installed by hand, or resolved
from an open range) would make a green run mean nothing for a fresh machine.
"""

import re
from importlib.metadata import distributions
from pathlib import Path

LOCK = Path(__file__).resolve().parents[1] / "requirements.lock"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_locked_package_is_installed_at_its_locked_version():
    locked = {_norm(n): v for n, v in re.findall(r"^([A-Za-z0-9._-]+)==(\S+)", LOCK.read_text(), re.M)}
    assert len(locked) > 50 and "transformers" in locked and locked["torch"].endswith("+cpu")
    installed = {_norm(d.metadata["Name"]): d.version for d in distributions()}
    wrong = {n: (v, installed.get(n)) for n, v in locked.items() if installed.get(n) != v}
    assert not wrong, f"installed versions differ from requirements.lock (locked, installed): {wrong}"


def test_the_lock_pins_everything_it_lists_and_no_cuda_wheels():
    text = LOCK.read_text()
    requirements = [line for line in text.splitlines() if line and not line.startswith((" ", "#", "-"))]
    assert all("==" in r for r in requirements), [r for r in requirements if "==" not in r]
    assert not [r for r in requirements if r.startswith(("nvidia-", "triton"))]
