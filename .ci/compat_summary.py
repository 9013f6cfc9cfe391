"""pytest plugin for .ci/run's compatibility-mode run, against a real Salt 3008.4.

.ci/run loads it with ``PYTHONPATH=.ci PYTEST_PLUGINS=compat_summary`` (and sets
SALTEVENT_REQUIRE_SALT=1, which turns test_saltevent.py's "Salt is missing" skip into a
failure).  It fails the session when any test of the compatibility mode (a test that
takes the ``impl`` fixture) was skipped, when none ran against Salt, or when
test_compat_mode_runs_against_salt did not pass; and it prints one line that .ci/run
repeats in its summary::

    compat: against salt N, against saltevent M (X strict xfail), deliberate differences K tests (R runs)
"""
import pytest

_impl = {}               # nodeid -> "salt" or "saltevent", for tests that take impl
_deliberate = {}         # nodeid -> test function name, for @pytest.mark.deliberate tests
_ran = {}                # nodeid -> "passed", "failed" or "xfailed" (had a call phase)
_skipped = []            # nodeids of compatibility-mode tests that were skipped
_sentinel = {"passed": False}
SENTINEL = "test_compat_mode_runs_against_salt"


def pytest_collection_modifyitems(items):
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and "impl" in callspec.params:
            _impl[item.nodeid] = callspec.params["impl"]
            if item.get_closest_marker("deliberate") is not None:
                _deliberate[item.nodeid] = item.originalname


def pytest_runtest_logreport(report):
    xfailed = hasattr(report, "wasxfail")
    if report.nodeid.endswith("::" + SENTINEL) and report.when == "call":
        _sentinel["passed"] = report.passed
    if report.nodeid not in _impl:
        return
    if report.skipped and not xfailed:
        _skipped.append(report.nodeid)
    elif report.when == "call":
        _ran[report.nodeid] = "xfailed" if xfailed else report.outcome


def _problems():
    problems = []
    if _skipped:
        problems.append(f"{len(_skipped)} compatibility-mode tests were skipped, e.g. "
                        f"{_skipped[0]}")
    if not any(_impl[nodeid] == "salt" for nodeid in _ran):
        problems.append("no test ran against Salt")
    if not _sentinel["passed"]:
        problems.append(f"{SENTINEL} did not pass")
    return problems


def summary_line():
    def count(name):
        return sum(1 for nodeid in _ran if _impl[nodeid] == name)
    xfails = sum(1 for nodeid, outcome in _ran.items()
                 if outcome == "xfailed" and _impl[nodeid] == "saltevent")
    runs = [nodeid for nodeid in _deliberate if nodeid in _ran]
    tests = len({_deliberate[nodeid] for nodeid in runs})
    runs = len(runs)
    return (f"compat: against salt {count('salt')}, against saltevent {count('saltevent')} "
            f"({xfails} strict xfail), deliberate differences {tests} tests ({runs} runs)")


def pytest_sessionfinish(session, exitstatus):
    if _problems() and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(summary_line())
    for problem in _problems():
        terminalreporter.write_line(f"compat: FAILED: {problem}", red=True, bold=True)
