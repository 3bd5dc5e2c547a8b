"""Tasks used by benchmark worker processes (imported by ``nbqueue worker --app``)."""
import os

import nbqueue

app = nbqueue.App(os.environ.get("NBQUEUE_BROKER"), os.environ.get("NBQUEUE_BACKEND"),
                  default_queue=os.environ.get("NBQUEUE_DEFAULT_QUEUE", "bench"))


@app.task(name="noop")
def noop(i=None):
    return i


@app.task(name="add")
def add(x, y):
    return x + y


@app.task(name="total")
def total(values):
    return sum(values)
