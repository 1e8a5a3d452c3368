"""Small, fast instances of every public estimator for tests/test_common.py.

Add one entry per estimator (and per important configuration). ``EXPECTED``
maps an estimator class name to ``{check_name: reason}`` for checks that are
expected to fail, each with a written reason.
"""

INSTANCES = []
EXPECTED = {}
