"""machinery's workflow examples on nbqueue's embedded default: nothing to install or start.

Run with ``python workflows.py``. A worker runs in background threads of this process;
broker and results live in ./.nbqueue/nbqueue.db.

- a group: three sums that run in parallel; their values come back in group order;
- a chord: the same group, whose values go (in order) to a callback that multiplies them;
- a chain: each sum's result is appended to the next step's arguments.
"""
import math

import nbqueue

app = nbqueue.App()  # broker and results in ./.nbqueue/nbqueue.db


@app.task(name="add")
def add(*numbers):
    """machinery's ``add``: the sum of its arguments."""
    return sum(numbers)


@app.task(name="multiply")
def multiply(*numbers):
    """machinery's ``multiply``: the product of its arguments (a chord passes them as one list)."""
    flat = [n for item in numbers for n in (item if isinstance(item, list) else [item])]
    return math.prod(flat)


def main() -> None:
    worker = app.start_worker(concurrency=3)  # returns at once

    # 1. a group: add(1, 1), add(2, 2), add(3, 3) in parallel
    sums = nbqueue.group(add.s(1, 1), add.s(2, 2), add.s(3, 3))
    res = app.send_group(sums)
    print("group:", res.get(timeout=30))
    print("  per member:", [r.state for r in res.results], "| progress:", res.progress())

    # 2. a chord: the same three sums, then multiply(2, 4, 6)
    res = app.send_chord(nbqueue.chord(nbqueue.group(add.s(1, 1), add.s(2, 2), add.s(3, 3)), multiply.s()))
    print("chord:", res.get(timeout=30))
    print("  header values:", res.header.get(timeout=30))

    # 3. a chain: add(1, 1) = 2 -> add(5, 5, 2) = 12 -> add(10, 12) = 22
    res = app.send_chain(nbqueue.chain(add.s(1, 1), add.s(5, 5), add.s(10)))
    print("chain:", res.get(timeout=30))
    print("  per step:", [r.get(timeout=30) for r in res.results])

    worker.stop()


if __name__ == "__main__":
    main()
