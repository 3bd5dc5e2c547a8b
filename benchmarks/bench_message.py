"""The envelope's decode, per claimed task: to the checked JSON object (``decode_object``) and to
a ``Message`` (what ``Engine.claim`` makes of each delivery), and ``Message.from_dict`` alone.
Quoted beside the JSON parse of the same body (``serialization.loads``), the floor.

    .venv/bin/python benchmarks/bench_message.py
"""
from __future__ import annotations

import os
import sys
import timeit

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nbqueue import serialization  # noqa: E402
from nbqueue.message import Message, decode_object  # noqa: E402

BODIES = {
    "a task": Message(id="8c0f1f0e-3b7a-4b55-9d7e-0a4a1f3c2b11", name="noop", args=[1], kwargs={}, queue="bench",
                      created_at=1764500000.123).encode(),
    "a chord member": Message(id="8c0f1f0e-3b7a-4b55-9d7e-0a4a1f3c2b11", name="noop", args=[1], kwargs={},
                              queue="bench", created_at=1764500000.123, group_id="g",
                              workflow={"then": [{"kind": "member", "group": "g", "index": 3, "member": "m",
                                                  "limited": False}]}).encode(),
}
N = int(os.environ.get("N", "100000"))


def main() -> None:
    for label, body in BODIES.items():
        data = decode_object(body)
        cases = {
            "floor: serialization.loads": lambda: serialization.loads(body),
            "decode_object (checked dict)": lambda: decode_object(body),
            "Message.decode": lambda: Message.decode(body),
            "Message.from_dict of the dict": lambda: Message.from_dict(data),
        }
        best = {name: float("inf") for name in cases}
        for _ in range(7):          # alternated, so each case sees the same load
            for name, case in cases.items():
                best[name] = min(best[name], timeit.timeit(case, number=N) / N)
        floor = best["floor: serialization.loads"]
        print(f"-- {label} ({len(body)} bytes)")
        for name, seconds in best.items():
            print(f"   {name:32s} {seconds * 1e9:7.0f} ns  ({seconds / floor:.2f}x floor)")


if __name__ == "__main__":
    main()
