"""Task states, as machinery and Celery spell them."""
PENDING = "PENDING"      # sent, not yet picked up
RECEIVED = "RECEIVED"    # reserved by a worker
STARTED = "STARTED"      # running
RETRY = "RETRY"          # failed or asked to retry; will run again under the same id
SUCCESS = "SUCCESS"
FAILURE = "FAILURE"
REVOKED = "REVOKED"      # cancelled, or a workflow step that never ran because an earlier one failed

READY_STATES = frozenset({SUCCESS, FAILURE, REVOKED})
UNREADY_STATES = frozenset({PENDING, RECEIVED, STARTED, RETRY})
ALL_STATES = (PENDING, RECEIVED, STARTED, RETRY, SUCCESS, FAILURE, REVOKED)
