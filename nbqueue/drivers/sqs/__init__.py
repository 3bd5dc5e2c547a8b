"""Amazon SQS broker (``sqs://``, or machinery's ``https://sqs.<region>.amazonaws.com/<account>``).
Extra: ``nbqueue[sqs]``. Results default to the SQLite file.
"""
NAME = "sqs"
SCHEMES = ("sqs", "https")
BROKER = "nbqueue.drivers.sqs.broker:SQSBroker"
OPTIONS = frozenset({"region", "endpoint_url", "max_deliveries", "wait_time_seconds", "idle_poll", "create_queues"})
EXTRA = "sqs"
